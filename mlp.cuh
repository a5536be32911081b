// MLP activations, forward and backward. The MLP block is
//   a = xn @ up_proj^T;  act = f(a);  out = act @ down_proj^T
// with f one of (SPEC.md, MLP):
//   swiglu: a = [gate | up] (2 ff columns), act = silu(gate) * up
//   gelu:   act = gelu(a) (exact, erf form, as torch.nn.functional.gelu)
//   relu2:  act = relu(a)^2
// The matmuls are cuBLAS (matmul.cuh); these kernels are the elementwise middle.
#pragma once
#include <string>
#include "cuda_common.cuh"
#include "norm.cuh"  // silu, silu_grad

enum class MlpAct { SwiGLU, GELU, ReLU2 };

inline MlpAct mlp_act_from_name(const std::string& name) {
    if (name == "swiglu") return MlpAct::SwiGLU;
    if (name == "gelu") return MlpAct::GELU;
    if (name == "relu2") return MlpAct::ReLU2;
    THROW("unknown MLP activation '%s' (swiglu, gelu, relu2)", name.c_str());
}

// columns of the up projection's output per hidden unit
inline int mlp_up_width(MlpAct kind) { return kind == MlpAct::SwiGLU ? 2 : 1; }

// f(a) for one hidden unit; g is the gate (swiglu) or the pre-activation, u the up value
__device__ inline float mlp_act(MlpAct kind, float g, float u) {
    switch (kind) {
        case MlpAct::SwiGLU: return silu(g) * u;
        case MlpAct::GELU: return 0.5f * g * (1.0f + erff(g * 0.70710678f));
        default: { float r = fmaxf(g, 0.0f); return r * r; }
    }
}

static __global__ void mlp_act_forward_kernel(bf16* act, const bf16* a, size_t rows, int ff, MlpAct kind) {
    const int w = kind == MlpAct::SwiGLU ? 2 * ff : ff;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < rows * ff; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / ff, j = i % ff;
        const bf16* row = a + r * w;
        float g = __bfloat162float(row[j]);
        float u = kind == MlpAct::SwiGLU ? __bfloat162float(row[ff + j]) : 1.0f;
        act[i] = __float2bfloat16(mlp_act(kind, g, u));
    }
}

// da (same layout as a) = dact * f'(a), written
static __global__ void mlp_act_backward_kernel(bf16* da, const bf16* dact, const bf16* a, size_t rows, int ff,
                                               MlpAct kind) {
    const int w = kind == MlpAct::SwiGLU ? 2 * ff : ff;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < rows * ff; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / ff, j = i % ff;
        const float g = __bfloat162float(a[r * w + j]), d = __bfloat162float(dact[i]);
        switch (kind) {
            case MlpAct::SwiGLU: {
                const float u = __bfloat162float(a[r * w + ff + j]);
                da[r * w + j] = __float2bfloat16(d * u * silu_grad(g));
                da[r * w + ff + j] = __float2bfloat16(d * silu(g));
                break;
            }
            case MlpAct::GELU: {
                const float cdf = 0.5f * (1.0f + erff(g * 0.70710678f));
                const float pdf = 0.39894228f * __expf(-0.5f * g * g);
                da[i] = __float2bfloat16(d * (cdf + g * pdf));
                break;
            }
            default: da[i] = __float2bfloat16(d * 2.0f * fmaxf(g, 0.0f)); break;
        }
    }
}

static inline int elementwise_blocks(size_t n) { return (int)std::min<size_t>((n + 255) / 256, 132 * 16); }

// act (rows, ff) from a (rows, ff * mlp_up_width(kind))
inline void mlp_act_forward(bf16* act, const bf16* a, int rows, int ff, MlpAct kind, cudaStream_t s) {
    mlp_act_forward_kernel<<<elementwise_blocks((size_t)rows * ff), 256, 0, s>>>(act, a, rows, ff, kind);
    cudaCheckLast();
}

inline void mlp_act_backward(bf16* da, const bf16* dact, const bf16* a, int rows, int ff, MlpAct kind, cudaStream_t s) {
    mlp_act_backward_kernel<<<elementwise_blocks((size_t)rows * ff), 256, 0, s>>>(da, dact, a, rows, ff, kind);
    cudaCheckLast();
}
