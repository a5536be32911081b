// RMSNorm (pre-norm of every block, fp32 residual in, bf16 out) and Mamba-2's gated,
// grouped RMSNorm: out = rmsnorm_group(y * silu(z)) * w (mamba_ssm's RMSNormGated with
// norm_before_gate=False). One warp per row. The weight gradients are summed in a fixed
// order: inside the backward pass when the row's channels split evenly over the lanes and the
// sums fit (NormRows below), else by a column-sum pass after it (cuda_common.cuh), which reads
// the pass's inputs once more.
#pragma once
#include <algorithm>
#include "cuda_common.cuh"

constexpr int NORM_WARPS = 8;  // rows per block

// The weight gradient inside the backward pass ("fused"): every lane owns the same channels of
// every row, sums its rows' terms for them, and the block's warps add their sums in a fixed order
// into one partial row per block of rows; colsum_finalize adds the NORM_FUSED_CHUNKS partials in
// order. ITER > 0: C = ITER x 32 x VEC, the loops unrolled to it, the sums in registers (the gated
// norm, short of registers, in its warp's row of shared memory). ITER = NORM_ANY_WIDTH: any C that
// is a multiple of 32 x VEC, looped over at run time, each warp's sums in its own row of shared
// memory (NORM_WARPS x C floats; 128 and 160 KB at 4096 and 5120 channels leave one block an SM).
// ITER = 0: the plain pass, one warp a row, the weight gradient left to a column sum.
constexpr int NORM_FUSED_MAX_ACC = 64;  // floats a lane holds
constexpr int NORM_ANY_WIDTH = -1;

inline size_t norm_warp_sums_bytes(int C) { return (size_t)NORM_WARPS * C * sizeof(float); }

// the ITER the backward runs at for C channels of VEC (see above)
inline int norm_fused_iter(int C, int vec) {
    if (C % (32 * vec) != 0) return 0;
    const int it = C / (32 * vec);
    if ((it == 1 || it == 2 || it == 4 || it == 8 || it == 16) && it * vec <= NORM_FUSED_MAX_ACC) return it;
    return norm_warp_sums_bytes(C) <= max_smem_optin() ? NORM_ANY_WIDTH : 0;
}

template <int ITER, int VEC>
struct NormRows {
    int r0, r1;  // the rows of this block, each warp taking every NORM_WARPS-th
    __device__ NormRows(int rows) {
        if (ITER != 0) {
            const int per = (rows + NORM_FUSED_CHUNKS - 1) / NORM_FUSED_CHUNKS;
            r0 = min(rows, (int)blockIdx.x * per);
            r1 = min(rows, r0 + per);
        } else {
            r0 = blockIdx.x * NORM_WARPS;
            r1 = min(rows, r0 + NORM_WARPS);
        }
    }
    static int blocks(int rows) { return ITER != 0 ? NORM_FUSED_CHUNKS : (int)ceil_div(rows, NORM_WARPS); }
};

// the block's warps add their lanes' channel sums in warp order; one partial row per block
template <int ITER, int VEC>
__device__ void norm_store_partial(float* partial, const float (&acc)[ITER * VEC], int C) {
    __shared__ float sum[NORM_FUSED_MAX_ACC * 32];
    const int lane = threadIdx.x;
    for (int w = 0; w < NORM_WARPS; w++) {
        if (threadIdx.y == w)
            #pragma unroll
            for (int k = 0; k < ITER; k++)
                #pragma unroll
                for (int e = 0; e < VEC; e++) {
                    const int c = (lane + k * 32) * VEC + e;
                    sum[c] = w == 0 ? acc[k * VEC + e] : sum[c] + acc[k * VEC + e];
                }
        __syncthreads();
    }
    for (int c = threadIdx.y * 32 + lane; c < C; c += 32 * NORM_WARPS) partial[(size_t)blockIdx.x * C + c] = sum[c];
}

// The sums in shared memory (norm_warp_sums_bytes of it, dynamic): the warp's own row, zeroed
__device__ inline float* norm_warp_sums(int C) {
    extern __shared__ __align__(32) float norm_sums[];  // (NORM_WARPS, C)
    float* acc = norm_sums + (size_t)threadIdx.y * C;
    for (int c = threadIdx.x; c < C; c += 32) acc[c] = 0.0f;
    __syncwarp();  // the lanes zeroed each other's sums
    return acc;
}

