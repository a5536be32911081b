// Mamba-1 selective scan, forward and backward.
//
// Per batch b, channel d (of D), state n (of N), delta_t = softplus(dt_raw + dt_bias[d]),
// A[d,n] = -exp(A_log[d,n]):
//   h_t[d,n] = exp(delta_t A[d,n]) h_{t-1}[d,n] + delta_t Bm_t[n] u_t[d]          (h_{-1} = 0)
//   y_t[d]   = (sum_n Cm_t[n] h_t[d,n] + Dskip[d] u_t[d]) * silu(z_t[d])
//
// Layout of the work: a thread owns one channel d and NPT states of it, G threads (adjacent lanes)
// share a channel, a block holds THREADS / G channels and runs sequentially over time; the state
// lives in registers only. Inputs are staged per time tile in shared memory (fp32, delta = softplus
// computed once per element). The forward sums C.h over the G lanes of a channel with a transposing
// butterfly (one shuffle per value), and saves the state at the start of every CK-step chunk (fp32,
// `saved`). The backward walks time in reverse: per chunk it recomputes the states at its tile starts
// from the saved chunk state (pass 1), then per tile in reverse recomputes the tile's states and decays
// into registers and runs the reverse recurrence for dh (pass 2). Per-(t,d) sums over states (du,
// ddelta, the pre-gate y for dz) use the same butterfly over the G lanes; the per-(t,n) sums over
// channels (dB, dC) go butterfly within the warp, shared memory across warps, then per-block partials
// in scratch and a fixed-order pass over blocks. Parameter gradients: per-(b,d) partials, summed over b
// in order. No atomics: every rerun gives the same bits. All accumulation is fp32.
// To bound the dB/dC partials, long sequences are processed in slabs of whole chunks (last slab
// first), the dh carry and the parameter-gradient partials passing between slabs through scratch.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include "cuda_common.cuh"

struct ScanShape { int B, T, D, N; };

namespace scan {

constexpr int CK = 64;       // steps per saved chunk state
constexpr int TT_F = 32;     // forward time tile
constexpr int TT_B = 8;      // backward time tile (register cache of decays and states)
// bytes of dB/dC partials per backward slab (a variable so that tests can force several slabs)
inline size_t partial_budget = (size_t)192 << 20;
constexpr float LOG2E = 1.4426950408889634f;

// configuration by N: NPT states per thread, G threads per channel, THREADS per block
struct Config { int npt, g, threads; };
inline Config config(int N) {
    if (N <= 4) return {4, 1, 256};
    if (N <= 8) return {4, 2, 256};
    if (N <= 16) return {4, 4, 256};
    if (N <= 32) return {4, 8, 256};
    if (N <= 64) return {4, 16, 256};
    if (N <= 128) return {4, 32, 256};
    return {8, 32, 128};
}
inline int padded_n(int N) { Config c = config(N); return c.npt * c.g; }
inline int channels_per_block(int N) { Config c = config(N); return c.threads / c.g; }
inline int nchunks(const ScanShape& sh) { return (sh.T + CK - 1) / CK; }
inline int dblocks(const ScanShape& sh) { return (sh.D + channels_per_block(sh.N) - 1) / channels_per_block(sh.N); }
// chunks per backward slab
inline int slab_chunks(const ScanShape& sh) {
    const size_t per_step = (size_t)dblocks(sh) * sh.B * 2 * padded_n(sh.N) * sizeof(float);
    size_t c = partial_budget / (per_step * CK);
    if (c < 1) c = 1;
    if (c > (size_t)nchunks(sh)) c = nchunks(sh);
    return (int)c;
}

// backward scratch layout (floats)
struct BwdScratch {
    float *part, *carry, *acc_da, *acc_dd, *acc_db;
    size_t total;
    BwdScratch(const ScanShape& sh, void* base) {
        const size_t NP = padded_n(sh.N);
        size_t off = 0;
        auto take = [&](size_t n) { float* p = base ? (float*)base + off : nullptr; off += (n + 3) / 4 * 4; return p; };
        part = take((size_t)dblocks(sh) * sh.B * slab_chunks(sh) * CK * 2 * NP);
        carry = take((size_t)sh.B * sh.D * NP);
        acc_da = take((size_t)sh.B * sh.D * NP);
        acc_dd = take((size_t)sh.B * sh.D);
        acc_db = take((size_t)sh.B * sh.D);
        total = off;
    }
};

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float softplusf(float x) { return x > 20.f ? x : log1pf(__expf(x)); }
__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + __expf(-x)); }
__device__ __forceinline__ float bf(bf16 v) { return __bfloat162float(v); }

