// MLP activations, forward and backward. The MLP block is
//   a = xn @ up_proj^T;  act = f(a);  out = act @ down_proj^T
// with f one of (SPEC.md, MLP):
//   swiglu: a = [gate | up] (2 ff columns), act = silu(gate) * up
//   gelu:   act = gelu(a) (exact, erf form, as torch.nn.functional.gelu)
//   relu2:  act = relu(a)^2
// The matmuls are cuBLAS (matmul.cuh); these kernels are the elementwise middle.
#pragma once
#include <string>
#include "cuda_common.cuh"  // silu, silu_grad
#include "model_config.h"  // MlpAct

// 2 Phi(g), the GELU's doubled normal CDF: the forward and the backward share it (one erff each)
__device__ inline float gelu_cdf2(float g) { return 1.0f + erff(g * 0.70710678f); }

// f(a) for one hidden unit; g is the gate (swiglu) or the pre-activation, u the up value
__device__ inline float mlp_act(MlpAct kind, float g, float u) {
    switch (kind) {
        case MlpAct::SwiGLU: return silu(g) * u;
        case MlpAct::GELU: return 0.5f * g * gelu_cdf2(g);
        default: { float r = fmaxf(g, 0.0f); return r * r; }
    }
}

// VEC consecutive hidden units per thread (ff is a multiple of VEC)
template <int VEC>
__global__ void mlp_act_forward_kernel(bf16* __restrict__ act, const bf16* __restrict__ a, size_t rows, int ff,
                                       MlpAct kind) {
    const int w = kind == MlpAct::SwiGLU ? 2 * ff : ff;
    for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < rows * ff;
         i += (size_t)gridDim.x * blockDim.x * VEC) {
        const size_t r = i / ff, j = i % ff;
        const bf16* row = a + r * w;
        float g[VEC], u[VEC], o[VEC];
        load_vec<VEC>(g, row + j);
        if (kind == MlpAct::SwiGLU) load_vec<VEC>(u, row + ff + j);
        #pragma unroll
        for (int e = 0; e < VEC; e++) o[e] = mlp_act(kind, g[e], kind == MlpAct::SwiGLU ? u[e] : 1.0f);
        store_vec<VEC>(act + i, o);
    }
}

// da (same layout as a) = dact * f'(a), written; also act = f(a) again (the forward's bits: the down
// projection's weight gradient reads it, and no recompute pass need write it before)
template <int VEC>
__global__ void mlp_act_backward_kernel(bf16* __restrict__ da, bf16* __restrict__ act, const bf16* __restrict__ dact,
                                        const bf16* __restrict__ a, size_t rows, int ff, MlpAct kind) {
    const int w = kind == MlpAct::SwiGLU ? 2 * ff : ff;
    for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < rows * ff;
         i += (size_t)gridDim.x * blockDim.x * VEC) {
        const size_t r = i / ff, j = i % ff;
        float g[VEC], u[VEC], d[VEC], dg[VEC], o[VEC];
        load_vec<VEC>(g, a + r * w + j);
        load_vec<VEC>(d, dact + i);
        if (kind == MlpAct::SwiGLU) load_vec<VEC>(u, a + r * w + ff + j);
        if (kind == MlpAct::SwiGLU) {
            float du[VEC];
            #pragma unroll
            for (int e = 0; e < VEC; e++) {
                o[e] = mlp_act(kind, g[e], u[e]);
                dg[e] = d[e] * u[e] * silu_grad(g[e]);
                du[e] = d[e] * silu(g[e]);
            }
            store_vec<VEC>(da + r * w + ff + j, du);
        } else if (kind == MlpAct::GELU) {
            #pragma unroll
            for (int e = 0; e < VEC; e++) {
                const float cdf2 = gelu_cdf2(g[e]), cdf = 0.5f * cdf2;
                const float pdf = 0.39894228f * __expf(-0.5f * g[e] * g[e]);
                o[e] = 0.5f * g[e] * cdf2;  // mlp_act's expression: the forward's bits
                dg[e] = d[e] * (cdf + g[e] * pdf);
            }
        } else {
            #pragma unroll
            for (int e = 0; e < VEC; e++) {
                o[e] = mlp_act(kind, g[e], 1.0f);
                dg[e] = d[e] * 2.0f * fmaxf(g[e], 0.0f);
            }
        }
        store_vec<VEC>(act + i, o);
        store_vec<VEC>(da + r * w + j, dg);
    }
}

// act (rows, ff) from a (rows, ff * mlp_up_width(kind))
inline void mlp_act_forward(bf16* act, const bf16* a, int rows, int ff, MlpAct kind, cudaStream_t s) {
    vec_dispatch<8>(vec_width(8, sizeof(bf16), {act, a}, {ff}), [&](auto V) {
        constexpr int v = decltype(V)::value;
        mlp_act_forward_kernel<v><<<elementwise_blocks((size_t)rows * ff / v), 256, 0, s>>>(act, a, rows, ff, kind);
    });
    cudaCheckLast();
}

inline void mlp_act_backward(bf16* da, bf16* act, const bf16* dact, const bf16* a, int rows, int ff, MlpAct kind,
                             cudaStream_t s) {
    vec_dispatch<8>(vec_width(8, sizeof(bf16), {da, act, dact, a}, {ff}), [&](auto V) {
        constexpr int v = decltype(V)::value;
        mlp_act_backward_kernel<v><<<elementwise_blocks((size_t)rows * ff / v), 256, 0, s>>>(da, act, dact, a, rows,
                                                                                           ff, kind);
    });
    cudaCheckLast();
}
