// Causal depthwise conv1d (width K, with bias) fused with SiLU, over (B, T, C) rows that
// may be slices of a wider buffer (the xBC part of Mamba-2's in_proj output):
//   pre[b,t,c] = bias[c] + sum_k w[c,k] in[b, t-(K-1)+k, c]   (zero before t = 0)
//   out = silu(pre)
// With document boundaries (pos: per row its position in the document, 0 at a document start;
// nullptr: one document a row) an input counts only from its own document: tap k (input t-k)
// only when k <= pos[t]. Positions count up by one inside a document, so the kernels clear the
// window where a document starts.
// Both passes walk time: each lane holds VEC consecutive channels, each warp a run of rows,
// and the last K inputs (and in the backward the last K pre-activation gradients) stay in
// registers, so every tensor is read once from memory, with K-1 rows of halo per run (a block's
// warps split one chunk of the rows, conv1d_row_chunks: long runs in as few waves as fill the GPU). The
// backward's rows arrive through a per-lane cp.async ring in shared memory, CONV_STAGES - 1
// steps ahead (registers for them would cost the second block an SM).
#pragma once
#include "cuda_common.cuh"
#include "norm.cuh"  // silu, silu_grad
#include "tensor_core.cuh"  // cp.async

constexpr int CONV_STEP = 4;      // rows loaded at once (independent loads in flight)
constexpr int CONV_STAGES = 3;    // the backward's ring: steps of CONV_STEP rows of in and dout per lane

// one channel vector's taps and the sliding window of its last K inputs
template <int K, int VEC>
struct ConvLane {
    float w[K][VEC], bias[VEC];
    float x[K][VEC];  // x[k] = in[t - (K-1) + k], zero before the sequence start

    __device__ void load_taps(const bf16* weight, const bf16* b, int c0) {
        #pragma unroll
        for (int e = 0; e < VEC; e++) {
            #pragma unroll
            for (int k = 0; k < K; k++) w[k][e] = __bfloat162float(weight[(c0 + e) * K + k]);
            bias[e] = __bfloat162float(b[c0 + e]);
        }
        clear();
    }
    __device__ void clear() {
        #pragma unroll
        for (int k = 0; k < K; k++)
            #pragma unroll
            for (int e = 0; e < VEC; e++) x[k][e] = 0.0f;
    }
    // row t's input enters the window; a new sequence or document forgets the old one
    __device__ void push(const Pack<bf16, VEC>& in, bool restart) {
        if (restart) clear();
        #pragma unroll
        for (int k = 0; k < K - 1; k++)
            #pragma unroll
            for (int e = 0; e < VEC; e++) x[k][e] = x[k + 1][e];
        #pragma unroll
        for (int e = 0; e < VEC; e++) x[K - 1][e] = __bfloat162float(in.v[e]);
    }
    __device__ float pre(int e) const {
        float acc = bias[e];
        #pragma unroll
        for (int k = 0; k < K; k++) acc += w[k][e] * x[k][e];
        return acc;
    }
};

// the row's place in its sequence for any row index r >= -T (rows before 0 count as the
// end of an earlier sequence and are never loaded)
__device__ inline int conv_t_in_seq(int r, int T) { return ((r % T) + T) % T; }

// bit u set: row r + u starts a document (CONV_STEP rows; rows outside [r_lo, r_hi) start none)
template <bool DOCS>
__device__ inline unsigned conv_doc_starts(const int* pos, int r, int r_lo, int r_hi) {
    unsigned m = 0;
    if constexpr (DOCS) {
        #pragma unroll
        for (int u = 0; u < CONV_STEP; u++)
            if (r + u >= r_lo && r + u < r_hi && pos[r + u] == 0) m |= 1u << u;
    }
    return m;
}

// DOCS: with document boundaries, whose state costs the backward's VEC = 4 its second block an SM
// unless the registers are capped
constexpr int conv_min_blocks(bool docs, bool backward) { return docs ? (backward ? 2 : 3) : 1; }

