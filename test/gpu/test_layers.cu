// Every layer kernel but the SSD (test_ssd.cu) against the double reference in test/ref/,
// forward and backward, on fresh random inputs at odd shapes, with strided inputs where the
// model uses them, NaN-poisoned outputs, accumulating gradients that start non-zero, and
// bit-identical reruns.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>
#include "matmul.cuh"
#include "embedding.cuh"
#include "norm.cuh"
#include "conv1d.cuh"
#include "loss.cuh"
#include "mlp.cuh"
#include "test/ref/linear.h"
#include "test/ref/embedding.h"
#include "test/ref/norm.h"
#include "test/ref/conv1d.h"
#include "test/ref/loss.h"
#include "test/ref/mlp.h"

namespace gpu_test_layers {  // this file's helpers: all test files link into one binary (same-named types would clash)

// bf16 outputs carry 2^-9 relative rounding per value: their relative L2 error sits near
// 2e-3. fp32 outputs computed from the same (bf16-exact) inputs agree to ~1e-6.
static const double kTolBf16 = 1e-2, kTolFp32 = 1e-4;

static std::mt19937 rng(20261122);

static double rel_l2(const std::vector<double>& got, const std::vector<double>& ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); i++) {
        if (!std::isfinite(got[i])) return INFINITY;
        num += (got[i] - ref[i]) * (got[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    REQUIRE(den > 0);  // never compare on zeros
    return std::sqrt(num / den);
}

// a device buffer with its host mirror; values are exactly representable in its type
template <typename T>
struct Buf {
    std::vector<T> h;
    T* d = nullptr;
    explicit Buf(size_t n) : h(n) { d = cuda_malloc_n<T>(n, "test buffer"); }
    ~Buf() { cudaFree(d); }
    void up() { cudaCheck(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice)); }
    void down() { cudaCheck(cudaMemcpy(h.data(), d, h.size() * sizeof(T), cudaMemcpyDeviceToHost)); }
    void poison() { cudaCheck(cudaMemset(d, 0xFF, h.size() * sizeof(T))); }  // NaN in bf16 and fp32
    void randn(double mean = 0.0, double sd = 1.0) {
        std::normal_distribution<double> nd(mean, sd);
        for (auto& x : h) x = from_double(nd(rng));
        up();
    }
    static T from_double(double x);
    std::vector<double> dbl() const {
        std::vector<double> out(h.size());
        for (size_t i = 0; i < h.size(); i++) out[i] = to_double(h[i]);
        return out;
    }
    // rows x cols sub-block of a strided buffer, as contiguous doubles
    std::vector<double> cols(int rows, int stride, int cols_) const {
        std::vector<double> out((size_t)rows * cols_);
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols_; c++) out[(size_t)r * cols_ + c] = to_double(h[(size_t)r * stride + c]);
        return out;
    }
    static double to_double(T x);
};
template <> bf16 Buf<bf16>::from_double(double x) { return __float2bfloat16((float)x); }
template <> float Buf<float>::from_double(double x) { return (float)x; }
template <> double Buf<bf16>::to_double(bf16 x) { return __bfloat162float(x); }
template <> double Buf<float>::to_double(float x) { return x; }

TEST_CASE("matmul: forward, fused residual forward, backward (accumulating dW)", "[layers]") {
    for (auto [M, N, K] : {std::tuple{37, 96, 200}, std::tuple{1, 8, 16}, std::tuple{513, 772, 128}}) {
        INFO("M=" << M << " N=" << N << " K=" << K);
        Buf<bf16> inp((size_t)M * K), w((size_t)N * K), out((size_t)M * N), dout((size_t)M * N), dinp((size_t)M * K);
        Buf<float> res((size_t)M * N), out32((size_t)M * N), dw((size_t)N * K);
        inp.randn(); w.randn(0, 0.1); dout.randn(); res.randn(); dw.randn();
        auto dw0 = dw.dbl();
        out.poison(); out32.poison(); dinp.poison();
        matmul_forward(out.d, inp.d, w.d, M, N, K, 0);
        matmul_forward_residual(out32.d, res.d, inp.d, w.d, M, N, K, 0);
        matmul_backward(dinp.d, dw.d, dout.d, inp.d, w.d, M, N, K, 0);
        cudaCheck(cudaDeviceSynchronize());
        out.down(); out32.down(); dinp.down(); dw.down();
        std::vector<double> ref_out((size_t)M * N), ref_dinp((size_t)M * K), ref_dw = dw0;
        ref::linear_forward(ref_out.data(), inp.dbl().data(), w.dbl().data(), M, N, K);
        ref::linear_backward(ref_dinp.data(), ref_dw.data(), dout.dbl().data(), inp.dbl().data(), w.dbl().data(), M, N, K);
        CHECK(rel_l2(out.dbl(), ref_out) < kTolBf16);
        std::vector<double> ref_res = res.dbl();
        for (size_t i = 0; i < ref_res.size(); i++) ref_res[i] += ref_out[i];
        CHECK(rel_l2(out32.dbl(), ref_res) < kTolFp32);
        CHECK(rel_l2(dinp.dbl(), ref_dinp) < kTolBf16);
        CHECK(rel_l2(dw.dbl(), ref_dw) < kTolFp32);
    }
}

