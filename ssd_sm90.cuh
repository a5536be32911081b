// The SSD forward on Hopper (sm_90a): ssd.cuh's forward algorithm (one block per (b, h) walks the sequence in
// 64-row steps with the state on chip), its matmuls on wgmma. Included by ssd.cuh when the build targets sm_90a;
// heads of P = 64 (the x tile is one 128-byte column block), N = 64 or 128. P = 32 takes the mma.sync kernel.
//
// One warpgroup a block (two blocks an SM). The x, B and C tiles of the next step load by cp.async into the
// 128-byte-swizzled layout (hopper.cuh) while the current step runs; warp 0 prepares the next step's dt, cumsum
// and decay weights (StepPrep). Per step, three groups of wgmma are in flight at once:
//   1. CB = C B^T (64 x 64, K = N);
//   2. Y = C Hin^T (64 x P, K = N) from the bf16 copy of the state entering the step (rows n, P contiguous);
//   3. the state, kept transposed (S^T: N x P, fp32, in the accumulators across steps): S^T = decay S^T +
//      B^T (w x), A = B^T straight from the B tile (MN-major), w x written beside x by the warps at the end of the
//      step before (each thread over the chunks it copied itself: no barrier between the copy and the scaling).
// While 2 and 3 run, the warps turn CB into the decayed, masked scores (left of a warp's 16 rows the decay
// factors through the rows' first row, the diagonal 16 x 16 block takes an exp per score) and pack them as the
// A operand (bf16) of
//   4. Y = exp(acum_i) Y + scores x.
// Then y = Y + D x is stored and the new state's bf16 copy written for the next step's group 2 (a barrier apart
// from this step's readers).
#pragma once
#include <cstdint>
#include "hopper.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "ssd_sm90.cuh needs sm_90a (make GPU_ARCH=90)"
#endif

