// Double reference of the causal depthwise conv1d (width K, left zero padding) + bias + SiLU
// over (B,T,C): out[b,t,c] = silu(b[c] + sum_k w[c,k] in[b, t-(K-1)+k, c]).
#pragma once
#include <vector>
#include "norm.h"  // silu, silu_grad

namespace ref {

inline double conv1d_preact(const double* in, const double* w, const double* b, int bi, int t, int c,
                            int T, int C, int K) {
    double acc = b[c];
    for (int k = 0; k < K; k++) {
        int ts = t - (K - 1) + k;
        if (ts >= 0) acc += w[(size_t)c * K + k] * in[((size_t)bi * T + ts) * C + c];
    }
    return acc;
}

inline void conv1d_silu_forward(double* out, const double* in, const double* w, const double* b,
                                int B, int T, int C, int K) {
    for (int bi = 0; bi < B; bi++)
        for (int t = 0; t < T; t++)
            for (int c = 0; c < C; c++)
                out[((size_t)bi * T + t) * C + c] = silu(conv1d_preact(in, w, b, bi, t, c, T, C, K));
}

// din written; dw, db accumulate
inline void conv1d_silu_backward(double* din, double* dw, double* db, const double* dout, const double* in,
                                 const double* w, const double* b, int B, int T, int C, int K) {
    size_t n = (size_t)B * T * C;
    std::vector<double> dpre(n);
    for (int bi = 0; bi < B; bi++)
        for (int t = 0; t < T; t++)
            for (int c = 0; c < C; c++) {
                size_t i = ((size_t)bi * T + t) * C + c;
                dpre[i] = dout[i] * silu_grad(conv1d_preact(in, w, b, bi, t, c, T, C, K));
            }
    for (size_t i = 0; i < n; i++) din[i] = 0.0;
    for (int bi = 0; bi < B; bi++)
        for (int t = 0; t < T; t++)
            for (int c = 0; c < C; c++) {
                double d = dpre[((size_t)bi * T + t) * C + c];
                db[c] += d;
                for (int k = 0; k < K; k++) {
                    int ts = t - (K - 1) + k;
                    if (ts < 0) continue;
                    size_t is = ((size_t)bi * T + ts) * C + c;
                    dw[(size_t)c * K + k] += d * in[is];
                    din[is] += d * w[(size_t)c * K + k];
                }
            }
}

} // namespace ref
