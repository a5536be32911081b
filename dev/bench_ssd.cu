// Benchmark of the chunked SSD scan (ssd.cuh) at ANCHORS.md's shape: B=4, T=4096, H=64, P=64,
// N=128, G=1, chunk 256. Checks the forward against the sequential double reference on a few
// heads first, then times forward and forward+backward (median of cudaEvent timings) and prints
// ms, TFLOP/s (chunked-algorithm matmul FLOPs, as ANCHORS.md counts them), GB/s and the ratio
// to mamba_ssm's Triton kernels (0.60 ms / 5.0 ms on H100).
#include <algorithm>
#include <cmath>
#include <random>
#include <vector>
#include "ssd.cuh"
#include "test/ref/ssd.h"
#include "dev/timing.h"


int main() {
    try {
        const int B = 4, T = 4096, H = 64, P = 64, N = 128, G = 1, Q = 256;
        const SSDShape sh{B, T, H, P, G, N, Q};
        const int HP = H * P, GN = G * N, row = HP + 2 * GN;  // x | B | C as in the model's xBC rows
        const size_t BT = (size_t)B * T;

        std::mt19937_64 gen(1234);
        std::normal_distribution<float> normal(0.f, 1.f);
        std::uniform_real_distribution<float> unif(0.f, 1.f);
        std::vector<bf16> h_xbc(BT * row), h_dt(BT * H), h_dy(BT * HP), h_bias(H), h_alog(H), h_D(H);
        for (auto& v : h_xbc) v = __float2bfloat16(normal(gen));
        for (auto& v : h_dy) v = __float2bfloat16(normal(gen));
        for (auto& v : h_dt) v = __float2bfloat16(-4.f * unif(gen));
        for (int h = 0; h < H; h++) {
            const float target = expf(logf(1e-3f) + unif(gen) * (logf(1e-1f) - logf(1e-3f)));
            h_bias[h] = __float2bfloat16(logf(expm1f(target)));
            h_alog[h] = __float2bfloat16(logf(1.f + 15.f * unif(gen)));
            h_D[h] = __float2bfloat16(0.5f + unif(gen));
        }

        auto upload = [](const std::vector<bf16>& v) {
            bf16* d = cuda_malloc_n<bf16>(v.size(), "bench input");
            cudaCheck(cudaMemcpy(d, v.data(), v.size() * sizeof(bf16), cudaMemcpyHostToDevice));
            return d;
        };
        bf16 *d_xbc = upload(h_xbc), *d_dt = upload(h_dt), *d_dy = upload(h_dy);
        bf16 *d_bias = upload(h_bias), *d_alog = upload(h_alog), *d_D = upload(h_D);
        bf16* d_y = cuda_malloc_n<bf16>(BT * HP, "y");
        bf16* d_dxbc = cuda_malloc_n<bf16>(BT * row, "dxbc");
        bf16* d_ddt = cuda_malloc_n<bf16>(BT * H, "ddt");
        float* d_pg = cuda_malloc_n<float>(3 * H, "param grads");
        cudaCheck(cudaMemset(d_pg, 0, 3 * H * sizeof(float)));
        void* saved = cuda_malloc(ssd_saved_bytes(sh), "ssd saved");
        void* scratch = cuda_malloc(ssd_scratch_bytes(sh), "ssd scratch");
        printf("ssd B=%d T=%d H=%d P=%d N=%d G=%d chunk=%d: saved %.1f MiB, scratch %.1f MiB\n", B, T, H, P, N, G, Q,
               ssd_saved_bytes(sh) / 1048576.0, ssd_scratch_bytes(sh) / 1048576.0);

        auto fwd = [&]() {
            ssd_forward(d_y, saved, scratch, d_xbc, row, d_xbc + HP, d_xbc + HP + GN, row, d_dt, H, d_bias, d_alog,
                        d_D, sh, 0);
        };
        auto bwd = [&]() {
            ssd_backward(d_dxbc, row, d_dxbc + HP, d_dxbc + HP + GN, row, d_ddt, H, d_pg, d_pg + H, d_pg + 2 * H,
                         scratch, d_dy, d_xbc, row, d_xbc + HP, d_xbc + HP + GN, row, d_dt, H, d_bias, d_alog, d_D,
                         saved, sh, 0);
        };

        // check the forward on a few (b, h) against the sequential reference
        cudaCheck(cudaMemset(d_y, 0xff, BT * HP * sizeof(bf16)));
        fwd();
        cudaCheck(cudaDeviceSynchronize());
        std::vector<bf16> h_y(BT * HP);
        cudaCheck(cudaMemcpy(h_y.data(), d_y, h_y.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
        const int checks[3][2] = {{0, 0}, {1, 37}, {3, 63}};
        for (auto& bh : checks) {
            const int b = bh[0], h = bh[1], g = h / (H / G);
            std::vector<double> x(T * P), Bm(T * N), Cm(T * N), dt(T), y(T * P);
            for (int t = 0; t < T; t++) {
                const bf16* r = h_xbc.data() + ((size_t)b * T + t) * row;
                for (int p = 0; p < P; p++) x[t * P + p] = __bfloat162float(r[h * P + p]);
                for (int n = 0; n < N; n++) Bm[t * N + n] = __bfloat162float(r[HP + g * N + n]);
                for (int n = 0; n < N; n++) Cm[t * N + n] = __bfloat162float(r[HP + GN + g * N + n]);
                dt[t] = __bfloat162float(h_dt[((size_t)b * T + t) * H + h]);
            }
            const double bias = __bfloat162float(h_bias[h]), alog = __bfloat162float(h_alog[h]),
                         D = __bfloat162float(h_D[h]);
            ref::ssd_forward(y.data(), x.data(), Bm.data(), Cm.data(), dt.data(), &bias, &alog, &D, 1, T, 1, P, 1, N);
            double num = 0, den = 0;
            for (int t = 0; t < T; t++)
                for (int p = 0; p < P; p++) {
                    const double o = __bfloat162float(h_y[((size_t)b * T + t) * HP + h * P + p]);
                    const double d = std::isfinite(o) ? o - y[t * P + p] : INFINITY;
                    num += d * d;
                    den += y[t * P + p] * y[t * P + p];
                }
            const double err = std::sqrt(num / den);
            printf("check forward b=%d h=%d: rel L2 %.2e\n", b, h, err);
            if (!(err < 1e-2)) THROW("ssd forward mismatch at b=%d h=%d: rel L2 %.3e", b, h, err);
        }

        const int warmup = 5, iters = 30;
        const float t_fwd = time_ms(fwd, warmup, iters);
        const float t_all = time_ms([&]() { fwd(); bwd(); }, warmup, iters);

        // FLOPs of the chunked algorithm (ANCHORS.md); backward counted as twice the forward
        const double nc = std::ceil((double)T / Q);
        const double fwd_flops = B * nc * (G * 2.0 * Q * Q * N + H * (2.0 * Q * Q * P + 4.0 * Q * N * P));
        const double in_bytes = BT * (HP + 2.0 * GN + H) * 2, out_bytes = BT * HP * 2.0;
        const double fwd_bytes = in_bytes + out_bytes;                             // x, B, C, dt in; y out
        const double all_bytes = fwd_bytes + in_bytes + out_bytes + in_bytes;      // + bwd: inputs, dy in; grads out
        printf("forward:          %.3f ms  %6.1f TFLOP/s  %6.0f GB/s  anchor 0.60 ms: %.2fx faster (goal <= 0.45 ms)\n",
               t_fwd, fwd_flops / t_fwd * 1e-9, fwd_bytes / t_fwd * 1e-6, 0.60 / t_fwd);
        printf("forward+backward: %.3f ms  %6.1f TFLOP/s  %6.0f GB/s  anchor 5.0 ms: %.2fx faster (goal <= 2.5 ms)\n",
               t_all, 3 * fwd_flops / t_all * 1e-9, all_bytes / t_all * 1e-6, 5.0 / t_all);

        for (void* p : {(void*)d_xbc, (void*)d_dt, (void*)d_dy, (void*)d_bias, (void*)d_alog, (void*)d_D, (void*)d_y,
                        (void*)d_dxbc, (void*)d_ddt, (void*)d_pg, saved, scratch})
            cudaCheck(cudaFree(p));
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
