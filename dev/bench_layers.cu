// Microbenchmarks of the memory-bound layers at a Mamba-2 model's shapes (B*T = 16384 unless -B, -T; --model
// 370m, the default: d_model 1024, d_inner 2048, conv_dim 2304; hybrid-1.3b: 2048, 4096, 4352;
// 2.7b: 2560, 5120, 5376; vocab 50304): causal conv1d + SiLU (also with document boundaries: many
// short documents, a few long ones), the gated grouped RMSNorm, RMSNorm and the fused classifier,
// forward and backward; and the optimizer step (the gradient norm, AdamW) over the model's parameters and
// mamba2-tiny's (fine-tuning's). Each layer is first checked against the double reference on a slice of rows,
// then timed (cudaEvents, median of 50 after warmup) and reported in GB/s against the
// device-to-device copy ceiling measured first (bytes read + written; 3.0 TB/s on an H100 in
// ANCHORS.md).
// usage: dev/bench_layers [--model 370m|hybrid-1.3b|2.7b] [-B 8] [-T 2048]
#include <algorithm>
#include <functional>
#include <random>
#include <string>
#include <vector>
#include "conv1d.cuh"
#include "norm.cuh"
#include "loss.cuh"
#include "mlp.cuh"
#include "mamba.cuh"  // ParamLayout
#include "optim.cuh"
#include "test/ref/conv1d.h"
#include "test/ref/norm.h"
#include "test/ref/mlp.h"
#include "dev/timing.h"
#include "flags.h"

static double kCeilingGBs = 0;

static double median_ms(const std::function<void()>& f) { return time_ms(f, 5, 50); }

static void report(const char* what, double ms, double bytes) {
    double gbs = bytes / ms / 1e6;
    printf("%-32s %8.3f ms %8.0f GB/s  %5.1f%% of the copy ceiling\n", what, ms, gbs, 100 * gbs / kCeilingGBs);
}

static std::mt19937 rng(1);

// x[i] = a hash of i in [-scale, scale): values for buffers too large to draw on the host
static __global__ void fill_hash_kernel(float* x, size_t n, float scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ (uint32_t)(i >> 32);
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
        x[i] = scale * ((float)(h >> 8) * (2.0f / 16777216.0f) - 1.0f);
    }
}
static void fill_uniform(float* x, size_t n, float scale) {
    fill_hash_kernel<<<elementwise_blocks(n), 256>>>(x, n, scale);
    cudaCheckLast();
}
static bf16* rand_bf16(size_t n, std::vector<double>* host = nullptr, double sd = 1.0) {
    std::normal_distribution<float> nd(0.0f, (float)sd);
    std::vector<bf16> h(n);
    for (auto& x : h) x = __float2bfloat16(nd(rng));
    if (host) { host->resize(n); for (size_t i = 0; i < n; i++) (*host)[i] = __bfloat162float(h[i]); }
    bf16* d = cuda_malloc_n<bf16>(n, "bench");
    cudaCheck(cudaMemcpy(d, h.data(), n * sizeof(bf16), cudaMemcpyHostToDevice));
    return d;
}

