// scan.cuh (Mamba-1 selective scan, forward and backward) against the sequential double-precision
// recurrence of test/ref/scan.h: y and every gradient, on odd shapes (T not a multiple of the chunk,
// D not a multiple of the block, every N configuration), with the model's strided layouts: u in rows
// of its own stride, z a column slice of a wider row, B and C column slices of the x_proj row; the
// gradient outputs strided too (du with a stride different from u), gaps poisoned with NaN and checked
// untouched. Parameter gradients accumulate into random starting values. Then everything runs again
// and must repeat bit for bit.
#include <catch2/catch.hpp>
#include "test/gpu_util.h"
#include <cmath>
#include <random>
#include <vector>
#include "scan.cuh"
#include "test/ref/scan.h"

// bf16 inputs (the reference gets the same rounded values); bf16 outputs round to 2^-9 relative
static const double kTolBf16 = 2e-2;
static const double kTolFp32 = 5e-3;

struct Outputs {
    std::vector<bf16> y, du, ddt, zbuf, bcbuf;  // zbuf: [x | dz | gap] rows; bcbuf: [dt | dB | dC | gap] rows
    std::vector<float> pg;                      // dA_log (D*N) | dDskip (D) | ddt_bias (D)
};

static void check_scan(int B, int T, int D, int N, uint64_t seed) {
    INFO("B=" << B << " T=" << T << " D=" << D << " N=" << N);
    Rng rng(seed);
    const size_t BT = (size_t)B * T;
    // strides as in the model, plus gaps: u (conv output), dt (dt_proj output), z slice of [x | z],
    // B/C slices of the x_proj row [dt_low | B | C]
    const int us = D + 3, dts = D + 5, zs = 2 * D + 1, z_off = D, R = 7, bcs = R + 2 * N + 2, dus = D + 2;

    std::vector<bf16> h_u(BT * us, kPoison), h_dt(BT * dts, kPoison), h_z(BT * zs, kPoison), h_bc(BT * bcs, kPoison),
        h_dy(BT * D);
    std::vector<double> u(BT * D), dt(BT * D), z(BT * D), Bm(BT * N), Cm(BT * N), dy(BT * D);
    std::vector<double> dt_bias(D), A_log((size_t)D * N), Dsk(D);
    std::vector<bf16> h_bias(D), h_alog((size_t)D * N), h_D(D);
    for (int d = 0; d < D; d++) {
        // softplus(dt_raw + dt_bias) in about [1e-3, 0.2]
        const double target = std::exp(rng.uniform(std::log(2e-3), std::log(0.1)));
        h_bias[d] = round_bf16(std::log(std::expm1(target)), &dt_bias[d]);
        for (int n = 0; n < N; n++)
            h_alog[(size_t)d * N + n] = round_bf16(std::log(n + 1.0) + 0.1 * rng.normal(), &A_log[(size_t)d * N + n]);
        h_D[d] = round_bf16(rng.uniform(0.5, 1.5), &Dsk[d]);
    }
    for (size_t r = 0; r < BT; r++) {
        for (int d = 0; d < D; d++) {
            h_u[r * us + d] = round_bf16(rng.normal(), &u[r * D + d]);
            h_dt[r * dts + d] = round_bf16(rng.uniform(-0.7, 0.7), &dt[r * D + d]);
            h_z[r * zs + z_off + d] = round_bf16(rng.normal(), &z[r * D + d]);
            h_dy[r * D + d] = round_bf16(rng.normal(), &dy[r * D + d]);
        }
        for (int n = 0; n < N; n++) {
            h_bc[r * bcs + R + n] = round_bf16(rng.normal(), &Bm[r * N + n]);
            h_bc[r * bcs + R + N + n] = round_bf16(rng.normal(), &Cm[r * N + n]);
        }
    }
    const size_t npg = (size_t)D * N + 2 * D;
    std::vector<float> g0(npg);
    for (auto& v : g0) v = (float)rng.normal();

    // reference
    std::vector<double> ry(BT * D), rdu(BT * D), rddt(BT * D), rdz(BT * D), rdB(BT * N), rdC(BT * N);
    std::vector<double> rdA((size_t)D * N, 0.0), rdD(D, 0.0), rdbias(D, 0.0);
    ref::selective_scan_forward(ry.data(), u.data(), dt.data(), z.data(), Bm.data(), Cm.data(), dt_bias.data(),
                                A_log.data(), Dsk.data(), B, T, D, N);
    ref::selective_scan_backward(rdu.data(), rddt.data(), rdz.data(), rdB.data(), rdC.data(), rdA.data(), rdD.data(),
                                 rdbias.data(), dy.data(), u.data(), dt.data(), z.data(), Bm.data(), Cm.data(),
                                 dt_bias.data(), A_log.data(), Dsk.data(), B, T, D, N);

    // device
    const ScanShape sh{B, T, D, N};
    bf16 *d_u = to_device(h_u), *d_dt = to_device(h_dt), *d_z = to_device(h_z), *d_bc = to_device(h_bc);
    bf16 *d_dy = to_device(h_dy), *d_bias = to_device(h_bias), *d_alog = to_device(h_alog), *d_D = to_device(h_D);
    bf16* d_y = cuda_malloc_n<bf16>(BT * D, "y");
    bf16* d_du = cuda_malloc_n<bf16>(BT * dus, "du");
    bf16* d_ddt = cuda_malloc_n<bf16>(BT * dts, "ddt");
    bf16* d_zg = cuda_malloc_n<bf16>(BT * zs, "dz rows");
    bf16* d_bcg = cuda_malloc_n<bf16>(BT * bcs, "dbc rows");
    float* d_pg = cuda_malloc_n<float>(npg, "param grads");
    void* saved = cuda_malloc(scan_saved_bytes(sh), "saved");
    void* scratch = cuda_malloc(scan_scratch_bytes(sh), "scratch");

    auto run = [&]() {
        Outputs o;
        poison(d_y, BT * D);
        poison(d_du, BT * dus);
        poison(d_ddt, BT * dts);
        poison(d_zg, BT * zs);
        poison(d_bcg, BT * bcs);
        cudaCheck(cudaMemcpy(d_pg, g0.data(), npg * sizeof(float), cudaMemcpyHostToDevice));
        poison_bytes(saved, scan_saved_bytes(sh));
        poison_bytes(scratch, scan_scratch_bytes(sh));
        selective_scan_forward(d_y, saved, d_u, us, d_dt, dts, d_z + z_off, zs, d_bc + R, d_bc + R + N, bcs, d_bias,
                               d_alog, d_D, sh, 0);
        selective_scan_backward(d_du, dus, d_ddt, dts, d_zg + z_off, zs, d_bcg + R, d_bcg + R + N, bcs, d_pg,
                                d_pg + (size_t)D * N, d_pg + (size_t)D * N + D, scratch, d_dy, d_u, us, d_dt, dts,
                                d_z + z_off, zs, d_bc + R, d_bc + R + N, bcs, d_bias, d_alog, d_D, saved, sh, 0);
        cudaCheck(cudaDeviceSynchronize());
        o.y = to_host(d_y, BT * D);
        o.du = to_host(d_du, BT * dus);
        o.ddt = to_host(d_ddt, BT * dts);
        o.zbuf = to_host(d_zg, BT * zs);
        o.bcbuf = to_host(d_bcg, BT * bcs);
        o.pg = to_host(d_pg, npg);
        return o;
    };
    Outputs o1 = run();

    // the columns around the strided outputs are not written
    CHECK(nan_outside(o1.du, BT, dus, 0, D));
    CHECK(nan_outside(o1.ddt, BT, dts, 0, D));
    CHECK(nan_outside(o1.zbuf, BT, zs, z_off, D));
    CHECK(nan_outside(o1.bcbuf, BT, bcs, R, 2 * N));
    check_close("y", columns(o1.y, BT, D, 0, D), ry, kTolBf16);
    check_close("du", columns(o1.du, BT, dus, 0, D), rdu, kTolBf16);
    check_close("ddt_raw", columns(o1.ddt, BT, dts, 0, D), rddt, kTolBf16);
    check_close("dz", columns(o1.zbuf, BT, zs, z_off, D), rdz, kTolBf16);
    check_close("dB", columns(o1.bcbuf, BT, bcs, R, N), rdB, kTolBf16);
    check_close("dC", columns(o1.bcbuf, BT, bcs, R + N, N), rdC, kTolBf16);
    // fp32 sums, compared after subtracting the fp32 starting value (which costs ~1e-7 absolute)
    const size_t DN = (size_t)D * N;
    check_close("dA_log", added(o1.pg, g0, 0, DN), rdA, kTolFp32);
    check_close("dDskip", added(o1.pg, g0, DN, D), rdD, kTolFp32);
    check_close("ddt_bias", added(o1.pg, g0, DN + D, D), rdbias, kTolFp32);

    // determinism: the same inputs give the same bits
    Outputs o2 = run();
    CHECK(same_bits(o1.y, o2.y));
    CHECK(same_bits(o1.du, o2.du));
    CHECK(same_bits(o1.ddt, o2.ddt));
    CHECK(same_bits(o1.zbuf, o2.zbuf));
    CHECK(same_bits(o1.bcbuf, o2.bcbuf));
    CHECK(same_bits(o1.pg, o2.pg));

    cuda_free_all({d_u, d_dt, d_z, d_bc, d_dy, d_bias, d_alog, d_D, d_y, d_du, d_ddt, d_zg, d_bcg, d_pg, saved,
                   scratch});
}

