// Mamba-2 chunked state-space-duality (SSD) scan, forward and backward.
//
// Per batch b, head h (group g = h / (H/G)), A = -exp(A_log[h]), dt_t = softplus(dt_raw + dt_bias):
//   h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t + D x_t
// computed in chunks of Q steps (Acum = in-chunk inclusive cumsum of dt A):
//   intra  Y[i]  = sum_{j<=i} (C_i.B_j) exp(Acum_i - Acum_j) dt_j x_j      (masked matmuls)
//   states S_c   = sum_j exp(Aend - Acum_j) dt_j x_j B_j^T
//   pass   Hin_{c+1} = exp(Aend_c) Hin_c + S_c                               (sequential over chunks)
//   inter  Y[i] += exp(Acum_i) Hin_c C_i
// Matmuls run on tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate; valid on sm_80 and sm_90);
// cumsums, decays and the state recurrence are fp32; the chunk states, the states entering each
// chunk and their gradients are stored bf16, the precision the matmuls read them in. A chunk is processed in
// 64-row tiles, one 16-row slab per warp.
// The backward recomputes the chunk states (saved keeps only dt and Acum), runs the state pass in
// reverse for the state gradients, then two tile kernels (column direction: dx, dB; row direction: dC),
// each looping over a slice of the heads of one group so that dB/dC are summed over heads in registers.
// All reductions (over heads, positions, chunks, batch) run in a fixed order: no atomics.
#pragma once
#include <cstdint>
#include "cuda_common.cuh"
#include "tensor_core.cuh"

struct SSDShape { int B, T, H, P, G, N, chunk; };

