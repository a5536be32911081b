// Causal grouped-query flash attention (forward and backward) and rotary position embedding.
//
// Layout: the fused q/k/v projection gives one row per token (B*T rows) of
//   [q heads (Hq*Dh) | k heads (Hkv*Dh) | v heads (Hkv*Dh)]
// and query head h reads kv head h / (Hq/Hkv). Per sequence b and query head h:
//   S = q k^T / sqrt(Dh) (causal: token t sees s <= t),  lse_t = logsumexp_s S_ts,
//   P = exp(S - lse),  out = P v.
// Backward (P recomputed from lse, Delta_t = rowsum(dout * out)):
//   dP = dout v^T,  dS = P * (dP - Delta),  dq = dS k / sqrt(Dh),  dk = dS^T q / sqrt(Dh),  dv = P^T dout.
// Flash-style tiles, nothing of size T x T in memory: the forward keeps an online softmax (running max
// and sum, fp32) per query row; the backward runs two kernels after the Delta pass:
//   dK/dV: one block per (kv tile, kv head, b) loops over every query head of its group and every query
//          tile at or after the diagonal, summing dK and dV in registers (no atomics);
//   dQ:    one block per (query tile, query head, b) loops over the kv tiles up to the diagonal.
// Every sum runs in a fixed order: results repeat bit for bit.
// Documents: with positions pos[b*T + t] (t's position in its document, 0 at a document start), query i
// sees key j only if ds(i) <= j <= i, ds(i) = i - pos[i]; kv tiles wholly before a query tile's first
// document start are skipped, so packed short documents cost less than one causal sequence.
//
// Two implementations, one per build: on sm_90a (make GPU_ARCH=90) the kernels of attention_sm90.cuh
// (wgmma, TMA, warp specialisation); otherwise the ones below, on mma.sync m16n8k16 (bf16 in, fp32
// accumulate; sm_80 and later), operands from shared memory through ldmatrix, tiles streamed with cp.async
// double buffering, each warp owning 16 (or 32) rows of the tile it computes, probabilities kept in
// registers as the next matmul's operand. sm80_forward / sm80_backward stay callable on Hopper (the
// benchmark compares them).
#pragma once
#include <algorithm>
#include <cstdint>
#include "cuda_common.cuh"
#include "kernel_sizes.h"  // AttnShape, SM90A, the backward's scratch layout, attention_scratch_bytes
#include "tensor_core.cuh"

