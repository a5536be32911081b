// RMSNorm (pre-norm of every block, fp32 residual in, bf16 out) and Mamba-2's gated,
// grouped RMSNorm: out = rmsnorm_group(y * silu(z)) * w (mamba_ssm's RMSNormGated with
// norm_before_gate=False). One warp per row; weight gradients through deterministic
// column sums (cuda_common.cuh).
#pragma once
#include <algorithm>
#include "cuda_common.cuh"

constexpr int NORM_WARPS = 8;  // rows per block

// ----------------------------------------------------------------------------
// RMSNorm. Rows are read twice (the sum of squares, then the output); the second read
// comes from the cache. VEC values per access, 4 for the fp32 rows.

template <int VEC>
__global__ void rmsnorm_forward_kernel(bf16* __restrict__ out, float* __restrict__ rstd, const float* __restrict__ x,
                                       const bf16* __restrict__ w, int rows, int C, float eps) {
    const int row = blockIdx.x * NORM_WARPS + threadIdx.y, lane = threadIdx.x;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * C;
    float ss = 0.0f;
    #pragma unroll 4
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
        float v[VEC];
        load_vec<VEC>(v, xr + c);
        #pragma unroll
        for (int e = 0; e < VEC; e++) ss += v[e] * v[e];
    }
    const float r = rsqrtf(warp_sum(ss) / C + eps);
    #pragma unroll 4
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
        float v[VEC], wv[VEC];
        load_vec<VEC>(v, xr + c);
        load_vec<VEC>(wv, w + c);
        #pragma unroll
        for (int e = 0; e < VEC; e++) v[e] = v[e] * r * wv[e];
        store_vec<VEC>(out + (size_t)row * C + c, v);
    }
    if (lane == 0) rstd[row] = r;
}

inline void rmsnorm_forward(bf16* out, float* rstd, const float* x, const bf16* weight, int rows, int C, float eps,
                            cudaStream_t s) {
    const int vec = std::min(vec_width(4, sizeof(bf16), {out, weight}, {C}), vec_width(4, sizeof(float), {x}, {C}));
    vec_dispatch<4>(vec, [&](auto V) {
        rmsnorm_forward_kernel<decltype(V)::value><<<ceil_div(rows, NORM_WARPS), dim3(32, NORM_WARPS), 0, s>>>(
            out, rstd, x, weight, rows, C, eps);
    });
    cudaCheckLast();
}

// dx += rstd * (g - xhat * mean(g * xhat)), g = dout * w, xhat = x * rstd; also writes bf16(dx)
template <int VEC>
__global__ void rmsnorm_backward_kernel(float* __restrict__ dx, bf16* __restrict__ dx_bf16, const bf16* __restrict__ dout,
                                        const float* __restrict__ x, const bf16* __restrict__ w,
                                        const float* __restrict__ rstd, int rows, int C) {
    const int row = blockIdx.x * NORM_WARPS + threadIdx.y, lane = threadIdx.x;
    if (row >= rows) return;
    const size_t base = (size_t)row * C;
    const float r = rstd[row];
    float dot = 0.0f;
    #pragma unroll 4
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
        float g[VEC], wv[VEC], xv[VEC];
        load_vec<VEC>(g, dout + base + c);
        load_vec<VEC>(wv, w + c);
        load_vec<VEC>(xv, x + base + c);
        #pragma unroll
        for (int e = 0; e < VEC; e++) dot += g[e] * wv[e] * xv[e] * r;
    }
    dot = warp_sum(dot) / C;
    #pragma unroll 4
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
        float g[VEC], wv[VEC], xv[VEC], d[VEC];
        load_vec<VEC>(g, dout + base + c);
        load_vec<VEC>(wv, w + c);
        load_vec<VEC>(xv, x + base + c);
        load_vec<VEC>(d, dx + base + c);
        #pragma unroll
        for (int e = 0; e < VEC; e++) d[e] += r * (g[e] * wv[e] - xv[e] * r * dot);
        store_vec<VEC>(dx + base + c, d);
        store_vec<VEC>(dx_bf16 + base + c, d);
    }
}

inline size_t rmsnorm_backward_scratch_floats(int rows, int C) { (void)rows; return colsum_scratch_floats(C, 1); }