namespace ssd {

using namespace tc;

constexpr int TILE = 64;      // rows of a chunk tile (4 warps x 16 rows)
constexpr int THREADS = 128;  // tile kernels
constexpr int PAD = 8;        // bf16 padding per smem row so ldmatrix rows hit distinct banks
constexpr int MAX_CHUNK = 256;
constexpr int PASS_THREADS = 256;

// ----------------------------------------------------------------------------------------------
// sizes and scratch layout

inline int nchunks(const SSDShape& sh) { return (sh.T + sh.chunk - 1) / sh.chunk; }
inline size_t padded_positions(const SSDShape& sh) { return (size_t)sh.B * sh.H * nchunks(sh) * sh.chunk; }
inline size_t state_floats(const SSDShape& sh) { return (size_t)sh.B * sh.H * nchunks(sh) * sh.P * sh.N; }
inline int pass_splits(const SSDShape& sh) { return (int)ceil_div((size_t)sh.P * sh.N / 4, PASS_THREADS); }

// heads of a group are split into slices (one block each) so the grid has enough blocks;
// dB/dC partials per slice are reduced afterwards
inline int head_slices(const SSDShape& sh) {
    const int hpg = sh.H / sh.G;
    const long tiles = (long)sh.B * sh.G * nchunks(sh) * (sh.chunk / TILE);
    for (int s = 1; s <= hpg; s++)
        if (hpg % s == 0 && tiles * s >= 1024) return s;
    return hpg;
}

// forward scratch: chunk states S, overwritten in place by Hin (bf16)
inline size_t fwd_scratch_bytes(const SSDShape& sh) { return state_floats(sh) * sizeof(bf16); }

// backward scratch: S, then Hin in place | dS, then Gout in place (bf16) | 6 per-position arrays |
// pass dots | per-chunk param partials | dB, dC slices (fp32)
struct BwdScratch {
    bf16 *hin, *gout;
    float *ddt_dir, *csum, *sst, *dd, *rsum, *off, *dots, *partials, *db_part, *dc_part;
    size_t total;  // floats
    BwdScratch(const SSDShape& sh, void* base) {
        const size_t S = state_floats(sh), Tp = padded_positions(sh);
        const size_t nbc = (size_t)sh.B * sh.H * nchunks(sh);
        const size_t bc = (size_t)sh.B * sh.T * sh.G * head_slices(sh) * sh.N;
        size_t off_f = 0;
        auto take = [&](size_t n) { float* p = base ? (float*)base + off_f : nullptr; off_f += n; return p; };
        hin = (bf16*)take(S / 2);  // S is a multiple of 4: the bf16 arrays keep 16-byte alignment
        gout = (bf16*)take(S / 2);
        ddt_dir = take(Tp);
        csum = take(Tp);
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

// ----------------------------------------------------------------------------------------------
// tensor-core helpers (warp level; the PTX wrappers are in tensor_core.cuh)

__device__ inline float2 unpack_bf16(uint32_t v) { return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v)); }
__device__ inline uint32_t scale_bf16x2(uint32_t v, float s) {
    const float2 f = unpack_bf16(v);
    return pack_bf16(f.x * s, f.y * s);
}

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

// acc (rows m0..m0+16, 8NT columns) += A (16 x K) * B (K x 8NT), both from smem.
// A_KM: smem holds A k-major (sA[k][m]), else m-major (sA[m][k]). Rows g / g+8 of A may be scaled
// by sc0 / sc1 (a per-row weight folded into the operand).
template <int NT, bool A_KM, bool B_KM, bool SCALE = false>
__device__ inline void warp_mma(float (&acc)[NT][4], const bf16* sA, int lda, int m0, const bf16* sB, int ldb,
                                int n0, int K, float sc0 = 1.f, float sc1 = 1.f, int nlo = 0, int nhi = NT) {
    const int lane = threadIdx.x & 31, r = lane & 7, mi = lane >> 3;
#pragma unroll 4
    for (int k0 = 0; k0 < K; k0 += 16) {
        uint32_t a[4];
        if (A_KM) ldsm_x4_t(a, sA + (k0 + r + (mi >> 1) * 8) * lda + m0 + (mi & 1) * 8);
        else      ldsm_x4(a, sA + (m0 + (lane & 15)) * lda + k0 + (lane >> 4) * 8);
        if (SCALE) {
            a[0] = scale_bf16x2(a[0], sc0); a[1] = scale_bf16x2(a[1], sc1);
            a[2] = scale_bf16x2(a[2], sc0); a[3] = scale_bf16x2(a[3], sc1);
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

// ----------------------------------------------------------------------------------------------
// block helpers

// all of this thread's copies landed, then the block's
__device__ inline void cp_async_wait_sync() {
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncthreads();
}

// starts copying rows [0, rows) of a strided bf16 matrix (COLS wide) into smem (row stride COLS + PAD);
// rows >= valid become zero (past the end of the sequence). All copies are in flight at once;
// cp_async_wait_sync() before use.
template <int COLS>
__device__ inline void load_rows(bf16* s, const bf16* g, size_t stride, int rows, int valid) {
    constexpr int V = COLS / 8;
    for (int idx = threadIdx.x; idx < rows * V; idx += blockDim.x) {
        const int r = idx / V, v = idx - r * V;
        const bool ok = r < valid;
        cp_async16(s + r * (COLS + PAD) + v * 8, g + (ok ? r * stride : 0) + v * 8, ok);
    }
}

// rows [0, rows) of an smem tile (COLS wide) times a per-row scale, in place
template <int COLS>
__device__ inline void scale_rows(bf16* s, int rows, const float* scale) {
    constexpr int V = COLS / 8;
    for (int idx = threadIdx.x; idx < rows * V; idx += blockDim.x) {
        const int r = idx / V, v = idx - r * V;
        uint4* p = reinterpret_cast<uint4*>(s + r * (COLS + PAD) + v * 8);
        uint4 val = *p;
        const float f = scale[r];
        val.x = scale_bf16x2(val.x, f);
        val.y = scale_bf16x2(val.y, f);
        val.z = scale_bf16x2(val.z, f);
        val.w = scale_bf16x2(val.w, f);
        *p = val;
    }
}

// inclusive prefix sum of s[0..n) in place (n <= MAX_CHUNK, fixed order)
__device__ inline void block_scan(float* s, int n) {
    constexpr int PER = MAX_CHUNK / 64;  // enough for blockDim >= 64
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

// sum over the block (fixed tree); every thread gets the result
__device__ inline float block_sum(float v, float* s_tmp /* >= 32 floats */) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) s_tmp[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (int w = 0; w < nw; w++) t += s_tmp[w];
    return t;
}

// exp of a decay exponent (<= 0): the fast intrinsic, its error is far below bf16 rounding
__device__ inline float decay_exp(float x) { return __expf(x); }

__device__ inline float softplus(float z) { return z > 20.f ? z : log1pf(expf(z)); }

// dt and Acum (in-chunk inclusive cumsum of dt A) of one chunk and head into smem; positions
// past T get dt = 0, so Acum stays flat and Acum[Q-1] is the decay of the whole chunk
__device__ inline void chunk_dt_cumsum(float* s_dt, float* s_acum, const bf16* dt_raw, int dt_stride, float bias,
                                       float A, int valid, int Q) {
    for (int i = threadIdx.x; i < Q; i += blockDim.x) {
        const float dt = i < valid ? softplus(__bfloat162float(dt_raw[(size_t)i * dt_stride]) + bias) : 0.f;
        s_dt[i] = dt;
        s_acum[i] = dt * A;
    }
    __syncthreads();
    block_scan(s_acum, Q);
}

// starts copying a chunk's dt and Acum (Q floats each, 16-byte aligned) into smem
__device__ inline void load_chunk_floats(float* s_dt, float* s_acum, const float* dt, const float* acum, int Q) {
    for (int i = threadIdx.x; i < Q / 4; i += blockDim.x) {
        cp_async16(s_dt + 4 * i, dt + 4 * i, true);
        cp_async16(s_acum + 4 * i, acum + 4 * i, true);
    }
}

// ----------------------------------------------------------------------------------------------
// chunk states: out[b,h,c] (P x N, bf16) = sum_j wt_j v_j w_j^T over the chunk
//   forward (GRAD = false): v = x, w = B, wt_j = dt_j exp(Aend - Acum_j); dt/Acum computed here from
//     dt_raw and stored to dt_out/acum_out when those are non-null
//   state gradient (GRAD = true): v = dy, w = C, wt_i = exp(Acum_i); Acum read from acum_in
// grid (nchunks, H, B); dynamic smem chunk_state_smem_bytes: two tile buffers, the next tile loads
// while the current one is multiplied
template <int P, int N, bool GRAD>
__global__ void __launch_bounds__(THREADS)
ssd_chunk_state_kernel(bf16* out, float* dt_out, float* acum_out, const float* acum_in, const bf16* v,
                       int v_stride, const bf16* w, int w_stride, const bf16* dt_raw, int dt_stride,
                       const bf16* dt_bias, const bf16* A_log, int T, int H, int G, int Q) {
    constexpr int WM = P / 16, WN = 4 / WM, NT = N / WN / 8;
    constexpr int VS = TILE * (P + PAD), WS = TILE * (N + PAD);
    __shared__ float s_dt[MAX_CHUNK], s_acum[MAX_CHUNK], s_wt[MAX_CHUNK];
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* s_v = reinterpret_cast<bf16*>(smem);  // 2 buffers each
    bf16* s_w = s_v + 2 * VS;
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, nc = gridDim.x;
    const int g = h / (H / G), t0 = c * Q, valid = min(Q, T - t0), ntiles = (valid + TILE - 1) / TILE;
    const size_t bh = (size_t)b * H + h, pos0 = bh * nc * Q + (size_t)t0;
    auto load_tile = [&](int k) {
        const int j0 = k * TILE;
        const size_t row = (size_t)b * T + t0 + j0;
        load_rows<P>(s_v + (k & 1) * VS, v + row * v_stride + h * P, v_stride, TILE, valid - j0);
        load_rows<N>(s_w + (k & 1) * WS, w + row * w_stride + g * N, w_stride, TILE, valid - j0);
        cp_async_commit();
    };
    load_tile(0);

    if (!GRAD) {
        const float A = -expf(__bfloat162float(A_log[h]));
        chunk_dt_cumsum(s_dt, s_acum, dt_raw + ((size_t)b * T + t0) * dt_stride + h, dt_stride,
                        __bfloat162float(dt_bias[h]), A, valid, Q);
        if (dt_out)
            for (int i = threadIdx.x; i < Q; i += blockDim.x) {
                dt_out[pos0 + i] = s_dt[i];
                acum_out[pos0 + i] = s_acum[i];
            }
    } else {
        for (int i = threadIdx.x; i < Q; i += blockDim.x) s_acum[i] = acum_in[pos0 + i];
        __syncthreads();
    }
    const float aend = s_acum[Q - 1];
    for (int i = threadIdx.x; i < Q; i += blockDim.x)
        s_wt[i] = GRAD ? expf(s_acum[i]) : s_dt[i] * expf(aend - s_acum[i]);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int m0 = (warp % WM) * 16, n0 = (warp / WM) * (N / WN);
    float acc[NT][4];
    zero(acc);
    for (int k = 0; k < ntiles; k++) {
        if (k + 1 < ntiles) {
            load_tile(k + 1);  // its buffer was freed by the barrier ending iteration k - 1
            cp_async_wait_group<1>();
        } else {
            cp_async_wait_group<0>();
        }
        __syncthreads();
        bf16* sv = s_v + (k & 1) * VS;
        scale_rows<P>(sv, TILE, s_wt + k * TILE);
        __syncthreads();
        warp_mma<NT, true, true>(acc, sv, P + PAD, m0, s_w + (k & 1) * WS, N + PAD, n0, TILE);
        __syncthreads();
    }
    bf16* o = out + (bh * nc + c) * P * N;
    const int r = m0 + (lane >> 2), cl = n0 + 2 * (lane & 3);
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        *reinterpret_cast<uint32_t*>(o + r * N + cl + nt * 8) = pack_bf16(acc[nt][0], acc[nt][1]);
        *reinterpret_cast<uint32_t*>(o + (r + 8) * N + cl + nt * 8) = pack_bf16(acc[nt][2], acc[nt][3]);
    }
}

// ----------------------------------------------------------------------------------------------
// state passing over chunks, in place, 4 elements of a (b, h) state per thread; grid (splits, B*H)
//   forward: st_c = S_c (chunk states) becomes Hin_c (entering chunk c): Hin_{c+1} = exp(Aend_c) Hin_c + S_c
//   reverse: st_c = dS_c (gradient through chunk c's own outputs) becomes Gout_c = dL/dS_c = G_{c+1} with
//            G_c = exp(Aend_c) G_{c+1} + dS_c; dots[b,h,c,split] = exp(Aend_c) <Gout_c, Hin_c> (the
//            gradient of Aend_c through the pass)
template <bool REVERSE>
__global__ void __launch_bounds__(PASS_THREADS)
ssd_state_pass_kernel(bf16* st, float* dots, const bf16* hin, const float* acum_s, int nc, int Q, int PN) {
    __shared__ float s_tmp[32];
    const size_t bh = blockIdx.y;
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    const bool ok = e < PN / 4;
    uint2* sp = reinterpret_cast<uint2*>(st + bh * nc * PN) + e;
    const uint2* hp = reinterpret_cast<const uint2*>(hin + bh * nc * PN) + e;
    const float* acum = acum_s + bh * nc * Q + Q - 1;
    float hs[4] = {0.f, 0.f, 0.f, 0.f};
    uint2 next = ok ? sp[(size_t)(REVERSE ? nc - 1 : 0) * PN / 4] : make_uint2(0, 0);
    for (int k = 0; k < nc; k++) {
        const int c = REVERSE ? nc - 1 - k : k;
        const uint2 cur = next;
        if (ok && k + 1 < nc) next = sp[(size_t)(REVERSE ? c - 1 : c + 1) * PN / 4];  // prefetch the next chunk
        const float decay = expf(acum[(size_t)c * Q]);
        if (ok) sp[(size_t)c * PN / 4] = make_uint2(pack_bf16(hs[0], hs[1]), pack_bf16(hs[2], hs[3]));
        if (REVERSE) {
            float d = 0.f;
            if (ok) {
                const uint2 hv = hp[(size_t)c * PN / 4];
                const float2 h0 = unpack_bf16(hv.x), h1 = unpack_bf16(hv.y);
                d = hs[0] * h0.x + hs[1] * h0.y + hs[2] * h1.x + hs[3] * h1.y;
            }
            d = block_sum(d, s_tmp);
            if (threadIdx.x == 0) dots[(bh * nc + c) * gridDim.x + blockIdx.x] = decay * d;
        }
        const float2 s0 = unpack_bf16(cur.x), s1 = unpack_bf16(cur.y);
        hs[0] = decay * hs[0] + s0.x;
        hs[1] = decay * hs[1] + s0.y;
        hs[2] = decay * hs[2] + s1.x;
        hs[3] = decay * hs[3] + s1.y;
    }
}

// ----------------------------------------------------------------------------------------------
// forward output of one 64-row tile of a chunk and one head: grid (nchunks * Q/64, H, B)
//   y_i = exp(Acum_i) Hin C_i + sum_{j<=i} (C_i.B_j) exp(Acum_i - Acum_j) dt_j x_j + D x_i
template <int P, int N>
__global__ void __launch_bounds__(THREADS)
ssd_chunk_scan_kernel(bf16* y, const float* dt_s, const float* acum_s, const bf16* hin, const bf16* x, int x_stride,
                      const bf16* Bm, const bf16* Cm, int bc_stride, const bf16* D, int T, int H, int G, int Q) {
    constexpr int BUF_ROWS = P > TILE ? P : TILE;
    __shared__ float s_dt[MAX_CHUNK], s_acum[MAX_CHUNK];
    __shared__ alignas(16) bf16 s_c[TILE * (N + PAD)];
    __shared__ alignas(16) bf16 s_buf[BUF_ROWS * (N + PAD)];  // Hin, then the B tiles
    __shared__ alignas(16) bf16 s_x[TILE * (P + PAD)];
    const int nt = Q / TILE, c = blockIdx.x / nt, it = blockIdx.x % nt, nc = gridDim.x / nt;
    const int h = blockIdx.y, b = blockIdx.z, g = h / (H / G);
    const int t0 = c * Q, valid = min(Q, T - t0), i0 = it * TILE;
    if (i0 >= valid) return;
    const size_t bh = (size_t)b * H + h, pos0 = bh * nc * Q + (size_t)t0;
    const size_t row0 = (size_t)b * T + t0;

    load_chunk_floats(s_dt, s_acum, dt_s + pos0, acum_s + pos0, Q);
    load_rows<N>(s_c, Cm + (row0 + i0) * bc_stride + g * N, bc_stride, TILE, valid - i0);
    load_rows<N>(s_buf, hin + (bh * nc + c) * P * N, N, P, P);
    load_rows<P>(s_x, x + row0 * x_stride + h * P, x_stride, TILE, valid);  // x of the first B tile
    cp_async_wait_sync();

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, m0 = warp * 16;
    const int ra = i0 + m0 + (lane >> 2), rb = ra + 8;  // chunk-local rows of this thread
    float acc[P / 8][4];
    zero(acc);
    warp_mma<P / 8, false, false>(acc, s_c, N + PAD, m0, s_buf, N + PAD, 0, N);
    const float ea = expf(s_acum[ra]), eb = expf(s_acum[rb]);
#pragma unroll
    for (int n = 0; n < P / 8; n++) {
        acc[n][0] *= ea; acc[n][1] *= ea;
        acc[n][2] *= eb; acc[n][3] *= eb;
    }

    for (int jt = 0; jt <= it; jt++) {
        const int j0 = jt * TILE;
        __syncthreads();
        load_rows<N>(s_buf, Bm + (row0 + j0) * bc_stride + g * N, bc_stride, TILE, valid - j0);
        if (jt > 0) load_rows<P>(s_x, x + (row0 + j0) * x_stride + h * P, x_stride, TILE, valid - j0);
        cp_async_wait_sync();
        // on the diagonal tile this warp's rows only see columns j < m0 + 16
        const int kend = jt == it ? warp + 1 : 4;
        float s[8][4];
        zero(s);
        warp_mma<8, false, false>(s, s_c, N + PAD, m0, s_buf, N + PAD, 0, N, 1.f, 1.f, 0, 2 * kend);
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = e < 2 ? ra : rb, j = j0 + n * 8 + 2 * (lane & 3) + (e & 1);
                s[n][e] = j <= i ? s[n][e] * decay_exp(s_acum[i] - s_acum[j]) * s_dt[j] : 0.f;
            }
        uint32_t pa[4][4];
        acc_to_a(pa, s);
        warp_mma_rega<P / 8>(acc, pa, s_x, P + PAD, 0, kend);
    }

    // s_x now holds the diagonal tile: the x rows of this tile
    const float d = __bfloat162float(D[h]);
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int i = half ? rb : ra;
        if (i >= valid) continue;
        const size_t row = row0 + i;
#pragma unroll
        for (int n = 0; n < P / 8; n++) {
            const int p = n * 8 + 2 * (lane & 3);
            const float2 xv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(s_x + (i - i0) * (P + PAD) + p));
            *reinterpret_cast<__nv_bfloat162*>(y + row * (size_t)(H * P) + h * P + p) =
                __floats2bfloat162_rn(acc[n][2 * half] + d * xv.x, acc[n][2 * half + 1] + d * xv.y);
        }
    }
}