TEST_CASE("selective scan vs sequential reference, N = 16/64/128", "[gpu][scan]") {
    check_scan(2, 77, 40, 16, 1);
    check_scan(1, 300, 130, 128, 2);
    check_scan(3, 129, 64, 64, 3);
    check_scan(1, 1, 8, 16, 4);
}

TEST_CASE("selective scan, generic N", "[gpu][scan]") {
    check_scan(2, 70, 33, 1, 5);    // N=1
    check_scan(1, 65, 21, 5, 6);    // N=5: 2 lanes per channel, padded states
    check_scan(2, 50, 17, 30, 7);   // N=30: 8 lanes per channel
    check_scan(1, 40, 9, 200, 8);   // N=200: 8 states per thread, 128-thread blocks
}

TEST_CASE("selective scan backward in several slabs", "[gpu][scan]") {
    // a tiny partial budget: one chunk per slab, the dh carry and parameter partials pass between slabs
    const size_t saved_budget = scan::partial_budget;
    scan::partial_budget = 1;
    REQUIRE(scan::slab_chunks(ScanShape{2, 300, 70, 16}) == 1);
    check_scan(2, 300, 70, 16, 9);
    check_scan(1, 200, 40, 128, 10);
    scan::partial_budget = saved_budget;
}

TEST_CASE("selective scan rejects unsupported shapes", "[gpu][scan]") {
    auto fwd = [](ScanShape sh) {
        selective_scan_forward(nullptr, nullptr, nullptr, 0, nullptr, 0, nullptr, 0, nullptr, nullptr, 0, nullptr,
                               nullptr, nullptr, sh, 0);
    };
    REQUIRE_THROWS(fwd(ScanShape{1, 64, 16, 0}));
    REQUIRE_THROWS(fwd(ScanShape{1, 64, 16, 257}));
    REQUIRE_THROWS(fwd(ScanShape{1, 0, 16, 16}));
}