namespace attn {

using namespace tc;

constexpr int PAD = 8;  // bf16 padding per smem row: ldmatrix rows hit distinct banks

// ----------------------------------------------------------------------------------------------
// warp-level tensor-core helpers (the PTX wrappers and fragment layouts are in tensor_core.cuh)

__device__ inline float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// start of the document of row r of sequence b (0 without positions); rows outside [0, T) (a tile's padding)
// take the nearest row's
__device__ inline int doc_start(const int* pos, int b, int T, int r) {
    if (!pos) return 0;
    r = max(0, min(r, T - 1));
    return r - __ldg(pos + (size_t)b * T + r);
}
// the first row in [lo, T) whose document starts after row `key` (T if none; doc starts never decrease)
__device__ inline int first_row_after(const int* pos, int b, int T, int lo, int key) {
    int hi = T;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (doc_start(pos, b, T, mid) > key) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

// Lane offsets for ldmatrix x4 (within a 16 x 16 block):
//   A from row-major smem [m][k]: row lane & 15, col (lane >> 4) * 8
//   B (two n-tiles) from n-major smem [n][k] (non-trans): row (lane & 7) + (lane >> 4) * 8, col ((lane >> 3) & 1) * 8
//   B (two n-tiles) from k-major smem [k][n] (trans):     row (lane & 7) + ((lane >> 3) & 1) * 8, col (lane >> 4) * 8
struct Lanes {
    int arow, acol, brow, bcol, trow, tcol;
    __device__ Lanes() {
        const int lane = threadIdx.x & 31;
        arow = lane & 15;
        acol = (lane >> 4) * 8;
        brow = (lane & 7) + (lane >> 4) * 8;
        bcol = ((lane >> 3) & 1) * 8;
        trow = (lane & 7) + ((lane >> 3) & 1) * 8;
        tcol = (lane >> 4) * 8;
    }
};

// one k16 step: acc (16 x 8N) += a (16 x 16 fragment) * B (k rows [16kk, 16kk + 16), 8N columns) from smem,
// B_KM: k-major smem [k][n], else n-major smem [n][k] (rows are columns of acc)
template <int N, bool B_KM>
__device__ inline void mma_k16(float (&acc)[N][4], const uint32_t (&a)[4], const bf16* sB, int ldb, int kk,
                               const Lanes& ln) {
#pragma unroll
    for (int nt = 0; nt < N; nt += 2) {
        uint32_t b[4];
        if constexpr (B_KM) ldsm_x4_t(b, sB + (kk * 16 + ln.trow) * ldb + nt * 8 + ln.tcol);
        else ldsm_x4(b, sB + (nt * 8 + ln.brow) * ldb + kk * 16 + ln.bcol);
        mma_bf16(acc[nt], a, b[0], b[1]);
        mma_bf16(acc[nt + 1], a, b[2], b[3]);
    }
}
// acc (16 x 8N) += A (16 x 16K, row-major smem) * B^T, B (8N x 16K) n-major smem
template <int N, int K>
__device__ inline void mma_abt(float (&acc)[N][4], const bf16* sA, int lda, const bf16* sB, int ldb, const Lanes& ln) {
#pragma unroll
    for (int kk = 0; kk < K; kk++) {
        uint32_t a[4];
        ldsm_x4(a, sA + ln.arow * lda + kk * 16 + ln.acol);
        mma_k16<N, false>(acc, a, sB, ldb, kk, ln);
    }
}
// acc (16 x 8N) += A (16 x 16K, register fragments) * B (16K x 8N), B from smem as in mma_k16
template <int N, int K, bool B_KM>
__device__ inline void mma_rb(float (&acc)[N][4], const uint32_t (&a)[K][4], const bf16* sB, int ldb, const Lanes& ln) {
#pragma unroll
    for (int kk = 0; kk < K; kk++) mma_k16<N, B_KM>(acc, a[kk], sB, ldb, kk, ln);
}

// a 16 x 8N accumulator as bf16 into rows m0 .. m0 + 16 of an smem tile (row stride ld), rows g / g+8 times
// sc0 / sc1
template <int N>
__device__ inline void store_acc(bf16* s, int ld, int m0, const float (&acc)[N][4], float sc0 = 1.f, float sc1 = 1.f) {
#pragma unroll
    for (int n = 0; n < N; n++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int lane = threadIdx.x & 31, r = m0 + (lane >> 2) + 8 * hf, qd = lane & 3;
            const float sc = hf ? sc1 : sc0;
            *reinterpret_cast<uint32_t*>(s + r * ld + n * 8 + 2 * qd) =
                pack_bf16(acc[n][2 * hf] * sc, acc[n][2 * hf + 1] * sc);
        }
}

// ----------------------------------------------------------------------------------------------
// block-level copies

// starts copying ROWS rows (COLS bf16 wide, row stride `stride` elements) into smem (row stride COLS + PAD);
// rows >= valid become zeros (past the end of the sequence)
template <int ROWS, int COLS, int NTHREADS>
__device__ inline void load_tile(bf16* s, const bf16* g, size_t stride, int valid) {
    constexpr int V = COLS / 8;
#pragma unroll
    for (int idx = threadIdx.x; idx < ROWS * V; idx += NTHREADS) {
        const int r = idx / V, c = idx - r * V;
        const bool ok = r < valid;
        cp_async16(s + r * (COLS + PAD) + c * 8, g + (ok ? (size_t)r * stride + c * 8 : 0), ok);
    }
}
// Double-buffered K/V tiles of BN rows: starts loading tile j + 1 into buffer (j + 1) & 1 and
// waits for tile j (already in flight); the last tile only waits
template <int BN, int D, int NTH>
__device__ inline void prefetch_next_kv(bf16* sK, bf16* sV, const bf16* gk, const bf16* gv, size_t stride, int T, int j,
                                        int nkv) {
    if (j + 1 < nkv) {
        const int st = (j + 1) & 1, k1 = (j + 1) * BN;
        load_tile<BN, D, NTH>(sK + st * BN * (D + PAD), gk + (size_t)k1 * stride, stride, T - k1);
        load_tile<BN, D, NTH>(sV + st * BN * (D + PAD), gv + (size_t)k1 * stride, stride, T - k1);
        cp_async_commit();
        cp_async_wait_group<1>();
    } else {
        cp_async_wait_group<0>();
    }
}
// ROWS rows of an smem tile to global memory with 16-byte stores; rows >= valid are skipped
template <int ROWS, int COLS, int NTHREADS>
__device__ inline void store_tile(bf16* g, size_t stride, const bf16* s, int valid) {
    constexpr int V = COLS / 8;
    for (int idx = threadIdx.x; idx < ROWS * V; idx += NTHREADS) {
        const int r = idx / V, c = idx - r * V;
        if (r < valid)
            *reinterpret_cast<uint4*>(g + (size_t)r * stride + c * 8) =
                *reinterpret_cast<const uint4*>(s + r * (COLS + PAD) + c * 8);
    }
}

// ----------------------------------------------------------------------------------------------
// forward: one block per (query tile of BM rows, query head, b); NW warps, each owning MT = BM / (16 NW)
// consecutive 16-row slabs; kv tiles of BN rows double-buffered.
// DOC: the kernel reads document positions (an instance without them keeps the plain causal code).

template <int D, int BM, int BN, int NW, bool DOC>
__global__ void __launch_bounds__(NW * 32)
fwd_kernel(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ qkv, const int* __restrict__ pos_,
           int T, int Hq, int Hkv, float scale_log2) {
    const int* pos = DOC ? pos_ : nullptr;  // without documents every doc_start folds to 0
    constexpr int MT = BM / (16 * NW), LD = D + PAD, NT = BN / 8, DT = D / 8, KD = D / 16, NTH = NW * 32;
    static_assert(BM == 16 * NW * MT && BN % 16 == 0, "tile shape");
    constexpr bool QREG = MT == 1;  // one slab per warp: keep its q fragments in registers
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
    bf16* sK = sQ + BM * LD;
    bf16* sV = sK + 2 * BN * LD;

    const int h = blockIdx.x % Hq, b = blockIdx.x / Hq;
    const int qt = gridDim.y - 1 - blockIdx.y, q0 = qt * BM;  // longest tiles first
    const int kvh = h / (Hq / Hkv);
    const size_t stride = (size_t)(Hq + 2 * Hkv) * D;
    const bf16* gq = qkv + (size_t)b * T * stride + (size_t)h * D;
    const bf16* gk = qkv + (size_t)b * T * stride + (size_t)(Hq + kvh) * D;
    const bf16* gv = gk + (size_t)Hkv * D;
    const int nkv = (min(T, q0 + BM) + BN - 1) / BN;
    const int j0 = doc_start(pos, b, T, q0) / BN;  // the first kv tile any row of the tile sees

    load_tile<BM, D, NTH>(sQ, gq + (size_t)q0 * stride, stride, T - q0);
    load_tile<BN, D, NTH>(sK + (j0 & 1) * BN * LD, gk + (size_t)j0 * BN * stride, stride, T - j0 * BN);
    load_tile<BN, D, NTH>(sV + (j0 & 1) * BN * LD, gv + (size_t)j0 * BN * stride, stride, T - j0 * BN);
    cp_async_commit();

    const Lanes ln;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, qd = lane & 3;
    const int wr0 = warp * 16 * MT;  // the warp's first row in the tile
    // document starts: of the thread's rows, and the earliest and latest of the warp's rows
    int ds[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) ds[mt][hf] = doc_start(pos, b, T, q0 + wr0 + mt * 16 + g + 8 * hf);
    const int wds_lo = doc_start(pos, b, T, q0 + wr0), wds_hi = doc_start(pos, b, T, q0 + wr0 + 16 * MT - 1);

    float o[MT][DT][4], mrow[MT][2], lsum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        zero(o[mt]);
        mrow[mt][0] = mrow[mt][1] = -INFINITY;
        lsum[mt][0] = lsum[mt][1] = 0.f;
    }
    uint32_t qf[QREG ? KD : 1][4];

    for (int j = j0; j < nkv; j++) {
        prefetch_next_kv<BN, D, NTH>(sK, sV, gk, gv, stride, T, j, nkv);
        __syncthreads();
        if constexpr (QREG) {
            if (j == j0) {
#pragma unroll
                for (int kk = 0; kk < KD; kk++) ldsm_x4(qf[kk], sQ + (wr0 + ln.arow) * LD + kk * 16 + ln.acol);
            }
        }
        const bf16* cK = sK + (j & 1) * BN * LD;
        const bf16* cV = sV + (j & 1) * BN * LD;
        const int k0 = j * BN;
        // else every entry of the warp's rows is masked (after the diagonal, or before the documents)
        if (k0 <= q0 + wr0 + 16 * MT - 1 && k0 + BN - 1 >= wds_lo) {
            float s[MT][NT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) zero(s[mt]);
            // S = Q K^T
#pragma unroll
            for (int kk = 0; kk < KD; kk++) {
                uint32_t bf[NT][2];
#pragma unroll
                for (int nt = 0; nt < NT; nt += 2) {
                    uint32_t r[4];
                    ldsm_x4(r, cK + (nt * 8 + ln.brow) * LD + kk * 16 + ln.bcol);
                    bf[nt][0] = r[0];
                    bf[nt][1] = r[1];
                    bf[nt + 1][0] = r[2];
                    bf[nt + 1][1] = r[3];
                }
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    uint32_t a[4];
                    if constexpr (QREG) {
                        a[0] = qf[kk][0]; a[1] = qf[kk][1]; a[2] = qf[kk][2]; a[3] = qf[kk][3];
                    } else {
                        ldsm_x4(a, sQ + (wr0 + mt * 16 + ln.arow) * LD + kk * 16 + ln.acol);
                    }
#pragma unroll
                    for (int nt = 0; nt < NT; nt++) mma_bf16(s[mt][nt], a, bf[nt][0], bf[nt][1]);
                }
            }
            // the mask (after the diagonal, or before the row's document) in a pass of its own, run only where the
            // diagonal or a document start crosses the tile: tested per score it costs as much as the softmax
            if (k0 + BN - 1 > q0 + wr0 || k0 < wds_hi) {
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int nt = 0; nt < NT; nt++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int row = q0 + wr0 + mt * 16 + g + 8 * (e >> 1), col = k0 + nt * 8 + 2 * qd + (e & 1);
                            if (col > row || col < ds[mt][e >> 1]) s[mt][nt][e] = -INFINITY;
                        }
            }
            // online softmax (log2 domain)
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    float mx = -INFINITY;
#pragma unroll
                    for (int nt = 0; nt < NT; nt++)
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            const float v = s[mt][nt][2 * hf + e] * scale_log2;
                            s[mt][nt][2 * hf + e] = v;
                            mx = fmaxf(mx, v);
                        }
                    mx = quad_max(mx);
                    const float mnew = fmaxf(mrow[mt][hf], mx);
                    const float muse = mnew == -INFINITY ? 0.f : mnew;  // a row that saw no key yet stays at 0
                    const float alpha = fast_exp2(mrow[mt][hf] - muse);
                    mrow[mt][hf] = mnew;
                    float sum = 0.f;
#pragma unroll
                    for (int nt = 0; nt < NT; nt++)
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            const float p = fast_exp2(s[mt][nt][2 * hf + e] - muse);
                            s[mt][nt][2 * hf + e] = p;
                            sum += p;
                        }
                    lsum[mt][hf] = lsum[mt][hf] * alpha + sum;