// ----------------------------------------------------------------------------------------------
// the two backward tile kernels: grid (nchunks * Q/64, G * slices, B)

// what a block works on: 64-row tile `tile` (of ntl, chunk-local rows r0..) of chunk c (of nc) in batch b,
// the heads h0 .. h0 + hps of group g (head slice sl); `valid` positions of the chunk are inside the sequence
struct TileBlock {
    int ntl, c, tile, nc, g, sl, b, hps, h0, t0, valid, r0;
    __device__ __forceinline__ TileBlock(int T, int H, int G, int Q, int nsl) {
        ntl = Q / TILE, c = blockIdx.x / ntl, tile = blockIdx.x % ntl, nc = gridDim.x / ntl;
        g = blockIdx.y / nsl, sl = blockIdx.y % nsl, b = blockIdx.z;
        hps = H / G / nsl, h0 = g * (H / G) + sl * hps;
        t0 = c * Q, valid = min(Q, T - t0), r0 = tile * TILE;
    }
};

// dots of rows g / g+8 of a 16 x 8NT accumulator with rows m0 + g / m0 + g + 8 of an smem tile (row
// stride ld), this lane's part (quad_sum gives the row's)
template <int NT>
__device__ __forceinline__ void row_dots(float& da, float& db, const float (&acc)[NT][4], const bf16* s, int ld,
                                         int m0) {
    const int lane = threadIdx.x & 31, q = lane & 3;
    da = db = 0.f;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        const int p = n * 8 + 2 * q;
        const float2 va = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(s + (m0 + (lane >> 2)) * ld + p));
        const float2 vb = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(s + (m0 + (lane >> 2) + 8) * ld + p));
        da += va.x * acc[n][0] + va.y * acc[n][1];
        db += vb.x * acc[n][2] + vb.y * acc[n][3];
    }
}

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

