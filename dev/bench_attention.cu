// Benchmark of causal grouped-query flash attention (attention.cuh). Checks forward and backward against
// the double reference at small shapes first (with and without packed documents, every path of the
// build; a path that fails prints FAIL, is not timed, and the exit status is 1), then times forward and forward+backward (median of cudaEvent timings) over sequence lengths
// 1k-64k (B adjusted to keep the work near B4 L4096), GQA ratios 1, 4, 8 and packed documents, in TFLOP/s
// of the causal FLOPs as the anchors count them: forward 4 B Hq T^2 Dh / 2, forward+backward 3.5x that
// (with documents, the FLOPs of the documents' own causal blocks). The anchor (torch SDPA, cuDNN) comes from
// the same device run through ANCHOR_LOG (dev/anchors.h). On Hopper builds the mma.sync kernels are timed
// beside the wgmma ones at the anchor shapes; --sm80 times them everywhere instead. Then the Hopper backward's
// kernels one by one and, with --sweep, the forward's tile variants and the backward's dQ variants at the
// anchor shape.
// usage: bench_attention [--sm80] [--quick] [--sweep]  (--quick: the anchor shapes only; --sweep: also the
// forward's and the backward's variants, each checked; both: the variants after the anchor shapes only, which
// reaches them over a minute sooner)
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>
#include "attention.cuh"
#include "test/ref/attention.h"
#include "dev/anchors.h"
#include "dev/timing.h"

using FwdFn = void (*)(bf16*, float*, const bf16*, const AttnShape&, const int*, cudaStream_t);
using BwdFn = void (*)(bf16*, void*, const bf16*, const bf16*, const bf16*, const float*, const AttnShape&, const int*,
                       cudaStream_t);
struct Path { const char* name; FwdFn fwd; BwdFn bwd; };

// documents of lengths drawn uniformly from [lo, hi] packed into every sequence (none if hi == 0)
static std::vector<int> make_positions(int B, int T, int lo, int hi, uint64_t seed) {
    if (hi == 0) return {};
    std::mt19937_64 gen(seed);
    std::vector<int> pos((size_t)B * T);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T;) {
            const int len = std::uniform_int_distribution<int>(lo, hi)(gen);
            for (int i = 0; i < len && t < T; i++, t++) pos[(size_t)b * T + t] = i;
        }
    return pos;
}

