// Benchmark of causal grouped-query flash attention (attention.cuh) at B=4, L=4096, 16 query heads,
// 4 kv heads, head dim 128. Checks forward and backward against the double reference at a small shape
// first, then times forward and forward+backward (median of cudaEvent timings) and prints ms and
// TFLOP/s (causal forward FLOPs = 4 B Hq L^2 Dh / 2; forward+backward = 3.5x forward, as the anchors count)
// beside the anchors on H100: torch SDPA (cuDNN) 539 TFLOP/s forward, 429 forward+backward;
// flash-attention-2 251 forward+backward. Then times the kernels' tile variants one by one.
#include <algorithm>
#include <cmath>
#include <random>
#include <vector>
#include "attention.cuh"
#include "test/ref/attention.h"
#include "dev/timing.h"


struct Bufs {
    AttnShape sh;
    size_t BT;
    int nq, nkv, row;
    std::vector<bf16> h_qkv, h_dout;
    bf16 *qkv, *dout, *out, *dqkv;
    float* lse;
    void* scratch;
    Bufs(const AttnShape& s, uint64_t seed) : sh(s) {
        BT = (size_t)sh.B * sh.T;
        nq = sh.Hq * sh.Dh, nkv = sh.Hkv * sh.Dh, row = nq + 2 * nkv;
        std::mt19937_64 gen(seed);
        std::normal_distribution<float> normal(0.f, 1.f);
        h_qkv.resize(BT * row);
        h_dout.resize(BT * nq);
        for (auto& v : h_qkv) v = __float2bfloat16(normal(gen));
        for (auto& v : h_dout) v = __float2bfloat16(normal(gen));
        qkv = cuda_malloc_n<bf16>(h_qkv.size(), "qkv");
        dout = cuda_malloc_n<bf16>(h_dout.size(), "dout");
        cudaCheck(cudaMemcpy(qkv, h_qkv.data(), h_qkv.size() * sizeof(bf16), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(dout, h_dout.data(), h_dout.size() * sizeof(bf16), cudaMemcpyHostToDevice));
        out = cuda_malloc_n<bf16>(BT * nq, "out");
        dqkv = cuda_malloc_n<bf16>(BT * row, "dqkv");
        lse = cuda_malloc_n<float>((size_t)sh.B * sh.Hq * sh.T, "lse");
        scratch = cuda_malloc(attention_scratch_bytes(sh), "scratch");
    }
    ~Bufs() {
        for (void* p : {(void*)qkv, (void*)dout, (void*)out, (void*)dqkv, (void*)lse, scratch}) cudaCheck(cudaFree(p));
    }
    void fwd() { attention_forward(out, lse, qkv, sh, 0); }
    void bwd() { attention_backward(dqkv, scratch, dout, qkv, out, lse, sh, 0); }
};

static double rel_err(const std::vector<bf16>& got, int row, int c0, const std::vector<double>& ref, int n) {
    double num = 0, den = 0;
    const size_t rows = ref.size() / n;
    for (size_t t = 0; t < rows; t++)
        for (int i = 0; i < n; i++) {
            const double g = __bfloat162float(got[t * row + c0 + i]), r = ref[t * n + i];
            const double d = std::isfinite(g) ? g - r : INFINITY;
            num += d * d;
            den += r * r;
        }
    return std::sqrt(num / den);
}

static void check_small(const AttnShape& sh) {
    Bufs bu(sh, 7);
    cudaCheck(cudaMemset(bu.out, 0xff, bu.BT * bu.nq * sizeof(bf16)));
    cudaCheck(cudaMemset(bu.dqkv, 0xff, bu.BT * bu.row * sizeof(bf16)));
    bu.fwd();
    bu.bwd();
    cudaCheck(cudaDeviceSynchronize());
    std::vector<bf16> out(bu.BT * bu.nq), dqkv(bu.BT * bu.row);
    cudaCheck(cudaMemcpy(out.data(), bu.out, out.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(dqkv.data(), bu.dqkv, dqkv.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
    auto cols = [&](const std::vector<bf16>& m, int row, int c0, int n) {
        std::vector<double> r(bu.BT * n);
        for (size_t t = 0; t < bu.BT; t++)
            for (int i = 0; i < n; i++) r[t * n + i] = __bfloat162float(m[t * row + c0 + i]);
        return r;
    };
    std::vector<double> q = cols(bu.h_qkv, bu.row, 0, bu.nq), k = cols(bu.h_qkv, bu.row, bu.nq, bu.nkv),
                        v = cols(bu.h_qkv, bu.row, bu.nq + bu.nkv, bu.nkv), dout = cols(bu.h_dout, bu.nq, 0, bu.nq);
    std::vector<double> ro(bu.BT * bu.nq), rl((size_t)sh.B * sh.Hq * sh.T), rdq(bu.BT * bu.nq), rdk(bu.BT * bu.nkv),
        rdv(bu.BT * bu.nkv);
    ref::attention_forward(ro.data(), rl.data(), q.data(), k.data(), v.data(), sh.B, sh.T, sh.Hq, sh.Hkv, sh.Dh);
    ref::attention_backward(rdq.data(), rdk.data(), rdv.data(), dout.data(), q.data(), k.data(), v.data(), sh.B, sh.T,
                            sh.Hq, sh.Hkv, sh.Dh);
    const double e[4] = {rel_err(out, bu.nq, 0, ro, bu.nq), rel_err(dqkv, bu.row, 0, rdq, bu.nq),
                         rel_err(dqkv, bu.row, bu.nq, rdk, bu.nkv), rel_err(dqkv, bu.row, bu.nq + bu.nkv, rdv, bu.nkv)};
    printf("check B=%d T=%d Hq=%d Hkv=%d Dh=%d: rel L2 out %.2e dq %.2e dk %.2e dv %.2e\n", sh.B, sh.T, sh.Hq, sh.Hkv,
           sh.Dh, e[0], e[1], e[2], e[3]);
    for (double x : e)
        if (!(x < 2e-2)) THROW("attention mismatch at the check shape: rel L2 %.3e", x);
}

int main() {
    try {
        check_small({1, 300, 4, 1, 128});
        check_small({2, 150, 4, 2, 64});

        const int warmup = 3, iters = 15;
        for (int Dh : {128, 64}) {
            const AttnShape sh{4, 4096, 16, 4, Dh};
            Bufs bu(sh, 1234);
            const double fwd_flops = 4.0 * sh.B * sh.Hq * (double)sh.T * sh.T * sh.Dh / 2;
            const float t_fwd = time_ms([&]() { bu.fwd(); }, warmup, iters);
            const float t_all = time_ms([&]() { bu.fwd(); bu.bwd(); }, warmup, iters);
            printf("attention B=%d L=%d Hq=%d Hkv=%d Dh=%d causal\n", sh.B, sh.T, sh.Hq, sh.Hkv, sh.Dh);
            printf("forward:          %.3f ms  %6.1f TFLOP/s  (cuDNN SDPA 539; goal >= 450)\n", t_fwd,
                   fwd_flops / t_fwd * 1e-9);
            printf("forward+backward: %.3f ms  %6.1f TFLOP/s  (cuDNN SDPA 429, flash-attention-2 251; goal >= 350)\n",
                   t_all, 3.5 * fwd_flops / t_all * 1e-9);
            auto tf = [&](float ms, double mult) { return mult * fwd_flops / ms * 1e-9; };
            const AttnShape& s = sh;
            if (Dh != 128) {
                printf("variants (Dh=64):\n");
#define FWD64(BM, BN, NW)                                                                                      \
    {                                                                                                          \
        const float t = time_ms([&]() { attn::launch_fwd<64, BM, BN, NW>(bu.out, bu.lse, bu.qkv, s, 0); }, warmup, iters); \
        printf("  fwd BM%d BN%d NW%d: %.3f ms %6.1f TFLOP/s\n", BM, BN, NW, t, tf(t, 1.0));                  \
    }
                FWD64(128, 64, 4)
                FWD64(128, 32, 4)
                FWD64(128, 64, 8)
                FWD64(64, 64, 4)
                continue;
            }

            // tile variants, one kernel at a time (TFLOP/s of the forward FLOPs; backward kernels as the
            // share of the 2.5x backward they would be with a fused dQ: dK/dV 4 matmuls, dQ 3)
            float* delta = (float*)bu.scratch;
            printf("variants (Dh=128):\n");
#define FWDV(BM, BN, NW)                                                                                       \
    {                                                                                                          \
        const float t = time_ms([&]() { attn::launch_fwd<128, BM, BN, NW>(bu.out, bu.lse, bu.qkv, s, 0); }, warmup, iters); \
        printf("  fwd BM%d BN%d NW%d: %.3f ms %6.1f TFLOP/s\n", BM, BN, NW, t, tf(t, 1.0));                  \
    }
            FWDV(128, 64, 8)
            FWDV(128, 64, 4)
            FWDV(128, 32, 4)
            FWDV(64, 64, 4)
            FWDV(128, 128, 8)
            bu.fwd();
            {
                const float t = time_ms([&]() { attn::launch_delta<128>(delta, bu.dout, bu.out, s, 0); }, warmup, iters);
                printf("  delta: %.3f ms\n", t);
            }
#define DKDV(BMQ, NW)                                                                                          \
    {                                                                                                          \
        const float t = time_ms([&]() { attn::launch_dkdv<128, BMQ, NW>(bu.dqkv, bu.dout, bu.qkv, bu.lse, delta, s, 0); }, \
                                warmup, iters);                                                                \
        printf("  dkdv BMQ%d NW%d: %.3f ms %6.1f TFLOP/s (4 matmuls)\n", BMQ, NW, t, tf(t, 2.0));           \
    }
            DKDV(64, 4)
            DKDV(32, 4)
            DKDV(64, 2)
#define DQV(BN, NW, AREG)                                                                                            \
    {                                                                                                          \
        const float t = time_ms([&]() { attn::launch_dq<128, BN, NW, AREG>(bu.dqkv, bu.dout, bu.qkv, bu.lse, delta, s, 0); }, \
                                warmup, iters);                                                                \
        printf("  dq BN%d NW%d AREG%d: %.3f ms %6.1f TFLOP/s (3 matmuls)\n", BN, NW, (int)AREG, t, tf(t, 1.5));               \
    }
            DQV(64, 4, true)
            DQV(64, 4, false)
            DQV(32, 4, true)
            DQV(64, 8, true)
        }
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