// backward, column direction: one 64-row tile of positions j in a chunk, a slice of the heads of one
// group; grid (nchunks * Q/64, G * slices, B). Per head, with u_j = sum_{i>=j} (C_i.B_j) L_ij dy_i
// + exp(Aend - Acum_j) Gout B_j  (L_ij = exp(Acum_i - Acum_j)):
//   dx_j = dt_j u_j + D dy_j,  ddt_dir_j = x_j.u_j,  dd_j = x_j.dy_j
//   dB_j += sum_{i>=j} L_ij dt_j (x_j.dy_i) C_i + dt_j exp(Aend - Acum_j) Gout^T x_j   (summed over heads)
//   csum_j = sum_i Z_ij with Z_ij = (C_i.B_j) L_ij dt_j (x_j.dy_i);  sst_j = dt_j x_j.(state part of u_j)
template <int P, int N>
__global__ void __launch_bounds__(THREADS)
ssd_bwd_dx_db_kernel(bf16* dx, int dx_stride, float* db_part, BwdScratch sc, const float* dt_s, const float* acum_s,
                     const bf16* dy, const bf16* x, int x_stride, const bf16* Bm, const bf16* Cm, int bc_stride,
                     const bf16* D, int T, int H, int G, int Q, int nsl) {
    constexpr int CS = TILE * (N + PAD), DS = TILE * (P + PAD);
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* s_bj = reinterpret_cast<bf16*>(smem);
    bf16* s_cib = s_bj + TILE * (N + PAD);  // 2 buffers: the next C_i tile loads while one is used
    bf16* s_g = s_cib + 2 * CS;
    bf16* s_xj = s_g + P * (N + PAD);
    bf16* s_dyib = s_xj + TILE * (P + PAD);  // 2 buffers
    float* s_dt = reinterpret_cast<float*>(s_dyib + 2 * DS);
    float* s_acum = s_dt + MAX_CHUNK;

    const TileBlock tb(T, H, G, Q, nsl);
    const int jt = tb.tile, j0 = tb.r0, g = tb.g, valid = tb.valid;  // the tile's positions j
    if (j0 >= valid) return;
    const size_t row0 = (size_t)tb.b * T + tb.t0, Tp = (size_t)tb.nc * Q;
    const int dy_stride = H * P;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, m0 = warp * 16, q = lane & 3;
    const int ra = j0 + m0 + (lane >> 2), rb = ra + 8;  // chunk-local rows (positions j)
    load_rows<N>(s_bj, Bm + (row0 + j0) * bc_stride + g * N, bc_stride, TILE, valid - j0);

    float db[N / 8][4];
    zero(db);
    for (int hh = 0; hh < tb.hps; hh++) {
        const int h = tb.h0 + hh;
        const size_t bh = (size_t)tb.b * H + h, pos0 = bh * Tp + tb.t0;
        auto load_i = [&](int it, int buf) {
            const int i0 = it * TILE;
            load_rows<N>(s_cib + buf * CS, Cm + (row0 + i0) * bc_stride + g * N, bc_stride, TILE, valid - i0);
            load_rows<P>(s_dyib + buf * DS, dy + (row0 + i0) * dy_stride + h * P, dy_stride, TILE, valid - i0);
            cp_async_commit();
        };
        __syncthreads();
        load_rows<P>(s_xj, x + (row0 + j0) * x_stride + h * P, x_stride, TILE, valid - j0);
        load_rows<N>(s_g, sc.gout + (bh * tb.nc + tb.c) * P * N, N, P, P);
        load_chunk_floats(s_dt, s_acum, dt_s + pos0, acum_s + pos0, Q);
        cp_async_commit();
        load_i(jt, 0);
        cp_async_wait_group<1>();
        __syncthreads();

        const float aend = s_acum[Q - 1];
        const float dta = s_dt[ra], dtb = s_dt[rb];
        const float wa = expf(aend - s_acum[ra]), wb = expf(aend - s_acum[rb]);
        float u[P / 8][4];
        zero(u);
        warp_mma<P / 8, false, false>(u, s_bj, N + PAD, m0, s_g, N + PAD, 0, N);
#pragma unroll
        for (int n = 0; n < P / 8; n++) {
            u[n][0] *= wa; u[n][1] *= wa; u[n][2] *= wb; u[n][3] *= wb;
        }
        float sa, sb;
        row_dots(sa, sb, u, s_xj, P + PAD, m0);
        sa = dta * quad_sum(sa);
        sb = dtb * quad_sum(sb);
        warp_mma<N / 8, false, true, true>(db, s_xj, P + PAD, m0, s_g, N + PAD, 0, P, dta * wa, dtb * wb);

        float csa = 0.f, csb = 0.f;
        const int it_end = min(tb.ntl, (valid + TILE - 1) / TILE);
        for (int it = jt; it < it_end; it++) {
            const int i0 = it * TILE, buf = (it - jt) & 1;
            if (it + 1 < it_end) {
                load_i(it + 1, buf ^ 1);  // that buffer was freed by the barrier ending the previous iteration
                cp_async_wait_group<1>();
            } else {
                cp_async_wait_group<0>();
            }
            __syncthreads();
            const bf16* s_ci = s_cib + buf * CS;
            const bf16* s_dyi = s_dyib + buf * DS;
            // on the diagonal tile this warp's rows only see columns i >= m0
            const int kbeg = it == jt ? warp : 0;
            float m[8][4], s[8][4];
            zero(m);
            zero(s);
            warp_mma<8, false, false>(m, s_xj, P + PAD, m0, s_dyi, P + PAD, 0, P, 1.f, 1.f, 2 * kbeg);  // x_j . dy_i
            warp_mma<8, false, false>(s, s_bj, N + PAD, m0, s_ci, N + PAD, 0, N, 1.f, 1.f, 2 * kbeg);   // B_j . C_i
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int j = e < 2 ? ra : rb, i = i0 + n * 8 + 2 * q + (e & 1);
                    const float dtj = e < 2 ? dta : dtb;
                    float pv = 0.f, mv = 0.f;
                    if (i >= j) {
                        const float l = decay_exp(s_acum[i] - s_acum[j]);
                        pv = s[n][e] * l;
                        mv = m[n][e] * l * dtj;
                        if (e < 2) csa += s[n][e] * mv; else csb += s[n][e] * mv;  // Z_ij: one factor L_ij
                    }
                    s[n][e] = pv;
                    m[n][e] = mv;
                }
            uint32_t pa[4][4], ma[4][4];
            acc_to_a(pa, s);
            acc_to_a(ma, m);
            warp_mma_rega<P / 8>(u, pa, s_dyi, P + PAD, kbeg);
            warp_mma_rega<N / 8>(db, ma, s_ci, N + PAD, kbeg);
            __syncthreads();
        }
        csa = quad_sum(csa);
        csb = quad_sum(csb);

        // per-head epilogue: dx, x.u, x.dy
        const float d = __bfloat162float(D[h]);
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
                const float2 xv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(s_xj + (j - j0) * (P + PAD) + p));
                float2 dyv = make_float2(0.f, 0.f);
                if (ok) dyv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(dy + row * dy_stride + h * P + p));
                const float u0 = u[n][2 * half], u1 = u[n][2 * half + 1];
                xu += xv.x * u0 + xv.y * u1;
                xdy += xv.x * dyv.x + xv.y * dyv.y;
                if (ok)
                    *reinterpret_cast<__nv_bfloat162*>(dx + row * dx_stride + h * P + p) =
                        __floats2bfloat162_rn(dtj * u0 + d * dyv.x, dtj * u1 + d * dyv.y);
            }
            xu = quad_sum(xu);
            xdy = quad_sum(xdy);
            if (q == 0) {
                const size_t pos = pos0 + j;
                sc.ddt_dir[pos] = xu;
                sc.dd[pos] = xdy;
                sc.csum[pos] = half ? csb : csa;
                sc.sst[pos] = half ? sb : sa;
            }
        }
    }

    store_slice_part<N>(db_part, db, tb, row0, G, nsl, ra, rb);
}

