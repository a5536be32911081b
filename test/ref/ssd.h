// Double reference of Mamba-2's SSM as the plain sequential recurrence (no chunking), per
// batch b and head h (group g = h / (H/G)), state S (P,N):
//   dt_t = softplus(dt_raw_t + dt_bias), A = -exp(A_log), a_t = exp(dt_t A)
//   S_t = a_t S_{t-1} + dt_t x_t B_t^T,   y_t = S_t C_t + D x_t
// Layouts: x, y (B,T,H,P); Bm, Cm (B,T,G,N); dt_raw (B,T,H).
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>
#include "norm.h"  // sigmoid

namespace ref {

inline double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

struct SSDIndex {
    int B, T, H, P, G, N;
    size_t x(int b, int t, int h, int p) const { return (((size_t)b * T + t) * H + h) * P + p; }
    size_t bc(int b, int t, int g, int n) const { return (((size_t)b * T + t) * G + g) * N + n; }
    size_t dt(int b, int t, int h) const { return ((size_t)b * T + t) * H + h; }
};

// Runs the recurrence of one (b, h); states (T,P,N) receives S_t for every t if not null.
inline void ssd_scan_head(double* y, double* states, const double* x, const double* Bm, const double* Cm,
                          const double* dt_raw, const double* dt_bias, const double* A_log, const double* D,
                          const SSDIndex& ix, int b, int h) {
    int P = ix.P, N = ix.N, g = h / (ix.H / ix.G);
    double A = -std::exp(A_log[h]);
    std::vector<double> S((size_t)P * N, 0.0);
    for (int t = 0; t < ix.T; t++) {
        double dt = softplus(dt_raw[ix.dt(b, t, h)] + dt_bias[h]);
        double a = std::exp(dt * A);
        for (int p = 0; p < P; p++) {
            double xp = x[ix.x(b, t, h, p)];
            double acc = 0.0;
            for (int n = 0; n < N; n++) {
                double& s = S[(size_t)p * N + n];
                s = a * s + dt * xp * Bm[ix.bc(b, t, g, n)];
                acc += s * Cm[ix.bc(b, t, g, n)];
            }
            y[ix.x(b, t, h, p)] = acc + D[h] * xp;
        }
        if (states) std::copy(S.begin(), S.end(), states + (size_t)t * P * N);
    }
}

inline void ssd_forward(double* y, const double* x, const double* Bm, const double* Cm, const double* dt_raw,
                        const double* dt_bias, const double* A_log, const double* D,
                        int B, int T, int H, int P, int G, int N) {
    SSDIndex ix{B, T, H, P, G, N};
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) ssd_scan_head(y, nullptr, x, Bm, Cm, dt_raw, dt_bias, A_log, D, ix, b, h);
}

// Exact reverse-time backward. dx, dB, dC, ddt_raw written; ddt_bias, dA_log, dD accumulate.
inline void ssd_backward(double* dx, double* dB, double* dC, double* ddt_raw, double* ddt_bias, double* dA_log,
                         double* dD, const double* dy, const double* x, const double* Bm, const double* Cm,
                         const double* dt_raw, const double* dt_bias, const double* A_log, const double* D,
                         int B, int T, int H, int P, int G, int N) {
    SSDIndex ix{B, T, H, P, G, N};
    size_t nbc = (size_t)B * T * G * N;
    for (size_t i = 0; i < nbc; i++) dB[i] = dC[i] = 0.0;  // heads of a group sum into them
    std::vector<double> y((size_t)B * T * H * P), states((size_t)T * P * N), dS((size_t)P * N);
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            int g = h / (H / G);
            double A = -std::exp(A_log[h]);
            ssd_scan_head(y.data(), states.data(), x, Bm, Cm, dt_raw, dt_bias, A_log, D, ix, b, h);
            std::fill(dS.begin(), dS.end(), 0.0);
            double dA = 0.0;
            for (int t = T - 1; t >= 0; t--) {
                double pre = dt_raw[ix.dt(b, t, h)] + dt_bias[h];
                double dt = softplus(pre);
                double a = std::exp(dt * A);
                const double* S = states.data() + (size_t)t * P * N;
                const double* Sprev = t > 0 ? states.data() + (size_t)(t - 1) * P * N : nullptr;
                double ddt = 0.0, da = 0.0;
                for (int p = 0; p < P; p++) {
                    double dyp = dy[ix.x(b, t, h, p)], xp = x[ix.x(b, t, h, p)];
                    dD[h] += dyp * xp;
                    double dxp = D[h] * dyp;
                    for (int n = 0; n < N; n++) {
                        size_t i = (size_t)p * N + n;
                        double Bn = Bm[ix.bc(b, t, g, n)], Cn = Cm[ix.bc(b, t, g, n)];
                        // y_t = S_t C_t
                        dS[i] += dyp * Cn;
                        dC[ix.bc(b, t, g, n)] += dyp * S[i];
                        // S_t = a S_{t-1} + dt x B^T
                        dxp += dt * dS[i] * Bn;
                        dB[ix.bc(b, t, g, n)] += dt * dS[i] * xp;
                        ddt += dS[i] * xp * Bn;
                        if (Sprev) da += dS[i] * Sprev[i];
                        dS[i] *= a;  // now the gradient w.r.t. S_{t-1}
                    }
                    dx[ix.x(b, t, h, p)] = dxp;
                }
                // a = exp(dt A)
                ddt += da * a * A;
                dA += da * a * dt;
                double dpre = ddt * sigmoid(pre);
                ddt_raw[ix.dt(b, t, h)] = dpre;
                ddt_bias[h] += dpre;
            }
            dA_log[h] += dA * A;  // A = -exp(A_log)
        }
    }
}

} // namespace ref
