// Mamba-2 state-space-duality (SSD) scan, forward and backward, with optional document boundaries.
//
// Per batch b, head h (group g = h / (H/G)), A = -exp(A_log[h]), dt_t = softplus(dt_raw_t + dt_bias):
//   S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,   y_t = S_t C_t + D x_t          (S: P x N, fp32)
// With document positions (pos_t = t - start of t's document) the state restarts at every document start:
// the pair (t, s <= t) counts only when s >= t - pos_t.
//
// Blocked form. Over a block of rows with Acum = the in-block inclusive cumsum of dt A, L_ij = exp(Acum_i -
// Acum_j), CB_ij = C_i . B_j and Hin the state entering the block:
//   y_i   = exp(Acum_i) Hin C_i + sum_{j <= i} CB_ij L_ij dt_j x_j + D x_i                  (intra: masked matmuls)
//   Hout  = exp(Aend) Hin + sum_j exp(Aend - Acum_j) dt_j x_j B_j^T                         (Aend = Acum of the last row)
// With boundaries: a row sees Hin only if its document started before the block; Hout keeps only the rows from
// the last document start in the block on and drops Hin when a document starts inside the block.
//
// Forward (one kernel): a block per (b, h) walks the sequence in 64-row steps with the state on chip: fp32 in
// the registers of its 4 warps (warp w owns state columns [wN/4, (w+1)N/4)), and a bf16 copy in shared memory
// that the next step's y reads. Per step and warp (16 rows): [C B^T | y_off] = C [B^T | Hin^T] in one pass over
// C, the decayed and masked scores in registers (left of the warp's rows the decay factors through the rows'
// first row, so only the diagonal 16 x 16 block takes an exp per score), y += scores x; then every warp
// Hout = decay Hin + (w x)^T B for its state columns. The next step's tiles load (cp.async) meanwhile and one
// warp prepares its dt, cumsum and weights. Short steps keep the quadratic part small; x, B, C and dt are read
// once, y written once, nothing else touches memory but dt and the 256-row-chunk-local cumsum, saved for the
// backward (8 bytes per (b, t, h)). On sm_90a builds heads of 64 take the same steps on wgmma (ssd_sm90.cuh).
// When the (b, h) blocks are too few for the GPU (one long sequence), or the last wave of them only partly fills
// it, those rows run in segments of whole chunks, a block each from a zero state, and a fix-up adds the entering
// state's part of y (ssd_segment_*; kernel_sizes.h, ForwardPlan).
//
// Backward (chunks of 256 rows through memory; parallel over b, chunk, group and head slices):
//   states:  per (b, h, chunk) its own state S_c and dS_c = sum_i exp(Acum_i) dy_i C_i^T (the gradient its
//            outputs send to the state entering it), bf16; a block takes two heads of a group where they pair
//            up, so that they read each B (or C) tile once
//   pass:    per (b, h): Hin_c in place of S_c (forward), Gout_c = dL/dHin_{c+1} in place of dS_c (reverse),
//            and decay_c <Gout_c, Hin_c> (the gradient of the chunk's decay)
//   row:     per 64-row tile i of a chunk and a slice of the heads of a group: dC (the state part
//            exp(Acum_i) Hin^T dy_i per head; the intra part W B once, W_ij = sum_h L_ij dt_j (dy_i . x_j) summed
//            over the slice's heads: C B^T and W do not depend on the head), the row and column sums of
//            Z = C B^T * W-terms per head (the two halves of the cumsum's gradient, which cancel: both from the
//            same fp32 products), and W (bf16) for the column kernel
//   column:  per 64-row tile j: dx (u_j = sum_{i >= j} CB_ij L_ij dy_i + exp(Aend - Acum_j) Gout B_j per head,
//            C B^T once per block), dB (state part per head, intra part W^T C once per block)
//   dt:      per (b, h, chunk): reverse cumsum of dAcum to ddt_raw and the parameter-gradient partials
// In the row and column kernels the decay L_ij of a pair factors through one row of the warp (an exp per row and
// per column instead of one per pair) everywhere but on the warp's diagonal 16 x 16 block, and the blocks run in
// groups of (b, chunk) pairs that fill the GPU, the heaviest tiles of a group first (TileBlock, tile_index): the
// blocks of a chunk read each other's x and dy tiles from L2.
// Matmuls run on tensor cores (mma.sync m16n8k16: bf16 in, fp32 accumulate; sm_80 and sm_90), operands from
// shared memory through ldmatrix; on sm_90a builds the row and column kernels' matmuls run on wgmma (heads of
// 64). Cumsums, decays and the state recurrences are fp32; states and W go through memory as bf16 (the precision
// the matmuls read them in). Every sum (over heads, positions, chunks, batch) runs in a fixed order, without
// atomics: results repeat bit for bit.
//
// The blocking (64-row steps, 256-row chunks) is the kernels' own: SSDShape::chunk, the model's chunk size, does
// not change the result beyond rounding.
#pragma once
#include <cstdint>
#include <type_traits>
#include "cuda_common.cuh"
#include "kernel_sizes.h"  // SSDShape, the blocking, the backward's scratch layout, ssd_saved/scratch_bytes
#include "tensor_core.cuh"
#ifdef SM90A
#include "hopper.cuh"  // wgmma for the backward's tile kernels; ssd_sm90.cuh's forward
#endif

struct SSDInputs {                    // rows are strided: x, B, C are column slices of the conv output
    const bf16 *x, *Bm, *Cm;          // (BT, H*P), (BT, G*N), (BT, G*N)
    const bf16* dt;                   // (BT, H) raw dt, before + dt_bias and softplus
    int x_stride, bc_stride, dt_stride;
    const bf16 *dt_bias, *A_log, *D;  // (H) each
    const int* pos = nullptr;         // (BT) position of each token in its document, 0 at a document
                                      // start; nullptr: every row is one document (pos = t)
};
struct SSDGrads {
    bf16 *dx, *dB, *dC, *ddt;         // written, strided like the inputs
    int dx_stride, dbc_stride, ddt_stride;
    float *ddt_bias, *dA_log, *dD;    // accumulate (+=), fp32; the order of the parameter layout
};

namespace ssd {

using namespace tc;

constexpr int THREADS = 128;
constexpr int PAD = 8;                // bf16 padding per smem row so ldmatrix rows hit distinct banks
static_assert(TILE == 2 * 32, "one warp prepares a step, two rows per lane");
static_assert(THREADS / 32 * 16 == TILE, "4 warps of 16 rows cover a tile");
static_assert(CHUNK % TILE == 0, "whole tiles per chunk");

// ----------------------------------------------------------------------------------------------
// tensor-core helpers (warp level; the PTX wrappers are in tensor_core.cuh)

// One k16 step: acc (16 x 8NT) += a (16 x 16 fragment) * B[k0..k0+16, 0..8NT) from smem.
// B_KM: smem holds B k-major (sB[k][n]), else n-major (sB[n][k]). Only n-tiles [nlo, nhi) are
// computed (even bounds, warp-uniform): the causal mask zeroes the others on diagonal tiles.
template <int NT, bool B_KM>
__device__ inline void mma_k16(float (&acc)[NT][4], const uint32_t (&a)[4], const bf16* sB, int ldb, int n0, int k0,
                               int nlo = 0, int nhi = NT) {
    static_assert(NT % 2 == 0, "pairs of n-tiles");
    const int lane = threadIdx.x & 31, r = lane & 7, mi = lane >> 3;
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
        if (nt < nlo || nt >= nhi) continue;
        uint32_t b[4];
        if (B_KM) ldsm_x4_t(b, sB + (k0 + r + (mi & 1) * 8) * ldb + n0 + nt * 8 + (mi >> 1) * 8);
        else      ldsm_x4(b, sB + (n0 + nt * 8 + r + (mi >> 1) * 8) * ldb + k0 + (mi & 1) * 8);
        mma_bf16(acc[nt], a, b[0], b[1]);
        mma_bf16(acc[nt + 1], a, b[2], b[3]);
    }
}

// byte offset of element (r, c) of a TILE-row smem matrix in the 128-byte-swizzled layout of wgmma operands
// (hopper.cuh: c / 64 column blocks of TILE rows x 128 bytes, the 16-byte chunks of a row permuted by r % 8)
__device__ __forceinline__ uint32_t sw128_offset(int r, int c) {
    return (c >> 6) * TILE * 128 + r * 128 + ((((c >> 3) & 7) ^ (r & 7)) << 4) + (c & 7) * 2;
}
// element (r, c) of an smem matrix: row stride ld, or (SW) the swizzled layout
template <bool SW>
__device__ __forceinline__ const bf16* smem_at(const bf16* s, int ld, int r, int c) {
    if constexpr (SW) return reinterpret_cast<const bf16*>(reinterpret_cast<const unsigned char*>(s) + sw128_offset(r, c));
    else return s + r * ld + c;
}

// the A fragment of rows m0..m0+16, k0..k0+16 of an smem matrix; A_KM: smem holds A k-major (sA[k][m]);
// SW: in the swizzled layout (lda unused)
template <bool A_KM, bool SW = false>
__device__ inline void load_a(uint32_t (&a)[4], const bf16* sA, int lda, int m0, int k0) {
    const int lane = threadIdx.x & 31, r = lane & 7, mi = lane >> 3;
    if (A_KM) ldsm_x4_t(a, smem_at<SW>(sA, lda, k0 + r + (mi >> 1) * 8, m0 + (mi & 1) * 8));
    else      ldsm_x4(a, smem_at<SW>(sA, lda, m0 + (lane & 15), k0 + (lane >> 4) * 8));
}

// acc (rows m0..m0+16, 8NT columns) += A (16 x K) * B (K x 8NT), both from smem.
// Rows g / g+8 of A may be scaled by sc0 / sc1 (a per-row weight folded into the operand).
template <int NT, bool A_KM, bool B_KM, bool SCALE = false>
__device__ inline void warp_mma(float (&acc)[NT][4], const bf16* sA, int lda, int m0, const bf16* sB, int ldb,
                                int n0, int K, float sc0 = 1.f, float sc1 = 1.f, int nlo = 0, int nhi = NT) {
#pragma unroll 4
    for (int k0 = 0; k0 < K; k0 += 16) {
        uint32_t a[4];
        load_a<A_KM>(a, sA, lda, m0, k0);
        if (SCALE) {
            a[0] = scale_bf16x2(a[0], sc0, sc0); a[1] = scale_bf16x2(a[1], sc1, sc1);
            a[2] = scale_bf16x2(a[2], sc0, sc0); a[3] = scale_bf16x2(a[3], sc1, sc1);
        }
        mma_k16<NT, B_KM>(acc, a, sB, ldb, n0, k0, nlo, nhi);
    }
}

// acc += A (16 x 64, register fragments built from a 16 x 64 accumulator) * B (64 x 8NT, k-major smem);
// only k16 steps [klo, khi) (the others are masked to zero on diagonal tiles)
template <int NT>
__device__ inline void warp_mma_rega(float (&acc)[NT][4], const uint32_t (&a)[4][4], const bf16* sB, int ldb,
                                     int klo = 0, int khi = 4) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
        if (kk >= klo && kk < khi) mma_k16<NT, true>(acc, a[kk], sB, ldb, 0, kk * 16);
}