// ----------------------------------------------------------------------------------------------
// backward, row direction: one 64-row tile of positions i, a slice of the heads of one group; grid as above.
//   dC_i += exp(Acum_i) Hin^T dy_i + sum_{j<=i} L_ij dt_j (dy_i.x_j) B_j   (summed over heads)
//   rsum_i = sum_j Z_ij,  off_i = exp(Acum_i) dy_i.(Hin C_i)   (gradients of Acum_i)
template <int P, int N>
__global__ void __launch_bounds__(THREADS)
ssd_bwd_dc_kernel(float* dc_part, BwdScratch sc, const float* dt_s, const float* acum_s, const bf16* dy,
                  const bf16* x, int x_stride, const bf16* Bm, const bf16* Cm, int bc_stride, int T, int H, int G,
                  int Q, int nsl) {
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* s_ci = reinterpret_cast<bf16*>(smem);
    bf16* s_bj = s_ci + TILE * (N + PAD);
    bf16* s_h = s_bj + TILE * (N + PAD);
    bf16* s_dyi = s_h + P * (N + PAD);
    bf16* s_xj = s_dyi + TILE * (P + PAD);
    float* s_dt = reinterpret_cast<float*>(s_xj + TILE * (P + PAD));
    float* s_acum = s_dt + MAX_CHUNK;

    const TileBlock tb(T, H, G, Q, nsl);
    const int it = tb.tile, i0 = tb.r0, g = tb.g, valid = tb.valid;  // the tile's positions i
    if (i0 >= valid) return;
    const size_t row0 = (size_t)tb.b * T + tb.t0, Tp = (size_t)tb.nc * Q;
    const int dy_stride = H * P;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, m0 = warp * 16, q = lane & 3;
    const int ra = i0 + m0 + (lane >> 2), rb = ra + 8;  // chunk-local rows (positions i)
    load_rows<N>(s_ci, Cm + (row0 + i0) * bc_stride + g * N, bc_stride, TILE, valid - i0);

    float dc[N / 8][4];
    zero(dc);
    for (int hh = 0; hh < tb.hps; hh++) {
        const int h = tb.h0 + hh;
        const size_t bh = (size_t)tb.b * H + h, pos0 = bh * Tp + tb.t0;
        __syncthreads();
        load_rows<P>(s_dyi, dy + (row0 + i0) * dy_stride + h * P, dy_stride, TILE, valid - i0);
        load_rows<N>(s_h, sc.hin + (bh * tb.nc + tb.c) * P * N, N, P, P);
        load_chunk_floats(s_dt, s_acum, dt_s + pos0, acum_s + pos0, Q);
        cp_async_wait_sync();

        const float ea = expf(s_acum[ra]), eb = expf(s_acum[rb]);
        float oa, ob;
        {
            float yo[P / 8][4];  // Hin C_i
            zero(yo);
            warp_mma<P / 8, false, false>(yo, s_ci, N + PAD, m0, s_h, N + PAD, 0, N);
            row_dots(oa, ob, yo, s_dyi, P + PAD, m0);
        }
        oa = ea * quad_sum(oa);
        ob = eb * quad_sum(ob);
        warp_mma<N / 8, false, true, true>(dc, s_dyi, P + PAD, m0, s_h, N + PAD, 0, P, ea, eb);

        float rsa = 0.f, rsb = 0.f;
        for (int jt = 0; jt <= it; jt++) {
            const int j0 = jt * TILE;
            __syncthreads();
            load_rows<N>(s_bj, Bm + (row0 + j0) * bc_stride + g * N, bc_stride, TILE, valid - j0);
            load_rows<P>(s_xj, x + (row0 + j0) * x_stride + h * P, x_stride, TILE, valid - j0);
            cp_async_wait_sync();
            // on the diagonal tile this warp's rows only see columns j < m0 + 16
            const int kend = jt == it ? warp + 1 : 4;
            float m[8][4], s[8][4];
            zero(m);
            zero(s);
            warp_mma<8, false, false>(s, s_ci, N + PAD, m0, s_bj, N + PAD, 0, N, 1.f, 1.f, 0, 2 * kend);   // C_i . B_j
            warp_mma<8, false, false>(m, s_dyi, P + PAD, m0, s_xj, P + PAD, 0, P, 1.f, 1.f, 0, 2 * kend);  // dy_i . x_j
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int i = e < 2 ? ra : rb, j = j0 + n * 8 + 2 * q + (e & 1);
                    float mv = 0.f;
                    if (j <= i) {
                        mv = m[n][e] * decay_exp(s_acum[i] - s_acum[j]) * s_dt[j];
                        if (e < 2) rsa += s[n][e] * mv; else rsb += s[n][e] * mv;
                    }
                    m[n][e] = mv;
                }
            uint32_t ma[4][4];
            acc_to_a(ma, m);
            warp_mma_rega<N / 8>(dc, ma, s_bj, N + PAD, 0, kend);
        }
        rsa = quad_sum(rsa);
        rsb = quad_sum(rsb);
        if (q == 0) {
            sc.rsum[pos0 + ra] = rsa;
            sc.rsum[pos0 + rb] = rsb;
            sc.off[pos0 + ra] = oa;
            sc.off[pos0 + rb] = ob;
        }
    }

    store_slice_part<N>(dc_part, dc, tb, row0, G, nsl, ra, rb);
}

