// Causal GQA flash attention on Hopper (sm_90a): the algorithm of attention.cuh's header, on wgmma and TMA,
// after FlashAttention-3 (Shah et al. 2024). Built when the target is sm_90a; attention.cuh picks it.
//
// Forward. A persistent kernel: one block per SM walks a static list of (query tile, query head, batch) work
// tiles, longest (last query tiles) first, dealt to the blocks in a snake order so that their sums even out;
// the query heads of one kv head are neighbours in the list, so their K/V tiles are read from L2 while the
// other heads' blocks still need them. A block is one producer warpgroup and NWG consumer warpgroups:
//   producer (one thread, 24 registers): per tile the Q tile (BM = 64 NWG rows) into one of QBUF buffers,
//     then the K and V tiles (BN rows) from the diagonal down to the first tile of the document, into a ring
//     of STAGES buffers; every load is a TMA box that completes on an mbarrier ("full"), and a buffer is
//     refilled only after every consumer warp arrived on its "empty" barrier. With two Q buffers the next
//     tile's Q and first K/V tiles load while the consumers finish the current tile (with one, the ring
//     drains at every tile boundary: the producer waits for the tile's last QK^T before loading its Q).
//   consumers (240 registers with 2 warpgroups, 160 with 3): warpgroup w owns query rows [64w, 64w + 64) of
//     the tile.
//     Per kv tile: S = Q K^T (wgmma, both from smem), online softmax in registers (fp32, exp2), O += P V
//     (wgmma, P from registers). The matmuls of kv tile j + 1 overlap the softmax of tile j: the loop issues
//     S_{j+1} = Q K_{j+1}^T and O += P_j V_j, waits for S_{j+1} only, runs its softmax while the PV matmul
//     still runs, then rescales O. With PINGPONG the warpgroups take turns issuing matmuls (named barriers),
//     so one warpgroup's softmax runs while the other's matmuls use the tensor cores.
//   The epilogue writes O / l as bf16 into the warpgroup's own smem tile and stores it with TMA (rows past T
//   are clipped by the tensor map), and lse straight from registers.
// Masks: query i sees key j if ds(i) <= j <= i, with ds(i) = i - pos[i] the start of its document (0 without
// positions). Tiles are masked only where the causal diagonal or a document start crosses them; kv tiles
// wholly before the tile's first document start are never loaded.
//
// Included by attention.cuh (after AttnShape) when the build targets sm_90a.
#pragma once
#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>
#include "cuda_common.cuh"
#include "hopper.cuh"
#include "tensor_core.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "attention_sm90.cuh needs sm_90a (make GPU_ARCH=90)"
#endif

namespace attn::sm90 {  // attn's helpers (fast_exp2, quad_max, doc_start, ...) are in scope

using namespace hopper;

// registers per thread: a block of NWG + 1 warpgroups starts with 64K / its threads each (in multiples of 8,
// what ptxas allocates under the launch bounds); setmaxnreg moves them from the producer warpgroup, which
// keeps 24, to the consumers, within the block's own allocation (a request beyond it would wait forever)
constexpr int REG_PRODUCER = 24;
constexpr int reg_consumer(int nwg) {
    const int start = 65536 / (128 * (nwg + 1)) / 8 * 8;
    return std::min(240, (start * (nwg + 1) - REG_PRODUCER) / nwg / 8 * 8);
}
static_assert(reg_consumer(2) == 240 && reg_consumer(3) == 160, "register split");

// the forward's running max moves by more than this (log2 units) or not at all
constexpr float RESCALE_LOG2 = 8.f;

// the forward's k-th work tile of this block: the list dealt to the blocks in a snake order
__device__ inline int snake_tile(int k) {
    const int G = gridDim.x;
    return k * G + ((k & 1) ? G - 1 - (int)blockIdx.x : (int)blockIdx.x);
}

// ----------------------------------------------------------------------------------------------------------
// forward

struct FwdParams {
    CUtensorMap q;   // qkv, boxes of BM rows
    CUtensorMap kv;  // qkv, boxes of BN rows
    CUtensorMap o;   // out, boxes of 64 rows
    float* lse;
    const int* pos;
    int B, T, Hq, Hkv;
    float scale_log2;
};

template <int D, int NWG, int BN, int STAGES, int QBUF>
struct FwdCfg {
    static constexpr int BM = 64 * NWG, THREADS = 128 * (NWG + 1);
    static constexpr int NCB = D / 64;  // 128-byte column blocks of a head row
    static constexpr int Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2, O_BYTES = 64 * D * 2;
    static constexpr int OFF_K = QBUF * Q_BYTES, OFF_V = OFF_K + STAGES * KV_BYTES, OFF_O = OFF_V + STAGES * KV_BYTES;
    static constexpr int OFF_BAR = OFF_O + NWG * O_BYTES;
    static constexpr int NBAR = 2 * QBUF + 4 * STAGES;
    static constexpr int SMEM = OFF_BAR + NBAR * 8 + 1024;  // + room to align the base to 1024
    static_assert(D % 64 == 0 && BN % 64 == 0 && (BN == 64 || BN == 128) && (D == 64 || D == 128), "tile shape");
    static_assert(QBUF == 1 || QBUF == 2, "Q buffers");
    static_assert(Q_BYTES % 1024 == 0 && KV_BYTES % 1024 == 0 && O_BYTES % 1024 == 0, "1024-aligned tiles");
    static_assert(SMEM <= 227 * 1024, "shared memory");
};

// named barriers: 1 + w the turn of consumer warpgroup w (PINGPONG), 1 + NWG + w its epilogue
constexpr int BAR_TURN = 1;

template <int D, int NWG, int BN, int STAGES, bool PINGPONG, int QBUF>
__global__ void __launch_bounds__(128 * (NWG + 1), 1) fwd_kernel(const __grid_constant__ FwdParams p) {
    using C = FwdCfg<D, NWG, BN, STAGES, QBUF>;
    constexpr int BM = C::BM;
    constexpr int BAR_EPI = BAR_TURN + NWG;
    extern __shared__ unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    const uint32_t sQ = smem_u32(smem), sK = sQ + C::OFF_K, sV = sQ + C::OFF_V;
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + C::OFF_BAR);
    uint64_t* q_full = bars;  // per Q buffer
    uint64_t* q_empty = bars + QBUF;
    uint64_t* k_full = bars + 2 * QBUF;
    uint64_t* k_empty = k_full + STAGES;
    uint64_t* v_full = k_empty + STAGES;
    uint64_t* v_empty = v_full + STAGES;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (threadIdx.x == 0) {
        for (int qb = 0; qb < QBUF; qb++) {
            mbar_init(&q_full[qb], 1);
            mbar_init(&q_empty[qb], 4 * NWG);  // one arrival per consumer warp
        }
        for (int s = 0; s < STAGES; s++) {
            mbar_init(&k_full[s], 1);
            mbar_init(&k_empty[s], 4 * NWG);
            mbar_init(&v_full[s], 1);
            mbar_init(&v_empty[s], 4 * NWG);
        }
        fence_mbar_init();
    }
    __syncthreads();

