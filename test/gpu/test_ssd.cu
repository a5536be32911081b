// ssd.cuh (SSD scan, forward and backward) against the sequential double-precision recurrence of
// test/ref/ssd.h: y and every gradient, on shapes with partial last steps and chunks, several (H, G),
// P/N/chunk variants and strided inputs embedded in a wider row with NaN in the gaps (as the model's fused
// xBC and in_proj outputs are). With document boundaries (pos) the reference runs each document as a
// sequence of its own, the outputs are stitched and the parameter gradients summed over the documents.
// Then the whole forward and backward run again and must repeat bit for bit.
#include <catch2/catch.hpp>
#include "test/gpu_util.h"
#include <cmath>
#include <initializer_list>
#include <random>
#include <vector>
#include "ssd.cuh"
#include "test/ref/ssd.h"

namespace gpu_test_ssd {  // this file's helpers: all test files link into one binary (same-named types would clash)

// Inputs are bf16 (the reference gets the same rounded values in double); the kernels round
// matmul operands (decayed scores, scaled x, states) to bf16 with fp32 accumulation, so the
// relative L2 error sits near 2^-9 = 2e-3. A wrong index or a missing term gives errors of order 1.
static const double kTol = 1e-2;

struct Outputs {
    std::vector<bf16> y, xbc_grad, ddt;  // y (BT, HP); dx|dB|dC rows (strided); ddt rows (strided)
    std::vector<float> pg;               // accumulated parameter gradients: ddt_bias (H) | dA_log (H) | dD (H)
};

// positions in documents for B rows of T tokens: a document starts at t = 0, at every t in `starts` (< T)
// and elsewhere with probability p
static std::vector<int> make_pos(int B, int T, double p, std::initializer_list<int> starts, Rng& rng) {
    std::vector<int> pos((size_t)B * T);
    for (int b = 0; b < B; b++) {
        int run = 0;
        for (int t = 0; t < T; t++) {
            bool start = t == 0 || rng.uniform(0.0, 1.0) < p;
            for (int s : starts) start = start || s == t;
            if (start) run = 0;
            pos[(size_t)b * T + t] = run++;
        }
    }
    return pos;
}

struct RefResult {
    std::vector<double> y, dx, dB, dC, ddt, dbias, dalog, dD;
};

// the sequential reference over each document of each row (pos empty: one document per row)
static RefResult reference(const std::vector<double>& x, const std::vector<double>& Bm, const std::vector<double>& Cm,
                           const std::vector<double>& dt, const std::vector<double>& dy, const std::vector<double>& bias,
                           const std::vector<double>& alog, const std::vector<double>& D, const std::vector<int>& pos,
                           int B, int T, int H, int P, int G, int N) {
    const int HP = H * P, GN = G * N;
    RefResult r;
    r.y.resize(x.size());
    r.dx.resize(x.size());
    r.dB.resize(Bm.size());
    r.dC.resize(Cm.size());
    r.ddt.resize(dt.size());
    r.dbias.assign(H, 0.0);
    r.dalog.assign(H, 0.0);
    r.dD.assign(H, 0.0);
    for (int b = 0; b < B; b++) {
        for (int t0 = 0; t0 < T;) {
            int t1 = t0 + 1;
            while (t1 < T && !(pos.size() && pos[(size_t)b * T + t1] == 0)) t1++;
            const size_t r0 = (size_t)b * T + t0;
            const int L = t1 - t0;
            auto slice = [&](const std::vector<double>& v, int w) {
                return std::vector<double>(v.begin() + r0 * w, v.begin() + (r0 + L) * w);
            };
            std::vector<double> xs = slice(x, HP), bs = slice(Bm, GN), cs = slice(Cm, GN), ds = slice(dt, H),
                                dys = slice(dy, HP);
            std::vector<double> ys(xs.size()), dxs(xs.size()), dbs(bs.size()), dcs(cs.size()), ddts(ds.size());
            ref::ssd_forward(ys.data(), xs.data(), bs.data(), cs.data(), ds.data(), bias.data(), alog.data(), D.data(),
                             1, L, H, P, G, N);
            ref::ssd_backward(dxs.data(), dbs.data(), dcs.data(), ddts.data(), r.dbias.data(), r.dalog.data(),
                              r.dD.data(), dys.data(), xs.data(), bs.data(), cs.data(), ds.data(), bias.data(),
                              alog.data(), D.data(), 1, L, H, P, G, N);
            std::copy(ys.begin(), ys.end(), r.y.begin() + r0 * HP);
            std::copy(dxs.begin(), dxs.end(), r.dx.begin() + r0 * HP);
            std::copy(dbs.begin(), dbs.end(), r.dB.begin() + r0 * GN);
            std::copy(dcs.begin(), dcs.end(), r.dC.begin() + r0 * GN);
            std::copy(ddts.begin(), ddts.end(), r.ddt.begin() + r0 * H);
            t0 = t1;
        }
    }
    return r;
}

// pos empty: no document boundaries (the kernels get pos = nullptr)
// mma_sync: the forward and the backward's tile kernels on mma.sync (sm_90a builds run wgmma for P = 64)
// segments > 0, whole >= 0: the forward's plan forced (ssd_forward); whole >= 0 must split the other rows
static void check_ssd(int B, int T, int H, int G, int P, int N, int chunk, uint64_t seed,
                      const std::vector<int>& pos = {}, bool mma_sync = false, int segments = 0, int whole = -1) {
    const ssd::ForwardPlan plan = ssd_forward_plan(SSDShape{B, T, H, P, G, N, chunk}, mma_sync, segments, whole);
    const int nseg = ssd::forward_segments(SSDShape{B, T, H, P, G, N, chunk}, plan);
    INFO("B=" << B << " T=" << T << " H=" << H << " G=" << G << " P=" << P << " N=" << N << " chunk=" << chunk
              << (pos.empty() ? "" : " with documents") << (mma_sync ? " (mma.sync forward and tile kernels)" : "") << " plan: "
              << plan.whole << " rows whole, " << B * H - plan.whole << " in " << nseg << " segments");
    if (whole >= 0) {
        REQUIRE(plan.whole == whole);
        REQUIRE(nseg > 1);
    }
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

    const RefResult ref = reference(x, Bm, Cm, dt, dy, dt_bias, A_log, D, pos, B, T, H, P, G, N);

    // device
    const SSDShape sh{B, T, H, P, G, N, chunk};
    bf16* d_xbc = to_device(h_xbc);
    bf16* d_dt = to_device(h_dt);
    bf16* d_dy = to_device(h_dy);
    bf16* d_bias = to_device(h_bias);
    bf16* d_alog = to_device(h_alog);
    bf16* d_D = to_device(h_D);
    int* d_pos = pos.empty() ? nullptr : to_device(pos);
    bf16* d_y = cuda_malloc_n<bf16>(BT * HP, "y");
    bf16* d_grad = cuda_malloc_n<bf16>(BT * row, "dxbc");
    bf16* d_ddt = cuda_malloc_n<bf16>(BT * dt_stride, "ddt");
    float* d_pg = cuda_malloc_n<float>(3 * H, "param grads");
    void* saved = cuda_malloc(ssd_saved_bytes(sh), "saved");
    const size_t scratch_bytes = ssd_scratch_bytes(sh);
    void* scratch = cuda_malloc(scratch_bytes, "scratch");

    // x, B, C: column slices of one xBC row, as in the model
    const SSDInputs in{d_xbc, d_xbc + HP, d_xbc + HP + GN, d_dt, row, row, dt_stride, d_bias, d_alog, d_D, d_pos};
    const SSDGrads gr{d_grad, d_grad + HP, d_grad + HP + GN, d_ddt, row, row, dt_stride, d_pg, d_pg + H, d_pg + 2 * H};

    auto run = [&](int tile_group) {
        Outputs o;
        poison(d_y, BT * HP);
        poison(d_grad, BT * row);
        poison(d_ddt, BT * dt_stride);
        cudaCheck(cudaMemcpy(d_pg, g0.data(), 3 * H * sizeof(float), cudaMemcpyHostToDevice));
        poison_bytes(scratch, scratch_bytes);
        poison_bytes(saved, ssd_saved_bytes(sh));
        ssd_forward(d_y, saved, scratch, in, sh, 0, segments, mma_sync, whole);
        poison_bytes(scratch, scratch_bytes);  // the backward must not rely on the forward's scratch
        ssd_backward(gr, scratch, d_dy, in, saved, sh, 0, tile_group, mma_sync);
        cudaCheck(cudaDeviceSynchronize());
        o.y = to_host(d_y, BT * HP);
        o.xbc_grad = to_host(d_grad, BT * row);
        o.ddt = to_host(d_ddt, BT * dt_stride);
        o.pg = to_host(d_pg, 3 * H);
        return o;
    };
    Outputs o1 = run(0);

    // the gaps of the strided outputs are not written
    REQUIRE(nan_outside(o1.xbc_grad, BT, row, 0, HP + 2 * GN));
    REQUIRE(nan_outside(o1.ddt, BT, dt_stride, 0, H));
    check_close("y", columns(o1.y, BT, HP, 0, HP), ref.y, kTol);
    check_close("dx", columns(o1.xbc_grad, BT, row, 0, HP), ref.dx, kTol);
    check_close("dB", columns(o1.xbc_grad, BT, row, HP, GN), ref.dB, kTol);
    check_close("dC", columns(o1.xbc_grad, BT, row, HP + GN, GN), ref.dC, kTol);
    check_close("ddt_raw", columns(o1.ddt, BT, dt_stride, 0, H), ref.ddt, kTol);
    check_close("ddt_bias", added(o1.pg, g0, 0, H), ref.dbias, kTol);
    check_close("dA_log", added(o1.pg, g0, H, H), ref.dalog, kTol);
    check_close("dD", added(o1.pg, g0, 2 * H, H), ref.dD, kTol);

    // determinism: the same inputs give the same bits, in whatever groups the backward deals its tile blocks
    // (one (b, chunk) pair a group, half of them, all of them; 0 is the default)
    const int pairs = B * ssd::nchunks(sh);
    for (int group : {0, 1, (pairs + 1) / 2, pairs}) {
        INFO("backward tile group " << group << " of " << pairs << " pairs");
        Outputs o2 = run(group);
        CHECK(same_bits(o1.y, o2.y));
        CHECK(same_bits(o1.xbc_grad, o2.xbc_grad));
        CHECK(same_bits(o1.ddt, o2.ddt));
        CHECK(same_bits(o1.pg, o2.pg));
    }

    cuda_free_all({d_xbc, d_dt, d_dy, d_bias, d_alog, d_D, d_y, d_grad, d_ddt, d_pg, saved, scratch});
    if (d_pos) cudaCheck(cudaFree(d_pos));
}

TEST_CASE("ssd forward/backward vs sequential reference, partial chunks", "[gpu][ssd]") {
    // T = 1 with one head per group: dB/dC of a single position are one product per head, and a sum over
    // heads of such products can cancel far below bf16 resolution (seed 1 with G = 1: 30x, rel error 7e-2)
    check_ssd(1, 1, 4, 4, 64, 64, 64, 1);
    check_ssd(3, 37, 4, 1, 64, 128, 256, 2);
    check_ssd(1, 255, 8, 2, 64, 128, 128, 3);
    check_ssd(3, 257, 6, 3, 64, 64, 256, 4);
    check_ssd(1, 600, 8, 2, 64, 128, 256, 5);
    // 3 heads a group: the chunk-states kernel takes one head a block (2 where a group's heads pair up)
    check_ssd(2, 300, 6, 2, 64, 128, 128, 18);
}

TEST_CASE("ssd small heads and chunks", "[gpu][ssd]") {
    check_ssd(3, 200, 6, 3, 32, 64, 64, 6);
    check_ssd(1, 300, 4, 2, 32, 128, 128, 7);
    check_ssd(2, 129, 8, 1, 64, 64, 64, 8);
}

TEST_CASE("ssd many heads per group (head slices of several heads)", "[gpu][ssd]") {
    // 16 heads in one group over 128 tiles: the backward loops over 4 heads per block and
    // reduces 4 dB/dC slice partials (see ssd::head_slices)
    const SSDShape sh{2, 4000, 16, 64, 1, 64, 256};
    REQUIRE(ssd::head_slices(sh) == 4);
    check_ssd(2, 4000, 16, 1, 64, 64, 256, 9);
    // 32 heads on few tiles, which no split brings to ssd::BWD_TILE_BLOCKS: one head a slice, 32 slice partials
    REQUIRE(ssd::head_slices(SSDShape{1, 100, 32, 32, 1, 64, 64}) == 32);
    check_ssd(1, 100, 32, 1, 32, 64, 64, 10);
}

TEST_CASE("ssd document boundaries vs each document alone", "[gpu][ssd][docs]") {
    Rng rng(77);
    // random boundaries with documents shorter than a 64-row step and than a 256-row chunk; forced starts at
    // the first and last row of a step, of a chunk, and at the last position of the sequence
    check_ssd(2, 600, 4, 2, 64, 128, 256, 11, make_pos(2, 600, 1.0 / 40, {63, 64, 255, 256, 599}, rng));
    // many short documents (a few tokens each), one group of several heads
    check_ssd(2, 300, 4, 1, 32, 64, 64, 12, make_pos(2, 300, 1.0 / 5, {1, 299}, rng));
    // a few long documents spanning chunks, 16 heads in one group
    check_ssd(1, 1500, 16, 1, 64, 64, 256, 13, make_pos(1, 1500, 0.0, {300, 301, 1100}, rng));
    // a boundary at the very start of the only chunk and at the last position
    check_ssd(3, 37, 4, 1, 64, 128, 128, 14, make_pos(3, 37, 0.1, {36}, rng));
    // every token its own document: no state ever passes
    check_ssd(1, 130, 4, 2, 64, 64, 64, 15, make_pos(1, 130, 1.0, {}, rng));
    // one document per row given explicitly: the same as no boundaries
    check_ssd(2, 700, 4, 2, 32, 128, 256, 16, make_pos(2, 700, 0.0, {}, rng));
    // one head a slice (20 slices): the per-slice dB/dC and W partials with boundaries
    REQUIRE(ssd::head_slices(SSDShape{1, 520, 20, 32, 1, 64, 128}) == 20);
    check_ssd(1, 520, 20, 1, 32, 64, 128, 17, make_pos(1, 520, 0.01, {300}, rng));
    // slices of four heads (4 of the 16) with boundaries: W summed over a slice's heads
    REQUIRE(ssd::head_slices(SSDShape{2, 4000, 16, 64, 1, 64, 256}) == 4);
    check_ssd(2, 4000, 16, 1, 64, 64, 256, 32, make_pos(2, 4000, 1.0 / 300, {255, 256, 3999}, rng));
    // odd heads a group (one head a chunk-states block), boundaries across chunks
    check_ssd(1, 600, 6, 2, 64, 128, 256, 19, make_pos(1, 600, 1.0 / 100, {256}, rng));
}

TEST_CASE("ssd forward on the mma.sync kernel at P = 64 (what other GPUs run)", "[gpu][ssd]") {
    Rng rng(78);
    check_ssd(3, 257, 6, 3, 64, 64, 256, 18, {}, true);
    check_ssd(2, 600, 4, 2, 64, 128, 256, 19, make_pos(2, 600, 1.0 / 40, {63, 64, 255, 256, 599}, rng), true);
}

TEST_CASE("ssd forward in segments (what few (b, h) blocks on a large GPU run)", "[gpu][ssd]") {
    // segments of whole 256-row chunks: 2 of 2 chunks; 3 of 2 chunks, the last one partial; 6 of a chunk each
    // (the fix-up then chains 5 states); on both forward kernels. Heads whose decay carries the state over
    // thousands of rows (see the dt and A_log ranges above) make the fix-up's term count
    Rng rng(79);
    for (bool mma_sync : {false, true}) {
        check_ssd(2, 1024, 4, 2, 64, 128, 256, 20, {}, mma_sync, 2);
        check_ssd(1, 1300, 6, 3, 64, 64, 128, 21, {}, mma_sync, 3);
        check_ssd(1, 1500, 16, 1, 64, 64, 256, 22, make_pos(1, 1500, 0.0, {300, 512, 1100}, rng), mma_sync, 6);
    }
    check_ssd(2, 900, 4, 1, 32, 128, 256, 23, {}, false, 4);  // P = 32 (the mma.sync kernel everywhere)
    // documents: starting a segment (t = 512, 768), ending one (t = 767), many short ones, every token its own
    check_ssd(2, 1200, 4, 2, 64, 128, 256, 24, make_pos(2, 1200, 1.0 / 300, {512, 767, 768}, rng), false, 5);
    check_ssd(1, 800, 4, 2, 32, 64, 64, 25, make_pos(1, 800, 1.0 / 5, {}, rng), false, 4);
    check_ssd(1, 600, 4, 2, 64, 64, 64, 26, make_pos(1, 600, 1.0, {}, rng), false, 3);
    // few (b, h) over long sequences: the GPU's own choice runs in segments
    const SSDShape few{1, 4096, 4, 64, 1, 128, 256};
    REQUIRE(ssd::forward_segments(few, ssd_forward_plan(few)) > 1);
    check_ssd(1, 4096, 4, 1, 64, 128, 256, 27);
}

TEST_CASE("ssd forward with some rows whole and the rest in segments", "[gpu][ssd]") {
    // what a last partial wave of (b, h) rows runs: rows b H + h below `whole` down the whole sequence, the others
    // in segments (segment-major blocks, states and fix-up offset by `whole`). 6 rows: 4 whole and b 1's heads 1, 2
    // in 3 segments of 2 chunks, the last partial; then 1 whole, the split rows spanning both sequences
    Rng rng(80);
    const SSDShape sh{2, 1300, 3, 64, 3, 128, 256};
    const ssd::ForwardPlan plan = ssd_forward_plan(sh, false, 3, 4);
    REQUIRE(ssd::forward_split_rows(sh, plan) == 2);
    REQUIRE(ssd::forward_segments(sh, plan) == 3);
    REQUIRE(ssd::forward_segment_state_elems(sh, plan) == (size_t)2 * 2 * 64 * 128);
    for (bool mma_sync : {false, true}) {
        check_ssd(2, 1300, 3, 3, 64, 128, 256, 28, {}, mma_sync, 3, 4);
        // documents starting at a segment's last row (t = 511: the state entering that segment does not pass it)
        // and at segments' first rows (t = 512, 1024)
        check_ssd(2, 1300, 3, 1, 64, 64, 128, 29, make_pos(2, 1300, 1.0 / 300, {511, 512, 1024}, rng), mma_sync,
                  3, 4);
        check_ssd(2, 1300, 3, 3, 64, 128, 256, 30, {}, mma_sync, 2, 1);
    }
    check_ssd(2, 1000, 3, 1, 32, 64, 64, 31, make_pos(2, 1000, 1.0 / 100, {256, 767}, rng), false, 4, 1);  // P = 32
}

TEST_CASE("ssd rejects unsupported shapes", "[gpu][ssd]") {
    auto fwd = [](SSDShape sh) { ssd_forward(nullptr, nullptr, nullptr, SSDInputs{}, sh, 0); };
    REQUIRE_THROWS(fwd(SSDShape{1, 64, 4, 48, 1, 64, 256}));   // P
    REQUIRE_THROWS(fwd(SSDShape{1, 64, 4, 64, 1, 96, 256}));   // N
    REQUIRE_THROWS(fwd(SSDShape{1, 64, 4, 64, 1, 64, 100}));   // chunk
    REQUIRE_THROWS(fwd(SSDShape{1, 64, 6, 64, 4, 64, 256}));   // H % G
}

}  // namespace gpu_test_ssd