TEST_CASE("matmul: strided column slices, dinp written and accumulated", "[layers]") {
    // out = columns [3, 3+N) of a row of width ldo; inp = columns [5, 5+K) of a row of width ldi
    const int M = 45, N = 24, K = 40, ldi = 53, ldo = 31;
    Buf<bf16> inp((size_t)M * ldi), w((size_t)N * K), out((size_t)M * ldo), dout((size_t)M * ldo), dinp((size_t)M * ldi);
    Buf<float> dw((size_t)N * K);
    inp.randn(); w.randn(0, 0.1); dout.randn(); dinp.randn(); dw.randn();
    auto dw0 = dw.dbl();
    auto dinp0 = dinp.h;
    out.poison();
    matmul_forward(out.d + 3, inp.d + 5, w.d, M, N, K, MatmulStrides{ldi, ldo}, 0);
    matmul_backward(dinp.d + 5, dw.d, dout.d + 3, inp.d + 5, w.d, M, N, K, MatmulStrides{ldi, ldo, true}, 0);
    cudaCheck(cudaDeviceSynchronize());
    out.down(); dinp.down(); dw.down();
    auto slice = [&](const std::vector<double>& full, int ld, int off, int n) {
        std::vector<double> r((size_t)M * n);
        for (int i = 0; i < M; i++)
            for (int j = 0; j < n; j++) r[(size_t)i * n + j] = full[(size_t)i * ld + off + j];
        return r;
    };
    auto x = slice(inp.dbl(), ldi, 5, K), dy = slice(dout.dbl(), ldo, 3, N);
    std::vector<double> ref_out((size_t)M * N), ref_dinp((size_t)M * K), ref_dw = dw0;
    ref::linear_forward(ref_out.data(), x.data(), w.dbl().data(), M, N, K);
    ref::linear_backward(ref_dinp.data(), ref_dw.data(), dy.data(), x.data(), w.dbl().data(), M, N, K);
    Buf<bf16> old((size_t)M * ldi);
    old.h = dinp0;
    auto d0 = slice(old.dbl(), ldi, 5, K);
    for (size_t i = 0; i < ref_dinp.size(); i++) ref_dinp[i] += d0[i];  // accumulated
    CHECK(rel_l2(slice(out.dbl(), ldo, 3, N), ref_out) < kTolBf16);
    CHECK(rel_l2(slice(dinp.dbl(), ldi, 5, K), ref_dinp) < kTolBf16);
    CHECK(rel_l2(dw.dbl(), ref_dw) < kTolFp32);
    for (int i = 0; i < M; i++)  // the columns outside the slices are untouched
        for (int j : {0, 1, 2, 3, 4, 45, 52}) REQUIRE(__bfloat162float(dinp.h[(size_t)i * ldi + j]) ==
                                                     __bfloat162float(dinp0[(size_t)i * ldi + j]));
}

