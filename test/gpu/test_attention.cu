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
#ifdef ATTN_SM90
    p.push_back({"sm80 (mma.sync)", attn::sm80_forward, attn::sm80_backward});
#endif
    return p;
}

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