template <int V>
inline void rmsnorm_backward_v(float* dx, bf16* dx_bf16, float* dweight, float* scratch, const bf16* dout, const float* x,
                               const bf16* weight, const float* rstd, int rows, int C, cudaStream_t s) {
    rmsnorm_backward_kernel<V><<<ceil_div(rows, NORM_WARPS), dim3(32, NORM_WARPS), 0, s>>>(dx, dx_bf16, dout, x, weight,
                                                                                           rstd, rows, C);
    cudaCheckLast();
    column_sum<1, V>(scratch,
        [=] __device__(int r, int c, float* v) {
            float g[V], xv[V];
            load_vec<V>(g, dout + (size_t)r * C + c);
            load_vec<V>(xv, x + (size_t)r * C + c);
            for (int e = 0; e < V; e++) v[e] = g[e] * xv[e] * rstd[r];
        },
        [=] __device__(int c, int, float sum) { dweight[c] += sum; }, rows, C, s);
}

inline void rmsnorm_backward(float* dx, bf16* dx_bf16, float* dweight, float* scratch, const bf16* dout, const float* x,
                             const bf16* weight, const float* rstd, int rows, int C, cudaStream_t s) {
    const int vec = std::min(vec_width(4, sizeof(bf16), {dx_bf16, dout, weight}, {C}),
                             vec_width(4, sizeof(float), {dx, x}, {C}));
    vec_dispatch<4>(vec, [&](auto V) {
        rmsnorm_backward_v<decltype(V)::value>(dx, dx_bf16, dweight, scratch, dout, x, weight, rstd, rows, C, s);
    });
}

// ----------------------------------------------------------------------------
// Gated grouped RMSNorm: v = y * silu(z); per group of C/groups channels
// n = v * rstd_g, rstd_g = 1/sqrt(mean_group(v^2) + eps); out = n * w.
// VEC bf16 per access (the group size is a multiple of VEC).

template <int VEC>
__global__ void gated_rmsnorm_forward_kernel(bf16* __restrict__ out, float* __restrict__ rstd, const bf16* __restrict__ y,
                                             const bf16* __restrict__ z, int z_stride, const bf16* __restrict__ w,
                                             int rows, int C, int groups, float eps) {
    const int row = blockIdx.x * NORM_WARPS + threadIdx.y, lane = threadIdx.x;
    if (row >= rows) return;
    const int gs = C / groups;
    const bf16* yr = y + (size_t)row * C;
    const bf16* zr = z + (size_t)row * z_stride;
    for (int g = 0; g < groups; g++) {
        float ss = 0.0f;
        #pragma unroll 4
        for (int c = g * gs + lane * VEC; c < (g + 1) * gs; c += 32 * VEC) {
            float yv[VEC], zv[VEC];
            load_vec<VEC>(yv, yr + c);
            load_vec<VEC>(zv, zr + c);
            #pragma unroll
            for (int e = 0; e < VEC; e++) {
                const float v = yv[e] * silu(zv[e]);
                ss += v * v;
            }
        }
        const float r = rsqrtf(warp_sum(ss) / gs + eps);
        #pragma unroll 4
        for (int c = g * gs + lane * VEC; c < (g + 1) * gs; c += 32 * VEC) {
            float yv[VEC], zv[VEC], wv[VEC];
            load_vec<VEC>(yv, yr + c);
            load_vec<VEC>(zv, zr + c);
            load_vec<VEC>(wv, w + c);
            #pragma unroll
            for (int e = 0; e < VEC; e++) yv[e] = yv[e] * silu(zv[e]) * r * wv[e];
            store_vec<VEC>(out + (size_t)row * C + c, yv);
        }
        if (lane == 0) rstd[(size_t)row * groups + g] = r;
    }
}

inline void gated_rmsnorm_forward(bf16* out, float* rstd, const bf16* y, const bf16* z, int z_stride, const bf16* weight,
                                  int rows, int C, int groups, float eps, cudaStream_t s) {
    if (C % groups != 0) THROW("gated_rmsnorm: C %d is not divisible by groups %d", C, groups);
    vec_dispatch<8>(vec_width(8, sizeof(bf16), {out, y, z, weight}, {C, z_stride, C / groups}), [&](auto V) {
        gated_rmsnorm_forward_kernel<decltype(V)::value><<<ceil_div(rows, NORM_WARPS), dim3(32, NORM_WARPS), 0, s>>>(
            out, rstd, y, z, z_stride, weight, rows, C, groups, eps);
    });
    cudaCheckLast();
}

