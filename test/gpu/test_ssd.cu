// ssd.cuh (chunked SSD scan, forward and backward) against the sequential double-precision
// recurrence of test/ref/ssd.h: y and every gradient, on shapes with partial last chunks,
// several (H, G), P/N/chunk variants and strided inputs embedded in a wider row with NaN in
// the gaps (as the model's fused xBC and in_proj outputs are). Then the whole forward and
// backward run again and must repeat bit for bit.
#include <catch2/catch.hpp>
#include "test/gpu_util.h"
#include <cmath>
#include <random>
#include <vector>
#include "ssd.cuh"
#include "test/ref/ssd.h"

// Inputs are bf16 (the reference gets the same rounded values in double); the kernels round
// matmul operands (decayed scores, scaled x, states) to bf16 with fp32 accumulation, so the
// relative L2 error sits near 2^-9 = 2e-3. A wrong index or a missing term gives errors of order 1.
static const double kTol = 1e-2;

struct Outputs {
    std::vector<bf16> y, xbc_grad, ddt;  // y (BT, HP); dx|dB|dC rows (strided); ddt rows (strided)
    std::vector<float> pg;               // accumulated parameter gradients: ddt_bias (H) | dA_log (H) | dD (H)
};

static void check_ssd(int B, int T, int H, int G, int P, int N, int chunk, uint64_t seed) {
    INFO("B=" << B << " T=" << T << " H=" << H << " G=" << G << " P=" << P << " N=" << N << " chunk=" << chunk);
    Rng rng(seed);
    const int HP = H * P, GN = G * N;
    // the model's layout: one row [x | B | C] (+ a gap), dt in a row of its own (+ a gap)
    const int row = HP + 2 * GN + 8, dt_stride = H + 5;
    const size_t BT = (size_t)B * T;

    std::vector<bf16> h_xbc(BT * row, kPoison), h_dt(BT * dt_stride, kPoison), h_dy(BT * HP);
    std::vector<double> x(BT * HP), Bm(BT * GN), Cm(BT * GN), dt(BT * H), dy(BT * HP);
    std::vector<double> dt_bias(H), A_log(H), D(H);
    std::vector<bf16> h_bias(H), h_alog(H), h_D(H);
    for (size_t r = 0; r < BT; r++) {
        for (int i = 0; i < HP; i++) h_xbc[r * row + i] = round_bf16(rng.normal(), &x[r * HP + i]);
        for (int i = 0; i < GN; i++) h_xbc[r * row + HP + i] = round_bf16(rng.normal(), &Bm[r * GN + i]);
        for (int i = 0; i < GN; i++) h_xbc[r * row + HP + GN + i] = round_bf16(rng.normal(), &Cm[r * GN + i]);
        for (int h = 0; h < H; h++) h_dt[r * dt_stride + h] = round_bf16(rng.uniform(-4.0, 0.0), &dt[r * H + h]);
        for (int i = 0; i < HP; i++) h_dy[r * HP + i] = round_bf16(rng.normal(), &dy[r * HP + i]);
    }
    for (int h = 0; h < H; h++) {
        const double target = std::exp(rng.uniform(std::log(1e-3), std::log(1e-1)));  // softplus(dt_bias)
        h_bias[h] = round_bf16(std::log(std::expm1(target)), &dt_bias[h]);
        h_alog[h] = round_bf16(std::log(rng.uniform(1.0, 16.0)), &A_log[h]);
        h_D[h] = round_bf16(rng.uniform(0.5, 1.5), &D[h]);
    }
    // parameter gradients start from random values: the kernel must accumulate
    std::vector<float> g0(3 * H);
    for (auto& v : g0) v = (float)rng.normal();

    // reference
    std::vector<double> ry(BT * HP), rdx(BT * HP), rdB(BT * GN), rdC(BT * GN), rddt(BT * H);
    std::vector<double> rdbias(H, 0.0), rdalog(H, 0.0), rdD(H, 0.0);
    ref::ssd_forward(ry.data(), x.data(), Bm.data(), Cm.data(), dt.data(), dt_bias.data(), A_log.data(), D.data(), B,
                     T, H, P, G, N);
    ref::ssd_backward(rdx.data(), rdB.data(), rdC.data(), rddt.data(), rdbias.data(), rdalog.data(), rdD.data(),
                      dy.data(), x.data(), Bm.data(), Cm.data(), dt.data(), dt_bias.data(), A_log.data(), D.data(),
                      B, T, H, P, G, N);

    // device
    const SSDShape sh{B, T, H, P, G, N, chunk};
    bf16* d_xbc = to_device(h_xbc);
    bf16* d_dt = to_device(h_dt);
    bf16* d_dy = to_device(h_dy);
    bf16* d_bias = to_device(h_bias);
    bf16* d_alog = to_device(h_alog);
    bf16* d_D = to_device(h_D);
    bf16* d_y = cuda_malloc_n<bf16>(BT * HP, "y");
    bf16* d_grad = cuda_malloc_n<bf16>(BT * row, "dxbc");
    bf16* d_ddt = cuda_malloc_n<bf16>(BT * dt_stride, "ddt");
    float* d_pg = cuda_malloc_n<float>(3 * H, "param grads");
    void* saved = cuda_malloc(ssd_saved_bytes(sh), "saved");
    void* scratch = cuda_malloc(ssd_scratch_bytes(sh), "scratch");

    auto run = [&]() {
        Outputs o;
        poison(d_y, BT * HP);
        poison(d_grad, BT * row);
        poison(d_ddt, BT * dt_stride);
        cudaCheck(cudaMemcpy(d_pg, g0.data(), 3 * H * sizeof(float), cudaMemcpyHostToDevice));
        poison_bytes(scratch, ssd_scratch_bytes(sh));
        poison_bytes(saved, ssd_saved_bytes(sh));
        ssd_forward(d_y, saved, scratch, d_xbc, row, d_xbc + HP, d_xbc + HP + GN, row, d_dt, dt_stride, d_bias,
                    d_alog, d_D, sh, 0);
        poison_bytes(scratch, ssd_scratch_bytes(sh));  // backward must not rely on forward scratch
        ssd_backward(d_grad, row, d_grad + HP, d_grad + HP + GN, row, d_ddt, dt_stride, d_pg, d_pg + H, d_pg + 2 * H,
                     scratch, d_dy, d_xbc, row, d_xbc + HP, d_xbc + HP + GN, row, d_dt, dt_stride, d_bias, d_alog,
                     d_D, saved, sh, 0);
        cudaCheck(cudaDeviceSynchronize());
        o.y = to_host(d_y, BT * HP);
        o.xbc_grad = to_host(d_grad, BT * row);
        o.ddt = to_host(d_ddt, BT * dt_stride);
        o.pg = to_host(d_pg, 3 * H);
        return o;
    };
    Outputs o1 = run();

    // the gaps of the strided outputs are not written
    REQUIRE(nan_outside(o1.xbc_grad, BT, row, 0, HP + 2 * GN));
    REQUIRE(nan_outside(o1.ddt, BT, dt_stride, 0, H));
    check_close("y", columns(o1.y, BT, HP, 0, HP), ry, kTol);
    check_close("dx", columns(o1.xbc_grad, BT, row, 0, HP), rdx, kTol);
    check_close("dB", columns(o1.xbc_grad, BT, row, HP, GN), rdB, kTol);
    check_close("dC", columns(o1.xbc_grad, BT, row, HP + GN, GN), rdC, kTol);
    check_close("ddt_raw", columns(o1.ddt, BT, dt_stride, 0, H), rddt, kTol);
    check_close("ddt_bias", added(o1.pg, g0, 0, H), rdbias, kTol);
    check_close("dA_log", added(o1.pg, g0, H, H), rdalog, kTol);
    check_close("dD", added(o1.pg, g0, 2 * H, H), rdD, kTol);

    // determinism: the same inputs give the same bits
    Outputs o2 = run();
    CHECK(same_bits(o1.y, o2.y));
    CHECK(same_bits(o1.xbc_grad, o2.xbc_grad));
    CHECK(same_bits(o1.ddt, o2.ddt));
    CHECK(same_bits(o1.pg, o2.pg));

    cuda_free_all({d_xbc, d_dt, d_dy, d_bias, d_alog, d_D, d_y, d_grad, d_ddt, d_pg, saved, scratch});
}