// acc (MT m16 tiles from row m0, 8NT columns from n0) += A (16MT x K) * B (K x 8NT), A and B k-major in smem
// (rows k), the columns k of A scaled by wk[k] in registers; the B fragments serve all MT tiles
template <int MT, int NT>
__device__ inline void warp_mma_kscaled(float (&acc)[MT][NT][4], const bf16* sA, int lda, int m0, const bf16* sB,
                                        int ldb, int n0, int K, const float* wk) {
    static_assert(NT % 2 == 0, "pairs of n-tiles");
    const int lane = threadIdx.x & 31, q = lane & 3, r = lane & 7, mi = lane >> 3;
#pragma unroll 2
    for (int k0 = 0; k0 < K; k0 += 16) {
        const float2 w01 = *reinterpret_cast<const float2*>(wk + k0 + 2 * q);
        const float2 w89 = *reinterpret_cast<const float2*>(wk + k0 + 2 * q + 8);
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            load_a<true>(a[mt], sA, lda, m0 + 16 * mt, k0);
            scale_a_cols(a[mt], w01, w89);
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt += 2) {
            uint32_t b[4];
            ldsm_x4_t(b, sB + (k0 + r + (mi & 1) * 8) * ldb + n0 + nt * 8 + (mi >> 1) * 8);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                mma_bf16(acc[mt][nt], a[mt], b[0], b[1]);
                mma_bf16(acc[mt][nt + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// dots of rows g / g+8 of a 16 x 8NT accumulator with rows m0 + g / m0 + g + 8 of an smem tile (row
// stride ld, or SW: swizzled), this lane's part (quad_sum gives the row's)
template <int NT, bool SW = false>
__device__ __forceinline__ void row_dots(float& da, float& db, const float (&acc)[NT][4], const bf16* s, int ld,
                                         int m0) {
    const int lane = threadIdx.x & 31, q = lane & 3;
    da = db = 0.f;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        const int p = n * 8 + 2 * q;
        const float2 va = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(smem_at<SW>(s, ld, m0 + (lane >> 2), p)));
        const float2 vb = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(smem_at<SW>(s, ld, m0 + (lane >> 2) + 8, p)));
        da += va.x * acc[n][0] + va.y * acc[n][1];
        db += vb.x * acc[n][2] + vb.y * acc[n][3];
    }
}

// column sums over the 16 rows of a warp's 16 x 64 tile: cs[n][c] is this thread's two rows' sum for column
// n*8 + 2q + c; returns the warp's sums of columns g*8 + 2q and g*8 + 2q + 1 (g = lane / 4). A butterfly over
// the 8 lanes that share q: each step hands half of the columns to the partner (14 shuffles)
__device__ inline float2 warp_col_sums(const float (&cs)[8][2]) {
    const int lane = threadIdx.x & 31;
    float a[4][2], b[2][2], r[2];
    const bool u4 = lane & 16, u3 = lane & 8, u2 = lane & 4;
#pragma unroll
    for (int k = 0; k < 4; k++)
#pragma unroll
        for (int c = 0; c < 2; c++)  // keeps columns n = k + 4 (lane bit 4)
            a[k][c] = (u4 ? cs[k + 4][c] : cs[k][c]) + __shfl_xor_sync(0xffffffffu, u4 ? cs[k][c] : cs[k + 4][c], 16);
#pragma unroll
    for (int k = 0; k < 2; k++)
#pragma unroll
        for (int c = 0; c < 2; c++)  // n = k + 2 (bit 3) + 4 (bit 4)
            b[k][c] = (u3 ? a[k + 2][c] : a[k][c]) + __shfl_xor_sync(0xffffffffu, u3 ? a[k][c] : a[k + 2][c], 8);
#pragma unroll
    for (int c = 0; c < 2; c++)  // n = (bit 2) + 2 (bit 3) + 4 (bit 4) = g
        r[c] = (u2 ? b[1][c] : b[0][c]) + __shfl_xor_sync(0xffffffffu, u2 ? b[0][c] : b[1][c], 4);
    return make_float2(r[0], r[1]);
}

// rows g / g+8 of a 16 x 8NT accumulator times sa / sb
template <int NT>
__device__ __forceinline__ void scale_rows_acc(float (&acc)[NT][4], float sa, float sb) {
#pragma unroll
    for (int n = 0; n < NT; n++) {
        acc[n][0] *= sa; acc[n][1] *= sa;
        acc[n][2] *= sb; acc[n][3] *= sb;
    }
}

// ----------------------------------------------------------------------------------------------
// block helpers

// all of this thread's copies landed, then the block's
__device__ inline void cp_async_wait_sync() {
    cp_async_wait_group<0>();
    __syncthreads();
}

// starts copying the ROWS rows of a strided bf16 matrix (COLS wide) into smem (row stride COLS + PAD); rows >= valid
// become zero (past the end of the sequence). Unrolled: the addresses are a base and constant steps.
template <int COLS, int ROWS = TILE>
__device__ inline void load_rows(bf16* s, const bf16* g, size_t stride, int valid) {
    constexpr int V = COLS / 8, STEP = THREADS / V;  // 16-byte pieces a row, rows a pass
    static_assert(THREADS % V == 0 && ROWS % STEP == 0, "whole rows a pass");
    const int v = threadIdx.x % V, r0 = threadIdx.x / V;
    const bf16* g0 = g + v * 8;  // row 0: a valid address for the zero-filling copies
    const bf16* gr = g0 + r0 * stride;
    s += r0 * (COLS + PAD) + v * 8;
#pragma unroll
    for (int k = 0; k < ROWS / STEP; k++) {
        const bool ok = r0 + k * STEP < valid;
        cp_async16(s + k * STEP * (COLS + PAD), ok ? gr + k * STEP * stride : g0, ok);
    }
}

// starts copying the TILE rows of a strided bf16 matrix (COLS wide) into the 128-byte-swizzled layout of wgmma
// operands (hopper.cuh; COLS / 64 column blocks of TILE rows); rows >= valid become zero. A thread's row
// advances by a multiple of 8 per pass, so its swizzled chunk is the same in every pass.
template <int COLS>
__device__ inline void load_rows_sw128(void* dst, const bf16* g, size_t stride, int valid) {
    constexpr int V = COLS / 8, STEP = THREADS / V;  // 16-byte pieces a row, rows a pass
    static_assert(THREADS % V == 0 && STEP % 8 == 0 && TILE % STEP == 0, "whole rows a pass, 8-row groups");
    const int v = threadIdx.x % V, r0 = threadIdx.x / V;
    const bf16* g0 = g + v * 8;
    const bf16* gr = g0 + r0 * stride;
    unsigned char* s = static_cast<unsigned char*>(dst) + sw128_offset(r0, v * 8);
#pragma unroll
    for (int k = 0; k < TILE / STEP; k++) {
        const bool ok = r0 + k * STEP < valid;
        cp_async16(s + k * STEP * 128, ok ? gr + k * STEP * stride : g0, ok);
    }
}

// load_rows, or (SW) load_rows_sw128
template <int COLS, bool SW, int ROWS = TILE>
__device__ inline void load_rows_as(bf16* s, const bf16* g, size_t stride, int valid) {
    static_assert(!SW || ROWS == TILE, "swizzled tiles of TILE rows");
    if constexpr (SW) load_rows_sw128<COLS>(s, g, stride, valid);
    else load_rows<COLS, ROWS>(s, g, stride, valid);
}

// starts copying n floats (16-byte aligned, n a multiple of 4) into smem
__device__ inline void load_floats(float* s, const float* g, int n) {
    for (int i = threadIdx.x; i < n / 4; i += blockDim.x) cp_async16(s + 4 * i, g + 4 * i, true);
}

// inclusive prefix sum of s[0..n) in place (n <= CHUNK, blockDim >= 64, fixed order)
__device__ inline void block_scan(float* s, int n) {
    constexpr int PER = CHUNK / 64;
    for (int off = 1; off < n; off <<= 1) {
        float v[PER];
#pragma unroll
        for (int k = 0; k < PER; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            v[k] = (i < n && i >= off) ? s[i - off] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < PER; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i < n) s[i] += v[k];
        }
        __syncthreads();
    }
}

// exp of a decay exponent (<= 0) by the hardware ex2 (__expf's approximation, its error far below bf16 rounding),
// flushing results below 2^-126 to zero: 2 instructions instead of __expf's 5 (its denormal range handling)
__device__ inline float decay_exp(float x) { return fast_exp2(x * LOG2E); }

// Document boundaries of a block of rows [t0, t0 + valid) of sequence row b (local index i):
// thr_i = i - pos = the local index where row i's document starts (< 0: before the block). Pairs (i, j <= i)
// with j < thr_i are cut; row i sees the state entering the block iff thr_i < 0; the state leaving the block
// keeps rows j >= lds = thr of the last row, and drops the entering state iff lds >= 0.
__device__ inline int doc_thr(const int* pos, size_t row0, int i, int valid) {
    return i < valid ? i - pos[row0 + i] : i;
}

// ----------------------------------------------------------------------------------------------
// Forward

// One step's per-row quantities, prepared a step ahead by one warp (two rows per lane). The decay between rows
// i >= j of a step, exp(acl_i - acl_j), factors through the first row m of i's 16-row tile when j < m:
// exp(acl_i - acl_m) exp(acl_m - acl_j), both factors <= 1 (no overflow however steep the decay).
struct __align__(16) StepArrays {
    float dt[TILE];        // softplus(dt_raw + bias), 0 past the sequence
    float acl[TILE];       // inclusive cumsum of dt A from the step's start
    float w[TILE];         // weight of row j in the state leaving the step: dt_j exp(acl_63 - acl_j) (0 if cut)
    float e0[TILE];        // exp(acl_i - acl_m), m the first row of i's 16-row tile
    float fdt[3][TILE];    // fdt[r - 1][j] = exp(acl_16r - acl_j) dt_j for j < 16r (the columns left of row tile r)
    int thr[TILE];         // local start of the row's document (negative: before the step)
    float em[TILE / 16];   // exp(acl_16r): the decay of the entering state to row tile r's first row
    float decay;           // of the entering state over the step: exp(acl_63), 0 if a document starts in the step
};

// one warp: the step of rows [s0, s0 + valid) from raw dt (rows 2 lane, 2 lane + 1) and positions; writes dt
// and the chunk-local cumsum (base + step cumsum) to saved (rows past the sequence: dt 0, cumsum flat) and
// advances base to the step's end
template <bool DOCS>
__device__ inline void prepare_step(StepArrays& st, float& base, float2 raw, int2 pos, int valid, float bias,
                                    float A, float* dt_out, float* acum_out) {
    const int lane = threadIdx.x & 31, r0 = 2 * lane;
    const float dt0 = r0 < valid ? softplus(raw.x + bias) : 0.f;
    const float dt1 = r0 + 1 < valid ? softplus(raw.y + bias) : 0.f;
    const float a0 = dt0 * A, a1 = dt1 * A;
    float incl = a0 + a1;  // inclusive scan of the pair sums
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
    }
    float excl = __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == 0) excl = 0.f;
    const float c0 = excl + a0, c1 = incl, cend = __shfl_sync(0xffffffffu, incl, 31);
    int th0 = -1, th1 = -1, lds = -1;
    if (DOCS) {
        th0 = r0 < valid ? r0 - pos.x : r0;
        th1 = r0 + 1 < valid ? r0 + 1 - pos.y : r0 + 1;
        const int last = valid - 1;
        lds = __shfl_sync(0xffffffffu, (last & 1) ? th1 : th0, last >> 1);
    }
    const float w0 = r0 >= lds ? dt0 * decay_exp(cend - c0) : 0.f;
    const float w1 = r0 + 1 >= lds ? dt1 * decay_exp(cend - c1) : 0.f;
    float am[TILE / 16];  // acl at the first row of each 16-row tile (lane 8r holds row 16r)
#pragma unroll
    for (int r = 0; r < TILE / 16; r++) am[r] = __shfl_sync(0xffffffffu, c0, 8 * r);
    const float amine = __shfl_sync(0xffffffffu, c0, lane & ~7);  // of this lane's tile
    const float amlane = __shfl_sync(0xffffffffu, c0, 8 * (lane & 3));
    *reinterpret_cast<float2*>(st.dt + r0) = make_float2(dt0, dt1);
    *reinterpret_cast<float2*>(st.acl + r0) = make_float2(c0, c1);
    *reinterpret_cast<float2*>(st.w + r0) = make_float2(w0, w1);
    *reinterpret_cast<float2*>(st.e0 + r0) = make_float2(decay_exp(c0 - amine), decay_exp(c1 - amine));
#pragma unroll
    for (int r = 1; r < TILE / 16; r++)
        *reinterpret_cast<float2*>(st.fdt[r - 1] + r0) =
            r0 < 16 * r ? make_float2(decay_exp(am[r] - c0) * dt0, decay_exp(am[r] - c1) * dt1) : make_float2(0.f, 0.f);
    *reinterpret_cast<int2*>(st.thr + r0) = make_int2(th0, th1);
    if (lane < TILE / 16) st.em[lane] = decay_exp(amlane);
    if (lane == 0) st.decay = lds >= 0 ? 0.f : decay_exp(cend);
    *reinterpret_cast<float2*>(dt_out + r0) = make_float2(dt0, dt1);
    *reinterpret_cast<float2*>(acum_out + r0) = make_float2(base + c0, base + c1);
    base += cend;
}

// The preparing warp's part of the forward: the raw dt (and positions) of rows 2 lane, 2 lane + 1 of a step,
// loaded a step ahead, then prepare_step into the step's arrays and the saved dt and chunk-local cumsum
template <bool DOCS>
struct StepPrep {
    const bf16* dt;     // raw dt, strided rows
    const int* pos;
    int dt_stride;
    size_t row0, pos0;  // the sequence's first row; its first saved position (b, h)
    int h, T;
    float bias, A;
    float *dt_s, *acum_s;
    float base = 0.f;  // chunk-local cumsum at the end of the prepared steps
    // the loaded rows, as loaded: converting them at the load would make the warp wait for the load there
    bf16 raw[2];
    int2 p2;

    __device__ void load(int s) {
        const int s0 = s * TILE, valid = min(TILE, T - s0), r0 = 2 * (threadIdx.x & 31);
        const bf16* d = dt + (row0 + s0) * dt_stride + h;
        raw[0] = raw[1] = __float2bfloat16(0.f);
        p2 = make_int2(0, 0);
        if (r0 < valid) raw[0] = d[(size_t)r0 * dt_stride];
        if (r0 + 1 < valid) raw[1] = d[(size_t)(r0 + 1) * dt_stride];
        if (DOCS && r0 < valid) p2.x = pos[row0 + s0 + r0];
        if (DOCS && r0 + 1 < valid) p2.y = pos[row0 + s0 + r0 + 1];
    }
    __device__ void prepare(StepArrays& st, int s) {
        const int s0 = s * TILE;
        const float2 rawf = make_float2(__bfloat162float(raw[0]), __bfloat162float(raw[1]));
        prepare_step<DOCS>(st, base, rawf, p2, min(TILE, T - s0), bias, A, dt_s + pos0 + s0, acum_s + pos0 + s0);
        if ((s0 + TILE) % CHUNK == 0) base = 0.f;
    }
    // saved past the last step (the rest of the last chunk): dt 0, cumsum flat
    __device__ void finish(int nsteps, int Tp) {
        for (int t = nsteps * TILE + (threadIdx.x & 31); t < Tp; t += 32) {
            dt_s[pos0 + t] = 0.f;
            acum_s[pos0 + t] = base;
        }
    }
};

// scores c (one n8 block of rows ra, rb = ra + 8 and columns j, j + 1, in the accumulator layout) on the
// diagonal 16 x 16 block: CB_ij exp(acl_i - acl_j) dt_j where row i sees column j, else 0 (ta, tb: the rows'
// document starts)
template <bool DOCS>
__device__ __forceinline__ void diagonal_scores(float* c, const StepArrays& st, int j, int ra, int rb, int ta, int tb) {
    const float2 acj = *reinterpret_cast<const float2*>(st.acl + j);
    const float2 dtj = *reinterpret_cast<const float2*>(st.dt + j);
    const float aa = st.acl[ra], ab = st.acl[rb];
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const int i = e < 2 ? ra : rb, jj = j + (e & 1);
        const float ai = e < 2 ? aa : ab, aj = (e & 1) ? acj.y : acj.x, dj = (e & 1) ? dtj.y : dtj.x;
        bool ok = jj <= i;
        if (DOCS) ok = ok && jj >= (e < 2 ? ta : tb);
        c[e] = ok ? c[e] * decay_exp(ai - aj) * dj : 0.f;
    }
}