    const int T = p.T, Hq = p.Hq, G = Hq / p.Hkv;
    const int nqt = (T + BM - 1) / BM, ntiles = nqt * p.B * Hq;
    // tile idx: query tile (last first), batch, query head (the heads of a kv head adjacent)
    auto decode = [&](int idx, int& b, int& h, int& q0, int& j_lo, int& j_hi) {
        const int bh = idx % (p.B * Hq);
        b = bh / Hq;
        h = bh % Hq;
        q0 = (nqt - 1 - idx / (p.B * Hq)) * BM;
        j_hi = (min(q0 + BM, T) - 1) / BN;
        j_lo = doc_start(p.pos, b, T, q0) / BN;
    };

    if (warp < 4) {  // producer warpgroup: one thread issues every load
        reg_dealloc<REG_PRODUCER>();
        if (threadIdx.x == 0) {
            int it = 0;  // kv tiles loaded so far (all tiles): the ring position
            for (int k = 0;; k++) {
                const int idx = snake_tile(k);
                if (idx >= ntiles) break;
                int b, h, q0, j_lo, j_hi;
                decode(idx, b, h, q0, j_lo, j_hi);
                const int kvh = h / G, qb = k % QBUF;
                mbar_wait(&q_empty[qb], ((k / QBUF) & 1) ^ 1);
                mbar_arrive_expect_tx(&q_full[qb], C::Q_BYTES);
#pragma unroll
                for (int cb = 0; cb < C::NCB; cb++)
                    tma_load(smem + qb * C::Q_BYTES + cb * BM * 128, &p.q, &q_full[qb], h * D + cb * 64, q0, b);
                for (int j = j_hi; j >= j_lo; j--, it++) {
                    const int s = it % STAGES;
                    const uint32_t ph = (it / STAGES) & 1;
                    unsigned char* k_dst = smem + C::OFF_K + s * C::KV_BYTES;
                    unsigned char* v_dst = smem + C::OFF_V + s * C::KV_BYTES;
                    mbar_wait(&k_empty[s], ph ^ 1);
                    mbar_arrive_expect_tx(&k_full[s], C::KV_BYTES);
#pragma unroll
                    for (int cb = 0; cb < C::NCB; cb++)
                        tma_load(k_dst + cb * BN * 128, &p.kv, &k_full[s], (Hq + kvh) * D + cb * 64, j * BN, b);
                    mbar_wait(&v_empty[s], ph ^ 1);
                    mbar_arrive_expect_tx(&v_full[s], C::KV_BYTES);
#pragma unroll
                    for (int cb = 0; cb < C::NCB; cb++)
                        tma_load(v_dst + cb * BN * 128, &p.kv, &v_full[s], (Hq + p.Hkv + kvh) * D + cb * 64, j * BN, b);
                }
            }
        }
        return;
    }

    // consumers
    reg_alloc<reg_consumer(NWG)>();
    const int wg = warpgroup_index() - 1, wt = threadIdx.x % 128, ww = wt / 32, g = lane / 4, qd = lane % 4;
    const float sl2 = p.scale_log2;
    unsigned char* sO = smem + C::OFF_O + wg * C::O_BYTES;
    // descriptors: Q rows of this warpgroup (per tile, in its Q buffer) and K are K-major; V is MN-major (column
    // blocks BN * 128 apart)
    const uint64_t dK = desc_sw128(sK, 16), dV = desc_sw128(sV, BN * 128);

    auto turn_begin = [&]() {
        if constexpr (PINGPONG) named_sync(BAR_TURN + wg, 256);
    };
    auto turn_end = [&]() {
        if constexpr (PINGPONG) named_arrive(BAR_TURN + (wg + 1) % NWG, 256);
    };
    if constexpr (PINGPONG) {
        static_assert(!PINGPONG || NWG >= 2, "ping-pong needs two consumer warpgroups");
        if (wg == NWG - 1) named_arrive(BAR_TURN, 256);  // warpgroup 0 goes first
    }