// ----------------------------------------------------------------------------------------------
// per chunk and head: gradient of Acum, reverse cumsum to the gradient of a_t = dt_t A, then
//   ddt_t = ddt_dir_t + A da_t,  ddt_raw_t = ddt_t sigmoid(dt_raw_t + dt_bias)
// and the chunk's partial sums of ddt_raw, dt da (-> dA), x.dy (-> dD). grid (nchunks, H, B)
static __global__ void __launch_bounds__(THREADS)
ssd_bwd_dt_kernel(bf16* ddt_raw, int ddt_stride, BwdScratch sc, const float* dt_s, const float* acum_s,
                  const bf16* dt_raw, int dt_stride, const bf16* dt_bias, const bf16* A_log, int T, int H, int Q,
                  int splits) {
    __shared__ float s_r[MAX_CHUNK], s_tmp[32];
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, nc = gridDim.x;
    const int t0 = c * Q, valid = min(Q, T - t0);
    const size_t bh = (size_t)b * H + h, pos0 = bh * nc * Q + t0;
    const float A = -expf(__bfloat162float(A_log[h])), bias = __bfloat162float(dt_bias[h]);

    float sst = 0.f;
    for (int i = threadIdx.x; i < valid; i += blockDim.x) sst += sc.sst[pos0 + i];
    sst = block_sum(sst, s_tmp);
    float pass = 0.f;
    for (int k = 0; k < splits; k++) pass += sc.dots[(bh * nc + c) * splits + k];
    // dAcum stored reversed so that an inclusive scan gives the reverse cumsum
    for (int i = threadIdx.x; i < Q; i += blockDim.x) {
        const size_t p = pos0 + i;
        float v = i < valid ? sc.rsum[p] - sc.csum[p] + sc.off[p] - sc.sst[p] : 0.f;
        if (i == Q - 1) v += sst + pass;  // Aend = Acum[Q-1]: state decay and chunk-to-chunk decay
        s_r[Q - 1 - i] = v;
    }
    __syncthreads();
    block_scan(s_r, Q);

    float gbias = 0.f, gA = 0.f, gD = 0.f;
    for (int i = threadIdx.x; i < valid; i += blockDim.x) {
        const size_t p = pos0 + i, row = (size_t)b * T + t0 + i;
        const float da = s_r[Q - 1 - i];
        const float ddt = sc.ddt_dir[p] + A * da;
        const float z = __bfloat162float(dt_raw[row * dt_stride + h]) + bias;
        const float gr = ddt / (1.f + expf(-z));
        ddt_raw[row * ddt_stride + h] = __float2bfloat16(gr);
        gbias += gr;
        gA += dt_s[p] * da;
        gD += sc.dd[p];
    }
    gbias = block_sum(gbias, s_tmp);
    gA = block_sum(gA, s_tmp);
    gD = block_sum(gD, s_tmp);
    if (threadIdx.x == 0) {
        float* o = sc.partials + (bh * nc + c) * 3;
        o[0] = gbias;
        o[1] = gA;
        o[2] = gD;
    }
}

