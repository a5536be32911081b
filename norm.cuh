// RMSNorm (pre-norm of every block, fp32 residual in, bf16 out) and Mamba-2's gated,
// grouped RMSNorm: out = rmsnorm_group(y * silu(z)) * w (mamba_ssm's RMSNormGated with
// norm_before_gate=False).
//
// Every pass runs in row slices (NormSlice): a block takes one row at a time and keeps its share of
// the row in registers from the row's sum to its outputs, so each input is read once. In the
// backward passes a thread owns the same channels in every row of its block's share of the rows,
// and sums their weight-gradient terms in registers; colsum_finalize adds the blocks' partial rows
// in block order (the same bits every run, no atomics, no second pass over the inputs).
#pragma once
#include <algorithm>
#include "cuda_common.cuh"
#include "tensor_core.cuh"  // cp.async

constexpr int NORM_MAX_NV = 8;         // vectors a thread holds of each input row
constexpr int NORM_MAX_THREADS = 512;  // a block (the kernels' launch bound: up to 128 registers a thread)
constexpr int NORM_STAGES = 2;         // the gated backward's ring: the rows a thread has in flight, this one's included

// The block layout for rows of C channels in `groups` groups of gs = C / groups, VEC channels a
// vector: each group goes to tpg consecutive threads (whole warps when the groups are few, else a
// power of two dividing 32, so that a group's sum is a warp's shuffles and, across a group's
// warps, one exchange through shared memory), and thread t of a group owns the vectors t, t + tpg,
// ..., t + (nv - 1) tpg of its group. A group gets more threads while a thread would hold more than
// 32 values of an input row.
struct NormSlicing { int tpg, threads, nv; };

inline NormSlicing norm_slicing(int C, int groups, int vec) {
    if (groups < 1 || C % groups != 0 || C / groups % vec != 0)
        THROW("norm: %d channels do not split into %d groups of whole %d-vectors", C, groups, vec);
    const int gs = C / groups;
    int tpg = groups <= 8 ? 32 * (int)ceil_div(8, groups) : groups <= 16 ? 32 : 16;
    while (tpg > 1 && (groups * tpg > NORM_MAX_THREADS || groups * tpg % 32 != 0)) tpg /= 2;
    if (groups * tpg > NORM_MAX_THREADS || groups * tpg % 32 != 0)
        THROW("norm: %d groups do not fill whole warps of a block of at most %d threads", groups, NORM_MAX_THREADS);
    auto nv = [&] { return (int)ceil_div(gs, (size_t)vec * tpg); };
    while (nv() * vec > 32 && tpg % 32 == 0 && 2 * groups * tpg <= NORM_MAX_THREADS) tpg *= 2;
    if (nv() > NORM_MAX_NV)
        THROW("norm: a group of %d channels needs %d vectors of %d a thread (at most %d)", gs, nv(), vec, NORM_MAX_NV);
    return {tpg, groups * tpg, nv()};
}

// launch(V, NV) for the vector width and nv rounded up to a compiled count (1, 2, 3, 4, 8)
template <int MAX_VEC, typename F>
inline void norm_dispatch(int vec, int nv, F&& launch) {
    vec_dispatch<MAX_VEC>(vec, [&](auto V) {
        if (nv <= 1) launch(V, std::integral_constant<int, 1>());
        else if (nv <= 2) launch(V, std::integral_constant<int, 2>());
        else if (nv <= 3) launch(V, std::integral_constant<int, 3>());
        else if (nv <= 4) launch(V, std::integral_constant<int, 4>());
        else launch(V, std::integral_constant<int, NORM_MAX_NV>());
    });
}

// VEC bf16 kept packed in registers (half the registers of floats) until used
template <int VEC>
using BfVec = Pack<bf16, VEC>;
template <int VEC>
__device__ inline BfVec<VEC> load_bf(const bf16* p) { return *reinterpret_cast<const BfVec<VEC>*>(p); }
template <int VEC>
__device__ inline float at(const BfVec<VEC>& v, int e) { return __bfloat162float(v.v[e]); }