// acc[c .. c + VEC) += t
template <int VEC>
__device__ inline void norm_warp_sums_add(float* acc, int c, const float* t) {
    float a[VEC];
    load_vec<VEC>(a, acc + c);
    #pragma unroll
    for (int e = 0; e < VEC; e++) a[e] += t[e];
    store_vec<VEC>(acc + c, a);
}

// the warps' rows added in warp order; one partial row per block
__device__ inline void norm_warp_sums_store(float* partial, int C) {
    extern __shared__ __align__(32) float norm_sums[];
    __syncthreads();
    for (int c = threadIdx.y * 32 + threadIdx.x; c < C; c += 32 * NORM_WARPS) {
        float sum = norm_sums[c];
        for (int w = 1; w < NORM_WARPS; w++) sum += norm_sums[(size_t)w * C + c];
        partial[(size_t)blockIdx.x * C + c] = sum;
    }
}

// ----------------------------------------------------------------------------
// RMSNorm of the fp32 residual stream. The forward keeps xhat = x * rstd in bf16 (half the
// bytes of x) and the backward works from it alone: out = bf16(xhat * w) is the same value
// whether the forward writes it or rmsnorm_apply rebuilds it in the backward, and dx needs
// only xhat and rstd. Rows are read twice (the sum of squares, then the output); the second
// read comes from the cache. VEC values per access, 4 for the fp32 rows.

template <int VEC>
__global__ void rmsnorm_forward_kernel(bf16* __restrict__ out, bf16* __restrict__ xhat, float* __restrict__ rstd,
                                       const float* __restrict__ x, const bf16* __restrict__ w, int rows, int C,
                                       float eps) {
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
        for (int e = 0; e < VEC; e++) v[e] = __bfloat162float(__float2bfloat16(v[e] * r));  // xhat as kept
        store_vec<VEC>(xhat + (size_t)row * C + c, v);
        #pragma unroll
        for (int e = 0; e < VEC; e++) v[e] *= wv[e];
        store_vec<VEC>(out + (size_t)row * C + c, v);
    }
    if (lane == 0) rstd[row] = r;
}

inline void rmsnorm_forward(bf16* out, bf16* xhat, float* rstd, const float* x, const bf16* weight, int rows, int C,
                            float eps, cudaStream_t s) {
    const int vec = std::min(vec_width(4, sizeof(bf16), {out, xhat, weight}, {C}), vec_width(4, sizeof(float), {x}, {C}));
    vec_dispatch<4>(vec, [&](auto V) {
        rmsnorm_forward_kernel<decltype(V)::value><<<ceil_div(rows, NORM_WARPS), dim3(32, NORM_WARPS), 0, s>>>(
            out, xhat, rstd, x, weight, rows, C, eps);
    });
    cudaCheckLast();
}

// out = bf16(xhat * w): the forward's output again, from what it kept
template <int VEC>
__global__ void rmsnorm_apply_kernel(bf16* __restrict__ out, const bf16* __restrict__ xhat, const bf16* __restrict__ w,
                                     size_t n, int C) {
    for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < n; i += (size_t)gridDim.x * blockDim.x * VEC) {
        float v[VEC], wv[VEC];
        load_vec<VEC>(v, xhat + i);
        load_vec<VEC>(wv, w + i % C);
        #pragma unroll
        for (int e = 0; e < VEC; e++) v[e] *= wv[e];
        store_vec<VEC>(out + i, v);
    }
}

inline void rmsnorm_apply(bf16* out, const bf16* xhat, const bf16* weight, int rows, int C, cudaStream_t s) {
    const size_t n = (size_t)rows * C;
    vec_dispatch<8>(vec_width(8, sizeof(bf16), {out, xhat, weight}, {C}), [&](auto V) {
        constexpr int v = decltype(V)::value;
        rmsnorm_apply_kernel<v><<<elementwise_blocks(n / v), 256, 0, s>>>(out, xhat, weight, n, C);
    });
    cudaCheckLast();
}