TEST_CASE("mlp activations: swiglu, gelu, relu2 forward and backward (which writes the activation again)", "[layers]") {
    // ff 136, 68, 37: 8, 4 and 1 hidden units a thread
    for (auto [kind, name, ff] : {std::tuple{MlpAct::SwiGLU, "swiglu", 136}, std::tuple{MlpAct::GELU, "gelu", 136},
                                  std::tuple{MlpAct::ReLU2, "relu2", 136}, std::tuple{MlpAct::SwiGLU, "swiglu", 37},
                                  std::tuple{MlpAct::GELU, "gelu", 68}, std::tuple{MlpAct::ReLU2, "relu2", 37}}) {
        const int rows = 77, w = mlp_up_width(kind) * ff;
        INFO(name << " ff=" << ff);
        Buf<bf16> a((size_t)rows * w), act((size_t)rows * ff), again((size_t)rows * ff), dact((size_t)rows * ff),
            da((size_t)rows * w);
        a.randn(0, 1.5); dact.randn();
        act.poison(); again.poison(); da.poison();
        mlp_act_forward(act.d, a.d, rows, ff, kind, 0);
        mlp_act_backward(da.d, again.d, dact.d, a.d, rows, ff, kind, 0);
        cudaCheck(cudaDeviceSynchronize());
        act.down(); again.down(); da.down();
        CHECK(std::memcmp(again.h.data(), act.h.data(), act.h.size() * sizeof(bf16)) == 0);  // the same bits
        std::vector<double> ra((size_t)rows * ff), rda((size_t)rows * w);
        ref::mlp_act_forward(ra.data(), a.dbl().data(), rows, ff, name);
        ref::mlp_act_backward(rda.data(), dact.dbl().data(), a.dbl().data(), rows, ff, name);
        CHECK(rel_l2(act.dbl(), ra) < kTolBf16);
        CHECK(rel_l2(da.dbl(), rda) < kTolBf16);
    }
}

TEST_CASE("embedding: forward, deterministic backward", "[layers]") {
    const int BT = 300, V = 50, C = 72;
    std::vector<int> tok(BT);
    for (auto& t : tok) t = (int)(rng() % V);
    Buf<int> dtok(BT);
    dtok.h = tok; dtok.up();
    Buf<bf16> wte((size_t)V * C);
    Buf<float> out((size_t)BT * C), dout((size_t)BT * C), dwte((size_t)V * C);
    wte.randn(); dout.randn(); dwte.randn();
    auto dw0 = dwte.dbl();
    out.poison();
    embedding_forward(out.d, dtok.d, wte.d, BT, C, 0);
    EmbeddingBuckets bk;
    bk.build(dtok.d, BT, V, 0);
    embedding_backward(dwte.d, dout.d, bk, BT, C, 0);
    cudaCheck(cudaDeviceSynchronize());
    out.down(); dwte.down();
    std::vector<double> ref_out((size_t)BT * C), ref_dw = dw0;
    ref::embedding_forward(ref_out.data(), tok.data(), wte.dbl().data(), BT, C);
    ref::embedding_backward(ref_dw.data(), dout.dbl().data(), tok.data(), BT, C);
    CHECK(out.dbl() == ref_out);  // a copy: exact
    CHECK(rel_l2(dwte.dbl(), ref_dw) < kTolFp32);
    std::vector<float> first = dwte.h;
    dwte.h.assign(dw0.begin(), dw0.end()); dwte.up();
    embedding_backward(dwte.d, dout.d, bk, BT, C, 0);
    dwte.down();
    CHECK(dwte.h == first);
}

