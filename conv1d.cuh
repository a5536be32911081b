// Causal depthwise conv1d (width K, with bias) fused with SiLU, over (B, T, C) rows that
// may be slices of a wider buffer (the xBC part of Mamba-2's in_proj output):
//   pre[b,t,c] = bias[c] + sum_k w[c,k] in[b, t-(K-1)+k, c]   (zero before t = 0)
//   out = silu(pre)
#pragma once
#include "cuda_common.cuh"
#include "norm.cuh"  // silu, silu_grad

template <int K>
__device__ inline float conv1d_pre(const bf16* in, int in_stride, const bf16* w, const bf16* bias, int b, int t, int T,
                                   int c, int C) {
    float acc = __bfloat162float(bias[c]);
    #pragma unroll
    for (int k = 0; k < K; k++) {
        int ts = t - (K - 1) + k;
        if (ts >= 0) acc += __bfloat162float(w[c * K + k]) * __bfloat162float(in[((size_t)b * T + ts) * in_stride + c]);
    }
    return acc;
}

template <int K>
__global__ void conv1d_silu_forward_kernel(bf16* out, const bf16* in, int in_stride, const bf16* w, const bf16* bias,
                                           int B, int T, int C) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)B * T * C) return;
    const int c = (int)(i % C), t = (int)((i / C) % T), b = (int)(i / ((size_t)C * T));
    out[i] = __float2bfloat16(silu(conv1d_pre<K>(in, in_stride, w, bias, b, t, T, c, C)));
}

// gradient of the pre-activation, kept in fp32 scratch for the input and weight gradients
template <int K>
__global__ void conv1d_dpre_kernel(float* dpre, const bf16* dout, const bf16* in, int in_stride, const bf16* w,
                                   const bf16* bias, int B, int T, int C) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)B * T * C) return;
    const int c = (int)(i % C), t = (int)((i / C) % T), b = (int)(i / ((size_t)C * T));
    dpre[i] = __bfloat162float(dout[i]) * silu_grad(conv1d_pre<K>(in, in_stride, w, bias, b, t, T, c, C));
}

// din[b,s,c] = sum_k w[c,k] dpre[b, s+(K-1)-k, c]
template <int K>
__global__ void conv1d_din_kernel(bf16* din, int din_stride, const float* dpre, const bf16* w, int B, int T, int C) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)B * T * C) return;
    const int c = (int)(i % C), s = (int)((i / C) % T), b = (int)(i / ((size_t)C * T));
    float acc = 0.0f;
    #pragma unroll
    for (int k = 0; k < K; k++) {
        int t = s + (K - 1) - k;
        if (t < T) acc += __bfloat162float(w[c * K + k]) * dpre[((size_t)b * T + t) * C + c];
    }
    din[((size_t)b * T + s) * din_stride + c] = __float2bfloat16(acc);
}

template <int K>
inline void conv1d_silu_forward_k(bf16* out, const bf16* in, int in_stride, const bf16* w, const bf16* bias, int B,
                                  int T, int C, cudaStream_t s) {
    const size_t n = (size_t)B * T * C;
    conv1d_silu_forward_kernel<K><<<ceil_div(n, 256), 256, 0, s>>>(out, in, in_stride, w, bias, B, T, C);
    cudaCheckLast();
}

template <int K>
inline void conv1d_silu_backward_k(bf16* din, int din_stride, float* dweight, float* dbias, float* scratch,
                                   const bf16* dout, const bf16* in, int in_stride, const bf16* w, const bf16* bias,
                                   int B, int T, int C, cudaStream_t s) {
    const size_t n = (size_t)B * T * C;
    float* dpre = scratch;
    conv1d_dpre_kernel<K><<<ceil_div(n, 256), 256, 0, s>>>(dpre, dout, in, in_stride, w, bias, B, T, C);
    cudaCheckLast();
    conv1d_din_kernel<K><<<ceil_div(n, 256), 256, 0, s>>>(din, din_stride, dpre, w, B, T, C);
    cudaCheckLast();
    // vals[k] = dpre * in[t-(K-1)+k] (weight k), vals[K] = dpre (bias)
    column_sum<K + 1>(scratch + n,
        [=] __device__(int r, int c, float* v) {
            const int t = r % T;
            const float d = dpre[(size_t)r * C + c];
            for (int k = 0; k < K; k++) {
                int ts = t - (K - 1) + k;
                v[k] = ts >= 0 ? d * __bfloat162float(in[(size_t)(r - (K - 1) + k) * in_stride + c]) : 0.0f;
            }
            v[K] = d;
        },
        [=] __device__(int c, int k, float sum) {
            if (k < K) dweight[c * K + k] += sum;
            else dbias[c] += sum;
        },
        B * T, C, s);
}

inline size_t conv1d_backward_scratch_floats(int B, int T, int C, int K) {
    return (size_t)B * T * C + colsum_scratch_floats(C, K + 1);
}

#define CONV1D_DISPATCH(K, CALL)                                                   \
    switch (K) {                                                                   \
        case 2: CALL(2); break;                                                    \
        case 3: CALL(3); break;                                                    \
        case 4: CALL(4); break;                                                    \
        default: THROW("conv1d: width %d is not supported (2, 3 or 4)", K);        \
    }

inline void conv1d_silu_forward(bf16* out, const bf16* in, int in_stride, const bf16* weight, const bf16* bias, int B,
                                int T, int C, int K, cudaStream_t s) {
#define CALL(KK) conv1d_silu_forward_k<KK>(out, in, in_stride, weight, bias, B, T, C, s)
    CONV1D_DISPATCH(K, CALL)
#undef CALL
}

inline void conv1d_silu_backward(bf16* din, int din_stride, float* dweight, float* dbias, float* scratch,
                                 const bf16* dout, const bf16* in, int in_stride, const bf16* weight, const bf16* bias,
                                 int B, int T, int C, int K, cudaStream_t s) {
#define CALL(KK) conv1d_silu_backward_k<KK>(din, din_stride, dweight, dbias, scratch, dout, in, in_stride, weight, bias, B, T, C, s)
    CONV1D_DISPATCH(K, CALL)
#undef CALL
}
#undef CONV1D_DISPATCH