// Sums v over R lanes whose lane ids differ by multiples of STRIDE (rank = the lane's index among
// them, 0..R-1), CNT values at once with CNT - CNT/R shuffles: afterwards v[i], i < CNT/R, holds the
// group sum of the original index rank * (CNT/R) + i. The order of additions is fixed.
template <int CNT, int R, int STRIDE, int OFF = R / 2>
__device__ __forceinline__ void transpose_reduce(float (&v)[CNT], int rank) {
    static_assert(CNT % R == 0, "CNT must be a multiple of R");
    if constexpr (OFF >= 1) {
        constexpr int half = CNT * OFF / R;
        const bool upper = (rank & OFF) != 0;
#pragma unroll
        for (int i = 0; i < half; i++) {
            const float send = upper ? v[i] : v[i + half];
            const float keep = upper ? v[i + half] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF * STRIDE);
        }
        transpose_reduce<CNT, R, STRIDE, OFF / 2>(v, rank);
    }
}

template <int NPT>
__device__ __forceinline__ void load_vec(float (&dst)[NPT], const float* src) {
#pragma unroll
    for (int j = 0; j < NPT; j += 4) {
        const float4 v = *reinterpret_cast<const float4*>(src + j);
        dst[j] = v.x; dst[j + 1] = v.y; dst[j + 2] = v.z; dst[j + 3] = v.w;
    }
}

// the rows a kernel reads: u, dt_raw, z (strides us, dts, zs), B and C (stride bcs), and dt_bias
struct Inputs {
    const bf16 *u, *dtr, *z, *Bm, *Cm, *dt_bias;
    int us, dts, zs, bcs;
};

// One time tile [t0, t0 + TT) of the inputs in registers, all loaded before any is converted so that the loads
// overlap. Element e of this thread is i = tid + e THREADS of the [TT][DT] tile (step i / DT, channel
// d0 + i % DT) and of the [TT][NP] tile (step i / NP, state i % NP); zeros outside the sequence, the channels
// and the states. full = false loads only what the state recurrence needs (dt_raw, dt_bias, u, B); DY also dy.
template <int TT, int DT, int NP, int THREADS, bool DY>
struct TileRegs {
    static constexpr int E = (TT * DT + THREADS - 1) / THREADS, EB = (TT * NP + THREADS - 1) / THREADS;
    bf16 dt[E], bias[E], u[E], z[E], dy[DY ? E : 1], B[EB], C[EB];

    __device__ __forceinline__ void load(const Inputs& in, const bf16* dout, int t0, int b, int d0, int T, int D,
                                         int N, bool full) {
        const int tid = threadIdx.x;
        const bf16 zero = __float2bfloat16(0.f);
#pragma unroll
        for (int e = 0; e < E; e++) {
            const int i = tid + e * THREADS, tl = i / DT, c = i % DT, t = t0 + tl, dd = d0 + c;
            const bool ok = i < TT * DT && t < T && dd < D;
            const size_t r = (size_t)b * T + t;
            dt[e] = ok ? in.dtr[r * in.dts + dd] : zero;
            bias[e] = ok ? in.dt_bias[dd] : zero;
            u[e] = ok ? in.u[r * in.us + dd] : zero;
            z[e] = ok && full ? in.z[r * in.zs + dd] : zero;
            if constexpr (DY) dy[e] = ok && full ? dout[r * D + dd] : zero;
        }
#pragma unroll
        for (int e = 0; e < EB; e++) {
            const int i = tid + e * THREADS, tl = i / NP, n = i % NP, t = t0 + tl;
            const bool ok = i < TT * NP && t < T && n < N;
            const size_t r = ((size_t)b * T + t) * in.bcs + n;
            B[e] = ok ? in.Bm[r] : zero;
            C[e] = ok && full ? in.Cm[r] : zero;
        }
    }
};

// ----------------------------------------------------------------------------------------------
// forward