TEST_CASE("rmsnorm: forward (output and the kept xhat), apply, backward from xhat (dx accumulates, bf16 copy, dweight)",
          "[layers][norm]") {
    // C 67 and 202 take the scalar and 2-wide paths, the others 4-wide; a block of 256 threads takes a
    // row at a time: 1 vector a thread at C <= 1024 (64 and 67 leave most threads idle), 2 at 2048, 3 at
    // 2560 (mamba2-2.7b's d_model: some threads hold 2) and 4 at 4096; 9 rows leave most of the row
    // blocks empty, which still write their (zero) partial weight-gradient rows
    for (auto [rows, C] : {std::pair{1, 64}, std::pair{37, 200}, std::pair{1000, 1024}, std::pair{5, 67}, std::pair{9, 202},
                           std::pair{300, 2048}, std::pair{9, 128}, std::pair{41, 768}, std::pair{300, 2560},
                           std::pair{20, 4096}}) {
        INFO("rows=" << rows << " C=" << C);
        Buf<float> x((size_t)rows * C), rstd(rows), dx((size_t)rows * C), dw(C), scratch(rmsnorm_backward_scratch_floats(rows, C));
        Buf<bf16> w(C), out((size_t)rows * C), xh((size_t)rows * C), again((size_t)rows * C), dout((size_t)rows * C),
            dxb((size_t)rows * C);
        x.randn(0.5, 2.0); w.randn(1.0, 0.2); dout.randn(); dx.randn(); dw.randn();
        auto dx0 = dx.dbl(), dw0 = dw.dbl();
        out.poison(); xh.poison(); again.poison(); rstd.poison(); dxb.poison();
        rmsnorm_forward(out.d, xh.d, rstd.d, x.d, w.d, rows, C, 1e-5f, 0);
        rmsnorm_apply(again.d, xh.d, w.d, rows, C, 0);
        rmsnorm_backward(dx.d, dxb.d, dw.d, scratch.d, dout.d, xh.d, w.d, rstd.d, rows, C, 0);
        cudaCheck(cudaDeviceSynchronize());
        out.down(); xh.down(); again.down(); rstd.down(); dx.down(); dxb.down(); dw.down();
        const std::vector<double> xd = x.dbl(), xhd = xh.dbl();
        std::vector<double> ro((size_t)rows * C), rr(rows), rxh((size_t)rows * C);
        ref::rmsnorm_forward(ro.data(), rr.data(), xd.data(), w.dbl().data(), rows, C, 1e-5);
        for (size_t i = 0; i < rxh.size(); i++) rxh[i] = xd[i] * rr[i / C];
        CHECK(rel_l2(out.dbl(), ro) < kTolBf16);
        CHECK(rel_l2(xhd, rxh) < kTolBf16);
        CHECK(rel_l2(rstd.dbl(), rr) < kTolFp32);
        CHECK(std::memcmp(again.h.data(), out.h.data(), out.h.size() * sizeof(bf16)) == 0);  // the same bits
        // the backward sees the input the forward kept: x = xhat / rstd, with the kernel's rstd
        std::vector<double> xk((size_t)rows * C), rk = rstd.dbl(), rdx = dx0, rdw = dw0;
        for (size_t i = 0; i < xk.size(); i++) xk[i] = xhd[i] / rk[i / C];
        ref::rmsnorm_backward(rdx.data(), rdw.data(), dout.dbl().data(), xk.data(), w.dbl().data(), rk.data(), rows, C);
        CHECK(rel_l2(dx.dbl(), rdx) < kTolFp32);
        CHECK(rel_l2(dxb.dbl(), rdx) < kTolBf16);
        CHECK(rel_l2(dw.dbl(), rdw) < kTolFp32);
        // a rerun from the same dx and dweight gives the same bits (the sums' order is fixed)
        const std::vector<float> first_dx = dx.h, first_dw = dw.h;
        dx.h.assign(dx0.begin(), dx0.end()); dx.up();
        dw.h.assign(dw0.begin(), dw0.end()); dw.up();
        rmsnorm_backward(dx.d, dxb.d, dw.d, scratch.d, dout.d, xh.d, w.d, rstd.d, rows, C, 0);
        dx.down(); dw.down();
        CHECK(dx.h == first_dx);
        CHECK(dw.h == first_dw);
    }
}