    float s[BN / 2];  // scores, then probabilities, of the current kv tile
    float o[D / 2];
    uint32_t pa[BN / 16][4];  // probabilities as the A operand of P V
    // S = Q K^T from the Q tile of descriptor dQ and K stage st
    auto qk = [&](uint64_t dQ, int st) {
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)  // column block kk / 4, 32 bytes a k-step inside it
            wgmma_ss<0, 0>(s, desc_add(dQ, (kk / 4) * BM * 128 + (kk % 4) * 32),
                           desc_add(dK, st * C::KV_BYTES + (kk / 4) * BN * 128 + (kk % 4) * 32), kk > 0);
    };
    // O += P V from V stage st
    auto pv = [&](int st) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) wgmma_rs<1>(o, pa[kk], desc_add(dV, st * C::KV_BYTES + kk * 16 * 128), 1);
    };

    int it = 0;
    for (int k = 0;; k++) {
        const int idx = snake_tile(k);
        if (idx >= ntiles) break;
        int b, h, q0, j_lo, j_hi;
        decode(idx, b, h, q0, j_lo, j_hi);
        const int w0 = q0 + 64 * wg;           // the warpgroup's first row
        const int r0 = w0 + 16 * ww + g;       // this thread's rows r0, r0 + 8
        const int ds[2] = {doc_start(p.pos, b, T, r0), doc_start(p.pos, b, T, r0 + 8)};
        const int wg_ds = doc_start(p.pos, b, T, w0 + 63);  // the latest document start of the warpgroup's rows

        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
        for (int i = 0; i < D / 2; i++) o[i] = 0.f;

        // masks the scores of kv tile j (if mask: the diagonal or a document start crosses the warpgroup's rows),
        // then the online softmax: s becomes exp2 of the scaled scores minus the running max; alpha rescales
        // the earlier sums. The row's max and sum run in 4 independent chains (with 2-3 consumer warps per
        // scheduler, a single chain of BN / 4 dependent adds would be latency, not throughput). The mask is a
        // compile-time choice taken per tile: tested per score, it was a quarter of the consumers' instructions.
        // The running max moves only when a score passes it by more than 2^RESCALE_LOG2 (after FlashAttention-4):
        // the probabilities stay below 256, which bf16 and the fp32 sums hold, and most tiles leave O as it is.
        auto softmax = [&](int j, float (&alpha)[2], auto mask) {
            const int k0 = j * BN;
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int row = r0 + 8 * hf;
                float mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
                for (int jn = 0; jn < BN / 8; jn++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float& v = s[4 * jn + 2 * hf + e];
                        if constexpr (mask) {
                            const int col = k0 + 8 * jn + 2 * qd + e;
                            if (col > row || col < ds[hf]) v = -INFINITY;
                        }
                        mx[(2 * jn + e) % 4] = fmaxf(mx[(2 * jn + e) % 4], v);
                    }
                const float mt = quad_max(fmaxf(fmaxf(mx[0], mx[1]), fmaxf(mx[2], mx[3])));
                const bool grow = (mt - m[hf]) * sl2 > RESCALE_LOG2;  // false while both are -inf
                const float mnew = grow ? mt : m[hf];
                const float muse = mnew == -INFINITY ? 0.f : mnew * sl2;  // a row with nothing seen yet stays 0
                alpha[hf] = grow ? fast_exp2(m[hf] * sl2 - muse) : 1.f;
                m[hf] = mnew;
                float sum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int jn = 0; jn < BN / 8; jn++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float& v = s[4 * jn + 2 * hf + e];
                        v = fmaf(v, sl2, -muse);
                        v = fast_exp2(v);
                        sum[(2 * jn + e) % 4] += v;
                    }
                l[hf] = l[hf] * alpha[hf] + ((sum[0] + sum[1]) + (sum[2] + sum[3]));
            }
        };
        auto to_pa = [&]() {  // columns 16kk .. 16kk + 15 are the A fragment of k-step kk
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++)
#pragma unroll
                for (int r = 0; r < 4; r++) pa[kk][r] = tc::pack_bf16(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
        };

        const int n = j_hi - j_lo + 1, qb = k % QBUF;
        const uint64_t dQ = desc_sw128(sQ + qb * C::Q_BYTES + wg * 64 * 128, 16);
        mbar_wait(&q_full[qb], (k / QBUF) & 1);
        // the diagonal tile
        {
            const int st = it % STAGES;
            turn_begin();
            mbar_wait(&k_full[st], (it / STAGES) & 1);
            wg_fence();
            qk(dQ, st);
            wg_commit();
            turn_end();
            wg_wait<0>();
            fence_regs(s);
            mbar_arrive_warp(&k_empty[st]);
            if (n == 1) mbar_arrive_warp(&q_empty[qb]);
            float alpha[2];
            softmax(j_hi, alpha, std::true_type{});
            to_pa();
        }
        for (int i = 1; i < n; i++) {
            const int c = it + i, st = c % STAGES, sp = (c - 1) % STAGES;
            turn_begin();
            mbar_wait(&k_full[st], (c / STAGES) & 1);
            mbar_wait(&v_full[sp], ((c - 1) / STAGES) & 1);  // both before the fence: no branch between it and
            fence_regs(o);  // the matmuls; the rescaled O and the new P are computed before it, not sunk past it
            fence_regs(pa);
            wg_fence();
            qk(dQ, st);
            wg_commit();
            pv(sp);
            wg_commit();
            turn_end();
            wg_wait<1>();  // S of this tile; P V of the previous one may still run
            fence_regs(s);
            mbar_arrive_warp(&k_empty[st]);
            if (i == n - 1) mbar_arrive_warp(&q_empty[qb]);  // the tile's last use of Q
            float alpha[2];
            const int k0 = (j_hi - i) * BN;
            if (k0 + BN - 1 > w0 || k0 < wg_ds) softmax(j_hi - i, alpha, std::true_type{});
            else softmax(j_hi - i, alpha, std::false_type{});
            wg_wait<0>();
            fence_regs(o);
            fence_regs(pa);
            mbar_arrive_warp(&v_empty[sp]);
            if (__any_sync(0xFFFFFFFFu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
                for (int jn = 0; jn < D / 8; jn++) {
                    o[4 * jn] *= alpha[0];
                    o[4 * jn + 1] *= alpha[0];
                    o[4 * jn + 2] *= alpha[1];
                    o[4 * jn + 3] *= alpha[1];
                }
            }
            to_pa();
        }
        {  // P V of the last tile
            const int c = it + n - 1, sp = c % STAGES;
            turn_begin();
            mbar_wait(&v_full[sp], (c / STAGES) & 1);
            fence_regs(o);
            fence_regs(pa);
            wg_fence();
            pv(sp);
            wg_commit();
            turn_end();
            wg_wait<0>();
            fence_regs(o);
            mbar_arrive_warp(&v_empty[sp]);
        }
        it += n;

        // epilogue: lse from registers; O / l through the warpgroup's smem tile and a TMA store
        float inv[2];
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const float lt = tc::quad_sum(l[hf]);
            inv[hf] = lt > 0.f ? 1.f / lt : 0.f;
            const int row = r0 + 8 * hf;
            if (qd == 0 && row >= 0 && row < T) p.lse[((size_t)b * Hq + h) * T + row] = (m[hf] * sl2 + log2f(lt)) * LN2;
        }
        if (wt == 0) bulk_wait_read<0>();  // the previous tile's store has read sO
        named_sync(BAR_EPI + wg, 128);
#pragma unroll
        for (int jn = 0; jn < D / 8; jn++)
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int r = 16 * ww + g + 8 * hf;
                *reinterpret_cast<uint32_t*>(sO + (jn / 8) * 64 * 128 + swz128(r, (jn % 8) * 8 + 2 * qd)) =
                    tc::pack_bf16(o[4 * jn + 2 * hf] * inv[hf], o[4 * jn + 2 * hf + 1] * inv[hf]);
            }
        fence_async_smem();
        named_sync(BAR_EPI + wg, 128);
        if (wt == 0 && w0 < T && w0 + 64 > 0) {
#pragma unroll
            for (int cb = 0; cb < C::NCB; cb++) tma_store(&p.o, sO + cb * 64 * 128, h * D + cb * 64, w0, b);
            bulk_commit();
        }
    }
    if constexpr (PINGPONG) {
        if (wg == 0) named_sync(BAR_TURN, 256);  // the last warpgroup's final hand-over
    }
    if (wt == 0) bulk_wait<0>();
}

