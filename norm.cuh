// RMSNorm (pre-norm of every block, fp32 residual in, bf16 out) and Mamba-2's gated,
// grouped RMSNorm: out = rmsnorm_group(y * silu(z)) * w (mamba_ssm's RMSNormGated with
// norm_before_gate=False). One warp per row; weight gradients through deterministic
// column sums (cuda_common.cuh).
#pragma once
#include "cuda_common.cuh"

__device__ inline float silu(float x) { return x / (1.0f + __expf(-x)); }
__device__ inline float silu_grad(float x) {  // d silu / dx
    float s = 1.0f / (1.0f + __expf(-x));
    return s * (1.0f + x * (1.0f - s));
}

constexpr int NORM_WARPS = 8;  // rows per block

// ----------------------------------------------------------------------------
// RMSNorm

static __global__ void rmsnorm_forward_kernel(bf16* out, float* rstd, const float* x, const bf16* w, int rows, int C,
                                       float eps) {
    const int row = blockIdx.x * NORM_WARPS + threadIdx.y, lane = threadIdx.x;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * C;
    float ss = 0.0f;
    for (int c = lane; c < C; c += 32) ss += xr[c] * xr[c];
    const float r = rsqrtf(warp_sum(ss) / C + eps);
    for (int c = lane; c < C; c += 32) out[(size_t)row * C + c] = __float2bfloat16(xr[c] * r * __bfloat162float(w[c]));
    if (lane == 0) rstd[row] = r;
}

inline void rmsnorm_forward(bf16* out, float* rstd, const float* x, const bf16* weight, int rows, int C, float eps,
                            cudaStream_t s) {
    rmsnorm_forward_kernel<<<ceil_div(rows, NORM_WARPS), dim3(32, NORM_WARPS), 0, s>>>(out, rstd, x, weight, rows, C, eps);
    cudaCheckLast();
}

// dx += rstd * (g - xhat * mean(g * xhat)), g = dout * w, xhat = x * rstd; also writes bf16(dx)
static __global__ void rmsnorm_backward_kernel(float* dx, bf16* dx_bf16, const bf16* dout, const float* x, const bf16* w,
                                        const float* rstd, int rows, int C) {
    const int row = blockIdx.x * NORM_WARPS + threadIdx.y, lane = threadIdx.x;
    if (row >= rows) return;
    const size_t base = (size_t)row * C;
    const float r = rstd[row];
    float dot = 0.0f;
    for (int c = lane; c < C; c += 32) dot += __bfloat162float(dout[base + c]) * __bfloat162float(w[c]) * x[base + c] * r;
    dot = warp_sum(dot) / C;
    for (int c = lane; c < C; c += 32) {
        float g = __bfloat162float(dout[base + c]) * __bfloat162float(w[c]);
        float v = dx[base + c] + r * (g - x[base + c] * r * dot);
        dx[base + c] = v;
        dx_bf16[base + c] = __float2bfloat16(v);
    }
}

inline size_t rmsnorm_backward_scratch_floats(int rows, int C) { (void)rows; return colsum_scratch_floats(C, 1); }

inline void rmsnorm_backward(float* dx, bf16* dx_bf16, float* dweight, float* scratch, const bf16* dout, const float* x,
                             const bf16* weight, const float* rstd, int rows, int C, cudaStream_t s) {
    rmsnorm_backward_kernel<<<ceil_div(rows, NORM_WARPS), dim3(32, NORM_WARPS), 0, s>>>(dx, dx_bf16, dout, x, weight,
                                                                                        rstd, rows, C);
    cudaCheckLast();
    column_sum<1>(scratch,
        [=] __device__(int r, int c, float* v) { v[0] = __bfloat162float(dout[(size_t)r * C + c]) * x[(size_t)r * C + c] * rstd[r]; },
        [=] __device__(int c, int, float sum) { dweight[c] += sum; }, rows, C, s);
}

// ----------------------------------------------------------------------------
// Gated grouped RMSNorm: v = y * silu(z); per group of C/groups channels
// n = v * rstd_g, rstd_g = 1/sqrt(mean_group(v^2) + eps); out = n * w

