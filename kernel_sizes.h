// The memory the kernels keep and borrow, without CUDA: each kernel's shape, the bytes its forward
// saves for its backward, and the scratch its backward borrows (the scratch layouts that the
// launchers carve, so a size and its use are one definition). The kernel headers include it; the
// model's activation and memory estimates (mamba.cuh, zero.h) read it on the host, g++ builds too.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include "common.h"  // ceil_div, THROW

// the bf16 of cuda_bf16.h (pointers only here)
struct __nv_bfloat16;
typedef __nv_bfloat16 bf16;

// ----------------------------------------------------------------------------------------------
// Mamba-2 SSD (ssd.cuh)

struct SSDShape { int B, T, H, P, G, N, chunk; };

namespace ssd {

constexpr int TILE = 64;              // rows of a forward step and of a backward tile (4 warps x 16 rows)
constexpr int CHUNK = 256;            // rows of a backward chunk
constexpr int NTILE = CHUNK / TILE;
constexpr int PASS_THREADS = 256;
constexpr int MAX_HPS = 16;           // heads per slice of the backward tile kernels (rsum rows in smem)

// ----------------------------------------------------------------------------------------------
// sizes and scratch layout

inline int nchunks(const SSDShape& sh) { return (int)ceil_div(sh.T, CHUNK); }
inline size_t padded_positions(const SSDShape& sh) { return (size_t)sh.B * sh.H * nchunks(sh) * CHUNK; }
inline size_t state_elems(const SSDShape& sh) { return (size_t)sh.B * sh.H * nchunks(sh) * sh.P * sh.N; }
inline int pass_splits(const SSDShape& sh) { return (int)ceil_div((size_t)sh.P * sh.N / 4, PASS_THREADS); }

// heads of a group are split into slices (one block each) so the backward grid has enough blocks: the fewest
// slices (of at most MAX_HPS heads) that make at least BWD_TILE_BLOCKS blocks and fill their last wave at least
// 3/4 on a GPU of BWD_SLOTS places, else one head a slice. Short batches (fine-tuning's, the tiny models') have
// few (b, chunk) pairs: mamba2-tiny at B8 T256 has 32 tiles, so one slice of its 12 heads left 100 of an H100's
// 132 SMs idle through the backward's two longest kernels. More slices cost too: each recomputes C B^T and
// writes dB/dC partials of its own (B T N floats each, summed afterwards). Steps on an H100 (mamba2-tiny's 12
// heads at B8 T1024: 6.60 ms with 12 slices (1536 blocks), 6.32 with 6, 6.25 with 4 (512), 6.29 with 3 (384,
// 1.45 waves); at B8 T256 2.50 with 12 (384), 2.48 with 6, 2.53 with 4. mamba2-370m 127.1 -> 125.7 ms with 2
// slices (512) for 4 (1024); mamba2-2.7b's 80 heads 342.2 -> 346.4 ms with 5 (640 blocks, a last wave 42%
// full) for 8 (1024), which this rule keeps.
constexpr long BWD_TILE_BLOCKS = 512;
constexpr long BWD_SLOTS = 264;  // an H100's or H200's 132 SMs, two tile blocks each (a constant, not the GPU's
                                 // count: head_slices also sizes the scratch in --dry-run, which has no GPU to ask)
inline int head_slices(const SSDShape& sh) {
    const int hpg = sh.H / sh.G;
    const long tiles = (long)sh.B * sh.G * nchunks(sh) * NTILE;
    for (int s = 1; s <= hpg; s++) {
        const long blocks = tiles * s, last = blocks % BWD_SLOTS;
        if (hpg % s == 0 && hpg / s <= MAX_HPS && blocks >= BWD_TILE_BLOCKS && (last == 0 || 4 * last >= 3 * BWD_SLOTS))
            return s;
    }
    return hpg;
}

// The backward tile kernels' 1-D grid: a block per (b, chunk) pair, tile rank and group slice (G slices of its
// heads), dealt in groups of `group` pairs: every block of a group's pairs before the next group's, the heaviest
// tile rank first inside a group. The blocks of one pair read the same x and dy tiles (each row tile's block every
// column tile up to it, each column tile's every row tile from it), so a group that runs at once finds them in L2.
// With one group of all the pairs, the heaviest blocks of the whole grid go first, and a wave of one rank streams
// all of x and dy from DRAM (ncu, mamba2-370m's layer on an H100: 44% L2 hits, about 650 MB read where the
// tensors hold 140 MB).
struct TileIndex {
    int pair, rank, slice;  // pair = b nchunks + chunk, slice = g slices + the slice of group g
};
HOST_DEVICE inline TileIndex tile_index(int block, int pairs, int slices, int group) {
    const int per_pair = NTILE * slices;
    const int first = block / (group * per_pair) * group;           // the group's first pair
    const int n = pairs - first < group ? pairs - first : group;     // its pairs (the last group may have fewer)
    const int k = block - first * per_pair, rank = k / (n * slices), rest = k - rank * n * slices;
    return {first + rest / slices, rank, rest % slices};
}
// pairs a group: as many as fill the `slots` blocks that run at once (at least one, at most all)
inline int backward_tile_group(const SSDShape& sh, int slots) {
    const int per_pair = NTILE * sh.G * head_slices(sh), pairs = sh.B * nchunks(sh);
    return std::clamp(slots / per_pair, 1, pairs);
}

// backward scratch: S then Hin in place | dS then Gout in place | W per slice and tile pair (bf16) |
// per-position arrays (csum: one partial per row tile) | pass dots | per-chunk parameter partials |
// dB, dC slice partials (fp32)
struct BwdScratch {
    bf16 *hst, *gst, *w;
    float *ddt_dir, *csum, *sst, *dd, *rsum, *off, *dots, *partials, *db_part, *dc_part;
    size_t total;  // floats
    BwdScratch(const SSDShape& sh, void* base) {
        const size_t S = state_elems(sh), Tp = padded_positions(sh);
        const size_t nbc = (size_t)sh.B * sh.H * nchunks(sh);
        const size_t bc = (size_t)sh.B * sh.T * sh.G * head_slices(sh) * sh.N;
        const size_t wn = (size_t)sh.B * nchunks(sh) * sh.G * head_slices(sh) * NTILE * NTILE * TILE * TILE;
        size_t off_f = 0;
        auto take = [&](size_t n) {
            float* p = base ? (float*)base + off_f : nullptr;
            off_f += (n + 3) / 4 * 4;  // 16-byte aligned
            return p;
        };
        hst = (bf16*)take(S / 2);  // S is a multiple of 8, so gst follows hst with no gap (the backward
        gst = (bf16*)take(S / 2);  // zeroes both with one memset at one chunk)
        w = (bf16*)take(wn / 2);
        ddt_dir = take(Tp);
        csum = take(Tp * NTILE);
        sst = take(Tp);
        dd = take(Tp);
        rsum = take(Tp);
        off = take(Tp);
        dots = take(nbc * pass_splits(sh));
        partials = take(nbc * 3);
        db_part = take(bc);
        dc_part = take(bc);
        total = off_f;
    }
};

// The forward runs a block per (b, h) row down the whole sequence. When the rows leave SMs idle (one long sequence
// of few heads: B1 T16384 H64 fills 64 of 264 places; or a last wave of blocks partly full: B4 T2048 H80 is 264
// rows and then 56), some rows are cut into segments of whole chunks, a block each, and a fix-up pass adds what
// each segment's rows owe the state entering it (ssd.cuh). A plan: the first `whole` rows (b H + h order) run
// whole, the other B H - whole rows in segments of seg_chunks chunks. Segments are pointless on a single segment
// or on no row, so plans keep whole == B H exactly when seg_chunks spans the sequence.
struct ForwardPlan {
    int whole, seg_chunks;
};

inline int forward_segments(const SSDShape& sh, const ForwardPlan& p) {
    return (int)ceil_div(nchunks(sh), p.seg_chunks);
}
inline int forward_split_rows(const SSDShape& sh, const ForwardPlan& p) { return sh.B * sh.H - p.whole; }

// the plan of `whole` whole rows and the others in `segments` segments (fewer where the chunks do not divide)
inline ForwardPlan forward_plan_of(const SSDShape& sh, int segments, int whole) {
    const int nc = nchunks(sh), bh = sh.B * sh.H;
    if (segments < 1 || whole < 0 || whole > bh)
        THROW("ssd: no forward plan of %d segments with %d of %d rows whole", segments, whole, bh);
    const int len = (int)ceil_div(nc, segments);
    return len == nc || whole == bh ? ForwardPlan{bh, nc} : ForwardPlan{whole, len};
}

// A plan's time in 64-row steps, given `slots` blocks that run at once: its waves of blocks, ~2 steps for a
// block's start, and 1/256 of a step for each 64-row tile of the fix-up (measured by bench_ssd's segment sweep on
// an H200). Whole rows past the full waves share the last wave with the segments (and set its length).
inline double forward_plan_steps(const SSDShape& sh, int slots, const ForwardPlan& p) {
    const long split = forward_split_rows(sh, p), segs = forward_segments(sh, p), rest = p.whole % slots;
    const double whole_steps = nchunks(sh) * NTILE + 2, seg_steps = p.seg_chunks * NTILE + 2;
    const double last_wave = std::max(rest > 0 ? whole_steps : 0.0, ceil_div(rest + split * segs, slots) * seg_steps);
    return p.whole / slots * whole_steps + last_wave + (segs - 1) * split * p.seg_chunks * NTILE / 256.0;
}

// the fastest plan with `whole` rows whole: over the segment lengths (one segment first, which wins ties)
inline ForwardPlan forward_plan_with(const SSDShape& sh, int slots, int whole) {
    const int nc = nchunks(sh);
    ForwardPlan best = forward_plan_of(sh, 1, whole);
    double best_steps = forward_plan_steps(sh, slots, best);
    for (int nseg = 2; nseg <= nc; nseg++) {
        const ForwardPlan p = forward_plan_of(sh, nseg, whole);
        if (p.seg_chunks == (int)ceil_div(nc, nseg - 1)) continue;  // the same segments as fewer of them
        const double steps = forward_plan_steps(sh, slots, p);
        if (steps < best_steps) best = p, best_steps = steps;
    }
    return best;
}

// the plan the forward runs given `slots`: every row in segments, or the rows of the full waves whole and only the
// last partial wave's in segments (so their segments fill the last wave), whichever is faster
inline ForwardPlan forward_plan(const SSDShape& sh, int slots) {
    const int bh = sh.B * sh.H, full = bh / slots * slots;
    ForwardPlan best = forward_plan_with(sh, slots, 0);
    if (full > 0 && full < bh) {
        const ForwardPlan p = forward_plan_with(sh, slots, full);
        if (forward_plan_steps(sh, slots, p) < forward_plan_steps(sh, slots, best)) best = p;
    }
    return best;
}

// fp32 final states the split rows' segments before the last leave for the fix-up (S^T, N x P, per split row and
// segment)
inline size_t forward_segment_state_elems(const SSDShape& sh, const ForwardPlan& p) {
    return (size_t)forward_split_rows(sh, p) * (forward_segments(sh, p) - 1) * sh.P * sh.N;
}

}  // namespace ssd

