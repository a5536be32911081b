// Causal GQA flash attention on Hopper (sm_90a): the algorithm of attention.cuh's header, on wgmma and TMA,
// after FlashAttention-3 (Shah et al. 2024). Built when the target is sm_90a; attention.cuh picks it.
//
// Forward. A persistent kernel: one block per SM walks a static list of (query tile, query head, batch) work
// tiles, longest (last query tiles) first, dealt to the blocks in a snake order so that their sums even out;
// the query heads of one kv head are neighbours in the list, so their K/V tiles are read from L2 while the
// other heads' blocks still need them. A block is one producer warpgroup and NWG consumer warpgroups:
//   producer (one thread, 24 registers): per tile the Q tile (BM = 64 NWG rows) into sQ, then the K and V
//     tiles (BN rows) from the diagonal down to the first tile of the document, into a ring of STAGES
//     buffers; every load is a TMA box that completes on an mbarrier ("full"), and a buffer is refilled
//     only after every consumer warp arrived on its "empty" barrier.
//   consumers (240 registers with 2 warpgroups): warpgroup w owns query rows [64w, 64w + 64) of the tile.
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
#include <cstdint>
#include "cuda_common.cuh"
#include "hopper.cuh"
#include "tensor_core.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "attention_sm90.cuh needs sm_90a (make GPU_ARCH=90)"
#endif