namespace ssd::sm90 {

using namespace hopper;

// byte offsets in the (1024-aligned) dynamic shared memory: two buffers of each step tile, the state copy, the
// x tile scaled by the state weights, two StepArrays
template <int N>
struct FwdSmem {
    static constexpr int X = TILE * 128;              // x: 64 rows x 64 columns, one column block
    static constexpr int BC = (N / 64) * TILE * 128;  // B or C: N / 64 column blocks
    static constexpr int OFF_B = 2 * X, OFF_C = OFF_B + 2 * BC, OFF_H = OFF_C + 2 * BC, OFF_XW = OFF_H + N * 128;
    static constexpr int OFF_ST = OFF_XW + X;
    static constexpr int BYTES = OFF_ST + 2 * (int)sizeof(StepArrays) + 1024;  // + room to align the base
    static_assert(2 * BYTES <= 227 * 1024, "two blocks an SM");
};

template <int N, bool DOCS>
__global__ void __launch_bounds__(THREADS, 2)
fwd_kernel(bf16* y, float* dt_s, float* acum_s, SSDInputs in, int T, int H, int G, int Tp, ForwardGrid grid,
           float* seg_state) {
    constexpr int P = 64, NB = N / 64;  // NB: column blocks of B and C, m64 blocks of the state S^T
    using L = FwdSmem<N>;
    extern __shared__ unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    StepArrays* s_st = reinterpret_cast<StepArrays*>(smem + L::OFF_ST);
    const uint32_t s0a = smem_u32(smem);

    const ForwardHead<P, N> hd(in, y, T, H, G, Tp, grid);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, q = lane & 3;
    const int nsteps = (hd.Tl + TILE - 1) / TILE;

    auto load_step = [&](int s) {
        const int r = s * TILE, valid = min(TILE, hd.Tl - r), buf = s & 1;
        load_rows_sw128<P>(smem + buf * L::X, hd.xg + (size_t)r * in.x_stride, in.x_stride, valid);
        load_rows_sw128<N>(smem + L::OFF_B + buf * L::BC, hd.bg + (size_t)r * in.bc_stride, in.bc_stride, valid);
        load_rows_sw128<N>(smem + L::OFF_C + buf * L::BC, hd.cg + (size_t)r * in.bc_stride, in.bc_stride, valid);
        cp_async_commit();
    };
    // x of a step with its rows j scaled by the state weights w_j (the state's B operand), over the 16-byte chunks
    // this thread copied (load_rows_sw128's mapping): only its own copies need to have landed
    auto scale_x = [&](int buf, const StepArrays& sa) {
        constexpr int V = P / 8, STEP = THREADS / V;
        const int v = threadIdx.x % V, r0 = threadIdx.x / V;
#pragma unroll
        for (int k = 0; k < TILE / STEP; k++) {
            const int r = r0 + k * STEP, o = r * 128 + ((v ^ (r & 7)) << 4);
            const float w = sa.w[r];
            uint4 u = *reinterpret_cast<const uint4*>(smem + buf * L::X + o);
            u.x = scale_bf16x2(u.x, w, w);
            u.y = scale_bf16x2(u.y, w, w);
            u.z = scale_bf16x2(u.z, w, w);
            u.w = scale_bf16x2(u.w, w, w);
            *reinterpret_cast<uint4*>(smem + L::OFF_XW + o) = u;
        }
    };
    const bool prep = warp == 0;
    StepPrep<DOCS> sp = hd.template prep<DOCS>(in, dt_s, acum_s);
    load_step(0);
    if (prep) {
        sp.load(0);
        sp.prepare(s_st[0], 0);
    }

    // descriptors: C and B K-major (rows i or j, the N states contiguous); x and the state copy MN-major as B
    // operands (rows along K: j, or n; the P columns contiguous in one column block)
    const uint64_t dX = desc_sw128(s0a, L::X), dB = desc_sw128(s0a + L::OFF_B, 16);
    const uint64_t dC = desc_sw128(s0a + L::OFF_C, 16), dH = desc_sw128(s0a + L::OFF_H, L::X);
    const uint64_t dXW = desc_sw128(s0a + L::OFF_XW, L::X);
    const int ra = 16 * warp + gq, rb = ra + 8;  // this thread's rows of the step

    for (int i = threadIdx.x; i < N * 128 / 16; i += THREADS)  // Hin of the first step
        *reinterpret_cast<uint4*>(smem + L::OFF_H + 16 * i) = make_uint4(0, 0, 0, 0);
    float st[NB][32];  // S^T: rows n = 64 mb + 16 warp + g (+ 8), columns p; fp32 across steps
#pragma unroll
    for (int mb = 0; mb < NB; mb++)
#pragma unroll
        for (int i = 0; i < 32; i++) st[mb][i] = 0.f;
    cp_async_wait_group<0>();
    __syncthreads();  // the first step's arrays
    scale_x(0, s_st[0]);

    for (int s = 0; s < nsteps; s++) {
        const int buf = s & 1, r0 = s * TILE, valid = min(TILE, hd.Tl - r0);
        cp_async_wait_group<0>();
        fence_async_smem();  // the copies (and the state copy) are read by wgmma, the async proxy
        __syncthreads();     // step s's tiles, arrays and state copy are in place; step s - 1 is done
        const bool more = s + 1 < nsteps;
        if (more) load_step(s + 1);  // into the buffers step s - 1 used
        if (prep && more) sp.load(s + 1);
        const StepArrays& sa = s_st[buf];
        const uint32_t xo = buf * L::X, bco = buf * L::BC;

        // the state decays over the step (here, before any wgmma of the step is in flight). Every step issues the
        // same wgmma groups, the last one's state and the first one's C Hin (Hin = 0) included: accumulators
        // defined on one path only would make the compiler serialise every wgmma.
#pragma unroll
        for (int mb = 0; mb < NB; mb++)
#pragma unroll
            for (int i = 0; i < 32; i++) st[mb][i] *= sa.decay;
        float cb[32], yo[32];
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < N / 16; kk++) {  // column block kk / 4, 32 bytes a k-step inside it
            const uint32_t o = bco + (kk / 4) * TILE * 128 + (kk % 4) * 32;
            wgmma_ss<0, 0>(cb, desc_add(dC, o), desc_add(dB, o), kk > 0);
        }
        wg_commit();
#pragma unroll
        for (int kk = 0; kk < N / 16; kk++)
            wgmma_ss<0, 1>(yo, desc_add(dC, bco + (kk / 4) * TILE * 128 + (kk % 4) * 32), desc_add(dH, kk * 16 * 128),
                           kk > 0);
        wg_commit();
#pragma unroll
        for (int mb = 0; mb < NB; mb++)
#pragma unroll
            for (int kk = 0; kk < 4; kk++)  // A = B^T: the B tile's column block mb, MN-major
                wgmma_ss<1, 1>(st[mb], desc_add(dB, bco + mb * TILE * 128 + kk * 16 * 128), desc_add(dXW, kk * 16 * 128),
                               1);
        wg_commit();

        // scores CB_ij exp(acl_i - acl_j) dt_j where row i sees column j: left of the warp's row tile as
        // e0_i fdt_j (both factors <= 1), the diagonal 16 x 16 block exactly, zero right of it
        wg_wait<2>();
        fence_regs(cb);
        const int ta = DOCS ? sa.thr[ra] : -1, tb = DOCS ? sa.thr[rb] : -1;
        const float ea = sa.e0[ra], eb = sa.e0[rb];
#pragma unroll
        for (int jn = 0; jn < 8; jn++) {
            const int j = jn * 8 + 2 * q;
            float* c = cb + 4 * jn;
            if (jn / 2 < warp) {
                const float2 f = *reinterpret_cast<const float2*>(sa.fdt[warp - 1] + j);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const bool ok = !DOCS || j + (e & 1) >= (e < 2 ? ta : tb);
                    c[e] = ok ? c[e] * (e < 2 ? ea : eb) * ((e & 1) ? f.y : f.x) : 0.f;
                }
            } else if (jn / 2 == warp) {
                diagonal_scores<DOCS>(c, sa, j, ra, rb, ta, tb);
            } else {
                c[0] = c[1] = c[2] = c[3] = 0.f;
            }
        }
        uint32_t pa[4][4];  // columns 16 kk .. 16 kk + 15 are the A fragment of k-step kk
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
#pragma unroll
            for (int r = 0; r < 4; r++) pa[kk][r] = pack_bf16(cb[8 * kk + 2 * r], cb[8 * kk + 2 * r + 1]);