template <int NPT, int G, int THREADS>
__global__ void __launch_bounds__(THREADS)
fwd_kernel(bf16* out, float* saved, const bf16* u, int us, const bf16* dtr, int dts, const bf16* z, int zs,
           const bf16* Bm, const bf16* Cm, int bcs, const bf16* dt_bias, const bf16* A_log, const bf16* Dskip,
           int T, int D, int N) {
    constexpr int NP = NPT * G, DT = THREADS / G, TT = TT_F;
    static_assert(TT >= G, "tile must cover the lanes of a channel");
    extern __shared__ float4 smem_f4[];
    float* sm = reinterpret_cast<float*>(smem_f4);
    float* s_B = sm;                  // [TT][NP]
    float* s_C = s_B + TT * NP;       // [TT][NP]
    float* s_delta = s_C + TT * NP;   // [TT][DT]
    float* s_u = s_delta + TT * DT;   // [TT][DT]
    float* s_y = s_u + TT * DT;       // [TT][DT]
    float* s_z = s_y + TT * DT;       // [TT][DT]

    const int tid = threadIdx.x, g = tid % G, dl = tid / G;
    const int b = blockIdx.y, d0 = blockIdx.x * DT, d = d0 + dl;
    const int nck = (T + CK - 1) / CK;
    const Inputs in{u, dtr, z, Bm, Cm, dt_bias, us, dts, zs, bcs};

    float A2[NPT], h[NPT];
#pragma unroll
    for (int j = 0; j < NPT; j++) {
        const int n = g * NPT + j;
        A2[j] = (d < D && n < N) ? -__expf(bf(A_log[(size_t)d * N + n])) * LOG2E : 0.f;
        h[j] = 0.f;
    }

    for (int t0 = 0; t0 < T; t0 += TT) {
        if (t0 % CK == 0 && d < D) {
            float* dst = saved + (((size_t)b * nck + t0 / CK) * D + d) * NP + g * NPT;
#pragma unroll
            for (int j = 0; j < NPT; j += 4) *reinterpret_cast<float4*>(dst + j) = make_float4(h[j], h[j + 1], h[j + 2], h[j + 3]);
        }
        {  // stage the tile
            TileRegs<TT, DT, NP, THREADS, false> r;
            r.load(in, nullptr, t0, b, d0, T, D, N, true);
#pragma unroll
            for (int e = 0; e < r.E; e++) {
                const int i = tid + e * THREADS, tl = i / DT, c = i % DT, t = t0 + tl, dd = d0 + c;
                if (i < TT * DT) {
                    s_delta[i] = (t < T && dd < D) ? softplusf(bf(r.dt[e]) + bf(r.bias[e])) : 0.f;
                    s_u[i] = bf(r.u[e]);
                    s_z[i] = bf(r.z[e]);
                }
            }
#pragma unroll
            for (int e = 0; e < r.EB; e++) {
                const int i = tid + e * THREADS;
                if (i < TT * NP) {
                    s_B[i] = bf(r.B[e]);
                    s_C[i] = bf(r.C[e]);
                }
            }
        }
        __syncthreads();
        float yp[TT];
#pragma unroll
        for (int tl = 0; tl < TT; tl++) {
            const float de = s_delta[tl * DT + dl], du = de * s_u[tl * DT + dl];
            float Bv[NPT], Cv[NPT];
            load_vec<NPT>(Bv, s_B + tl * NP + g * NPT);
            load_vec<NPT>(Cv, s_C + tl * NP + g * NPT);
            float acc = 0.f;
#pragma unroll
            for (int j = 0; j < NPT; j++) {
                h[j] = ex2(de * A2[j]) * h[j] + du * Bv[j];
                acc += Cv[j] * h[j];
            }
            yp[tl] = acc;
        }
        transpose_reduce<TT, G, 1>(yp, g);
#pragma unroll
        for (int i = 0; i < TT / G; i++) s_y[(g * (TT / G) + i) * DT + dl] = yp[i];
        __syncthreads();
        for (int i = tid; i < TT * DT; i += THREADS) {
            const int tl = i / DT, c = i % DT, t = t0 + tl, dd = d0 + c;
            if (t < T && dd < D) {
                const size_t r = (size_t)b * T + t;
                const float zz = s_z[i];
                const float y = (s_y[i] + bf(Dskip[dd]) * s_u[i]) * zz * sigmoidf_(zz);
                out[r * D + dd] = __float2bfloat16(y);
            }
        }
        __syncthreads();
    }
}

template <int NPT, int G, int THREADS>
inline size_t fwd_smem(int) { return (size_t)(2 * TT_F * NPT * G + 4 * TT_F * (THREADS / G)) * sizeof(float); }