// dt and the 256-row-chunk-local cumsum of dt A per (b, h, padded position), fp32
inline size_t ssd_saved_bytes(const SSDShape& sh) { return 2 * ssd::padded_positions(sh) * sizeof(float); }

// the backward's, shared by all layers; the forward borrows it for its segments' states (at most one segment a
// chunk, which fits: the backward keeps two bf16 states a chunk; test_config checks it)
inline size_t ssd_scratch_bytes(const SSDShape& sh) { return ssd::BwdScratch(sh, nullptr).total * sizeof(float); }

// ----------------------------------------------------------------------------------------------
// Mamba-1 selective scan (scan.cuh)

struct ScanShape { int B, T, D, N; };

namespace scan {

constexpr int CK = 64;        // steps per saved chunk state

// bytes of dB/dC block partials per backward slab (tests shrink it with ScopedPartialBudget)
inline size_t partial_budget = (size_t)192 << 20;
struct ScopedPartialBudget {
    size_t saved;
    explicit ScopedPartialBudget(size_t bytes) : saved(partial_budget) { partial_budget = bytes; }
    ~ScopedPartialBudget() { partial_budget = saved; }
};

// states are stored (saved chunk states, scratch) in rows of N rounded up to 4, moved as float4
inline int n4(int N) { return (N + 3) / 4 * 4; }
inline int nchunks(const ScanShape& sh) { return (sh.T + CK - 1) / CK; }

// thread layouts and the configuration per N (the backward's scratch depends on a block's channels)

// A thread owns DPT adjacent channels and NPT adjacent states of each; G lanes (a channel group) cover
// NP = G NPT states; a warp holds R = 32 / G channel groups, a block WARPS warps, DT channels.
template <int NPT_, int DPT_, int G_, int WARPS_>
struct Layout {
    static constexpr int NPT = NPT_, DPT = DPT_, G = G_, WARPS = WARPS_;
    static constexpr int THREADS = 32 * WARPS, R = 32 / G, NP = NPT * G, E = DPT * NPT, DT = WARPS * R * DPT;
    static_assert(G >= 1 && G <= 32 && 32 % G == 0, "a channel group lies within a warp");
    static_assert(NPT % 4 == 0, "states move as float4");
    static_assert(DT % 4 == 0, "shared rows stay 16-byte aligned");
};

// NPT states and DPT channels a thread, G lanes a channel group (the smallest power of two >= 2 covering N);
// the backward takes 8 warps where a warp holds few channels (fewer dB/dC block partials) if its shared
// memory allows (N <= 128)
template <int NPT, int DPT, int G>
struct Config {
    using Fwd = Layout<NPT, DPT, G, 4>;
    using Bwd = Layout<NPT, DPT, G, (G >= 16 && NPT == 4 ? 8 : 4)>;
};

// calls f(Config<...>{}) for N
template <typename F>
inline void dispatch(int N, F&& f) {
    if (N <= 8) f(Config<4, 2, 2>{});  // N < 8 padded (one lane a group would make 256-channel blocks)
    else if (N <= 16) f(Config<4, 2, 4>{});
    else if (N <= 32) f(Config<4, 2, 8>{});
    else if (N <= 64) f(Config<4, 2, 16>{});
    else if (N <= 128) f(Config<4, 2, 32>{});
    else f(Config<8, 1, 32>{});
}

// backward scratch (floats): dB/dC block partials of one slab; per (b, d, n) the dh carry and dA_log partial; per
// (b, d) the dD and ddt_bias partials
struct BwdScratch {
    float *part, *carry, *acc_da, *acc_dd, *acc_db;
    size_t total;
    BwdScratch(const ScanShape& sh, int dblocks, int slab_steps, void* base) {
        const size_t S = (size_t)sh.B * sh.D * n4(sh.N);
        size_t off = 0;
        auto take = [&](size_t n) { float* p = base ? (float*)base + off : nullptr; off += (n + 3) / 4 * 4; return p; };
        part = take((size_t)dblocks * sh.B * slab_steps * 2 * sh.N);
        carry = take(S);
        acc_da = take(S);
        acc_dd = take((size_t)sh.B * sh.D);
        acc_db = take((size_t)sh.B * sh.D);
        total = off;
    }
};

inline int slab_chunks(const ScanShape& sh, int dblocks) {
    const size_t per_chunk = (size_t)dblocks * sh.B * CK * 2 * sh.N * sizeof(float);
    const size_t c = std::max<size_t>(1, partial_budget / per_chunk);
    return (int)std::min<size_t>(c, nchunks(sh));
}

template <class L>
inline BwdScratch bwd_scratch(const ScanShape& sh, void* base) {
    const int nblk = (sh.D + L::DT - 1) / L::DT;
    return BwdScratch(sh, nblk, slab_chunks(sh, nblk) * CK, base);
}

}  // namespace scan

