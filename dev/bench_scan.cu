// Benchmark of the Mamba-1 selective scan (scan.cuh) at B=4, T=4096, D=4096, N=16 and N=128, beside
// mamba_ssm's selective_scan_cuda (../shared/anchors/scan_anchor.py, read through dev/anchors.h when the
// device run logged it). First checks forward and backward against the sequential double reference
// (test/ref/scan.h) at a small shape, then times forward and forward+backward (median of cudaEvent
// timings): without document boundaries, with many short documents (mean 64 steps) and with a few long
// ones (mean 1024), and the backward in two other thread layouts (to tune the defaults on the GPU).
// Prints ms, GB/s over the floor bytes and the ratio to the memory floor at 3.0 TB/s:
//   forward reads u, dt_raw, z, B, C once and writes y once;
//   backward reads u, dt_raw, z, B, C, dy once and writes du, ddt_raw, dz, dB, dC once (bf16).
// What bounds each kernel (scan.cuh's header): the forward one exp per (t,d,n) (MUFU), the backward
// instruction issue (~28 per (t,d,n)); the floor is far below both.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>
#include "scan.cuh"
#include "test/ref/scan.h"
#include "test/test_util.h"
#include "dev/anchors.h"
#include "dev/timing.h"

// Buffers of one shape in the model's layout: u (stride D), dt (stride D), z a slice of [x | z]
// (stride 2D), B/C slices of the x_proj row [dt_low | B | C] (stride R + 2N), gradients alike.
struct Bufs {
    int B, T, D, N, R;
    size_t BT;
    std::vector<bf16> h_u, h_dt, h_xz, h_xp, h_dy, h_bias, h_alog, h_D;
    bf16 *u, *dt, *xz, *xp, *dy, *bias, *alog, *Dk, *y, *du, *ddt, *dxz, *dxp;
    int* pos = nullptr;
    float* pg;
    void *saved, *scratch;
    size_t scratch_bytes;
    ScanShape sh() const { return ScanShape{B, T, D, N}; }
    int xps() const { return R + 2 * N; }
    ScanInputs in() const { return ScanInputs{u, D, dt, D, xz + D, 2 * D, xp + R, xp + R + N, xps(), bias, alog, Dk, pos}; }
    ScanGrads grads() const {
        return ScanGrads{du, ddt, dxz + D, dxp + R, dxp + R + N, D, D, 2 * D, xps(), pg, pg + D, pg + D + (size_t)D * N};
    }