#pragma unroll
                    for (int dt = 0; dt < DT; dt++) {
                        o[mt][dt][2 * hf] *= alpha;
                        o[mt][dt][2 * hf + 1] *= alpha;
                    }
                }
            }
            // O += P V
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) {
                uint32_t pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) acc_to_a(pa[mt], s[mt], kk);
#pragma unroll
                for (int dt = 0; dt < DT; dt += 2) {
                    uint32_t r[4];
                    ldsm_x4_t(r, cV + (kk * 16 + ln.trow) * LD + dt * 8 + ln.tcol);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma_bf16(o[mt][dt], pa[mt], r[0], r[1]);
                        mma_bf16(o[mt][dt + 1], pa[mt], r[2], r[3]);
                    }
                }
            }
        }
        __syncthreads();
    }

    // O / l as bf16 into sQ (free after the loop's last barrier), lse, then coalesced stores
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const float l = quad_sum(lsum[mt][hf]), inv = 1.f / l;
            const int r = wr0 + mt * 16 + g + 8 * hf;
#pragma unroll
            for (int dt = 0; dt < DT; dt++)
                *reinterpret_cast<uint32_t*>(sQ + r * LD + dt * 8 + 2 * qd) =
                    pack_bf16(o[mt][dt][2 * hf] * inv, o[mt][dt][2 * hf + 1] * inv);
            if (qd == 0 && q0 + r < T) lse[((size_t)b * Hq + h) * T + q0 + r] = (mrow[mt][hf] + log2f(l)) * LN2;
        }
    __syncthreads();
    store_tile<BM, D, NTH>(out + ((size_t)b * T + q0) * Hq * D + (size_t)h * D, (size_t)Hq * D, sQ, T - q0);
}

