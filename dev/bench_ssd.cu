// Benchmark of the SSD scan (ssd.cuh) at ANCHORS.md's shape (B4 T4096 H64 P64 N128 G1, chunk 256), the
// mamba2-370m and mamba2-2.7b layer shapes, two short sequences (T 512, 1024) and one long one of few heads
// (hybrid-1.3b's layer at B1 T16384, where the forward runs in segments), each plain and with packed
// documents (many short ones, a few long: the length pattern DOC_LENGTHS, which dev/anchor_mamba_ssm.py
// repeats for mamba_ssm's seq_idx). Per shape: a correctness check against the sequential double reference
// (the forward on a few heads, dx and ddt of one head; per document with boundaries), then the median of
// cudaEvent timings of the forward and of forward+backward, TFLOP/s (the chunked algorithm's matmul FLOPs as
// ANCHORS.md counts them, backward counted as twice the forward) and the ratio to the anchor measured in the
// same device run (ANCHOR_LOG, dev/anchors.h), and to the anchor replayed from a CUDA graph where the log has that
// too (its Python launches untimed); also the forward and the backward's tile kernels on mma.sync (what
// sm_90a builds run for P = 32 only, and other GPUs for every P), the forward with every (b, h) row in 1, 2, 4,
// ... segments, and the plan this GPU chooses (ssd_forward_plan: the rows that run whole, the segments of the
// others; its time is the forward's), and forward+backward with the backward's tile blocks in groups of 1, 2,
// 4, ... (b, chunk) pairs (ssd::tile_index). The last lines are a compact table.
// usage: dev/bench_ssd [--shape NAME] [--iters N]     (NAME: bench 370m 2.7b T1024 T512 B1T16k)
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>
#include "flags.h"
#include "ssd.cuh"
#include "test/ref/ssd.h"
#include "dev/anchors.h"
#include "dev/timing.h"

struct Shape { const char* name; int B, T, H, P, N, G; };
static const Shape kShapes[] = {
    {"bench", 4, 4096, 64, 64, 128, 1},  // ANCHORS.md
    {"370m", 8, 2048, 32, 64, 128, 1},   // mamba2-370m layer: d_inner 2048
    {"2.7b", 4, 2048, 80, 64, 128, 1},   // mamba2-2.7b layer: d_inner 5120
    {"T1024", 4, 1024, 64, 64, 128, 1},
    {"T512", 4, 512, 64, 64, 128, 1},
    {"B1T16k", 1, 16384, 64, 64, 128, 1},  // hybrid-1.3b layer at B1 T16384: 64 (b, h) for 132 SMs
};
static const int kChunk = 256;
// document lengths, cycled from index b in row b until the row is full (the anchor script uses the same)
static const int DOC_LENGTHS[] = {100, 37, 250, 8, 1200, 64, 19, 500, 3, 180, 2000, 45};

static std::vector<int> doc_positions(int B, int T, int* ndocs) {
    const int n = sizeof(DOC_LENGTHS) / sizeof(int);
    std::vector<int> pos((size_t)B * T);
    *ndocs = 0;
    for (int b = 0; b < B; b++)
        for (int t = 0, k = b; t < T; k++) {
            const int len = std::min(DOC_LENGTHS[k % n], T - t);
            for (int i = 0; i < len; i++) pos[(size_t)b * T + t + i] = i;
            t += len;
            (*ndocs)++;
        }
    return pos;
}

static std::string shape_label(const Shape& s) {
    return strformat("B%d T%d H%d P%d N%d G%d", s.B, s.T, s.H, s.P, s.N, s.G);
}

struct Result { double fwd = NAN, all = NAN, fwd_docs = NAN, all_docs = NAN, fwd_mma_sync = NAN, all_mma_sync = NAN; };

static double rel_err(const std::vector<double>& got, const std::vector<double>& ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        const double d = std::isfinite(got[i]) ? got[i] - ref[i] : INFINITY;
        num += d * d;
        den += ref[i] * ref[i];
    }
    return std::sqrt(num / den);
}