namespace attn::sm90 {  // attn's helpers (fast_exp2, quad_max, doc_start, ...) are in scope

using namespace hopper;

// registers per thread after setmaxnreg: the producer warpgroup keeps 24, the consumers share the rest of
// the 64K (multiples of 8, at most 240)
constexpr int REG_PRODUCER = 24;
constexpr int reg_consumer(int nwg) {
    return ((65536 / 128 - REG_PRODUCER) / nwg) / 8 * 8 > 240 ? 240 : ((65536 / 128 - REG_PRODUCER) / nwg) / 8 * 8;
}

// The tile list of both passes: tile idx of `ntiles`, the k-th of this block, dealt in a snake order
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

template <int D, int NWG, int BN, int STAGES>
struct FwdCfg {
    static constexpr int BM = 64 * NWG, THREADS = 128 * (NWG + 1);
    static constexpr int NCB = D / 64;  // 128-byte column blocks of a head row
    static constexpr int Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2, O_BYTES = 64 * D * 2;
    static constexpr int OFF_K = Q_BYTES, OFF_V = OFF_K + STAGES * KV_BYTES, OFF_O = OFF_V + STAGES * KV_BYTES;
    static constexpr int OFF_BAR = OFF_O + NWG * O_BYTES;
    static constexpr int NBAR = 2 + 4 * STAGES;
    static constexpr int SMEM = OFF_BAR + NBAR * 8 + 1024;  // + room to align the base to 1024
    static_assert(D % 64 == 0 && BN % 64 == 0 && (BN == 64 || BN == 128) && (D == 64 || D == 128), "tile shape");
    static_assert(Q_BYTES % 1024 == 0 && KV_BYTES % 1024 == 0 && O_BYTES % 1024 == 0, "1024-aligned tiles");
    static_assert(SMEM <= 227 * 1024, "shared memory");
};

// named barriers: 1 + w the turn of consumer warpgroup w (PINGPONG), 1 + NWG + w its epilogue
constexpr int BAR_TURN = 1;

template <int D, int NWG, int BN, int STAGES, bool PINGPONG>
__global__ void __launch_bounds__(128 * (NWG + 1), 1) fwd_kernel(const __grid_constant__ FwdParams p) {
    using C = FwdCfg<D, NWG, BN, STAGES>;
    constexpr int BM = C::BM;
    constexpr int BAR_EPI = BAR_TURN + NWG;
    extern __shared__ unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    const uint32_t sQ = smem_u32(smem), sK = sQ + C::OFF_K, sV = sQ + C::OFF_V;
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + C::OFF_BAR);
    uint64_t* q_full = bars;
    uint64_t* q_empty = bars + 1;
    uint64_t* k_full = bars + 2;
    uint64_t* k_empty = k_full + STAGES;
    uint64_t* v_full = k_empty + STAGES;
    uint64_t* v_empty = v_full + STAGES;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (threadIdx.x == 0) {
        mbar_init(q_full, 1);
        mbar_init(q_empty, 4 * NWG);  // one arrival per consumer warp
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
                const int kvh = h / G;
                mbar_wait(q_empty, (k & 1) ^ 1);
                mbar_arrive_expect_tx(q_full, C::Q_BYTES);
#pragma unroll
                for (int cb = 0; cb < C::NCB; cb++)
                    tma_load(smem + cb * BM * 128, &p.q, q_full, h * D + cb * 64, q0, b);
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
    const int wg = warp / 4 - 1, wt = threadIdx.x % 128, ww = wt / 32, g = lane / 4, qd = lane % 4;
    const float sl2 = p.scale_log2;
    unsigned char* sO = smem + C::OFF_O + wg * C::O_BYTES;
    // descriptors: Q rows of this warpgroup and K are K-major; V is MN-major (column blocks BN * 128 apart)
    const uint64_t dQ = desc_sw128(sQ + wg * 64 * 128, 16);
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
    // S = Q K^T from K stage st
    auto qk = [&](int st) {
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

        // masks the scores of kv tile j where the diagonal or a document start crosses the warpgroup's rows,
        // then the online softmax: s becomes exp2 of the scaled scores minus the running max; alpha rescales
        // the earlier sums
        auto softmax = [&](int j, float (&alpha)[2]) {
            const int k0 = j * BN;
            const bool mask = k0 + BN - 1 > w0 || k0 < wg_ds;
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int row = r0 + 8 * hf;
                float mx = -INFINITY;
#pragma unroll
                for (int jn = 0; jn < BN / 8; jn++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float& v = s[4 * jn + 2 * hf + e];
                        if (mask) {
                            const int col = k0 + 8 * jn + 2 * qd + e;
                            if (col > row || col < ds[hf]) v = -INFINITY;
                        }
                        mx = fmaxf(mx, v);
                    }
                mx = quad_max(mx);
                const float mnew = fmaxf(m[hf], mx);
                const float muse = mnew == -INFINITY ? 0.f : mnew * sl2;  // a row with nothing seen yet stays 0
                alpha[hf] = fast_exp2(m[hf] * sl2 - muse);
                m[hf] = mnew;
                float sum = 0.f;
#pragma unroll
                for (int jn = 0; jn < BN / 8; jn++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float& v = s[4 * jn + 2 * hf + e];
                        v = fast_exp2(fmaf(v, sl2, -muse));
                        sum += v;
                    }
                l[hf] = l[hf] * alpha[hf] + sum;
            }
        };
        auto to_pa = [&]() {  // columns 16kk .. 16kk + 15 are the A fragment of k-step kk
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++)
#pragma unroll
                for (int r = 0; r < 4; r++) pa[kk][r] = tc::pack_bf16(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
        };

        const int n = j_hi - j_lo + 1;
        mbar_wait(q_full, k & 1);
        // the diagonal tile
        {
            const int st = it % STAGES;
            turn_begin();
            mbar_wait(&k_full[st], (it / STAGES) & 1);
            wg_fence();
            qk(st);
            wg_commit();
            turn_end();
            wg_wait<0>();
            fence_regs(s);
            mbar_arrive_warp(&k_empty[st]);
            if (n == 1) mbar_arrive_warp(q_empty);
            float alpha[2];
            softmax(j_hi, alpha);
            to_pa();
        }
        for (int i = 1; i < n; i++) {
            const int c = it + i, st = c % STAGES, sp = (c - 1) % STAGES;
            turn_begin();
            mbar_wait(&k_full[st], (c / STAGES) & 1);
            wg_fence();
            qk(st);
            wg_commit();
            mbar_wait(&v_full[sp], ((c - 1) / STAGES) & 1);
            pv(sp);
            wg_commit();
            turn_end();
            wg_wait<1>();  // S of this tile; P V of the previous one may still run
            fence_regs(s);
            mbar_arrive_warp(&k_empty[st]);
            if (i == n - 1) mbar_arrive_warp(q_empty);  // the tile's last use of Q
            float alpha[2];
            softmax(j_hi - i, alpha);
            wg_wait<0>();
            fence_regs(o);
            fence_regs(pa);
            mbar_arrive_warp(&v_empty[sp]);
#pragma unroll
            for (int jn = 0; jn < D / 8; jn++) {
                o[4 * jn] *= alpha[0];
                o[4 * jn + 1] *= alpha[0];
                o[4 * jn + 2] *= alpha[1];
                o[4 * jn + 3] *= alpha[1];
            }
            to_pa();
        }
        {  // P V of the last tile
            const int c = it + n - 1, sp = c % STAGES;
            turn_begin();
            mbar_wait(&v_full[sp], (c / STAGES) & 1);
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
            if (qd == 0 && row < T) p.lse[((size_t)b * Hq + h) * T + row] = (m[hf] * sl2 + log2f(lt)) * LN2;
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
        if (wt == 0 && w0 < T) {
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

template <int D, int NWG, int BN, int STAGES, bool PINGPONG>
inline void launch_fwd(bf16* out, float* lse, const bf16* qkv, const AttnShape& sh, const int* pos, cudaStream_t s) {
    using C = FwdCfg<D, NWG, BN, STAGES>;
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
    auto kernel = fwd_kernel<D, NWG, BN, STAGES, PINGPONG>;
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM));
    const int ntiles = (sh.T + C::BM - 1) / C::BM * sh.B * sh.Hq;
    kernel<<<std::min(ntiles, sm_count()), C::THREADS, C::SMEM, s>>>(p);
    cudaCheckLast();
}

// tile configurations: D, consumer warpgroups (BM = 64 NWG query rows), BN, stages, ping-pong
template <int D>
inline void forward(bf16* out, float* lse, const bf16* qkv, const AttnShape& sh, const int* pos, cudaStream_t s) {
    if constexpr (D == 128) launch_fwd<128, 2, 128, 2, true>(out, lse, qkv, sh, pos, s);
    else launch_fwd<64, 2, 128, 3, true>(out, lse, qkv, sh, pos, s);
}
inline void forward(bf16* out, float* lse, const bf16* qkv, const AttnShape& sh, const int* pos, cudaStream_t s) {
    if (sh.Dh == 64) forward<64>(out, lse, qkv, sh, pos, s);
    else forward<128>(out, lse, qkv, sh, pos, s);
}

}  // namespace attn::sm90