template <int D, int BM, int BN, int NW>
inline void launch_fwd(bf16* out, float* lse, const bf16* qkv, const AttnShape& sh, const int* pos, cudaStream_t s) {
    const size_t smem = (size_t)(BM + 4 * BN) * (D + PAD) * sizeof(bf16);
    auto kernel = pos ? fwd_kernel<D, BM, BN, NW, true> : fwd_kernel<D, BM, BN, NW, false>;
    set_max_smem(kernel, smem);
    dim3 grid(sh.B * sh.Hq, (sh.T + BM - 1) / BM);
    kernel<<<grid, NW * 32, smem, s>>>(out, lse, qkv, pos, sh.T, sh.Hq, sh.Hkv, LOG2E / sqrtf((float)D));
    cudaCheckLast();
}

// ----------------------------------------------------------------------------------------------
// backward

// Delta[b, h, t] = sum_d dout * out (one warp per row and head)
template <int D>
__global__ void bwd_delta_kernel(float* __restrict__ delta, const bf16* __restrict__ dout, const bf16* __restrict__ out,
                                 int BT, int T, int Hq) {
    const int idx = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (idx >= BT * Hq) return;
    const int bt = idx / Hq, h = idx - bt * Hq;
    const bf16* a = dout + (size_t)bt * Hq * D + (size_t)h * D;
    const bf16* o = out + (size_t)bt * Hq * D + (size_t)h * D;
    float acc = 0.f;
#pragma unroll
    for (int i = lane * 2; i < D; i += 64) {
        const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(a + i));
        const float2 y = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(o + i));
        acc += x.x * y.x + x.y * y.y;
    }
    acc = warp_sum(acc);
    if (lane == 0) {
        const int b = bt / T, t = bt - b * T;
        delta[((size_t)b * Hq + h) * T + t] = acc;
    }
}