// The forward's 1-D grid (kernel_sizes.h, ForwardPlan): blocks [0, whole) run rows [0, whole) (row = b H + h)
// down the whole sequence; then the other `split` rows in nseg segments of seg_len rows, segment-major (block
// whole + z split + j is segment z of row whole + j), so every row's early segments start before any later ones.
struct ForwardGrid {
    int whole, split, nseg, seg_len;
    struct Block {
        int row, z, seg_len;  // seg_len: rows a segment spans (the padded sequence for a whole row)
        int slot;             // the segment's place in the states the fix-up reads (split row j: j (nseg - 1) + z)
    };
    unsigned blocks() const { return (unsigned)(whole + split * nseg); }
    __device__ Block block(int id, int Tp) const {
        if (id < whole) return {id, 0, Tp, -1};
        const int j = (id - whole) % split, z = (id - whole) / split;
        return {whole + j, z, seg_len, z + 1 < nseg ? j * (nseg - 1) + z : -1};
    }
};

// A forward block's head h of sequence b and its segment z (rows [z seg_len, z seg_len + Tl) of the sequence, the
// whole of it for a whole row): its parameters, the first rows of its x, B, C and y, and the preparing warp's
// StepPrep
template <int P, int N>
struct ForwardHead {
    ForwardGrid::Block blk;
    int h, b, z, g, H, Tl, Tpl;  // Tl: rows of the segment; Tpl: its saved positions (to the padded end on the last)
    float A, bias, dskip;
    size_t row0, pos0;  // the segment's first row; the head's first saved position of it
    const bf16 *xg, *bg, *cg;
    bf16* yg;
    __device__ ForwardHead(const SSDInputs& in, bf16* y, int T, int H_, int G, int Tp, const ForwardGrid& grid)
        : blk(grid.block(blockIdx.x, Tp)), h(blk.row % H_), b(blk.row / H_), z(blk.z), g(h / (H_ / G)), H(H_),
          Tl(min(T - z * blk.seg_len, blk.seg_len)), Tpl(min(Tp - z * blk.seg_len, blk.seg_len)),
          A(-expf(__bfloat162float(in.A_log[h]))), bias(__bfloat162float(in.dt_bias[h])),
          dskip(__bfloat162float(in.D[h])), row0((size_t)b * T + (size_t)z * blk.seg_len),
          pos0((size_t)blk.row * Tp + (size_t)z * blk.seg_len), xg(in.x + row0 * in.x_stride + h * P),
          bg(in.Bm + row0 * in.bc_stride + g * N), cg(in.Cm + row0 * in.bc_stride + g * N),
          yg(y + row0 * (size_t)(H * P) + h * P) {}
    template <bool DOCS>
    __device__ StepPrep<DOCS> prep(const SSDInputs& in, float* dt_s, float* acum_s) const {
        return {in.dt, in.pos, in.dt_stride, row0, pos0, h, Tl, bias, A, dt_s, acum_s};
    }
    // where the state leaving the segment goes (S^T: [n][p], fp32) when a later segment's fix-up needs it, else null
    __device__ float* state_out(float* seg_state) const {
        return blk.slot >= 0 ? seg_state + (size_t)blk.slot * (P * N) : nullptr;
    }
    // y = Y + D x for a lane's rows ra and rb (those below `valid`) of the step starting at row r0:
    // acc(n, e) is Y at row (e < 2 ? ra : rb), column 8 n + 2 q + e % 2; x(i, p) the bf16 pair of x at row i,
    // columns p and p + 1 (each forward kernel keeps its own layouts)
    template <typename Acc, typename X>
    __device__ void store_y(int r0, int valid, int ra, int rb, int q, Acc&& acc, X&& x) const {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int i = half ? rb : ra;
            if (i >= valid) continue;
            bf16* yr = yg + (size_t)(r0 + i) * (H * P);
#pragma unroll
            for (int n = 0; n < P / 8; n++) {
                const int p = n * 8 + 2 * q;
                const float2 xv = __bfloat1622float2(x(i, p));
                *reinterpret_cast<__nv_bfloat162*>(yr + p) =
                    __floats2bfloat162_rn(acc(n, 2 * half) + dskip * xv.x, acc(n, 2 * half + 1) + dskip * xv.y);
            }
        }
    }
};

// One block per whole row or segment (ForwardGrid), 4 warps; see the header for the pipeline. Dynamic smem:
// fwd_smem_bytes.
//   y phase, warp w: the 16 rows of row tile w (3 - w in every other wave of blocks), all P columns of y
//   state phase, warp w: all P rows, columns [wN/4, (w+1)N/4) of the state (fp32 registers, kept across steps)
// A segment before the last leaves its final state in seg_state (ForwardHead::state_out).
template <int P, int N, bool DOCS>
__global__ void __launch_bounds__(THREADS)
ssd_fwd_kernel(bf16* y, float* dt_s, float* acum_s, SSDInputs in, int T, int H, int G, int Tp, ForwardGrid grid,
               float* seg_state, int nsm) {
    static_assert(P % 16 == 0 && N % 64 == 0, "state tiles");
    constexpr int XS = TILE * (P + PAD), BS = TILE * (N + PAD);
    constexpr int MT = P / 16;   // m16 tiles of the state (rows p)
    constexpr int SN = N / 4;    // state columns per warp
    constexpr int SNT = SN / 8;  // their n8 tiles
    static_assert(SNT % 2 == 0, "pairs of n-tiles");
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* s_x = reinterpret_cast<bf16*>(smem);  // 2 buffers each: x, B, C of a step
    bf16* s_b = s_x + 2 * XS;
    bf16* s_c = s_b + 2 * BS;
    bf16* s_h = s_c + 2 * BS;  // the state entering the step, bf16 [P][N + PAD]
    StepArrays* s_st = reinterpret_cast<StepArrays*>(s_h + P * (N + PAD));  // 2 buffers

    const ForwardHead<P, N> hd(in, y, T, H, G, Tp, grid);
    float* sout = hd.state_out(seg_state);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, q = lane & 3;
    const int nsteps = (hd.Tl + TILE - 1) / TILE;
    // every other wave of blocks takes the row tiles of the y phase in reverse order (see rt below); the warp
    // with the lightest row tile prepares the next step
    const bool flip = (blockIdx.x / nsm) & 1;
    const bool prep = warp == (flip ? 3 : 0);

    auto load_step = [&](int s) {
        const int s0 = s * TILE, valid = min(TILE, hd.Tl - s0), buf = s & 1;
        load_rows<P>(s_x + buf * XS, hd.xg + (size_t)s0 * in.x_stride, in.x_stride, valid);
        load_rows<N>(s_b + buf * BS, hd.bg + (size_t)s0 * in.bc_stride, in.bc_stride, valid);
        load_rows<N>(s_c + buf * BS, hd.cg + (size_t)s0 * in.bc_stride, in.bc_stride, valid);
        cp_async_commit();
    };
    StepPrep<DOCS> sp = hd.template prep<DOCS>(in, dt_s, acum_s);

    load_step(0);
    if (prep) {
        sp.load(0);
        sp.prepare(s_st[0], 0);
    }

    float st_acc[MT][SNT][4];  // this warp's columns of the state, fp32
#pragma unroll
    for (int mt = 0; mt < MT; mt++) zero(st_acc[mt]);

    // y phase: this warp's 16 rows. Row tile r sees 16(r + 1) columns; warp w of both blocks on an SM shares a
    // sub-partition, hence the reversed order in every other wave
    const int rt = flip ? 3 - warp : warp;
    const int m0 = rt * 16, ra = m0 + (lane >> 2), rb = ra + 8;
    const int kend = rt + 1;  // k16 steps of j that rows < m0 + 16 see
    for (int s = 0; s < nsteps; s++) {
        const int buf = s & 1, s0 = s * TILE, valid = min(TILE, hd.Tl - s0);
        cp_async_wait_sync();  // step s's tiles, arrays and the state copy are in place; step s-1 is done
        const bool more = s + 1 < nsteps;
        if (more) load_step(s + 1);  // into the buffer step s-1 used
        if (prep && more) sp.load(s + 1);
        const StepArrays& st = s_st[buf];
        const bf16* sx = s_x + buf * XS;
        const bf16* sb = s_b + buf * BS;
        const bf16* sc = s_c + buf * BS;

        // ---- y phase: [C B^T | y_off] in one pass over this warp's rows of C
        {
            float cb[8][4], yo[P / 8][4];
            zero(cb);
            zero(yo);
#pragma unroll 2
            for (int k0 = 0; k0 < N; k0 += 16) {
                uint32_t a[4];
                load_a<false>(a, sc, N + PAD, m0, k0);
                mma_k16<8, false>(cb, a, sb, N + PAD, 0, k0, 0, 2 * kend);
                if (s > 0) mma_k16<P / 8, false>(yo, a, s_h, N + PAD, 0, k0);
            }
            const int ta = DOCS ? st.thr[ra] : -1, tb = DOCS ? st.thr[rb] : -1;
            // y_off to row tile rt's first row (0 for rows whose document starts in the step)
            scale_rows_acc(yo, ta < 0 ? st.em[rt] : 0.f, tb < 0 ? st.em[rt] : 0.f);
            // scores CB_ij exp(acl_i - acl_j) dt_j where row i sees column j: left of the row tile without the row
            // factor exp(acl_i - acl_m0), which is applied to the accumulator; the diagonal 16 x 16 block exactly
#pragma unroll
            for (int n = 0; n < 8; n++) {
                if (n >= 2 * kend) continue;
                const int j = n * 8 + 2 * q;
                if (n < 2 * rt) {
                    const float2 f = *reinterpret_cast<const float2*>(st.fdt[rt - 1] + j);
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const bool ok = !DOCS || j + (e & 1) >= (e < 2 ? ta : tb);
                        cb[n][e] = ok ? cb[n][e] * ((e & 1) ? f.y : f.x) : 0.f;
                    }
                } else {
                    diagonal_scores<DOCS>(cb[n], st, j, ra, rb, ta, tb);
                }
            }
            uint32_t pa[4][4];
            acc_to_a(pa, cb);
            warp_mma_rega<P / 8>(yo, pa, sx, P + PAD, 0, rt);  // columns left of the row tile
            scale_rows_acc(yo, st.e0[ra], st.e0[rb]);
            warp_mma_rega<P / 8>(yo, pa, sx, P + PAD, rt, rt + 1);  // the diagonal block
            hd.store_y(s0, valid, ra, rb, q, [&](int n, int e) { return yo[n][e]; },
                       [&](int i, int p) { return *reinterpret_cast<const __nv_bfloat162*>(sx + i * (P + PAD) + p); });
        }
        if (prep && more) sp.prepare(s_st[(s + 1) & 1], s + 1);
        __syncthreads();  // every warp is done reading the state copy
        if (!more && !sout) break;  // the state leaving the sequence is not needed

        // ---- state phase: Hout = decay Hin + (w x)^T B, this warp's columns
        {
            const float dec = st.decay;
#pragma unroll
            for (int mt = 0; mt < MT; mt++) scale_rows_acc(st_acc[mt], dec, dec);
            const int n0 = warp * SN;
#pragma unroll
            for (int kk = 0; kk < TILE / 16; kk++) {
                uint32_t bfr[SNT][2];
                // B rows j scaled by w_j (b0: k = 2q, 2q+1; b1: k = 2q+8, 2q+9), shared by the MT m-tiles
                const float2 w01 = *reinterpret_cast<const float2*>(st.w + kk * 16 + 2 * q);
                const float2 w89 = *reinterpret_cast<const float2*>(st.w + kk * 16 + 2 * q + 8);
#pragma unroll
                for (int nt = 0; nt < SNT; nt += 2) {
                    uint32_t t4[4];
                    ldsm_x4_t(t4, sb + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * (N + PAD) + n0 + nt * 8 +
                                      (lane >> 4) * 8);
                    bfr[nt][0] = scale_bf16x2(t4[0], w01.x, w01.y);
                    bfr[nt][1] = scale_bf16x2(t4[1], w89.x, w89.y);
                    bfr[nt + 1][0] = scale_bf16x2(t4[2], w01.x, w01.y);
                    bfr[nt + 1][1] = scale_bf16x2(t4[3], w89.x, w89.y);
                }
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    uint32_t a[4];
                    load_a<true>(a, sx, P + PAD, mt * 16, kk * 16);  // x^T: rows p, columns j
#pragma unroll
                    for (int nt = 0; nt < SNT; nt++) mma_bf16(st_acc[mt][nt], a, bfr[nt][0], bfr[nt][1]);
                }
            }
            // the bf16 copy that the next step's y_off reads
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < SNT; nt++) {
                    const int p = mt * 16 + (lane >> 2), n = n0 + nt * 8 + 2 * q;
                    *reinterpret_cast<uint32_t*>(s_h + p * (N + PAD) + n) = pack_bf16(st_acc[mt][nt][0], st_acc[mt][nt][1]);
                    *reinterpret_cast<uint32_t*>(s_h + (p + 8) * (N + PAD) + n) =
                        pack_bf16(st_acc[mt][nt][2], st_acc[mt][nt][3]);
                }
        }
    }
    if (sout)  // S^T: [n][p]
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int nt = 0; nt < SNT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    sout[(warp * SN + nt * 8 + 2 * q + (e & 1)) * P + mt * 16 + (lane >> 2) + 8 * (e >> 1)] =
                        st_acc[mt][nt][e];
    if (prep) sp.finish(nsteps, hd.Tpl);
}

inline size_t fwd_smem_bytes(int P, int N) {
    return (size_t)(2 * TILE * (P + PAD) + 4 * TILE * (N + PAD) + P * (N + PAD)) * sizeof(bf16) +
           2 * sizeof(StepArrays);
}

// Forward in segments (the split rows of kernel_sizes.h's ForwardPlan): every segment started from a zero state.
// The state truly entering segment z > 0 is Hin_z = decay_{z-1} Hin_{z-1} + S_{z-1} (Hin_0 = 0), S_k the state
// segment k left and decay_k = exp(sum of dt A over segment k), 0 when its last row's document started inside it.
// Row i of segment z whose document started before the segment owes y_i += exp(Acum_i) Hin_z C_i (Acum_i: the
// cumsum of dt A from the segment's start, from the saved chunk-local cumsums). Two passes: the states, then the
// rows with a block per 64-row tile (one block walking a segment's tiles waited on each tile's loads in turn:
// slower than no segments).