// kept per layer from forward to backward: the state at the start of every CK-step chunk (fp32)
inline size_t scan_saved_bytes(const ScanShape& sh) {
    return (size_t)sh.B * scan::nchunks(sh) * sh.D * scan::n4(sh.N) * sizeof(float);
}
// temporary, shared by all layers: dB/dC block partials of one slab, the dh carry, parameter partials
inline size_t scan_scratch_bytes(const ScanShape& sh) {
    size_t floats = 0;
    scan::dispatch(sh.N, [&](auto cfg) { floats = scan::bwd_scratch<typename decltype(cfg)::Bwd>(sh, nullptr).total; });
    return floats * sizeof(float);
}

// ----------------------------------------------------------------------------------------------
// attention (attention.cuh, attention_sm90.cuh)

struct AttnShape { int B, T, Hq, Hkv, Dh; };

// the Hopper kernels (attention_sm90.cuh, ssd_sm90.cuh) when the build targets sm_90a, i.e. Hopper alone (nvcc
// defines __CUDA_ARCH_LIST__ in the host pass too; wgmma does not exist on later architectures, which take the
// mma.sync kernels). Host-only builds (g++) get SM90A from the Makefile, so their estimates are the GPU build's.
#if defined(__CUDA_ARCH_LIST__) && __CUDA_ARCH_LIST__ == 900
#define SM90A 1
#endif