TEST_CASE("gated rmsnorm: grouped, strided z, forward and backward (which writes the forward's output again)",
          "[layers][norm]") {
    // z is a slice of a wider row; its stride and the group size pick the vector width (1 for the odd
    // strides, then 8, 8, 4, 2). Each group goes to its own threads of the block: 2, 3, 4 and 5 groups to
    // 4, 3, 2 and 2 warps each (100 x 384 at width 1: 128 vectors over 96 threads), 32 groups to 16 lanes
    // each and 64 to 8 (a group's sum inside a warp); 2048 (mamba2-370m) and 5120 (mamba2-2.7b: some
    // threads holding 3 vectors of 8, some 2) one group across the block; 2000 x 5120 gives each backward
    // block 8 rows, which wrap its ring of rows in flight several times
    for (auto [rows, C, groups, zs] : {std::tuple{37, 256, 1, 273}, std::tuple{100, 384, 3, 401}, std::tuple{1, 64, 2, 81},
                                       std::tuple{45, 512, 2, 576}, std::tuple{33, 384, 3, 392}, std::tuple{19, 96, 4, 100},
                                       std::tuple{7, 60, 5, 62}, std::tuple{700, 2048, 1, 4384}, std::tuple{41, 96, 1, 113},
                                       std::tuple{41, 768, 1, 776}, std::tuple{300, 5120, 1, 10576},
                                       std::tuple{9, 768, 32, 800}, std::tuple{5, 1024, 64, 1024},
                                       std::tuple{2000, 5120, 1, 5120}}) {
        INFO("rows=" << rows << " C=" << C << " groups=" << groups << " z stride=" << zs);
        Buf<bf16> y((size_t)rows * C), z((size_t)rows * zs), w(C), out((size_t)rows * C), again((size_t)rows * C),
            dout((size_t)rows * C), dy((size_t)rows * C), dz((size_t)rows * zs);
        Buf<float> rstd((size_t)rows * groups), dw(C), scratch(gated_rmsnorm_backward_scratch_floats(rows, C));
        y.randn(); z.randn(); w.randn(1.0, 0.2); dout.randn(); dw.randn();
        auto dw0 = dw.dbl();
        out.poison(); again.poison(); rstd.poison(); dy.poison(); dz.poison();
        gated_rmsnorm_forward(out.d, rstd.d, y.d, z.d, zs, w.d, rows, C, groups, 1e-5f, 0);
        gated_rmsnorm_backward(dy.d, dz.d, zs, again.d, dw.d, scratch.d, dout.d, y.d, z.d, zs, w.d, rstd.d, rows, C,
                               groups, 0);
        cudaCheck(cudaDeviceSynchronize());
        out.down(); again.down(); rstd.down(); dy.down(); dz.down(); dw.down();
        CHECK(std::memcmp(again.h.data(), out.h.data(), out.h.size() * sizeof(bf16)) == 0);  // the same bits
        auto zc = z.cols(rows, zs, C);
        std::vector<double> ro((size_t)rows * C), rr((size_t)rows * groups), rdy((size_t)rows * C), rdz((size_t)rows * C),
            rdw = dw0;
        ref::gated_rmsnorm_forward(ro.data(), rr.data(), y.dbl().data(), zc.data(), w.dbl().data(), rows, C, groups, 1e-5);
        ref::gated_rmsnorm_backward(rdy.data(), rdz.data(), rdw.data(), dout.dbl().data(), y.dbl().data(), zc.data(),
                                    w.dbl().data(), rr.data(), rows, C, groups);
        CHECK(rel_l2(out.dbl(), ro) < kTolBf16);
        CHECK(rel_l2(rstd.dbl(), rr) < kTolFp32);
        CHECK(rel_l2(dy.dbl(), rdy) < kTolBf16);
        CHECK(rel_l2(dz.cols(rows, zs, C), rdz) < kTolBf16);
        CHECK(rel_l2(dw.dbl(), rdw) < kTolFp32);
        for (int r = 0; r < rows; r++)  // the gap beside the dz slice is untouched
            for (int c = C; c < zs; c++) REQUIRE(std::isnan(__bfloat162float(dz.h[(size_t)r * zs + c])));
        // a rerun from the same dweight gives the same bits (the sums' order is fixed)
        const std::vector<float> first = dw.h;
        dw.h.assign(dw0.begin(), dw0.end()); dw.up();
        gated_rmsnorm_backward(dy.d, dz.d, zs, again.d, dw.d, scratch.d, dout.d, y.d, z.d, zs, w.d, rstd.d, rows, C,
                               groups, 0);
        dw.down();
        CHECK(dw.h == first);
    }
}

TEST_CASE("norm layout: groups that cannot fill whole warps are refused with their count", "[layers][norm]") {
    CHECK(norm_slicing(5120, 1, 8).threads == 256);
    CHECK(norm_slicing(5120, 1, 8).nv == 3);
    CHECK(norm_slicing(768, 32, 8).tpg == 16);
    CHECK_THROWS_WITH(norm_slicing(17 * 8, 17, 8), Catch::Contains("17 groups"));
    CHECK_THROWS_WITH(norm_slicing(100, 3, 8), Catch::Contains("100 channels"));
}