// dK, dV: one block per (kv tile of BN = 16 NW rows, kv head, b); warp w owns kv rows [16w, 16w + 16).
// Loops over the query heads of the group and the query tiles (BMQ rows) from the diagonal on, in that
// fixed order, with transposed scores so P^T and dS^T stay in registers as A operands:
//   S^T = K Q^T, P^T = exp2(S^T scale log2e - lse log2e), dV += P^T dO, dP^T = V dO^T,
//   dS^T = P^T (dP^T - Delta), dK += dS^T Q.
template <int D, int BMQ, int NW, bool DOC>
__global__ void __launch_bounds__(NW * 32)
bwd_dkdv_kernel(bf16* __restrict__ dqkv, const bf16* __restrict__ qkv, const bf16* __restrict__ dout,
                const float* __restrict__ lse, const float* __restrict__ delta, const int* __restrict__ pos_, int T,
                int Hq, int Hkv, float scale_log2, float scale) {
    const int* pos = DOC ? pos_ : nullptr;
    constexpr int BN = 16 * NW, LD = D + PAD, NQ = BMQ / 8, DT = D / 8, KD = D / 16, NTH = NW * 32;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sK = reinterpret_cast<bf16*>(smem_raw);
    bf16* sV = sK + BN * LD;
    bf16* sQ = sV + BN * LD;        // 2 stages
    bf16* sdO = sQ + 2 * BMQ * LD;  // 2 stages
    float* sL = reinterpret_cast<float*>(sdO + 2 * BMQ * LD);  // 2 stages: lse
    float* sD = sL + 2 * BMQ;                                  // 2 stages: Delta
    int* sP = reinterpret_cast<int*>(sD + 2 * BMQ);            // 2 stages: positions (documents only)

    const int kvh = blockIdx.x % Hkv, b = blockIdx.x / Hkv;
    const int kv0 = blockIdx.y * BN;  // low tiles see the most query tiles: launched first
    const int G = Hq / Hkv;
    const size_t stride = (size_t)(Hq + 2 * Hkv) * D, dstride = (size_t)Hq * D;
    const bf16* gk = qkv + (size_t)b * T * stride + (size_t)(Hq + kvh) * D;
    const bf16* gv = gk + (size_t)Hkv * D;
    // the query tiles from the diagonal up to the last one with a row in the documents of the kv rows
    const int qt0 = kv0 / BMQ, q_end = first_row_after(pos, b, T, kv0, kv0 + BN - 1);
    const int nqi = (q_end - qt0 * BMQ + BMQ - 1) / BMQ, total = G * nqi;

    // q tile, dO tile, lse, Delta (and positions) of iteration `it` into stage st, all with cp.async. Padded
    // query rows (q >= T) read zeros: q = dO = 0 there, so P = 1 but dP = Delta = 0 and they add nothing.
    auto issue = [&](int it, int st) {
        const int h = kvh * G + it / nqi, q0 = (qt0 + it % nqi) * BMQ;
        load_tile<BMQ, D, NTH>(sQ + st * BMQ * LD, qkv + ((size_t)b * T + q0) * stride + (size_t)h * D, stride, T - q0);
        load_tile<BMQ, D, NTH>(sdO + st * BMQ * LD, dout + ((size_t)b * T + q0) * dstride + (size_t)h * D, dstride,
                               T - q0);
        const size_t base = ((size_t)b * Hq + h) * T;
        for (int i = threadIdx.x; i < BMQ; i += NTH) {
            const bool ok = q0 + i < T;
            cp_async4(sL + st * BMQ + i, lse + base + (ok ? q0 + i : 0), ok);
            cp_async4(sD + st * BMQ + i, delta + base + (ok ? q0 + i : 0), ok);
            if (pos)
                cp_async4(reinterpret_cast<float*>(sP + st * BMQ + i),
                          reinterpret_cast<const float*>(pos + (size_t)b * T + (ok ? q0 + i : 0)), ok);
        }
    };
    load_tile<BN, D, NTH>(sK, gk + (size_t)kv0 * stride, stride, T - kv0);
    load_tile<BN, D, NTH>(sV, gv + (size_t)kv0 * stride, stride, T - kv0);
    issue(0, 0);
    cp_async_commit();

    const Lanes ln;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, qd = lane & 3;
    const int kr = kv0 + warp * 16;  // the warp's first kv row
    const bf16* wK = sK + warp * 16 * LD;
    const bf16* wV = sV + warp * 16 * LD;

    float dk[DT][4], dv[DT][4];
    zero(dk);
    zero(dv);

    for (int it = 0; it < total; it++) {
        const int st = it & 1;
        if (it + 1 < total) {
            issue(it + 1, st ^ 1);
            cp_async_commit();
            cp_async_wait_group<1>();
        } else {
            cp_async_wait_group<0>();
        }
        __syncthreads();
        const int q0 = (qt0 + it % nqi) * BMQ;
        const bf16* cQ = sQ + st * BMQ * LD;
        const bf16* cdO = sdO + st * BMQ * LD;
        const float* cL = sL + st * BMQ;
        const float* cD = sD + st * BMQ;
        const int* cP = sP + st * BMQ;
        if (q0 + BMQ - 1 >= kr) {  // else every query of the tile precedes the warp's kv rows
            float s[NQ][4];
            zero(s);
            mma_abt<NQ, KD>(s, wK, LD, cQ, LD, ln);  // S^T (kv x q)
            // the mask (after the query, or before its document's start) as -inf scores, in a pass run only where the
            // diagonal crosses the tile or with documents (exp2 of -inf is 0)
            if (q0 < kr + 15 || pos) {
#pragma unroll
                for (int nt = 0; nt < NQ; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int qi = nt * 8 + 2 * qd + (e & 1), kvrow = kr + g + 8 * (e >> 1);
                        if (q0 + qi < kvrow || (pos && kvrow < q0 + qi - cP[qi])) s[nt][e] = -INFINITY;
                    }
            }
            uint32_t pa[NQ / 2][4];
#pragma unroll
            for (int nt = 0; nt < NQ; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qi = nt * 8 + 2 * qd + (e & 1);
                    s[nt][e] = fast_exp2(s[nt][e] * scale_log2 - cL[qi] * LOG2E);
                }
            acc_to_a(pa, s);
            mma_rb<DT, NQ / 2, true>(dv, pa, cdO, LD, ln);  // dV += P^T dO
            float dp[NQ][4];
            zero(dp);
            mma_abt<NQ, KD>(dp, wV, LD, cdO, LD, ln);  // dP^T = V dO^T
#pragma unroll
            for (int nt = 0; nt < NQ; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qi = nt * 8 + 2 * qd + (e & 1);
                    dp[nt][e] = s[nt][e] * (dp[nt][e] - cD[qi]);
                }
            acc_to_a(pa, dp);
            mma_rb<DT, NQ / 2, true>(dk, pa, cQ, LD, ln);  // dK += dS^T Q
        }
        __syncthreads();
    }

    // dK * scale into sK, dV into sV (free after the last barrier), then coalesced stores
    store_acc(sK, LD, warp * 16, dk, scale, scale);
    store_acc(sV, LD, warp * 16, dv);
    __syncthreads();
    bf16* gdk = dqkv + ((size_t)b * T + kv0) * stride + (size_t)(Hq + kvh) * D;
    store_tile<BN, D, NTH>(gdk, stride, sK, T - kv0);
    store_tile<BN, D, NTH>(gdk + (size_t)Hkv * D, stride, sV, T - kv0);
}