        // Y = exp(acl_i) C_i Hin (0 for rows whose document starts in the step) + scores x
        wg_wait<1>();
        fence_regs(yo);
        const float fa = ta < 0 ? ea * sa.em[warp] : 0.f, fb = tb < 0 ? eb * sa.em[warp] : 0.f;
#pragma unroll
        for (int jn = 0; jn < 8; jn++) {
            yo[4 * jn] *= fa;
            yo[4 * jn + 1] *= fa;
            yo[4 * jn + 2] *= fb;
            yo[4 * jn + 3] *= fb;
        }
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) wgmma_rs<1>(yo, pa[kk], desc_add(dX, xo + kk * 16 * 128), 1);
        wg_commit();
        if (prep && more) sp.prepare(s_st[buf ^ 1], s + 1);  // while the last group runs
        wg_wait<0>();
        fence_regs(yo);
        fence_regs(pa);
#pragma unroll
        for (int mb = 0; mb < NB; mb++) fence_regs(st[mb]);

        // y = Y + D x
        const unsigned char* sx = smem + xo;
        hd.store_y(r0, valid, ra, rb, q, [&](int n, int e) { return yo[4 * n + e]; },
                   [&](int i, int p) { return *reinterpret_cast<const __nv_bfloat162*>(sx + swz128(i, p)); });
        __syncthreads();  // every warp's wgmma of this step has read the state copy
        // the state leaving the step, bf16, for the next step's Y (made visible to wgmma at the loop's top)
#pragma unroll
        for (int mb = 0; mb < NB; mb++)
#pragma unroll
            for (int jn = 0; jn < 8; jn++)
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    const int n = 64 * mb + 16 * warp + gq + 8 * hf;
                    *reinterpret_cast<uint32_t*>(smem + L::OFF_H + swz128(n, jn * 8 + 2 * q)) =
                        pack_bf16(st[mb][4 * jn + 2 * hf], st[mb][4 * jn + 2 * hf + 1]);
                }
        if (more) {  // the next step's w x (this step's state wgmma, its last reader, is done)
            cp_async_wait_group<0>();
            scale_x(buf ^ 1, s_st[buf ^ 1]);
        }
    }
    if (float* sout = hd.state_out(seg_state))  // the state leaving the segment, S^T: [n][p]
#pragma unroll
        for (int mb = 0; mb < NB; mb++)
#pragma unroll
            for (int jn = 0; jn < 8; jn++)
#pragma unroll
                for (int hf = 0; hf < 2; hf++)
                    *reinterpret_cast<float2*>(sout + (64 * mb + 16 * warp + gq + 8 * hf) * P + jn * 8 + 2 * q) =
                        make_float2(st[mb][4 * jn + 2 * hf], st[mb][4 * jn + 2 * hf + 1]);
    if (prep) sp.finish(nsteps, hd.Tpl);
}

// the launch, and the blocks that run at once on this GPU (ssd::ForwardMmaSync is its twin)
template <int N, bool DOCS>
struct Forward {
    static int slots() { return occupancy(fwd_kernel<N, DOCS>, THREADS, FwdSmem<N>::BYTES) * sm_count(); }
    static void run(const ForwardGrid& grid, bf16* y, float* dt_s, float* acum_s, const SSDInputs& in,
                    const SSDShape& sh, int Tp, float* seg_state, cudaStream_t s) {
        auto k = fwd_kernel<N, DOCS>;
        set_max_smem(k, FwdSmem<N>::BYTES);
        k<<<grid.blocks(), THREADS, FwdSmem<N>::BYTES, s>>>(y, dt_s, acum_s, in, sh.T, sh.H, sh.G, Tp, grid, seg_state);
        cudaCheckLast();
    }
};

}  // namespace ssd::sm90
