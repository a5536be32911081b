// attention.cuh (causal GQA flash attention, RoPE) against the double reference of test/ref/attention.h:
// out, lse and the q, k, v parts of dqkv on shapes with partial tiles, GQA ratios 1, 2, 4, 8 and both
// head dims; outputs NaN-poisoned before the kernels run; a second run must repeat bit for bit.
#include <catch2/catch.hpp>
#include "test/gpu_util.h"
#include <cmath>
#include <cstring>
#include <random>
#include <vector>
#include "attention.cuh"
#include "test/ref/attention.h"

// a normal sample rounded to bf16, and the rounded value as double for the reference
static bf16 rand_bf16(std::mt19937_64& gen, double sd, double* out) {
    return round_bf16(std::normal_distribution<double>(0.0, sd)(gen), out);
}

static void check_attention(int B, int T, int Hq, int Hkv, int Dh, uint64_t seed) {
    INFO("B=" << B << " T=" << T << " Hq=" << Hq << " Hkv=" << Hkv << " Dh=" << Dh);
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
    std::vector<double> rout(BT * nq), rlse((size_t)B * Hq * T), rdq(BT * nq), rdk(BT * nkv), rdv(BT * nkv);
    ref::attention_forward(rout.data(), rlse.data(), q.data(), k.data(), v.data(), B, T, Hq, Hkv, Dh);
    ref::attention_backward(rdq.data(), rdk.data(), rdv.data(), dout.data(), q.data(), k.data(), v.data(), B, T, Hq,
                            Hkv, Dh);

    const AttnShape sh{B, T, Hq, Hkv, Dh};
    bf16* d_qkv = to_device(h_qkv);
    bf16* d_dout = to_device(h_dout);
    bf16* d_out = cuda_malloc_n<bf16>(BT * nq, "out");
    float* d_lse = cuda_malloc_n<float>((size_t)B * Hq * T, "lse");
    bf16* d_dqkv = cuda_malloc_n<bf16>(BT * row, "dqkv");
    void* scratch = cuda_malloc(attention_scratch_bytes(sh), "scratch");

    struct Outputs { std::vector<bf16> out, dqkv; std::vector<float> lse; };
    auto run = [&]() {
        poison(d_out, BT * nq);
        poison(d_lse, (size_t)B * Hq * T);
        poison(d_dqkv, BT * row);
        poison_bytes(scratch, attention_scratch_bytes(sh));
        attention_forward(d_out, d_lse, d_qkv, sh, 0);
        attention_backward(d_dqkv, scratch, d_dout, d_qkv, d_out, d_lse, sh, 0);
        cudaCheck(cudaDeviceSynchronize());
        return Outputs{to_host(d_out, BT * nq), to_host(d_dqkv, BT * row), to_host(d_lse, (size_t)B * Hq * T)};
    };
    Outputs o1 = run();

    check_close("out", columns(o1.out, BT, nq, 0, nq), rout, 2e-2);
    check_close("lse", std::vector<double>(o1.lse.begin(), o1.lse.end()), rlse, 1e-4);
    // T = 1: the only position has P = 1 and dS = P (dP - Delta) = 0, so the reference dq, dk are
    // zero and the kernel's (cancelling up to fp32 rounding) must be tiny
    check_close("dq", columns(o1.dqkv, BT, row, 0, nq), rdq, 2e-2, 1e-3);
    check_close("dk", columns(o1.dqkv, BT, row, nq, nkv), rdk, 2e-2, 1e-3);
    check_close("dv", columns(o1.dqkv, BT, row, nq + nkv, nkv), rdv, 2e-2);

    Outputs o2 = run();  // bit-identical rerun
    CHECK(same_bits(o1.out, o2.out));
    CHECK(same_bits(o1.dqkv, o2.dqkv));
    CHECK(same_bits(o1.lse, o2.lse));

    cuda_free_all({d_qkv, d_dout, d_out, d_lse, d_dqkv, scratch});
}

TEST_CASE("attention forward/backward vs double reference (GQA, partial tiles)", "[gpu][attention]") {
    check_attention(2, 77, 4, 4, 64, 1);
    check_attention(1, 200, 8, 2, 64, 2);
    check_attention(1, 1, 4, 1, 64, 3);
    check_attention(1, 130, 8, 1, 128, 4);
    check_attention(2, 33, 16, 2, 128, 5);
    check_attention(1, 517, 2, 1, 128, 6);
    check_attention(1, 300, 6, 3, 64, 7);
}

static void check_rope(int B, int T, int Hq, int Hkv, int Dh, float theta, uint64_t seed) {
    INFO("B=" << B << " T=" << T << " Hq=" << Hq << " Hkv=" << Hkv << " Dh=" << Dh << " theta=" << theta);
    std::mt19937_64 gen(seed);
    const size_t BT = (size_t)B * T;
    const int nq = Hq * Dh, nkv = Hkv * Dh, row = nq + 2 * nkv;
    const AttnShape sh{B, T, Hq, Hkv, Dh};
    for (int backward = 0; backward < 2; backward++) {
        std::vector<bf16> h(BT * row);
        double tmp;
        for (auto& x : h) x = rand_bf16(gen, 1.0, &tmp);
        std::vector<double> q = columns(h, BT, row, 0, nq), k = columns(h, BT, row, nq, nkv);
        if (backward) {
            ref::rope_backward(q.data(), B, T, Hq, Dh, theta);
            ref::rope_backward(k.data(), B, T, Hkv, Dh, theta);
        } else {
            ref::rope_forward(q.data(), B, T, Hq, Dh, theta);
            ref::rope_forward(k.data(), B, T, Hkv, Dh, theta);
        }
        bf16* d = to_device(h);
        if (backward) rope_backward(d, sh, theta, 0);
        else rope_forward(d, sh, theta, 0);
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
}

TEST_CASE("rope forward/backward vs double reference", "[gpu][attention]") {
    check_rope(2, 77, 4, 2, 64, 10000.f, 11);
    check_rope(1, 1000, 4, 1, 128, 500000.f, 12);
}