template <int NPT, int G, int THREADS>
inline void launch_fwd(bf16* out, void* saved, const bf16* u, int us, const bf16* dtr, int dts, const bf16* z, int zs,
                       const bf16* Bm, const bf16* Cm, int bcs, const bf16* dt_bias, const bf16* A_log,
                       const bf16* Dskip, const ScanShape& sh, cudaStream_t s) {
    const size_t smem = fwd_smem<NPT, G, THREADS>(sh.N);
    auto k = fwd_kernel<NPT, G, THREADS>;
    cudaCheck(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((sh.D + THREADS / G - 1) / (THREADS / G), sh.B);
    k<<<grid, THREADS, smem, s>>>(out, (float*)saved, u, us, dtr, dts, z, zs, Bm, Cm, bcs, dt_bias, A_log, Dskip,
                                  sh.T, sh.D, sh.N);
    cudaCheckLast();
}

// ----------------------------------------------------------------------------------------------
// backward

// one slab: chunks [c_lo, c_hi), time [c_lo*CK, min(T, c_hi*CK)); first == this is the last slab in
// time (dh starts at zero, the parameter partials start from zero)
template <int NPT, int G, int THREADS>
__global__ void __launch_bounds__(THREADS)
bwd_kernel(bf16* du_out, int dus, bf16* ddt_out, int ddts, bf16* dz_out, int dzs, BwdScratch sc, const bf16* dout,
           const bf16* u, int us, const bf16* dtr, int dts, const bf16* z, int zs, const bf16* Bm, const bf16* Cm,
           int bcs, const bf16* dt_bias, const bf16* A_log, const bf16* Dskip, const float* saved, int B, int T, int D,
           int N, int c_lo, int c_hi, int slab_steps, int first) {
    constexpr int NP = NPT * G, DT = THREADS / G, TT = TT_B, W = THREADS / 32, R = 32 / G;
    constexpr int NTK = CK / TT;
    constexpr int CNT_D = 4 * TT, CNT_N = TT * NPT;
    static_assert(CNT_D >= G && CNT_N >= R, "butterfly sizes");
    extern __shared__ float4 smem_f4[];
    float* sm = reinterpret_cast<float*>(smem_f4);
    float* s_hb = sm;                          // [NTK][NPT][THREADS] tile-start states
    float* s_B = s_hb + NTK * NPT * THREADS;   // [TT][NP]
    float* s_C = s_B + TT * NP;                // [TT][NP]
    float* s_red = s_C + TT * NP;              // [W][2][TT][NP]
    float* s_delta = s_red + W * 2 * TT * NP;  // [TT][DT] each below
    float* s_u = s_delta + TT * DT;
    float* s_dyp = s_u + TT * DT;              // dy * silu(z)
    float* s_gz = s_dyp + TT * DT;             // dy * silu'(z)
    float* s_sig = s_gz + TT * DT;             // sigmoid(dt_raw + dt_bias)
    float* s_X = s_sig + TT * DT;              // sum_n dh B
    float* s_Y = s_X + TT * DT;                // sum_n dh q A
    float* s_Ys = s_Y + TT * DT;               // sum_n C h
    float* s_p = s_Ys + TT * DT;               // [2][THREADS] final parameter reduction

    const int tid = threadIdx.x, g = tid % G, dl = tid / G, lane = tid % 32, warp = tid / 32;
    const int b = blockIdx.y, d0 = blockIdx.x * DT, d = d0 + dl;
    const int nck = (T + CK - 1) / CK;
    const Inputs in{u, dtr, z, Bm, Cm, dt_bias, us, dts, zs, bcs};

    float A[NPT], A2[NPT], dh[NPT], dA_acc[NPT];
#pragma unroll
    for (int j = 0; j < NPT; j++) {
        const int n = g * NPT + j;
        A[j] = (d < D && n < N) ? -__expf(bf(A_log[(size_t)d * N + n])) : 0.f;
        A2[j] = A[j] * LOG2E;
        const size_t idx = ((size_t)b * D + d) * NP + n;
        dh[j] = (!first && d < D) ? sc.carry[idx] : 0.f;
        dA_acc[j] = 0.f;
    }
    float dD_acc = 0.f, db_acc = 0.f;
    const int t_lo = c_lo * CK;

    // stage a tile: full also loads dy, z, C and the gate terms
    auto stage = [&](int t0, bool full) {
        TileRegs<TT, DT, NP, THREADS, true> r;
        r.load(in, dout, t0, b, d0, T, D, N, full);
#pragma unroll
        for (int e = 0; e < r.E; e++) {
            const int i = tid + e * THREADS, tl = i / DT, c = i % DT, t = t0 + tl, dd = d0 + c;
            if (i < TT * DT) {
                const bool ok = t < T && dd < D;
                const float x = bf(r.dt[e]) + bf(r.bias[e]), uu = bf(r.u[e]);
                s_delta[i] = ok ? softplusf(x) : 0.f;
                s_u[i] = uu;
                if (full) {
                    const float zz = bf(r.z[e]), dy = bf(r.dy[e]);
                    const float sz = sigmoidf_(zz);
                    const float dyp = dy * zz * sz;  // zero where not ok
                    s_dyp[i] = dyp;
                    s_gz[i] = dy * sz * (1.f + zz * (1.f - sz));
                    s_sig[i] = sigmoidf_(x);
                    dD_acc += dyp * uu;
                }
            }
        }
#pragma unroll
        for (int e = 0; e < r.EB; e++) {
            const int i = tid + e * THREADS;
            if (i < TT * NP) {
                s_B[i] = bf(r.B[e]);
                if (full) s_C[i] = bf(r.C[e]);
            }
        }
    };

    for (int c = c_hi - 1; c >= c_lo; c--) {
        const int tc0 = c * CK, tc1 = min(T, tc0 + CK), ntile = (tc1 - tc0 + TT - 1) / TT;
        // pass 1: states at the tile starts
        float h[NPT];
        if (d < D) {
            load_vec<NPT>(h, saved + (((size_t)b * nck + c) * D + d) * NP + g * NPT);
        } else {
#pragma unroll
            for (int j = 0; j < NPT; j++) h[j] = 0.f;
        }
        for (int k = 0; k < ntile; k++) {
#pragma unroll
            for (int j = 0; j < NPT; j++) s_hb[(k * NPT + j) * THREADS + tid] = h[j];
            if (k == ntile - 1) break;
            stage(tc0 + k * TT, false);
            __syncthreads();
#pragma unroll
            for (int tl = 0; tl < TT; tl++) {
                const float de = s_delta[tl * DT + dl], du = de * s_u[tl * DT + dl];
                float Bv[NPT];
                load_vec<NPT>(Bv, s_B + tl * NP + g * NPT);
#pragma unroll
                for (int j = 0; j < NPT; j++) h[j] = ex2(de * A2[j]) * h[j] + du * Bv[j];
            }
            __syncthreads();
        }
        // pass 2: tiles in reverse
        for (int k = ntile - 1; k >= 0; k--) {
            const int t0 = tc0 + k * TT;
            stage(t0, true);
            __syncthreads();
#pragma unroll
            for (int j = 0; j < NPT; j++) h[j] = s_hb[(k * NPT + j) * THREADS + tid];
            // forward through the tile: decays and a h_{t-1} cached; the C.h sums and dC terms
            float q[TT][NPT], a[TT][NPT], rd[CNT_D], rn[CNT_N];
            const int rank = lane / G;
            // rn summed over the warp's channels into its s_red rows: which = 0 dB, 1 dC
            auto reduce_rn = [&](int which) {
                transpose_reduce<CNT_N, R, G>(rn, rank);
#pragma unroll
                for (int i = 0; i < CNT_N / R; i++) {
                    const int idx = rank * (CNT_N / R) + i, j = idx % NPT, tl = idx / NPT;
                    s_red[(warp * 2 * TT + which * TT + tl) * NP + g * NPT + j] = rn[i];
                }
            };
#pragma unroll
            for (int tl = 0; tl < TT; tl++) {
                const float de = s_delta[tl * DT + dl], du = de * s_u[tl * DT + dl], dyp = s_dyp[tl * DT + dl];
                float Bv[NPT], Cv[NPT];
                load_vec<NPT>(Bv, s_B + tl * NP + g * NPT);
                load_vec<NPT>(Cv, s_C + tl * NP + g * NPT);
                float Ys = 0.f;
#pragma unroll
                for (int j = 0; j < NPT; j++) {
                    a[tl][j] = ex2(de * A2[j]);
                    q[tl][j] = a[tl][j] * h[j];
                    h[j] = q[tl][j] + du * Bv[j];
                    Ys += Cv[j] * h[j];
                    rn[tl * NPT + j] = dyp * h[j];  // dC
                }
                rd[2 * TT + tl] = Ys;
                rd[3 * TT + tl] = 0.f;
            }
            reduce_rn(1);
#pragma unroll
            for (int tl = TT - 1; tl >= 0; tl--) {
                const float de = s_delta[tl * DT + dl], du = de * s_u[tl * DT + dl], dyp = s_dyp[tl * DT + dl];
                float Bv[NPT], Cv[NPT];
                load_vec<NPT>(Bv, s_B + tl * NP + g * NPT);
                load_vec<NPT>(Cv, s_C + tl * NP + g * NPT);
                float X = 0.f, Y = 0.f;
#pragma unroll
                for (int j = 0; j < NPT; j++) {
                    dh[j] += Cv[j] * dyp;
                    X += dh[j] * Bv[j];
                    const float t2 = dh[j] * q[tl][j] * A[j];
                    Y += t2;
                    dA_acc[j] += t2 * de;
                    rn[tl * NPT + j] = dh[j] * du;  // dB
                    dh[j] *= a[tl][j];
                }
                rd[tl] = X;
                rd[TT + tl] = Y;
            }
            transpose_reduce<CNT_D, G, 1>(rd, g);
#pragma unroll
            for (int i = 0; i < CNT_D / G; i++) {
                const int idx = g * (CNT_D / G) + i, which = idx / TT, tl = idx % TT;
                if (which < 3) s_X[(which * TT + tl) * DT + dl] = rd[i];  // s_X, s_Y, s_Ys are consecutive
            }
            reduce_rn(0);
            __syncthreads();
            for (int i = tid; i < TT * DT; i += THREADS) {
                const int tl = i / DT, cc = i % DT, t = t0 + tl, dd = d0 + cc;
                if (t < T && dd < D) {
                    const size_t r = (size_t)b * T + t;
                    const float Dk = bf(Dskip[dd]), uu = s_u[i];
                    const float X = s_X[i], Y = s_Y[i], Ys = s_Ys[i];
                    du_out[r * dus + dd] = __float2bfloat16(X * s_delta[i] + Dk * s_dyp[i]);
                    const float ddt = (X * uu + Y) * s_sig[i];
                    ddt_out[r * ddts + dd] = __float2bfloat16(ddt);
                    dz_out[r * dzs + dd] = __float2bfloat16(s_gz[i] * (Ys + Dk * uu));
                    db_acc += ddt;
                }
            }
            for (int i = tid; i < 2 * TT * NP; i += THREADS) {
                const int wt = i / NP, n = i % NP, which = wt / TT, tl = wt % TT, t = t0 + tl;
                if (t < T && n < N) {
                    float s = 0.f;
                    for (int w = 0; w < W; w++) s += s_red[w * 2 * TT * NP + i];
                    sc.part[(((size_t)blockIdx.x * B + b) * slab_steps + (t - t_lo)) * 2 * NP + which * NP + n] = s;
                }
            }
            __syncthreads();
        }
    }
    // carries and parameter partials
    if (d < D) {
#pragma unroll
        for (int j = 0; j < NPT; j++) {
            const size_t idx = ((size_t)b * D + d) * NP + g * NPT + j;
            sc.carry[idx] = dh[j];
            sc.acc_da[idx] = (first ? 0.f : sc.acc_da[idx]) + dA_acc[j];
        }
    }
    s_p[tid] = dD_acc;
    s_p[THREADS + tid] = db_acc;
    __syncthreads();
    if (tid < DT && d0 + tid < D) {
        float sd = 0.f, sb = 0.f;
        for (int i = tid; i < THREADS; i += DT) {
            sd += s_p[i];
            sb += s_p[THREADS + i];
        }
        const size_t idx = (size_t)b * D + d0 + tid;
        sc.acc_dd[idx] = (first ? 0.f : sc.acc_dd[idx]) + sd;
        sc.acc_db[idx] = (first ? 0.f : sc.acc_db[idx]) + sb;
    }
}

template <int NPT, int G, int THREADS>
inline size_t bwd_smem() {
    constexpr int NP = NPT * G, DT = THREADS / G, W = THREADS / 32;
    return (size_t)((CK / TT_B) * NPT * THREADS + 2 * TT_B * NP + W * 2 * TT_B * NP + 8 * TT_B * DT + 2 * THREADS) *
           sizeof(float);
}

// dB/dC of one slab: sum of the block partials in block order
static __global__ void bc_finalize_kernel(bf16* dB, bf16* dC, int dbcs, const float* part, int nblk, int B, int T,
                                          int N, int NP, int t_lo, int steps, int slab_steps) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t total = (size_t)B * steps * 2 * N;
    if (i >= total) return;
    const int n = (int)(i % N);
    const int which = (int)((i / N) % 2);
    const int tl = (int)((i / (2 * N)) % steps);
    const int b = (int)(i / ((size_t)2 * N * steps));
    float s = 0.f;
    for (int k = 0; k < nblk; k++) s += part[(((size_t)k * B + b) * slab_steps + tl) * 2 * NP + which * NP + n];
    bf16* dst = which ? dC : dB;
    dst[((size_t)b * T + t_lo + tl) * dbcs + n] = __float2bfloat16(s);
}