// this thread's place in the row (see NormSlicing)
template <int VEC, int NV>
struct NormSlice {
    int gs, tpg, grp, t;
    __device__ NormSlice(int C, int groups, int tpg_)
        : gs(C / groups), tpg(tpg_), grp((int)threadIdx.x / tpg_), t((int)threadIdx.x % tpg_) {}
    __device__ bool has(int k) const { return (t + k * tpg) * VEC < gs; }
    __device__ int col(int k) const { return grp * gs + (t + k * tpg) * VEC; }
    // the thread's vectors of a bf16 row (the weights), kept packed
    __device__ void load(BfVec<VEC> (&v)[NV], const bf16* row) const {
        #pragma unroll
        for (int k = 0; k < NV; k++)
            if (has(k)) v[k] = load_bf<VEC>(row + col(k));
    }
    // out = (v r) w over the thread's vectors of a row; XHAT: v r is first rounded to bf16 and kept in xhat_row
    // (RMSNorm: out = bf16(xhat) w, which rmsnorm_apply rebuilds bit for bit)
    template <bool XHAT>
    __device__ void store_scaled(float (&v)[NV][VEC], float r, const bf16* w, bf16* out_row, bf16* xhat_row) const {
        #pragma unroll
        for (int k = 0; k < NV; k++) {
            if (!has(k)) continue;
            float wv[VEC];
            load_vec<VEC>(wv, w + col(k));
            #pragma unroll
            for (int e = 0; e < VEC; e++) v[k][e] = v[k][e] * r;
            if constexpr (XHAT) {
                #pragma unroll
                for (int e = 0; e < VEC; e++) v[k][e] = __bfloat162float(__float2bfloat16(v[k][e]));
                store_vec<VEC>(xhat_row + col(k), v[k]);
            }
            #pragma unroll
            for (int e = 0; e < VEC; e++) v[k][e] *= wv[e];
            store_vec<VEC>(out_row + col(k), v[k]);
        }
    }
    // the sum of v over the thread's group in a fixed order, to every thread of the group; every thread
    // of the block calls it (it synchronises the block when a group spans several warps)
    __device__ float group_sum(float v) const {
        __shared__ float red[32];
        if (tpg <= 32) {
            for (int o = tpg / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
            return v;
        }
        v = warp_sum(v);
        __syncthreads();  // the last call's reads of red are done
        if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
        __syncthreads();
        const int w0 = grp * (tpg / 32);
        float s = 0.0f;
        for (int w = 0; w < tpg / 32; w++) s += red[w0 + w];
        return s;
    }
};

// The gated backward's rows stream through a per-thread ring in shared memory ([stage][y, z, dout][k]
// [threads], dynamic): the next NORM_STAGES - 1 rows load by cp.async while a row computes, and no registers
// hold them; a thread reads only its own slots, so the ring needs no barriers.
template <int VEC, int NV>
struct NormRing {
    static constexpr int TENSORS = 3;
    BfVec<VEC>* base;
    static size_t bytes(int threads) { return (size_t)NORM_STAGES * TENSORS * NV * threads * sizeof(BfVec<VEC>); }
    __device__ NormRing() {
        extern __shared__ __align__(16) unsigned char norm_ring[];
        base = reinterpret_cast<BfVec<VEC>*>(norm_ring) + threadIdx.x;
    }
    __device__ BfVec<VEC>* slot(int stage, int tensor, int k) const {
        return base + ((stage * TENSORS + tensor) * NV + k) * blockDim.x;
    }
};

// the block's weight-gradient sums as its partial row (each channel has one owner)
template <int VEC, int NV>
__device__ inline void norm_store_partial(float* partial, const NormSlice<VEC, NV>& sl, const float (&acc)[NV][VEC],
                                          int C) {
    #pragma unroll
    for (int k = 0; k < NV; k++)
        if (sl.has(k)) store_vec<VEC>(partial + (size_t)blockIdx.x * C + sl.col(k), acc[k]);
}

// ----------------------------------------------------------------------------
// RMSNorm of the fp32 residual stream. The forward keeps xhat = x * rstd in bf16 (half the
// bytes of x) and the backward works from it alone: out = bf16(xhat * w) is the same value
// whether the forward writes it or rmsnorm_apply rebuilds it in the backward, and dx needs
// only xhat and rstd. VEC values per access, 4 for the fp32 rows.

template <int VEC, int NV>
__global__ void __launch_bounds__(NORM_MAX_THREADS)
rmsnorm_forward_kernel(bf16* __restrict__ out, bf16* __restrict__ xhat, float* __restrict__ rstd,
                       const float* __restrict__ x, const bf16* __restrict__ w, int C, int tpg,
                       float eps) {
    const NormSlice<VEC, NV> sl(C, 1, tpg);
    const size_t base = (size_t)blockIdx.x * C;
    float xv[NV][VEC], ss = 0.0f;
    #pragma unroll
    for (int k = 0; k < NV; k++)
        if (sl.has(k)) load_vec<VEC>(xv[k], x + base + sl.col(k));
    #pragma unroll
    for (int k = 0; k < NV; k++)
        if (sl.has(k))
            #pragma unroll
            for (int e = 0; e < VEC; e++) ss += xv[k][e] * xv[k][e];
    const float r = rsqrtf(sl.group_sum(ss) / C + eps);
    sl.store_scaled<true>(xv, r, w, out + base, xhat + base);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

inline void rmsnorm_forward(bf16* out, bf16* xhat, float* rstd, const float* x, const bf16* weight, int rows, int C,
                            float eps, cudaStream_t s) {
    const int vec = std::min(vec_width(4, sizeof(bf16), {out, xhat, weight}, {C}), vec_width(4, sizeof(float), {x}, {C}));
    const NormSlicing ns = norm_slicing(C, 1, vec);
    norm_dispatch<4>(vec, ns.nv, [&](auto V, auto NV) {
        rmsnorm_forward_kernel<decltype(V)::value, decltype(NV)::value><<<rows, ns.threads, 0, s>>>(
            out, xhat, rstd, x, weight, C, ns.tpg, eps);
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
// writes bf16(dx), and the block's partial sums of dweight = sum over rows of dout * xhat
template <int VEC, int NV>
__global__ void __launch_bounds__(NORM_MAX_THREADS)
rmsnorm_backward_kernel(float* __restrict__ dx, bf16* __restrict__ dx_bf16, float* __restrict__ partial,
                        const bf16* __restrict__ dout, const bf16* __restrict__ xhat,
                        const bf16* __restrict__ w, const float* __restrict__ rstd, int rows, int C,
                        int tpg) {
    const NormSlice<VEC, NV> sl(C, 1, tpg);
    BfVec<VEC> wv[NV];
    float acc[NV][VEC] = {};
    sl.load(wv, w);
    int r0, r1;  // this block's rows: chunk blockIdx.x of norm_row_blocks(C) (kernel_sizes.h)
    colsum_chunk_rows(blockIdx.x, gridDim.x, rows, &r0, &r1);
    for (int row = r0; row < r1; row++) {
        const size_t base = (size_t)row * C;
        BfVec<VEC> g[NV], xv[NV];
        float d[NV][VEC], dot = 0.0f;
        #pragma unroll
        for (int k = 0; k < NV; k++)
            if (sl.has(k)) {
                g[k] = load_bf<VEC>(dout + base + sl.col(k));
                xv[k] = load_bf<VEC>(xhat + base + sl.col(k));
                load_vec<VEC>(d[k], dx + base + sl.col(k));
            }
        #pragma unroll
        for (int k = 0; k < NV; k++)
            if (sl.has(k))
                #pragma unroll
                for (int e = 0; e < VEC; e++) dot += at(g[k], e) * at(wv[k], e) * at(xv[k], e);
        dot = sl.group_sum(dot) / C;
        const float r = rstd[row];
        #pragma unroll
        for (int k = 0; k < NV; k++) {
            if (!sl.has(k)) continue;
            #pragma unroll
            for (int e = 0; e < VEC; e++) {
                d[k][e] += r * (at(g[k], e) * at(wv[k], e) - at(xv[k], e) * dot);
                acc[k][e] += at(g[k], e) * at(xv[k], e);
            }
            store_vec<VEC>(dx + base + sl.col(k), d[k]);
            store_vec<VEC>(dx_bf16 + base + sl.col(k), d[k]);
        }
    }
    norm_store_partial<VEC, NV>(partial, sl, acc, C);
}

// dx (fp32, the residual gradient) accumulates and is also written as bf16 to dx_bf16 (the next
// matmul backward reads it); dweight accumulates
inline void rmsnorm_backward(float* dx, bf16* dx_bf16, float* dweight, float* scratch, const bf16* dout,
                             const bf16* xhat, const bf16* weight, const float* rstd, int rows, int C, cudaStream_t s) {
    const int vec = std::min(vec_width(4, sizeof(bf16), {dx_bf16, dout, xhat, weight}, {C}),
                             vec_width(4, sizeof(float), {dx}, {C}));
    const NormSlicing ns = norm_slicing(C, 1, vec);
    const int blocks = norm_row_blocks(C);
    norm_dispatch<4>(vec, ns.nv, [&](auto V, auto NV) {
        rmsnorm_backward_kernel<decltype(V)::value, decltype(NV)::value><<<blocks, ns.threads, 0, s>>>(
            dx, dx_bf16, scratch, dout, xhat, weight, rstd, rows, C, ns.tpg);
    });
    cudaCheckLast();
    colsum_finalize<1>(scratch, [=] __device__(int c, int, float sum) { dweight[c] += sum; }, C, s, blocks);
}

// ----------------------------------------------------------------------------
// Gated grouped RMSNorm: v = y * silu(z); per group of C/groups channels
// n = v * rstd_g, rstd_g = 1/sqrt(mean_group(v^2) + eps); out = n * w.
// VEC bf16 per access (the group size is a multiple of VEC).

template <int VEC, int NV>
__global__ void __launch_bounds__(NORM_MAX_THREADS)
gated_rmsnorm_forward_kernel(bf16* __restrict__ out, float* __restrict__ rstd, const bf16* __restrict__ y,
                             const bf16* __restrict__ z, int z_stride, const bf16* __restrict__ w,
                             int C, int groups, int tpg, float eps) {
    const NormSlice<VEC, NV> sl(C, groups, tpg);
    const int row = blockIdx.x;
    const bf16* yr = y + (size_t)row * C;
    const bf16* zr = z + (size_t)row * z_stride;
    float v[NV][VEC], ss = 0.0f;
    #pragma unroll
    for (int k = 0; k < NV; k++) {
        if (!sl.has(k)) continue;
        float zv[VEC];
        load_vec<VEC>(v[k], yr + sl.col(k));
        load_vec<VEC>(zv, zr + sl.col(k));
        #pragma unroll
        for (int e = 0; e < VEC; e++) {
            v[k][e] *= silu(zv[e]);
            ss += v[k][e] * v[k][e];
        }
    }
    const float r = rsqrtf(sl.group_sum(ss) / sl.gs + eps);
    sl.store_scaled<false>(v, r, w, out + (size_t)row * C, nullptr);
    if (sl.t == 0) rstd[(size_t)row * groups + sl.grp] = r;
}

inline void gated_rmsnorm_forward(bf16* out, float* rstd, const bf16* y, const bf16* z, int z_stride, const bf16* weight,
                                  int rows, int C, int groups, float eps, cudaStream_t s) {
    if (C % groups != 0) THROW("gated_rmsnorm: C %d is not divisible by groups %d", C, groups);
    const int vec = vec_width(8, sizeof(bf16), {out, y, z, weight}, {C, z_stride, C / groups});
    const NormSlicing ns = norm_slicing(C, groups, vec);
    norm_dispatch<8>(vec, ns.nv, [&](auto V, auto NV) {
        gated_rmsnorm_forward_kernel<decltype(V)::value, decltype(NV)::value><<<rows, ns.threads, 0, s>>>(
            out, rstd, y, z, z_stride, weight, C, groups, ns.tpg, eps);
    });
    cudaCheckLast();
}

// dv = rstd * (gw - n * mean_group(gw * n)), gw = dout * w; dy = dv * silu(z); dz = dv * y * silu'(z);
// also out = n * w again (the forward's bits: out_proj's weight gradient reads it, and no recompute pass need
// write it before), and the block's partial sums of dweight = sum over rows of dout * n
template <int VEC, int NV>
__global__ void __launch_bounds__(NORM_MAX_THREADS)
gated_rmsnorm_backward_kernel(bf16* __restrict__ dy, bf16* __restrict__ dz, int dz_stride,
                              bf16* __restrict__ out, float* __restrict__ partial,
                              const bf16* __restrict__ dout, const bf16* __restrict__ y,
                              const bf16* __restrict__ z, int z_stride, const bf16* __restrict__ w,
                              const float* __restrict__ rstd, int rows, int C, int groups, int tpg) {
    const NormSlice<VEC, NV> sl(C, groups, tpg);
    const NormRing<VEC, NV> ring;
    BfVec<VEC> wv[NV];
    float acc[NV][VEC] = {};
    sl.load(wv, w);
    int r0, r1;  // this block's rows: chunk blockIdx.x of norm_row_blocks(C) (kernel_sizes.h)
    colsum_chunk_rows(blockIdx.x, gridDim.x, rows, &r0, &r1);
    // the block's i-th row into stage i % NORM_STAGES (an empty group past its rows)
    auto issue = [&](int i) {
        const int row = r0 + i, st = i % NORM_STAGES;
        if (row < r1)
            #pragma unroll
            for (int k = 0; k < NV; k++)
                if (sl.has(k)) {
                    tc::cp_async_bf16<VEC>(ring.slot(st, 0, k), y + (size_t)row * C + sl.col(k), true);
                    tc::cp_async_bf16<VEC>(ring.slot(st, 1, k), z + (size_t)row * z_stride + sl.col(k), true);
                    tc::cp_async_bf16<VEC>(ring.slot(st, 2, k), dout + (size_t)row * C + sl.col(k), true);
                }
        tc::cp_async_commit();
    };
    #pragma unroll
    for (int i = 0; i < NORM_STAGES - 1; i++) issue(i);
    for (int row = r0, i = 0; row < r1; row++, i++) {
        issue(i + NORM_STAGES - 1);  // into the stage this thread read a row ago
        tc::cp_async_wait_group<NORM_STAGES - 1>();
        const int st = i % NORM_STAGES;
        const size_t base = (size_t)row * C;
        const float r = rstd[(size_t)row * groups + sl.grp];
        float dot = 0.0f;
        #pragma unroll
        for (int k = 0; k < NV; k++)
            if (sl.has(k)) {
                const BfVec<VEC> yv = *ring.slot(st, 0, k), zv = *ring.slot(st, 1, k), gv = *ring.slot(st, 2, k);
                #pragma unroll
                for (int e = 0; e < VEC; e++) dot += at(gv, e) * at(wv[k], e) * at(yv, e) * silu(at(zv, e)) * r;
            }
        dot = sl.group_sum(dot) / sl.gs;
        #pragma unroll
        for (int k = 0; k < NV; k++) {
            if (!sl.has(k)) continue;
            const BfVec<VEC> yv = *ring.slot(st, 0, k), zv = *ring.slot(st, 1, k), gv = *ring.slot(st, 2, k);
            float dyv[VEC], dzv[VEC], ov[VEC];
            #pragma unroll
            for (int e = 0; e < VEC; e++) {
                const float zf = at(zv, e), yf = at(yv, e), gf = at(gv, e), wf = at(wv[k], e);
                const float sg = sigmoid_fast(zf), sz = zf * sg, v = yf * sz;  // sz = silu(z)
                const float dv = r * (gf * wf - v * r * dot);
                dyv[e] = dv * sz;
                dzv[e] = dv * yf * silu_grad_s(zf, sg);
                ov[e] = v * r * wf;  // as the forward computes it
                acc[k][e] += gf * v * r;
            }
            store_vec<VEC>(dy + base + sl.col(k), dyv);
            store_vec<VEC>(dz + (size_t)row * dz_stride + sl.col(k), dzv);
            store_vec<VEC>(out + base + sl.col(k), ov);
        }
    }
    norm_store_partial<VEC, NV>(partial, sl, acc, C);
}

inline void gated_rmsnorm_backward(bf16* dy, bf16* dz, int dz_stride, bf16* out, float* dweight, float* scratch,
                                   const bf16* dout, const bf16* y, const bf16* z, int z_stride, const bf16* weight,
                                   const float* rstd, int rows, int C, int groups, cudaStream_t s) {
    if (C % groups != 0) THROW("gated_rmsnorm: C %d is not divisible by groups %d", C, groups);
    const int vec = vec_width(8, sizeof(bf16), {dy, dz, out, dout, y, z, weight}, {C, z_stride, C / groups, dz_stride});
    const NormSlicing ns = norm_slicing(C, groups, vec);
    const int blocks = norm_row_blocks(C);
    norm_dispatch<8>(vec, ns.nv, [&](auto V, auto NV) {
        constexpr int v = decltype(V)::value, nv = decltype(NV)::value;
        const size_t smem = NormRing<v, nv>::bytes(ns.threads);
        set_max_smem(gated_rmsnorm_backward_kernel<v, nv>, smem);
        gated_rmsnorm_backward_kernel<v, nv><<<blocks, ns.threads, smem, s>>>(
            dy, dz, dz_stride, out, scratch, dout, y, z, z_stride, weight, rstd, rows, C, groups, ns.tpg);
    });
    cudaCheckLast();
    colsum_finalize<1>(scratch, [=] __device__(int c, int, float sum) { dweight[c] += sum; }, C, s, blocks);
}
