// Plain matmuls through cuBLAS, in PyTorch Linear's convention: out(M,N) = inp(M,K) @ W(N,K)^T.
// bf16 operands, fp32 accumulation; weight gradients accumulate in fp32.
// Row-major (M,N) is column-major (N,M), so each call is written for cuBLAS's column-major view.
#pragma once
#include <cublas_v2.h>
#include <vector>
#include "cuda_common.cuh"

inline void cublas_check(cublasStatus_t st, const char* file, int line) {
    if (st != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "cuBLAS error %d at %s:%d\n", (int)st, file, line);
        exit(EXIT_FAILURE);
    }
}
#define cublasCheck(st) cublas_check((st), __FILE__, __LINE__)

// One cuBLAS handle serves every stream but those given one of their own (matmul_own_handle): a handle's
// workspace must not serve two matmuls at once, and a side stream's matmuls run beside the main stream's.
struct CublasHandles {
    cublasHandle_t shared = nullptr;
    std::vector<std::pair<cudaStream_t, cublasHandle_t>> own;
};
inline CublasHandles& cublas_handles() {
    static CublasHandles h;
    return h;
}
inline cublasHandle_t new_cublas_handle() {
    cublasHandle_t h;
    cublasCheck(cublasCreate(&h));
    cublasCheck(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
    return h;
}
inline void matmul_init() {
    if (!cublas_handles().shared) cublas_handles().shared = new_cublas_handle();
}
// stream s gets a handle of its own until matmul_release(s) (before s is destroyed)
inline void matmul_own_handle(cudaStream_t s) { cublas_handles().own.push_back({s, new_cublas_handle()}); }
inline void matmul_release(cudaStream_t s) {
    auto& own = cublas_handles().own;
    for (size_t i = 0; i < own.size(); i++)
        if (own[i].first == s) {
            cublasDestroy(own[i].second);
            own.erase(own.begin() + i);
            return;
        }
}
inline cublasHandle_t cublas_handle(cudaStream_t s) {
    for (const auto& [st, h] : cublas_handles().own)
        if (st == s) return h;
    matmul_init();
    return cublas_handles().shared;
}

// C(col-major m x n, ldc) = alpha op(A) op(B) + beta C, A/B bf16, C bf16 or fp32 (Muon's
// Newton-Schulz iterations call it directly)
inline void gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const bf16* A, int lda, const bf16* B,
                 int ldb, void* C, cudaDataType ctype, int ldc, float beta, cudaStream_t s, float alpha = 1.0f) {
    const cublasHandle_t h = cublas_handle(s);
    cublasCheck(cublasSetStream(h, s));
    cublasCheck(cublasGemmEx(h, ta, tb, m, n, k, &alpha, A, CUDA_R_16BF, lda, B, CUDA_R_16BF, ldb, &beta, C, ctype, ldc,
                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// out = residual + inp @ W^T in fp32 (the residual stream)
inline void matmul_forward_residual(float* out, const float* residual, const bf16* inp, const bf16* weight, int M,
                                    int N, int K, cudaStream_t s) {
    if (out != residual) cudaCheck(cudaMemcpyAsync(out, residual, (size_t)M * N * sizeof(float), cudaMemcpyDeviceToDevice, s));
    gemm(CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, weight, K, inp, K, out, CUDA_R_32F, N, 1.0f, s);
}

// Row strides (in elements) for operands that are column slices of wider buffers, and
// whether dinp is written or accumulated (bf16 +=, for inputs that feed two matmuls).
struct MatmulStrides { int inp, out; bool accumulate_dinp = false; };

// Where N is not a multiple of 8 but the rows it strides are 16-byte aligned (mamba2-tiny's in_proj: 1676
// columns, rows 1680 apart), cuBLAS gives the whole product sm80 kernels; the first N - N % 8 columns alone get
// Hopper's, so they go first and the last few columns (or rows of W) after, in a small matmul of their own.
inline int aligned_part(int N, int ld) { return N % 8 != 0 && N > 64 && ld % 8 == 0 ? N / 8 * 8 : N; }

// out(M,N) = inp(M,K) @ W(N,K)^T, inp and out rows strided
inline void matmul_forward(bf16* out, const bf16* inp, const bf16* weight, int M, int N, int K, MatmulStrides ld,
                           cudaStream_t s) {
    const int N8 = aligned_part(N, ld.out);
    gemm(CUBLAS_OP_T, CUBLAS_OP_N, N8, M, K, weight, K, inp, ld.inp, out, CUDA_R_16BF, ld.out, 0.0f, s);
    if (N8 < N)
        gemm(CUBLAS_OP_T, CUBLAS_OP_N, N - N8, M, K, weight + (size_t)N8 * K, K, inp, ld.inp, out + N8, CUDA_R_16BF,
             ld.out, 0.0f, s);
}

// The backward in two halves, for callers that rebuild inp between them:
// dinp(M,K) = dout(M,N) @ W(N,K); ld.inp strides dinp, ld.out strides dout
// (N split as in matmul_forward: the last rows of W add to what the first wrote)
inline void matmul_backward_input(bf16* dinp, const bf16* dout, const bf16* weight, int M, int N, int K,
                                  MatmulStrides ld, cudaStream_t s) {
    const int N8 = aligned_part(N, ld.out);
    gemm(CUBLAS_OP_N, CUBLAS_OP_N, K, M, N8, weight, K, dout, ld.out, dinp, CUDA_R_16BF, ld.inp,
         ld.accumulate_dinp ? 1.0f : 0.0f, s);
    if (N8 < N)
        gemm(CUBLAS_OP_N, CUBLAS_OP_N, K, M, N - N8, weight + (size_t)N8 * K, K, dout + N8, ld.out, dinp, CUDA_R_16BF,
             ld.inp, 1.0f, s);
}
// dW(N,K) += dout^T @ inp, or with `write` dW = dout^T @ inp (what it held is never read: the first
// micro-batch of a step writes instead of adding to zeros); ld.inp strides inp, ld.out strides dout
inline void matmul_backward_weight(float* dweight, const bf16* dout, const bf16* inp, int M, int N, int K,
                                   MatmulStrides ld, cudaStream_t s, bool write = false) {
    gemm(CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, inp, ld.inp, dout, ld.out, dweight, CUDA_R_32F, K, write ? 0.0f : 1.0f, s);
}

// dinp(M,K) = dout(M,N) @ W(N,K) (skipped if dinp is null); dW(N,K) += dout^T @ inp (= with `write`).
// ld.inp strides inp and dinp, ld.out strides dout.
inline void matmul_backward(bf16* dinp, float* dweight, const bf16* dout, const bf16* inp, const bf16* weight, int M,
                            int N, int K, MatmulStrides ld, cudaStream_t s, bool write = false) {
    if (dinp) matmul_backward_input(dinp, dout, weight, M, N, K, ld, s);
    matmul_backward_weight(dweight, dout, inp, M, N, K, ld, s, write);
}

inline void matmul_forward(bf16* out, const bf16* inp, const bf16* weight, int M, int N, int K, cudaStream_t s) {
    matmul_forward(out, inp, weight, M, N, K, MatmulStrides{K, N}, s);
}

// dinp(M,K) = dout(M,N) @ W(N,K) (skipped if dinp is null); dW(N,K) += dout^T @ inp (= with `write`)
inline void matmul_backward(bf16* dinp, float* dweight, const bf16* dout, const bf16* inp, const bf16* weight, int M,
                            int N, int K, cudaStream_t s, bool write = false) {
    matmul_backward(dinp, dweight, dout, inp, weight, M, N, K, MatmulStrides{K, N}, s, write);
}