template <int D, int NWG, int BN, int STAGES, bool PINGPONG, int QBUF>
inline void launch_fwd(bf16* out, float* lse, const bf16* qkv, const AttnShape& sh, const int* pos, cudaStream_t s) {
    using C = FwdCfg<D, NWG, BN, STAGES, QBUF>;
    FwdParams p;
    const int W = (sh.Hq + 2 * sh.Hkv) * D;
    p.q = tensor_map_rows(qkv, W, sh.T, sh.B, C::BM);
    p.kv = tensor_map_rows(qkv, W, sh.T, sh.B, BN);
    p.o = tensor_map_rows(out, sh.Hq * D, sh.T, sh.B, 64);
    p.lse = lse;
    p.pos = pos;
    p.B = sh.B;
    p.T = sh.T;
    p.Hq = sh.Hq;
    p.Hkv = sh.Hkv;
    p.scale_log2 = LOG2E / sqrtf((float)D);
    auto kernel = fwd_kernel<D, NWG, BN, STAGES, PINGPONG, QBUF>;
    set_max_smem(kernel, C::SMEM);
    const int ntiles = (sh.T + C::BM - 1) / C::BM * sh.B * sh.Hq;
    kernel<<<std::min(ntiles, sm_count()), C::THREADS, C::SMEM, s>>>(p);
    cudaCheckLast();
}

// ----------------------------------------------------------------------------------------------------------
// backward: three kernels
//   prep: Delta = rowsum(dO * O) and lse log2(e) per (b, h, row) into scratch rows padded to a multiple of 64
//     (padding: Delta 0, lse +inf, so padded query rows get P = 0), and with documents each row's document
//     start (past T: INT_MAX, which masks everything).
//   main: one block per (kv tile of BN = 128 rows, kv head, b). Producer warp 0 loads K and V once, then
//     streams the steps (query tile of BM = 64 rows, query head) - the group's heads innermost, the query
//     tiles from the last one that sees the kv tile down to the diagonal - with Q + lse and dO + Delta into
//     STAGES buffers. Consumer warpgroup w owns kv rows [64w, 64w + 64) and per step computes on wgmma
//       S^T = K Q^T,  dP^T = V dO^T                                   (both operands from smem)
//       P^T = exp2(S^T scale log2e - lse log2e) (masked),  dS^T = P^T (dP^T - Delta)     (registers)
//       dV += P^T dO,  dK += dS^T Q                                   (A = P^T, dS^T from registers)
//       dQ_step = dS K                                                (dS^T through smem)
//     dK and dV stay in registers for the whole block. D = 128 splits dQ's columns between the warpgroups,
//     D = 64 gives the whole tile to the warpgroups in turn (both read all of dS^T), and its matmul runs on
//     into the next step, which stages the tile. The tiles go through two smem buffers, each with its writer
//     (one thread of producer warp 1 or 2), which adds the step's fp32 dQ tile into an accumulator in global
//     memory with one bulk reduction (the tile's first contributor stores instead, so nothing is cleared
//     beforehand); with two writers two reductions are in flight, and a writer has two steps' time for its
//     turn, its reduction and the wait for it to complete.
//   dq: the accumulator times scale, as bf16, into the q columns of dqkv.
// Determinism: the contributions to a dQ tile are added in a fixed order, kv tile n_lo (the first that the
// tile's rows see), n_lo + 1, ..., the diagonal: a counter per (b, h, query tile) says whose turn it is.
// Blocks are numbered kv tile by kv tile from 0 (the longest first), and every block walks the query tiles
// from the last one down with the heads innermost, so block n - 1 reaches each step no later than block n:
// the wait is only the latency of the previous block's reduction. The block a step waits for has a lower
// index, so it was dispatched earlier: like FlashAttention-3's deterministic mode this relies on blocks
// starting in index order, which CUDA does in practice but does not promise.

struct BwdParams {
    CUtensorMap q;     // qkv, boxes of BM rows
    CUtensorMap kv;    // qkv, boxes of BN rows
    CUtensorMap dout;  // dout, boxes of BM rows
    CUtensorMap dkv;   // dqkv, boxes of 64 rows (the dK, dV stores)
    const float* l2;   // lse log2(e) (B, Hq, Tp)
    const float* dl;   // Delta (B, Hq, Tp)
    const int* dsp;    // document starts (B, Tp), with positions only
    const int* pos;
    int* sem;          // turn counters (B, Hq, Tp / BM), zeroed before the kernel
    float* dqacc;      // dQ accumulator: (B, Hq, Tp / BM) tiles of BM x D fp32 in the consumers' register order
    int B, T, Tp, Hq, Hkv;
    float scale_log2, scale;
};

// D / 8 threads a (b, h, row), each reading 16 bytes of dO and of O (a warp: 256 / D whole rows; the rows, a
// multiple of 64, end at a warp's end, so a warp returns whole)
template <int D>
__global__ void bwd_prep_kernel(float* __restrict__ l2, float* __restrict__ dl, int* __restrict__ dsp,
                                const bf16* __restrict__ dout, const bf16* __restrict__ out,
                                const float* __restrict__ lse, const int* __restrict__ pos, int B, int T, int Tp,
                                int Hq) {
    constexpr int TPR = D / 8;
    const int idx = (blockIdx.x * blockDim.x + threadIdx.x) / TPR, part = threadIdx.x % TPR;
    if (idx >= B * Hq * Tp) return;
    const int t = idx % Tp, bh = idx / Tp, h = bh % Hq, b = bh / Hq;
    float acc = 0.f;
    if (t < T) {
        const size_t off = ((size_t)b * T + t) * Hq * D + (size_t)h * D + part * 8;
        const uint4 x = *reinterpret_cast<const uint4*>(dout + off), y = *reinterpret_cast<const uint4*>(out + off);
        const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&xs[i]));
            const float2 c = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&ys[i]));
            acc = fmaf(a.x, c.x, fmaf(a.y, c.y, acc));
        }
    }
#pragma unroll
    for (int o = TPR / 2; o > 0; o /= 2) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, o);
    if (part == 0) {
        dl[idx] = acc;
        l2[idx] = t < T ? lse[(size_t)bh * T + t] * LOG2E : INFINITY;
        if (pos && h == 0) dsp[(size_t)b * Tp + t] = t < T ? t - pos[(size_t)b * T + t] : INT_MAX;
    }
}