// dx += rstd * (g - xhat * mean(g * xhat)), g = dout * w (xhat as the forward kept it); also
// writes bf16(dx); fused (ITER != 0) also the partial sums of dweight = sum over rows of dout * xhat
template <int VEC, int ITER>
__global__ void __launch_bounds__(32 * NORM_WARPS, 2)
rmsnorm_backward_kernel(float* __restrict__ dx, bf16* __restrict__ dx_bf16, float* __restrict__ partial,
                        const bf16* __restrict__ dout, const bf16* __restrict__ xhat, const bf16* __restrict__ w,
                        const float* __restrict__ rstd, int rows, int C) {
    const int lane = threadIdx.x;
    const int kmax = ITER > 0 ? ITER : (C + 32 * VEC - 1) / (32 * VEC);
    float acc[ITER > 0 ? ITER * VEC : 1] = {};
    float* sacc = ITER < 0 ? norm_warp_sums(C) : nullptr;
    const NormRows<ITER, VEC> rr(rows);
    for (int row = rr.r0 + threadIdx.y; row < rr.r1; row += NORM_WARPS) {
        const size_t base = (size_t)row * C;
        const float r = rstd[row];
        float dot = 0.0f;
        #pragma unroll 4
        for (int k = 0; k < kmax; k++) {
            const int c = (lane + k * 32) * VEC;
            if (ITER == 0 && c >= C) break;
            float g[VEC], wv[VEC], xv[VEC];
            load_vec<VEC>(g, dout + base + c);
            load_vec<VEC>(wv, w + c);
            load_vec<VEC>(xv, xhat + base + c);
            #pragma unroll
            for (int e = 0; e < VEC; e++) dot += g[e] * wv[e] * xv[e];
        }
        dot = warp_sum(dot) / C;
        #pragma unroll (ITER > 0 ? ITER : 4)
        for (int k = 0; k < kmax; k++) {
            const int c = (lane + k * 32) * VEC;
            if (ITER == 0 && c >= C) break;
            float g[VEC], wv[VEC], xv[VEC], d[VEC], t[VEC];
            load_vec<VEC>(g, dout + base + c);
            load_vec<VEC>(wv, w + c);
            load_vec<VEC>(xv, xhat + base + c);
            load_vec<VEC>(d, dx + base + c);
            #pragma unroll
            for (int e = 0; e < VEC; e++) {
                d[e] += r * (g[e] * wv[e] - xv[e] * dot);
                t[e] = g[e] * xv[e];
                if constexpr (ITER > 0) acc[k * VEC + e] += t[e];
            }
            if constexpr (ITER < 0) norm_warp_sums_add<VEC>(sacc, c, t);
            store_vec<VEC>(dx + base + c, d);
            store_vec<VEC>(dx_bf16 + base + c, d);
        }
    }
    if constexpr (ITER > 0) norm_store_partial<ITER, VEC>(partial, acc, C);
    if constexpr (ITER < 0) norm_warp_sums_store(partial, C);
}

template <int V, int ITER>
inline void rmsnorm_backward_v(float* dx, bf16* dx_bf16, float* dweight, float* scratch, const bf16* dout,
                               const bf16* xhat, const bf16* weight, const float* rstd, int rows, int C, cudaStream_t s) {
    const size_t smem = ITER < 0 ? norm_warp_sums_bytes(C) : 0;
    if (smem) set_max_smem(rmsnorm_backward_kernel<V, ITER>, smem);
    rmsnorm_backward_kernel<V, ITER><<<NormRows<ITER, V>::blocks(rows), dim3(32, NORM_WARPS), smem, s>>>(
        dx, dx_bf16, scratch, dout, xhat, weight, rstd, rows, C);
    cudaCheckLast();
    auto store = [=] __device__(int c, int, float sum) { dweight[c] += sum; };
    if constexpr (ITER != 0) {
        colsum_finalize<1>(scratch, store, C, s, NORM_FUSED_CHUNKS);
    } else {
        column_sum<1, V>(scratch,
            [=] __device__(int r, int c, float* v) {
                float g[V], xv[V];
                load_vec<V>(g, dout + (size_t)r * C + c);
                load_vec<V>(xv, xhat + (size_t)r * C + c);
                for (int e = 0; e < V; e++) v[e] = g[e] * xv[e];
            }, store, rows, C, s);
    }
}