// sum of dt A over chunks [c0, c1) of a (b, h) row of the saved chunk-local cumsums (each chunk's total is its
// last row's cumsum)
__device__ inline float chunk_totals(const float* acum, int c0, int c1) {
    float sum = 0.f;
    for (int c = c0; c < c1; c++) sum += acum[(size_t)c * CHUNK + CHUNK - 1];
    return sum;
}

// Hin_{k+1} in place of S_k for k = 0 .. nseg - 2 (fp32, [n][p]); grid (P N / (4 THREADS), split rows), 4
// elements a thread
template <bool DOCS>
__global__ void __launch_bounds__(THREADS)
ssd_segment_hin_kernel(float* seg_state, const float* acum_s, const int* pos, int T, int H, int Tp, ForwardGrid grid,
                       int PN) {
    const int row = grid.whole + blockIdx.y, b = row / H, nseg = grid.nseg, seg_len = grid.seg_len;
    const int seg_chunks = seg_len / CHUNK;
    const float* acum = acum_s + (size_t)row * Tp;
    float4* st = reinterpret_cast<float4*>(seg_state + (size_t)blockIdx.y * (nseg - 1) * PN) +
                 blockIdx.x * THREADS + threadIdx.x;
    float4 hin = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int k = 0; k + 1 < nseg; k++) {
        float decay = 0.f;  // of Hin_k over segment k
        if (k > 0) {
            const int last = (k + 1) * seg_len - 1;
            const bool cut = DOCS && pos[(size_t)b * T + last] <= last - k * seg_len;
            decay = cut ? 0.f : decay_exp(chunk_totals(acum, k * seg_chunks, (k + 1) * seg_chunks));
        }
        float4* sk = st + (size_t)k * (PN / 4);
        const float4 v = *sk;
        hin = make_float4(decay * hin.x + v.x, decay * hin.y + v.y, decay * hin.z + v.z, decay * hin.w + v.w);
        *sk = hin;
    }
}

// y_i += exp(Acum_i) Hin_z C_i for one 64-row tile of segment z > 0; grid (tiles a segment, segments - 1, split
// rows). The factor only shrinks down a segment (decays and document starts), so a tile whose first row owes
// nothing is done at once.
template <int P, int N, bool DOCS>
__global__ void __launch_bounds__(THREADS)
ssd_segment_fixup_kernel(bf16* y, const float* seg_state, const float* acum_s, SSDInputs in, int T, int H, int G,
                         int Tp, ForwardGrid grid) {
    __shared__ __align__(16) bf16 s_c[TILE * (N + PAD)];  // C rows of the tile
    __shared__ __align__(16) bf16 s_h[N * (P + PAD)];     // Hin^T: rows n, P contiguous
    __shared__ float s_f[TILE];                            // exp(Acum_i) where row i sees Hin, else 0
    const int row = grid.whole + blockIdx.z, z = blockIdx.y + 1, h = row % H, b = row / H, g = h / (H / G);
    const int begin = z * grid.seg_len, i0 = blockIdx.x * TILE, valid = min(TILE, T - begin - i0);
    if (valid <= 0) return;  // past the end of the last segment
    const float* acum = acum_s + (size_t)row * Tp;
    const size_t r0 = (size_t)b * T + begin + i0;
    if (threadIdx.x < TILE) {
        const int i = threadIdx.x, t = begin + i0 + i;
        const float base = chunk_totals(acum, begin / CHUNK, (begin + i0) / CHUNK);  // from the segment's start
        float f = i < valid ? decay_exp(base + acum[t]) : 0.f;
        if (DOCS && i < valid && t - in.pos[r0 + i] >= begin) f = 0.f;  // its document started in the segment
        s_f[i] = f;
    }
    __syncthreads();
    if (s_f[0] == 0.f) return;

    load_rows<N>(s_c, in.Cm + r0 * in.bc_stride + g * N, in.bc_stride, valid);
    cp_async_commit();
    const float* hz = seg_state + ((size_t)blockIdx.z * (grid.nseg - 1) + z - 1) * (P * N);
    for (int e = 4 * threadIdx.x; e < P * N; e += 4 * THREADS) {
        const float4 v = *reinterpret_cast<const float4*>(hz + e);
        uint2 u;
        u.x = pack_bf16(v.x, v.y);
        u.y = pack_bf16(v.z, v.w);
        *reinterpret_cast<uint2*>(s_h + (e / P) * (P + PAD) + e % P) = u;
    }
    cp_async_wait_sync();

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, q = lane & 3;
    float acc[P / 8][4];
    zero(acc);
    warp_mma<P / 8, false, true>(acc, s_c, N + PAD, 16 * warp, s_h, P + PAD, 0, N);
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int i = 16 * warp + (lane >> 2) + 8 * half;
        const float f = s_f[i];
        if (i >= valid || f == 0.f) continue;
        bf16* yr = y + (r0 + i) * (size_t)(H * P) + h * P;
#pragma unroll
        for (int n = 0; n < P / 8; n++) {
            const int p = n * 8 + 2 * q;
            const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(yr + p));
            *reinterpret_cast<__nv_bfloat162*>(yr + p) =
                __floats2bfloat162_rn(v.x + f * acc[n][2 * half], v.y + f * acc[n][2 * half + 1]);
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Backward: chunk states. grid (nchunks, 2H / HB, B), a block HB heads of one group; blocks y < H / HB: out =
// S_c = sum_j w_j x_j B_j^T with w_j = dt_j exp(Aend - Acum_j) (rows j >= lds), into hst; blocks y >= H / HB:
// out = dS_c = sum_i wt_i dy_i C_i^T with wt_i = exp(Acum_i) (rows whose document started before the chunk),
// into gst. Both P x N bf16 per head. The heads of a block share each B (or C) tile, read once from memory
// for all HB (with one group every head's block read the same tiles again: the kernel was bound by L2). Warps
// own 32 x N/WN tiles of each head's out; the row weights scale the A fragments in registers. Dynamic smem
// chunk_state_smem_bytes: two buffers of the tiles, the next tiles load while the current ones are multiplied.
template <int P, int N, bool DOCS, int HB>
__global__ void __launch_bounds__(THREADS)
ssd_bwd_states_kernel(bf16* hst, bf16* gst, const float* dt_s, const float* acum_s, const bf16* dy, SSDInputs in,
                      int T, int H, int G) {
    constexpr int WM = P / 32, WN = 4 / WM, NT = N / WN / 8;
    static_assert(WM * WN == 4 && NT % 2 == 0, "warp layout");
    constexpr int VS = TILE * (P + PAD), WS = TILE * (N + PAD);
    __shared__ __align__(16) float s_wt[HB][CHUNK];
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* s_v = reinterpret_cast<bf16*>(smem);  // [buffer][head] tiles
    bf16* s_w = s_v + 2 * HB * VS;              // [buffer] tiles
    const int c = blockIdx.x, nc = gridDim.x, b = blockIdx.z, hblocks = H / HB;
    const bool grad = blockIdx.y >= hblocks;
    const int h0 = (grad ? blockIdx.y - hblocks : blockIdx.y) * HB, g = h0 / (H / G);
    const int t0 = c * CHUNK, valid = min(CHUNK, T - t0), ntiles = (valid + TILE - 1) / TILE;
    const size_t row0 = (size_t)b * T + t0;
    const bf16* v = grad ? dy + row0 * (size_t)(H * P) + h0 * P : in.x + row0 * in.x_stride + h0 * P;
    const size_t v_stride = grad ? (size_t)H * P : (size_t)in.x_stride;
    const bf16* w = (grad ? in.Cm : in.Bm) + row0 * in.bc_stride + g * N;
    auto load_tile = [&](int k) {
        const int j0 = k * TILE;
#pragma unroll
        for (int j = 0; j < HB; j++)
            load_rows<P>(s_v + ((k & 1) * HB + j) * VS, v + j * P + j0 * v_stride, v_stride, valid - j0);
        load_rows<N>(s_w + (k & 1) * WS, w + (size_t)j0 * in.bc_stride, in.bc_stride, valid - j0);
        cp_async_commit();
    };
    load_tile(0);

    int lds = -1;
    if (DOCS) lds = doc_thr(in.pos, row0, valid - 1, valid);
#pragma unroll
    for (int j = 0; j < HB; j++) {
        const size_t pos0 = ((size_t)b * H + h0 + j) * nc * CHUNK + (size_t)t0;
        const float aend = acum_s[pos0 + CHUNK - 1];
        for (int i = threadIdx.x; i < CHUNK; i += blockDim.x) {
            float wt = 0.f;
            if (i < valid) {
                if (grad) wt = (!DOCS || doc_thr(in.pos, row0, i, valid) < 0) ? expf(acum_s[pos0 + i]) : 0.f;
                else wt = i >= lds ? dt_s[pos0 + i] * expf(aend - acum_s[pos0 + i]) : 0.f;
            }
            s_wt[j][i] = wt;
        }
    }

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int m0 = (warp % WM) * 32, n0 = (warp / WM) * (N / WN);
    float acc[HB][2][NT][4];
#pragma unroll
    for (int j = 0; j < HB; j++) {
        zero(acc[j][0]);
        zero(acc[j][1]);
    }
    for (int k = 0; k < ntiles; k++) {
        if (k + 1 < ntiles) {
            load_tile(k + 1);  // its buffers were freed by the barrier ending iteration k - 1
            cp_async_wait_group<1>();
        } else {
            cp_async_wait_group<0>();
        }
        __syncthreads();  // (the first also publishes s_wt)
#pragma unroll
        for (int j = 0; j < HB; j++)
            warp_mma_kscaled<2, NT>(acc[j], s_v + ((k & 1) * HB + j) * VS, P + PAD, m0, s_w + (k & 1) * WS, N + PAD,
                                    n0, TILE, s_wt[j] + k * TILE);
        __syncthreads();
    }
    const int cl = n0 + 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < HB; j++) {
        bf16* o = (grad ? gst : hst) + (((size_t)b * H + h0 + j) * nc + c) * P * N;
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
            const int r = m0 + 16 * mt + (lane >> 2);
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                *reinterpret_cast<uint32_t*>(o + r * N + cl + nt * 8) = pack_bf16(acc[j][mt][nt][0], acc[j][mt][nt][1]);
                *reinterpret_cast<uint32_t*>(o + (r + 8) * N + cl + nt * 8) =
                    pack_bf16(acc[j][mt][nt][2], acc[j][mt][nt][3]);
            }
        }
    }
}

// the heads a states block takes: 2 when a group's heads pair up
inline int chunk_state_heads(const SSDShape& sh) { return sh.H / sh.G % 2 == 0 ? 2 : 1; }
inline size_t chunk_state_smem_bytes(int P, int N, int HB) {
    return (size_t)2 * TILE * (HB * (P + PAD) + N + PAD) * sizeof(bf16);
}

// decay of chunk c's entering state over the chunk (0 when a document starts in the chunk)
template <bool DOCS>
__device__ inline float chunk_decay(const float* acum_bh, const int* pos, size_t brow, int c, int T) {
    if (DOCS) {
        const int t0 = c * CHUNK, valid = min(CHUNK, T - t0);
        if (doc_thr(pos, brow + t0, valid - 1, valid) >= 0) return 0.f;
    }
    return expf(acum_bh[(size_t)c * CHUNK + CHUNK - 1]);
}

// state passing over the chunks, in place, 4 elements of a (b, h) state per thread; grid (splits, B*H)
//   forward: hst_c = S_c becomes Hin_c:  Hin_{c+1} = decay_c Hin_c + S_c
//   reverse: gst_c = dS_c becomes Gout_c = G_{c+1} with G_c = decay_c G_{c+1} + dS_c (G_nc = 0);
//            dots[b,h,c,split] = decay_c <Gout_c, Hin_c> (the gradient of Aend_c through the pass)
template <bool DOCS>
__global__ void __launch_bounds__(PASS_THREADS)
ssd_state_pass_kernel(bf16* hst, bf16* gst, float* dots, const float* acum_s, const int* pos, int T, int H, int nc,
                      int PN) {
    const size_t bh = blockIdx.y, brow = (bh / H) * (size_t)T;
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    const bool ok = e < PN / 4;
    const float* acum = acum_s + bh * nc * CHUNK;
    uint2* hp = reinterpret_cast<uint2*>(hst + bh * nc * PN) + e;
    uint2* gp = reinterpret_cast<uint2*>(gst + bh * nc * PN) + e;
    const size_t cs = PN / 4;  // uint2 per chunk state
    float hs[4] = {0.f, 0.f, 0.f, 0.f};
    uint2 next = ok ? hp[0] : make_uint2(0, 0);
    for (int c = 0; c < nc; c++) {
        const uint2 cur = next;
        if (ok && c + 1 < nc) next = hp[(c + 1) * cs];  // prefetch the next chunk
        const float decay = chunk_decay<DOCS>(acum, pos, brow, c, T);
        if (ok) hp[c * cs] = make_uint2(pack_bf16(hs[0], hs[1]), pack_bf16(hs[2], hs[3]));
        const float2 s0 = unpack_bf16(cur.x), s1 = unpack_bf16(cur.y);
        hs[0] = decay * hs[0] + s0.x;
        hs[1] = decay * hs[1] + s0.y;
        hs[2] = decay * hs[2] + s1.x;
        hs[3] = decay * hs[3] + s1.y;
    }
    hs[0] = hs[1] = hs[2] = hs[3] = 0.f;
    next = ok ? gp[(nc - 1) * cs] : make_uint2(0, 0);
    for (int c = nc - 1; c >= 0; c--) {
        const uint2 cur = next;
        if (ok && c > 0) next = gp[(c - 1) * cs];
        const float decay = chunk_decay<DOCS>(acum, pos, brow, c, T);
        float d = 0.f;
        if (ok) {
            gp[c * cs] = make_uint2(pack_bf16(hs[0], hs[1]), pack_bf16(hs[2], hs[3]));
            const uint2 hv = hp[c * cs];  // Hin_c, written by this thread above
            const float2 h0 = unpack_bf16(hv.x), h1 = unpack_bf16(hv.y);
            d = hs[0] * h0.x + hs[1] * h0.y + hs[2] * h1.x + hs[3] * h1.y;
        }
        d = block_sum(d);
        if (threadIdx.x == 0) dots[(bh * nc + c) * gridDim.x + blockIdx.x] = decay * d;
        const float2 s0 = unpack_bf16(cur.x), s1 = unpack_bf16(cur.y);
        hs[0] = decay * hs[0] + s0.x;
        hs[1] = decay * hs[1] + s0.y;
        hs[2] = decay * hs[2] + s1.x;
        hs[3] = decay * hs[3] + s1.y;
    }
}

