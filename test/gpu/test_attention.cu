// attention.cuh (causal GQA flash attention, RoPE) against the double reference of test/ref/attention.h:
// out, lse and the q, k, v parts of dqkv on shapes with partial tiles, GQA ratios 1, 2, 4, 8 and both
// head dims, with and without packed documents (the reference runs document by document); outputs
// NaN-poisoned before the kernels run; a second run must repeat bit for bit. On Hopper builds the
// mma.sync path (attn::sm80_*) is checked too. Some shapes have more work tiles than the GPU has SMs, so
// the persistent kernels walk several tiles per block.
#include <catch2/catch.hpp>
#include "test/gpu_util.h"
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <vector>
#include "attention.cuh"
#include "test/ref/attention.h"

namespace gpu_test_attention {  // this file's helpers: all test files link into one binary (same-named types would clash)

// a normal sample rounded to bf16, and the rounded value as double for the reference
static bf16 rand_bf16(std::mt19937_64& gen, double sd, double* out) {
    return round_bf16(std::normal_distribution<double>(0.0, sd)(gen), out);
}

// Documents of a packed batch: pos[b*T + t] = t's position in its document. `lengths` draws the next
// document's length; empty pos = one document per sequence.
static std::vector<int> make_positions(int B, int T, std::mt19937_64& gen,
                                       const std::function<int(std::mt19937_64&)>& lengths) {
    std::vector<int> pos((size_t)B * T);
    for (int b = 0; b < B; b++) {
        int t = 0;
        while (t < T) {
            const int len = std::max(1, lengths(gen));
            for (int i = 0; i < len && t < T; i++, t++) pos[(size_t)b * T + t] = i;
        }
    }
    return pos;
}
// documents as (b, start, length)
struct Doc { int b, start, len; };
static std::vector<Doc> documents(const std::vector<int>& pos, int B, int T) {
    std::vector<Doc> d;
    for (int b = 0; b < B; b++) {
        if (pos.empty()) {
            d.push_back({b, 0, T});
            continue;
        }
        for (int t = 0; t < T; t++) {
            if (pos[(size_t)b * T + t] == 0) d.push_back({b, t, 0});
            d.back().len++;
        }
    }
    return d;
}

// rows [start, start + len) of sequence b of a (B, T, n) array, and back
static std::vector<double> rows_of(const std::vector<double>& x, int T, int n, const Doc& d) {
    const size_t off = ((size_t)d.b * T + d.start) * n;
    return std::vector<double>(x.begin() + off, x.begin() + off + (size_t)d.len * n);
}
static void put_rows(std::vector<double>& x, int T, int n, const Doc& d, const std::vector<double>& r) {
    std::copy(r.begin(), r.end(), x.begin() + ((size_t)d.b * T + d.start) * n);
}

struct Path {
    const char* name;
    void (*fwd)(bf16*, float*, const bf16*, const AttnShape&, const int*, cudaStream_t);
    void (*bwd)(bf16*, void*, const bf16*, const bf16*, const bf16*, const float*, const AttnShape&, const int*,
                cudaStream_t);
};
static std::vector<Path> paths() {
    std::vector<Path> p = {{"default", attention_forward, attention_backward}};
#ifdef SM90A
    p.push_back({"sm80 (mma.sync)", attn::sm80_forward, attn::sm80_backward});
#endif
    return p;
}

#ifdef SM90A
// The Hopper building blocks the attention kernels stand on, one warpgroup, against double references:
// TMA loads of 128-byte-swizzled tiles A (64 x 128) and B (128 x 128), then
//   C1 = A B^T   (wgmma, A and B K-major from smem, two column blocks along k)
//   C2 = A B     (A from registers in the fragment layout, B MN-major: N over two column blocks, LBO)
//   C3 = B0^T A^T (A MN-major from smem: B's first 64 columns; B K-major: A)
// and C1 as bf16 through a swizzled smem tile and a TMA store. A layout mistake shows here by name.
__global__ void hopper_selftest_kernel(const __grid_constant__ CUtensorMap ma, const __grid_constant__ CUtensorMap mb,
                                       const __grid_constant__ CUtensorMap mo, const bf16* A, float* c1, float* c2,
                                       float* c3) {
    using namespace hopper;
    extern __shared__ unsigned char raw[];
    unsigned char* sm = raw + ((1024 - (smem_u32(raw) & 1023)) & 1023);
    unsigned char *sA = sm, *sB = sm + 16384, *sO = sm + 49152;
    uint64_t* bar = reinterpret_cast<uint64_t*>(sm + 65536);
    const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
    if (t == 0) {
        mbar_init(bar, 1);
        fence_mbar_init();
    }
    __syncthreads();
    if (t == 0) {
        mbar_arrive_expect_tx(bar, 16384 + 32768);
        for (int cb = 0; cb < 2; cb++) {
            tma_load(sA + cb * 64 * 128, &ma, bar, cb * 64, 0, 0);
            tma_load(sB + cb * 128 * 128, &mb, bar, cb * 64, 0, 0);
        }
    }
    mbar_wait(bar, 0);
    // the accumulator (64 x 2N) to global (row-major, 2N columns)
    auto put = [&](float* dst, const float* d, int n) {
        for (int j = 0; j < n / 8; j++)
            for (int h = 0; h < 2; h++)
                for (int e = 0; e < 2; e++) dst[(16 * w + g + 8 * h) * n + 8 * j + 2 * q + e] = d[4 * j + 2 * h + e];
    };
    float d[64];
    wg_fence();
    for (int kk = 0; kk < 8; kk++)
        wgmma_ss<0, 0>(d, desc_sw128(smem_u32(sA) + (kk / 4) * 64 * 128 + (kk % 4) * 32, 16),
                       desc_sw128(smem_u32(sB) + (kk / 4) * 128 * 128 + (kk % 4) * 32, 16), kk > 0);
    wg_commit();
    wg_wait<0>();
    fence_regs(d);
    put(c1, d, 128);
    // C1 as bf16 into sO, TMA store
    for (int j = 0; j < 16; j++)
        for (int h = 0; h < 2; h++)
            *reinterpret_cast<uint32_t*>(sO + (j / 8) * 64 * 128 + swz128(16 * w + g + 8 * h, (j % 8) * 8 + 2 * q)) =
                tc::pack_bf16(d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
    fence_async_smem();
    __syncthreads();
    if (t == 0) {
        for (int cb = 0; cb < 2; cb++) tma_store(&mo, sO + cb * 64 * 128, cb * 64, 0, 0);
        bulk_commit();
        bulk_wait<0>();
    }
    uint32_t a[8][4];
    for (int kk = 0; kk < 8; kk++)
        for (int r = 0; r < 4; r++) {
            const int row = 16 * w + g + 8 * (r & 1), col = 16 * kk + 2 * q + 8 * (r >> 1);
            a[kk][r] = *reinterpret_cast<const uint32_t*>(A + row * 128 + col);
        }
    fence_regs(a);
    wg_fence();
    for (int kk = 0; kk < 8; kk++) wgmma_rs<1>(d, a[kk], desc_sw128(smem_u32(sB) + kk * 16 * 128, 128 * 128), kk > 0);
    wg_commit();
    wg_wait<0>();
    fence_regs(d);
    put(c2, d, 128);
    float e[32];
    wg_fence();
    for (int kk = 0; kk < 8; kk++)
        wgmma_ss<1, 0>(e, desc_sw128(smem_u32(sB) + kk * 16 * 128, 128 * 128),
                       desc_sw128(smem_u32(sA) + (kk / 4) * 64 * 128 + (kk % 4) * 32, 16), kk > 0);
    wg_commit();
    wg_wait<0>();
    fence_regs(e);
    put(c3, e, 64);
}

TEST_CASE("hopper TMA, swizzle and wgmma descriptors (the attention kernels' building blocks)", "[gpu][attention]") {
    std::mt19937_64 gen(5);
    std::vector<bf16> hA(64 * 128), hB(128 * 128);
    std::vector<double> A(hA.size()), B(hB.size());
    for (size_t i = 0; i < hA.size(); i++) hA[i] = rand_bf16(gen, 1.0, &A[i]);
    for (size_t i = 0; i < hB.size(); i++) hB[i] = rand_bf16(gen, 1.0, &B[i]);
    std::vector<double> r1(64 * 128), r2(64 * 128), r3(64 * 64), r1b(64 * 128);
    for (int i = 0; i < 64; i++)
        for (int n = 0; n < 128; n++) {
            double s1 = 0, s2 = 0;
            for (int k = 0; k < 128; k++) {
                s1 += A[i * 128 + k] * B[n * 128 + k];
                s2 += A[i * 128 + k] * B[k * 128 + n];
            }
            r1[i * 128 + n] = s1;
            r2[i * 128 + n] = s2;
            r1b[i * 128 + n] = __bfloat162float(__float2bfloat16((float)s1));
        }
    for (int m = 0; m < 64; m++)
        for (int n = 0; n < 64; n++) {
            double s = 0;
            for (int k = 0; k < 128; k++) s += B[k * 128 + m] * A[n * 128 + k];
            r3[m * 64 + n] = s;
        }
    bf16* dA = to_device(hA);
    bf16* dB = to_device(hB);
    bf16* dO = cuda_malloc_n<bf16>(64 * 128, "O");
    float* c = cuda_malloc_n<float>(3 * 64 * 128, "C");
    poison(dO, 64 * 128);
    poison(c, 3 * 64 * 128);
    const CUtensorMap ma = hopper::tensor_map_rows(dA, 128, 64, 1, 64), mb = hopper::tensor_map_rows(dB, 128, 128, 1, 128),
                      mo = hopper::tensor_map_rows(dO, 128, 64, 1, 64);
    const int smem = 65536 + 64 + 1024;
    cudaCheck(cudaFuncSetAttribute(hopper_selftest_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    hopper_selftest_kernel<<<1, 128, smem>>>(ma, mb, mo, dA, c, c + 64 * 128, c + 2 * 64 * 128);
    cudaCheckLast();
    cudaCheck(cudaDeviceSynchronize());
    std::vector<float> hc = to_host(c, 3 * 64 * 128);
    std::vector<bf16> ho = to_host(dO, 64 * 128);
    check_close("C1 = A B^T (K-major A and B)", std::vector<double>(hc.begin(), hc.begin() + 8192), r1, 1e-4);
    check_close("C2 = A B (A from registers, B MN-major)", std::vector<double>(hc.begin() + 8192, hc.begin() + 16384), r2,
                1e-4);
    check_close("C3 = B^T A^T (A MN-major)", std::vector<double>(hc.begin() + 16384, hc.begin() + 16384 + 4096), r3, 1e-4);
    check_close("C1 through swizzled smem and a TMA store", columns(ho, 64, 128, 0, 128), r1b, 1e-2);
    cuda_free_all({dA, dB, dO, c});
}
#endif

static void check_attention(int B, int T, int Hq, int Hkv, int Dh, uint64_t seed, const std::vector<int>& pos = {}) {
    INFO("B=" << B << " T=" << T << " Hq=" << Hq << " Hkv=" << Hkv << " Dh=" << Dh
              << (pos.empty() ? "" : " with documents"));
    std::mt19937_64 gen(seed);
    const size_t BT = (size_t)B * T;
    const int nq = Hq * Dh, nkv = Hkv * Dh, row = nq + 2 * nkv;
    std::vector<bf16> h_qkv(BT * row), h_dout(BT * nq);
    std::vector<double> q(BT * nq), k(BT * nkv), v(BT * nkv), dout(BT * nq);
    for (size_t t = 0; t < BT; t++) {
        for (int i = 0; i < nq; i++) h_qkv[t * row + i] = rand_bf16(gen, 1.5, &q[t * nq + i]);  // peaked softmax
        for (int i = 0; i < nkv; i++) h_qkv[t * row + nq + i] = rand_bf16(gen, 1.0, &k[t * nkv + i]);
        for (int i = 0; i < nkv; i++) h_qkv[t * row + nq + nkv + i] = rand_bf16(gen, 1.0, &v[t * nkv + i]);
        for (int i = 0; i < nq; i++) h_dout[t * nq + i] = rand_bf16(gen, 1.0, &dout[t * nq + i]);
    }
    // the reference, one document at a time
    std::vector<double> rout(BT * nq), rlse((size_t)B * Hq * T), rdq(BT * nq), rdk(BT * nkv), rdv(BT * nkv);
    for (const Doc& d : documents(pos, B, T)) {
        std::vector<double> dq_ = rows_of(q, T, nq, d), dk_ = rows_of(k, T, nkv, d), dv_ = rows_of(v, T, nkv, d),
                            ddo = rows_of(dout, T, nq, d);
        std::vector<double> o(dq_.size()), l((size_t)Hq * d.len), gq(dq_.size()), gk(dk_.size()), gv(dv_.size());
        ref::attention_forward(o.data(), l.data(), dq_.data(), dk_.data(), dv_.data(), 1, d.len, Hq, Hkv, Dh);
        ref::attention_backward(gq.data(), gk.data(), gv.data(), ddo.data(), dq_.data(), dk_.data(), dv_.data(), 1,
                                d.len, Hq, Hkv, Dh);
        put_rows(rout, T, nq, d, o);
        put_rows(rdq, T, nq, d, gq);
        put_rows(rdk, T, nkv, d, gk);
        put_rows(rdv, T, nkv, d, gv);
        for (int h = 0; h < Hq; h++)
            for (int t = 0; t < d.len; t++) rlse[((size_t)d.b * Hq + h) * T + d.start + t] = l[(size_t)h * d.len + t];
    }

    const AttnShape sh{B, T, Hq, Hkv, Dh};
    bf16* d_qkv = to_device(h_qkv);
    bf16* d_dout = to_device(h_dout);
    int* d_pos = pos.empty() ? nullptr : to_device(pos);
    bf16* d_out = cuda_malloc_n<bf16>(BT * nq, "out");
    float* d_lse = cuda_malloc_n<float>((size_t)B * Hq * T, "lse");
    bf16* d_dqkv = cuda_malloc_n<bf16>(BT * row, "dqkv");
    void* scratch = cuda_malloc(attention_scratch_bytes(sh), "scratch");

    for (const Path& path : paths()) {
        INFO("path " << path.name);
        struct Outputs { std::vector<bf16> out, dqkv; std::vector<float> lse; };
        auto run = [&]() {
            poison(d_out, BT * nq);
            poison(d_lse, (size_t)B * Hq * T);
            poison(d_dqkv, BT * row);
            poison_bytes(scratch, attention_scratch_bytes(sh));
            path.fwd(d_out, d_lse, d_qkv, sh, d_pos, 0);
            path.bwd(d_dqkv, scratch, d_dout, d_qkv, d_out, d_lse, sh, d_pos, 0);
            cudaCheck(cudaDeviceSynchronize());
            return Outputs{to_host(d_out, BT * nq), to_host(d_dqkv, BT * row), to_host(d_lse, (size_t)B * Hq * T)};
        };
        Outputs o1 = run();

        check_close("out", columns(o1.out, BT, nq, 0, nq), rout, 2e-2);
        check_close("lse", std::vector<double>(o1.lse.begin(), o1.lse.end()), rlse, 1e-4);
        // a one-token sequence or document has P = 1 and dS = P (dP - Delta) = 0: the reference dq, dk are
        // zero there and the kernel's (cancelling up to fp32 rounding) must be tiny
        check_close("dq", columns(o1.dqkv, BT, row, 0, nq), rdq, 2e-2, 1e-3);
        check_close("dk", columns(o1.dqkv, BT, row, nq, nkv), rdk, 2e-2, 1e-3);
        check_close("dv", columns(o1.dqkv, BT, row, nq + nkv, nkv), rdv, 2e-2);

        Outputs o2 = run();  // bit-identical rerun
        CHECK(same_bits(o1.out, o2.out));
        CHECK(same_bits(o1.dqkv, o2.dqkv));
        CHECK(same_bits(o1.lse, o2.lse));
    }

    cuda_free_all({d_qkv, d_dout, d_out, d_lse, d_dqkv, scratch});
    if (d_pos) cudaCheck(cudaFree(d_pos));
}

TEST_CASE("attention forward/backward vs double reference (GQA, partial tiles)", "[gpu][attention]") {
    check_attention(2, 77, 4, 4, 64, 1);
    check_attention(1, 200, 8, 2, 64, 2);
    check_attention(1, 1, 4, 1, 64, 3);
    check_attention(1, 130, 8, 1, 128, 4);
    check_attention(2, 33, 16, 2, 128, 5);
    check_attention(1, 517, 2, 1, 128, 6);
    check_attention(1, 300, 6, 3, 64, 7);
    // at D = 64 the warpgroups take the backward's dQ tiles in turn: one query head per kv head and 3 and 1 query
    // tiles per kv tile give odd step counts, whose last tile is warpgroup 0's
    check_attention(1, 150, 2, 2, 64, 10);
    // more work tiles than SMs: each persistent block walks several
    check_attention(3, 700, 8, 2, 64, 8);
    check_attention(2, 1200, 8, 1, 128, 9);
}

TEST_CASE("attention with packed documents vs the reference run per document", "[gpu][attention]") {
    std::mt19937_64 gen(21);
    auto uniform = [](int lo, int hi) {
        return [=](std::mt19937_64& g) { return std::uniform_int_distribution<int>(lo, hi)(g); };
    };
    // random lengths around a tile
    check_attention(2, 300, 4, 2, 64, 31, make_positions(2, 300, gen, uniform(1, 200)));
    check_attention(1, 517, 8, 1, 128, 32, make_positions(1, 517, gen, uniform(1, 300)));
    // documents much shorter than a tile
    check_attention(2, 77, 2, 2, 128, 33, make_positions(2, 77, gen, uniform(1, 6)));
    check_attention(1, 260, 8, 4, 64, 34, make_positions(1, 260, gen, uniform(1, 20)));
    // boundaries at the first and the last position (one-token documents there), and at a tile edge
    {
        const int T = 400;
        std::vector<int> pos(2 * T);
        for (int b = 0; b < 2; b++)
            for (int t = 0; t < T; t++) {
                const int start = t == 0 ? 0 : t < 128 ? 1 : t < T - 1 ? 128 : T - 1;
                pos[(size_t)b * T + t] = t - start;
            }
        check_attention(2, T, 4, 1, 128, 35, pos);
        check_attention(2, T, 4, 1, 64, 36, pos);
    }
    // many tiles with documents (several tiles per persistent block)
    check_attention(2, 1200, 8, 1, 128, 37, make_positions(2, 1200, gen, uniform(1, 500)));
}

static void check_rope(int B, int T, int Hq, int Hkv, int Dh, float theta, uint64_t seed, const std::vector<int>& pos = {}) {
    INFO("B=" << B << " T=" << T << " Hq=" << Hq << " Hkv=" << Hkv << " Dh=" << Dh << " theta=" << theta
              << (pos.empty() ? "" : " with documents"));
    std::mt19937_64 gen(seed);
    const size_t BT = (size_t)B * T;
    const int nq = Hq * Dh, nkv = Hkv * Dh, row = nq + 2 * nkv;
    const AttnShape sh{B, T, Hq, Hkv, Dh};
    int* d_pos = pos.empty() ? nullptr : to_device(pos);
    for (int backward = 0; backward < 2; backward++) {
        std::vector<bf16> h(BT * row);
        double tmp;
        for (auto& x : h) x = rand_bf16(gen, 1.0, &tmp);
        std::vector<double> q = columns(h, BT, row, 0, nq), k = columns(h, BT, row, nq, nkv);
        for (const Doc& d : documents(pos, B, T)) {  // positions count from each document's start
            std::vector<double> dq_ = rows_of(q, T, nq, d), dk_ = rows_of(k, T, nkv, d);
            if (backward) {
                ref::rope_backward(dq_.data(), 1, d.len, Hq, Dh, theta);
                ref::rope_backward(dk_.data(), 1, d.len, Hkv, Dh, theta);
            } else {
                ref::rope_forward(dq_.data(), 1, d.len, Hq, Dh, theta);
                ref::rope_forward(dk_.data(), 1, d.len, Hkv, Dh, theta);
            }
            put_rows(q, T, nq, d, dq_);
            put_rows(k, T, nkv, d, dk_);
        }
        bf16* d = to_device(h);
        if (backward) rope_backward(d, sh, theta, d_pos, 0);
        else rope_forward(d, sh, theta, d_pos, 0);
        std::vector<bf16> g = to_host(d, BT * row);
        cudaCheck(cudaFree(d));
        INFO((backward ? "backward" : "forward"));
        CHECK(rel_l2(columns(g, BT, row, 0, nq), q) < 1e-2);
        CHECK(rel_l2(columns(g, BT, row, nq, nkv), k) < 1e-2);
        // v untouched
        bool same = true;
        for (size_t t = 0; t < BT; t++)
            same = same && memcmp(&g[t * row + nq + nkv], &h[t * row + nq + nkv], nkv * sizeof(bf16)) == 0;
        CHECK(same);
    }
    if (d_pos) cudaCheck(cudaFree(d_pos));
}

TEST_CASE("rope forward/backward vs double reference", "[gpu][attention]") {
    check_rope(2, 77, 4, 2, 64, 10000.f, 11);
    check_rope(1, 1000, 4, 1, 128, 500000.f, 12);
    std::mt19937_64 gen(13);
    check_rope(2, 300, 4, 2, 64, 10000.f, 14, make_positions(2, 300, gen, [](std::mt19937_64& g) {
                   return std::uniform_int_distribution<int>(1, 120)(g);
               }));
}

}  // namespace gpu_test_attention
