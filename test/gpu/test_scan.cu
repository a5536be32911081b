// scan.cuh (Mamba-1 selective scan, forward and backward) against the sequential double-precision
// recurrence of test/ref/scan.h, run document by document (each document as its own sequence: outputs
// stitched, parameter gradients summed; without document boundaries each row is one document): y and every
// gradient, on odd shapes (T not a multiple of the tile or the chunk, D not a multiple of the block, every
// N configuration), with the model's strided layouts: u in rows of its own stride, z a column slice of a
// wider row, B and C column slices of the x_proj row; the gradient outputs strided too (du with a stride
// different from u), gaps poisoned with NaN and checked untouched. Parameter gradients accumulate into
// random starting values. Then everything runs again and must repeat bit for bit.
#include <catch2/catch.hpp>
#include "test/gpu_util.h"
#include <cmath>
#include <random>
#include <vector>
#include "scan.cuh"
#include "test/ref/scan.h"

namespace gpu_test_scan {  // this file's helpers: all test files link into one binary (same-named types would clash)

// bf16 inputs (the reference gets the same rounded values); bf16 outputs round to 2^-9 relative
static const double kTolBf16 = 2e-2;
static const double kTolFp32 = 5e-3;

struct Outputs {
    std::vector<bf16> y, du, ddt, zbuf, bcbuf;  // zbuf: [x | dz | gap] rows; bcbuf: [dt | dB | dC | gap] rows
    std::vector<float> pg;                      // ddt_bias (D) | dA_log (D*N) | dD (D)
};

// Document starts: none (pos = nullptr, one document a row) or random ones. With documents, each row mixes
// lengths below the conv width and a tile (1-6 steps), below a chunk (7-40) and across chunks (65-130); row
// 0 ends with a one-step document (a start at the last position), row 1 begins inside a document (pos 7).
static std::vector<int> make_pos(int B, int T, Rng& rng) {
    std::vector<int> pos((size_t)B * T);
    for (int b = 0; b < B; b++) {
        int p = b == 1 ? 7 : 0, left = 0;
        for (int t = 0; t < T; t++) {
            if (t > 0 && (left == 0 || (b == 0 && t == T - 1))) p = 0;
            if (p == 0 || (t == 0 && b == 1)) {
                const double kind = rng.uniform(0, 1);
                left = kind < 0.5 ? (int)rng.uniform(1, 7) : kind < 0.8 ? (int)rng.uniform(7, 41) : (int)rng.uniform(65, 131);
            }
            pos[(size_t)b * T + t] = p++;
            left--;
        }
    }
    return pos;
}

// The reference on documents [s, e) of each row (s = 0 or pos[s] == 0), each run as its own sequence.
struct RefIO {
    const std::vector<double> &u, &dt, &z, &Bm, &Cm, &dy, &dt_bias, &A_log, &Dsk;
    std::vector<double> y, du, ddt, dz, dB, dC, dA, dD, dbias;
};
static void reference_by_documents(RefIO& r, const std::vector<int>* pos, int B, int T, int D, int N) {
    const size_t BT = (size_t)B * T;
    r.y.assign(BT * D, 0.0), r.du.assign(BT * D, 0.0), r.ddt.assign(BT * D, 0.0), r.dz.assign(BT * D, 0.0);
    r.dB.assign(BT * N, 0.0), r.dC.assign(BT * N, 0.0);
    r.dA.assign((size_t)D * N, 0.0), r.dD.assign(D, 0.0), r.dbias.assign(D, 0.0);
    for (int b = 0; b < B; b++) {
        for (int s = 0; s < T;) {
            int e = s + 1;
            while (e < T && !(pos && (*pos)[(size_t)b * T + e] == 0)) e++;
            const int L = e - s;
            const size_t r0 = (size_t)b * T + s;
            auto cut = [&](const std::vector<double>& v, int w) {
                return std::vector<double>(v.begin() + r0 * w, v.begin() + (r0 + L) * w);
            };
            auto u = cut(r.u, D), dt = cut(r.dt, D), z = cut(r.z, D), Bm = cut(r.Bm, N), Cm = cut(r.Cm, N), dy = cut(r.dy, D);
            std::vector<double> y((size_t)L * D), du((size_t)L * D), ddt((size_t)L * D), dz((size_t)L * D),
                dB((size_t)L * N), dC((size_t)L * N);
            ref::selective_scan_forward(y.data(), u.data(), dt.data(), z.data(), Bm.data(), Cm.data(), r.dt_bias.data(),
                                        r.A_log.data(), r.Dsk.data(), 1, L, D, N);
            ref::selective_scan_backward(du.data(), ddt.data(), dz.data(), dB.data(), dC.data(), r.dA.data(), r.dD.data(),
                                         r.dbias.data(), dy.data(), u.data(), dt.data(), z.data(), Bm.data(), Cm.data(),
                                         r.dt_bias.data(), r.A_log.data(), r.Dsk.data(), 1, L, D, N);
            std::copy(y.begin(), y.end(), r.y.begin() + r0 * D);
            std::copy(du.begin(), du.end(), r.du.begin() + r0 * D);
            std::copy(ddt.begin(), ddt.end(), r.ddt.begin() + r0 * D);
            std::copy(dz.begin(), dz.end(), r.dz.begin() + r0 * D);
            std::copy(dB.begin(), dB.end(), r.dB.begin() + r0 * N);
            std::copy(dC.begin(), dC.end(), r.dC.begin() + r0 * N);
            s = e;
        }
    }
}

static void check_scan(int B, int T, int D, int N, uint64_t seed, bool docs = false) {
    INFO("B=" << B << " T=" << T << " D=" << D << " N=" << N << (docs ? " with documents" : ""));
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
    const std::vector<int> pos = docs ? make_pos(B, T, rng) : std::vector<int>();
    const size_t DN = (size_t)D * N, npg = DN + 2 * D;
    std::vector<float> g0(npg);
    for (auto& v : g0) v = (float)rng.normal();

    RefIO ref{u, dt, z, Bm, Cm, dy, dt_bias, A_log, Dsk, {}, {}, {}, {}, {}, {}, {}, {}, {}};
    reference_by_documents(ref, docs ? &pos : nullptr, B, T, D, N);

    // device
    const ScanShape sh{B, T, D, N};
    bf16 *d_u = to_device(h_u), *d_dt = to_device(h_dt), *d_z = to_device(h_z), *d_bc = to_device(h_bc);
    bf16 *d_dy = to_device(h_dy), *d_bias = to_device(h_bias), *d_alog = to_device(h_alog), *d_D = to_device(h_D);
    int* d_pos = docs ? to_device(pos) : nullptr;
    bf16* d_y = cuda_malloc_n<bf16>(BT * D, "y");
    bf16* d_du = cuda_malloc_n<bf16>(BT * dus, "du");
    bf16* d_ddt = cuda_malloc_n<bf16>(BT * dts, "ddt");
    bf16* d_zg = cuda_malloc_n<bf16>(BT * zs, "dz rows");
    bf16* d_bcg = cuda_malloc_n<bf16>(BT * bcs, "dbc rows");
    float* d_pg = cuda_malloc_n<float>(npg, "param grads");
    void* saved = cuda_malloc(scan_saved_bytes(sh), "saved");
    void* scratch = cuda_malloc(scan_scratch_bytes(sh), "scratch");
    const ScanInputs in{d_u, us, d_dt, dts, d_z + z_off, zs, d_bc + R, d_bc + R + N, bcs, d_bias, d_alog, d_D, d_pos};
    const ScanGrads grads{d_du, d_ddt, d_zg + z_off, d_bcg + R, d_bcg + R + N, dus, dts, zs, bcs,
                          d_pg, d_pg + D, d_pg + D + DN};

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
        selective_scan_forward(d_y, saved, in, sh, 0);
        selective_scan_backward(grads, scratch, d_dy, in, saved, sh, 0);
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
    check_close("y", columns(o1.y, BT, D, 0, D), ref.y, kTolBf16);
    check_close("du", columns(o1.du, BT, dus, 0, D), ref.du, kTolBf16);
    check_close("ddt_raw", columns(o1.ddt, BT, dts, 0, D), ref.ddt, kTolBf16);
    check_close("dz", columns(o1.zbuf, BT, zs, z_off, D), ref.dz, kTolBf16);
    check_close("dB", columns(o1.bcbuf, BT, bcs, R, N), ref.dB, kTolBf16);
    check_close("dC", columns(o1.bcbuf, BT, bcs, R + N, N), ref.dC, kTolBf16);
    // fp32 sums, compared after subtracting the fp32 starting value (which costs ~1e-7 absolute)
    check_close("ddt_bias", added(o1.pg, g0, 0, D), ref.dbias, kTolFp32);
    check_close("dA_log", added(o1.pg, g0, D, DN), ref.dA, kTolFp32);
    check_close("dDskip", added(o1.pg, g0, D + DN, D), ref.dD, kTolFp32);

    // determinism: the same inputs give the same bits
    Outputs o2 = run();
    CHECK(same_bits(o1.y, o2.y));
    CHECK(same_bits(o1.du, o2.du));
    CHECK(same_bits(o1.ddt, o2.ddt));
    CHECK(same_bits(o1.zbuf, o2.zbuf));
    CHECK(same_bits(o1.bcbuf, o2.bcbuf));
    CHECK(same_bits(o1.pg, o2.pg));

    cuda_free_all({d_u, d_dt, d_z, d_bc, d_dy, d_bias, d_alog, d_D, d_pos, d_y, d_du, d_ddt, d_zg, d_bcg, d_pg, saved,
                   scratch});
}

TEST_CASE("selective scan vs sequential reference, N = 16/64/128", "[gpu][scan]") {
    check_scan(2, 77, 40, 16, 1);
    check_scan(1, 300, 130, 128, 2);
    check_scan(3, 129, 64, 64, 3);
    check_scan(1, 1, 8, 16, 4);
}

TEST_CASE("selective scan, generic N", "[gpu][scan]") {
    check_scan(2, 70, 33, 1, 5);    // N=1: padded to the 8-state layout
    check_scan(1, 65, 21, 5, 6);    // N=5
    check_scan(2, 50, 17, 30, 7);   // N=30: 8 lanes a channel group
    check_scan(1, 40, 9, 200, 8);   // N=200: 8 states and one channel a thread
}

TEST_CASE("selective scan backward in several slabs", "[gpu][scan]") {
    // a tiny partial budget: one chunk per slab, the dh carry and parameter partials pass between slabs
    const size_t budget = scan::partial_budget;
    {
        scan::ScopedPartialBudget tiny(1);
        REQUIRE(scan::slab_chunks(ScanShape{2, 300, 70, 16}, 2) == 1);
        check_scan(2, 300, 70, 16, 9);
        check_scan(1, 200, 40, 128, 10);
        check_scan(2, 200, 50, 16, 11, true);
    }
    CHECK(scan::partial_budget == budget);
}

TEST_CASE("selective scan with document boundaries vs each document alone", "[gpu][scan]") {
    check_scan(3, 150, 40, 16, 12, true);
    check_scan(2, 270, 20, 128, 13, true);
    check_scan(2, 97, 21, 5, 14, true);
    check_scan(1, 130, 9, 200, 15, true);
    check_scan(2, 1, 8, 16, 16, true);   // one-step rows
}

TEST_CASE("selective scan rejects unsupported shapes", "[gpu][scan]") {
    auto fwd = [](ScanShape sh) {
        selective_scan_forward(nullptr, nullptr, ScanInputs{}, sh, 0);
    };
    REQUIRE_THROWS(fwd(ScanShape{1, 64, 16, 0}));
    REQUIRE_THROWS(fwd(ScanShape{1, 64, 16, 257}));
    REQUIRE_THROWS(fwd(ScanShape{1, 0, 16, 16}));
}

}  // namespace gpu_test_scan