// parameter gradients: sum over batch in order, accumulated into the fp32 outputs
static __global__ void param_finalize_kernel(float* dA_log, float* dDskip, float* ddt_bias, const float* acc_da,
                                             const float* acc_dd, const float* acc_db, int B, int D, int N, int NP) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)D * N) return;
    const int d = (int)(i / N), n = (int)(i % N);
    float s = 0.f;
    for (int b = 0; b < B; b++) s += acc_da[((size_t)b * D + d) * NP + n];
    dA_log[i] += s;
    if (n == 0) {
        float sd = 0.f, sb = 0.f;
        for (int b = 0; b < B; b++) {
            sd += acc_dd[(size_t)b * D + d];
            sb += acc_db[(size_t)b * D + d];
        }
        dDskip[d] += sd;
        ddt_bias[d] += sb;
    }
}

template <int NPT, int G, int THREADS>
inline void launch_bwd(bf16* du, int dus, bf16* ddt, int ddts, bf16* dz, int dzs, bf16* dB, bf16* dC, int dbcs,
                       float* dA_log, float* dDskip, float* ddt_bias, void* scratch, const bf16* dout, const bf16* u,
                       int us, const bf16* dtr, int dts, const bf16* z, int zs, const bf16* Bm, const bf16* Cm, int bcs,
                       const bf16* dt_bias, const bf16* A_log, const bf16* Dskip, const void* saved,
                       const ScanShape& sh, cudaStream_t s) {
    BwdScratch sc(sh, scratch);
    const size_t smem = bwd_smem<NPT, G, THREADS>();
    auto k = bwd_kernel<NPT, G, THREADS>;
    cudaCheck(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    const int nck = nchunks(sh), cps = slab_chunks(sh), nblk = dblocks(sh), NP = NPT * G;
    const int slab_steps = cps * CK;
    dim3 grid(nblk, sh.B);
    const int nslab = (nck + cps - 1) / cps;
    for (int sl = nslab - 1; sl >= 0; sl--) {
        const int c_lo = sl * cps, c_hi = std::min(nck, c_lo + cps);
        k<<<grid, THREADS, smem, s>>>(du, dus, ddt, ddts, dz, dzs, sc, dout, u, us, dtr, dts, z, zs, Bm, Cm, bcs,
                                      dt_bias, A_log, Dskip, (const float*)saved, sh.B, sh.T, sh.D, sh.N, c_lo, c_hi,
                                      slab_steps, sl == nslab - 1);
        cudaCheckLast();
        const int t_lo = c_lo * CK, steps = std::min(sh.T, c_hi * CK) - t_lo;
        const size_t total = (size_t)sh.B * steps * 2 * sh.N;
        bc_finalize_kernel<<<(unsigned)((total + 255) / 256), 256, 0, s>>>(dB, dC, dbcs, sc.part, nblk, sh.B, sh.T,
                                                                          sh.N, NP, t_lo, steps, slab_steps);
        cudaCheckLast();
    }
    const size_t np = (size_t)sh.D * sh.N;
    param_finalize_kernel<<<(unsigned)((np + 255) / 256), 256, 0, s>>>(dA_log, dDskip, ddt_bias, sc.acc_da, sc.acc_dd,
                                                                       sc.acc_db, sh.B, sh.D, sh.N, NP);
    cudaCheckLast();
}

inline void check_shape(const ScanShape& sh) {
    if (sh.B < 1 || sh.T < 1 || sh.D < 1) THROW("selective scan: bad shape B=%d T=%d D=%d", sh.B, sh.T, sh.D);
    if (sh.N < 1 || sh.N > 256) THROW("selective scan: N=%d not in [1, 256]", sh.N);
}

// calls f(NPT, G, THREADS) (std::integral_constant arguments) for the configuration of N
template <typename F>
inline void dispatch(int N, F&& f) {
    using I4 = std::integral_constant<int, 4>;
    using I8 = std::integral_constant<int, 8>;
    using T256 = std::integral_constant<int, 256>;
    using T128 = std::integral_constant<int, 128>;
    if (N <= 4) f(I4{}, std::integral_constant<int, 1>{}, T256{});
    else if (N <= 8) f(I4{}, std::integral_constant<int, 2>{}, T256{});
    else if (N <= 16) f(I4{}, std::integral_constant<int, 4>{}, T256{});
    else if (N <= 32) f(I4{}, std::integral_constant<int, 8>{}, T256{});
    else if (N <= 64) f(I4{}, std::integral_constant<int, 16>{}, T256{});
    else if (N <= 128) f(I4{}, std::integral_constant<int, 32>{}, T256{});
    else f(I8{}, std::integral_constant<int, 32>{}, T128{});
}

} // namespace scan

