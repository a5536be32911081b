// Benchmark of the Mamba-1 selective scan (scan.cuh) at B=4, T=4096, D=4096, N=16 and N=128.
// First checks forward and backward against the sequential double reference (test/ref/scan.h) at a
// small shape, then times forward and forward+backward (median of cudaEvent timings) and prints ms,
// achieved GB/s over the floor bytes and the ratio to the memory floor at 3.0 TB/s:
//   forward reads u, dt_raw, z, B, C once and writes y once;
//   backward reads u, dt_raw, z, B, C, dy once and writes du, ddt_raw, dz, dB, dC once (bf16).
#include <algorithm>
#include <cmath>
#include <random>
#include <vector>
#include "scan.cuh"
#include "test/ref/scan.h"
#include "test/test_util.h"
#include "dev/timing.h"


// Buffers of one shape in the model's layout: u (stride D), dt (stride D), z a slice of [x | z]
// (stride 2D), B/C slices of the x_proj row [dt_low | B | C] (stride R + 2N), gradients alike.
struct Bufs {
    int B, T, D, N, R;
    size_t BT;
    std::vector<bf16> h_u, h_dt, h_xz, h_xp, h_dy, h_bias, h_alog, h_D;
    bf16 *u, *dt, *xz, *xp, *dy, *bias, *alog, *Dk, *y, *du, *ddt, *dxz, *dxp;
    float* pg;
    void *saved, *scratch;
    ScanShape sh() const { return ScanShape{B, T, D, N}; }
    int xps() const { return R + 2 * N; }

    Bufs(int B_, int T_, int D_, int N_, uint64_t seed) : B(B_), T(T_), D(D_), N(N_), R(D_ / 16), BT((size_t)B_ * T_) {
        std::mt19937_64 gen(seed);
        std::normal_distribution<float> normal(0.f, 1.f);
        std::uniform_real_distribution<float> unif(0.f, 1.f);
        h_u.resize(BT * D);
        h_dt.resize(BT * D);
        h_xz.resize(BT * 2 * D);
        h_xp.resize(BT * xps());
        h_dy.resize(BT * D);
        h_bias.resize(D);
        h_alog.resize((size_t)D * N);
        h_D.resize(D);
        for (auto& v : h_u) v = __float2bfloat16(normal(gen));
        for (auto& v : h_xz) v = __float2bfloat16(normal(gen));
        for (auto& v : h_xp) v = __float2bfloat16(normal(gen));
        for (auto& v : h_dy) v = __float2bfloat16(normal(gen));
        for (auto& v : h_dt) v = __float2bfloat16(1.4f * unif(gen) - 0.7f);
        for (int d = 0; d < D; d++) {
            const float target = expf(logf(2e-3f) + unif(gen) * (logf(0.1f) - logf(2e-3f)));
            h_bias[d] = __float2bfloat16(logf(expm1f(target)));
            for (int n = 0; n < N; n++) h_alog[(size_t)d * N + n] = __float2bfloat16(logf(n + 1.f) + 0.1f * normal(gen));
            h_D[d] = __float2bfloat16(0.5f + unif(gen));
        }
        u = upload(h_u);
        dt = upload(h_dt);
        xz = upload(h_xz);
        xp = upload(h_xp);
        dy = upload(h_dy);
        bias = upload(h_bias);
        alog = upload(h_alog);
        Dk = upload(h_D);
        y = cuda_malloc_n<bf16>(BT * D, "y");
        du = cuda_malloc_n<bf16>(BT * D, "du");
        ddt = cuda_malloc_n<bf16>(BT * D, "ddt");
        dxz = cuda_malloc_n<bf16>(BT * 2 * D, "dxz");
        dxp = cuda_malloc_n<bf16>(BT * xps(), "dxp");
        pg = cuda_malloc_n<float>((size_t)D * N + 2 * D, "param grads");
        cudaCheck(cudaMemset(pg, 0, ((size_t)D * N + 2 * D) * sizeof(float)));
        saved = cuda_malloc(scan_saved_bytes(sh()), "scan saved");
        scratch = cuda_malloc(scan_scratch_bytes(sh()), "scan scratch");
    }
    ~Bufs() {
        for (void* p : {(void*)u, (void*)dt, (void*)xz, (void*)xp, (void*)dy, (void*)bias, (void*)alog, (void*)Dk,
                        (void*)y, (void*)du, (void*)ddt, (void*)dxz, (void*)dxp, (void*)pg, saved, scratch})
            cudaCheck(cudaFree(p));
    }
    static bf16* upload(const std::vector<bf16>& v) {
        bf16* d = cuda_malloc_n<bf16>(v.size(), "bench input");
        cudaCheck(cudaMemcpy(d, v.data(), v.size() * sizeof(bf16), cudaMemcpyHostToDevice));
        return d;
    }
    void fwd() {
        selective_scan_forward(y, saved, u, D, dt, D, xz + D, 2 * D, xp + R, xp + R + N, xps(), bias, alog, Dk, sh(),
                               0);
    }
    void bwd() {
        selective_scan_backward(du, D, ddt, D, dxz + D, 2 * D, dxp + R, dxp + R + N, xps(), pg, pg + (size_t)D * N,
                                pg + (size_t)D * N + D, scratch, dy, u, D, dt, D, xz + D, 2 * D, xp + R, xp + R + N,
                                xps(), bias, alog, Dk, saved, sh(), 0);
    }
};