// the fused pass for the ITER the width allows (norm_fused_iter), else the plain pass and a column sum
template <int V, typename F>
inline void norm_iter_dispatch(int iter, F&& launch) {
    switch (iter) {
        case NORM_ANY_WIDTH: return launch(std::integral_constant<int, NORM_ANY_WIDTH>());
        case 1: return launch(std::integral_constant<int, 1>());
        case 2: if constexpr (2 * V <= NORM_FUSED_MAX_ACC) return launch(std::integral_constant<int, 2>()); break;
        case 4: if constexpr (4 * V <= NORM_FUSED_MAX_ACC) return launch(std::integral_constant<int, 4>()); break;
        case 8: if constexpr (8 * V <= NORM_FUSED_MAX_ACC) return launch(std::integral_constant<int, 8>()); break;
        case 16: if constexpr (16 * V <= NORM_FUSED_MAX_ACC) return launch(std::integral_constant<int, 16>()); break;
    }
    launch(std::integral_constant<int, 0>());
}

// dx (fp32, the residual gradient) accumulates and is also written as bf16 to dx_bf16 (the next
// matmul backward reads it); dweight accumulates
inline void rmsnorm_backward(float* dx, bf16* dx_bf16, float* dweight, float* scratch, const bf16* dout,
                             const bf16* xhat, const bf16* weight, const float* rstd, int rows, int C, cudaStream_t s) {
    const int vec = std::min(vec_width(4, sizeof(bf16), {dx_bf16, dout, xhat, weight}, {C}),
                             vec_width(4, sizeof(float), {dx}, {C}));
    vec_dispatch<4>(vec, [&](auto V) {
        constexpr int v = decltype(V)::value;
        norm_iter_dispatch<v>(norm_fused_iter(C, v), [&](auto I) {
            rmsnorm_backward_v<v, decltype(I)::value>(dx, dx_bf16, dweight, scratch, dout, xhat, weight, rstd, rows, C, s);
        });
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

// dv = rstd * (gw - n * mean_group(gw * n)), gw = dout * w; dy = dv * silu(z); dz = dv * y * silu'(z);
// also out = n * w again (the forward's bits: out_proj's weight gradient reads it, and no recompute pass need
// write it before); fused (ITER != 0, one group) also the partial sums of dweight = sum over rows of dout * n,
// each warp's in its own row of shared memory at every ITER (registers would hold ITER x VEC of them a lane
// and spill), added in warp order into one partial row per block
template <int VEC, int ITER>
__global__ void __launch_bounds__(32 * NORM_WARPS, 2)
gated_rmsnorm_backward_kernel(bf16* __restrict__ dy, bf16* __restrict__ dz, int dz_stride, bf16* __restrict__ out,
                              float* __restrict__ partial, const bf16* __restrict__ dout, const bf16* __restrict__ y,
                              const bf16* __restrict__ z, int z_stride, const bf16* __restrict__ w,
                              const float* __restrict__ rstd, int rows, int C, int groups) {
    const int lane = threadIdx.x, gs = C / groups;
    const int kmax = ITER > 0 ? ITER : (gs + 32 * VEC - 1) / (32 * VEC);
    float* acc = ITER != 0 ? norm_warp_sums(C) : nullptr;
    const NormRows<ITER, VEC> rr(rows);
    for (int row = rr.r0 + threadIdx.y; row < rr.r1; row += NORM_WARPS) {
        const size_t base = (size_t)row * C;
        const bf16* zr = z + (size_t)row * z_stride;
        for (int g = 0; g < groups; g++) {
            const float r = rstd[(size_t)row * groups + g];
            float dot = 0.0f;
            #pragma unroll 4
            for (int k = 0; k < kmax; k++) {
                const int c = g * gs + (lane + k * 32) * VEC;
                if (ITER == 0 && c >= (g + 1) * gs) break;
                float yv[VEC], zv[VEC], gv[VEC], wv[VEC];
                load_vec<VEC>(yv, y + base + c);
                load_vec<VEC>(zv, zr + c);
                load_vec<VEC>(gv, dout + base + c);
                load_vec<VEC>(wv, w + c);
                #pragma unroll
                for (int e = 0; e < VEC; e++) dot += gv[e] * wv[e] * yv[e] * silu(zv[e]) * r;
            }
            dot = warp_sum(dot) / gs;
            #pragma unroll (ITER > 0 ? ITER : 4)
            for (int k = 0; k < kmax; k++) {
                const int c = g * gs + (lane + k * 32) * VEC;
                if (ITER == 0 && c >= (g + 1) * gs) break;
                float yv[VEC], zv[VEC], gv[VEC], wv[VEC], dyv[VEC], dzv[VEC], ov[VEC], tv[VEC];
                load_vec<VEC>(yv, y + base + c);
                load_vec<VEC>(zv, zr + c);
                load_vec<VEC>(gv, dout + base + c);
                load_vec<VEC>(wv, w + c);
                #pragma unroll
                for (int e = 0; e < VEC; e++) {
                    const float sg = sigmoid_fast(zv[e]), sz = zv[e] * sg, v = yv[e] * sz;  // sz = silu(z)
                    const float dv = r * (gv[e] * wv[e] - v * r * dot);
                    dyv[e] = dv * sz;
                    dzv[e] = dv * yv[e] * silu_grad_s(zv[e], sg);
                    ov[e] = v * r * wv[e];  // as the forward computes it
                    tv[e] = gv[e] * v * r;
                }
                store_vec<VEC>(dy + base + c, dyv);
                store_vec<VEC>(dz + (size_t)row * dz_stride + c, dzv);
                store_vec<VEC>(out + base + c, ov);
                if constexpr (ITER != 0) norm_warp_sums_add<VEC>(acc, c, tv);
            }
        }
    }
    if constexpr (ITER != 0) norm_warp_sums_store(partial, C);
}

template <int V, int ITER>
inline void gated_rmsnorm_backward_v(bf16* dy, bf16* dz, int dz_stride, bf16* out, float* dweight, float* scratch,
                                     const bf16* dout, const bf16* y, const bf16* z, int z_stride, const bf16* weight,
                                     const float* rstd, int rows, int C, int groups, cudaStream_t s) {
    const size_t smem = ITER != 0 ? norm_warp_sums_bytes(C) : 0;
    if (smem) set_max_smem(gated_rmsnorm_backward_kernel<V, ITER>, smem);
    gated_rmsnorm_backward_kernel<V, ITER><<<NormRows<ITER, V>::blocks(rows), dim3(32, NORM_WARPS), smem, s>>>(
        dy, dz, dz_stride, out, scratch, dout, y, z, z_stride, weight, rstd, rows, C, groups);
    cudaCheckLast();
    auto store = [=] __device__(int c, int, float sum) { dweight[c] += sum; };
    if constexpr (ITER != 0) {
        colsum_finalize<1>(scratch, store, C, s, NORM_FUSED_CHUNKS);
    } else {
        const int gs = C / groups;
        column_sum<1, V>(scratch,
            [=] __device__(int r, int c, float* v) {
                float yv[V], zv[V], gv[V];
                load_vec<V>(yv, y + (size_t)r * C + c);
                load_vec<V>(zv, z + (size_t)r * z_stride + c);
                load_vec<V>(gv, dout + (size_t)r * C + c);
                const float rs = rstd[(size_t)r * groups + c / gs];  // the V channels share a group
                for (int e = 0; e < V; e++) v[e] = gv[e] * yv[e] * silu(zv[e]) * rs;
            }, store, rows, C, s);
    }
}

inline void gated_rmsnorm_backward(bf16* dy, bf16* dz, int dz_stride, bf16* out, float* dweight, float* scratch,
                                   const bf16* dout, const bf16* y, const bf16* z, int z_stride, const bf16* weight,
                                   const float* rstd, int rows, int C, int groups, cudaStream_t s) {
    const int vec = vec_width(8, sizeof(bf16), {dy, dz, out, dout, y, z, weight}, {C, z_stride, C / groups, dz_stride});
    vec_dispatch<8>(vec, [&](auto V) {
        constexpr int v = decltype(V)::value;
        norm_iter_dispatch<v>(groups == 1 ? norm_fused_iter(C, v) : 0, [&](auto I) {
            gated_rmsnorm_backward_v<v, decltype(I)::value>(dy, dz, dz_stride, out, dweight, scratch, dout, y, z, z_stride,
                                                            weight, rstd, rows, C, groups, s);
        });
    });
}