// dQ: one block per (query tile of BMQ = 16 NW rows, query head, b); warp w owns query rows [16w, 16w + 16).
// Loops over the kv tiles (BN rows) up to the diagonal:
//   S = Q K^T, P = exp2(S scale log2e - lse log2e), dP = dO V^T, dS = P (dP - Delta), dQ += dS K.
// AREG: the warp's q and dO fragments stay in registers (else read from smem for every kv tile).
template <int D, int BN, int NW, bool AREG, bool DOC>
__global__ void __launch_bounds__(NW * 32)
bwd_dq_kernel(bf16* __restrict__ dqkv, const bf16* __restrict__ qkv, const bf16* __restrict__ dout,
              const float* __restrict__ lse, const float* __restrict__ delta, const int* __restrict__ pos_, int T,
              int Hq, int Hkv, float scale_log2, float scale) {
    const int* pos = DOC ? pos_ : nullptr;
    constexpr int BMQ = 16 * NW, LD = D + PAD, NT = BN / 8, DT = D / 8, KD = D / 16, NTH = NW * 32;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
    bf16* sdO = sQ + BMQ * LD;
    bf16* sK = sdO + BMQ * LD;  // 2 stages
    bf16* sV = sK + 2 * BN * LD;  // 2 stages

    const int h = blockIdx.x % Hq, b = blockIdx.x / Hq;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BMQ;  // longest tiles first
    const int kvh = h / (Hq / Hkv);
    const size_t stride = (size_t)(Hq + 2 * Hkv) * D, dstride = (size_t)Hq * D;
    const bf16* gk = qkv + (size_t)b * T * stride + (size_t)(Hq + kvh) * D;
    const bf16* gv = gk + (size_t)Hkv * D;
    const int nkv = (min(T, q0 + BMQ) + BN - 1) / BN;
    const int j0 = doc_start(pos, b, T, q0) / BN;  // the first kv tile any row of the tile sees

    load_tile<BMQ, D, NTH>(sQ, qkv + ((size_t)b * T + q0) * stride + (size_t)h * D, stride, T - q0);
    load_tile<BMQ, D, NTH>(sdO, dout + ((size_t)b * T + q0) * dstride + (size_t)h * D, dstride, T - q0);
    load_tile<BN, D, NTH>(sK + (j0 & 1) * BN * LD, gk + (size_t)j0 * BN * stride, stride, T - j0 * BN);
    load_tile<BN, D, NTH>(sV + (j0 & 1) * BN * LD, gv + (size_t)j0 * BN * stride, stride, T - j0 * BN);
    cp_async_commit();

    const Lanes ln;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, qd = lane & 3;
    const int qr = q0 + warp * 16;  // the warp's first query row
    float l2[2], dl[2];
    int ds[2];  // document starts of the thread's rows
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int q = qr + g + 8 * hf;
        const size_t i = ((size_t)b * Hq + h) * T + q;
        l2[hf] = q < T ? lse[i] * LOG2E : INFINITY;
        dl[hf] = q < T ? delta[i] : 0.f;
        ds[hf] = doc_start(pos, b, T, q);
    }
    const int wds_lo = doc_start(pos, b, T, qr), wds_hi = doc_start(pos, b, T, qr + 15);
    const bf16* wQ = sQ + warp * 16 * LD;
    const bf16* wdO = sdO + warp * 16 * LD;
    uint32_t qf[AREG ? KD : 1][4], of[AREG ? KD : 1][4];

    float dq[DT][4];
    zero(dq);

    for (int j = j0; j < nkv; j++) {
        prefetch_next_kv<BN, D, NTH>(sK, sV, gk, gv, stride, T, j, nkv);
        __syncthreads();
        if constexpr (AREG) {
            if (j == j0) {
#pragma unroll
                for (int kk = 0; kk < KD; kk++) {
                    ldsm_x4(qf[kk], wQ + ln.arow * LD + kk * 16 + ln.acol);
                    ldsm_x4(of[kk], wdO + ln.arow * LD + kk * 16 + ln.acol);
                }
            }
        }
        const bf16* cK = sK + (j & 1) * BN * LD;
        const bf16* cV = sV + (j & 1) * BN * LD;
        const int k0 = j * BN;
        if (k0 <= qr + 15 && k0 + BN - 1 >= wds_lo) {  // else all masked for the warp's rows
            float s[NT][4], dp[NT][4];
            zero(s);
            zero(dp);
            if constexpr (AREG) {
                mma_rb<NT, KD, false>(s, qf, cK, LD, ln);   // S = Q K^T
                mma_rb<NT, KD, false>(dp, of, cV, LD, ln);  // dP = dO V^T
            } else {
                mma_abt<NT, KD>(s, wQ, LD, cK, LD, ln);
                mma_abt<NT, KD>(dp, wdO, LD, cV, LD, ln);
            }
            if (k0 + BN - 1 > qr || k0 < wds_hi) {  // the mask as -inf scores, only where it cuts the tile
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int col = k0 + nt * 8 + 2 * qd + (e & 1), row = qr + g + 8 * (e >> 1);
                        if (col > row || col < ds[e >> 1]) s[nt][e] = -INFINITY;
                    }
            }
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int hf = e >> 1;
                    s[nt][e] = fast_exp2(s[nt][e] * scale_log2 - l2[hf]) * (dp[nt][e] - dl[hf]);
                }
            uint32_t da[BN / 16][4];
            acc_to_a(da, s);
            mma_rb<DT, BN / 16, true>(dq, da, cK, LD, ln);  // dQ += dS K
        }
        __syncthreads();
    }

    store_acc(sQ, LD, warp * 16, dq, scale, scale);
    __syncthreads();
    store_tile<BMQ, D, NTH>(dqkv + ((size_t)b * T + q0) * stride + (size_t)h * D, stride, sQ, T - q0);
}

