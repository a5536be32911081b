// Learning-rate schedules (host only): exact at their breakpoints, in steps or tokens,
// and bad values rejected with their message; ZeRO-1's ranges; AdamW's work items and the
// place of each in its compact state.
#include <catch2/catch.hpp>
#include <algorithm>
#include "mamba.cuh"
#include "schedule.h"
#include "zero.h"

namespace {  // file-local: all test files link into one binary (same-named helper types would clash)

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

TEST_CASE("AdamW: work items cover its tensors in [begin, end), their state item after item", "[optim]") {
    // three tensors with gaps between them (Muon's matrices); an item holds at most ADAMW_ITEM elements
    const size_t big = ADAMW_ITEM + 904, far = 100 + big;  // the middle tensor takes two items
    const std::vector<ParamTensor> tensors = {{0, 10, false}, {30, big, true}, {far, 3, false}};
    std::vector<AdamWItem> it = adamw_items(tensors, 0, far + 3);
    REQUIRE(it.size() == 4);
    const size_t want[4][4] = {{0, 0, 10, 0}, {30, 10, ADAMW_ITEM, 1}, {30 + ADAMW_ITEM, 10 + ADAMW_ITEM, 904, 1},
                               {far, 10 + big, 3, 0}};  // start, state, count, decay
    for (int k = 0; k < 4; k++) {
        INFO("item " << k);
        CHECK(it[k].start == want[k][0]);
        CHECK(it[k].state == want[k][1]);
        CHECK(it[k].count == want[k][2]);
        CHECK(it[k].decay == want[k][3]);
    }
    // a range that cuts the tensors: only their elements inside it, the state from 0
    it = adamw_items(tensors, 5, far + 1);
    REQUIRE(it.size() == 4);
    CHECK((it[0].start == 5 && it[0].state == 0 && it[0].count == 5));
    CHECK((it[1].start == 30 && it[1].state == 5));
    CHECK((it[3].start == far && it[3].state == 5 + big && it[3].count == 1));
    CHECK(adamw_items(tensors, 10, 30).empty());  // a range of Muon matrices only
}

TEST_CASE("AdamW: compact state of a Muon + AdamW split over ZeRO-1 ranges; the memory estimate", "[optim]") {
    ModelConfig c = model_preset("hybrid-tiny");  // Mamba-2, attention and MLP blocks
    c.vocab_size = 1000;
    c.finalize();
    const ParamLayout L(c);
    std::vector<size_t> ends;
    size_t muon_total = 0;
    for (auto& t : L.tensors) {
        ends.push_back(t.offset + t.count);
        if (t.block_matrix) muon_total += t.count;
    }
    REQUIRE(muon_total > 0);
    const std::vector<ParamTensor> with_muon = adamw_tensors(L, true), alone = adamw_tensors(L, false);
    CHECK(alone.size() == L.tensors.size());
    CHECK(with_muon.size() < alone.size());
    // the tensor an element belongs to
    auto tensor_at = [&](size_t i) -> const TensorInfo& {
        for (auto& t : L.tensors) if (i >= t.offset && i < t.offset + t.count) return t;
        FAIL("element " << i << " is in no tensor");
        return L.tensors[0];
    };
    for (int world : {1, 2, 3, 8}) {
        const std::vector<size_t> b = partition_ranges(ends, L.total, world);
        size_t state_total = 0;
        for (int r = 0; r < world; r++) {
            INFO("rank " << r << " of " << world);
            const std::vector<AdamWItem> it = adamw_items(with_muon, b[r], b[r + 1]);
            size_t state = 0, in_range = 0;
            for (size_t k = 0; k < it.size(); k++) {
                const TensorInfo& t = tensor_at(it[k].start);
                REQUIRE(it[k].state == state);  // contiguous, in item order
                REQUIRE(it[k].count > 0);
                REQUIRE(it[k].count <= ADAMW_ITEM);
                REQUIRE(it[k].start >= b[r]);
                REQUIRE(it[k].start + it[k].count <= b[r + 1]);
                REQUIRE(it[k].start + it[k].count <= t.offset + t.count);  // inside one tensor
                REQUIRE(!t.block_matrix);                                  // never a Muon matrix
                REQUIRE(it[k].decay == (uint32_t)t.decay);
                if (k > 0) REQUIRE(it[k].start >= it[k - 1].start + it[k - 1].count);
                state += it[k].count;
            }
            for (auto& t : L.tensors)
                if (!t.block_matrix && t.offset >= b[r] && t.offset < b[r + 1]) in_range += t.count;
            CHECK(state == in_range);  // every AdamW element of the range, once
            state_total += state;
            // AdamW alone: the compact state is every tensor element of the range in order (the gaps between
            // tensors left out)
            const std::vector<AdamWItem> all = adamw_items(alone, b[r], b[r + 1]);
            size_t n = 0, elements = 0;
            for (auto& x : all) {
                REQUIRE(x.state == n);
                n += x.count;
            }
            for (auto& t : L.tensors) {
                const size_t lo = std::max(t.offset, b[r]), hi = std::min(t.offset + t.count, b[r + 1]);
                if (lo < hi) elements += hi - lo;
            }
            CHECK(n == elements);
        }
        CHECK(state_total + muon_total == L.elements());
    }
    // --dry-run's optimizer state: m and v over AdamW's tensors, one momentum over Muon's
    CHECK(optimizer_state_bytes(L, false) == 8 * L.elements());
    CHECK(optimizer_state_bytes(L, true) == 8 * (L.elements() - muon_total) + 4 * muon_total);
}

// bf16 round to nearest even of an fp32 bit pattern (what __float2bfloat16 does to finite values)
static uint16_t bf16_rne(uint32_t w) { return (uint16_t)((w + 0x7FFFu + ((w >> 16) & 1u)) >> 16); }

TEST_CASE("master weights: the two 16-bit halves give every fp32 pattern back; the high half is the bf16 rounding",
          "[optim]") {
    // every high half with low halves at and around the ties, and a strided sweep of all 2^32
    std::vector<uint32_t> lows = {0x0000, 0x0001, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF};
    for (uint32_t k = 0; k < 64; k++) lows.push_back((k * 0x9E37u + 0x1234u) & 0xFFFFu);
    size_t checked = 0, ties = 0, mismatched = 0, differ_from_rne = 0;
    auto check = [&](uint32_t w) {
        const uint16_t hi = master_high(w);
        const int16_t lo = master_low(w);
        mismatched += master_join(hi, lo) != w;
        const bool finite = (w & 0x7F800000u) != 0x7F800000u;
        if (finite && (w & 0xFFFFu) == 0x8000u) ties++;
        else if (finite) differ_from_rne += hi != bf16_rne(w);
        checked++;
    };
    for (uint32_t h = 0; h <= 0xFFFF; h++)
        for (uint32_t l : lows) check((h << 16) | l);
    for (uint64_t w = 0; w <= 0xFFFFFFFFull; w += 65521) check((uint32_t)w);
    CHECK(checked > 4'700'000);
    CHECK(ties > 60'000);
    CHECK(mismatched == 0);
    CHECK(differ_from_rne == 0);  // the rounding differs from round-to-even at ties only
    // a tie goes away from zero; the host round trip of floats
    CHECK(master_high(0x3F808000u) == 0x3F81);
    CHECK(master_high(0xBF808000u) == 0xBF81);
    const std::vector<float> w = {0.0f, -0.0f, 1.0f, -3.14159f, 1e-30f, -7.5e20f, 0.1234567f, 3.0e38f, 2e-38f};
    std::vector<uint16_t> hi(w.size());
    std::vector<int16_t> lo(w.size());
    std::vector<float> back(w.size(), -1.0f);
    master_split(w.data(), w.size(), hi.data(), lo.data());
    master_unsplit(hi.data(), lo.data(), w.size(), back.data());
    for (size_t i = 0; i < w.size(); i++) {
        CHECK(std::memcmp(&w[i], &back[i], 4) == 0);
        const uint32_t hbits = (uint32_t)hi[i] << 16;
        float h;
        std::memcpy(&h, &hbits, 4);
        CHECK(std::fabs(w[i] - h) <= std::fabs(w[i]) * (1.0f / 256));
    }
}

}  // namespace