// ----------------------------------------------------------------------------------------------
// wgmma for the backward tile kernels (sm_90a builds, heads of 64): 64 x 64 and 64 x N tiles in the swizzled
// layout (load_rows_sw128, 1024-aligned); accumulators in mma.sync's layout (hopper.cuh: wgmma gives warp w rows
// 16w .. 16w + 15 in the same fragment per 8 columns), so the epilogues serve both paths

// A fragments of the warp's 16 rows of a 64 x 64 swizzled tile, the 4 k-steps (A_KM: the tile holds A k-major),
// SCALE: rows g / g + 8 times sa / sb
template <bool A_KM, bool SCALE = false>
__device__ inline void load_a_tile_sw(uint32_t (&a)[4][4], const bf16* s, float sa = 1.f, float sb = 1.f) {
    const int m0 = (threadIdx.x >> 5) * 16;
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        load_a<A_KM, true>(a[kk], s, 0, m0, kk * 16);
        if (SCALE) {
            a[kk][0] = scale_bf16x2(a[kk][0], sa, sa); a[kk][1] = scale_bf16x2(a[kk][1], sb, sb);
            a[kk][2] = scale_bf16x2(a[kk][2], sa, sa); a[kk][3] = scale_bf16x2(a[kk][3], sb, sb);
        }
    }
}

#ifdef SM90A
constexpr bool WGMMA_BUILD = true;
// m = A B^T for two 64-row tiles (K columns, both K-major)
template <int K>
__device__ inline void tile_abt_wgmma(float (&m)[8][4], const bf16* s_a, const bf16* s_b) {
    using namespace hopper;
    const uint64_t da = desc_sw128(smem_u32(s_a), 16), db = desc_sw128(smem_u32(s_b), 16);
    float d[32];
    wg_fence();
    wgmma_ss_first<0, 0>(d, da, db);
#pragma unroll
    for (int kk = 1; kk < K / 16; kk++) {
        const uint32_t off = (kk / 4) * TILE * 128 + (kk % 4) * 32;  // column block, k-step inside it
        wgmma_ss<0, 0>(d, desc_add(da, off), desc_add(db, off), 1);
    }
    wg_commit();
    wg_wait<0>();
    fence_regs(d);
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) m[n][e] = d[4 * n + e];
}
// acc (64 x 8NT) += A B for A (64 x 64) in registers (load_a_tile_sw, or packed accumulators: mma.sync's A
// fragments per k-step are wgmma's) and B (64 rows along K x 8NT columns) MN-major (its columns contiguous)
template <int NT>
__device__ inline void tile_acc_ab_wgmma(float (&acc)[NT][4], const uint32_t (&a)[4][4], const bf16* s_b) {
    using namespace hopper;
    const uint64_t db = desc_sw128(smem_u32(s_b), TILE * 128);
    float(&d)[4 * NT] = *reinterpret_cast<float(*)[4 * NT]>(&acc[0][0]);  // the same registers in the same order
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 4; kk++) wgmma_rs<1>(d, a[kk], desc_add(db, kk * 16 * 128), 1);
    wg_commit();
    wg_wait<0>();
    fence_regs(d);
}
#else
constexpr bool WGMMA_BUILD = false;
#endif

// acc = A B^T for two 64-row smem tiles of K columns (both K-major), the rows m0 .. m0 + 15 of this warp: on
// wgmma (WG: swizzled tiles, every column), else on mma.sync over the n-tiles [nlo, nhi) only (the rest zero)
template <int NT, int K, bool WG>
__device__ inline void tile_abt(float (&acc)[NT][4], const bf16* s_a, const bf16* s_b, int m0, int nlo = 0,
                                int nhi = NT) {
    if constexpr (WG) {
        static_assert(NT == 8, "wgmma tiles of 64 columns");
#ifdef SM90A
        tile_abt_wgmma<K>(acc, s_a, s_b);
#endif
    } else {
        zero(acc);
        warp_mma<NT, false, false>(acc, s_a, K + PAD, m0, s_b, K + PAD, 0, K, 1.f, 1.f, nlo, nhi);
    }
}

// ----------------------------------------------------------------------------------------------
// the two backward tile kernels: a 1-D grid of B nchunks G slices NTILE blocks in groups of pairs (tile_index)

// what a block works on: 64-row tile `tile` (chunk-local rows r0..) of chunk c (of nc) in batch b, the heads
// h0 .. h0 + hps of group g (head slice sl); `valid` positions of the chunk are inside the sequence.
// The tile rank orders a group's blocks by their work, the heaviest first (the row kernel's tile it meets it + 1
// column tiles, the column kernel's tile jt NTILE - jt row tiles): the light ones fill its end.
struct TileBlock {
    int c, tile, nc, g, sl, b, hps, h0, t0, valid, r0;
    __device__ __forceinline__ TileBlock(int T, int H, int G, int nsl, int group, bool last_tile_heaviest) {
        nc = (T + CHUNK - 1) / CHUNK;
        const TileIndex ix = tile_index(blockIdx.x, gridDim.x / (NTILE * G * nsl), G * nsl, group);
        b = ix.pair / nc, c = ix.pair % nc, tile = last_tile_heaviest ? NTILE - 1 - ix.rank : ix.rank;
        g = ix.slice / nsl, sl = ix.slice % nsl;
        hps = H / G / nsl, h0 = g * (H / G) + sl * hps;
        t0 = c * CHUNK, valid = min(CHUNK, T - t0), r0 = tile * TILE;
    }
    // W of tile pair (it, jt) of this block's chunk, group and slice: 64 x 64 bf16, [i][j]
    __device__ __forceinline__ size_t w_offset(int nsl, int G, int it, int jt) const {
        return ((((size_t)b * nc + c) * G + g) * nsl + sl) * (NTILE * NTILE * TILE * TILE) +
               (size_t)(it * NTILE + jt) * TILE * TILE;
    }
};

// this block's dB or dC partial (chunk-local rows ra, rb of a 16 x N accumulator; rows past the sequence
// skipped) into the head-slice partials, layout (B, T, G, slices, N)
template <int N>
__device__ __forceinline__ void store_slice_part(float* part, const float (&acc)[N / 8][4], const TileBlock& tb,
                                                 size_t row0, int G, int nsl, int ra, int rb) {
    const int q = threadIdx.x & 3;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int r = half ? rb : ra;
        if (r >= tb.valid) continue;
        float* o = part + (((row0 + r) * G + tb.g) * nsl + tb.sl) * N + 2 * q;
#pragma unroll
        for (int n = 0; n < N / 8; n++)
            *reinterpret_cast<float2*>(o + n * 8) = make_float2(acc[n][2 * half], acc[n][2 * half + 1]);
    }
}

// Row direction: one 64-row tile of positions i (rows of warp w: i0 + 16w ..), a slice of the heads of a group.
//   state part, per head:  dC_i += e_i Hin^T dy_i,  off_i = e_i dy_i . (Hin C_i)   (e_i = exp(Acum_i), 0 if the
//                          row's document started in the chunk)
//   intra part, per column tile jt <= it: CB = C_it B_jt^T once; per head M = dy_it x_jt^T and
//                          Lam_ij = L_ij dt_j M_ij (pairs that count), W += Lam, and the row and column sums of
//                          Z = CB Lam (rsum_i, and csum_j's partial from this row tile): the gradient of Acum is
//                          their difference, which cancels, so both come from the same fp32 products;
//                          then dC_i += W B_jt once and W (bf16) to memory for the column kernel
// WG (sm_90a, P = 64): every matmul on wgmma, its smem operands in the swizzled layout. Dynamic smem row_smem_bytes.
template <int P, int N, bool DOCS, bool WG>
__global__ void __launch_bounds__(THREADS)
ssd_bwd_row_kernel(float* dc_part, BwdScratch sc, const float* dt_s, const float* acum_s, const bf16* dy,
                   SSDInputs in, int T, int H, int G, int nsl, int group) {
    constexpr int CS = TILE * (N + PAD), XS = TILE * (P + PAD), HS = P * (N + PAD);
    constexpr int UB = (XS + HS > 2 * XS ? XS + HS : 2 * XS);  // one buffer: dy + Hin, or x + dy
    static_assert(!WG || (P == 64 && CS * 2 % 1024 == 0 && XS * 2 % 1024 == 0 && UB * 2 % 1024 == 0),
                  "wgmma tiles: 128-byte column blocks, 1024-aligned");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024 - ((uint32_t)__cvta_generic_to_shared(smem_raw) & 1023)) & 1023);
    bf16* s_c = reinterpret_cast<bf16*>(smem);  // C_it
    bf16* s_b = s_c + CS;                       // B_jt
    bf16* s_u = s_b + CS;                       // 2 buffers of UB
    float* s_dt = reinterpret_cast<float*>(s_u + 2 * UB);  // 2 buffers: dt, Acum of the chunk
    float* s_ac = s_dt + 2 * CHUNK;
    __shared__ float s_rsum[MAX_HPS][TILE];
    __shared__ __align__(16) float s_cs[2][THREADS / 32][TILE];  // per warp column sums of Z (float2 stores), 2 buffers

    const TileBlock tb(T, H, G, nsl, group, true);
    const int it = tb.tile, i0 = tb.r0, g = tb.g, valid = tb.valid;
    if (i0 >= valid) return;
    const size_t row0 = (size_t)tb.b * T + tb.t0, Tp = (size_t)tb.nc * CHUNK;
    const int dy_stride = H * P;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, m0 = warp * 16, q = lane & 3;
    const int ra = i0 + m0 + (lane >> 2), rb = ra + 8;  // chunk-local rows (positions i)
    const int tha = DOCS ? doc_thr(in.pos, row0, ra, valid) : -1, thb = DOCS ? doc_thr(in.pos, row0, rb, valid) : -1;

    load_rows_as<N, WG>(s_c, in.Cm + (row0 + i0) * in.bc_stride + g * N, in.bc_stride, valid - i0);
    auto load_b = [&](int jt) {
        load_rows_as<N, WG>(s_b, in.Bm + (row0 + jt * TILE) * in.bc_stride + g * N, in.bc_stride, valid - jt * TILE);
    };
    load_b(0);  // lands during the state part, which does not read s_b
    for (int i = threadIdx.x; i < MAX_HPS * TILE; i += blockDim.x) s_rsum[i / TILE][i % TILE] = 0.f;
    auto arrays = [&](int h, int buf) {
        const size_t pos0 = ((size_t)tb.b * H + h) * Tp + tb.t0;
        load_floats(s_dt + buf * CHUNK, dt_s + pos0, CHUNK);
        load_floats(s_ac + buf * CHUNK, acum_s + pos0, CHUNK);
    };

    float dc[N / 8][4];
    zero(dc);
    // ---- state part: per head, dy_it and Hin (double-buffered over the heads)
    auto load_state = [&](int hh, int buf) {
        const int h = tb.h0 + hh;
        bf16* u = s_u + buf * UB;
        const bf16* hin = sc.hst + (((size_t)tb.b * H + h) * tb.nc + tb.c) * P * N;
        load_rows_as<P, WG>(u, dy + (row0 + i0) * dy_stride + h * P, dy_stride, valid - i0);
        load_rows_as<N, WG, P>(u + XS, hin, N, P);
        arrays(h, buf);
        cp_async_commit();
    };
    load_state(0, 0);
    for (int hh = 0; hh < tb.hps; hh++) {
        const int buf = hh & 1, h = tb.h0 + hh;
        if (hh + 1 < tb.hps) {
            load_state(hh + 1, buf ^ 1);
            cp_async_wait_group<1>();
        } else {
            cp_async_wait_group<0>();
        }
#ifdef SM90A
        if constexpr (WG) hopper::fence_async_smem();  // the copies are read by wgmma, the async proxy
#endif
        __syncthreads();
        const bf16* s_dy = s_u + buf * UB;
        const bf16* s_h = s_dy + XS;
        const float* ac = s_ac + buf * CHUNK;
        const float ea = (tha < 0) ? expf(ac[ra]) : 0.f, eb = (thb < 0) ? expf(ac[rb]) : 0.f;
        float oa, ob;
        {
            float yo[P / 8][4];  // Hin C_i
            tile_abt<P / 8, N, WG>(yo, s_c, s_h, m0);
            row_dots<P / 8, WG>(oa, ob, yo, s_dy, P + PAD, m0);
        }
        oa = ea * quad_sum(oa);
        ob = eb * quad_sum(ob);
        if constexpr (WG) {
#ifdef SM90A
            uint32_t a[4][4];  // e_i dy_i
            load_a_tile_sw<false, true>(a, s_dy, ea, eb);
            tile_acc_ab_wgmma(dc, a, s_h);
#endif
        } else {
            warp_mma<N / 8, false, true, true>(dc, s_dy, P + PAD, m0, s_h, N + PAD, 0, P, ea, eb);
        }
        if (q == 0) {
            const size_t pos0 = ((size_t)tb.b * H + h) * Tp + tb.t0;
            sc.off[pos0 + ra] = oa;
            sc.off[pos0 + rb] = ob;
        }
        __syncthreads();
    }

    // ---- intra part: column tiles jt <= it; per tile the heads stream x_jt, dy_it (double-buffered over the
    // sequence of (jt, head) pairs)
    const int npairs = (it + 1) * tb.hps;
    auto load_pair = [&](int jt, int hh, int buf) {
        const int h = tb.h0 + hh, j0 = jt * TILE;
        bf16* u = s_u + buf * UB;
        const bf16* xg = in.x + (row0 + j0) * in.x_stride + h * P;
        const bf16* dyg = dy + (row0 + i0) * dy_stride + h * P;
        load_rows_as<P, WG>(u, xg, in.x_stride, valid - j0);
        load_rows_as<P, WG>(u + XS, dyg, dy_stride, valid - i0);
        arrays(h, buf);
        cp_async_commit();
    };
    load_pair(0, 0, 0);
    // the column sums of pair (jt, hh) (summed over the warps, buffer buf) into the csum partial of row tile it
    auto flush_csum = [&](int jt, int hh, int buf) {
        if (threadIdx.x < TILE) {
            const int h = tb.h0 + hh;
            const float* c = s_cs[buf][0];
            const float v = c[threadIdx.x] + c[TILE + threadIdx.x] + c[2 * TILE + threadIdx.x] + c[3 * TILE + threadIdx.x];
            sc.csum[(((size_t)tb.b * H + h) * Tp + tb.t0 + jt * TILE + threadIdx.x) * NTILE + it] = v;
        }
    };
    float cbv[8][4], wacc[8][4];
    int jt = 0, hh = 0, pjt = 0, phh = 0;  // pair k = jt * hps + hh, and the previous pair (no divisions)
    for (int k = 0; k < npairs; k++) {
        const int j0 = jt * TILE, buf = k & 1;
        const int njt = hh + 1 < tb.hps ? jt : jt + 1, nhh = hh + 1 < tb.hps ? hh + 1 : 0;  // the next pair
        const int kend = jt == it ? warp + 1 : 4;  // k16 steps of j that rows < m0 + 16 see
        if (hh == 0 && jt > 0) {  // a new column tile: B_jt (B_0 came with the state part)
            load_b(jt);
            cp_async_commit();
        }
        if (k + 1 < npairs) {
            load_pair(njt, nhh, buf ^ 1);  // that buffer was freed by the barrier ending iteration k - 1
            cp_async_wait_group<1>();
        } else {
            cp_async_wait_group<0>();
        }
#ifdef SM90A
        if constexpr (WG) hopper::fence_async_smem();  // the copies are read by wgmma, the async proxy
#endif
        __syncthreads();
        if (k > 0) flush_csum(pjt, phh, buf ^ 1);
        if (hh == 0) {
            zero(wacc);
            tile_abt<8, N, WG>(cbv, s_c, s_b, m0, 0, 2 * kend);
        }
        const bf16* s_x = s_u + buf * UB;
        const bf16* s_dy = s_x + XS;
        const float* dtv = s_dt + buf * CHUNK;
        const float* ac = s_ac + buf * CHUNK;
        float m[8][4];  // dy_i . x_j (the scores use the columns the rows see)
        tile_abt<8, P, WG>(m, s_dy, s_x, m0, 0, 2 * kend);
        const float aa = ac[ra], ab = ac[rb];
        // The decay of a pair i >= j factors through the warp's first row p when j < p: exp(a_i - a_p) exp(a_p - a_j),
        // both <= 1. Only the warp's diagonal 16 x 16 block of the diagonal tile (n-tiles 2 warp, 2 warp + 1) takes
        // an exp a pair and the causal mask; every other pair costs two multiplies.
        const float ap = ac[i0 + m0], fa = decay_exp(aa - ap), fb = decay_exp(ab - ap);
        float rsa = 0.f, rsb = 0.f, cs[8][2];
        auto scores = [&](int n, auto diag_block) {
            const int j = j0 + n * 8 + 2 * q;
            const float2 acj = *reinterpret_cast<const float2*>(ac + j);
            const float2 dtj = *reinterpret_cast<const float2*>(dtv + j);
            float2 fj;  // exp(a_p - a_j) dt_j
            if constexpr (!diag_block) fj = make_float2(decay_exp(ap - acj.x) * dtj.x, decay_exp(ap - acj.y) * dtj.y);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = e < 2 ? ra : rb, jj = j + (e & 1);
                bool ok = true;
                float l;
                if constexpr (diag_block) {
                    ok = jj <= i;
                    l = decay_exp((e < 2 ? aa : ab) - ((e & 1) ? acj.y : acj.x)) * ((e & 1) ? dtj.y : dtj.x);
                } else {
                    l = (e < 2 ? fa : fb) * ((e & 1) ? fj.y : fj.x);
                }
                if (DOCS) ok = ok && jj >= (e < 2 ? tha : thb);
                const float lam = ok ? m[n][e] * l : 0.f;
                const float z = cbv[n][e] * lam;
                wacc[n][e] += lam;
                cs[n][e & 1] += z;
                if (e < 2) rsa += z; else rsb += z;
            }
        };
        const int nleft = jt == it ? 2 * warp : 8;  // n-tiles left of the warp's rows