template <int D>
struct BwdCfg {
    static constexpr int BN = 128, BM = 64, STAGES = 2, NCB = D / 64;
    static constexpr int KV_BYTES = BN * D * 2, QT_BYTES = BM * D * 2, DS_BYTES = BN * BM * 2, DQ_BYTES = BM * D * 4;
    static constexpr int ROW_BYTES = 3 * BM * 4;  // a stage's lse, Delta and document starts
    static constexpr int OFF_V = KV_BYTES, OFF_Q = 2 * KV_BYTES, OFF_DO = OFF_Q + STAGES * QT_BYTES;
    static constexpr int OFF_DS = OFF_DO + STAGES * QT_BYTES, OFF_DQ = OFF_DS + 2 * DS_BYTES;
    static constexpr int OFF_ROW = OFF_DQ + 2 * DQ_BYTES, OFF_BAR = OFF_ROW + STAGES * ROW_BYTES;
    static constexpr int NBAR = 5 + 4 * STAGES;
    static constexpr int SMEM = OFF_BAR + NBAR * 8 + 1024;
    static_assert(D == 64 || D == 128, "head dim");
    static_assert(KV_BYTES % 1024 == 0 && QT_BYTES % 1024 == 0 && DS_BYTES % 1024 == 0, "1024-aligned tiles");
    static_assert(SMEM <= 227 * 1024, "shared memory");
};

// named barriers of the backward's consumers
constexpr int BAR_DS = 1;   // both halves of dS^T in smem
constexpr int BAR_END = 2;  // every matmul of the block done: sK, sV may take dK, dV
constexpr int BAR_WG = 3;   // + w: warpgroup w's rows of dK, dV in sK, sV

// DQ_ASYNC: step i's dQ matmul runs on into step i + 1 (which stages the tile) instead of step i waiting for it;
// ORDERED: the kv tiles add their dQ tiles in a fixed order (deterministic), else in any order onto a zeroed
// accumulator (a benchmark variant: what the order costs)
template <int D, bool DQ_ASYNC, bool ORDERED>
__global__ void __launch_bounds__(384, 1) bwd_kernel(const __grid_constant__ BwdParams p) {
    using C = BwdCfg<D>;
    constexpr int BN = C::BN, BM = C::BM, STAGES = C::STAGES;
    extern __shared__ unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    unsigned char* sK = smem;
    unsigned char* sV = smem + C::OFF_V;
    auto sdq = [&](int buf) { return reinterpret_cast<float*>(smem + C::OFF_DQ + buf * C::DQ_BYTES); };
    auto sQ = [&](int st) { return smem + C::OFF_Q + st * C::QT_BYTES; };
    auto sdO = [&](int st) { return smem + C::OFF_DO + st * C::QT_BYTES; };
    auto sL = [&](int st) { return reinterpret_cast<float*>(smem + C::OFF_ROW + st * C::ROW_BYTES); };
    auto sDl = [&](int st) { return sL(st) + BM; };
    auto sDs = [&](int st) { return reinterpret_cast<int*>(sL(st) + 2 * BM); };
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + C::OFF_BAR);
    uint64_t* kv_full = bars;
    uint64_t* dq_full = bars + 1;   // per dQ buffer
    uint64_t* dq_empty = bars + 3;  // per dQ buffer
    uint64_t* q_full = bars + 5;
    uint64_t* q_empty = q_full + STAGES;
    uint64_t* do_full = q_empty + STAGES;
    uint64_t* do_empty = do_full + STAGES;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (threadIdx.x == 0) {
        mbar_init(kv_full, 1);
        for (int buf = 0; buf < 2; buf++) {
            mbar_init(&dq_full[buf], D == 128 ? 8 : 4);  // the warps that computed the tile
            mbar_init(&dq_empty[buf], 1);
        }
        for (int s = 0; s < STAGES; s++) {
            mbar_init(&q_full[s], 1);
            mbar_init(&q_empty[s], 8);
            mbar_init(&do_full[s], 1);
            mbar_init(&do_empty[s], 8);
        }
        fence_mbar_init();
    }
    __syncthreads();

    const int T = p.T, Tp = p.Tp, Hq = p.Hq, Hkv = p.Hkv, G = Hq / Hkv, M = Tp / BM;
    const int bk = blockIdx.x % (p.B * Hkv), n = blockIdx.x / (p.B * Hkv);
    const int b = bk / Hkv, kvh = bk % Hkv, kv0 = n * BN;
    // the query tiles that see a row of this kv tile: from the diagonal to the last with a row whose document
    // starts at or before the tile's last row
    const int m_lo = kv0 / BM, m_hi = (first_row_after(p.pos, b, T, kv0, kv0 + BN - 1) - 1) / BM;
    const int steps = (m_hi - m_lo + 1) * G;  // step i: query tile m_hi - i / G, head kvh G + i % G

    if (warp < 4) {
        reg_dealloc<REG_PRODUCER>();
        if (threadIdx.x == 0) {  // loads
            mbar_arrive_expect_tx(kv_full, 2 * C::KV_BYTES);
#pragma unroll
            for (int cb = 0; cb < C::NCB; cb++) {
                tma_load(sK + cb * BN * 128, &p.kv, kv_full, (Hq + kvh) * D + cb * 64, kv0, b);
                tma_load(sV + cb * BN * 128, &p.kv, kv_full, (Hq + Hkv + kvh) * D + cb * 64, kv0, b);
            }
            for (int i = 0; i < steps; i++) {
                const int m = m_hi - i / G, h = kvh * G + i % G, st = i % STAGES;
                const uint32_t ph = (i / STAGES) & 1;
                const size_t row = ((size_t)b * Hq + h) * Tp + (size_t)m * BM;
                mbar_wait(&q_empty[st], ph ^ 1);
                mbar_arrive_expect_tx(&q_full[st], C::QT_BYTES + BM * 4 + (p.pos ? BM * 4 : 0));
#pragma unroll
                for (int cb = 0; cb < C::NCB; cb++)
                    tma_load(sQ(st) + cb * BM * 128, &p.q, &q_full[st], h * D + cb * 64, m * BM, b);
                bulk_load(sL(st), p.l2 + row, BM * 4, &q_full[st]);
                if (p.pos) bulk_load(sDs(st), p.dsp + (size_t)b * Tp + (size_t)m * BM, BM * 4, &q_full[st]);
                mbar_wait(&do_empty[st], ph ^ 1);
                mbar_arrive_expect_tx(&do_full[st], C::QT_BYTES + BM * 4);
#pragma unroll
                for (int cb = 0; cb < C::NCB; cb++)
                    tma_load(sdO(st) + cb * BM * 128, &p.dout, &do_full[st], h * D + cb * 64, m * BM, b);
                bulk_load(sDl(st), p.dl + row, BM * 4, &do_full[st]);
            }
        } else if (threadIdx.x == 32 || threadIdx.x == 64) {
            // the dQ tiles into the accumulator, in the kv tiles' order (ORDERED; else as they come, onto a zeroed
            // accumulator): writer w (warp 1 + w) takes the steps of buffer w, so that two reductions are in
            // flight and each writer has two steps for its turn, its reduction and the wait for it to complete
            for (int i = threadIdx.x / 32 - 1; i < steps; i += 2) {
                const int m = m_hi - i / G, h = kvh * G + i % G;
                const int n_lo = doc_start(p.pos, b, T, m * BM) / BN;  // the tile's first contributor
                const size_t tile = ((size_t)b * Hq + h) * M + m;
                int* sem = p.sem + tile;
                float* dst = p.dqacc + tile * BM * D;
                mbar_wait(&dq_full[i & 1], (i / 2) & 1);
                if constexpr (ORDERED) {
                    for (uint32_t polls = 0; ld_acquire(sem) < n - n_lo; __nanosleep(64))
                        if (++polls == (1u << 28)) __trap();  // minutes: a bug, not a slow turn
                    fence_async_global();  // the reduction comes after the previous contributor's
                }
                if (ORDERED && n == n_lo) bulk_store(dst, sdq(i & 1), C::DQ_BYTES);
                else bulk_add_f32(dst, sdq(i & 1), C::DQ_BYTES);
                bulk_commit();
                bulk_wait_read<0>();
                mbar_arrive(&dq_empty[i & 1]);  // the buffer may take step i + 2's tile
                if constexpr (ORDERED) {
                    bulk_wait<0>();  // the sums are in global memory: the next contributor's turn
                    fence_async_global();
                    red_release_add(sem, 1);
                }
            }
            if constexpr (!ORDERED) bulk_wait<0>();  // (ORDERED waited for each reduction in turn)
        }
        return;
    }

    // consumers
    reg_alloc<reg_consumer(2)>();
    const int wg = warpgroup_index() - 1, wt = threadIdx.x % 128, ww = wt / 32, g = lane / 4, qd = lane % 4;
    const int kr = kv0 + 64 * wg + 16 * ww + g;  // this thread's kv rows kr, kr + 8
    const int wkv_hi = kv0 + 64 * wg + 63;       // the warpgroup's last kv row
    const float sl2 = p.scale_log2;
    // descriptors (+ stage and k-step offsets): K and V rows of this warpgroup as K-major A operands; Q and
    // dO as K-major B (S^T, dP^T) and as MN-major B (dK, dV: k = the query rows); dS^T as an MN-major A and
    // K as an MN-major B (dQ)
    const uint64_t dKw = desc_sw128(smem_u32(sK) + wg * 64 * 128, 16);
    const uint64_t dVw = desc_sw128(smem_u32(sV) + wg * 64 * 128, 16);
    const uint64_t dQk = desc_sw128(smem_u32(sQ(0)), 16), dOk = desc_sw128(smem_u32(sdO(0)), 16);
    const uint64_t dQm = desc_sw128(smem_u32(sQ(0)), BM * 128), dOm = desc_sw128(smem_u32(sdO(0)), BM * 128);
    const uint64_t dSm = desc_sw128(smem_u32(smem + C::OFF_DS), 16), dKm = desc_sw128(smem_u32(sK), BN * 128);

    float dk[D / 2], dv[D / 2], dq[32];