template <int D, int BMQ, int NW>
inline void launch_dkdv(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta,
                        const AttnShape& sh, const int* pos, cudaStream_t s) {
    constexpr int BN = 16 * NW;
    const size_t smem = (size_t)(2 * BN + 4 * BMQ) * (D + PAD) * sizeof(bf16) + 6 * BMQ * sizeof(float);
    auto kernel = pos ? bwd_dkdv_kernel<D, BMQ, NW, true> : bwd_dkdv_kernel<D, BMQ, NW, false>;
    set_max_smem(kernel, smem);
    dim3 grid(sh.B * sh.Hkv, (sh.T + BN - 1) / BN);
    const float scale = 1.f / sqrtf((float)D);
    kernel<<<grid, NW * 32, smem, s>>>(dqkv, qkv, dout, lse, delta, pos, sh.T, sh.Hq, sh.Hkv, scale * LOG2E, scale);
    cudaCheckLast();
}

template <int D, int BN, int NW, bool AREG>
inline void launch_dq(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta,
                      const AttnShape& sh, const int* pos, cudaStream_t s) {
    constexpr int BMQ = 16 * NW;
    const size_t smem = (size_t)(2 * BMQ + 4 * BN) * (D + PAD) * sizeof(bf16);
    auto kernel = pos ? bwd_dq_kernel<D, BN, NW, AREG, true> : bwd_dq_kernel<D, BN, NW, AREG, false>;
    set_max_smem(kernel, smem);
    dim3 grid(sh.B * sh.Hq, (sh.T + BMQ - 1) / BMQ);
    const float scale = 1.f / sqrtf((float)D);
    kernel<<<grid, NW * 32, smem, s>>>(dqkv, qkv, dout, lse, delta, pos, sh.T, sh.Hq, sh.Hkv, scale * LOG2E, scale);
    cudaCheckLast();
}

template <int D>
inline void launch_delta(float* delta, const bf16* dout, const bf16* out, const AttnShape& sh, cudaStream_t s) {
    const int rows = sh.B * sh.T * sh.Hq;
    bwd_delta_kernel<D><<<(rows + 7) / 8, 256, 0, s>>>(delta, dout, out, sh.B * sh.T, sh.T, sh.Hq);
    cudaCheckLast();
}

inline void check_shape(const AttnShape& sh) {
    if (sh.Dh != 64 && sh.Dh != 128) THROW("attention: head dim %d not supported (64 or 128)", sh.Dh);
    if (sh.B < 1 || sh.T < 1 || sh.Hq < 1 || sh.Hkv < 1 || sh.Hq % sh.Hkv != 0)
        THROW("attention: bad shape B=%d T=%d Hq=%d Hkv=%d (Hq must be a multiple of Hkv)", sh.B, sh.T, sh.Hq, sh.Hkv);
}

// tile configurations (D, ...): the launchers below use these
template <int D> struct Cfg;
template <> struct Cfg<64> {
    static constexpr int FWD_BM = 128, FWD_BN = 64, FWD_NW = 4;
    static constexpr int DKDV_BMQ = 64, DKDV_NW = 4, DQ_BN = 64, DQ_NW = 4;
    static constexpr bool DQ_AREG = true;
};
template <> struct Cfg<128> {
    static constexpr int FWD_BM = 128, FWD_BN = 64, FWD_NW = 4;
    static constexpr int DKDV_BMQ = 64, DKDV_NW = 4, DQ_BN = 64, DQ_NW = 4;
    static constexpr bool DQ_AREG = true;
};

template <int D>
inline void sm80_forward(bf16* out, float* lse, const bf16* qkv, const AttnShape& sh, const int* pos, cudaStream_t s) {
    using C = Cfg<D>;
    launch_fwd<D, C::FWD_BM, C::FWD_BN, C::FWD_NW>(out, lse, qkv, sh, pos, s);
}
template <int D>
inline void sm80_backward(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out,
                          const float* lse, const AttnShape& sh, const int* pos, cudaStream_t s) {
    using C = Cfg<D>;
    launch_delta<D>(delta, dout, out, sh, s);
    launch_dkdv<D, C::DKDV_BMQ, C::DKDV_NW>(dqkv, dout, qkv, lse, delta, sh, pos, s);
    launch_dq<D, C::DQ_BN, C::DQ_NW, C::DQ_AREG>(dqkv, dout, qkv, lse, delta, sh, pos, s);
}