#pragma unroll
        for (int n = 0; n < 8; n++) {
            cs[n][0] = cs[n][1] = 0.f;
            if (n < nleft) scores(n, std::false_type{});
            else if (n < 2 * kend) scores(n, std::true_type{});
        }
        rsa = quad_sum(rsa);
        rsb = quad_sum(rsb);
        if (q == 0) {  // this thread owns these entries: no race
            s_rsum[hh][ra - i0] += rsa;
            s_rsum[hh][rb - i0] += rsb;
        }
        const float2 csw = warp_col_sums(cs);
        *reinterpret_cast<float2*>(&s_cs[buf][warp][(lane >> 2) * 8 + 2 * q]) = csw;
        if (hh == tb.hps - 1) {  // the tile's last head: dC += W B_jt, W to memory
            uint32_t wa[4][4];
            acc_to_a(wa, wacc);
            if constexpr (WG) {
#ifdef SM90A
                tile_acc_ab_wgmma(dc, wa, s_b);  // W's entries right of the warp's k-steps are zeros
#endif
            } else {
                warp_mma_rega<N / 8>(dc, wa, s_b, N + PAD, 0, kend);
            }
            bf16* wo = sc.w + tb.w_offset(nsl, G, it, jt);
#pragma unroll
            for (int n = 0; n < 8; n++) {
                const int col = n * 8 + 2 * q;
                *reinterpret_cast<uint32_t*>(wo + (ra - i0) * TILE + col) = pack_bf16(wacc[n][0], wacc[n][1]);
                *reinterpret_cast<uint32_t*>(wo + (rb - i0) * TILE + col) = pack_bf16(wacc[n][2], wacc[n][3]);
            }
        }
        __syncthreads();
        pjt = jt, phh = hh, jt = njt, hh = nhh;
    }
    flush_csum(pjt, phh, (npairs - 1) & 1);  // after the last pair's barrier
    for (int idx = threadIdx.x; idx < tb.hps * TILE; idx += blockDim.x) {
        const int hh = idx / TILE, r = idx % TILE;
        const size_t pos0 = ((size_t)tb.b * H + tb.h0 + hh) * Tp + tb.t0;
        sc.rsum[pos0 + i0 + r] = s_rsum[hh][r];
    }
    store_slice_part<N>(dc_part, dc, tb, row0, G, nsl, ra, rb);
}

inline size_t row_smem_bytes(int P, int N) {
    const size_t xs = TILE * (P + PAD), hs = (size_t)P * (N + PAD);
    const size_t ub = xs + hs > 2 * xs ? xs + hs : 2 * xs;
    return (2 * TILE * (N + PAD) + 2 * ub) * sizeof(bf16) + 4 * CHUNK * sizeof(float) + 1024;  // + the alignment
}

