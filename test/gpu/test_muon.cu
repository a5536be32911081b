// Muon on the GPU (optim.cuh) against the double reference (test/ref/muon.h): odd shapes
// with rows > cols and rows < cols, NaN-poisoned workspace, the global-norm
// clip from AdamW::grad_norm_squared, bit-identical reruns, and the momentum state roundtrip.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <random>
#include "optim.cuh"
#include "test/gpu_util.h"
#include "test/ref/muon.h"
#include "test/test_util.h"

namespace {

// matrices scattered over a flat buffer with gaps (the AdamW parameters between them),
// listed out of offset order
struct Layout {
    std::vector<MuonMatrix> mats;
    size_t total = 0;
    Layout() {
        const int shapes[][2] = {{97, 40}, {57, 150}, {64, 64}, {200, 72}, {1, 50}};
        const size_t gap = 37;
        size_t off = gap;
        for (auto& s : shapes) {
            mats.push_back({off, s[0], s[1]});
            off += (size_t)s[0] * s[1] + gap;
        }
        total = off;
        std::swap(mats[0], mats[3]);
        std::swap(mats[1], mats[4]);
    }
    bool in_muon(size_t i) const {
        for (auto& m : mats)
            if (i >= m.offset && i < m.offset + (size_t)m.rows * m.cols) return true;
        return false;
    }
};

struct Bufs {
    DeviceMaster master;
    float* grads;
    size_t n;
    explicit Bufs(size_t n_) : master(n_), n(n_) { grads = cuda_malloc_n<float>(n, "grads"); }
    ~Bufs() { cudaFree(grads); }
    std::vector<float> get_master() const { return master.get(); }
};

void poison_workspace(Muon& opt, const Layout& L) {
    size_t max_x = 0, max_a = 0;
    for (auto& m : L.mats) {
        max_x = std::max(max_x, (size_t)m.rows * m.cols);
        max_a = std::max(max_a, (size_t)std::min(m.rows, m.cols) * std::min(m.rows, m.cols));
    }
    cudaCheck(cudaMemset(opt.X, 0xFF, max_x * sizeof(bf16)));
    cudaCheck(cudaMemset(opt.X2, 0xFF, max_x * sizeof(bf16)));
    cudaCheck(cudaMemset(opt.A, 0xFF, max_a * sizeof(bf16)));
    cudaCheck(cudaMemset(opt.Bm, 0xFF, max_a * sizeof(bf16)));
    cudaCheck(cudaMemset(opt.partial, 0xFF, MUON_NORM_BLOCKS * sizeof(float)));
    cudaCheck(cudaMemset(opt.unorm2, 0xFF, sizeof(float)));
}

std::vector<float> random_vec(size_t n, double scale, std::mt19937& rng) {
    std::normal_distribution<double> nd(0.0, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = (float)nd(rng);
    return v;
}

// one reference step over every matrix: p (flat, like master), buf per matrix in order
void ref_step(std::vector<double>& p, std::vector<std::vector<double>>& buf, std::vector<std::vector<double>>& upd,
              const std::vector<float>& g, const Layout& L, const MuonConfig& c, double lr, bool clip) {
    double norm2 = 0;
    for (float x : g) norm2 += (double)x * x;
    const double cs = clip ? ref::muon_clip_scale(norm2, c.grad_clip) : 1.0;
    upd.resize(L.mats.size());
    for (size_t k = 0; k < L.mats.size(); k++) {
        const MuonMatrix& m = L.mats[k];
        const size_t n = (size_t)m.rows * m.cols;
        std::vector<double> gc(n), O(n);
        for (size_t i = 0; i < n; i++) gc[i] = g[m.offset + i] * cs;
        ref::muon_step(p.data() + m.offset, buf[k].data(), gc.data(), m.rows, m.cols, lr, c.momentum, c.nesterov,
                       c.ns_steps, c.weight_decay, O.data());
        upd[k].resize(n);
        for (size_t i = 0; i < n; i++) upd[k][i] = ref::muon_update_scale(m.rows, m.cols) * O[i];
    }
}

}  // namespace

TEST_CASE("Muon: two steps match the double reference (bf16 Newton-Schulz), with and without clipping", "[muon]") {
    Layout L;
    const size_t N = L.total;
    struct Case { MuonConfig cfg; float lr; };
    MuonConfig a;  // defaults: Nesterov 0.95, 5 NS steps, wd 0.1, clip 1
    MuonConfig b;
    b.momentum = 0.9f; b.nesterov = false; b.weight_decay = 0.0f; b.grad_clip = 0.0f;
    for (const Case& cs : {Case{a, 0.05f}, Case{b, 0.03f}}) {
        const MuonConfig& cfg = cs.cfg;
        INFO("nesterov " << cfg.nesterov << " momentum " << cfg.momentum << " clip " << cfg.grad_clip);
        std::mt19937 rng(77 + cfg.nesterov);
        Bufs d(N);
        AdamW norm_helper({{0, N, true}}, 0, N, AdamWConfig{});
        Muon opt(L.mats, cfg);
        REQUIRE(opt.state_floats() == N - 37 * (L.mats.size() + 1));  // 6 gaps around 5 matrices
        poison_workspace(opt, L);
        std::vector<float> master = random_vec(N, 1.0, rng);
        d.master.set(master);
        std::vector<double> rp(master.begin(), master.end()), rp_noclip(rp);
        std::vector<std::vector<double>> rbuf, rbuf_noclip, rupd, rupd_noclip;
        for (auto& m : L.mats) rbuf.emplace_back((size_t)m.rows * m.cols, 0.0);
        rbuf_noclip = rbuf;
        // step 1's gradients are clipped (global norm ~164), step 2's are not (~0.8)
        const double scales[2] = {1.0, 5e-3};
        for (int step = 1; step <= 2; step++) {
            INFO("step " << step);
            std::vector<float> g = random_vec(N, scales[step - 1], rng);
            cudaCheck(cudaMemcpy(d.grads, g.data(), N * 4, cudaMemcpyHostToDevice));
            std::vector<float> before = d.get_master();
            opt.step(d.master.w, d.grads, norm_helper.grad_norm_squared(d.grads, N, 0), cs.lr, 0);
            cudaCheck(cudaDeviceSynchronize());
            std::vector<float> after = d.get_master();
            ref_step(rp, rbuf, rupd, g, L, cfg, cs.lr, true);
            ref_step(rp_noclip, rbuf_noclip, rupd_noclip, g, L, cfg, cs.lr, false);
            const std::vector<bf16> pb = d.master.compute_copy();
            for (size_t i = 0; i < N; i++) {
                if (L.in_muon(i)) REQUIRE(__bfloat162float(pb[i]) == master_bf16(after[i]));
                else REQUIRE(after[i] == master[i]);  // the gaps: both halves untouched
            }
            for (size_t k = 0; k < L.mats.size(); k++) {
                const MuonMatrix& m = L.mats[k];
                const size_t n = (size_t)m.rows * m.cols;
                INFO("matrix (" << m.rows << ", " << m.cols << ")");
                // the update the GPU applied, recovered from its fp32 master weights
                std::vector<double> u(n), p(n), pr(n);
                double sq = 0;
                for (size_t i = 0; i < n; i++) {
                    const size_t j = m.offset + i;
                    u[i] = ((double)before[j] * (1.0 - (double)cs.lr * cfg.weight_decay) - after[j]) / cs.lr;
                    p[i] = after[j];
                    pr[i] = rp[j];
                    sq += u[i] * u[i];
                }
                // bf16 Newton-Schulz is ~1.5% from the double one; a single row is one scalar's
                // bf16 rounding compounded over the iterations, so a little looser
                CHECK(rel_l2(u, rupd[k]) < (m.rows > 1 ? 2e-2 : 4e-2));
                CHECK(rel_l2(p, pr) < 1e-3);
                // RMS matched to AdamW's ~0.2 (0.2 times the RMS singular value, in [0.7, 1.2])
                if (m.rows > 1) {
                    const double rms = std::sqrt(sq / n);
                    CHECK(rms > 0.13);
                    CHECK(rms < 0.25);
                }
                if (cfg.grad_clip > 0 && step == 2) CHECK(rel_l2(rupd_noclip[k], rupd[k]) > 0.2);  // clipping matters
            }
        }
        std::vector<float> st;
        opt.get_state(st);
        REQUIRE(st.size() == opt.state_floats());
        std::vector<double> sd(st.begin(), st.end()), want;
        for (auto& bk : rbuf) want.insert(want.end(), bk.begin(), bk.end());
        CHECK(rel_l2(sd, want) < 1e-5);
    }
}

TEST_CASE("Muon: reruns bit for bit and resumes from get_state/set_state", "[muon]") {
    Layout L;
    const size_t N = L.total;
    std::mt19937 rng(123);
    const std::vector<float> master = random_vec(N, 1.0, rng), g1 = random_vec(N, 1.0, rng),
                             g2 = random_vec(N, 0.3, rng);
    Bufs d(N);
    AdamW norm_helper({{0, N, true}}, 0, N, AdamWConfig{});
    MuonConfig cfg;
    const float lr = 0.02f;
    std::vector<float> m1[2], m2[2], s1[2], s2[2];
    for (int run = 0; run < 2; run++) {
        Muon opt(L.mats, cfg);
        poison_workspace(opt, L);
        d.master.set(master);
        cudaCheck(cudaMemcpy(d.grads, g1.data(), N * 4, cudaMemcpyHostToDevice));
        opt.step(d.master.w, d.grads, norm_helper.grad_norm_squared(d.grads, N, 0), lr, 0);
        m1[run] = d.get_master();
        opt.get_state(s1[run]);
        cudaCheck(cudaMemcpy(d.grads, g2.data(), N * 4, cudaMemcpyHostToDevice));
        opt.step(d.master.w, d.grads, norm_helper.grad_norm_squared(d.grads, N, 0), lr, 0);
        m2[run] = d.get_master();
        opt.get_state(s2[run]);
    }
    REQUIRE(m2[0] != m1[0]);
    CHECK(memcmp(m1[0].data(), m1[1].data(), N * 4) == 0);
    CHECK(memcmp(m2[0].data(), m2[1].data(), N * 4) == 0);
    CHECK(s2[0] == s2[1]);

    // a fresh optimizer given step 1's momentum and weights repeats step 2 exactly
    Muon opt(L.mats, cfg);
    poison_workspace(opt, L);
    opt.set_state(s1[0]);
    std::vector<float> back;
    opt.get_state(back);
    CHECK(back == s1[0]);
    d.master.set(m1[0]);
    cudaCheck(cudaMemcpy(d.grads, g2.data(), N * 4, cudaMemcpyHostToDevice));
    opt.step(d.master.w, d.grads, norm_helper.grad_norm_squared(d.grads, N, 0), lr, 0);
    std::vector<float> resumed = d.get_master();
    CHECK(memcmp(resumed.data(), m2[0].data(), N * 4) == 0);
    opt.get_state(back);
    CHECK(back == s2[0]);
    CHECK_THROWS_WITH(opt.set_state(std::vector<float>(3)), Catch::Contains("Muon state has 3 values"));
}

TEST_CASE("Muon: bad matrix lists are rejected", "[muon]") {
    CHECK_THROWS_WITH(Muon({{0, 10, 10}, {50, 10, 10}}, MuonConfig{}), Catch::Contains("overlap"));
    CHECK_THROWS_WITH(Muon({{0, 0, 10}}, MuonConfig{}), Catch::Contains("shape (0, 10)"));
    CHECK_THROWS_WITH(Muon({}, MuonConfig{}), Catch::Contains("no matrices"));
}

// not part of the suite: ./test_gpu "[muon-bench]" times one step over a model's matrices
TEST_CASE("Muon: time one step over mamba2-130m's and mamba2-1.3b's block matrices", "[.][muon-bench]") {
    struct M { const char* name; int layers, d, d_in_proj, d_inner; };
    for (M mdl : {M{"mamba2-130m", 24, 768, 3352, 1536}, M{"mamba2-1.3b", 48, 2048, 8512, 4096}}) {
        std::vector<MuonMatrix> mats;
        size_t off = 0;
        double flops = 0;
        for (int l = 0; l < mdl.layers; l++)
            for (auto rc : {std::make_pair(mdl.d_in_proj, mdl.d), std::make_pair(mdl.d, mdl.d_inner)}) {
                mats.push_back({off, rc.first, rc.second});
                off += (size_t)rc.first * rc.second;
                const double m = std::min(rc.first, rc.second), n = std::max(rc.first, rc.second);
                flops += 5 * (4 * m * m * n + 2 * m * m * m);
            }
        Bufs d(off);
        d.master.set(std::vector<float>(off, 0.01f));
        cudaCheck(cudaMemset(d.grads, 0x3B, off * 4));
        float* norm2 = cuda_malloc_n<float>(1, "norm2");
        const float big = 1e4f;
        cudaCheck(cudaMemcpy(norm2, &big, 4, cudaMemcpyHostToDevice));
        Muon opt(mats, MuonConfig{});
        cudaEvent_t e0, e1;
        cudaCheck(cudaEventCreate(&e0)); cudaCheck(cudaEventCreate(&e1));
        opt.step(d.master.w, d.grads, norm2, 1e-3f, 0);  // warm-up
        const int reps = 5;
        cudaCheck(cudaEventRecord(e0));
        for (int r = 0; r < reps; r++) opt.step(d.master.w, d.grads, norm2, 1e-3f, 0);
        cudaCheck(cudaEventRecord(e1));
        cudaCheck(cudaEventSynchronize(e1));
        float ms = 0;
        cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
        ms /= reps;
        printf("muon step %s: %zu matrices, %.1f M params, %.2f ms/step, Newton-Schulz %.1f TFLOP/s\n", mdl.name,
               mats.size(), off / 1e6, ms, flops / (ms * 1e-3) / 1e12);
        for (float x : d.get_master()) REQUIRE(std::isfinite(x));
        cudaFree(norm2);
        cudaEventDestroy(e0); cudaEventDestroy(e1);
    }
}