// kept per layer from forward to backward: the state at the start of every CK-step chunk (fp32)
inline size_t scan_saved_bytes(const ScanShape& sh) {
    return (size_t)sh.B * scan::nchunks(sh) * sh.D * scan::padded_n(sh.N) * sizeof(float);
}
// temporary, shared by all layers: dB/dC block partials of one slab, the dh carry, parameter partials
inline size_t scan_scratch_bytes(const ScanShape& sh) { return scan::BwdScratch(sh, nullptr).total * sizeof(float); }

inline void selective_scan_forward(bf16* out, void* saved, const bf16* u, int u_stride, const bf16* dt_raw,
                                   int dt_stride, const bf16* z, int z_stride, const bf16* Bm, const bf16* Cm,
                                   int bc_stride, const bf16* dt_bias, const bf16* A_log, const bf16* Dskip,
                                   const ScanShape& sh, cudaStream_t s) {
    scan::check_shape(sh);
    scan::dispatch(sh.N, [&](auto npt, auto g, auto th) {
        scan::launch_fwd<decltype(npt)::value, decltype(g)::value, decltype(th)::value>(out, saved, u, u_stride, dt_raw, dt_stride, z, z_stride, Bm, Cm, bc_stride,
                                          dt_bias, A_log, Dskip, sh, s);
    });
}

