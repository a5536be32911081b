// Learning-rate schedules (host only): exact at their breakpoints, in steps or tokens,
// and bad values rejected with their message.
#include <catch2/catch.hpp>
#include <algorithm>
#include "optim.cuh"

TEST_CASE("schedules: cosine is exact at warmup end, midpoint and total", "[optim]") {
    LRSchedule s = LRSchedule::cosine(2e-3, 2e-4, 480, 10480);
    CHECK(s.at(0) == 0.0);
    CHECK(s.at(240) == Approx(1e-3));
    CHECK(s.at(480) == Approx(2e-3));
    CHECK(s.at(480 + 5000) == Approx(1.1e-3));  // half way down the cosine
    CHECK(s.at(10480) == Approx(2e-4));
    CHECK(s.at(20000) == Approx(2e-4));
    for (long t = 481; t < 10480; t += 97) CHECK(s.at(t) <= s.at(t - 1));
}

TEST_CASE("schedules: WSD by fraction and by absolute decay start, in tokens", "[optim]") {
    LRSchedule f = LRSchedule::wsd(1e-3, 1e-5, 100, 1000, 0.8, -1);
    CHECK(f.decay_start == 800);
    CHECK(f.at(100) == Approx(1e-3));
    CHECK(f.at(799) == Approx(1e-3));
    CHECK(f.at(900) == Approx((1e-3 + 1e-5) / 2));
    CHECK(f.at(1000) == Approx(1e-5));
    const long tok = 2'000'000;  // tokens per step: the schedule counts tokens
    LRSchedule a = LRSchedule::wsd(4.5e-4, 0.0, 2000 * tok, 10000 * tok, -1.0, 7000 * tok);
    CHECK(a.at(1000 * tok) == Approx(2.25e-4));
    CHECK(a.at(7000 * tok) == Approx(4.5e-4));
    CHECK(a.at(8500 * tok) == Approx(2.25e-4));
    CHECK(a.at(10000 * tok) == Approx(0.0).margin(1e-12));
    LRSchedule c = LRSchedule::constant(3e-4, 10);
    CHECK(c.at(5) == Approx(1.5e-4));
    CHECK(c.at(1000000) == Approx(3e-4));
}

TEST_CASE("schedules: bad values are rejected with their message", "[optim]") {
    CHECK_THROWS_WITH(LRSchedule::cosine(1e-3, 1e-4, 500, 100), Catch::Contains("warmup 500 is longer"));
    CHECK_THROWS_WITH(LRSchedule::cosine(-1.0, 0.0, 0, 100), Catch::Contains("must be >= 0"));
    CHECK_THROWS_WITH(LRSchedule::wsd(1e-3, 0.0, 10, 100, 1.5, -1), Catch::Contains("stable fraction"));
    CHECK_THROWS_WITH(LRSchedule::wsd(1e-3, 0.0, 10, 100, -1.0, 5), Catch::Contains("decay start 5"));
}

TEST_CASE("schedules: batch ramp-up is exact at its breakpoints, in whole micro-batches", "[optim]") {
    // Mambaoutai's ablation: 2M-token batches ramped over the first 1B tokens (micro-batch 8 x 4096)
    const long micro = 8 * 4096, target = 64 * micro, ramp_tokens = 1'000'000'000;
    BatchRamp r{4 * micro, target, ramp_tokens, micro};
    CHECK(r.at(0) == 4 * micro);
    CHECK(r.at(ramp_tokens / 2) == 34 * micro);  // half way: (4 + 64) / 2 micro-batches
    CHECK(r.at(ramp_tokens - 1) == 63 * micro);  // just below the target: rounded down
    CHECK(r.at(ramp_tokens) == target);
    CHECK(r.at(5 * ramp_tokens) == target);
    for (long t = 0; t < ramp_tokens; t += ramp_tokens / 97) {
        CHECK(r.at(t) % micro == 0);
        CHECK(r.at(t) <= r.at(t + ramp_tokens / 97));
    }
    BatchRamp tiny{1, target, ramp_tokens, micro};  // at least one micro-batch
    CHECK(tiny.at(0) == micro);
    BatchRamp off{target, target, 0, micro};
    CHECK(off.at(0) == target);
}

TEST_CASE("ZeRO-1: ranges cut at tensor boundaries, balanced, covering everything once", "[optim]") {
    // an embedding, 6 blocks of 3 tensors, a head
    std::vector<size_t> ends;
    size_t off = 0;
    auto add = [&](size_t n) { off += n; ends.push_back(off); };
    add(1000);
    for (int l = 0; l < 6; l++) { add(10); add(300); add(150); }
    add(1000);
    for (int world : {1, 2, 3, 4, 8}) {
        std::vector<size_t> b = partition_ranges(ends, off, world);
        REQUIRE(b.size() == (size_t)world + 1);
        CHECK(b.front() == 0);
        CHECK(b.back() == off);
        for (int r = 0; r < world; r++) {
            CHECK(b[r] <= b[r + 1]);
            CHECK(std::find(ends.begin(), ends.end(), b[r + 1]) != ends.end());  // a tensor boundary
        }
    }
    std::vector<size_t> two = partition_ranges(ends, off, 2);
    CHECK(two[1] == 1000 + 3 * 460);  // half of 4760 is 2380: after the third block
}