// parameter gradients: sum the per-chunk partials over b and c in order, accumulate
static __global__ void ssd_param_grads_kernel(float* ddt_bias, float* dA_log, float* dD, const float* partials,
                                       const bf16* A_log, int B, int H, int nc) {
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
    ddt_bias[h] += gb;
    dA_log[h] += ga * -expf(__bfloat162float(A_log[h]));  // dA/dA_log = A
    dD[h] += gd;
}

// dB, dC: sum the head-slice partials (B, T, G, slices, N) in order into the strided bf16 outputs
static __global__ void ssd_reduce_bc_kernel(bf16* dB, bf16* dC, int dbc_stride, const float* db_part, const float* dc_part,
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
    dB[row * dbc_stride + gn] = __float2bfloat16(sb);
    dC[row * dbc_stride + gn] = __float2bfloat16(scv);
}

// ----------------------------------------------------------------------------------------------
// launchers

inline size_t chunk_state_smem_bytes(int P, int N) { return (size_t)2 * TILE * (P + N + 2 * PAD) * sizeof(bf16); }

// dC kernel; the dx/dB kernel double-buffers its C_i and dy_i tiles
inline size_t bwd_smem_bytes(int P, int N, bool dbuf) {
    const int extra = dbuf ? TILE * (N + PAD) + TILE * (P + PAD) : 0;
    return (size_t)(2 * TILE * (N + PAD) + P * (N + PAD) + 2 * TILE * (P + PAD) + extra) * sizeof(bf16) +
           2 * MAX_CHUNK * sizeof(float);
}

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

template <int P, int N>
void forward_impl(bf16* y, void* saved, void* scratch, const bf16* x, int x_stride, const bf16* Bm, const bf16* Cm,
                  int bc_stride, const bf16* dt_raw, int dt_stride, const bf16* dt_bias, const bf16* A_log,
                  const bf16* D, const SSDShape& sh, cudaStream_t s) {
    const int nc = nchunks(sh), Q = sh.chunk;
    float* dt_s = (float*)saved;
    float* acum_s = dt_s + padded_positions(sh);
    bf16* hin = (bf16*)scratch;  // chunk states, then in place the states entering each chunk
    const size_t cs_smem = chunk_state_smem_bytes(P, N);
    cudaCheck(cudaFuncSetAttribute(ssd_chunk_state_kernel<P, N, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)cs_smem));
    ssd_chunk_state_kernel<P, N, false><<<dim3(nc, sh.H, sh.B), THREADS, cs_smem, s>>>(
        hin, dt_s, acum_s, nullptr, x, x_stride, Bm, bc_stride, dt_raw, dt_stride, dt_bias, A_log, sh.T, sh.H, sh.G, Q);
    cudaCheckLast();
    ssd_state_pass_kernel<false><<<dim3(pass_splits(sh), sh.B * sh.H), PASS_THREADS, 0, s>>>(
        hin, nullptr, nullptr, acum_s, nc, Q, P * N);
    cudaCheckLast();
    ssd_chunk_scan_kernel<P, N><<<dim3(nc * (Q / TILE), sh.H, sh.B), THREADS, 0, s>>>(
        y, dt_s, acum_s, hin, x, x_stride, Bm, Cm, bc_stride, D, sh.T, sh.H, sh.G, Q);
    cudaCheckLast();
}

template <int P, int N>
void backward_impl(bf16* dx, int dx_stride, bf16* dB, bf16* dC, int dbc_stride, bf16* ddt_raw, int ddt_stride,
                   float* ddt_bias, float* dA_log, float* dD, void* scratch, const bf16* dy, const bf16* x,
                   int x_stride, const bf16* Bm, const bf16* Cm, int bc_stride, const bf16* dt_raw, int dt_stride,
                   const bf16* dt_bias, const bf16* A_log, const bf16* D, const void* saved, const SSDShape& sh,
                   cudaStream_t s) {
    const int nc = nchunks(sh), Q = sh.chunk, nsl = head_slices(sh), splits = pass_splits(sh);
    const float* dt_s = (const float*)saved;
    const float* acum_s = dt_s + padded_positions(sh);
    BwdScratch sc(sh, scratch);
    const dim3 chunk_grid(nc, sh.H, sh.B), pass_grid(splits, sh.B * sh.H);
    const dim3 tile_grid(nc * (Q / TILE), sh.G * nsl, sh.B);

    // recompute the states entering each chunk
    const size_t cs_smem = chunk_state_smem_bytes(P, N);
    cudaCheck(cudaFuncSetAttribute(ssd_chunk_state_kernel<P, N, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)cs_smem));
    cudaCheck(cudaFuncSetAttribute(ssd_chunk_state_kernel<P, N, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)cs_smem));
    ssd_chunk_state_kernel<P, N, false><<<chunk_grid, THREADS, cs_smem, s>>>(
        sc.hin, nullptr, nullptr, nullptr, x, x_stride, Bm, bc_stride, dt_raw, dt_stride, dt_bias, A_log, sh.T, sh.H, sh.G, Q);
    cudaCheckLast();
    ssd_state_pass_kernel<false><<<pass_grid, PASS_THREADS, 0, s>>>(sc.hin, nullptr, nullptr, acum_s, nc, Q, P * N);
    cudaCheckLast();
    // state gradients: per-chunk dS from the outputs, then the reverse pass to Gout
    ssd_chunk_state_kernel<P, N, true><<<chunk_grid, THREADS, cs_smem, s>>>(
        sc.gout, nullptr, nullptr, acum_s, dy, sh.H * P, Cm, bc_stride, nullptr, 0, nullptr, nullptr,
        sh.T, sh.H, sh.G, Q);
    cudaCheckLast();
    ssd_state_pass_kernel<true><<<pass_grid, PASS_THREADS, 0, s>>>(sc.gout, sc.dots, sc.hin, acum_s, nc, Q, P * N);
    cudaCheckLast();

    const size_t smem = bwd_smem_bytes(P, N, false), smem_db = bwd_smem_bytes(P, N, true);
    cudaCheck(cudaFuncSetAttribute(ssd_bwd_dx_db_kernel<P, N>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)smem_db));
    cudaCheck(cudaFuncSetAttribute(ssd_bwd_dc_kernel<P, N>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    ssd_bwd_dx_db_kernel<P, N><<<tile_grid, THREADS, smem_db, s>>>(dx, dx_stride, sc.db_part, sc, dt_s, acum_s, dy, x,
                                                                x_stride, Bm, Cm, bc_stride, D, sh.T, sh.H, sh.G, Q,
                                                                nsl);
    cudaCheckLast();
    ssd_bwd_dc_kernel<P, N><<<tile_grid, THREADS, smem, s>>>(sc.dc_part, sc, dt_s, acum_s, dy, x, x_stride, Bm, Cm,
                                                             bc_stride, sh.T, sh.H, sh.G, Q, nsl);
    cudaCheckLast();
    ssd_bwd_dt_kernel<<<chunk_grid, THREADS, 0, s>>>(ddt_raw, ddt_stride, sc, dt_s, acum_s, dt_raw, dt_stride,
                                                    dt_bias, A_log, sh.T, sh.H, Q, splits);
    cudaCheckLast();
    ssd_param_grads_kernel<<<(int)ceil_div(sh.H, 128), 128, 0, s>>>(ddt_bias, dA_log, dD, sc.partials, A_log, sh.B,
                                                                     sh.H, nc);
    cudaCheckLast();
    const size_t rows = (size_t)sh.B * sh.T, n = rows * sh.G * sh.N;
    ssd_reduce_bc_kernel<<<(unsigned)ceil_div(n, 256), 256, 0, s>>>(dB, dC, dbc_stride, sc.db_part, sc.dc_part, rows,
                                                                    sh.G, sh.N, nsl);
    cudaCheckLast();
}

// run F<P, N>() for the runtime (P, N)
template <template <int, int> class F, typename... Args>
void dispatch(const SSDShape& sh, Args&&... args) {
    check_shape(sh);
    if (sh.P == 64 && sh.N == 128) F<64, 128>::run(args...);
    else if (sh.P == 64 && sh.N == 64) F<64, 64>::run(args...);
    else if (sh.P == 32 && sh.N == 128) F<32, 128>::run(args...);
    else F<32, 64>::run(args...);
}
template <int P, int N> struct Forward {
    template <typename... A> static void run(A... a) { forward_impl<P, N>(a...); }
};
template <int P, int N> struct Backward {
    template <typename... A> static void run(A... a) { backward_impl<P, N>(a...); }
};

}  // namespace ssd

