// Double reference of RMSNorm and of Mamba-2's gated grouped RMSNorm
// (mamba_ssm RMSNormGated, norm_before_gate=False: normalise y * silu(z) per group).
#pragma once
#include <cmath>
#include <vector>

namespace ref {

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double silu(double x) { return x * sigmoid(x); }
// d silu(x) / dx
inline double silu_grad(double x) {
    double s = sigmoid(x);
    return s * (1.0 + x * (1.0 - s));
}

// out = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) per row
inline void rmsnorm_forward(double* out, double* rstd, const double* x, const double* w, int rows, int C, double eps) {
    for (int r = 0; r < rows; r++) {
        const double* xr = x + (size_t)r * C;
        double ss = 0.0;
        for (int c = 0; c < C; c++) ss += xr[c] * xr[c];
        double s = 1.0 / std::sqrt(ss / C + eps);
        rstd[r] = s;
        for (int c = 0; c < C; c++) out[(size_t)r * C + c] = xr[c] * s * w[c];
    }
}

// Backward of out = v * rstd * w over one group of n channels: dv written, dw accumulated.
// dv_i = rstd * g_i - rstd^3 * v_i * mean(g * v), g = dout * w.
inline void rmsnorm_group_backward(double* dv, double* dw, const double* dout, const double* v, const double* w,
                                   double rstd, int n) {
    double gv = 0.0;
    for (int c = 0; c < n; c++) gv += dout[c] * w[c] * v[c];
    double mean_gv = gv / n;
    for (int c = 0; c < n; c++) {
        dv[c] = rstd * dout[c] * w[c] - rstd * rstd * rstd * v[c] * mean_gv;
        dw[c] += dout[c] * v[c] * rstd;
    }
}

// dx accumulates (residual gradient), dw accumulates
inline void rmsnorm_backward(double* dx, double* dw, const double* dout, const double* x, const double* w,
                             const double* rstd, int rows, int C) {
    std::vector<double> dv(C);
    for (int r = 0; r < rows; r++) {
        rmsnorm_group_backward(dv.data(), dw, dout + (size_t)r * C, x + (size_t)r * C, w, rstd[r], C);
        for (int c = 0; c < C; c++) dx[(size_t)r * C + c] += dv[c];
    }
}

// out = rmsnorm over each group of C/groups channels of v = y * silu(z), times w; rstd (rows, groups)
inline void gated_rmsnorm_forward(double* out, double* rstd, const double* y, const double* z, const double* w,
                                  int rows, int C, int groups, double eps) {
    int n = C / groups;
    for (int r = 0; r < rows; r++) {
        for (int g = 0; g < groups; g++) {
            size_t base = (size_t)r * C + (size_t)g * n;
            double ss = 0.0;
            for (int c = 0; c < n; c++) {
                double v = y[base + c] * silu(z[base + c]);
                ss += v * v;
            }
            double s = 1.0 / std::sqrt(ss / n + eps);
            rstd[(size_t)r * groups + g] = s;
            for (int c = 0; c < n; c++) out[base + c] = y[base + c] * silu(z[base + c]) * s * w[g * n + c];
        }
    }
}

// dy, dz written; dw accumulates
inline void gated_rmsnorm_backward(double* dy, double* dz, double* dw, const double* dout, const double* y,
                                   const double* z, const double* w, const double* rstd, int rows, int C, int groups) {
    int n = C / groups;
    std::vector<double> v(n), dv(n);
    for (int r = 0; r < rows; r++) {
        for (int g = 0; g < groups; g++) {
            size_t base = (size_t)r * C + (size_t)g * n;
            for (int c = 0; c < n; c++) v[c] = y[base + c] * silu(z[base + c]);
            rmsnorm_group_backward(dv.data(), dw + g * n, dout + base, v.data(), w + g * n,
                                   rstd[(size_t)r * groups + g], n);
            for (int c = 0; c < n; c++) {
                dy[base + c] = dv[c] * silu(z[base + c]);
                dz[base + c] = dv[c] * y[base + c] * silu_grad(z[base + c]);
            }
        }
    }
}

} // namespace ref
