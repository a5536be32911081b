// AdamW on the GPU against the double reference (torch.optim.AdamW semantics), with the
// gradient norm and clipping, mixed decay flags, a sub-range, bit-identical reruns, and the
// compact state of tensors with gaps between them (Muon's matrices).
#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include "optim.cuh"
#include "test/gpu_util.h"
#include "test/ref/adamw.h"

namespace gpu_test_optim {  // this file's helpers: all test files link into one binary (same-named types would clash)

TEST_CASE("AdamW: 5 steps over several tensors match the reference, clipping on and off", "[optim]") {
    std::mt19937 rng(5);
    std::normal_distribution<double> nd(0.0, 1.0);
    // the last tensor starts 16-byte aligned and takes three items: two whole ones on the
    // 4-wide path, then 6 elements on the scalar one
    const std::vector<size_t> sizes = {1, 7, 1000, 4099, 10000, 1, 2 * ADAMW_ITEM + 6};
    std::vector<ParamTensor> tensors;
    size_t total = 0;
    for (size_t i = 0; i < sizes.size(); i++) { tensors.push_back({total, sizes[i], i % 2 == 0}); total += sizes[i]; }
    for (float clip : {1.0f, 1e6f}) {  // 1.0 clips these gradients (norm ~100); 1e6 does not
        INFO("grad_clip " << clip);
        AdamWConfig cfg;
        cfg.grad_clip = clip;
        AdamW opt(tensors, 0, total, cfg);
        std::vector<float> p(total), g(total);
        for (auto& x : p) x = (float)nd(rng);
        std::vector<double> rp(p.begin(), p.end()), rm(total, 0.0), rv(total, 0.0);
        DeviceMaster dp(total);
        dp.set(p);
        float* dg = cuda_malloc_n<float>(total, "g");
        const float lr = 1e-2f;
        for (int step = 1; step <= 5; step++) {
            for (auto& x : g) x = (float)nd(rng);
            cudaCheck(cudaMemcpy(dg, g.data(), total * 4, cudaMemcpyHostToDevice));
            float* n2 = opt.grad_norm_squared(dg, total, 0);
            opt.step(dp.w, dg, n2, lr, step, 0);
            float hn2;
            cudaCheck(cudaMemcpy(&hn2, n2, 4, cudaMemcpyDeviceToHost));
            double norm = 0;
            for (float x : g) norm += (double)x * x;
            CHECK(std::fabs(hn2 - norm) < 1e-5 * norm);
            double coef = std::min(1.0, clip / (std::sqrt(norm) + 1e-6));
            std::vector<double> gc(total);
            for (size_t i = 0; i < total; i++) gc[i] = g[i] * coef;
            for (auto& t : tensors)
                ref::adamw_step(rp.data() + t.offset, rm.data() + t.offset, rv.data() + t.offset, gc.data() + t.offset,
                                t.count, lr, cfg.beta1, cfg.beta2, cfg.eps, t.decay ? cfg.weight_decay : 0.0, step);
        }
        const std::vector<float> got = dp.get();
        const std::vector<bf16> gotb = dp.compute_copy();
        double num = 0, den = 0;
        for (size_t i = 0; i < total; i++) {
            num += (got[i] - rp[i]) * (got[i] - rp[i]);
            den += rp[i] * rp[i];
            REQUIRE(__bfloat162float(gotb[i]) == master_bf16(got[i]));  // the compute copy is the rounding
        }
        CHECK(std::sqrt(num / den) < 1e-6);
        cudaFree(dg);
    }
}

TEST_CASE("AdamW: an update over [begin, end) leaves the rest alone and reruns bit for bit", "[optim]") {
    const size_t total = 20000, begin = 3000, end = 15001;
    std::vector<ParamTensor> tensors = {{0, 5000, true}, {5000, 15000, false}};
    std::vector<float> p(total), g(total);
    std::mt19937 rng(9);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (size_t i = 0; i < total; i++) { p[i] = nd(rng); g[i] = nd(rng); }
    DeviceMaster dp(total);
    float* dg = cuda_malloc_n<float>(total, "g");
    std::vector<float> results[2];
    for (int run = 0; run < 2; run++) {
        AdamW opt(tensors, begin, end, AdamWConfig{});
        dp.set(p);
        cudaCheck(cudaMemcpy(dg, g.data(), total * 4, cudaMemcpyHostToDevice));
        opt.step(dp.w, dg, opt.grad_norm_squared(dg, total, 0), 1e-3f, 1, 0);
        results[run] = dp.get();
        for (size_t i = 0; i < total; i++) {
            bool inside = i >= begin && i < end;
            if (inside) REQUIRE(results[run][i] != p[i]);
            else REQUIRE(results[run][i] == p[i]);  // both halves untouched
        }
    }
    CHECK(results[0] == results[1]);
    cudaFree(dg);
}

TEST_CASE("AdamW: tensors with gaps (Muon's matrices) get a compact state; resume from it; gaps untouched", "[optim]") {
    // a ZeRO-1 range [2000, 30000) that starts after the first tensor; the gaps are Muon's
    const size_t total = 30000, begin = 2000, end = 30000;
    const std::vector<ParamTensor> tensors = {{0, 2000, true}, {2500, 4099, false}, {9000, 7, true}, {20000, 10000, true}};
    const std::vector<ParamTensor> mine(tensors.begin() + 1, tensors.end());  // those in the range
    AdamWConfig cfg;
    cfg.grad_clip = 0.0f;  // no clipping: the reference takes the gradients as they are
    const float lr = 1e-2f;
    Rng rng(21);
    std::vector<float> p(total), g[2];
    for (auto& x : p) x = (float)rng.normal();
    for (auto& gs : g) {
        gs.resize(total);
        for (auto& x : gs) x = (float)rng.normal();
    }
    DeviceMaster dp(total);
    dp.set(p);
    float* dg = cuda_malloc_n<float>(total, "g");
    auto step = [&](AdamW& opt, int t) {
        cudaCheck(cudaMemcpy(dg, g[t - 1].data(), total * 4, cudaMemcpyHostToDevice));
        opt.step(dp.w, dg, opt.grad_norm_squared(dg + begin, end - begin, 0), lr, t, 0);
    };
    AdamW opt(tensors, begin, end, cfg);
    REQUIRE(opt.n_state == 4099 + 7 + 10000);
    std::vector<double> rp(p.begin(), p.end()), rm(total, 0.0), rv(total, 0.0);
    std::vector<float> after1, m1, v1;
    for (int t = 1; t <= 2; t++) {
        step(opt, t);
        std::vector<double> gd(g[t - 1].begin(), g[t - 1].end());
        for (auto& x : mine)
            ref::adamw_step(rp.data() + x.offset, rm.data() + x.offset, rv.data() + x.offset, gd.data() + x.offset,
                            x.count, lr, cfg.beta1, cfg.beta2, cfg.eps, x.decay ? cfg.weight_decay : 0.0, t);
        if (t == 1) {
            after1 = dp.get();
            opt.get_state(m1, v1);
        }
    }
    const std::vector<float> after2 = dp.get();
    const std::vector<bf16> b = dp.compute_copy();
    std::vector<double> got, want;
    for (size_t i = 0; i < total; i++) {
        const bool updated = std::any_of(mine.begin(), mine.end(),
                                         [&](const ParamTensor& x) { return i >= x.offset && i < x.offset + x.count; });
        if (updated) {
            got.push_back(after2[i]);
            want.push_back(rp[i]);
            REQUIRE(__bfloat162float(b[i]) == master_bf16(after2[i]));
        } else {
            REQUIRE(after2[i] == p[i]);  // the first tensor (another rank's) and the gaps (Muon's): both halves
        }
    }
    CHECK(rel_l2(got, want) < 1e-6);
    // m and v hold the tensors' elements back to back, in order
    std::vector<float> m2, v2;
    opt.get_state(m2, v2);
    REQUIRE(m2.size() == opt.n_state);
    REQUIRE(v2.size() == opt.n_state);
    std::vector<double> gm, wm, gv, wv;
    size_t j = 0;
    for (auto& x : mine)
        for (size_t k = 0; k < x.count; k++, j++) {
            gm.push_back(m2[j]); wm.push_back(rm[x.offset + k]);
            gv.push_back(v2[j]); wv.push_back(rv[x.offset + k]);
        }
    CHECK(rel_l2(gm, wm) < 1e-6);
    CHECK(rel_l2(gv, wv) < 1e-6);
    // a fresh optimizer given step 1's state and weights repeats step 2 bit for bit
    AdamW resumed(tensors, begin, end, cfg);
    resumed.set_state(m1, v1);
    dp.set(after1);
    step(resumed, 2);
    CHECK(dp.get() == after2);
    CHECK_THROWS_WITH(resumed.set_state(std::vector<float>(end - begin), std::vector<float>(end - begin)),
                      Catch::Contains("AdamW state has 28000/28000 values, this optimizer holds 14106"));
    // a range of Muon matrices only: no state, and a step changes nothing
    AdamW none(tensors, 2000, 2500, cfg);
    CHECK(none.n_state == 0);
    step(none, 1);
    CHECK(dp.get() == after2);
    cudaFree(dg);
}

TEST_CASE("AdamW: the gradient norm at every start alignment and length", "[optim]") {
    // a ZeRO shard starts at any float: lengths around the float4 body's edges and past the four-loads-in-flight
    // loop of the whole grid (NORM_BLOCKS x 256 threads x 4 float4), at each of the 4 offsets from 16 bytes
    const size_t grid4 = (size_t)NORM_BLOCKS * 256 * 4 * 4;
    const std::vector<size_t> lengths = {1, 2, 3, 4, 5, 7, 8, 1023, 4099, grid4 - 1, grid4 + 3, 3 * grid4 + 517};
    std::mt19937 rng(11);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> g(lengths.back() + 3);
    for (auto& x : g) x = nd(rng);
    float* dg = to_device(g);
    AdamW opt({ParamTensor{0, 8, true}}, 0, 8, AdamWConfig{});
    for (size_t off = 0; off < 4; off++)
        for (size_t n : lengths) {
            INFO("offset " << off << ", length " << n);
            poison(opt.norm2, 1);
            float got;
            cudaCheck(cudaMemcpy(&got, opt.grad_norm_squared(dg + off, n, 0), 4, cudaMemcpyDeviceToHost));
            double want = 0;
            for (size_t i = off; i < off + n; i++) want += (double)g[i] * g[i];
            CHECK(std::fabs(got - want) < 1e-5 * want);
        }
    cudaFree(dg);
}

}  // namespace gpu_test_optim