// forward and backward at a small shape against the reference
static void check(int B, int T, int D, int N) {
    Bufs bf(B, T, D, N, 99);
    cudaCheck(cudaMemset(bf.y, 0xff, bf.BT * D * sizeof(bf16)));
    cudaCheck(cudaMemset(bf.du, 0xff, bf.BT * D * sizeof(bf16)));
    cudaCheck(cudaMemset(bf.dxp, 0xff, bf.BT * bf.xps() * sizeof(bf16)));
    bf.fwd();
    bf.bwd();
    cudaCheck(cudaDeviceSynchronize());
    const size_t BT = bf.BT;
    auto f = [](bf16 v) { return (double)__bfloat162float(v); };
    std::vector<double> u(BT * D), dt(BT * D), z(BT * D), Bm(BT * N), Cm(BT * N), dy(BT * D), bias(D), alog(D * N), Dk(D);
    for (size_t r = 0; r < BT; r++) {
        for (int d = 0; d < D; d++) {
            u[r * D + d] = f(bf.h_u[r * D + d]);
            dt[r * D + d] = f(bf.h_dt[r * D + d]);
            z[r * D + d] = f(bf.h_xz[r * 2 * D + D + d]);
            dy[r * D + d] = f(bf.h_dy[r * D + d]);
        }
        for (int n = 0; n < N; n++) {
            Bm[r * N + n] = f(bf.h_xp[r * bf.xps() + bf.R + n]);
            Cm[r * N + n] = f(bf.h_xp[r * bf.xps() + bf.R + N + n]);
        }
    }
    for (int d = 0; d < D; d++) {
        bias[d] = f(bf.h_bias[d]);
        Dk[d] = f(bf.h_D[d]);
        for (int n = 0; n < N; n++) alog[d * N + n] = f(bf.h_alog[d * N + n]);
    }
    std::vector<double> y(BT * D), du(BT * D), ddt(BT * D), dz(BT * D), dB(BT * N), dC(BT * N), dA(D * N, 0.0),
        dD(D, 0.0), db(D, 0.0);
    ref::selective_scan_forward(y.data(), u.data(), dt.data(), z.data(), Bm.data(), Cm.data(), bias.data(),
                                alog.data(), Dk.data(), B, T, D, N);
    ref::selective_scan_backward(du.data(), ddt.data(), dz.data(), dB.data(), dC.data(), dA.data(), dD.data(),
                                 db.data(), dy.data(), u.data(), dt.data(), z.data(), Bm.data(), Cm.data(),
                                 bias.data(), alog.data(), Dk.data(), B, T, D, N);
    std::vector<bf16> hy(BT * D), hdu(BT * D), hxp(BT * bf.xps());
    cudaCheck(cudaMemcpy(hy.data(), bf.y, hy.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(hdu.data(), bf.du, hdu.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(hxp.data(), bf.dxp, hxp.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
    std::vector<double> gy(BT * D), gdu(BT * D), gdB(BT * N);
    for (size_t i = 0; i < BT * D; i++) gy[i] = f(hy[i]), gdu[i] = f(hdu[i]);
    for (size_t r = 0; r < BT; r++)
        for (int n = 0; n < N; n++) gdB[r * N + n] = f(hxp[r * bf.xps() + bf.R + n]);
    const double ey = rel_l2(gy, y), edu = rel_l2(gdu, du), edB = rel_l2(gdB, dB);
    printf("check B=%d T=%d D=%d N=%d: rel L2 y %.2e du %.2e dB %.2e\n", B, T, D, N, ey, edu, edB);
    if (!(ey < 2e-2 && edu < 2e-2 && edB < 2e-2)) THROW("selective scan mismatch at N=%d", N);
}

static void bench(int N) {
    const int B = 4, T = 4096, D = 4096;
    Bufs bf(B, T, D, N, 1234);
    printf("scan B=%d T=%d D=%d N=%d: saved %.1f MiB, scratch %.1f MiB\n", B, T, D, N,
           scan_saved_bytes(bf.sh()) / 1048576.0, scan_scratch_bytes(bf.sh()) / 1048576.0);
    const int warmup = 3, iters = 15;
    const float t_fwd = time_ms([&]() { bf.fwd(); }, warmup, iters);
    const float t_all = time_ms([&]() { bf.fwd(); bf.bwd(); }, warmup, iters);
    const double btd = (double)B * T * D * 2, btn = (double)B * T * N * 2;
    const double fwd_bytes = 3 * btd + 2 * btn + btd;                  // u, dt, z, B, C in; y out
    const double bwd_bytes = 4 * btd + 2 * btn + 3 * btd + 2 * btn;    // u, dt, z, dy, B, C in; du, ddt, dz, dB, dC out
    const double floor_fwd = fwd_bytes / 3.0e12 * 1e3, floor_all = (fwd_bytes + bwd_bytes) / 3.0e12 * 1e3;
    printf("  forward:          %.3f ms  %6.0f GB/s  floor %.3f ms  ratio %.2fx\n", t_fwd, fwd_bytes / t_fwd * 1e-6,
           floor_fwd, t_fwd / floor_fwd);
    printf("  forward+backward: %.3f ms  %6.0f GB/s  floor %.3f ms  ratio %.2fx (goal <= 1.5x)\n", t_all,
           (fwd_bytes + bwd_bytes) / t_all * 1e-6, floor_all, t_all / floor_all);
}

int main() {
    try {
        check(2, 300, 96, 16);
        check(1, 200, 40, 128);
        bench(16);
        bench(128);
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