    Bufs(int B_, int T_, int D_, int N_, uint64_t seed, size_t scratch_bytes_ = 0)
        : B(B_), T(T_), D(D_), N(N_), R(D_ / 16), BT((size_t)B_ * T_) {
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
        scratch_bytes = std::max(scratch_bytes_, scan_scratch_bytes(sh()));
        scratch = cuda_malloc(scratch_bytes, "scan scratch");
    }
    ~Bufs() {
        for (void* p : {(void*)u, (void*)dt, (void*)xz, (void*)xp, (void*)dy, (void*)bias, (void*)alog, (void*)Dk,
                        (void*)y, (void*)du, (void*)ddt, (void*)dxz, (void*)dxp, (void*)pos, (void*)pg, saved, scratch})
            cudaCheck(cudaFree(p));
    }
    template <typename T_>
    static T_* upload(const std::vector<T_>& v) {
        T_* d = cuda_malloc_n<T_>(v.size(), "bench input");
        cudaCheck(cudaMemcpy(d, v.data(), v.size() * sizeof(T_), cudaMemcpyHostToDevice));
        return d;
    }
    // documents of random lengths, uniform in [1, 2 mean - 1]; mean 0: none
    void set_documents(int mean, uint64_t seed) {
        cudaCheck(cudaFree(pos));
        pos = nullptr;
        if (mean == 0) return;
        std::mt19937_64 gen(seed);
        std::vector<int> h(BT);
        for (int b = 0; b < B; b++)
            for (int t = 0, p = 0, left = 0; t < T; t++, p++, left--) {
                if (left == 0) left = 1 + (int)(gen() % (2 * mean - 1)), p = 0;
                h[(size_t)b * T + t] = p;
            }
        pos = upload(h);
    }
    void fwd() { selective_scan_forward(y, saved, in(), sh(), 0); }
    void bwd() { selective_scan_backward(grads(), scratch, dy, in(), saved, sh(), 0); }
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

struct Row { std::string what; double fwd, all, floor_all, anchor_all; };

static const int kB = 4, kT = 4096, kD = 4096;

// the backward in thread layout L (4 states a thread, DPT channels, G lanes a group, W warps; TT-step tiles)
template <class L, int TT>
static void bench_layout(Bufs& bf, const char* name) {
    const ScanShape sh = bf.sh();
    const size_t need = scan::bwd_scratch<L>(sh, nullptr).total * sizeof(float);
    if (need > bf.scratch_bytes) THROW("layout %s needs %zu scratch bytes", name, need);
    const float t = time_ms([&]() { scan::launch_bwd<L, TT>(bf.grads(), bf.scratch, bf.dy, bf.in(), bf.saved, sh, 0); }, 3, 15);
    printf("  backward alone, %-34s %.3f ms\n", name, t);
}

static void bench(int N, std::vector<Row>& rows) {
    // room for the alternative layouts' larger block partials
    const size_t alt_scratch = N == 16 ? scan::bwd_scratch<scan::Layout<4, 1, 4, 4>>({kB, kT, kD, N}, nullptr).total * 4
                                       : scan::bwd_scratch<scan::Layout<4, 2, 32, 4>>({kB, kT, kD, N}, nullptr).total * 4;
    Bufs bf(kB, kT, kD, N, 1234, alt_scratch);
    printf("scan B=%d T=%d D=%d N=%d: saved %.1f MiB, scratch %.1f MiB\n", kB, kT, kD, N,
           scan_saved_bytes(bf.sh()) / 1048576.0, scan_scratch_bytes(bf.sh()) / 1048576.0);
    const double btd = (double)kB * kT * kD * 2, btn = (double)kB * kT * N * 2;
    const double fwd_bytes = 3 * btd + 2 * btn + btd;                  // u, dt, z, B, C in; y out
    const double bwd_bytes = 4 * btd + 2 * btn + 3 * btd + 2 * btn;    // u, dt, z, dy, B, C in; du, ddt, dz, dB, dC out
    const double floor_fwd = fwd_bytes / 3.0e12 * 1e3, floor_all = (fwd_bytes + bwd_bytes) / 3.0e12 * 1e3;
    const std::string key = "scan-anchor mamba_ssm selective_scan_cuda N=" + std::to_string(N) + " ";
    const double a_fwd = anchor_value(key, "fwd"), a_all = anchor_value(key, "fwd+bwd");
    for (int mean : {0, 64, 1024}) {
        bf.set_documents(mean, 7);
        const float t_fwd = time_ms([&]() { bf.fwd(); }, 3, 15);
        const float t_all = time_ms([&]() { bf.fwd(); bf.bwd(); }, 3, 15);
        const std::string what = "N=" + std::to_string(N) + (mean ? ", documents of mean " + std::to_string(mean) : "");
        printf("  %s\n", what.c_str());
        printf("    forward:          %.3f ms  %6.0f GB/s  floor %.3f ms  ratio %.2fx\n", t_fwd,
               fwd_bytes / t_fwd * 1e-6, floor_fwd, t_fwd / floor_fwd);
        printf("    forward+backward: %.3f ms  %6.0f GB/s  floor %.3f ms  ratio %.2fx\n", t_all,
               (fwd_bytes + bwd_bytes) / t_all * 1e-6, floor_all, t_all / floor_all);
        if (mean == 0) {
            print_vs_anchor("    forward vs selective_scan_cuda", t_fwd, a_fwd);
            print_vs_anchor("    forward+backward vs selective_scan_cuda", t_all, a_all);
        }
        rows.push_back({what, t_fwd, t_all, floor_all, mean ? NAN : a_all});
    }
    bf.set_documents(0, 0);
    bf.fwd();
    if (N == 16) {
        bench_layout<scan::Config<4, 2, 4>::Bwd, scan::TT_B>(bf, "default: 2 ch x 4 states, 4 warps");
        bench_layout<scan::Layout<4, 1, 4, 4>, 4>(bf, "1 ch x 4 states (2x the threads)");
        bench_layout<scan::Layout<4, 1, 4, 4>, 8>(bf, "1 ch x 4 states, 8-step tiles");
    } else {
        bench_layout<scan::Config<4, 2, 32>::Bwd, scan::TT_B>(bf, "default: 2 ch x 4 states, 8 warps");
        bench_layout<scan::Layout<4, 2, 32, 4>, 4>(bf, "4 warps (2x the dB/dC partials)");
    }
}

int main() {
    try {
        check(2, 300, 96, 16);
        check(1, 200, 40, 128);
        std::vector<Row> rows;
        bench(16, rows);
        bench(128, rows);
        printf("\nselective scan, B=%d L=%d d_inner=%d (floor: bytes at 3.0 TB/s; goals: fwd+bwd 2x faster than\n"
               "selective_scan_cuda at N=16 and 128, and within 3x of the floor at N=16)\n", kB, kT, kD);
        printf("%-30s %9s %12s %9s %14s %8s\n", "case", "fwd ms", "fwd+bwd ms", "x floor", "anchor fwd+bwd", "speedup");
        for (const Row& r : rows) {
            printf("%-30s %9.3f %12.3f %8.2fx ", r.what.c_str(), r.fwd, r.all, r.all / r.floor_all);
            if (std::isnan(r.anchor_all)) printf("%14s %8s\n", "-", "-");
            else printf("%11.3f ms %7.2fx\n", r.anchor_all, r.anchor_all / r.all);
        }
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