#pragma unroll
    for (int i = 0; i < D / 2; i++) dk[i] = dv[i] = 0.f;
    mbar_wait(kv_full, 0);

    // Step i's dQ tile: with D = 128 each warpgroup computes 64 of its columns, with D = 64 warpgroup i % 2
    // computes all of it (every kv row: both halves of dS^T). The tile goes into staging buffer i % 2 in
    // register order (float4 r of thread t at (128 r + t) * 4), then the proxy fence and the writer's signal
    // right away: each tile's reduction waits for the previous kv tile's, so a later signal delays the whole
    // chain (fencing after the next step's probabilities, where the stores had long completed, was 3% slower).
    // With D = 128, DQ_ASYNC would spill: dK and dV hold 128 registers, the tile in flight 32 more.
    static_assert(!(DQ_ASYNC && D == 128), "registers");
    auto owns_dq = [&](int i) { return D == 128 || i % 2 == wg; };
    auto stage_dq = [&](int i) {
        mbar_wait(&dq_empty[i & 1], ((i / 2) & 1) ^ 1);
        float* dst = sdq(i & 1) + (D == 128 ? wg * BM * 64 : 0);
#pragma unroll
        for (int r = 0; r < 8; r++)
            *reinterpret_cast<float4*>(dst + (r * 128 + wt) * 4) =
                make_float4(dq[4 * r], dq[4 * r + 1], dq[4 * r + 2], dq[4 * r + 3]);
        fence_async_smem();
        mbar_arrive_warp(&dq_full[i & 1]);
    };

    for (int i = 0; i < steps; i++) {
        const int m = m_hi - i / G, st = i % STAGES, q0 = m * BM;
        const uint32_t ph = (i / STAGES) & 1;
        float sacc[32], dp[32];
        uint32_t pa[4][4], da[4][4];
        // S^T and dP^T (both waits before the fence: no branch between it and the matmuls)
        mbar_wait(&q_full[st], ph);
        mbar_wait(&do_full[st], ph);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
            wgmma_ss<0, 0>(sacc, desc_add(dKw, (kk / 4) * BN * 128 + (kk % 4) * 32),
                           desc_add(dQk, st * C::QT_BYTES + (kk / 4) * BM * 128 + (kk % 4) * 32), kk > 0);
        wg_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
            wgmma_ss<0, 0>(dp, desc_add(dVw, (kk / 4) * BN * 128 + (kk % 4) * 32),
                           desc_add(dOk, st * C::QT_BYTES + (kk / 4) * BM * 128 + (kk % 4) * 32), kk > 0);
        wg_commit();
        if (DQ_ASYNC && i > 0 && owns_dq(i - 1)) {
            wg_wait<2>();  // the previous step's dQ (S^T and dP^T may still run)
            fence_regs(dq);
            stage_dq(i - 1);
        }
        wg_wait<1>();
        fence_regs(sacc);
        // P^T (rows: the thread's kv rows, columns: query rows 8j + 2qd + e of the tile)
        const float* L = sL(st);
        const int* Ds = sDs(st);
        // the mask (after the query, or before its document) only where the diagonal crosses the step or with
        // documents, as a compile-time choice: tested per score, it costs as much as the exps
        auto probabilities = [&](auto mask) {
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int c = 8 * j + 2 * qd + e;
                    const float l2 = L[c];
#pragma unroll
                    for (int hf = 0; hf < 2; hf++) {
                        float& v = sacc[4 * j + 2 * hf + e];
                        v = fast_exp2(fmaf(v, sl2, -l2));
                        if constexpr (mask) {
                            const int kv = kr + 8 * hf;
                            if (q0 + c < kv || (p.pos && kv < Ds[c])) v = 0.f;
                        }
                    }
                }
        };
        if (q0 < wkv_hi || p.pos) probabilities(std::true_type{});
        else probabilities(std::false_type{});
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
#pragma unroll
            for (int r = 0; r < 4; r++) pa[kk][r] = tc::pack_bf16(sacc[8 * kk + 2 * r], sacc[8 * kk + 2 * r + 1]);
        // dV += P^T dO
        fence_regs(pa);
        wg_fence();  // pa written since the last fence