template <int K, int VEC, bool DOCS>
__global__ void __launch_bounds__(32 * CONV_WARPS, conv_min_blocks(DOCS, false))
conv1d_silu_forward_kernel(bf16* __restrict__ out, const bf16* __restrict__ in, int in_stride,
                           const bf16* __restrict__ w, const bf16* __restrict__ bias, const int* __restrict__ pos,
                           int rows, int T, int C) {
    const int c0 = (blockIdx.x * 32 + threadIdx.x) * VEC;
    int r0, r1;
    conv1d_warp_rows(blockIdx.y, gridDim.y, threadIdx.y, rows, &r0, &r1);  // this warp's run
    if (c0 >= C || r0 >= r1) return;
    ConvLane<K, VEC> lane;
    lane.load_taps(w, bias, c0);
    Pack<bf16, VEC> xs[CONV_STEP], xn[CONV_STEP];
    unsigned ds, dn;  // document starts among the rows of xs, xn
    auto load = [&](Pack<bf16, VEC>* buf, unsigned& starts, int t) {
        #pragma unroll
        for (int u = 0; u < CONV_STEP; u++)
            buf[u] = tc::load_bf16_or_zero<VEC>(in + (size_t)(t + u) * in_stride + c0, t + u >= 0 && t + u < r1);
        starts = conv_doc_starts<DOCS>(pos, t, 0, r1);
    };
    int tt = conv_t_in_seq(r0 - (K - 1), T);
    load(xs, ds, r0 - (K - 1));
    for (int t = r0 - (K - 1); t < r1; t += CONV_STEP) {
        load(xn, dn, t + CONV_STEP);  // in flight while this step's rows are used
        #pragma unroll
        for (int u = 0; u < CONV_STEP; u++) {
            const int r = t + u;
            if (r >= r1) break;
            lane.push(xs[u], tt == 0 || (ds >> u & 1));
            if (r >= r0) {
                float o[VEC];
                #pragma unroll
                for (int e = 0; e < VEC; e++) o[e] = silu(lane.pre(e));
                store_vec<VEC>(out + (size_t)r * C + c0, o);
            }
            if (++tt == T) tt = 0;
        }
        #pragma unroll
        for (int u = 0; u < CONV_STEP; u++) xs[u] = xn[u];
        ds = dn;
    }
}

// the backward's rings: [warp][stage][in, dout][row of the step][lane]
template <int VEC>
constexpr size_t conv_bwd_smem_bytes() {
    return (size_t)CONV_WARPS * CONV_STAGES * 2 * CONV_STEP * 32 * VEC * sizeof(bf16);
}