static __global__ void gated_rmsnorm_forward_kernel(bf16* out, float* rstd, const bf16* y, const bf16* z, int z_stride,
                                             const bf16* w, int rows, int C, int groups, float eps) {
    const int row = blockIdx.x * NORM_WARPS + threadIdx.y, lane = threadIdx.x;
    if (row >= rows) return;
    const int gs = C / groups;
    const bf16* yr = y + (size_t)row * C;
    const bf16* zr = z + (size_t)row * z_stride;
    for (int g = 0; g < groups; g++) {
        float ss = 0.0f;
        for (int c = g * gs + lane; c < (g + 1) * gs; c += 32) {
            float v = __bfloat162float(yr[c]) * silu(__bfloat162float(zr[c]));
            ss += v * v;
        }
        const float r = rsqrtf(warp_sum(ss) / gs + eps);
        for (int c = g * gs + lane; c < (g + 1) * gs; c += 32) {
            float v = __bfloat162float(yr[c]) * silu(__bfloat162float(zr[c]));
            out[(size_t)row * C + c] = __float2bfloat16(v * r * __bfloat162float(w[c]));
        }
        if (lane == 0) rstd[(size_t)row * groups + g] = r;
    }
}

inline void gated_rmsnorm_forward(bf16* out, float* rstd, const bf16* y, const bf16* z, int z_stride, const bf16* weight,
                                  int rows, int C, int groups, float eps, cudaStream_t s) {
    if (C % groups != 0) THROW("gated_rmsnorm: C %d is not divisible by groups %d", C, groups);
    gated_rmsnorm_forward_kernel<<<ceil_div(rows, NORM_WARPS), dim3(32, NORM_WARPS), 0, s>>>(out, rstd, y, z, z_stride,
                                                                                             weight, rows, C, groups, eps);
    cudaCheckLast();
}

// dv = rstd * (gw - n * mean_group(gw * n)), gw = dout * w; dy = dv * silu(z); dz = dv * y * silu'(z)
static __global__ void gated_rmsnorm_backward_kernel(bf16* dy, bf16* dz, int dz_stride, const bf16* dout, const bf16* y,
                                              const bf16* z, int z_stride, const bf16* w, const float* rstd, int rows,
                                              int C, int groups) {
    const int row = blockIdx.x * NORM_WARPS + threadIdx.y, lane = threadIdx.x;
    if (row >= rows) return;
    const int gs = C / groups;
    const size_t base = (size_t)row * C;
    const bf16* zr = z + (size_t)row * z_stride;
    for (int g = 0; g < groups; g++) {
        const float r = rstd[(size_t)row * groups + g];
        float dot = 0.0f;
        for (int c = g * gs + lane; c < (g + 1) * gs; c += 32) {
            float v = __bfloat162float(y[base + c]) * silu(__bfloat162float(zr[c]));
            dot += __bfloat162float(dout[base + c]) * __bfloat162float(w[c]) * v * r;
        }
        dot = warp_sum(dot) / gs;
        for (int c = g * gs + lane; c < (g + 1) * gs; c += 32) {
            float yv = __bfloat162float(y[base + c]), zv = __bfloat162float(zr[c]);
            float v = yv * silu(zv);
            float dv = r * (__bfloat162float(dout[base + c]) * __bfloat162float(w[c]) - v * r * dot);
            dy[base + c] = __float2bfloat16(dv * silu(zv));
            dz[(size_t)row * dz_stride + c] = __float2bfloat16(dv * yv * silu_grad(zv));
        }
    }
}

inline size_t gated_rmsnorm_backward_scratch_floats(int rows, int C) { (void)rows; return colsum_scratch_floats(C, 1); }

inline void gated_rmsnorm_backward(bf16* dy, bf16* dz, int dz_stride, float* dweight, float* scratch, const bf16* dout,
                                   const bf16* y, const bf16* z, int z_stride, const bf16* weight, const float* rstd,
                                   int rows, int C, int groups, cudaStream_t s) {
    gated_rmsnorm_backward_kernel<<<ceil_div(rows, NORM_WARPS), dim3(32, NORM_WARPS), 0, s>>>(
        dy, dz, dz_stride, dout, y, z, z_stride, weight, rstd, rows, C, groups);
    cudaCheckLast();
    const int gs = C / groups;
    column_sum<1>(scratch,
        [=] __device__(int r, int c, float* v) {
            float n = __bfloat162float(y[(size_t)r * C + c]) * silu(__bfloat162float(z[(size_t)r * z_stride + c])) *
                      rstd[(size_t)r * groups + c / gs];
            v[0] = __bfloat162float(dout[(size_t)r * C + c]) * n;
        },
        [=] __device__(int c, int, float sum) { dweight[c] += sum; }, rows, C, s);
}