#pragma unroll
        for (int kk = 0; kk < 4; kk++) wgmma_rs<1>(dv, pa[kk], desc_add(dOm, st * C::QT_BYTES + kk * 16 * 128), 1);
        wg_commit();
        wg_wait<1>();  // dP^T (dV may still run)
        fence_regs(dp);
        // dS^T = P^T (dP^T - Delta), into registers (dK's A) and smem (dQ's A)
        const float* Dl = sDl(st);
        unsigned char* sdS = smem + C::OFF_DS + (i & 1) * C::DS_BYTES;
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const float dlv = Dl[8 * j + 2 * qd + e];
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    const int r = 4 * j + 2 * hf + e;
                    dp[r] = sacc[r] * (dp[r] - dlv);
                }
            }
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
#pragma unroll
            for (int r = 0; r < 4; r++) da[kk][r] = tc::pack_bf16(dp[8 * kk + 2 * r], dp[8 * kk + 2 * r + 1]);
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int hf = 0; hf < 2; hf++)
                *reinterpret_cast<uint32_t*>(sdS + swz128(64 * wg + 16 * ww + g + 8 * hf, 8 * j + 2 * qd)) =
                    da[j / 2][(j % 2) * 2 + hf];
        // dK += dS^T Q
        fence_regs(da);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) wgmma_rs<1>(dk, da[kk], desc_add(dQm, st * C::QT_BYTES + kk * 16 * 128), 1);
        wg_commit();
        fence_async_smem();  // dS^T in smem, for the async proxy
        // dQ = dS K: both warpgroups' rows of dS^T (buffer i % 2: the matmul of step i - 1 read the other one)
        named_sync(BAR_DS, 256);
        if (owns_dq(i)) {
            wg_fence();
            const uint64_t dS = desc_add(dSm, (i & 1) * C::DS_BYTES);
            const uint64_t dKc = desc_add(dKm, (D == 128 ? wg : 0) * BN * 128);  // the warpgroup's dQ columns
            wgmma_ss_first<1, 1>(dq, dS, dKc);
#pragma unroll
            for (int kk = 1; kk < BN / 16; kk++)
                wgmma_ss<1, 1>(dq, desc_add(dS, kk * 16 * 128), desc_add(dKc, kk * 16 * 128), 1);
            wg_commit();
            if constexpr (DQ_ASYNC) {
                wg_wait<1>();  // dV and dK; dQ runs on
            } else {
                wg_wait<0>();
                fence_regs(dq);
                stage_dq(i);
            }
        } else {
            wg_wait<0>();
        }
        fence_regs(dk);
        fence_regs(dv);
        fence_regs(pa);
        fence_regs(da);
        mbar_arrive_warp(&q_empty[st]);
        mbar_arrive_warp(&do_empty[st]);
    }
    if constexpr (DQ_ASYNC) {
        wg_wait<0>();
        fence_regs(dq);
        if (owns_dq(steps - 1)) stage_dq(steps - 1);
    }
    // dK (times scale) and dV as bf16 through sK, sV (every matmul of both warpgroups is done) and TMA stores
    named_sync(BAR_END, 256);
#pragma unroll
    for (int jn = 0; jn < D / 8; jn++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const uint32_t at = (jn / 8) * BN * 128 + swz128(64 * wg + 16 * ww + g + 8 * hf, (jn % 8) * 8 + 2 * qd);
            *reinterpret_cast<uint32_t*>(sK + at) =
                tc::pack_bf16(dk[4 * jn + 2 * hf] * p.scale, dk[4 * jn + 2 * hf + 1] * p.scale);
            *reinterpret_cast<uint32_t*>(sV + at) = tc::pack_bf16(dv[4 * jn + 2 * hf], dv[4 * jn + 2 * hf + 1]);
        }
    fence_async_smem();
    named_sync(BAR_WG + wg, 128);
    if (wt == 0 && kv0 + 64 * wg < T) {
#pragma unroll
        for (int cb = 0; cb < C::NCB; cb++) {
            const int at = cb * BN * 128 + 64 * wg * 128;
            tma_store(&p.dkv, sK + at, (Hq + kvh) * D + cb * 64, kv0 + 64 * wg, b);
            tma_store(&p.dkv, sV + at, (Hq + Hkv + kvh) * D + cb * 64, kv0 + 64 * wg, b);
        }
        bulk_commit();
        bulk_wait<0>();
    }
}

// dq = scale x the accumulator: one block of 128 threads per (b, h, query tile, 64 columns). Thread t reads
// what consumer thread t wrote (row 16 (t / 32) + (t % 32) / 4 (+ 8), columns 8j + 2 (t % 4) (+ 1)) with
// coalesced 16-byte loads; the tile turns through shared memory so that 8 threads write each row's 128 bytes
// in 16-byte stores (written straight from the register order, a warp's stores hit 16-byte pieces of 8 rows)
template <int D>
__global__ void bwd_dq_kernel(bf16* __restrict__ dqkv, const float* __restrict__ dqacc, int T, int Tp, int Hq,
                              int Hkv, float scale) {
    constexpr int NH = D / 64, BM = 64, LD = 64 + 8;  // + 8: the register-order writes hit distinct banks
    __shared__ __align__(16) bf16 tile_s[BM * LD];
    const int t = threadIdx.x, half = blockIdx.x % NH;
    const size_t tile = blockIdx.x / NH;
    const int M = Tp / BM, m = (int)(tile % M), bh = (int)(tile / M), h = bh % Hq, b = bh / Hq;
    const float* src = dqacc + tile * BM * D + half * BM * 64;  // a 64-column half of the tile: BM x 64 fp32
    const int r = 16 * (t / 32) + (t % 32) / 4, c = 2 * (t % 4);
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const float4 v = *reinterpret_cast<const float4*>(src + (j * 128 + t) * 4);
        *reinterpret_cast<uint32_t*>(tile_s + r * LD + c + 8 * j) = tc::pack_bf16(v.x * scale, v.y * scale);
        *reinterpret_cast<uint32_t*>(tile_s + (r + 8) * LD + c + 8 * j) = tc::pack_bf16(v.z * scale, v.w * scale);
    }
    __syncthreads();
    const size_t stride = (size_t)(Hq + 2 * Hkv) * D;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const int piece = k * 128 + t, row = piece / 8, col = (piece % 8) * 8, tr = m * BM + row;
        if (tr < T)
            *reinterpret_cast<uint4*>(dqkv + ((size_t)b * T + tr) * stride + h * D + half * 64 + col) =
                *reinterpret_cast<const uint4*>(tile_s + row * LD + col);
    }
}