struct Bufs {
    AttnShape sh;
    size_t BT;
    int nq, nkv, row;
    std::vector<bf16> h_qkv, h_dout;
    std::vector<int> h_pos;
    bf16 *qkv, *dout, *out, *dqkv;
    float* lse;
    int* pos = nullptr;
    void* scratch;
    Bufs(const AttnShape& s, const std::vector<int>& positions, uint64_t seed) : sh(s), h_pos(positions) {
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
        if (!h_pos.empty()) {
            pos = cuda_malloc_n<int>(h_pos.size(), "pos");
            cudaCheck(cudaMemcpy(pos, h_pos.data(), h_pos.size() * sizeof(int), cudaMemcpyHostToDevice));
        }
        out = cuda_malloc_n<bf16>(BT * nq, "out");
        dqkv = cuda_malloc_n<bf16>(BT * row, "dqkv");
        lse = cuda_malloc_n<float>((size_t)sh.B * sh.Hq * sh.T, "lse");
        scratch = cuda_malloc(attention_scratch_bytes(sh), "scratch");
    }
    ~Bufs() {
        for (void* p : {(void*)qkv, (void*)dout, (void*)out, (void*)dqkv, (void*)lse, (void*)pos, scratch})
            cudaCheck(cudaFree(p));
    }
    void fwd(const Path& p) { p.fwd(out, lse, qkv, sh, pos, 0); }
    void bwd(const Path& p) { p.bwd(dqkv, scratch, dout, qkv, out, lse, sh, pos, 0); }
    // forward FLOPs of the causal blocks (of each document with positions)
    double fwd_flops() const {
        const double per = 4.0 * sh.Hq * sh.Dh / 2;
        if (h_pos.empty()) return per * sh.B * (double)sh.T * sh.T;
        double f = 0;
        for (size_t i = 0; i < h_pos.size(); i++) f += 2.0 * (h_pos[i] + 1);  // row i sees pos + 1 keys
        return per * f;
    }
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

// the path's results against the reference (run per document), rel L2 < 2e-2 or an error
static void check_small(const Path& path, const AttnShape& sh, int doc_lo, int doc_hi, bool print = true) {
    Bufs bu(sh, make_positions(sh.B, sh.T, doc_lo, doc_hi, 5), 7);
    cudaCheck(cudaMemset(bu.out, 0xff, bu.BT * bu.nq * sizeof(bf16)));
    cudaCheck(cudaMemset(bu.dqkv, 0xff, bu.BT * bu.row * sizeof(bf16)));
    bu.fwd(path);
    bu.bwd(path);
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
    std::vector<double> ro(bu.BT * bu.nq), rdq(bu.BT * bu.nq), rdk(bu.BT * bu.nkv), rdv(bu.BT * bu.nkv);
    // one reference call per document (rows [t0, t1) of sequence b)
    for (int b = 0; b < sh.B; b++)
        for (int t0 = 0; t0 < sh.T;) {
            int t1 = t0 + 1;
            while (t1 < sh.T && !(bu.pos && bu.h_pos[(size_t)b * sh.T + t1] == 0)) t1++;
            const int n = t1 - t0;
            const size_t r0 = (size_t)b * sh.T + t0;
            auto sl = [&](const std::vector<double>& x, int w) {
                return std::vector<double>(x.begin() + r0 * w, x.begin() + (r0 + n) * w);
            };
            std::vector<double> dq_ = sl(q, bu.nq), dk_ = sl(k, bu.nkv), dv_ = sl(v, bu.nkv), ddo = sl(dout, bu.nq);
            std::vector<double> o(dq_.size()), l((size_t)sh.Hq * n), gq(dq_.size()), gk(dk_.size()), gv(dv_.size());
            ref::attention_forward(o.data(), l.data(), dq_.data(), dk_.data(), dv_.data(), 1, n, sh.Hq, sh.Hkv, sh.Dh);
            ref::attention_backward(gq.data(), gk.data(), gv.data(), ddo.data(), dq_.data(), dk_.data(), dv_.data(),
                                    1, n, sh.Hq, sh.Hkv, sh.Dh);
            std::copy(o.begin(), o.end(), ro.begin() + r0 * bu.nq);
            std::copy(gq.begin(), gq.end(), rdq.begin() + r0 * bu.nq);
            std::copy(gk.begin(), gk.end(), rdk.begin() + r0 * bu.nkv);
            std::copy(gv.begin(), gv.end(), rdv.begin() + r0 * bu.nkv);
            t0 = t1;
        }
    const double e[4] = {rel_err(out, bu.nq, 0, ro, bu.nq), rel_err(dqkv, bu.row, 0, rdq, bu.nq),
                         rel_err(dqkv, bu.row, bu.nq, rdk, bu.nkv), rel_err(dqkv, bu.row, bu.nq + bu.nkv, rdv, bu.nkv)};
    if (print)
        printf("check %-16s B=%d T=%d Hq=%d Hkv=%d Dh=%d%s: rel L2 out %.2e dq %.2e dk %.2e dv %.2e\n", path.name, sh.B,
           sh.T, sh.Hq, sh.Hkv, sh.Dh, doc_hi ? " docs" : "", e[0], e[1], e[2], e[3]);
    for (double x : e)
        if (!(x < 2e-2)) THROW("attention (%s) mismatch at the check shape: rel L2 %.3e", path.name, x);
}

struct Row {
    std::string path;
    AttnShape sh;
    std::string docs;
    double fwd_ms, fwd_tf, all_ms, all_tf;
};

static Row time_case(const Path& path, const AttnShape& sh, int doc_lo, int doc_hi) {
    Bufs bu(sh, make_positions(sh.B, sh.T, doc_lo, doc_hi, 11), 1234);
    const double work = bu.fwd_flops();
    const int iters = work > 5e12 ? 3 : 10, warmup = work > 5e12 ? 1 : 3;
    const float t_fwd = time_ms([&]() { bu.fwd(path); }, warmup, iters);
    const float t_all = time_ms([&]() { bu.fwd(path); bu.bwd(path); }, warmup, iters);
    std::string docs = doc_hi ? std::to_string(doc_lo) + "-" + std::to_string(doc_hi) : "-";
    return {path.name, sh, docs, t_fwd, work / t_fwd * 1e-9, t_all, 3.5 * work / t_all * 1e-9};
}

static void print_rows(const std::vector<Row>& rows) {
    printf("%-16s %4s %3s %6s %3s %3s %10s %9s %8s %9s %8s\n", "path", "Dh", "B", "T", "Hq", "Hkv", "docs", "fwd ms",
           "TFLOP/s", "f+b ms", "TFLOP/s");
    for (const Row& r : rows)
        printf("%-16s %4d %3d %6d %3d %3d %10s %9.3f %8.1f %9.3f %8.1f\n", r.path.c_str(), r.sh.Dh, r.sh.B, r.sh.T,
               r.sh.Hq, r.sh.Hkv, r.docs.c_str(), r.fwd_ms, r.fwd_tf, r.all_ms, r.all_tf);
}

#ifdef SM90A
// The forward's tile variants (D, consumer warpgroups, BN, stages, ping-pong, Q buffers), each checked before
// it is timed: at small shapes against the reference (with the model's backward on the variant's lse), and at
// the anchor shape against the mma.sync kernel's output. A variant that fails prints FAIL, not a time.
static void sweep_forward_variants(const Path& model, const Path& mma_sync) {
    using namespace attn::sm90;
    struct Variant { const char* name; int D; FwdFn fwd; };
    const Variant variants[] = {
        {"128 2wg bn128 s2 -- q2", 128, launch_fwd<128, 2, 128, 2, false, 2>},
        {"128 2wg bn128 s2 pp q2", 128, launch_fwd<128, 2, 128, 2, true, 2>},
        {"128 2wg bn128 s2 pp q1", 128, launch_fwd<128, 2, 128, 2, true, 1>},
        {"128 2wg bn64  s4 pp q2", 128, launch_fwd<128, 2, 64, 4, true, 2>},
        {"128 3wg bn64  s3 pp q1", 128, launch_fwd<128, 3, 64, 3, true, 1>},
        {"64 2wg bn128 s3 -- q2", 64, launch_fwd<64, 2, 128, 3, false, 2>},
        {"64 2wg bn128 s3 -- q1", 64, launch_fwd<64, 2, 128, 3, false, 1>},
        {"64 2wg bn128 s4 -- q2", 64, launch_fwd<64, 2, 128, 4, false, 2>},
        {"64 2wg bn128 s3 pp q2", 64, launch_fwd<64, 2, 128, 3, true, 2>},
        {"64 3wg bn128 s3 pp q2", 64, launch_fwd<64, 3, 128, 3, true, 2>},
        {"64 3wg bn128 s4 pp q2", 64, launch_fwd<64, 3, 128, 4, true, 2>},
        {"64 3wg bn128 s3 pp q1", 64, launch_fwd<64, 3, 128, 3, true, 1>},
        {"64 3wg bn128 s3 -- q2", 64, launch_fwd<64, 3, 128, 3, false, 2>},
        {"64 3wg bn128 s2 -- q2", 64, launch_fwd<64, 3, 128, 2, false, 2>},
    };
    printf("forward variants (B4 L4096 16q/4kv): D, consumer warpgroups, BN, stages, ping-pong, Q buffers; "
           "check = rel L2 vs mma.sync at this shape\n");
    for (int Dh : {128, 64}) {
        Bufs bu({4, 4096, 16, 4, Dh}, {}, 1234);
        const double work = bu.fwd_flops();
        const size_t n = bu.BT * bu.nq;
        std::vector<bf16> want(n), got(n);
        bu.fwd(mma_sync);
        cudaCheck(cudaMemcpy(want.data(), bu.out, n * sizeof(bf16), cudaMemcpyDeviceToHost));
        std::vector<double> ref(n);
        for (size_t i = 0; i < n; i++) ref[i] = __bfloat162float(want[i]);
        for (const Variant& v : variants) {
            if (v.D != Dh) continue;
            const Path path{v.name, v.fwd, model.bwd};
            double err = INFINITY;
            std::string why;
            try {
                check_small(path, {2, 333, 4, 2, Dh}, 1, 150, false);
                check_small(path, {1, 300, 8, 1, Dh}, 0, 0, false);
                check_small(path, {3, 200, 4, 4, Dh}, 1, 40, false);
                cudaCheck(cudaMemset(bu.out, 0xff, n * sizeof(bf16)));
                bu.fwd(path);
                cudaCheck(cudaMemcpy(got.data(), bu.out, n * sizeof(bf16), cudaMemcpyDeviceToHost));
                err = rel_err(got, bu.nq, 0, ref, bu.nq);
                if (!(err < 2e-2)) why = "differs from mma.sync at this shape";
            } catch (const std::exception& e) {
                why = e.what();
            }
            if (!why.empty()) {
                printf("  fwd D%-30s FAIL (%s, rel L2 %.2e)\n", v.name, why.c_str(), err);
                fflush(stdout);
                continue;
            }
            const float t = time_ms([&]() { bu.fwd(path); }, 3, 10);
            printf("  fwd D%-30s %.3f ms %6.1f TFLOP/s  check %.1e\n", v.name, t, work / t * 1e-9, err);
            fflush(stdout);
        }
    }
}

// The backward's dQ variants (DQ_ASYNC and ORDERED of bwd_kernel: unordered says what the deterministic order
// costs), checked like the forward's, then timed alone
static void sweep_backward_variants(const Path& model) {
    using namespace attn::sm90;
    struct Variant { const char* name; int D; BwdFn bwd; };
    const Variant variants[] = {
        {"64 dq async", 64, backward<64, true>},
        {"64 dq waited", 64, backward<64, false>},
        {"64 dq async, unordered", 64, backward<64, true, false>},
        {"128 dq waited", 128, backward<128, false>},
        {"128 dq waited, unordered", 128, backward<128, false, false>},
    };
    printf("backward variants (B4 L4096 16q/4kv), TFLOP/s of the backward's 2.5x forward FLOPs:\n");
    for (const Variant& v : variants) {
        const Path path{v.name, model.fwd, v.bwd};
        try {
            check_small(path, {2, 333, 4, 2, v.D}, 1, 150, false);
            check_small(path, {1, 300, 8, 1, v.D}, 0, 0, false);
            check_small(path, {3, 200, 4, 4, v.D}, 1, 40, false);
        } catch (const std::exception& e) {
            printf("  bwd D%-34s FAIL (%s)\n", v.name, e.what());
            continue;
        }
        Bufs bu({4, 4096, 16, 4, v.D}, {}, 1234);
        bu.fwd(path);
        const float t = time_ms([&]() { bu.bwd(path); }, 3, 10);
        printf("  bwd D%-34s %.3f ms %6.1f TFLOP/s\n", v.name, t, 2.5 * bu.fwd_flops() / t * 1e-9);
        fflush(stdout);
    }
}
#endif

int main(int argc, char** argv) {
    bool sm80 = false, quick = false, sweep = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--sm80")) sm80 = true;
        else if (!strcmp(argv[i], "--quick")) quick = true;
        else if (!strcmp(argv[i], "--sweep")) sweep = true;
        else {
            fprintf(stderr, "usage: bench_attention [--sm80] [--quick] [--sweep]\n");
            return 1;
        }
    }
    try {
        const Path mma_sync{"sm80 (mma.sync)", attn::sm80_forward, attn::sm80_backward};
#ifdef SM90A
        const Path model{"sm90 (wgmma)", attention_forward, attention_backward};
        std::vector<Path> paths = {model, mma_sync};
#else
        const Path model{"sm80 (mma.sync)", attention_forward, attention_backward};
        std::vector<Path> paths = {model};
#endif
        const Path& main_path = sm80 ? mma_sync : model;
        // a path that fails its checks prints FAIL and is not timed (the rest of the run goes on)
        std::vector<std::string> failed;
        for (const Path& p : paths) {
            try {
                check_small(p, {1, 300, 4, 1, 128}, 0, 0);
                check_small(p, {2, 150, 4, 2, 64}, 0, 0);
                check_small(p, {2, 333, 4, 2, 128}, 1, 150);
                check_small(p, {1, 200, 8, 1, 64}, 1, 40);
            } catch (const std::exception& e) {
                printf("check %-16s FAIL: %s\n", p.name, e.what());
                failed.push_back(p.name);
            }
        }
        auto ok = [&](const Path& p) { return std::find(failed.begin(), failed.end(), p.name) == failed.end(); };

        std::vector<Row> rows;
        for (int Dh : {128, 64}) {
            if (!ok(main_path)) break;
            const AttnShape anchor{4, 4096, 16, 4, Dh};
            for (const Path& p : paths)
                if (ok(p) && (!sm80 || !strcmp(p.name, mma_sync.name))) rows.push_back(time_case(p, anchor, 0, 0));
            const char* prefix = Dh == 128 ? "attn-anchor cudnn D=128:" : "attn-anchor cudnn D=64:";
            const Row& ours = *std::find_if(rows.rbegin(), rows.rend(), [&](const Row& r) { return r.path == main_path.name; });
            char what[96];
            snprintf(what, sizeof what, "attention fwd, B4 L4096 16q/4kv Dh%d (%s)", Dh, ours.path.c_str());
            print_vs_anchor(what, ours.fwd_ms, anchor_value(prefix, "fwd"));
            snprintf(what, sizeof what, "attention fwd+bwd, B4 L4096 16q/4kv Dh%d (%s)", Dh, ours.path.c_str());
            print_vs_anchor(what, ours.all_ms, anchor_value(prefix, "fwd+bwd"));
            if (quick) continue;
            // sequence lengths (B keeps B T^2 near the anchor's up to 16k; 64k is 16x its work)
            for (auto [B, T] : {std::pair{16, 1024}, std::pair{1, 16384}, std::pair{1, 65536}})
                rows.push_back(time_case(main_path, {B, T, 16, 4, Dh}, 0, 0));
            // GQA ratios 1 and 8 (4 is the anchor shape)
            for (int Hkv : {16, 2}) rows.push_back(time_case(main_path, {4, 4096, 16, Hkv, Dh}, 0, 0));
            // packed documents: long, mixed, short
            for (auto [lo, hi] : {std::pair{1024, 4096}, std::pair{64, 2048}, std::pair{16, 512}})
                rows.push_back(time_case(main_path, {4, 4096, 16, 4, Dh}, lo, hi));
        }

#ifdef SM90A
        if (!quick && !sm80 && ok(model)) {  // the backward's kernels one by one
            printf("backward kernels (B4 L4096 16q/4kv), TFLOP/s of the backward's 2.5x forward FLOPs:\n");
            for (int Dh : {128, 64}) {
                Bufs bu({4, 4096, 16, 4, Dh}, {}, 1234);
                const double work = 2.5 * bu.fwd_flops();
                bu.fwd(model);
                using namespace attn::sm90;
                const AttnShape& sh = bu.sh;
                auto t = [&](auto f) { return time_ms(f, 3, 10); };
                // main after prep (which clears the turn counters), less prep alone
                float tp, tm, td;
                if (Dh == 128) {
                    tp = t([&]() { launch_bwd_prep<128>(bu.scratch, bu.dout, bu.out, bu.lse, sh, nullptr, 0); });
                    tm = t([&]() {
                        launch_bwd_prep<128>(bu.scratch, bu.dout, bu.out, bu.lse, sh, nullptr, 0);
                        launch_bwd_main<128>(bu.dqkv, bu.scratch, bu.dout, bu.qkv, sh, nullptr, 0);
                    }) - tp;
                    td = t([&]() { launch_bwd_dq<128>(bu.dqkv, bu.scratch, sh, 0); });
                } else {
                    tp = t([&]() { launch_bwd_prep<64>(bu.scratch, bu.dout, bu.out, bu.lse, sh, nullptr, 0); });
                    tm = t([&]() {
                        launch_bwd_prep<64>(bu.scratch, bu.dout, bu.out, bu.lse, sh, nullptr, 0);
                        launch_bwd_main<64>(bu.dqkv, bu.scratch, bu.dout, bu.qkv, sh, nullptr, 0);
                    }) - tp;
                    td = t([&]() { launch_bwd_dq<64>(bu.dqkv, bu.scratch, sh, 0); });
                }
                printf("  Dh%d: prep (Delta, turn counters) %.3f ms | main %.3f ms %6.1f TFLOP/s | dq %.3f ms | "
                       "all %.3f ms %6.1f TFLOP/s\n", Dh, tp, tm, work / tm * 1e-9, td, tp + tm + td,
                       work / (tp + tm + td) * 1e-9);
            }
        }
#endif
        printf("\nattention, TFLOP/s of the causal FLOPs (forward 4 B Hq T^2 Dh / 2; fwd+bwd 3.5x; documents: their "
               "own blocks)\n");
        print_rows(rows);
        if (sweep && !sm80) {  // last: a variant that faults ends the run
#ifdef SM90A
            if (ok(mma_sync)) sweep_forward_variants(model, mma_sync);
            sweep_backward_variants(model);
#else
            printf("--sweep: the variants are the Hopper kernels' (make GPU_ARCH=90)\n");
#endif
        }
        if (!failed.empty()) return 1;
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