namespace attn::sm90 {

// the scratch of the backward, carved from one allocation (base == nullptr: only the size)
struct BwdScratch {
    static constexpr int BM = 64;
    float *l2, *dl, *dqacc;
    int *dsp, *sem;
    int Tp;
    size_t bytes;
    BwdScratch(void* base, const AttnShape& sh) {
        Tp = (sh.T + BM - 1) / BM * BM;
        const size_t rows = (size_t)sh.B * sh.Hq * Tp;
        size_t off = 0;
        auto take = [&](size_t n) {  // 256-byte aligned pieces
            char* at = base ? static_cast<char*>(base) + off : nullptr;
            off += (n + 255) / 256 * 256;
            return at;
        };
        l2 = reinterpret_cast<float*>(take(rows * 4));
        dl = reinterpret_cast<float*>(take(rows * 4));
        dsp = reinterpret_cast<int*>(take((size_t)sh.B * Tp * 4));
        sem = reinterpret_cast<int*>(take(rows / BM * 4));
        dqacc = reinterpret_cast<float*>(take(rows * sh.Dh * 4));
        bytes = off;
    }
};

inline size_t scratch_bytes(const AttnShape& sh) { return BwdScratch(nullptr, sh).bytes; }

}  // namespace attn::sm90

// temporary for the backward, shared by layers (also enough for sm80_backward)
inline size_t attention_scratch_bytes(const AttnShape& sh) {
    const size_t delta = ((size_t)sh.B * sh.Hq * sh.T * sizeof(float) + 255) / 256 * 256;  // sm80: Delta (B, Hq, T)
#ifdef SM90A
    return std::max(delta, attn::sm90::scratch_bytes(sh));  // + the dQ accumulator (B, Hq, T, Dh) fp32
#else
    return delta;
#endif
}