// the backward's three launches (the benchmark times them one by one)
template <int D, bool ORDERED = true>
inline void launch_bwd_prep(void* scratch, const bf16* dout, const bf16* out, const float* lse, const AttnShape& sh,
                            const int* pos, cudaStream_t s) {
    const BwdScratch sc(scratch, sh);
    const int rows = sh.B * sh.Hq * sc.Tp;
    constexpr int ROWS_PER_BLOCK = 256 / (D / 8);  // divides the rows: Tp is a multiple of 64
    bwd_prep_kernel<D><<<rows / ROWS_PER_BLOCK, 256, 0, s>>>(sc.l2, sc.dl, sc.dsp, dout, out, lse, pos, sh.B, sh.T,
                                                             sc.Tp, sh.Hq);
    cudaCheckLast();
    cudaCheck(cudaMemsetAsync(sc.sem, 0, (size_t)rows / BwdCfg<D>::BM * sizeof(int), s));
    if (!ORDERED) cudaCheck(cudaMemsetAsync(sc.dqacc, 0, (size_t)rows * D * sizeof(float), s));
}
template <int D, bool DQ_ASYNC = D == 64, bool ORDERED = true>
inline void launch_bwd_main(bf16* dqkv, void* scratch, const bf16* dout, const bf16* qkv, const AttnShape& sh,
                            const int* pos, cudaStream_t s) {
    using C = BwdCfg<D>;
    const BwdScratch sc(scratch, sh);
    BwdParams p;
    const int W = (sh.Hq + 2 * sh.Hkv) * D;
    p.q = tensor_map_rows(qkv, W, sh.T, sh.B, C::BM);
    p.kv = tensor_map_rows(qkv, W, sh.T, sh.B, C::BN);
    p.dout = tensor_map_rows(dout, sh.Hq * D, sh.T, sh.B, C::BM);
    p.dkv = tensor_map_rows(dqkv, W, sh.T, sh.B, 64);
    p.l2 = sc.l2;
    p.dl = sc.dl;
    p.dsp = sc.dsp;
    p.pos = pos;
    p.sem = sc.sem;
    p.dqacc = sc.dqacc;
    p.B = sh.B;
    p.T = sh.T;
    p.Tp = sc.Tp;
    p.Hq = sh.Hq;
    p.Hkv = sh.Hkv;
    p.scale = 1.f / sqrtf((float)D);
    p.scale_log2 = p.scale * LOG2E;
    auto kernel = bwd_kernel<D, DQ_ASYNC, ORDERED>;
    set_max_smem(kernel, C::SMEM);
    const int nkv = (sh.T + C::BN - 1) / C::BN;
    kernel<<<nkv * sh.B * sh.Hkv, 384, C::SMEM, s>>>(p);  // kv tile major: block n after every block n - 1
    cudaCheckLast();
}
template <int D>
inline void launch_bwd_dq(bf16* dqkv, void* scratch, const AttnShape& sh, cudaStream_t s) {
    const BwdScratch sc(scratch, sh);
    const int tiles = sh.B * sh.Hq * sc.Tp / BwdCfg<D>::BM;
    bwd_dq_kernel<D><<<tiles * (D / 64), 128, 0, s>>>(dqkv, sc.dqacc, sh.T, sc.Tp, sh.Hq, sh.Hkv,
                                                       1.f / sqrtf((float)D));
    cudaCheckLast();
}
// the backward's dQ variant: the faster of dev/bench_attention --sweep (H200, 2026-12-04, two writers: D = 64
// 0.795 ms with DQ_ASYNC, 0.845 without), deterministic (ORDERED: unordered was slower, 0.814 ms)
template <int D, bool DQ_ASYNC = D == 64, bool ORDERED = true>
inline void backward(bf16* dqkv, void* scratch, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse,
                     const AttnShape& sh, const int* pos, cudaStream_t s) {
    launch_bwd_prep<D, ORDERED>(scratch, dout, out, lse, sh, pos, s);
    launch_bwd_main<D, DQ_ASYNC, ORDERED>(dqkv, scratch, dout, qkv, sh, pos, s);
    launch_bwd_dq<D>(dqkv, scratch, sh, s);
}

// tile configurations: D, consumer warpgroups (BM = 64 NWG query rows), BN, stages, ping-pong, Q buffers;
// the fastest of dev/bench_attention --sweep on an H200 (2026-12-04, B4 T4096 16q/4kv, three calls): D = 128
// at 653-657 TFLOP/s (ping-pong 633-642); D = 64 at 438-451 with three warpgroups in ping-pong (two warpgroups
// 401-417: at D = 64 the exps take as long as the matmuls, and a third warpgroup's softmax fills the gaps),
// one or two Q buffers within 1%. Moving one in 2-8 of the D = 64 exponentials to the FMA pipe (a cubic 2^x,
// after FlashAttention-4) ran 6-19% slower than the MUFU alone in one H100 run (2026-12-06): not kept
template <int D>
inline void forward(bf16* out, float* lse, const bf16* qkv, const AttnShape& sh, const int* pos, cudaStream_t s) {
    if constexpr (D == 128) launch_fwd<128, 2, 128, 2, false, 2>(out, lse, qkv, sh, pos, s);
    else launch_fwd<64, 3, 128, 3, true, 1>(out, lse, qkv, sh, pos, s);
}
inline void forward(bf16* out, float* lse, const bf16* qkv, const AttnShape& sh, const int* pos, cudaStream_t s) {
    if (sh.Dh == 64) forward<64>(out, lse, qkv, sh, pos, s);
    else forward<128>(out, lse, qkv, sh, pos, s);
}
inline void backward(bf16* dqkv, void* scratch, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse,
                     const AttnShape& sh, const int* pos, cudaStream_t s) {
    if (sh.Dh == 64) backward<64>(dqkv, scratch, dout, qkv, out, lse, sh, pos, s);
    else backward<128>(dqkv, scratch, dout, qkv, out, lse, sh, pos, s);
}

}  // namespace attn::sm90