inline void selective_scan_backward(bf16* du, int du_stride, bf16* ddt_raw, int ddt_stride, bf16* dz, int dz_stride,
                                    bf16* dB, bf16* dC, int dbc_stride, float* dA_log, float* dDskip, float* ddt_bias,
                                    void* scratch, const bf16* dout, const bf16* u, int u_stride, const bf16* dt_raw,
                                    int dt_stride, const bf16* z, int z_stride, const bf16* Bm, const bf16* Cm,
                                    int bc_stride, const bf16* dt_bias, const bf16* A_log, const bf16* Dskip,
                                    const void* saved, const ScanShape& sh, cudaStream_t s) {
    scan::check_shape(sh);
    scan::dispatch(sh.N, [&](auto npt, auto g, auto th) {
        scan::launch_bwd<decltype(npt)::value, decltype(g)::value, decltype(th)::value>(du, du_stride, ddt_raw, ddt_stride, dz, dz_stride, dB, dC, dbc_stride,
                                          dA_log, dDskip, ddt_bias, scratch, dout, u, u_stride, dt_raw, dt_stride, z,
                                          z_stride, Bm, Cm, bc_stride, dt_bias, A_log, Dskip, saved, sh, s);
    });
}

// The launchers on argument structs (what the model calls)
struct ScanInputs {
    const bf16* u; int u_stride;
    const bf16* dt; int dt_stride;
    const bf16* z; int z_stride;
    const bf16 *Bm, *Cm; int bc_stride;
    const bf16 *dt_bias, *A_log, *D;
    const int* pos = nullptr;
};
struct ScanGrads {
    bf16 *du, *ddt, *dz, *dB, *dC;
    int du_stride, ddt_stride, dz_stride, dbc_stride;
    float *ddt_bias, *dA_log, *dD;
};
inline void selective_scan_forward(bf16* out, void* saved, const ScanInputs& in, const ScanShape& sh, cudaStream_t s) {
    if (in.pos) THROW("selective_scan_forward: document boundaries are not supported yet");
    selective_scan_forward(out, saved, in.u, in.u_stride, in.dt, in.dt_stride, in.z, in.z_stride, in.Bm, in.Cm,
                           in.bc_stride, in.dt_bias, in.A_log, in.D, sh, s);
}
inline void selective_scan_backward(const ScanGrads& g, void* scratch, const bf16* dout, const ScanInputs& in,
                                    const void* saved, const ScanShape& sh, cudaStream_t s) {
    if (in.pos) THROW("selective_scan_backward: document boundaries are not supported yet");
    selective_scan_backward(g.du, g.du_stride, g.ddt, g.ddt_stride, g.dz, g.dz_stride, g.dB, g.dC, g.dbc_stride,
                            g.dA_log, g.dD, g.ddt_bias, scratch, dout, in.u, in.u_stride, in.dt, in.dt_stride, in.z,
                            in.z_stride, in.Bm, in.Cm, in.bc_stride, in.dt_bias, in.A_log, in.D, saved, sh, s);
}