// Backward: dpre = dout * silu'(pre); din[s] = sum_k w[k] dpre[s+(K-1)-k] over the rows of s's
// sequence and document (no sequence or document start in rows s+1 .. s+(K-1)-k);
// dw[k] += dpre[t] in[t-(K-1)+k] (the window cleared as in the forward), dbias += dpre[t]. Block y is column-sum
// chunk y (cuda_common.cuh); its warps split the chunk's rows into runs, and their weight
// gradients are summed in warp order into the chunk's partial (gridDim.y chunks).
template <int K, int VEC, bool DOCS>
__global__ void __launch_bounds__(32 * CONV_WARPS, conv_min_blocks(DOCS, true))
conv1d_silu_backward_kernel(bf16* __restrict__ din, int din_stride, float* __restrict__ partial,
                            const bf16* __restrict__ dout, const bf16* __restrict__ in, int in_stride,
                            const bf16* __restrict__ w, const bf16* __restrict__ bias, const int* __restrict__ pos,
                            int rows, int T, int C) {
    __shared__ float red[CONV_WARPS][K + 1][32 * VEC];
    extern __shared__ __align__(16) unsigned char conv_smem[];  // conv_bwd_smem_bytes
    Pack<bf16, VEC>* ring =
        reinterpret_cast<Pack<bf16, VEC>*>(conv_smem) + threadIdx.y * CONV_STAGES * 2 * CONV_STEP * 32 + threadIdx.x;
    auto slot = [&](int stage, int tensor, int u) { return ring + ((stage * 2 + tensor) * CONV_STEP + u) * 32; };
    const int c0 = (blockIdx.x * 32 + threadIdx.x) * VEC;
    int r0, r1;
    conv1d_warp_rows(blockIdx.y, gridDim.y, threadIdx.y, rows, &r0, &r1);  // this warp's run
    float acc[K + 1][VEC] = {};  // dw[k] for k < K, dbias at K
    if (c0 < C && r0 < r1) {
        ConvLane<K, VEC> lane;
        lane.load_taps(w, bias, c0);
        float dq[K][VEC] = {};  // dq[j] = dpre[t - (K-1) + j]
        unsigned restarts = 0;  // DOCS: bit j set when row t - (K-1) + j starts a sequence or document
        const int t_first = r0 - (K - 1), t_end = r1 + K - 1;  // din of the run's last row needs dpre K-1 rows on
        // step i's rows t_first + i CONV_STEP .. into stage i % CONV_STAGES (a group per step, empty past the run)
        auto issue = [&](int i) {
            const int t = t_first + i * CONV_STEP;
            if (t < t_end) {
                #pragma unroll
                for (int u = 0; u < CONV_STEP; u++) {
                    const int r = t + u;
                    const bool valid = r >= 0 && r < rows && r < t_end;
                    tc::cp_async_bf16<VEC>(slot(i % CONV_STAGES, 0, u), valid ? in + (size_t)r * in_stride + c0 : in, valid);
                    tc::cp_async_bf16<VEC>(slot(i % CONV_STAGES, 1, u), valid ? dout + (size_t)r * C + c0 : dout, valid && r >= r0);
                }
            }
            tc::cp_async_commit();
        };
        #pragma unroll
        for (int i = 0; i < CONV_STAGES - 1; i++) issue(i);
        int tt = conv_t_in_seq(t_first, T);
        for (int t = t_first, i = 0; t < t_end; t += CONV_STEP, i++) {
            issue(i + CONV_STAGES - 1);  // into the stage this lane read in step i - 1
            tc::cp_async_wait_group<CONV_STAGES - 1>();
            Pack<bf16, VEC> xs[CONV_STEP], gs[CONV_STEP];
            #pragma unroll
            for (int u = 0; u < CONV_STEP; u++) {
                xs[u] = *slot(i % CONV_STAGES, 0, u);
                gs[u] = *slot(i % CONV_STAGES, 1, u);
            }
            const unsigned ds = conv_doc_starts<DOCS>(pos, t, 0, min(rows, t_end));
            #pragma unroll
            for (int u = 0; u < CONV_STEP; u++) {
                const int r = t + u;
                if (r >= t_end) break;
                const bool restart = tt == 0 || (ds >> u & 1);
                lane.push(xs[u], restart);
                if constexpr (DOCS) restarts = restarts >> 1 | (unsigned)restart << (K - 1);
                #pragma unroll
                for (int j = 0; j < K - 1; j++)
                    #pragma unroll
                    for (int e = 0; e < VEC; e++) dq[j][e] = dq[j + 1][e];
                #pragma unroll
                for (int e = 0; e < VEC; e++) {  // zero outside [r0, rows): gs is zero there
                    const float dp = __bfloat162float(gs[u].v[e]) * silu_grad(lane.pre(e));
                    dq[K - 1][e] = dp;
                    if (r < r1) {
                        #pragma unroll
                        for (int k = 0; k < K; k++) acc[k][e] += dp * lane.x[k][e];
                        acc[K][e] += dp;
                    }
                }
                const int s = r - (K - 1);
                if (s >= r0) {
                    const int ts = s % T;
                    // row s+j is in s's sequence, and with DOCS no restart lies in rows s+1 .. s+j (bits 1 .. j)
                    auto same_doc = [&](int j) { return DOCS ? (restarts & ((2u << j) - 2)) == 0 : ts + j < T; };
                    float d[VEC];
                    #pragma unroll
                    for (int e = 0; e < VEC; e++) {
                        d[e] = 0.0f;
                        #pragma unroll
                        for (int j = 0; j < K; j++)
                            if (same_doc(j)) d[e] += lane.w[K - 1 - j][e] * dq[j][e];
                    }
                    store_vec<VEC>(din + (size_t)s * din_stride + c0, d);
                }
                if (++tt == T) tt = 0;
            }
        }
        tc::cp_async_wait_group<0>();  // (the groups past the run are empty)
    }
    #pragma unroll
    for (int v = 0; v <= K; v++)
        #pragma unroll
        for (int e = 0; e < VEC; e++) red[threadIdx.y][v][threadIdx.x * VEC + e] = acc[v][e];
    __syncthreads();
    const int tid = threadIdx.y * 32 + threadIdx.x;
    for (int i = tid; i < (K + 1) * 32 * VEC; i += 32 * CONV_WARPS) {
        const int v = i / (32 * VEC), cc = i % (32 * VEC), c = blockIdx.x * 32 * VEC + cc;
        if (c >= C) continue;
        float sum = 0.0f;
        for (int y = 0; y < CONV_WARPS; y++) sum += red[y][v][cc];
        partial[((size_t)blockIdx.y * C + c) * (K + 1) + v] = sum;
    }
}