TEST_CASE("conv1d + SiLU: causal, strided, forward and backward, deterministic", "[layers][conv1d]") {
    // input stride and channels pick the vector width (up to 4; 1 and 2 for the odd ones); T = 1
    // and 3 put sequence starts inside a block's rows; one column block (C <= 128) takes the most row
    // chunks (conv1d_row_chunks), 2 x 1000 at 64 channels runs of 4 rows; 4100 channels (33 column
    // blocks) few chunks, runs of tens of rows with the second sequence's start inside one
    for (auto [B, T, C, is, K] : {std::tuple{2, 37, 100, 140, 4}, std::tuple{1, 1, 24, 64, 4}, std::tuple{3, 300, 64, 104, 4},
                                  std::tuple{2, 45, 37, 77, 4}, std::tuple{2, 50, 70, 110, 4}, std::tuple{5, 3, 48, 48, 4},
                                  std::tuple{2, 1000, 64, 96, 4}, std::tuple{3, 41, 40, 48, 3}, std::tuple{2, 33, 16, 24, 2},
                                  std::tuple{2, 997, 4100, 4104, 4}}) {
        INFO("B=" << B << " T=" << T << " C=" << C << " stride=" << is << " K=" << K);
        const int BT = B * T;
        Buf<bf16> in((size_t)BT * is), w((size_t)C * K), bias(C), out((size_t)BT * C), dout((size_t)BT * C),
            din((size_t)BT * is);
        Buf<float> dw((size_t)C * K), db(C), scratch(conv1d_backward_scratch_floats(B, T, C, K));
        in.randn(); w.randn(0, 0.5); bias.randn(0, 0.5); dout.randn(); dw.randn(); db.randn();
        auto dw0 = dw.dbl(), db0 = db.dbl();
        out.poison(); din.poison();
        conv1d_silu_forward(out.d, in.d, is, w.d, bias.d, nullptr, B, T, C, K, 0);
        conv1d_silu_backward(din.d, is, dw.d, db.d, scratch.d, dout.d, in.d, is, w.d, bias.d, nullptr, B, T, C, K, 0);
        cudaCheck(cudaDeviceSynchronize());
        out.down(); din.down(); dw.down(); db.down();
        auto ic = in.cols(BT, is, C);
        std::vector<double> ro((size_t)BT * C), rdin((size_t)BT * C), rdw = dw0, rdb = db0;
        ref::conv1d_silu_forward(ro.data(), ic.data(), w.dbl().data(), bias.dbl().data(), B, T, C, K);
        ref::conv1d_silu_backward(rdin.data(), rdw.data(), rdb.data(), dout.dbl().data(), ic.data(), w.dbl().data(),
                                  bias.dbl().data(), B, T, C, K);
        CHECK(rel_l2(out.dbl(), ro) < kTolBf16);
        CHECK(rel_l2(din.cols(BT, is, C), rdin) < kTolBf16);
        CHECK(rel_l2(dw.dbl(), rdw) < kTolFp32);
        CHECK(rel_l2(db.dbl(), rdb) < kTolFp32);
        for (int r = 0; r < BT; r++)  // the gap beside the din slice is untouched
            for (int c = C; c < is; c++) REQUIRE(std::isnan(__bfloat162float(din.h[(size_t)r * is + c])));
        std::vector<float> first = dw.h;
        dw.h.assign(dw0.begin(), dw0.end()); dw.up();
        conv1d_silu_backward(din.d, is, dw.d, db.d, scratch.d, dout.d, in.d, is, w.d, bias.d, nullptr, B, T, C, K, 0);
        dw.down();
        CHECK(dw.h == first);
        if (C == 4100) {  // this GPU's row chunks put rows T-1 and T (a sequence start) in one warp's run
            auto same_run = [&](int chunks, int a, int b) {  // some warp's run (the kernels' split) holds both
                for (int ch = 0; ch < chunks; ch++)
                    for (int wp = 0; wp < CONV_WARPS; wp++) {
                        int r0, r1;
                        conv1d_warp_rows(ch, chunks, wp, BT, &r0, &r1);
                        if (r0 <= a && b < r1) return true;
                    }
                return false;
            };
            const int cb = (int)ceil_div(C, 128);  // 4 channels a lane
            const int bwd = conv1d_row_chunks(occupancy(conv1d_silu_backward_kernel<4, 4, false>, 32 * CONV_WARPS,
                                                        conv_bwd_smem_bytes<4>()) * sm_count(), cb, BT, K);
            const int fwd = conv1d_row_chunks(occupancy(conv1d_silu_forward_kernel<4, 4, false>, 32 * CONV_WARPS, 0) *
                                              sm_count(), cb, BT, K);
            INFO("row chunks: backward " << bwd << ", forward " << fwd);
            CHECK(same_run(bwd, T - 1, T));
            CHECK(same_run(fwd, T - 1, T));
        }
    }
}