TEST_CASE("ssd forward/backward vs sequential reference, partial chunks", "[gpu][ssd]") {
    // T = 1 with one head per group: dB/dC of a single position are one product per head, and a sum over
    // heads of such products can cancel far below bf16 resolution (seed 1 with G = 1: 30x, rel error 7e-2)
    check_ssd(1, 1, 4, 4, 64, 64, 64, 1);
    check_ssd(3, 37, 4, 1, 64, 128, 256, 2);
    check_ssd(1, 255, 8, 2, 64, 128, 128, 3);
    check_ssd(3, 257, 6, 3, 64, 64, 256, 4);
    check_ssd(1, 600, 8, 2, 64, 128, 256, 5);
}

TEST_CASE("ssd small heads and chunks", "[gpu][ssd]") {
    check_ssd(3, 200, 6, 3, 32, 64, 64, 6);
    check_ssd(1, 300, 4, 2, 32, 128, 128, 7);
    check_ssd(2, 129, 8, 1, 64, 64, 64, 8);
}

TEST_CASE("ssd many heads per group (head slices of several heads)", "[gpu][ssd]") {
    // 16 heads in one group over 128 tiles: the backward loops over 2 heads per block and
    // reduces 8 dB/dC slice partials (see ssd::head_slices)
    const SSDShape sh{2, 4000, 16, 64, 1, 64, 256};
    REQUIRE(ssd::head_slices(sh) == 8);
    check_ssd(2, 4000, 16, 1, 64, 64, 256, 9);
}

TEST_CASE("ssd rejects unsupported shapes", "[gpu][ssd]") {
    auto fwd = [](SSDShape sh) {
        ssd_forward(nullptr, nullptr, nullptr, nullptr, 0, nullptr, nullptr, 0, nullptr, 0, nullptr, nullptr, nullptr,
                    sh, 0);
    };
    REQUIRE_THROWS(fwd(SSDShape{1, 64, 4, 48, 1, 64, 256}));   // P
    REQUIRE_THROWS(fwd(SSDShape{1, 64, 4, 64, 1, 96, 256}));   // N
    REQUIRE_THROWS(fwd(SSDShape{1, 64, 4, 64, 1, 64, 100}));   // chunk
    REQUIRE_THROWS(fwd(SSDShape{1, 64, 6, 64, 4, 64, 256}));   // H % G
}