static Result run_shape(const Shape& s, int iters) {
    const int B = s.B, T = s.T, H = s.H, P = s.P, N = s.N, G = s.G;
    const SSDShape sh{B, T, H, P, G, N, kChunk};
    const int HP = H * P, GN = G * N, row = HP + 2 * GN;  // x | B | C as in the model's conv output rows
    const int dt_stride = 2 * HP + 2 * GN + H;           // dt is the last column slice of the in_proj output
    const size_t BT = (size_t)B * T;

    std::mt19937_64 gen(1234);
    std::normal_distribution<float> normal(0.f, 1.f);
    std::uniform_real_distribution<float> unif(0.f, 1.f);
    std::vector<bf16> h_xbc(BT * row), h_dt(BT * dt_stride, __float2bfloat16(0.f)), h_dy(BT * HP);
    std::vector<bf16> h_bias(H), h_alog(H), h_D(H);
    for (auto& v : h_xbc) v = __float2bfloat16(normal(gen));
    for (auto& v : h_dy) v = __float2bfloat16(normal(gen));
    for (size_t r = 0; r < BT; r++)
        for (int h = 0; h < H; h++) h_dt[r * dt_stride + h] = __float2bfloat16(-4.f * unif(gen));
    for (int h = 0; h < H; h++) {
        const float target = expf(logf(1e-3f) + unif(gen) * (logf(1e-1f) - logf(1e-3f)));
        h_bias[h] = __float2bfloat16(logf(expm1f(target)));
        h_alog[h] = __float2bfloat16(logf(1.f + 15.f * unif(gen)));
        h_D[h] = __float2bfloat16(0.5f + unif(gen));
    }
    int ndocs = 0;
    const std::vector<int> h_pos = doc_positions(B, T, &ndocs);

    auto upload = [](const auto& v) {
        using T_ = typename std::decay_t<decltype(v)>::value_type;
        T_* d = cuda_malloc_n<T_>(v.size(), "bench input");
        cudaCheck(cudaMemcpy(d, v.data(), v.size() * sizeof(T_), cudaMemcpyHostToDevice));
        return d;
    };
    bf16 *d_xbc = upload(h_xbc), *d_dt = upload(h_dt), *d_dy = upload(h_dy);
    bf16 *d_bias = upload(h_bias), *d_alog = upload(h_alog), *d_D = upload(h_D);
    int* d_pos = upload(h_pos);
    bf16* d_y = cuda_malloc_n<bf16>(BT * HP, "y");
    bf16* d_dxbc = cuda_malloc_n<bf16>(BT * row, "dxbc");
    bf16* d_ddt = cuda_malloc_n<bf16>(BT * dt_stride, "ddt");
    float* d_pg = cuda_malloc_n<float>(3 * H, "param grads");
    cudaCheck(cudaMemset(d_pg, 0, 3 * H * sizeof(float)));
    void* saved = cuda_malloc(ssd_saved_bytes(sh), "ssd saved");
    void* scratch = cuda_malloc(ssd_scratch_bytes(sh), "ssd scratch");

    // x, B, C: column slices of one xBC row, as in the model
    SSDInputs in{d_xbc, d_xbc + HP, d_xbc + HP + GN, d_dt, row, row, dt_stride, d_bias, d_alog, d_D};
    SSDGrads gr{d_dxbc, d_dxbc + HP, d_dxbc + HP + GN, d_ddt, row, row, dt_stride, d_pg, d_pg + H, d_pg + 2 * H};

    const std::string label = shape_label(s);
    printf("ssd %s %s chunk %d: saved %.1f MiB, scratch %.1f MiB, %d documents with boundaries (mean length %.0f)\n",
           s.name, label.c_str(), kChunk, ssd_saved_bytes(sh) / 1048576.0, ssd_scratch_bytes(sh) / 1048576.0, ndocs,
           (double)BT / ndocs);

    // check: the forward on a few (b, h), dx and ddt of one; each document its own sequence
    auto check = [&](bool docs) {
        in.pos = docs ? d_pos : nullptr;
        cudaCheck(cudaMemset(d_y, 0xff, BT * HP * sizeof(bf16)));
        cudaCheck(cudaMemset(d_dxbc, 0xff, BT * row * sizeof(bf16)));
        cudaCheck(cudaMemset(d_ddt, 0xff, BT * dt_stride * sizeof(bf16)));
        ssd_forward(d_y, saved, scratch, in, sh, 0);
        ssd_backward(gr, scratch, d_dy, in, saved, sh, 0);
        cudaCheck(cudaDeviceSynchronize());
        std::vector<bf16> y(BT * HP), dxbc(BT * row), ddt(BT * dt_stride);
        cudaCheck(cudaMemcpy(y.data(), d_y, y.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(dxbc.data(), d_dxbc, dxbc.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(ddt.data(), d_ddt, ddt.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
        const int checks[3][2] = {{0, 0}, {B / 2, H / 2 + 1}, {B - 1, H - 1}};
        for (int k = 0; k < 3; k++) {
            const int b = checks[k][0], h = checks[k][1], g = h / (H / G);
            std::vector<double> ry(T * P), rdx(T * P), rdB(T * N), rdC(T * N), rddt(T), got_y(T * P), got_dx(T * P),
                got_ddt(T);
            double dbias = 0, dalog = 0, dD = 0;
            const double bias = __bfloat162float(h_bias[h]), alog = __bfloat162float(h_alog[h]),
                         D = __bfloat162float(h_D[h]);
            for (int t0 = 0; t0 < T;) {
                int t1 = t0 + 1;
                while (t1 < T && !(docs && h_pos[(size_t)b * T + t1] == 0)) t1++;
                const int L = t1 - t0;
                std::vector<double> x(L * P), Bm(L * N), Cm(L * N), dt(L), dy(L * P), y(L * P), dx(L * P), dB(L * N),
                    dC(L * N), dd(L);
                for (int t = 0; t < L; t++) {
                    const size_t r = (size_t)b * T + t0 + t;
                    for (int p = 0; p < P; p++) x[t * P + p] = __bfloat162float(h_xbc[r * row + h * P + p]);
                    for (int p = 0; p < P; p++) dy[t * P + p] = __bfloat162float(h_dy[r * HP + h * P + p]);
                    for (int n = 0; n < N; n++) Bm[t * N + n] = __bfloat162float(h_xbc[r * row + HP + g * N + n]);
                    for (int n = 0; n < N; n++) Cm[t * N + n] = __bfloat162float(h_xbc[r * row + HP + GN + g * N + n]);
                    dt[t] = __bfloat162float(h_dt[r * dt_stride + h]);
                }
                ref::ssd_forward(y.data(), x.data(), Bm.data(), Cm.data(), dt.data(), &bias, &alog, &D, 1, L, 1, P, 1, N);
                std::copy(y.begin(), y.end(), ry.begin() + t0 * P);
                if (k == 0) {
                    ref::ssd_backward(dx.data(), dB.data(), dC.data(), dd.data(), &dbias, &dalog, &dD, dy.data(),
                                      x.data(), Bm.data(), Cm.data(), dt.data(), &bias, &alog, &D, 1, L, 1, P, 1, N);
                    std::copy(dx.begin(), dx.end(), rdx.begin() + t0 * P);
                    std::copy(dd.begin(), dd.end(), rddt.begin() + t0);
                }
                t0 = t1;
            }
            for (int t = 0; t < T; t++) {
                const size_t r = (size_t)b * T + t;
                for (int p = 0; p < P; p++) {
                    got_y[t * P + p] = __bfloat162float(y[r * HP + h * P + p]);
                    got_dx[t * P + p] = __bfloat162float(dxbc[r * row + h * P + p]);
                }
                got_ddt[t] = __bfloat162float(ddt[r * dt_stride + h]);
            }
            const double ey = rel_err(got_y, ry);
            printf("  check%s b=%d h=%d: y rel L2 %.2e", docs ? " (documents)" : "", b, h, ey);
            if (!(ey < 1e-2)) THROW("ssd forward mismatch at b=%d h=%d: rel L2 %.3e", b, h, ey);
            if (k == 0) {
                const double ex = rel_err(got_dx, rdx), et = rel_err(got_ddt, rddt);
                printf(", dx %.2e, ddt %.2e", ex, et);
                if (!(ex < 1e-2 && et < 1e-2)) THROW("ssd backward mismatch at b=%d h=%d: dx %.3e ddt %.3e", b, h, ex, et);
            }
            printf("\n");
        }
    };
    check(false);
    check(true);

    auto fwd = [&]() { ssd_forward(d_y, saved, scratch, in, sh, 0); };
    auto all = [&]() {
        ssd_forward(d_y, saved, scratch, in, sh, 0);
        ssd_backward(gr, scratch, d_dy, in, saved, sh, 0);
    };
    const int warmup = 5;
    Result r;
    in.pos = nullptr;
    r.fwd = time_ms(fwd, warmup, iters);
    r.all = time_ms(all, warmup, iters);
    r.fwd_mma_sync = time_ms([&]() { ssd_forward(d_y, saved, scratch, in, sh, 0, 0, true); }, warmup, iters);
    r.all_mma_sync = time_ms([&]() {  // the forward as in r.all, the backward's tile kernels on mma.sync
        ssd_forward(d_y, saved, scratch, in, sh, 0);
        ssd_backward(gr, scratch, d_dy, in, saved, sh, 0, 0, true);
    }, warmup, iters);
    // the forward with every row in 1, 2, 4, ... segments
    std::string segs = strformat("  %-20s", "forward, segments:");
    for (int nseg = 1; nseg <= ssd::nchunks(sh) && nseg <= 16; nseg *= 2)
        segs += strformat(" %d: %.3f ms", nseg, time_ms([&]() { ssd_forward(d_y, saved, scratch, in, sh, 0, nseg); },
                                                         warmup, iters));
    // forward+backward with the backward's tile blocks in groups of 1, 2, 4, ... (b, chunk) pairs (ssd::tile_index)
    std::string groups = strformat("  %-20s", "fwd+bwd, tile groups:");
    const int pairs = B * ssd::nchunks(sh);
    for (int group = 1;; group = std::min(2 * group, pairs)) {
        groups += strformat(" %d: %.3f ms", group, time_ms([&]() {
                                ssd_forward(d_y, saved, scratch, in, sh, 0);
                                ssd_backward(gr, scratch, d_dy, in, saved, sh, 0, group);
                            }, warmup, iters));
        if (group == pairs) break;
    }
    in.pos = d_pos;
    r.fwd_docs = time_ms(fwd, warmup, iters);
    r.all_docs = time_ms(all, warmup, iters);

    // FLOPs of the chunked algorithm (ANCHORS.md)
    const double Q = kChunk, nc = std::ceil((double)T / Q);
    const double fwd_flops = B * nc * (G * 2.0 * Q * Q * N + H * (2.0 * Q * Q * P + 4.0 * Q * N * P));
    const std::string prefix = "anchor ssd " + label + ":", prefix_docs = "anchor ssd-docs " + label + ":";
    auto line = [&](const char* what, double ms, double flops, double anchor) {
        print_vs_anchor(strformat("  %-20s (%6.1f TFLOP/s)", what, flops / ms * 1e-9).c_str(), ms, anchor);
    };
    line("forward", r.fwd, fwd_flops, anchor_value(prefix, "fwd"));
    line("forward+backward", r.all, 3 * fwd_flops, anchor_value(prefix, "fwd+bwd"));
    // the anchor replayed from a CUDA graph (its Python launches not timed), when its log has it
    const std::string prefix_graph = "anchor ssd-graph " + label + ":";
    if (!std::isnan(anchor_value(prefix_graph, "fwd"))) {
        line("fwd, graphed anchor", r.fwd, fwd_flops, anchor_value(prefix_graph, "fwd"));
        line("f+b, graphed anchor", r.all, 3 * fwd_flops, anchor_value(prefix_graph, "fwd+bwd"));
    }
    printf("  %-20s (%6.1f TFLOP/s) %.3f ms: the wgmma kernel is %.2fx faster\n", "forward, mma.sync",
           fwd_flops / r.fwd_mma_sync * 1e-9, r.fwd_mma_sync, r.fwd_mma_sync / r.fwd);
    printf("  %-20s (%6.1f TFLOP/s) %.3f ms: the wgmma tile kernels save %.3f ms\n", "fwd+bwd, mma.sync",
           3 * fwd_flops / r.all_mma_sync * 1e-9, r.all_mma_sync, r.all_mma_sync - r.all);
    printf("%s\n", segs.c_str());
    printf("%s (of %d pairs; the default's groups fill the GPU)\n", groups.c_str(), pairs);
    const ssd::ForwardPlan plan = ssd_forward_plan(sh);
    printf("  %-20s %d whole + %d in %d segments: %.3f ms\n", "forward, plan:", plan.whole,
           ssd::forward_split_rows(sh, plan), ssd::forward_segments(sh, plan), r.fwd);
    line("forward, documents", r.fwd_docs, fwd_flops, anchor_value(prefix_docs, "fwd"));
    line("fwd+bwd, documents", r.all_docs, 3 * fwd_flops, anchor_value(prefix_docs, "fwd+bwd"));

    for (void* p : {(void*)d_xbc, (void*)d_dt, (void*)d_dy, (void*)d_bias, (void*)d_alog, (void*)d_D, (void*)d_pos,
                    (void*)d_y, (void*)d_dxbc, (void*)d_ddt, (void*)d_pg, saved, scratch})
        cudaCheck(cudaFree(p));
    return r;
}

int main(int argc, char** argv) {
    try {
        std::string only;
        int iters = 30;
        Flags f("usage: bench_ssd [flags]");
        f.add({"--shape"}, &only, "NAME", "one shape only: bench, 370m, 2.7b, T1024, T512 or B1T16k");
        f.add({"--iters"}, &iters, "N", "timed repetitions", Range::at_least(1));
        if (!f.parse(argc, argv).empty()) THROW("bench_ssd takes no positional arguments (see --help)");
        std::vector<std::pair<Shape, Result>> done;
        for (const Shape& s : kShapes)
            if (only.empty() || only == s.name) done.push_back({s, run_shape(s, iters)});
        if (done.empty()) THROW("no shape named '%s'", only.c_str());

        // compact table: ours, the anchor and anchor / ours (above 1: faster than the anchor)
        printf("\nssd summary (ms; x = anchor / ours; goal: fwd and fwd+bwd >= 2x at bench, 370m, 2.7b, >= 1x at T512/T1024)\n");
        printf("%-6s %-28s | %7s %7s %6s | %7s %7s %6s | %9s %9s\n", "shape", "", "fwd", "anchor", "x", "fwd+bwd",
               "anchor", "x", "docs fwd", "docs f+b");
        for (auto& [s, r] : done) {
            const std::string label = shape_label(s), prefix = "anchor ssd " + label + ":";
            const double af = anchor_value(prefix, "fwd"), ab = anchor_value(prefix, "fwd+bwd");
            printf("%-6s %-28s | %7.3f %7.3f %5.2fx | %7.3f %7.3f %5.2fx | %9.3f %9.3f\n", s.name, label.c_str(), r.fwd,
                   af, af / r.fwd, r.all, ab, ab / r.all, r.fwd_docs, r.all_docs);
        }
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