// Column direction: one 64-row tile of positions j (rows of warp w: j0 + 16w ..), a slice of the heads of a group.
//   once per block:  CB^T(jt, it) = B_jt C_it^T for it >= jt (in smem, this warp's fragments);
//                    dB_j += sum_it W(it, jt)^T C_it
//   per head:        u_j = w_j B_j Gout^T + sum_{i >= j} CB_ij L_ij dy_i  (w_j = exp(Aend - Acum_j) for rows that
//                    reach the next chunk), dx_j = dt_j u_j + D dy_j, dB_j += dt_j w_j Gout^T x_j, and the per-position
//                    ddt_dir = x.u, sst = dt_j x_j.(state part of u), dd = x.dy
// WG (sm_90a, P = 64): every matmul on wgmma, its smem operands in the swizzled layout. Dynamic smem col_smem_bytes.
template <int P, int N, bool DOCS, bool WG>
__global__ void __launch_bounds__(THREADS)
ssd_bwd_col_kernel(float* db_part, BwdScratch sc, const float* dt_s, const float* acum_s, const bf16* dy,
                   SSDInputs in, SSDGrads gr, int T, int H, int G, int nsl, int group) {
    constexpr int CS = TILE * (N + PAD), XS = TILE * (P + PAD), HS = P * (N + PAD), WS = TILE * (TILE + PAD);
    constexpr int U1 = CS + WS, U2 = XS + HS + 2 * XS;  // phase 1: 2 x (C_it, W); phase 2: x, Gout, 2 x dy_it
    constexpr int UN = 2 * U1 > U2 ? 2 * U1 : U2;
    constexpr int CBD = 4 * 32 * 32, CBT = (NTILE - 1) * 4 * 16 * 32;
    static_assert(!WG || (P == 64 && (CS + CBD * 2 + CBT * 2) * 2 % 1024 == 0 && CS * 2 % 1024 == 0 &&
                          U1 * 2 % 1024 == 0 && XS * 2 % 1024 == 0 && HS * 2 % 1024 == 0),
                  "wgmma tiles: 128-byte column blocks, 1024-aligned");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024 - ((uint32_t)__cvta_generic_to_shared(smem_raw) & 1023)) & 1023);
    // CB^T in this warp's accumulator fragments: the diagonal tile fp32 (its decays are near 1 and it holds the
    // terms i = j: rounded to bf16 it dominated the error of the parameter gradients), the tiles it > jt bf16
    bf16* s_b = reinterpret_cast<bf16*>(smem);                 // B_jt
    float* s_cbd = reinterpret_cast<float*>(s_b + CS);         // [4 warps][32][32 lanes]: the diagonal tile
    uint32_t* s_cbt = reinterpret_cast<uint32_t*>(s_cbd + CBD);  // [it - jt - 1][4 warps][16][32 lanes], bf16 pairs
    bf16* s_u = reinterpret_cast<bf16*>(s_cbt + CBT);
    float* s_dt = reinterpret_cast<float*>(s_u + UN);
    float* s_ac = s_dt + CHUNK;
    int* s_thr = reinterpret_cast<int*>(s_ac + CHUNK);

    const TileBlock tb(T, H, G, nsl, group, false);
    const int jt = tb.tile, j0 = tb.r0, g = tb.g, valid = tb.valid;
    if (j0 >= valid) return;
    const size_t row0 = (size_t)tb.b * T + tb.t0, Tp = (size_t)tb.nc * CHUNK;
    const int dy_stride = H * P;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, m0 = warp * 16, q = lane & 3;
    const int ra = j0 + m0 + (lane >> 2), rb = ra + 8;  // chunk-local rows (positions j)
    const int it_end = (valid + TILE - 1) / TILE;
    const int kbeg = warp;  // on the diagonal tile this warp's rows j only see columns i >= m0

    load_rows_as<N, WG>(s_b, in.Bm + (row0 + j0) * in.bc_stride + g * N, in.bc_stride, valid - j0);
    if (DOCS)
        for (int i = threadIdx.x; i < CHUNK; i += blockDim.x) s_thr[i] = doc_thr(in.pos, row0, i, valid);
    const int lds = DOCS ? doc_thr(in.pos, row0, valid - 1, valid) : -1;

    float db[N / 8][4];
    zero(db);
    // ---- phase 1: C B^T tiles and W^T C, over the row tiles it >= jt
    auto load_c = [&](int it, int buf) {
        bf16* u = s_u + buf * U1;
        load_rows_as<N, WG>(u, in.Cm + (row0 + it * TILE) * in.bc_stride + g * N, in.bc_stride, valid - it * TILE);
        load_rows_as<TILE, WG>(u + CS, sc.w + tb.w_offset(nsl, G, it, jt), TILE, TILE);
        cp_async_commit();
    };
    load_c(jt, 0);
    for (int it = jt; it < it_end; it++) {
        const int buf = (it - jt) & 1;
        if (it + 1 < it_end) {
            load_c(it + 1, buf ^ 1);
            cp_async_wait_group<1>();
        } else {
            cp_async_wait_group<0>();
        }
#ifdef SM90A
        if constexpr (WG) hopper::fence_async_smem();  // the copies are read by wgmma, the async proxy
#endif
        __syncthreads();
        const bf16* s_ci = s_u + buf * U1;
        const bf16* s_w = s_ci + CS;
        const int klo = it == jt ? kbeg : 0;
        float cbt[8][4];  // B_j . C_i
        tile_abt<8, N, WG>(cbt, s_b, s_ci, m0, 2 * klo);
        if (it == jt) {
            float* o = s_cbd + warp * 32 * 32 + lane;
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) o[(4 * n + e) * 32] = cbt[n][e];
        } else {
            uint32_t* o = s_cbt + ((it - jt - 1) * 4 + warp) * 16 * 32 + lane;
#pragma unroll
            for (int n = 0; n < 8; n++) {
                o[(2 * n) * 32] = pack_bf16(cbt[n][0], cbt[n][1]);
                o[(2 * n + 1) * 32] = pack_bf16(cbt[n][2], cbt[n][3]);
            }
        }
        if constexpr (WG) {  // W^T C_it
#ifdef SM90A
            uint32_t a[4][4];
            load_a_tile_sw<true>(a, s_w);
            tile_acc_ab_wgmma(db, a, s_ci);
#endif
        } else {
            warp_mma<N / 8, true, true>(db, s_w, TILE + PAD, m0, s_ci, N + PAD, 0, TILE);
        }
        __syncthreads();
    }

    // ---- phase 2: per head
    bf16* s_x = s_u;
    bf16* s_g = s_x + XS;
    bf16* s_dyb = s_g + HS;  // 2 buffers
    for (int hh = 0; hh < tb.hps; hh++) {
        const int h = tb.h0 + hh;
        const size_t bh = (size_t)tb.b * H + h, pos0 = bh * Tp + tb.t0;
        auto load_dy = [&](int it, int buf) {
            load_rows_as<P, WG>(s_dyb + buf * XS, dy + (row0 + it * TILE) * dy_stride + h * P, dy_stride,
                                valid - it * TILE);
            cp_async_commit();
        };
        load_rows_as<P, WG>(s_x, in.x + (row0 + j0) * in.x_stride + h * P, in.x_stride, valid - j0);
        load_rows_as<N, WG, P>(s_g, sc.gst + (bh * tb.nc + tb.c) * P * N, N, P);
        load_floats(s_dt, dt_s + pos0, CHUNK);
        load_floats(s_ac, acum_s + pos0, CHUNK);
        cp_async_commit();
        load_dy(jt, 0);
        cp_async_wait_group<1>();
#ifdef SM90A
        if constexpr (WG) hopper::fence_async_smem();
#endif
        __syncthreads();

        const float aend = s_ac[CHUNK - 1];
        const float dta = s_dt[ra], dtb = s_dt[rb], aa = s_ac[ra], ab = s_ac[rb];
        const float wa = ra >= lds ? expf(aend - aa) : 0.f, wb = rb >= lds ? expf(aend - ab) : 0.f;
        // The decay of a pair i >= j factors through the warp's last row p when i > p: exp(a_i - a_p) exp(a_p - a_j),
        // both <= 1. Only the warp's diagonal 16 x 16 block of the diagonal tile takes an exp a pair and the causal
        // mask; every other pair costs two multiplies.
        const float ap = s_ac[j0 + m0 + 15], ga = decay_exp(ap - aa), gb = decay_exp(ap - ab);
        float u[P / 8][4];
        uint32_t dyj[P / 8][2];  // this thread's dy_j (rows ra, rb), kept from the first tile for the epilogue
        tile_abt<P / 8, N, WG>(u, s_b, s_g, m0);  // B_j Gout^T
        scale_rows_acc(u, wa, wb);
        float sa, sb;
        row_dots<P / 8, WG>(sa, sb, u, s_x, P + PAD, m0);
        sa = dta * quad_sum(sa);
        sb = dtb * quad_sum(sb);
        if constexpr (WG) {  // dt_j w_j x_j Gout
#ifdef SM90A
            uint32_t a[4][4];
            load_a_tile_sw<false, true>(a, s_x, dta * wa, dtb * wb);
            tile_acc_ab_wgmma(db, a, s_g);
#endif
        } else {
            warp_mma<N / 8, false, true, true>(db, s_x, P + PAD, m0, s_g, N + PAD, 0, P, dta * wa, dtb * wb);
        }

        for (int it = jt; it < it_end; it++) {
            const int buf = (it - jt) & 1, i0 = it * TILE;
            if (it + 1 < it_end) {
                load_dy(it + 1, buf ^ 1);  // that buffer was freed by the barrier ending the previous iteration
                cp_async_wait_group<1>();
            } else {
                cp_async_wait_group<0>();
            }
#ifdef SM90A
            if constexpr (WG) hopper::fence_async_smem();  // the copies are read by wgmma, the async proxy
#endif
            __syncthreads();
            if (it == jt) {  // buffer 0 holds dy_jt
#pragma unroll
                for (int n = 0; n < P / 8; n++)
#pragma unroll
                    for (int half = 0; half < 2; half++) {
                        const int r = ra - j0 + 8 * half, c = n * 8 + 2 * q;
                        dyj[n][half] = *reinterpret_cast<const uint32_t*>(smem_at<WG>(s_dyb, P + PAD, r, c));
                    }
            }
            const int klo = it == jt ? kbeg : 0;
            float s[8][4];
            auto scores = [&](int n, auto diag_block) {
                float2 c01, c23;  // CB^T of this thread's rows j and columns i, i + 1
                if (it > jt) {
                    const uint32_t* cf = s_cbt + ((it - jt - 1) * 4 + warp) * 16 * 32 + lane;
                    c01 = unpack_bf16(cf[(2 * n) * 32]);
                    c23 = unpack_bf16(cf[(2 * n + 1) * 32]);
                } else {
                    const float* cf = s_cbd + warp * 32 * 32 + lane;
                    c01 = make_float2(cf[(4 * n) * 32], cf[(4 * n + 1) * 32]);
                    c23 = make_float2(cf[(4 * n + 2) * 32], cf[(4 * n + 3) * 32]);
                }
                const int i = i0 + n * 8 + 2 * q;
                const float2 aci = *reinterpret_cast<const float2*>(s_ac + i);
                int2 thi = make_int2(0, 0);
                if (DOCS) thi = *reinterpret_cast<const int2*>(s_thr + i);
                float2 ei;  // exp(a_i - a_p)
                if constexpr (!diag_block) ei = make_float2(decay_exp(aci.x - ap), decay_exp(aci.y - ap));
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int j = e < 2 ? ra : rb, ii = i + (e & 1);
                    const float cv = e == 0 ? c01.x : e == 1 ? c01.y : e == 2 ? c23.x : c23.y;
                    bool ok = true;
                    float l;
                    if constexpr (diag_block) {
                        ok = ii >= j;
                        l = decay_exp(((e & 1) ? aci.y : aci.x) - (e < 2 ? aa : ab));
                    } else {
                        l = (e < 2 ? ga : gb) * ((e & 1) ? ei.y : ei.x);
                    }
                    if (DOCS) ok = ok && j >= ((e & 1) ? thi.y : thi.x);
                    s[n][e] = ok ? cv * l : 0.f;
                }
            };
#pragma unroll
            for (int n = 0; n < 8; n++) {
                if (n < 2 * klo) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
                else if (it == jt && n < 2 * klo + 2) scores(n, std::true_type{});
                else scores(n, std::false_type{});
            }
            uint32_t pa[4][4];
            acc_to_a(pa, s);
            if constexpr (WG) {
#ifdef SM90A
                tile_acc_ab_wgmma(u, pa, s_dyb + buf * XS);  // all 4 k-steps: those left of klo are zeros
#endif
            } else {
                warp_mma_rega<P / 8>(u, pa, s_dyb + buf * XS, P + PAD, klo);
            }
            __syncthreads();
        }

        // epilogue: dx, x.u, x.dy
        const float d = __bfloat162float(in.D[h]);
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int j = half ? rb : ra;
            const float dtj = half ? dtb : dta;
            const bool ok = j < valid;
            const size_t row = row0 + j;
            float xu = 0.f, xdy = 0.f;
#pragma unroll
            for (int n = 0; n < P / 8; n++) {
                const int p = n * 8 + 2 * q;
                const float2 xv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(smem_at<WG>(s_x, P + PAD, j - j0, p)));
                const float2 dyv = unpack_bf16(dyj[n][half]);  // zero past the sequence, like x
                const float u0 = u[n][2 * half], u1 = u[n][2 * half + 1];
                xu += xv.x * u0 + xv.y * u1;
                xdy += xv.x * dyv.x + xv.y * dyv.y;
                if (ok)
                    *reinterpret_cast<__nv_bfloat162*>(gr.dx + row * gr.dx_stride + h * P + p) =
                        __floats2bfloat162_rn(dtj * u0 + d * dyv.x, dtj * u1 + d * dyv.y);
            }
            xu = quad_sum(xu);
            xdy = quad_sum(xdy);
            if (q == 0) {
                const size_t pos = pos0 + j;
                const float sj = half ? sb : sa;
                sc.ddt_dir[pos] = xu;
                sc.dd[pos] = xdy;
                sc.sst[pos] = sj;
            }
        }
        __syncthreads();  // s_x, s_g, s_dt, s_ac are reloaded for the next head
    }

    store_slice_part<N>(db_part, db, tb, row0, G, nsl, ra, rb);
}

inline size_t col_smem_bytes(int P, int N) {
    const size_t cs = TILE * (N + PAD), xs = TILE * (P + PAD), hs = (size_t)P * (N + PAD), ws = TILE * (TILE + PAD);
    const size_t u1 = cs + ws, u2 = xs + hs + 2 * xs, un = 2 * u1 > u2 ? 2 * u1 : u2;
    return (cs + un) * sizeof(bf16) + (4 * 32 * 32 + (NTILE - 1) * 4 * 16 * 32) * sizeof(float) +
           3 * CHUNK * sizeof(float) + 1024;  // + the alignment (at P 64, N 128 two blocks still fill an SM's 228 KB)
}

// ----------------------------------------------------------------------------------------------
// per chunk and head: gradient of Acum, reverse cumsum to the gradient of a_t = dt_t A, then
//   ddt_t = ddt_dir_t + A da_t,  ddt_raw_t = ddt_t sigmoid(dt_raw_t + dt_bias)
// and the chunk's partial sums of ddt_raw, dt da (-> dA), x.dy (-> dD). grid (nchunks, H, B); splits: the state
// pass's dots per chunk (0 where a sequence is one chunk and nothing passes)
static __global__ void __launch_bounds__(THREADS)
ssd_bwd_dt_kernel(SSDGrads gr, BwdScratch sc, const float* dt_s, const float* acum_s, SSDInputs in, int T, int H,
                  int splits) {
    __shared__ float s_r[CHUNK];
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, nc = gridDim.x;
    const int t0 = c * CHUNK, valid = min(CHUNK, T - t0);
    const size_t bh = (size_t)b * H + h, pos0 = bh * nc * CHUNK + t0;
    const float A = -expf(__bfloat162float(in.A_log[h])), bias = __bfloat162float(in.dt_bias[h]);

    float sst = 0.f;
    for (int i = threadIdx.x; i < valid; i += blockDim.x) sst += sc.sst[pos0 + i];
    sst = block_sum(sst);
    float pass = 0.f;
    for (int k = 0; k < splits; k++) pass += sc.dots[(bh * nc + c) * splits + k];
    // dAcum stored reversed so that an inclusive scan gives the reverse cumsum
    const int ntl = (valid + TILE - 1) / TILE;
    for (int i = threadIdx.x; i < CHUNK; i += blockDim.x) {
        const size_t p = pos0 + i;
        float v = 0.f;
        if (i < valid) {
            float cs = 0.f;  // the partials of the row tiles at and after row i's tile
            for (int it = i / TILE; it < ntl; it++) cs += sc.csum[p * NTILE + it];
            v = sc.rsum[p] - cs + sc.off[p] - sc.sst[p];
        }
        if (i == CHUNK - 1) v += sst + pass;  // Aend = Acum[CHUNK-1]: state decay and chunk-to-chunk decay
        s_r[CHUNK - 1 - i] = v;
    }
    __syncthreads();
    block_scan(s_r, CHUNK);

    float gbias = 0.f, gA = 0.f, gD = 0.f;
    for (int i = threadIdx.x; i < valid; i += blockDim.x) {
        const size_t p = pos0 + i, row = (size_t)b * T + t0 + i;
        const float da = s_r[CHUNK - 1 - i];
        const float ddt = sc.ddt_dir[p] + A * da;
        const float z = __bfloat162float(in.dt[row * in.dt_stride + h]) + bias;
        const float g = ddt * sigmoid(z);
        gr.ddt[row * gr.ddt_stride + h] = __float2bfloat16(g);
        gbias += g;
        gA += dt_s[p] * da;
        gD += sc.dd[p];
    }
    gbias = block_sum(gbias);
    gA = block_sum(gA);
    gD = block_sum(gD);
    if (threadIdx.x == 0) {
        float* o = sc.partials + (bh * nc + c) * 3;
        o[0] = gbias;
        o[1] = gA;
        o[2] = gD;
    }
}

// parameter gradients: sum the per-chunk partials over b and c in order, accumulate
static __global__ void ssd_param_grads_kernel(SSDGrads gr, const float* partials, const bf16* A_log, int B, int H,
                                              int nc) {
    const int h = blockIdx.x * blockDim.x + threadIdx.x;
    if (h >= H) return;
    float gb = 0.f, ga = 0.f, gd = 0.f;
    for (int b = 0; b < B; b++)
        for (int c = 0; c < nc; c++) {
            const float* p = partials + (((size_t)b * H + h) * nc + c) * 3;
            gb += p[0];
            ga += p[1];
            gd += p[2];
        }
    gr.ddt_bias[h] += gb;
    gr.dA_log[h] += ga * -expf(__bfloat162float(A_log[h]));  // dA/dA_log = A
    gr.dD[h] += gd;
}

// dB, dC: sum the head-slice partials (B, T, G, slices, N) in order into the strided bf16 outputs
static __global__ void ssd_reduce_bc_kernel(SSDGrads gr, const float* db_part, const float* dc_part,
                                            size_t rows /*B*T*/, int G, int N, int nsl) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t GN = (size_t)G * N;
    if (idx >= rows * GN) return;
    const size_t row = idx / GN, gn = idx - row * GN, g = gn / N, n = gn - g * N;
    const size_t base = ((row * G + g) * nsl) * N + n;
    float sb = 0.f, scv = 0.f;
    for (int s = 0; s < nsl; s++) {
        sb += db_part[base + (size_t)s * N];
        scv += dc_part[base + (size_t)s * N];
    }
    gr.dB[row * gr.dbc_stride + gn] = __float2bfloat16(sb);
    gr.dC[row * gr.dbc_stride + gn] = __float2bfloat16(scv);
}

// ----------------------------------------------------------------------------------------------
// launchers

inline void check_shape(const SSDShape& sh) {
    const bool pn_ok = (sh.P == 64 || sh.P == 32) && (sh.N == 64 || sh.N == 128);
    const bool chunk_ok = sh.chunk == 64 || sh.chunk == 128 || sh.chunk == 256;
    if (!pn_ok || !chunk_ok || sh.B < 1 || sh.T < 1 || sh.H < 1 || sh.G < 1 || sh.H % sh.G != 0)
        THROW("ssd: unsupported shape B=%d T=%d H=%d P=%d G=%d N=%d chunk=%d (P in {32,64}, N in {64,128}, "
              "chunk in {64,128,256}, H %% G == 0)", sh.B, sh.T, sh.H, sh.P, sh.G, sh.N, sh.chunk);
}