// 4 channels a lane (8-byte accesses, 256 contiguous bytes a warp): the taps, the windows,
// the loads in flight and the backward's gradient sums stay in registers at 2-3 blocks an SM.
// MAX_VEC is a parameter so that dev/bench_layers can time the other widths.
constexpr int CONV_MAX_VEC = 4;

template <int K, int MAX_VEC = CONV_MAX_VEC>
inline void conv1d_silu_forward_k(bf16* out, const bf16* in, int in_stride, const bf16* w, const bf16* bias,
                                  const int* pos, int B, int T, int C, cudaStream_t s) {
    const int rows = B * T;
    vec_dispatch<MAX_VEC>(vec_width(MAX_VEC, sizeof(bf16), {out, in}, {C, in_stride}), [&](auto V) {
        constexpr int v = decltype(V)::value;
        auto k = pos ? conv1d_silu_forward_kernel<K, v, true> : conv1d_silu_forward_kernel<K, v, false>;
        const int cb = ceil_div(C, 32 * v);
        const dim3 grid(cb, conv1d_row_chunks(occupancy(k, 32 * CONV_WARPS, 0) * sm_count(), cb, rows, K));
        k<<<grid, dim3(32, CONV_WARPS), 0, s>>>(out, in, in_stride, w, bias, pos, rows, T, C);
    });
    cudaCheckLast();
}

template <int K, int MAX_VEC = CONV_MAX_VEC>
inline void conv1d_silu_backward_k(bf16* din, int din_stride, float* dweight, float* dbias, float* scratch,
                                   const bf16* dout, const bf16* in, int in_stride, const bf16* w, const bf16* bias,
                                   const int* pos, int B, int T, int C, cudaStream_t s) {
    const int rows = B * T;
    const int vec = vec_width(MAX_VEC, sizeof(bf16), {din, dout, in}, {C, in_stride, din_stride});
    int chunks = 0;
    vec_dispatch<MAX_VEC>(vec, [&](auto V) {
        constexpr int v = decltype(V)::value;
        auto k = pos ? conv1d_silu_backward_kernel<K, v, true> : conv1d_silu_backward_kernel<K, v, false>;
        const int cb = ceil_div(C, 32 * v);
        chunks = conv1d_row_chunks(occupancy(k, 32 * CONV_WARPS, conv_bwd_smem_bytes<v>()) * sm_count(), cb, rows, K);
        k<<<dim3(cb, chunks), dim3(32, CONV_WARPS), conv_bwd_smem_bytes<v>(), s>>>(din, din_stride, scratch, dout, in,
                                                                                   in_stride, w, bias, pos, rows, T, C);
    });
    cudaCheckLast();
    colsum_finalize<K + 1>(scratch,
        [=] __device__(int c, int k, float sum) {
            if (k < K) dweight[c * K + k] += sum;
            else dbias[c] += sum;
        }, C, s, chunks);
}

#define CONV1D_DISPATCH(K, CALL)                                                   \
    switch (K) {                                                                   \
        case 2: CALL(2); break;                                                    \
        case 3: CALL(3); break;                                                    \
        case 4: CALL(4); break;                                                    \
        default: THROW("conv1d: width %d is not supported (2, 3 or 4)", K);        \
    }

inline void conv1d_silu_forward(bf16* out, const bf16* in, int in_stride, const bf16* weight, const bf16* bias,
                                const int* pos, int B, int T, int C, int K, cudaStream_t s) {
#define CALL(KK) conv1d_silu_forward_k<KK>(out, in, in_stride, weight, bias, pos, B, T, C, s)
    CONV1D_DISPATCH(K, CALL)
#undef CALL
}

inline void conv1d_silu_backward(bf16* din, int din_stride, float* dweight, float* dbias, float* scratch,
                                 const bf16* dout, const bf16* in, int in_stride, const bf16* weight, const bf16* bias,
                                 const int* pos, int B, int T, int C, int K, cudaStream_t s) {
#define CALL(KK) conv1d_silu_backward_k<KK>(din, din_stride, dweight, dbias, scratch, dout, in, in_stride, weight, bias, pos, B, T, C, s)
    CONV1D_DISPATCH(K, CALL)
#undef CALL
}
#undef CONV1D_DISPATCH