// Positions in the document (0 at a start) of B rows of T: documents shorter than the conv width, a
// warp's run of rows and longer; a start at the last position of row 0; row 1 begins inside a document.
static std::vector<int> conv_doc_positions(int B, int T) {
    std::vector<int> pos((size_t)B * T);
    for (int b = 0; b < B; b++) {
        int p = b == 1 ? 5 : 0, left = 0;
        for (int t = 0; t < T; t++) {
            if (t > 0 && (left == 0 || (b == 0 && t == T - 1))) p = 0;
            if (p == 0 || (b == 1 && t == 0)) {
                const int kind = (int)(rng() % 10);
                left = kind < 5 ? 1 + (int)(rng() % 3) : kind < 8 ? 4 + (int)(rng() % 30) : 40 + (int)(rng() % 120);
            }
            pos[(size_t)b * T + t] = p++;
            left--;
        }
    }
    return pos;
}

TEST_CASE("conv1d + SiLU with document boundaries vs each document alone", "[layers][conv1d]") {
    // vector widths 4, 2, 1 (and the 8-wide forward dev/bench_layers times), widths 4, 3, 2, runs of 4
    // rows (2 x 1000), long runs over many documents (4100 channels) and one-row sequences
    for (auto [B, T, C, is, K] : {std::tuple{3, 150, 64, 96, 4}, std::tuple{2, 77, 70, 110, 4}, std::tuple{2, 45, 37, 77, 4},
                                  std::tuple{3, 41, 40, 48, 3}, std::tuple{2, 33, 16, 24, 2}, std::tuple{2, 1000, 64, 96, 4},
                                  std::tuple{3, 1, 24, 64, 4}, std::tuple{2, 130, 128, 128, 4}, std::tuple{2, 997, 4100, 4104, 4}}) {
        INFO("B=" << B << " T=" << T << " C=" << C << " stride=" << is << " K=" << K);
        const int BT = B * T;
        const std::vector<int> pos = conv_doc_positions(B, T);
        Buf<int> dpos(BT);
        dpos.h = pos; dpos.up();
        Buf<bf16> in((size_t)BT * is), w((size_t)C * K), bias(C), out((size_t)BT * C), dout((size_t)BT * C),
            din((size_t)BT * is), out8((size_t)BT * C);
        Buf<float> dw((size_t)C * K), db(C), scratch(conv1d_backward_scratch_floats(B, T, C, K));
        in.randn(); w.randn(0, 0.5); bias.randn(0, 0.5); dout.randn(); dw.randn(); db.randn();
        auto dw0 = dw.dbl(), db0 = db.dbl();
        out.poison(); din.poison(); out8.poison();
        conv1d_silu_forward(out.d, in.d, is, w.d, bias.d, dpos.d, B, T, C, K, 0);
        conv1d_silu_backward(din.d, is, dw.d, db.d, scratch.d, dout.d, in.d, is, w.d, bias.d, dpos.d, B, T, C, K, 0);
        if (K == 4) conv1d_silu_forward_k<4, 8>(out8.d, in.d, is, w.d, bias.d, dpos.d, B, T, C, 0);
        cudaCheck(cudaDeviceSynchronize());
        out.down(); din.down(); dw.down(); db.down(); out8.down();
        // the reference on each document [s, e) of each row (s = 0 or pos[s] == 0) as its own sequence
        const auto ic = in.cols(BT, is, C), dy = dout.dbl(), wd = w.dbl(), bd = bias.dbl();
        std::vector<double> ro((size_t)BT * C), rdin((size_t)BT * C), rdw = dw0, rdb = db0;
        for (int b = 0; b < B; b++)
            for (int s0 = 0, e = 1; s0 < T; s0 = e, e = s0 + 1) {
                while (e < T && pos[(size_t)b * T + e] != 0) e++;
                const size_t o = ((size_t)b * T + s0) * C, n = (size_t)(e - s0) * C;
                std::vector<double> x(ic.begin() + o, ic.begin() + o + n), g(dy.begin() + o, dy.begin() + o + n), y(n), dx(n);
                ref::conv1d_silu_forward(y.data(), x.data(), wd.data(), bd.data(), 1, e - s0, C, K);
                ref::conv1d_silu_backward(dx.data(), rdw.data(), rdb.data(), g.data(), x.data(), wd.data(), bd.data(), 1,
                                          e - s0, C, K);
                std::copy(y.begin(), y.end(), ro.begin() + o);
                std::copy(dx.begin(), dx.end(), rdin.begin() + o);
            }
        CHECK(rel_l2(out.dbl(), ro) < kTolBf16);
        CHECK(rel_l2(din.cols(BT, is, C), rdin) < kTolBf16);
        CHECK(rel_l2(dw.dbl(), rdw) < kTolFp32);
        CHECK(rel_l2(db.dbl(), rdb) < kTolFp32);
        if (K == 4) CHECK(rel_l2(out8.dbl(), ro) < kTolBf16);
        for (int r = 0; r < BT; r++)  // the gap beside the din slice is untouched
            for (int c = C; c < is; c++) REQUIRE(std::isnan(__bfloat162float(din.h[(size_t)r * is + c])));
        std::vector<float> first = dw.h;
        dw.h.assign(dw0.begin(), dw0.end()); dw.up();
        conv1d_silu_backward(din.d, is, dw.d, db.d, scratch.d, dout.d, in.d, is, w.d, bias.d, dpos.d, B, T, C, K, 0);
        dw.down();
        CHECK(dw.h == first);
    }
}