// 16-byte vector loads/stores of rows need aligned bases and row strides
inline void check_rows(const char* what, const void* p, int stride, int min_stride) {
    if (((uintptr_t)p & 15) != 0 || stride % 8 != 0 || stride < min_stride)
        THROW("ssd: %s must be 16-byte aligned with a row stride that is a multiple of 8 and >= %d (stride %d)",
              what, min_stride, stride);
}

inline void check_inputs(const SSDInputs& in, const SSDShape& sh) {
    check_shape(sh);
    check_rows("x", in.x, in.x_stride, sh.H * sh.P);
    check_rows("B", in.Bm, in.bc_stride, sh.G * sh.N);
    check_rows("C", in.Cm, in.bc_stride, sh.G * sh.N);
    if (in.dt_stride < sh.H) THROW("ssd: dt row stride %d < H = %d", in.dt_stride, sh.H);
}

}  // namespace ssd

#ifdef SM90A
#include "ssd_sm90.cuh"
#endif

namespace ssd {

// the mma.sync forward's launch, and the blocks that run at once on this GPU (sm90::Forward is its twin)
template <int P, int N, bool DOCS>
struct ForwardMmaSync {
    static int slots() { return occupancy(ssd_fwd_kernel<P, N, DOCS>, THREADS, fwd_smem_bytes(P, N)) * sm_count(); }
    static void run(const ForwardGrid& grid, bf16* y, float* dt_s, float* acum_s, const SSDInputs& in,
                    const SSDShape& sh, int Tp, float* seg_state, cudaStream_t s) {
        const size_t smem = fwd_smem_bytes(P, N);
        set_max_smem(ssd_fwd_kernel<P, N, DOCS>, smem);
        ssd_fwd_kernel<P, N, DOCS><<<grid.blocks(), THREADS, smem, s>>>(y, dt_s, acum_s, in, sh.T, sh.H, sh.G, Tp,
                                                                        grid, seg_state, sm_count());
        cudaCheckLast();
    }
};

// f(K{}) with the forward kernel K a build takes: the wgmma one on sm_90a builds for heads of 64 (unless
// mma_sync), else the mma.sync one
template <int P, int N, bool DOCS, typename F>
void with_forward_kernel(bool mma_sync, F&& f) {
#ifdef SM90A
    if constexpr (P == 64)
        if (!mma_sync) return f(sm90::Forward<N, DOCS>{});
#endif
    (void)mma_sync;
    f(ForwardMmaSync<P, N, DOCS>{});
}

// the plan the forward runs: forced by segments > 0 (its rows not whole: none, unless whole_rows >= 0) and/or
// whole_rows >= 0 (its segments the fastest for them unless forced), else forward_plan's for this GPU
template <int P, int N, bool DOCS>
ForwardPlan plan_forward(const SSDShape& sh, bool mma_sync, int segments, int whole_rows) {
    if (segments > 0) return forward_plan_of(sh, segments, std::max(whole_rows, 0));
    int slots = 0;
    with_forward_kernel<P, N, DOCS>(mma_sync, [&](auto k) { slots = decltype(k)::slots(); });
    return whole_rows >= 0 ? forward_plan_with(sh, slots, whole_rows) : forward_plan(sh, slots);
}

// the forward (its split rows in segments), then the segments' fix-up
template <int P, int N, bool DOCS>
void forward_impl(bf16* y, void* saved, void* scratch, const SSDInputs& in, const SSDShape& sh, bool mma_sync,
                  int segments, int whole_rows, cudaStream_t s) {
    float* dt_s = (float*)saved;
    float* acum_s = dt_s + padded_positions(sh);
    const int Tp = nchunks(sh) * CHUNK;
    const ForwardPlan plan = plan_forward<P, N, DOCS>(sh, mma_sync, segments, whole_rows);
    const ForwardGrid grid{plan.whole, forward_split_rows(sh, plan), forward_segments(sh, plan),
                           plan.seg_chunks * CHUNK};
    float* seg_state = grid.split > 0 ? (float*)scratch : nullptr;
    if (seg_state == nullptr && grid.split > 0)
        THROW("ssd_forward: %d segments need the scratch (ssd_scratch_bytes)", grid.nseg);
    with_forward_kernel<P, N, DOCS>(mma_sync, [&](auto k) {
        decltype(k)::run(grid, y, dt_s, acum_s, in, sh, Tp, seg_state, s);
    });
    if (grid.split > 0) {
        static_assert(P * N % (4 * THREADS) == 0, "whole float4 slices of the state");
        ssd_segment_hin_kernel<DOCS><<<dim3(P * N / (4 * THREADS), grid.split), THREADS, 0, s>>>(
            seg_state, acum_s, in.pos, sh.T, sh.H, Tp, grid, P * N);
        cudaCheckLast();
        const dim3 fixup_grid(grid.seg_len / TILE, grid.nseg - 1, grid.split);
        ssd_segment_fixup_kernel<P, N, DOCS><<<fixup_grid, THREADS, 0, s>>>(y, seg_state, acum_s, in, sh.T, sh.H, sh.G,
                                                                             Tp, grid);
        cudaCheckLast();
    }
}

template <int P, int N, bool DOCS>
void backward_impl(const SSDGrads& gr, void* scratch, const bf16* dy, const SSDInputs& in, const void* saved,
                   const SSDShape& sh, cudaStream_t s, int tile_group, bool mma_sync) {
    const int nc = nchunks(sh), nsl = head_slices(sh), splits = pass_splits(sh);
    const float* dt_s = (const float*)saved;
    const float* acum_s = dt_s + padded_positions(sh);
    BwdScratch sc(sh, scratch);
    const dim3 chunk_grid(nc, sh.H, sh.B);
    const int tile_blocks = sh.B * nc * sh.G * nsl * NTILE;

    // the chunk states S_c and dS_c, then Hin_c and Gout_c. A sequence of one chunk (fine-tuning's short
    // windows) passes nothing: Hin_0 = Gout_0 = 0, and dA has no pass term (the dt kernel reads no dots)
    if (nc > 1) {
        auto states = [&](auto HB) {
            constexpr int hb = decltype(HB)::value;
            const size_t smem = chunk_state_smem_bytes(P, N, hb);
            set_max_smem(ssd_bwd_states_kernel<P, N, DOCS, hb>, smem);
            ssd_bwd_states_kernel<P, N, DOCS, hb><<<dim3(nc, 2 * sh.H / hb, sh.B), THREADS, smem, s>>>(
                sc.hst, sc.gst, dt_s, acum_s, dy, in, sh.T, sh.H, sh.G);
        };
        if (chunk_state_heads(sh) == 2) states(std::integral_constant<int, 2>());
        else states(std::integral_constant<int, 1>());
        cudaCheckLast();
        ssd_state_pass_kernel<DOCS><<<dim3(splits, sh.B * sh.H), PASS_THREADS, 0, s>>>(
            sc.hst, sc.gst, sc.dots, acum_s, in.pos, sh.T, sh.H, nc, P * N);
        cudaCheckLast();
    } else {  // hst and gst are adjacent in the scratch (BwdScratch): one memset
        cudaCheck(cudaMemsetAsync(sc.hst, 0, 2 * state_elems(sh) * sizeof(bf16), s));
    }

    // row direction (dC, W), then column direction (dx, dB, which reads W)
    // the blocks in groups of (b, chunk) pairs (tile_index): by default one group fills the GPU's block places
    const int pairs = sh.B * nc;
    if (tile_group < 0 || tile_group > pairs)
        THROW("ssd: backward tile group of %d (b, chunk) pairs, not in 0..%d", tile_group, pairs);
    auto group_for = [&](auto kernel, size_t smem) {
        set_max_smem(kernel, smem);
        return tile_group ? tile_group : backward_tile_group(sh, occupancy(kernel, THREADS, smem) * sm_count());
    };
    // the tile kernels on wgmma where the build has it, for heads of 64 (unless mma_sync)
    auto row = [&](auto wg) {
        auto kernel = ssd_bwd_row_kernel<P, N, DOCS, decltype(wg)::value>;
        const size_t smem = row_smem_bytes(P, N);
        const int group = group_for(kernel, smem);
        kernel<<<tile_blocks, THREADS, smem, s>>>(sc.dc_part, sc, dt_s, acum_s, dy, in, sh.T, sh.H, sh.G, nsl, group);
        cudaCheckLast();
    };
    auto col = [&](auto wg) {
        auto kernel = ssd_bwd_col_kernel<P, N, DOCS, decltype(wg)::value>;
        const size_t smem = col_smem_bytes(P, N);
        const int group = group_for(kernel, smem);
        kernel<<<tile_blocks, THREADS, smem, s>>>(sc.db_part, sc, dt_s, acum_s, dy, in, gr, sh.T, sh.H, sh.G, nsl,
                                                  group);
        cudaCheckLast();
    };
    constexpr bool WG = WGMMA_BUILD && P == 64;
    if (WG && !mma_sync) {
        row(std::bool_constant<WG>{});
        col(std::bool_constant<WG>{});
    } else {
        row(std::false_type{});
        col(std::false_type{});
    }

    ssd_bwd_dt_kernel<<<chunk_grid, THREADS, 0, s>>>(gr, sc, dt_s, acum_s, in, sh.T, sh.H, nc > 1 ? splits : 0);
    cudaCheckLast();
    ssd_param_grads_kernel<<<(int)ceil_div(sh.H, 128), 128, 0, s>>>(gr, sc.partials, in.A_log, sh.B, sh.H, nc);
    cudaCheckLast();
    const size_t rows = (size_t)sh.B * sh.T, n = rows * sh.G * sh.N;
    ssd_reduce_bc_kernel<<<(unsigned)ceil_div(n, 256), 256, 0, s>>>(gr, sc.db_part, sc.dc_part, rows, sh.G, sh.N,
                                                                    nsl);
    cudaCheckLast();
}

// run F<P, N, DOCS>::run(args...) for the runtime (P, N) and whether there are document boundaries
template <int P_, int N_> struct PN { static constexpr int P = P_, N = N_; };
template <template <int, int, bool> class F, typename... Args>
void dispatch(const SSDShape& sh, bool docs, Args&&... args) {
    auto with_docs = [&](auto pn) {
        constexpr int P = decltype(pn)::P, N = decltype(pn)::N;
        if (docs) F<P, N, true>::run(args...);
        else F<P, N, false>::run(args...);
    };
    if (sh.P == 64 && sh.N == 128) with_docs(PN<64, 128>{});
    else if (sh.P == 64) with_docs(PN<64, 64>{});
    else if (sh.N == 128) with_docs(PN<32, 128>{});
    else with_docs(PN<32, 64>{});
}
template <int P, int N, bool DOCS> struct Forward {
    template <typename... A> static void run(A&... a) { forward_impl<P, N, DOCS>(a...); }
};
template <int P, int N, bool DOCS> struct PlanForward {
    static void run(ForwardPlan& plan, const SSDShape& sh, bool& mma_sync, int& segments, int& whole_rows) {
        plan = plan_forward<P, N, DOCS>(sh, mma_sync, segments, whole_rows);
    }
};
template <int P, int N, bool DOCS> struct Backward {
    template <typename... A> static void run(A&... a) { backward_impl<P, N, DOCS>(a...); }
};

}  // namespace ssd

// y (BT, H*P) = SSD(x, softplus(dt + dt_bias), A = -exp(A_log), B, C) + D*x; saved keeps what the backward reads.
// The forward borrows the scratch (ssd_scratch_bytes) when some rows run in segments (ssd::ForwardPlan); segments
// > 0 sets their number and whole_rows >= 0 the rows that run whole (tests and benchmarks), mma_sync takes the
// mma.sync kernel on sm_90a builds too (tests and the benchmark compare the two).
inline void ssd_forward(bf16* y, void* saved, void* scratch, const SSDInputs& in, const SSDShape& sh, cudaStream_t s,
                        int segments = 0, bool mma_sync = false, int whole_rows = -1) {
    ssd::check_inputs(in, sh);
    ssd::check_rows("y", y, sh.H * sh.P, sh.H * sh.P);
    ssd::dispatch<ssd::Forward>(sh, in.pos != nullptr, y, saved, scratch, in, sh, mma_sync, segments, whole_rows, s);
}

// the plan ssd_forward runs on this GPU with the same arguments (benchmarks report it, tests check it)
inline ssd::ForwardPlan ssd_forward_plan(const SSDShape& sh, bool mma_sync = false, int segments = 0,
                                         int whole_rows = -1) {
    ssd::ForwardPlan plan{};
    ssd::dispatch<ssd::PlanForward>(sh, false, plan, sh, mma_sync, segments, whole_rows);
    return plan;
}

// dx, dB, dC, ddt written (strided like the inputs); ddt_bias, dA_log, dD accumulate (fp32). tile_group > 0 sets
// the (b, chunk) pairs of a group of the tile kernels' blocks (ssd::tile_index; tests and benchmarks), which
// changes only their order: the results are the same bit for bit. mma_sync takes the tile kernels' mma.sync
// matmuls on sm_90a builds too (tests and the benchmark compare the two).
inline void ssd_backward(const SSDGrads& g, void* scratch, const bf16* dy, const SSDInputs& in, const void* saved,
                         const SSDShape& sh, cudaStream_t s, int tile_group = 0, bool mma_sync = false) {
    ssd::check_inputs(in, sh);
    ssd::check_rows("dy", dy, sh.H * sh.P, sh.H * sh.P);
    ssd::check_rows("dx", g.dx, g.dx_stride, sh.H * sh.P);
    if (g.dbc_stride < sh.G * sh.N || g.ddt_stride < sh.H)
        THROW("ssd: gradient row strides too small (dB/dC %d, ddt %d)", g.dbc_stride, g.ddt_stride);
    ssd::dispatch<ssd::Backward>(sh, in.pos != nullptr, g, scratch, dy, in, saved, sh, s, tile_group, mma_sync);
}