// ----------------------------------------------------------------------------------------------
// column sums (cuda_common.cuh), norms (norm.cuh), conv1d (conv1d.cuh)

constexpr int COLSUM_CHUNKS = 64;

inline size_t colsum_scratch_floats(int C, int NV) { return (size_t)COLSUM_CHUNKS * C * NV; }

// blocks of a norm backward (norm.cuh): 256 for wide rows, more for narrow ones (a block takes one row at a
// time, so narrow rows need more blocks in flight); each leaves a partial row of the weight gradient
inline int norm_row_blocks(int C) { return 256 * std::clamp(4096 / std::max(C, 1), 1, 4); }

inline size_t norm_backward_scratch_floats(int C) { return (size_t)norm_row_blocks(C) * C; }
inline size_t rmsnorm_backward_scratch_floats(int rows, int C) { (void)rows; return norm_backward_scratch_floats(C); }

inline size_t gated_rmsnorm_backward_scratch_floats(int rows, int C) { (void)rows; return norm_backward_scratch_floats(C); }

// rows [r0, r1) of chunk `chunk` of `chunks` (a column sum's chunks, the norms' backward blocks)
HOST_DEVICE inline void colsum_chunk_rows(int chunk, int chunks, int rows, int* r0, int* r1) {
    const int per = (rows + chunks - 1) / chunks, a = chunk * per;
    *r0 = a < rows ? a : rows;
    *r1 = *r0 + per < rows ? *r0 + per : rows;
}