static double rel_err(const bf16* d, const std::vector<double>& ref, size_t n, size_t stride_rows = 0, size_t cols = 0) {
    std::vector<bf16> h(stride_rows ? n / cols * stride_rows : n);
    cudaCheck(cudaMemcpy(h.data(), d, h.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        size_t j = stride_rows ? (i / cols) * stride_rows + i % cols : i;
        double g = __bfloat162float(h[j]);
        num += (g - ref[i]) * (g - ref[i]);
        den += ref[i] * ref[i];
    }
    return std::sqrt(num / den);
}

int main(int argc, char** argv) {
    std::string model = "370m";
    int B = 8, T = 2048;
    try {
        Flags f("usage: bench_layers [flags]");
        f.choice({"--model"}, &model, {"370m", "hybrid-1.3b", "2.7b"},
                 "the layer shapes: mamba2-370m, hybrid-1.3b or mamba2-2.7b");
        f.add({"-B"}, &B, "N", "sequences (the model steps' micro-batch: 8, 4 for 2.7b and hybrid-1.3b)", Range::at_least(1));
        f.add({"-T"}, &T, "N", "sequence length", Range::at_least(64));
        if (!f.parse(argc, argv).empty()) THROW("bench_layers takes no positional arguments (see --help)");
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    // headdim 64, state 128, one group: conv_dim = d_inner + 2 x 128, in_proj = [z | xBC | dt]
    const int d = model == "370m" ? 1024 : model == "hybrid-1.3b" ? 2048 : 2560, di = 2 * d, cd = di + 2 * 128,
              dip = 2 * di + 2 * 128 + di / 64;
    const int BT = B * T, K = 4, Vp = 50304, V = 50277;
    printf("%s: d_model %d, d_inner %d, conv_dim %d, in_proj %d, %d rows\n", model.c_str(), d, di, cd, dip, BT);
    {   // the ceiling: a 1 GiB device-to-device copy
        const size_t n = (size_t)1 << 30;
        void* a = cuda_malloc(n, "copy source");
        void* b = cuda_malloc(n, "copy destination");
        cudaCheck(cudaMemset(a, 1, n));
        const double ms = median_ms([&] { cudaCheck(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice)); });
        kCeilingGBs = 2.0 * n / ms / 1e6;
        printf("%-32s %8.3f ms %8.0f GB/s  (the ceiling)\n", "device-to-device copy 1 GiB", ms, kCeilingGBs);
        cudaCheck(cudaFree(a));
        cudaCheck(cudaFree(b));
    }
    // --- conv1d: input is the xBC slice of the in_proj output (row stride d_in_proj)
    std::vector<double> h_in, h_w, h_b;
    bf16* in = rand_bf16((size_t)BT * dip, &h_in);
    bf16* w = rand_bf16((size_t)cd * K, &h_w, 0.5);
    bf16* bias = rand_bf16(cd, &h_b, 0.5);
    bf16* out = cuda_malloc_n<bf16>((size_t)BT * cd, "out");
    bf16* dout = rand_bf16((size_t)BT * cd);
    bf16* din = cuda_malloc_n<bf16>((size_t)BT * dip, "din");
    float* dw = cuda_malloc_n<float>((size_t)cd * K, "dw");
    float* db = cuda_malloc_n<float>(cd, "db");
    float* scratch = cuda_malloc_n<float>(conv1d_backward_scratch_floats(B, T, cd, K), "scratch");
    // document positions: lengths uniform in [1, 2 mean - 1]
    auto doc_positions = [&](int mean) {
        std::vector<int> h((size_t)BT);
        for (int b = 0; b < B; b++)
            for (int t = 0, p = 0, left = 0; t < T; t++, p++, left--) {
                if (left == 0) left = 1 + (int)(rng() % (2 * mean - 1)), p = 0;
                h[(size_t)b * T + t] = p;
            }
        return h;
    };
    const std::vector<int> h_short = doc_positions(64), h_long = doc_positions(1024);
    int* pos_short = cuda_malloc_n<int>(BT, "positions");
    int* pos_long = cuda_malloc_n<int>(BT, "positions");
    cudaCheck(cudaMemcpy(pos_short, h_short.data(), BT * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(pos_long, h_long.data(), BT * sizeof(int), cudaMemcpyHostToDevice));
    conv1d_silu_forward(out, in, dip, w, bias, nullptr, B, T, cd, K, 0);
    {   // check batch 0's first 64 steps: the causal conv sees nothing beyond them
        const int Tc = 64;
        std::vector<double> inc((size_t)Tc * cd), ref((size_t)Tc * cd);
        for (int t = 0; t < Tc; t++)
            for (int c = 0; c < cd; c++) inc[(size_t)t * cd + c] = h_in[(size_t)t * dip + d * 0 + c];
        ref::conv1d_silu_forward(ref.data(), inc.data(), h_w.data(), h_b.data(), 1, Tc, cd, K);
        double e = rel_err(out, ref, ref.size());
        printf("check conv1d forward: rel L2 %.2e %s\n", e, e < 1e-2 ? "ok" : "FAILED");
        if (!(e < 1e-2)) return 1;
        // with short documents: the reference on each document of those steps as its own sequence
        conv1d_silu_forward(out, in, dip, w, bias, pos_short, B, T, cd, K, 0);
        for (int s0 = 0, e1 = 1; s0 < Tc; s0 = e1, e1 = s0 + 1) {
            while (e1 < Tc && h_short[e1] != 0) e1++;
            ref::conv1d_silu_forward(ref.data() + (size_t)s0 * cd, inc.data() + (size_t)s0 * cd, h_w.data(), h_b.data(),
                                     1, e1 - s0, cd, K);
        }
        e = rel_err(out, ref, ref.size());
        printf("check conv1d forward with documents: rel L2 %.2e %s\n", e, e < 1e-2 ? "ok" : "FAILED");
        if (!(e < 1e-2)) return 1;
    }
    double bytes_fwd = (double)BT * cd * 2 * 2;       // read x, write out
    double bytes_bwd = (double)BT * cd * 2 * 3;       // read x and dout, write dx
    const std::pair<const char*, const int*> docs[] = {{"", nullptr}, {", docs ~64", pos_short}, {", docs ~1024", pos_long}};
    for (const auto& doc : docs) {
        const int* pos = doc.second;
        report((std::string("conv1d+silu forward") + doc.first).c_str(),
               median_ms([&] { conv1d_silu_forward(out, in, dip, w, bias, pos, B, T, cd, K, 0); }), bytes_fwd);
        report((std::string("conv1d+silu backward") + doc.first).c_str(), median_ms([&] {
            conv1d_silu_backward(din, dip, dw, db, scratch, dout, in, dip, w, bias, pos, B, T, cd, K, 0); }), bytes_bwd);
    }
    // the other channel-vector widths (the launchers default to CONV_MAX_VEC)
    report("  forward, 8 channels a lane", median_ms([&] {
        conv1d_silu_forward_k<K, 8>(out, in, dip, w, bias, nullptr, B, T, cd, 0); }), bytes_fwd);
    report("  forward, 2 channels a lane", median_ms([&] {
        conv1d_silu_forward_k<K, 2>(out, in, dip, w, bias, nullptr, B, T, cd, 0); }), bytes_fwd);
    report("  backward, 2 channels a lane", median_ms([&] {
        conv1d_silu_backward_k<K, 2>(din, dip, dw, db, scratch, dout, in, dip, w, bias, nullptr, B, T, cd, 0); }), bytes_bwd);

    // --- gated norm: y (BT, d_inner), z the first d_inner columns of the in_proj output
    std::vector<double> h_y, h_gw;
    bf16* y = rand_bf16((size_t)BT * di, &h_y);
    bf16* gw = rand_bf16(di, &h_gw, 0.2);
    bf16* g = cuda_malloc_n<bf16>((size_t)BT * di, "g");
    float* rstd = cuda_malloc_n<float>(BT, "rstd");
    float* dgw = cuda_malloc_n<float>(di, "dgw");
    bf16* dy = cuda_malloc_n<bf16>((size_t)BT * di, "dy");
    float* nscratch = cuda_malloc_n<float>(gated_rmsnorm_backward_scratch_floats(BT, di), "scratch");
    gated_rmsnorm_forward(g, rstd, y, in, dip, gw, BT, di, 1, 1e-5f, 0);
    {
        const int rows = 64;
        std::vector<double> zc((size_t)rows * di), ref((size_t)rows * di), rr(rows);
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < di; c++) zc[(size_t)r * di + c] = h_in[(size_t)r * dip + c];
        ref::gated_rmsnorm_forward(ref.data(), rr.data(), h_y.data(), zc.data(), h_gw.data(), rows, di, 1, 1e-5);
        double e = rel_err(g, ref, ref.size());
        printf("check gated norm forward: rel L2 %.2e %s\n", e, e < 1e-2 ? "ok" : "FAILED");
        if (!(e < 1e-2)) return 1;
    }
    report("gated rmsnorm forward", median_ms([&] { gated_rmsnorm_forward(g, rstd, y, in, dip, gw, BT, di, 1, 1e-5f, 0); }),
           (double)BT * di * 2 * 3);
    const double gated_bwd_bytes = (double)BT * di * 2 * 6;  // read y, z, dout; write dy, dz and the forward's output
    report("gated rmsnorm backward (+ output)", median_ms([&] {
        gated_rmsnorm_backward(dy, din, dip, g, dgw, nscratch, out /* as dout */, y, in, dip, gw, rstd, BT, di, 1, 0); }),
           gated_bwd_bytes);

    // --- RMSNorm over the fp32 residual stream (d_model wide)
    std::vector<float> h_x((size_t)BT * d);
    {
        std::normal_distribution<float> nd(0.0f, 1.0f);
        for (auto& v : h_x) v = nd(rng);
    }
    float* x = cuda_malloc_n<float>(h_x.size(), "x");
    cudaCheck(cudaMemcpy(x, h_x.data(), h_x.size() * sizeof(float), cudaMemcpyHostToDevice));
    float* dx = cuda_malloc_n<float>(h_x.size(), "dx");
    cudaCheck(cudaMemcpy(dx, h_x.data(), h_x.size() * sizeof(float), cudaMemcpyHostToDevice));
    std::vector<double> h_nw;
    bf16* nw = rand_bf16(d, &h_nw, 0.2);
    bf16* xn = cuda_malloc_n<bf16>((size_t)BT * d, "xn");
    bf16* xh = cuda_malloc_n<bf16>((size_t)BT * d, "xhat");
    bf16* dxb = cuda_malloc_n<bf16>((size_t)BT * d, "dx bf16");
    float* dnw = cuda_malloc_n<float>(d, "dnw");
    float* rscratch = cuda_malloc_n<float>(rmsnorm_backward_scratch_floats(BT, d), "scratch");
    rmsnorm_forward(xn, xh, rstd, x, nw, BT, d, 1e-5f, 0);
    {
        const int rows = 64;
        std::vector<double> xd(h_x.begin(), h_x.begin() + (size_t)rows * d), ref((size_t)rows * d), rr(rows);
        ref::rmsnorm_forward(ref.data(), rr.data(), xd.data(), h_nw.data(), rows, d, 1e-5);
        double e = rel_err(xn, ref, ref.size());
        printf("check rmsnorm forward: rel L2 %.2e %s\n", e, e < 1e-2 ? "ok" : "FAILED");
        if (!(e < 1e-2)) return 1;
    }
    report("rmsnorm forward", median_ms([&] { rmsnorm_forward(xn, xh, rstd, x, nw, BT, d, 1e-5f, 0); }),
           (double)BT * d * (4 + 2 + 2));  // read x; write the output and xhat
    report("rmsnorm apply (backward's output)", median_ms([&] { rmsnorm_apply(xn, xh, nw, BT, d, 0); }),
           (double)BT * d * (2 + 2));
    const double bwd_bytes = (double)BT * d * (2 + 2 + 4 + 4 + 2);  // read dout, xhat, dx; write dx, dx bf16
    report("rmsnorm backward", median_ms([&] {
        rmsnorm_backward(dx, dxb, dnw, rscratch, xn /* as dout */, xh, nw, rstd, BT, d, 0); }), bwd_bytes);

    // --- MLP activation at hybrid-1.3b's shape (B*T = 8192 rows, GELU over ff = 8192)
    {
        const int rows = 8192, ff = 8192;
        std::vector<double> h_a;
        bf16* a = rand_bf16((size_t)rows * ff, &h_a);
        bf16* act = cuda_malloc_n<bf16>((size_t)rows * ff, "act");
        bf16* da = cuda_malloc_n<bf16>((size_t)rows * ff, "da");
        mlp_act_forward(act, a, rows, ff, MlpAct::GELU, 0);
        std::vector<double> ref((size_t)64 * ff);
        ref::mlp_act_forward(ref.data(), h_a.data(), 64, ff, "gelu");
        double e = rel_err(act, ref, ref.size());
        printf("check mlp gelu forward: rel L2 %.2e %s\n", e, e < 1e-2 ? "ok" : "FAILED");
        if (!(e < 1e-2)) return 1;
        const double bytes = (double)rows * ff * 2;
        report("mlp gelu forward", median_ms([&] { mlp_act_forward(act, a, rows, ff, MlpAct::GELU, 0); }), 2 * bytes);
        bf16* again = cuda_malloc_n<bf16>((size_t)rows * ff, "act again");
        report("mlp gelu backward (+ activation)", median_ms([&] {
            mlp_act_backward(da, again, act /* as dact */, a, rows, ff, MlpAct::GELU, 0); }), 4 * bytes);
    }

    // --- fused classifier over the padded vocabulary
    bf16* logits = rand_bf16((size_t)BT * Vp, nullptr, 2.0);
    std::vector<int> tgt(BT);
    for (auto& t : tgt) t = (int)(rng() % V);
    int* dt = cuda_malloc_n<int>(BT, "targets");
    cudaCheck(cudaMemcpy(dt, tgt.data(), BT * sizeof(int), cudaMemcpyHostToDevice));
    float* losses = cuda_malloc_n<float>(BT, "losses");
    float* dloss = cuda_malloc_n<float>(1, "dloss");
    const float inv_bt = 1.0f / BT;
    cudaCheck(cudaMemcpy(dloss, &inv_bt, sizeof(float), cudaMemcpyHostToDevice));
    report("fused classifier (loss+dlogits)", median_ms([&] {
        fused_classifier(logits, losses, nullptr, dt, nullptr, dloss, 1e-4f, BT, V, Vp, true, 0); }),
           (double)BT * Vp * 2 * 3);
    for (void* p : {(void*)logits, (void*)dt, (void*)losses, (void*)dloss}) cudaCheck(cudaFree(p));

    // --- the optimizer step over a model's parameters (their real tensors: small ones, decay flags), with
    // random gradients: the gradient norm reads 4 bytes a parameter, AdamW 16 and writes 12 (gradient, m, v,
    // the master weights' bf16 high and int16 low halves)
    for (const std::string& preset : {std::string("mamba2-tiny"),
                                     model == "370m" ? "mamba2-370m" : model == "2.7b" ? "mamba2-2.7b" : model}) {
        const ParamLayout layout(model_preset(preset));
        const size_t n = layout.total;
        AdamW adamw(adamw_tensors(layout, false), 0, n, AdamWConfig{});
        float* grads = cuda_malloc_n<float>(n, "gradients");
        MasterWeights master{cuda_malloc_n<bf16>(n, "weights"), cuda_malloc_n<int16_t>(n, "low halves")};
        fill_uniform(grads, n, 1e-3f);
        cudaCheck(cudaMemset(master.hi, 0, n * sizeof(bf16)));
        cudaCheck(cudaMemset(master.lo, 0, n * sizeof(int16_t)));
        float* norm2 = nullptr;
        char what[64];
        snprintf(what, sizeof what, "grad norm, %s (%.1fM)", preset.c_str(), n * 1e-6);
        report(what, median_ms([&] { norm2 = adamw.grad_norm_squared(grads, n, 0); }), 4.0 * n);
        snprintf(what, sizeof what, "AdamW, %s", preset.c_str());
        int t = 1;
        report(what, median_ms([&] { adamw.step(master, grads, norm2, 1e-4f, t++, 0); }), 28.0 * n);
        for (void* p : {(void*)grads, (void*)master.hi, (void*)master.lo}) cudaCheck(cudaFree(p));
    }
    return 0;
}