// dt and Acum per (b, h, padded position), fp32
inline size_t ssd_saved_bytes(const SSDShape& sh) { return 2 * ssd::padded_positions(sh) * sizeof(float); }

inline size_t ssd_scratch_bytes(const SSDShape& sh) {
    const size_t fwd = ssd::fwd_scratch_bytes(sh), bwd = ssd::BwdScratch(sh, nullptr).total * sizeof(float);
    return fwd > bwd ? fwd : bwd;
}

inline void ssd_forward(bf16* y, void* saved, void* scratch, const bf16* x, int x_stride, const bf16* Bm,
                        const bf16* Cm, int bc_stride, const bf16* dt_raw, int dt_stride, const bf16* dt_bias,
                        const bf16* A_log, const bf16* D, const SSDShape& sh, cudaStream_t s) {
    ssd::check_shape(sh);
    ssd::check_rows("x", x, x_stride, sh.H * sh.P);
    ssd::check_rows("B", Bm, bc_stride, sh.G * sh.N);
    ssd::check_rows("C", Cm, bc_stride, sh.G * sh.N);
    ssd::check_rows("y", y, sh.H * sh.P, sh.H * sh.P);
    ssd::dispatch<ssd::Forward>(sh, y, saved, scratch, x, x_stride, Bm, Cm, bc_stride, dt_raw, dt_stride, dt_bias,
                                A_log, D, sh, s);
}

inline void ssd_backward(bf16* dx, int dx_stride, bf16* dB, bf16* dC, int dbc_stride, bf16* ddt_raw, int ddt_stride,
                         float* ddt_bias, float* dA_log, float* dD, void* scratch, const bf16* dy, const bf16* x,
                         int x_stride, const bf16* Bm, const bf16* Cm, int bc_stride, const bf16* dt_raw,
                         int dt_stride, const bf16* dt_bias, const bf16* A_log, const bf16* D, const void* saved,
                         const SSDShape& sh, cudaStream_t s) {
    ssd::check_shape(sh);
    ssd::check_rows("x", x, x_stride, sh.H * sh.P);
    ssd::check_rows("B", Bm, bc_stride, sh.G * sh.N);
    ssd::check_rows("C", Cm, bc_stride, sh.G * sh.N);
    ssd::check_rows("dy", dy, sh.H * sh.P, sh.H * sh.P);
    ssd::check_rows("dx", dx, dx_stride, sh.H * sh.P);
    ssd::dispatch<ssd::Backward>(sh, dx, dx_stride, dB, dC, dbc_stride, ddt_raw, ddt_stride, ddt_bias, dA_log, dD,
                                 scratch, dy, x, x_stride, Bm, Cm, bc_stride, dt_raw, dt_stride, dt_bias, A_log, D,
                                 saved, sh, s);
}

// The launchers on argument structs (what the model calls)
struct SSDInputs {
    const bf16 *x, *Bm, *Cm;
    const bf16* dt;
    int x_stride, bc_stride, dt_stride;
    const bf16 *dt_bias, *A_log, *D;
    const int* pos = nullptr;
};
struct SSDGrads {
    bf16 *dx, *dB, *dC, *ddt;
    int dx_stride, dbc_stride, ddt_stride;
    float *ddt_bias, *dA_log, *dD;
};
inline void ssd_forward(bf16* y, void* saved, void* scratch, const SSDInputs& in, const SSDShape& sh, cudaStream_t s) {
    if (in.pos) THROW("ssd_forward: document boundaries are not supported yet");
    ssd_forward(y, saved, scratch, in.x, in.x_stride, in.Bm, in.Cm, in.bc_stride, in.dt, in.dt_stride, in.dt_bias,
                in.A_log, in.D, sh, s);
}
inline void ssd_backward(const SSDGrads& g, void* scratch, const bf16* dy, const SSDInputs& in, const void* saved,
                         const SSDShape& sh, cudaStream_t s) {
    if (in.pos) THROW("ssd_backward: document boundaries are not supported yet");
    ssd_backward(g.dx, g.dx_stride, g.dB, g.dC, g.dbc_stride, g.ddt, g.ddt_stride, g.ddt_bias, g.dA_log, g.dD, scratch,
                 dy, in.x, in.x_stride, in.Bm, in.Cm, in.bc_stride, in.dt, in.dt_stride, in.dt_bias, in.A_log, in.D,
                 saved, sh, s);
}
