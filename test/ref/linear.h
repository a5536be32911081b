// Double reference of a PyTorch Linear without bias: out(M,N) = inp(M,K) @ w(N,K)^T.
#pragma once

namespace ref {

inline void linear_forward(double* out, const double* inp, const double* w, int M, int N, int K) {
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++) acc += inp[(size_t)m * K + k] * w[(size_t)n * K + k];
            out[(size_t)m * N + n] = acc;
        }
    }
}

// dinp = dout @ w (written; skipped if nullptr); dw += dout^T @ inp
inline void linear_backward(double* dinp, double* dw, const double* dout, const double* inp, const double* w,
                            int M, int N, int K) {
    if (dinp) {
        for (int m = 0; m < M; m++) {
            for (int k = 0; k < K; k++) {
                double acc = 0.0;
                for (int n = 0; n < N; n++) acc += dout[(size_t)m * N + n] * w[(size_t)n * K + k];
                dinp[(size_t)m * K + k] = acc;
            }
        }
    }
    for (int n = 0; n < N; n++) {
        for (int k = 0; k < K; k++) {
            double acc = 0.0;
            for (int m = 0; m < M; m++) acc += dout[(size_t)m * N + n] * inp[(size_t)m * K + k];
            dw[(size_t)n * K + k] += acc;
        }
    }
}

} // namespace ref