constexpr int CONV_WARPS = 8;  // warps of a conv1d block: runs of rows over the same channels

// warp `warp`'s run [r0, r1) of row chunk `chunk` of `chunks` (its block's rows, split in CONV_WARPS runs)
HOST_DEVICE inline void conv1d_warp_rows(int chunk, int chunks, int warp, int rows, int* r0, int* r1) {
    int p0, p1;
    colsum_chunk_rows(chunk, chunks, rows, &p0, &p1);
    const int run = (p1 - p0 + CONV_WARPS - 1) / CONV_WARPS, a = p0 + warp * run;
    *r0 = a < p1 ? a : p1;
    *r1 = *r0 + run < p1 ? *r0 + run : p1;
}

// The row chunks (grid.y) of a conv1d pass whose blocks span col_blocks column blocks, `slots` blocks resident
// on the GPU at once: the count (at most COLSUM_CHUNKS, the backward's partial rows) with the least waves x rows
// a warp walks, halo included. Runs of a few rows read their K-1 halo rows again, in proportion (16 rows a run:
// 19% more reads); a last wave that fills few slots leaves the GPU idle.
inline int conv1d_row_chunks(int slots, int col_blocks, int rows, int K) {
    int best = 1;
    size_t best_cost = SIZE_MAX;
    for (int c = 1; c <= COLSUM_CHUNKS; c++) {
        const size_t waves = ceil_div((size_t)c * col_blocks, (size_t)slots);
        const size_t cost = waves * (ceil_div((size_t)rows, (size_t)c * CONV_WARPS) + K - 1);
        if (cost < best_cost) best_cost = cost, best = c;
    }
    return best;
}

inline size_t conv1d_backward_scratch_floats(int B, int T, int C, int K) {
    (void)B; (void)T;
    return colsum_scratch_floats(C, K + 1);
}

// ----------------------------------------------------------------------------------------------
// the LM head's rows (mamba.cuh, Model::lm_head_and_loss)

// Where fewer of a micro-batch's BT rows carry a loss (a target and a nonzero weight: fine-tuning masks the
// prompts), the LM head and the loss run over those n rows only, gathered, padded up to this count: a multiple
// of a sixteenth of the batch (of 64 rows at least), so that at most 16 counts each need a captured step. BT:
// nothing to gather.
inline int loss_row_bucket(int n, int BT) {
    const int unit = std::max(64, (int)ceil_div(ceil_div(BT, 16), 64) * 64);
    return std::min(BT, (int)ceil_div(std::max(n, 1), unit) * unit);
}