// dv = rstd * (gw - n * mean_group(gw * n)), gw = dout * w; dy = dv * silu(z); dz = dv * y * silu'(z)
template <int VEC>
__global__ void gated_rmsnorm_backward_kernel(bf16* __restrict__ dy, bf16* __restrict__ dz, int dz_stride,
                                              const bf16* __restrict__ dout, const bf16* __restrict__ y,
                                              const bf16* __restrict__ z, int z_stride, const bf16* __restrict__ w,
                                              const float* __restrict__ rstd, int rows, int C, int groups) {
    const int row = blockIdx.x * NORM_WARPS + threadIdx.y, lane = threadIdx.x;
    if (row >= rows) return;
    const int gs = C / groups;
    const size_t base = (size_t)row * C;
    const bf16* zr = z + (size_t)row * z_stride;
    for (int g = 0; g < groups; g++) {
        const float r = rstd[(size_t)row * groups + g];
        float dot = 0.0f;
        #pragma unroll 4
        for (int c = g * gs + lane * VEC; c < (g + 1) * gs; c += 32 * VEC) {
            float yv[VEC], zv[VEC], gv[VEC], wv[VEC];
            load_vec<VEC>(yv, y + base + c);
            load_vec<VEC>(zv, zr + c);
            load_vec<VEC>(gv, dout + base + c);
            load_vec<VEC>(wv, w + c);
            #pragma unroll
            for (int e = 0; e < VEC; e++) dot += gv[e] * wv[e] * yv[e] * silu(zv[e]) * r;
        }
        dot = warp_sum(dot) / gs;
        #pragma unroll 4
        for (int c = g * gs + lane * VEC; c < (g + 1) * gs; c += 32 * VEC) {
            float yv[VEC], zv[VEC], gv[VEC], wv[VEC], dyv[VEC], dzv[VEC];
            load_vec<VEC>(yv, y + base + c);
            load_vec<VEC>(zv, zr + c);
            load_vec<VEC>(gv, dout + base + c);
            load_vec<VEC>(wv, w + c);
            #pragma unroll
            for (int e = 0; e < VEC; e++) {
                const float sz = silu(zv[e]), v = yv[e] * sz;
                const float dv = r * (gv[e] * wv[e] - v * r * dot);
                dyv[e] = dv * sz;
                dzv[e] = dv * yv[e] * silu_grad(zv[e]);
            }
            store_vec<VEC>(dy + base + c, dyv);
            store_vec<VEC>(dz + (size_t)row * dz_stride + c, dzv);
        }
    }
}

inline size_t gated_rmsnorm_backward_scratch_floats(int rows, int C) { (void)rows; return colsum_scratch_floats(C, 1); }

template <int V>
inline void gated_rmsnorm_backward_v(bf16* dy, bf16* dz, int dz_stride, float* dweight, float* scratch, const bf16* dout,
                                     const bf16* y, const bf16* z, int z_stride, const bf16* weight, const float* rstd,
                                     int rows, int C, int groups, cudaStream_t s) {
    gated_rmsnorm_backward_kernel<V><<<ceil_div(rows, NORM_WARPS), dim3(32, NORM_WARPS), 0, s>>>(
        dy, dz, dz_stride, dout, y, z, z_stride, weight, rstd, rows, C, groups);
    cudaCheckLast();
    const int gs = C / groups;
    column_sum<1, V>(scratch,
        [=] __device__(int r, int c, float* v) {
            float yv[V], zv[V], gv[V];
            load_vec<V>(yv, y + (size_t)r * C + c);
            load_vec<V>(zv, z + (size_t)r * z_stride + c);
            load_vec<V>(gv, dout + (size_t)r * C + c);
            const float rs = rstd[(size_t)r * groups + c / gs];  // the V channels share a group
            for (int e = 0; e < V; e++) v[e] = gv[e] * yv[e] * silu(zv[e]) * rs;
        },
        [=] __device__(int c, int, float sum) { dweight[c] += sum; }, rows, C, s);
}

inline void gated_rmsnorm_backward(bf16* dy, bf16* dz, int dz_stride, float* dweight, float* scratch, const bf16* dout,
                                   const bf16* y, const bf16* z, int z_stride, const bf16* weight, const float* rstd,
                                   int rows, int C, int groups, cudaStream_t s) {
    const int vec = vec_width(8, sizeof(bf16), {dy, dz, dout, y, z, weight}, {C, z_stride, C / groups, dz_stride});
    vec_dispatch<8>(vec, [&](auto V) {
        gated_rmsnorm_backward_v<decltype(V)::value>(dy, dz, dz_stride, dweight, scratch, dout, y, z, z_stride, weight,
                                                     rstd, rows, C, groups, s);
    });
}
