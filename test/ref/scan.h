// Double reference of Mamba-1's selective scan as the plain sequential recurrence, per batch b,
// channel d (of D), state n (of N); Bm and Cm are shared by all channels (one group):
//   delta_t = softplus(dt_raw_t + dt_bias), A = -exp(A_log[d,n]), a_t = exp(delta_t A)
//   h_t[n] = a_t[n] h_{t-1}[n] + delta_t Bm_t[n] u_t,   h_{-1} = 0
//   y_t = (sum_n Cm_t[n] h_t[n] + Dskip u_t) * silu(z_t)
// Layouts: u, dt_raw, z, y (B,T,D); Bm, Cm (B,T,N); A_log (D,N); dt_bias, Dskip (D).
#pragma once
#include <cmath>
#include <vector>
#include "ssd.h"  // softplus, sigmoid, silu, silu_grad

namespace ref {

struct ScanIndex {
    int B, T, D, N;
    size_t x(int b, int t, int d) const { return ((size_t)b * T + t) * D + d; }
    size_t bc(int b, int t, int n) const { return ((size_t)b * T + t) * N + n; }
};

// Runs the recurrence of one (b, d): pre[t] = sum_n C h_t + Dskip u_t (before the gate) and, if
// states is not null, states[t*N + n] = h_t[n].
inline void scan_channel(double* pre, double* states, const double* u, const double* dt_raw, const double* Bm,
                         const double* Cm, const double* dt_bias, const double* A_log, const double* Dskip,
                         const ScanIndex& ix, int b, int d) {
    const int N = ix.N;
    std::vector<double> h(N, 0.0);
    for (int t = 0; t < ix.T; t++) {
        const double delta = softplus(dt_raw[ix.x(b, t, d)] + dt_bias[d]);
        const double ut = u[ix.x(b, t, d)];
        double acc = Dskip[d] * ut;
        for (int n = 0; n < N; n++) {
            const double A = -std::exp(A_log[(size_t)d * N + n]);
            h[n] = std::exp(delta * A) * h[n] + delta * Bm[ix.bc(b, t, n)] * ut;
            acc += Cm[ix.bc(b, t, n)] * h[n];
            if (states) states[(size_t)t * N + n] = h[n];
        }
        pre[t] = acc;
    }
}

inline void selective_scan_forward(double* y, const double* u, const double* dt_raw, const double* z,
                                   const double* Bm, const double* Cm, const double* dt_bias, const double* A_log,
                                   const double* Dskip, int B, int T, int D, int N) {
    ScanIndex ix{B, T, D, N};
    std::vector<double> pre(T);
    for (int b = 0; b < B; b++)
        for (int d = 0; d < D; d++) {
            scan_channel(pre.data(), nullptr, u, dt_raw, Bm, Cm, dt_bias, A_log, Dskip, ix, b, d);
            for (int t = 0; t < T; t++) y[ix.x(b, t, d)] = pre[t] * silu(z[ix.x(b, t, d)]);
        }
}

// Exact reverse-time backward. du, ddt_raw, dz, dB, dC written; dA_log, dDskip, ddt_bias accumulate.
inline void selective_scan_backward(double* du, double* ddt_raw, double* dz, double* dB, double* dC, double* dA_log,
                                    double* dDskip, double* ddt_bias, const double* dy, const double* u,
                                    const double* dt_raw, const double* z, const double* Bm, const double* Cm,
                                    const double* dt_bias, const double* A_log, const double* Dskip,
                                    int B, int T, int D, int N) {
    ScanIndex ix{B, T, D, N};
    for (size_t i = 0; i < (size_t)B * T * N; i++) dB[i] = dC[i] = 0.0;  // channels sum into them
    std::vector<double> pre(T), states((size_t)T * N), dh(N);
    for (int b = 0; b < B; b++) {
        for (int d = 0; d < D; d++) {
            scan_channel(pre.data(), states.data(), u, dt_raw, Bm, Cm, dt_bias, A_log, Dskip, ix, b, d);
            std::fill(dh.begin(), dh.end(), 0.0);
            for (int t = T - 1; t >= 0; t--) {
                const size_t i = ix.x(b, t, d);
                const double x = dt_raw[i] + dt_bias[d];
                const double delta = softplus(x), ut = u[i];
                // y = pre * silu(z)
                dz[i] = dy[i] * pre[t] * silu_grad(z[i]);
                const double dpre = dy[i] * silu(z[i]);
                // pre = sum_n C h_t + Dskip u
                dDskip[d] += dpre * ut;
                double dut = Dskip[d] * dpre, ddelta = 0.0;
                for (int n = 0; n < N; n++) {
                    const double A = -std::exp(A_log[(size_t)d * N + n]);
                    const double a = std::exp(delta * A);
                    const double hprev = t > 0 ? states[(size_t)(t - 1) * N + n] : 0.0;
                    const double Bn = Bm[ix.bc(b, t, n)], Cn = Cm[ix.bc(b, t, n)];
                    dC[ix.bc(b, t, n)] += dpre * states[(size_t)t * N + n];
                    dh[n] += dpre * Cn;  // now the full gradient w.r.t. h_t
                    // h_t = a h_{t-1} + delta B u
                    dut += dh[n] * delta * Bn;
                    dB[ix.bc(b, t, n)] += dh[n] * delta * ut;
                    ddelta += dh[n] * (Bn * ut + hprev * a * A);
                    dA_log[(size_t)d * N + n] += dh[n] * hprev * a * delta * A;  // dA/dA_log = A
                    dh[n] *= a;  // gradient w.r.t. h_{t-1}
                }
                du[i] = dut;
                const double dx = ddelta * sigmoid(x);  // softplus' = sigmoid
                ddt_raw[i] = dx;
                ddt_bias[d] += dx;
            }
        }
    }
}

} // namespace ref