TEST_CASE("fused classifier: losses, dlogits over the padded vocab, weights, masks, z-loss, ranks", "[layers]") {
    // 50257 and 128256 (Llama 3's vocabulary) are wider than a block keeps in registers (LOSS_CACHED): the rest is
    // read again
    for (auto [BT, V, z] : {std::tuple{37, 1000, 1e-4f}, std::tuple{5, 333, 0.0f}, std::tuple{64, 50257, 1e-4f},
                            std::tuple{6, 128256, 1e-4f}}) {
        INFO("BT=" << BT << " V=" << V << " z=" << z);
        const int Vp = (V + 127) / 128 * 128;
        Buf<bf16> logits((size_t)BT * Vp);
        Buf<float> weights(BT), losses(BT);
        Buf<int> targets(BT), rank(BT);
        logits.randn(0, 3.0);
        for (int i = 0; i < BT; i++)  // padded columns hold large values that must never win
            for (int j = V; j < Vp; j++) logits.h[(size_t)i * Vp + j] = __float2bfloat16(100.0f);
        logits.up();
        for (int i = 0; i < BT; i++) {
            targets.h[i] = i % 7 == 3 ? -1 : (int)(rng() % V);
            weights.h[i] = std::tanh(i / 10.0f);
        }
        targets.up(); weights.up();
        std::vector<double> lg((size_t)BT * V);
        for (int i = 0; i < BT; i++)
            for (int j = 0; j < V; j++) lg[(size_t)i * V + j] = __bfloat162float(logits.h[(size_t)i * Vp + j]);
        losses.poison(); rank.poison();
        const float dloss = 1.0f / BT;
        Buf<float> dloss_dev(1);  // the kernel reads dloss from the device
        dloss_dev.h[0] = dloss;
        dloss_dev.up();
        fused_classifier(logits.d, losses.d, rank.d, targets.d, weights.d, dloss_dev.d, z, BT, V, Vp, true, 0);
        cudaCheck(cudaDeviceSynchronize());
        logits.down(); losses.down(); rank.down();
        std::vector<double> rl(BT), rd((size_t)BT * V), wd = weights.dbl();
        ref::cross_entropy(rl.data(), rd.data(), lg.data(), targets.h.data(), wd.data(), dloss, z, BT, V);
        CHECK(rel_l2(losses.dbl(), rl) < kTolFp32);
        std::vector<double> got((size_t)BT * V);
        for (int i = 0; i < BT; i++) {
            for (int j = 0; j < V; j++) got[(size_t)i * V + j] = __bfloat162float(logits.h[(size_t)i * Vp + j]);
            for (int j = V; j < Vp; j++) REQUIRE(__bfloat162float(logits.h[(size_t)i * Vp + j]) == 0.0f);
            int t = targets.h[i];
            if (t < 0) { CHECK(rank.h[i] == -1); continue; }
            int above = 0;
            for (int j = 0; j < V; j++) above += lg[(size_t)i * V + j] > lg[(size_t)i * V + t];
            CHECK(rank.h[i] == above);
        }
        CHECK(rel_l2(got, rd) < kTolBf16);
    }
}

}  // namespace gpu_test_layers