// the mma.sync path for any head dim (scratch as attention_backward's)
inline void sm80_forward(bf16* out, float* lse, const bf16* qkv, const AttnShape& sh, const int* pos, cudaStream_t s) {
    if (sh.Dh == 64) sm80_forward<64>(out, lse, qkv, sh, pos, s);
    else sm80_forward<128>(out, lse, qkv, sh, pos, s);
}
inline void sm80_backward(bf16* dqkv, void* scratch, const bf16* dout, const bf16* qkv, const bf16* out,
                          const float* lse, const AttnShape& sh, const int* pos, cudaStream_t s) {
    float* delta = static_cast<float*>(scratch);
    if (sh.Dh == 64) sm80_backward<64>(dqkv, delta, dout, qkv, out, lse, sh, pos, s);
    else sm80_backward<128>(dqkv, delta, dout, qkv, out, lse, sh, pos, s);
}

// ----------------------------------------------------------------------------------------------
// RoPE (rotate-half): pairs (i, i + Dh/2) of every q and k head rotated by p * theta^(-2i/Dh), p = pos[bt]
// (t without positions); INV rotates by the negative angle (the backward of a rotation is its transpose)

template <bool INV>
__global__ void rope_kernel(bf16* x, const int* __restrict__ positions, int BT, int T, int H /* q + k heads */, int Dh,
                            size_t stride, float log2_theta) {
    const int half = Dh / 2;
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)BT * H * half) return;
    const int i = (int)(idx % half);
    const size_t rest = idx / half;
    const int hh = (int)(rest % H);
    const size_t bt = rest / H;
    const int pos = positions ? positions[bt] : (int)(bt % T);
    const float inv_freq = exp2f(-(2.f * i / Dh) * log2_theta);
    float sn, cs;
    sincosf((float)pos * inv_freq, &sn, &cs);
    if (INV) sn = -sn;
    bf16* p = x + bt * stride + (size_t)hh * Dh + i;
    const float x1 = __bfloat162float(p[0]), x2 = __bfloat162float(p[half]);
    p[0] = __float2bfloat16(x1 * cs - x2 * sn);
    p[half] = __float2bfloat16(x2 * cs + x1 * sn);
}

template <bool INV>
inline void launch_rope(bf16* x, const AttnShape& sh, float theta, const int* pos, cudaStream_t s) {
    check_shape(sh);
    const size_t n = (size_t)sh.B * sh.T * (sh.Hq + sh.Hkv) * (sh.Dh / 2);
    const size_t stride = (size_t)(sh.Hq + 2 * sh.Hkv) * sh.Dh;
    rope_kernel<INV><<<(unsigned)((n + 255) / 256), 256, 0, s>>>(x, pos, sh.B * sh.T, sh.T, sh.Hq + sh.Hkv, sh.Dh,
                                                                 stride, log2f(theta));
    cudaCheckLast();
}

}  // namespace attn

#ifdef SM90A
#include "attention_sm90.cuh"
#endif

// ----------------------------------------------------------------------------------------------
// public interface. pos (B*T, or nullptr for plain causal attention): each token's position in its
// document, 0 at a document start (see the header)


// out (B*T, Hq*Dh) bf16; lse (B, Hq, T) fp32 logsumexp of the scaled scores, kept for the backward
inline void attention_forward(bf16* out, float* lse, const bf16* qkv, const AttnShape& sh, const int* pos,
                              cudaStream_t s) {
    attn::check_shape(sh);
#ifdef SM90A
    attn::sm90::forward(out, lse, qkv, sh, pos, s);
#else
    attn::sm80_forward(out, lse, qkv, sh, pos, s);
#endif
}

// dqkv (same layout as qkv) written; dout (B*T, Hq*Dh)
inline void attention_backward(bf16* dqkv, void* scratch, const bf16* dout, const bf16* qkv, const bf16* out,
                               const float* lse, const AttnShape& sh, const int* pos, cudaStream_t s) {
    attn::check_shape(sh);
#ifdef SM90A
    attn::sm90::backward(dqkv, scratch, dout, qkv, out, lse, sh, pos, s);
#else
    attn::sm80_backward(dqkv, scratch, dout, qkv, out, lse, sh, pos, s);
#endif
}

// RoPE on the q and k parts of qkv, in place (rotate-half / GPT-NeoX: pairs (i, i + Dh/2),
// angle p * theta^(-2i/Dh), p = pos[t], or t within the sequence without positions)
inline void rope_forward(bf16* qkv, const AttnShape& sh, float theta, const int* pos, cudaStream_t s) {
    attn::launch_rope<false>(qkv, sh, theta, pos, s);
}
// rotates dq, dk of dqkv back in place
inline void rope_backward(bf16* dqkv, const AttnShape& sh, float theta, const int* pos, cudaStream_t s) {
    attn::launch_rope<true>(dqkv, sh, theta, pos, s);
}
