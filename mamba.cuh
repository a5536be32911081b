// The model: its blocks, their parameters and activations, forward and backward.
//
// A model is a string of layer symbols (model_config.h); each symbol is one pre-norm residual
// block, h = h + out_proj(mixer(in_proj(rmsnorm(h)))), and the kinds differ in the mixer.
// This file reads top to bottom, as test/ref/model.h (the double reference) does:
//   1. Blocks: one type per layer kind (Mamba2Block, Mamba1Block, AttentionBlock, MlpBlock).
//      Each declares its tensors (shapes in the comments), what it keeps from the forward for
//      the backward, which shared buffers it borrows, its FLOPs, and its views of the buffers
//      (one definition of each column layout); on the GPU, its forward, recompute and backward
//      (the GPU half, here and below, is inside #ifdef __CUDACC__: g++ builds the rest).
//   2. The model's parameter layout (embedding, the pattern's blocks, final norm, LM head),
//      initialisation, activation memory and FLOPs.
//   3. Model: the GPU model. It walks the blocks forward to the loss and back to every gradient.
// make_block is the one place that maps a layer symbol to its kind.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <variant>
#include <vector>
#include "model_config.h"  // ModelConfig, presets, JSON
#include "params.h"        // ParamTable, TensorInfo: the flat parameter buffer
#include "zero.h"          // Sharding, GradWalk, BucketPlan: ranks' ranges and gradient buckets
#include "kernel_sizes.h"  // bf16, the kernels' shapes, saved and scratch bytes (no CUDA)
#ifdef __CUDACC__          // the GPU half: g++ sees the blocks' tensors, sizes and FLOPs, the layout, the estimates
#include "cuda_common.cuh" // cudaCheck, cuda_malloc
#include "matmul.cuh"      // matmul_forward/backward (cuBLASLt)
#include "embedding.cuh"   // embedding_forward/backward
#include "norm.cuh"        // rmsnorm, gated_rmsnorm
#include "conv1d.cuh"      // conv1d_silu_forward/backward
#include "ssd.cuh"         // ssd_forward/backward (Mamba-2)
#include "scan.cuh"        // selective_scan_forward/backward (Mamba-1)
#include "attention.cuh"   // attention_forward/backward, rope
#include "mlp.cuh"         // mlp_act_forward/backward
#include "loss.cuh"        // fused_classifier, loss_accumulate
#endif

// ----------------------------------------------------------------------------
// 1. Blocks

// What one layer keeps from its forward for its backward (null where its kind keeps nothing).
struct LayerActs {
    bf16* in_out = nullptr;      // (BT, in_width) in_proj's output, rows in_stride apart
    bf16* y = nullptr;           // the mixer's output (Mamba-2: the SSD's; Mamba-1, attention: out_proj's input)
    bf16* x_proj_out = nullptr;  // Mamba-1: (BT, R + 2N) = [dt | B | C]
    float* stats = nullptr;      // Mamba-2: gated norm rstd (BT, G); attention: logsumexp (B, Hq, T)
    void* saved = nullptr;       // Mamba: the scan's chunk states
};
struct KeptSizes { size_t in_out = 0, y = 0, x_proj_out = 0, stats = 0, saved_bytes = 0; };

// Buffers every layer borrows, each with one meaning, sized for the largest user (elements,
// except where marked).
struct SharedSizes {
    size_t out_in = 0;         // out_proj's input when it is not kept (Mamba-2 gated norm, MLP activation)
    size_t dout_in = 0;        // gradient of out_proj's input
    size_t din = 0;            // gradient of in_proj's output
    size_t conv_out = 0;       // Mamba: conv1d + SiLU output (recomputed in the backward), and its gradient
    size_t dy = 0;             // Mamba-2: gradient of the SSD output
    size_t delta = 0;          // Mamba-1: dt_proj's output (recomputed), and its gradient
    size_t dxproj = 0;         // Mamba-1: gradient of x_proj's output
    size_t mixer_scratch = 0;  // bytes: SSD / scan / attention backward scratch
    size_t norm_scratch = 0;   // floats: column-sum partials of the norms and conv1d
    void raise(const SharedSizes& o) {
        size_t* a[] = {&out_in, &dout_in, &din, &conv_out, &dy, &delta, &dxproj, &mixer_scratch, &norm_scratch};
        const size_t* b[] = {&o.out_in, &o.dout_in, &o.din, &o.conv_out, &o.dy, &o.delta, &o.dxproj,
                             &o.mixer_scratch, &o.norm_scratch};
        for (int i = 0; i < 9; i++) *a[i] = std::max(*a[i], *b[i]);
    }
};

#ifdef __CUDACC__
// Optional per-phase timing (train_mamba --bench --profile): an event at each named mark;
// the time up to the next mark is charged to the mark's name.
struct PhaseTimer {
    std::vector<std::pair<std::string, cudaEvent_t>> marks;
    std::map<std::string, double> ms;
    int steps = 0;  // collect() calls that found marks: the steps the totals cover
    void mark(const std::string& name, cudaStream_t s) {
        cudaEvent_t e;
        cudaCheck(cudaEventCreate(&e));
        cudaCheck(cudaEventRecord(e, s));
        marks.push_back({name, e});
    }
    // adds the marks recorded so far to the totals (the last mark closes the previous one)
    void collect() {
        if (marks.empty()) return;
        cudaCheck(cudaEventSynchronize(marks.back().second));
        for (size_t i = 0; i + 1 < marks.size(); i++) {
            float t;
            cudaCheck(cudaEventElapsedTime(&t, marks[i].second, marks[i + 1].second));
            ms[marks[i].first] += t;
        }
        for (auto& m : marks) cudaCheck(cudaEventDestroy(m.second));
        marks.clear();
        steps++;
    }
    // the totals per step, largest first (the events themselves add a little time: shares, not a second clock)
    void print() const {
        if (steps == 0) return;
        double sum = 0;
        std::vector<std::pair<double, std::string>> rows;
        for (auto& [name, t] : ms) { sum += t; rows.push_back({t / steps, name}); }
        std::sort(rows.rbegin(), rows.rend());
        printf("per-step time by phase (all layers):\n");
        for (auto& [t, name] : rows) printf("  %-16s %8.2f ms  %5.1f%%\n", name.c_str(), t, 100.0 * t * steps / sum);
    }
};

// What a block's GPU methods work on: the weights, the gradients, the shared buffers.
struct Ctx {
    const bf16* params = nullptr;  // bf16 compute copy
    float* grads = nullptr;        // fp32 gradients (accumulated): the whole buffer, or the bucket arena
    const BucketPlan* grad_buckets = nullptr;  // several ranks: where each tensor's gradient lives in the arena
    bool write_grads = false;  // the step's first backward: the weight-gradient matmuls write (zero_grad skipped them)
    int B = 0, T = 0;
    const int* pos = nullptr;      // (BT) position in the document, or null: one document per row
    bf16 *out_in = nullptr, *dout_in = nullptr, *din = nullptr, *conv_out = nullptr, *dconv_out = nullptr,
         *dy = nullptr, *delta = nullptr, *ddelta = nullptr, *dxproj = nullptr;
    void* mixer_scratch = nullptr;
    float* norm_scratch = nullptr;
    PhaseTimer* timer = nullptr;

    int BT() const { return B * T; }
    const bf16* w(size_t offset) const { return params + offset; }
    float* grad(size_t offset) const { return grads + (grad_buckets ? grad_buckets->place(offset) : offset); }
    void phase(const char* name, cudaStream_t s) const { if (timer) timer->mark(name, s); }
};
#endif

// What every block has: its norm and its in/out matrices.
struct BlockBase {
    std::string prefix;        // "layers.{l}."
    const char* in_name;       // in_proj's name (and its phase in --profile)
    size_t norm, in_proj, out_proj;  // (d), (in_width, d), (d, out_width)
    int in_width, out_width;   // in_proj's output columns, out_proj's input columns
    int in_stride;             // row stride of in_proj's output and of its gradient (>= in_width)

    // `padded`: in_stride rounds in_width up to 8 elements (16 bytes), for mixers that read the output by
    // strides: Hopper's TMA loads need 16-byte row strides (cuBLAS gave mamba2-tiny's 1676 columns sm80
    // kernels), and the conv1d and norm kernels read 8-wide vectors only at such strides
    BlockBase(const ModelConfig& c, ParamTable& P, int l, const char* in_name_, int in_w, int out_w, const char* kind,
              bool padded = false)
        : prefix("layers." + std::to_string(l) + "."), in_name(in_name_), in_width(in_w), out_width(out_w),
          in_stride(padded ? (in_w + 7) / 8 * 8 : in_w) {
        norm = P.add(prefix + "norm", {c.d_model}, false, Init::Ones, "norms");
        in_proj = P.matrix(prefix + in_name, in_w, c.d_model, Init::LinearUniform, kind);
    }
    // out_proj comes after the mixer's own tensors in the buffer
    void declare_out(const ModelConfig& c, ParamTable& P, const char* name, const char* kind) {
        out_proj = P.matrix(prefix + name, c.d_model, out_width, Init::OutProjUniform, kind);
    }
    // 6 FLOPs per matmul parameter and token (forward + backward)
    double matmul_flops(const ModelConfig& c) const { return 6.0 * ((double)in_width + out_width) * c.d_model; }
    // the tensors whose gradient one weight-gradient matmul writes whole in every backward (Model::zero_grad)
    std::vector<size_t> matmul_weights() const { return {in_proj, out_proj}; }
};

// ---- Mamba-2 ('M'): [z | xBC | dt] = in_proj(xn); [x | B | C] = silu(conv1d(xBC));
// y = SSD(x, dt, A, B, C) + D x (ssd.cuh); out_proj(gated_rmsnorm(y, z) per group)
struct Mamba2Block : BlockBase {
    size_t conv_w, conv_b;     // (conv_dim, d_conv), (conv_dim)
    size_t dt_bias, A_log, D;  // (H) each
    size_t gate_norm;          // (d_inner)
    int di, gn, cd, dip, H, G, K;
    float eps;                 // the gated norm's
    SSDShape shape;            // B and T set per call

    Mamba2Block(const ModelConfig& c, ParamTable& P, int l)
        : BlockBase(c, P, l, "in_proj", c.d_in_proj(), c.d_inner(), "mamba2", true), di(c.d_inner()),
          gn(c.ngroups * c.d_state), cd(c.conv_dim()), dip(in_stride), H(c.nheads()), G(c.ngroups), K(c.d_conv),
          eps(c.norm_eps), shape{0, 0, c.nheads(), c.headdim, c.ngroups, c.d_state, c.chunk_size} {
        conv_w = P.add(prefix + "conv_weight", {cd, K}, true, Init::ConvUniform, "mamba2");
        conv_b = P.add(prefix + "conv_bias", {cd}, false, Init::ConvUniform, "mamba2");
        dt_bias = P.add(prefix + "dt_bias", {H}, false, Init::DtBias, "mamba2");
        A_log = P.add(prefix + "A_log", {H}, false, Init::ALogUniform, "mamba2");
        D = P.add(prefix + "D", {H}, false, Init::Ones, "mamba2");
        gate_norm = P.add(prefix + "gate_norm", {di}, false, Init::Ones, "norms");
        declare_out(c, P, "out_proj", "mamba2");
    }
    SSDShape shape_for(int B, int T) const { SSDShape s = shape; s.B = B; s.T = T; return s; }

    // columns of in_proj's output (and of its gradient), and of the conv output (and its gradient)
    template <typename P> P* z(P* in_out) const { return in_out; }
    template <typename P> P* xBC(P* in_out) const { return in_out + di; }
    template <typename P> P* dt(P* in_out) const { return in_out + di + cd; }
    template <typename P> P* x(P* conv) const { return conv; }
    template <typename P> P* Bm(P* conv) const { return conv + di; }
    template <typename P> P* Cm(P* conv) const { return conv + di + gn; }

    KeptSizes kept(int B, int T) const {
        const size_t BT = (size_t)B * T;
        return {BT * dip, BT * di, 0, BT * G, ssd_saved_bytes(shape_for(B, T))};
    }
    SharedSizes borrowed(int B, int T) const {
        const size_t BT = (size_t)B * T;
        SharedSizes s;
        s.out_in = s.dout_in = s.dy = BT * di;
        s.din = BT * dip;
        s.conv_out = BT * cd;
        s.mixer_scratch = ssd_scratch_bytes(shape_for(B, T));
        s.norm_scratch = std::max(gated_rmsnorm_backward_scratch_floats((int)BT, di),
                                  conv1d_backward_scratch_floats(B, T, cd, K));
        return s;
    }
    // the chunked SSD's matmuls per token (ANCHORS.md): C B^T per group, scores times x, chunk
    // states and state output per head; forward + backward = 3x the forward
    double flops(const ModelConfig& c, int T) const {
        (void)T;
        const double Q = c.chunk_size, N = c.d_state, P = c.headdim;
        return matmul_flops(c) + 3.0 * (2 * Q * N * G + 2 * Q * P * H + 4 * N * P * H);
    }

#ifdef __CUDACC__
    SSDInputs ssd_inputs(const Ctx& c, const LayerActs& a) const {
        return {x(c.conv_out), Bm(c.conv_out), Cm(c.conv_out), dt(a.in_out), cd, cd, dip,
                c.w(dt_bias), c.w(A_log), c.w(D), c.pos};
    }
    void conv(const Ctx& c, const LayerActs& a, cudaStream_t s) const {
        conv1d_silu_forward(c.conv_out, xBC(a.in_out), dip, c.w(conv_w), c.w(conv_b), c.pos, c.B, c.T, cd, K, s);
    }
    void gate(const Ctx& c, const LayerActs& a, cudaStream_t s) const {
        gated_rmsnorm_forward(c.out_in, a.stats, a.y, z(a.in_out), dip, c.w(gate_norm), c.BT(), di, G, eps, s);
    }
    void forward(const Ctx& c, const LayerActs& a, cudaStream_t s) const {
        c.phase("conv1d", s);
        conv(c, a, s);
        c.phase("ssd", s);
        ssd_forward(a.y, a.saved, c.mixer_scratch, ssd_inputs(c, a), shape_for(c.B, c.T), s);
        c.phase("gated_norm", s);
        gate(c, a, s);
    }
    void recompute(const Ctx& c, const LayerActs& a, cudaStream_t s) const { conv(c, a, s); }
    const bf16* out_input(const Ctx& c, const LayerActs&) const { return c.out_in; }
    // c.dout_in -> c.din; the gated norm's backward also rebuilds out_proj's input in c.out_in
    void backward(const Ctx& c, const LayerActs& a, cudaStream_t s) const {
        c.phase("gated_norm bwd", s);
        gated_rmsnorm_backward(c.dy, z(c.din), dip, c.out_in, c.grad(gate_norm), c.norm_scratch, c.dout_in, a.y,
                               z(a.in_out), dip, c.w(gate_norm), a.stats, c.BT(), di, G, s);
        c.phase("ssd bwd", s);
        const SSDGrads g{x(c.dconv_out), Bm(c.dconv_out), Cm(c.dconv_out), dt(c.din), cd, cd, dip,
                         c.grad(dt_bias), c.grad(A_log), c.grad(D)};
        ssd_backward(g, c.mixer_scratch, c.dy, ssd_inputs(c, a), a.saved, shape_for(c.B, c.T), s);
        c.phase("conv1d bwd", s);
        conv1d_silu_backward(xBC(c.din), dip, c.grad(conv_w), c.grad(conv_b), c.norm_scratch, c.dconv_out,
                             xBC(a.in_out), dip, c.w(conv_w), c.w(conv_b), c.pos, c.B, c.T, cd, K, s);
    }
#endif
};

// ---- Mamba-1 ('M' with ssm mamba1): [x | z] = in_proj(xn); u = silu(conv1d(x));
// [dt | B | C] = x_proj(u); delta = dt_proj(dt) (its bias and softplus in the scan);
// out_proj(selective_scan(u, delta, A, B, C, D) * silu(z)) (scan.cuh)
struct Mamba1Block : BlockBase {
    size_t conv_w, conv_b;     // (d_inner, d_conv), (d_inner)
    size_t x_proj, dt_proj;    // (R + 2N, d_inner), (d_inner, R)
    size_t dt_bias, A_log, D;  // (d_inner), (d_inner, N), (d_inner)
    int di, R, N, xpd, K;

    Mamba1Block(const ModelConfig& c, ParamTable& P, int l)
        : BlockBase(c, P, l, "in_proj", c.d_in_proj(), c.d_inner(), "mamba1"), di(c.d_inner()), R(c.dt_rank_()),
          N(c.d_state), xpd(c.d_x_proj()), K(c.d_conv) {
        conv_w = P.add(prefix + "conv_weight", {di, K}, true, Init::ConvUniform, "mamba1");
        conv_b = P.add(prefix + "conv_bias", {di}, false, Init::ConvUniform, "mamba1");
        x_proj = P.matrix(prefix + "x_proj", xpd, di, Init::LinearUniform, "mamba1");
        dt_proj = P.add(prefix + "dt_proj", {di, R}, true, Init::LinearUniform, "mamba1");
        dt_bias = P.add(prefix + "dt_bias", {di}, false, Init::DtBias, "mamba1");
        A_log = P.add(prefix + "A_log", {di, N}, false, Init::ALogS4D, "mamba1");
        D = P.add(prefix + "D", {di}, false, Init::Ones, "mamba1");
        declare_out(c, P, "out_proj", "mamba1");
    }
    ScanShape shape_for(int B, int T) const { return {B, T, di, N}; }
    std::vector<size_t> matmul_weights() const { return {in_proj, out_proj, x_proj, dt_proj}; }

    // columns of in_proj's output [x | z] and of x_proj's output [dt | B | C] (and their gradients)
    template <typename P> P* x(P* in_out) const { return in_out; }
    template <typename P> P* z(P* in_out) const { return in_out + di; }
    template <typename P> P* dt(P* xp) const { return xp; }
    template <typename P> P* Bm(P* xp) const { return xp + R; }
    template <typename P> P* Cm(P* xp) const { return xp + R + N; }

    KeptSizes kept(int B, int T) const {
        const size_t BT = (size_t)B * T;
        return {BT * 2 * di, BT * di, BT * xpd, 0, scan_saved_bytes(shape_for(B, T))};
    }
    SharedSizes borrowed(int B, int T) const {
        const size_t BT = (size_t)B * T;
        SharedSizes s;
        s.dout_in = s.conv_out = s.delta = BT * di;
        s.din = BT * 2 * di;
        s.dxproj = BT * xpd;
        s.mixer_scratch = scan_scratch_bytes(shape_for(B, T));
        s.norm_scratch = conv1d_backward_scratch_floats(B, T, di, K);
        return s;
    }
    double flops(const ModelConfig& c, int T) const {
        (void)T;
        return matmul_flops(c) + 6.0 * ((double)xpd * di + (double)di * R);
    }

#ifdef __CUDACC__
    ScanInputs scan_inputs(const Ctx& c, const LayerActs& a) const {
        return {c.conv_out, di, c.delta, di, z(a.in_out), 2 * di, Bm(a.x_proj_out), Cm(a.x_proj_out), xpd,
                c.w(dt_bias), c.w(A_log), c.w(D), c.pos};
    }
    void conv(const Ctx& c, const LayerActs& a, cudaStream_t s) const {
        conv1d_silu_forward(c.conv_out, x(a.in_out), 2 * di, c.w(conv_w), c.w(conv_b), c.pos, c.B, c.T, di, K, s);
    }
    void delta(const Ctx& c, const LayerActs& a, cudaStream_t s) const {
        matmul_forward(c.delta, dt(a.x_proj_out), c.w(dt_proj), c.BT(), di, R, MatmulStrides{xpd, di}, s);
    }

    void forward(const Ctx& c, const LayerActs& a, cudaStream_t s) const {
        c.phase("conv1d", s);
        conv(c, a, s);
        c.phase("x_proj", s);
        matmul_forward(a.x_proj_out, c.conv_out, c.w(x_proj), c.BT(), xpd, di, s);
        delta(c, a, s);
        c.phase("scan", s);
        selective_scan_forward(a.y, a.saved, scan_inputs(c, a), shape_for(c.B, c.T), s);
    }
    void recompute(const Ctx& c, const LayerActs& a, cudaStream_t s) const { conv(c, a, s); delta(c, a, s); }
    const bf16* out_input(const Ctx&, const LayerActs& a) const { return a.y; }
    void backward(const Ctx& c, const LayerActs& a, cudaStream_t s) const {
        c.phase("scan bwd", s);
        const ScanGrads g{c.dconv_out, c.ddelta, z(c.din), Bm(c.dxproj), Cm(c.dxproj), di, di, 2 * di, xpd,
                          c.grad(dt_bias), c.grad(A_log), c.grad(D)};
        selective_scan_backward(g, c.mixer_scratch, c.dout_in, scan_inputs(c, a), a.saved, shape_for(c.B, c.T), s);
        c.phase("x_proj bwd", s);
        matmul_backward(dt(c.dxproj), c.grad(dt_proj), c.ddelta, dt(a.x_proj_out), c.w(dt_proj), c.BT(), di, R,
                        MatmulStrides{xpd, di}, s, c.write_grads);
        matmul_backward(c.dconv_out, c.grad(x_proj), c.dxproj, c.conv_out, c.w(x_proj), c.BT(), xpd, di,
                        MatmulStrides{di, xpd, true}, s, c.write_grads);
        c.phase("conv1d bwd", s);
        conv1d_silu_backward(x(c.din), 2 * di, c.grad(conv_w), c.grad(conv_b), c.norm_scratch, c.dconv_out,
                             x(a.in_out), 2 * di, c.w(conv_w), c.w(conv_b), c.pos, c.B, c.T, di, K, s);
    }
#endif
};

// ---- attention ('*'): [q | k | v] = qkv_proj(xn) (RoPE on q and k, optional);
// o_proj(causal GQA attention(q, k, v)) (attention.cuh)
struct AttentionBlock : BlockBase {
    AttnShape shape;  // B and T set per call
    bool rope;
    float rope_theta;

    AttentionBlock(const ModelConfig& c, ParamTable& P, int l)
        : BlockBase(c, P, l, "qkv_proj", c.d_qkv(), c.d_attn(), "attention"),
          shape{0, 0, c.q_heads(), c.kv_heads(), c.attn_head_dim}, rope(c.rope), rope_theta(c.rope_theta) {
        declare_out(c, P, "o_proj", "attention");
    }
    AttnShape shape_for(int B, int T) const { AttnShape s = shape; s.B = B; s.T = T; return s; }

    KeptSizes kept(int B, int T) const {
        const size_t BT = (size_t)B * T;
        return {BT * in_width, BT * out_width, 0, BT * shape.Hq, 0};
    }
    SharedSizes borrowed(int B, int T) const {
        const size_t BT = (size_t)B * T;
        SharedSizes s;
        s.dout_in = BT * out_width;
        s.din = BT * in_width;
        s.mixer_scratch = attention_scratch_bytes(shape_for(B, T));
        return s;
    }
    // QK^T and PV over T/2 keys on average (causal): 4 T Hq Dh / 2 forward, 3x with the backward
    double flops(const ModelConfig& c, int T) const { return matmul_flops(c) + 3.0 * 2.0 * T * shape.Hq * shape.Dh; }

#ifdef __CUDACC__
    void forward(const Ctx& c, const LayerActs& a, cudaStream_t s) const {
        c.phase("attention", s);
        const AttnShape sh = shape_for(c.B, c.T);
        if (rope) rope_forward(a.in_out, sh, rope_theta, c.pos, s);
        attention_forward(a.y, a.stats, a.in_out, sh, c.pos, s);
    }
    void recompute(const Ctx&, const LayerActs&, cudaStream_t) const {}
    const bf16* out_input(const Ctx&, const LayerActs& a) const { return a.y; }
    void backward(const Ctx& c, const LayerActs& a, cudaStream_t s) const {
        c.phase("attention bwd", s);
        const AttnShape sh = shape_for(c.B, c.T);
        attention_backward(c.din, c.mixer_scratch, c.dout_in, a.in_out, a.y, a.stats, sh, c.pos, s);
        if (rope) rope_backward(c.din, sh, rope_theta, c.pos, s);
    }
#endif
};

// ---- MLP ('+'): a = up_proj(xn) ([gate; up] rows for SwiGLU); down_proj(act(a)) (mlp.cuh)
struct MlpBlock : BlockBase {
    MlpAct act;
    int ff;

    MlpBlock(const ModelConfig& c, ParamTable& P, int l)
        : BlockBase(c, P, l, "up_proj", c.d_up(), c.ff(), "mlp"), act(c.mlp_act()), ff(c.ff()) {
        declare_out(c, P, "down_proj", "mlp");
    }

    KeptSizes kept(int B, int T) const { return {(size_t)B * T * in_width, 0, 0, 0, 0}; }
    SharedSizes borrowed(int B, int T) const {
        const size_t BT = (size_t)B * T;
        SharedSizes s;
        s.out_in = s.dout_in = BT * ff;
        s.din = BT * in_width;
        return s;
    }
    double flops(const ModelConfig& c, int T) const { (void)T; return matmul_flops(c); }

#ifdef __CUDACC__
    void forward(const Ctx& c, const LayerActs& a, cudaStream_t s) const {
        c.phase("mlp act", s);
        mlp_act_forward(c.out_in, a.in_out, c.BT(), ff, act, s);
    }
    void recompute(const Ctx&, const LayerActs&, cudaStream_t) const {}
    const bf16* out_input(const Ctx& c, const LayerActs&) const { return c.out_in; }
    // the activation's backward also rebuilds down_proj's input in c.out_in
    void backward(const Ctx& c, const LayerActs& a, cudaStream_t s) const {
        c.phase("mlp act bwd", s);
        mlp_act_backward(c.din, c.out_in, c.dout_in, a.in_out, c.BT(), ff, act, s);
    }
#endif
};

using Block = std::variant<Mamba2Block, Mamba1Block, AttentionBlock, MlpBlock>;

// The pattern table: the one place a layer symbol becomes a kind of block
inline Block make_block(char symbol, const ModelConfig& c, ParamTable& P, int l) {
    switch (symbol) {
        case 'M': if (c.mamba1()) return Mamba1Block(c, P, l); else return Mamba2Block(c, P, l);
        case '*': return AttentionBlock(c, P, l);
        case '+': return MlpBlock(c, P, l);
    }
    THROW("layer symbol '%c' has no block", symbol);
}
inline const BlockBase& base_of(const Block& b) {
    return std::visit([](const auto& k) -> const BlockBase& { return k; }, b);
}

// ----------------------------------------------------------------------------
// 2. The model's parameter layout: embedding (Vp, d), the blocks in pattern order,
// final_norm (d), lm_head (Vp, d) unless tied (Vp: the vocabulary padded to 128)

struct ParamLayout : ParamTable {
    size_t embedding = 0, final_norm = 0, lm_head = 0;
    std::vector<Block> blocks;

    // align: PARAM_ALIGN; 1 gives the packed layout of older checkpoints (checkpoint.cuh)
    explicit ParamLayout(const ModelConfig& c, size_t align = PARAM_ALIGN) : ParamTable(align) {
        const int d = c.d_model, Vp = c.padded_vocab();
        embedding = add("embedding", {Vp, d}, true, Init::Normal002, "embedding");
        for (int l = 0; l < c.n_layer; l++) blocks.push_back(make_block(c.pattern[l], c, *this, l));
        final_norm = add("final_norm", {d}, false, Init::Ones, "norms");
        lm_head = c.tie_embeddings ? embedding : add("lm_head", {Vp, d}, true, Init::LinearUniform, "lm_head");
    }
    const BlockBase& block(int l) const { return base_of(blocks[l]); }

    // The gradients that the backward adds to, as [begin, end) runs of the buffer: all of it but the tensors
    // that one weight-gradient matmul writes whole (the blocks' matmul_weights and the LM head, which a tied
    // embedding is); the gaps between tensors stay zero. Model::zero_grad clears only these; a step's first
    // backward writes the others.
    std::vector<std::pair<size_t, size_t>> added_grads() const {
        std::vector<size_t> written = {lm_head};
        for (const Block& b : blocks)
            std::visit([&](const auto& k) { for (size_t o : k.matmul_weights()) written.push_back(o); }, b);
        std::vector<std::pair<size_t, size_t>> runs;
        size_t from = 0;
        for (const TensorInfo& t : tensors) {  // in buffer order
            if (std::find(written.begin(), written.end(), t.offset) == written.end()) continue;
            if (t.offset > from) runs.push_back({from, t.offset});
            from = t.offset + t.count;
        }
        if (total > from) runs.push_back({from, total});
        return runs;
    }
};

// Draws of the generator an element takes: a U(-1, 1) for every element, two more for a normal, one more for
// the A_log and dt draws. The stream is consumed tensor by tensor, element by element.
inline uint64_t init_draws(Init k) {
    switch (k) {
        case Init::Normal002: return 3;
        case Init::ALogUniform: case Init::DtBias: return 2;
        default: return 1;
    }
}

// mamba_ssm's initialisation: embedding N(0, 0.02); Linear kaiming-uniform (bound
// 1/sqrt(fan_in); for Mamba-1's dt_proj that is its dt_rank^-0.5), each block's output
// matrix further divided by sqrt(n_layer); conv1d bound 1/sqrt(K); Mamba-2 A = -U[1, 16]
// per head, Mamba-1 A[:, n] = -(n + 1) (S4D-real), A_log = log(-A); dt log-uniform in
// [1e-3, 1e-1] (floor 1e-4) stored as dt_bias = softplus^-1(dt); norms and D ones.
// Here elements [lo, hi) of tensor t into out[0, hi - lo), rng at element lo's first draw.
inline void init_elements(float* out, const TensorInfo& t, const ModelConfig& c, size_t lo, size_t hi, SplitMix64 rng) {
    const int fan_in = t.shape.size() == 2 ? t.shape[1] : 1;
    for (size_t i = lo; i < hi; i++) {
        double u = 2.0 * rng.uniform() - 1.0;  // U(-1, 1)
        float& p = out[i - lo];
        switch (t.init) {
            case Init::Normal002: p = (float)(0.02 * rng.normal()); break;
            case Init::LinearUniform: p = (float)(u / std::sqrt((double)fan_in)); break;
            case Init::OutProjUniform: p = (float)(u / std::sqrt((double)fan_in) / std::sqrt((double)c.n_layer)); break;
            case Init::ConvUniform: p = (float)(u / std::sqrt((double)c.d_conv)); break;
            case Init::Ones: p = 1.0f; break;
            case Init::ALogUniform: p = (float)std::log(1.0 + 15.0 * rng.uniform()); break;
            case Init::ALogS4D: p = (float)std::log(1.0 + (double)(i % t.shape[1])); break;
            case Init::DtBias: {
                double dt = std::exp(std::log(1e-3) + rng.uniform() * (std::log(1e-1) - std::log(1e-3)));
                dt = std::max(dt, 1e-4);
                p = (float)(dt + std::log(-std::expm1(-dt)));  // softplus^-1
                break;
            }
        }
    }
}

// The model's initialisation (init_elements; padded vocab rows stay zero) from one generator stream, as if one
// thread walked it. Pieces of up to INIT_PIECE elements start at their own place in the stream
// (SplitMix64::skip), so `threads` threads (0: the cores this process may use) give the bits of one pass (on one
// core an 8B model took minutes).
constexpr size_t INIT_PIECE = (size_t)1 << 22;
// Elements [begin, end) of the flat buffer go to out[0, end - begin).
inline void init_parameters(float* out, const ParamLayout& layout, const ModelConfig& c, uint64_t seed,
                            int threads = 0, size_t begin = 0, size_t end = SIZE_MAX) {
    end = std::min(end, layout.total);
    std::fill(out, out + (end - begin), 0.0f);  // the gaps between tensors
    struct Piece { const TensorInfo* t; size_t lo, hi; uint64_t draw; };
    std::vector<Piece> pieces;
    uint64_t draw = 0;  // the tensor's first draw
    for (const TensorInfo& t : layout.tensors) {
        const uint64_t d = init_draws(t.init);
        const size_t lo0 = std::max(begin, t.offset), hi0 = std::min(end, t.offset + t.count);  // in the buffer
        for (size_t lo = lo0; lo < hi0; lo += INIT_PIECE) {
            const size_t i = lo - t.offset;  // in the tensor
            pieces.push_back({&t, i, i + std::min(INIT_PIECE, hi0 - lo), draw + i * d});
        }
        draw += t.count * d;
    }
    std::atomic<size_t> next{0};
    auto work = [&]() {
        for (size_t k; (k = next++) < pieces.size();) {
            const Piece& pc = pieces[k];
            SplitMix64 rng(seed);
            rng.skip(pc.draw);
            init_elements(out + (pc.t->offset + pc.lo - begin), *pc.t, c, pc.lo, pc.hi, rng);
        }
    };
    if (threads <= 0) threads = available_cores();
    std::vector<std::thread> pool;
    for (int i = 1; i < threads && (size_t)i < pieces.size(); i++) {
        try {
            pool.emplace_back(work);
        } catch (const std::system_error&) {  // no more threads to be had: those started and this one finish
            break;
        }
    }
    work();
    for (std::thread& th : pool) th.join();
    for (const TensorInfo& t : layout.tensors)
        if (t.name == "embedding" || t.name == "lm_head") {  // padded rows never take part
            const size_t lo = std::max(begin, t.offset + (size_t)c.vocab_size * c.d_model);
            const size_t hi = std::min(end, t.offset + t.count);
            if (lo < hi) std::fill(out + (lo - begin), out + (hi - begin), 0.0f);
        }
}

// parameters the host initialises or splits into their 16-bit halves at once (Model::init, upload_halves)
constexpr size_t HOST_WINDOW = (size_t)1 << 26;

// rows of logits that exist at once by default (the LM head and the loss run chunk by chunk;
// --logit-chunk: larger chunks make larger LM-head matmuls for more memory)
constexpr int LOGIT_CHUNK = 2048;

// Activation memory for (B, T): per layer what its block keeps (with recompute, one set
// of the largest kind's serves every layer: the backward reruns each layer's forward), the
// normalised residual stream at every norm (bf16 xhat and fp32 rstd: all a norm's backward
// needs), the running residual stream (fp32), and the buffers all layers share.
struct ActivationSizes {
    std::vector<KeptSizes> kept;  // per layer (one entry with recompute)
    SharedSizes shared;
    size_t resid = 0, logits = 0, total_bytes = 0;  // resid: elements of one (BT, d) row block
};

inline size_t kept_bytes(const KeptSizes& k) { return (k.in_out + k.y + k.x_proj_out) * 2 + k.stats * 4 + k.saved_bytes; }

inline ActivationSizes activation_sizes(const ModelConfig& c, int B, int T, bool recompute = false,
                                        int logit_chunk = LOGIT_CHUNK) {
    const ParamLayout L(c);
    const size_t BT = (size_t)B * T, d = c.d_model, nl = c.n_layer;
    ActivationSizes s;
    KeptSizes mx;
    for (const Block& b : L.blocks) {
        const KeptSizes k = std::visit([&](const auto& blk) { return blk.kept(B, T); }, b);
        s.shared.raise(std::visit([&](const auto& blk) { return blk.borrowed(B, T); }, b));
        mx = {std::max(mx.in_out, k.in_out), std::max(mx.y, k.y), std::max(mx.x_proj_out, k.x_proj_out),
              std::max(mx.stats, k.stats), std::max(mx.saved_bytes, k.saved_bytes)};
        if (!recompute) s.kept.push_back(k);
    }
    if (recompute) s.kept.push_back(mx);
    s.shared.norm_scratch = std::max(s.shared.norm_scratch, rmsnorm_backward_scratch_floats((int)BT, (int)d));
    s.resid = BT * d;
    s.logits = std::min(BT, (size_t)logit_chunk) * c.padded_vocab();
    size_t kept = 0;
    for (const KeptSizes& k : s.kept) kept += kept_bytes(k);
    const SharedSizes& h = s.shared;
    s.total_bytes = (nl + 1) * (s.resid * 2 + BT * 4) /* every norm's xhat and rstd */ + s.resid * 4 /* h */ + kept +
                    (BT * d /* xn */ + h.out_in + h.dout_in + h.din + 2 * h.conv_out + h.dy + 2 * h.delta + h.dxproj +
                     s.logits + BT * d /* dxn */ + s.resid /* dresid bf16 */) * 2 +
                    s.resid * 4 /* dresid */ + BT * 4 /* losses */ + h.mixer_scratch + h.norm_scratch * 4 +
                    BT * (6 * sizeof(int) + sizeof(float)) /* inputs, targets, ranks, positions, loss rows and
                                                               their places, weights */ +
                    sizeof(double) /* the loss total */ + sizeof(float) /* dloss */;
    return s;
}

// Model FLOPs of one token's forward + backward (ANCHORS.md): 6 per matmul parameter (the
// embedding lookup excluded), plus the chunked SSD's and causal attention's matmuls, for
// sequences of length T.
inline double flops_per_token(const ModelConfig& c, int T) {
    const ParamLayout L(c);
    double f = 6.0 * (double)c.padded_vocab() * c.d_model;  // LM head
    for (const Block& b : L.blocks) f += std::visit([&](const auto& blk) { return blk.flops(c, T); }, b);
    return f;
}

// ----------------------------------------------------------------------------
// 3. The model on the GPU

// The order in which Model::backward finishes the gradients (zero.h's GradWalk; its
// grads_done marks must follow it): the final norm and an untied LM head, each block from the
// last, the embedding; the forward writes the LM head's gradient (the embedding's when tied).
inline GradWalk grad_walk(const ParamLayout& L) {
    GradWalk w;
    w.marks.push_back(L.final_norm);
    for (int l = (int)L.blocks.size() - 1; l >= 0; l--) w.marks.push_back(L.block(l).norm);
    w.marks.push_back(0);
    w.forward = L.lm_head;
    return w;
}

#ifdef __CUDACC__
// One micro-batch of B x T tokens on the host, each array row-major (B, T).
struct Batch {
    const int* inputs;
    const int* targets = nullptr;   // the next tokens, -1 where no loss is taken; null: forward only
    const float* weights = nullptr; // per-token loss weights; null: all 1
    const int* pos = nullptr;       // position of each token in its document (0 at a document start:
                                    // nothing crosses it); null: one document per row
};

// One micro-batch's forward and backward captured as a CUDA graph (Model::train_micro_batch),
// one for each Key it ran with: the kernels' scalar arguments are part of the graph
struct StepGraph {
    struct Key {
        bool write_grads = false;  // the weight-gradient matmuls write (a step's first micro-batch) or add
        bool weighted = false, positions = false;
        float z_loss = 0.0f;
        int loss_rows = 0;         // the rows the LM head runs over (Model::loss_rows)
        bool operator<(const Key& o) const {
            return std::tie(write_grads, weighted, positions, z_loss, loss_rows) <
                   std::tie(o.write_grads, o.weighted, o.positions, o.z_loss, o.loss_rows);
        }
    };
    cudaGraphExec_t exec = nullptr;

    // records what `work(stream)` queues; relaxed mode, because launchers make host-side calls
    // (kernel attributes, tensor maps) that are not stream work; the stream is a blocking one,
    // so a stray use of the legacy default stream inside fails the capture instead of escaping it
    template <typename F>
    void capture(F&& work) {
        release();
        cudaStream_t cs;
        cudaGraph_t g;
        cudaCheck(cudaStreamCreate(&cs));
        cudaCheck(cudaStreamBeginCapture(cs, cudaStreamCaptureModeRelaxed));
        work(cs);
        cudaCheck(cudaStreamEndCapture(cs, &g));
        cudaCheck(cudaGraphInstantiate(&exec, g, 0));
        cudaCheck(cudaGraphDestroy(g));
        cudaCheck(cudaStreamDestroy(cs));
    }
    void release() {
        if (exec) cudaCheck(cudaGraphExecDestroy(exec));
        exec = nullptr;
    }
    StepGraph() = default;
    StepGraph(const StepGraph&) = delete;
    StepGraph& operator=(const StepGraph&) = delete;
    ~StepGraph() { release(); }
};

struct Model {
    ModelConfig cfg;
    ParamLayout layout;
    Sharding shard;             // this rank's range [shard.begin, shard.end) and gradient buckets
    bf16* params = nullptr;     // bf16 compute copy of every parameter (offsets of the layout)
    int16_t* master_lo = nullptr;  // the low halves of the fp32 master weights of the rank's range
                                   // (master_lo[0]: element shard.begin; the high halves are params)
    // where the backward accumulates the fp32 gradients: one rank, the whole buffer (the layout's
    // offsets); several, the bucket arena (ctx.grad maps each offset to its bucket's place)
    float* grads = nullptr;
    float* grad_shard = nullptr;  // the rank's reduced gradients, as master (one rank: grads itself)
    const std::vector<std::pair<size_t, size_t>> added_grads;  // layout.added_grads(), for zero_grad

    // activations for the (B, T) given to allocate()
    int B = 0, T = 0;
    bool recompute = false;  // set before allocate(): keep only the residual stream per layer
    ActivationSizes sz;
    float* h = nullptr;             // the residual stream (fp32), updated layer by layer
    std::vector<bf16*> xhat;        // per norm (n_layer + 1, the final one last): h * rstd as it
    std::vector<float*> rstd;       // entered the norm, and the norm's 1/rms
    std::vector<LayerActs> acts;    // per layer (all the same set with recompute)
    Ctx ctx;                        // the weights, gradients and shared buffers the blocks use
    bf16 *xn = nullptr, *dxn = nullptr, *logits = nullptr, *dresid_bf16 = nullptr;
    float *dresid = nullptr, *losses = nullptr;
    double* loss_total = nullptr;   // the per-token losses summed over forwards, read by loss_sum()
    double* loss_host = nullptr;    // (pinned) where loss_sum_to_host() copies that total
    int *d_inputs = nullptr, *d_targets = nullptr, *d_rank = nullptr, *d_pos = nullptr;
    // The LM head's rows: with fewer rows carrying a loss than the batch's (fine-tuning masks the prompts) and
    // gather_loss_rows on, the training forward gathers them (loss_row_bucket, kernel_sizes.h) and runs the LM
    // head and the loss over loss_rows < B*T rows: d_loss_rows[i] is gathered row i's row (-1: padding), and
    // d_loss_slot[r] the gathered row of row r (-1: none); d_targets and d_weights then hold the gathered rows'
    // targets and weights
    bool gather_loss_rows = true;
    int loss_rows = 0;
    int *d_loss_rows = nullptr, *d_loss_slot = nullptr;
    float *d_weights = nullptr, *d_dloss = nullptr;
    EmbeddingBuckets buckets;
    std::map<StepGraph::Key, StepGraph> graphs;  // the captured micro-batches (train_micro_batch)
    std::vector<void*> owned;       // every activation allocation, freed together
    PhaseTimer* timer = nullptr;    // set to time each phase
    // Called by backward() as the gradients become final from the end of the buffer down, at
    // grad_walk's marks: the gradients of [lo, total) are done (queued on the stream); `last` at
    // the end. Several ranks reduce them while the backward goes on.
    std::function<void(size_t lo, bool last, cudaStream_t s)> grads_done;
    // A layer's two weight-gradient matmuls may run on wgrad_stream beside its input gradient and norm backward
    // (layer_backward; the layer's backward waits for them before it returns). Auto: beside where in_proj's
    // weight gradient has fewer 128 x 128 output tiles than the GPU has SMs (mamba2-tiny, hybrid-tiny: 1-2% a
    // step); matmuls that fill the GPU alone run in turn (beside each other, the mamba2-370m and hybrid-1.3b
    // steps ran 0.5-1.6% slower). Beside / Serial force one placement (the model test compares them).
    enum class WgradPlacement { Auto, Beside, Serial };
    WgradPlacement wgrad_placement = WgradPlacement::Auto;  // set before allocate()
    std::vector<char> wgrad_beside;  // per layer, set by allocate()
    cudaStream_t wgrad_stream = nullptr;  // created by allocate() when a layer runs beside
    cudaEvent_t wgrad_fork = nullptr, wgrad_out = nullptr, wgrad_in = nullptr;

    // rank `rank` of `world` (ZeRO, zero.h); bucket_elems: the gradient buckets' least size
    explicit Model(const ModelConfig& c, int world = 1, int rank = 0, size_t bucket_elems = 0)
        : cfg(c), layout(c), shard(make_sharding(layout, grad_walk(layout), world, rank, bucket_elems)),
          added_grads(layout.added_grads()) {
        params = cuda_malloc_n<bf16>(layout.total, "bf16 weights");
        master_lo = cuda_malloc_n<int16_t>(shard.count(), "master weights' low halves");
        const size_t grad_floats = shard.sharded() ? shard.buckets.arena : layout.total;
        grads = cuda_malloc_n<float>(grad_floats, shard.sharded() ? "gradient buckets" : "fp32 gradients");
        cudaCheck(cudaMemset(grads, 0, grad_floats * sizeof(float)));
        grad_shard = shard.sharded() ? cuda_malloc_n<float>(shard.count(), "fp32 gradient shard") : grads;
    }
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    ~Model() {
        for (void* p : {(void*)master_lo, (void*)params, (void*)grads}) cudaFree(p);
        if (grad_shard != grads) cudaFree(grad_shard);
        free_activations();
        if (wgrad_stream) {
            for (cudaEvent_t e : {wgrad_fork, wgrad_out, wgrad_in}) cudaEventDestroy(e);
            matmul_release(wgrad_stream);
            cudaStreamDestroy(wgrad_stream);
        }
    }

    // upload fp32 master weights of every parameter from the host: the whole bf16 copy (their
    // high halves) and the low halves of the rank's range
    void set_master(const std::vector<float>& host) {
        if (host.size() != layout.total) THROW("parameter count %zu != model's %zu", host.size(), layout.total);
        upload_halves(host.data(), 0, host.size());
    }
    // upload the master weights of the rank's range (the other ranks' bf16 weights come from
    // their owners: Comm::all_gather)
    void set_master_shard(const std::vector<float>& host) {
        if (host.size() != shard.count())
            THROW("master shard of %zu values, rank %d holds %zu", host.size(), shard.rank, shard.count());
        upload_halves(host.data(), shard.begin, host.size());
    }
    // host[0, n) are the weights from element `offset` on: the bf16 copy of all, the low halves
    // of the part inside the rank's range; HOST_WINDOW at a time (the host's 16-bit copies)
    void upload_halves(const float* host, size_t offset, size_t n) {
        for (size_t a = 0; a < n; a += HOST_WINDOW) {
            const size_t m = std::min(HOST_WINDOW, n - a), o = offset + a;
            const size_t from = std::max(o, shard.begin), to = std::min(o + m, shard.begin + shard.count());
            const size_t lo_n = from < to ? to - from : 0;
            upload_master(params + o, master_lo + (lo_n ? from - shard.begin : 0), host + a, m, lo_n ? from - o : 0,
                          lo_n);
        }
    }

    // the fp32 master weights of the rank's range (one rank: all)
    std::vector<float> get_master() const { return download_master(master(), shard.count()); }
    // the rank's range of the master weights, for the optimizers
    MasterWeights master() const { return {params + shard.begin, master_lo}; }

    // in windows, so that the host holds a few hundred MB per rank (the whole fp32 buffer and its two halves
    // were 8 bytes a parameter: 64 GB per rank for an 8B model)
    void init(uint64_t seed) {
        const size_t window = std::min(layout.total, HOST_WINDOW);
        std::unique_ptr<float[]> host(new float[window]);  // not zeroed: the init writes every element, gaps too
        for (size_t a = 0; a < layout.total; a += window) {
            const size_t n = std::min(window, layout.total - a);
            init_parameters(host.get(), layout, cfg, seed, 0, a, a + n);
            upload_halves(host.get(), a, n);
        }
    }

    template <typename T_>
    T_* alloc(size_t n, const char* what) {
        if (n == 0) return nullptr;
        T_* p = (T_*)cuda_malloc(n * sizeof(T_), what);
        owned.push_back(p);
        return p;
    }

    void allocate(int B_, int T_) {
        free_activations();
        B = B_; T = T_;
        sz = activation_sizes(cfg, B, T, recompute, logit_chunk);
        const size_t BT = (size_t)B * T;
        h = alloc<float>(sz.resid, "residual stream");
        for (int l = 0; l <= cfg.n_layer; l++) {
            xhat.push_back(alloc<bf16>(sz.resid, "normalised residual stream"));
            rstd.push_back(alloc<float>(BT, "norm rstd"));
        }
        for (const KeptSizes& k : sz.kept) {
            LayerActs a;
            a.in_out = alloc<bf16>(k.in_out, "in_proj output");
            a.y = alloc<bf16>(k.y, "mixer output");
            a.x_proj_out = alloc<bf16>(k.x_proj_out, "x_proj output");
            a.stats = alloc<float>(k.stats, "row statistics");
            a.saved = alloc<char>(k.saved_bytes, "scan chunk states");
            acts.push_back(a);
        }
        while ((int)acts.size() < cfg.n_layer) acts.push_back(acts[0]);  // recompute: one set, shared
        const SharedSizes& h = sz.shared;
        ctx.B = B; ctx.T = T;
        ctx.params = params;
        ctx.grads = grads;
        ctx.grad_buckets = shard.sharded() ? &shard.buckets : nullptr;
        ctx.out_in = alloc<bf16>(h.out_in, "out_proj input (recomputed)");
        ctx.dout_in = alloc<bf16>(h.dout_in, "out_proj input gradient");
        ctx.din = alloc<bf16>(h.din, "in_proj output gradient");
        ctx.conv_out = alloc<bf16>(h.conv_out, "conv output");
        ctx.dconv_out = alloc<bf16>(h.conv_out, "conv output gradient");
        ctx.dy = alloc<bf16>(h.dy, "SSD output gradient");
        ctx.delta = alloc<bf16>(h.delta, "dt_proj output");
        ctx.ddelta = alloc<bf16>(h.delta, "dt_proj output gradient");
        ctx.dxproj = alloc<bf16>(h.dxproj, "x_proj output gradient");
        ctx.mixer_scratch = alloc<char>(h.mixer_scratch, "scan/attention scratch");
        ctx.norm_scratch = alloc<float>(h.norm_scratch, "norm scratch");
        xn = alloc<bf16>(BT * cfg.d_model, "norm output");
        dxn = alloc<bf16>(BT * cfg.d_model, "norm output gradient");
        logits = alloc<bf16>(sz.logits, "logits");
        dresid = alloc<float>(sz.resid, "residual gradient");
        dresid_bf16 = alloc<bf16>(sz.resid, "residual gradient (bf16)");
        losses = alloc<float>(BT, "per-token losses");
        d_inputs = alloc<int>(BT, "inputs");
        d_targets = alloc<int>(BT, "targets");
        d_loss_rows = alloc<int>(BT, "gathered loss rows");
        d_loss_slot = alloc<int>(BT, "loss rows' places");
        d_rank = alloc<int>(BT, "target ranks");
        d_weights = alloc<float>(BT, "loss weights");
        d_pos = alloc<int>(BT, "positions in the documents");
        d_dloss = alloc<float>(1, "loss gradient scale");
        loss_total = alloc<double>(1, "loss total");
        cudaCheck(cudaMemset(loss_total, 0, sizeof(double)));
        allocate_stages();
        place_weight_gradients();
    }

    // wgrad_beside per layer (wgrad_placement), and the side stream, its cuBLAS handle and events where one is
    void place_weight_gradients() {
        wgrad_beside.assign(cfg.n_layer, 0);
        for (int l = 0; l < cfg.n_layer; l++) {
            const long tiles = (long)ceil_div(layout.block(l).in_width, 128) * (long)ceil_div(cfg.d_model, 128);
            wgrad_beside[l] = wgrad_placement == WgradPlacement::Beside ||
                              (wgrad_placement == WgradPlacement::Auto && tiles < sm_count());
        }
        const bool any = std::find(wgrad_beside.begin(), wgrad_beside.end(), 1) != wgrad_beside.end();
        if (!any || wgrad_stream) return;
        cudaCheck(cudaStreamCreateWithFlags(&wgrad_stream, cudaStreamNonBlocking));
        matmul_own_handle(wgrad_stream);
        for (cudaEvent_t* e : {&wgrad_fork, &wgrad_out, &wgrad_in})
            cudaCheck(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
    }

    void free_activations() {
        graphs.clear();  // they hold the addresses of what is freed here
        free_stages();
        for (void* p : owned) cudaFree(p);
        owned.clear();
        xhat.clear();
        rstd.clear();
        acts.clear();
    }

    const bf16* w(size_t offset) const { return params + offset; }
    void phase(const char* name, cudaStream_t s) { if (timer) timer->mark(name, s); }
    template <typename F> void visit(int l, F&& f) { std::visit(f, layout.blocks[l]); }

    // the norm (from h in the forward; in the backward again from what it kept), in_proj into
    // the layer's in_out, then the mixer
    void layer_mixer_forward(int l, bool backward, cudaStream_t s) {
        const BlockBase& b = layout.block(l);
        const LayerActs& a = acts[l];
        phase("rmsnorm", s);
        if (backward) rmsnorm_apply(xn, xhat[l], w(b.norm), B * T, cfg.d_model, s);
        else rmsnorm_forward(xn, xhat[l], rstd[l], h, w(b.norm), B * T, cfg.d_model, cfg.norm_eps, s);
        phase(b.in_name, s);
        matmul_forward(a.in_out, xn, w(b.in_proj), B * T, b.in_width, cfg.d_model,
                       MatmulStrides{cfg.d_model, b.in_stride}, s);
        visit(l, [&](const auto& blk) { blk.forward(ctx, a, s); });
    }

    // h += out_proj(mixer(norm(h)))
    void layer_forward(int l, cudaStream_t s) {
        const BlockBase& b = layout.block(l);
        layer_mixer_forward(l, false, s);
        const bf16* out_in = nullptr;
        visit(l, [&](const auto& blk) { out_in = blk.out_input(ctx, acts[l]); });
        phase("out_proj", s);
        matmul_forward_residual(h, h, out_in, w(b.out_proj), B * T, cfg.d_model, b.out_width, s);
    }

    // dresid (fp32, accumulated) and dresid_bf16 hold the gradient of the residual stream
    // after layer l; on return they hold it before layer l
    void layer_backward(int l, cudaStream_t s) {
        const BlockBase& b = layout.block(l);
        const LayerActs& a = acts[l];
        const int BT = B * T, d = cfg.d_model;
        // what the forward did not keep (with recompute on, the whole layer)
        phase("recompute", s);
        if (recompute) {
            PhaseTimer* t = timer;
            timer = ctx.timer = nullptr;  // the whole rerun is charged to "recompute"
            layer_mixer_forward(l, true, s);
            timer = ctx.timer = t;
        } else {
            rmsnorm_apply(xn, xhat[l], w(b.norm), BT, d, s);
            visit(l, [&](const auto& blk) { blk.recompute(ctx, a, s); });
        }
        // out_proj's input gradient, the mixer's backward (the Mamba-2 and MLP blocks rebuild out_proj's
        // input on the way, in place of a recompute pass)
        phase("out_proj bwd", s);
        const MatmulStrides out_ld{b.out_width, d}, in_ld{d, b.in_stride};
        matmul_backward_input(ctx.dout_in, dresid_bf16, w(b.out_proj), BT, d, b.out_width, out_ld, s);
        visit(l, [&](const auto& blk) { blk.backward(ctx, a, s); });
        const bf16* out_in = nullptr;
        visit(l, [&](const auto& blk) { out_in = blk.out_input(ctx, a); });
        // The weight gradients, beside (wgrad_beside): out_proj's beside in_proj's input gradient (the norm's
        // backward then rewrites dresid_bf16, which it reads), in_proj's beside the norm's backward (the next
        // layer rewrites din and xn)
        const bool beside = wgrad_beside[l];
        const cudaStream_t ws = beside ? wgrad_stream : s;
        auto signal = [&](cudaEvent_t e, cudaStream_t from, cudaStream_t to) {
            if (!beside) return;
            cudaCheck(cudaEventRecord(e, from));
            cudaCheck(cudaStreamWaitEvent(to, e, 0));
        };
        // (--profile: serial, each weight gradient is charged to its matmul's phase; beside, the phases it
        // overlaps carry it)
        phase("out_proj bwd", s);
        signal(wgrad_fork, s, ws);
        matmul_backward_weight(ctx.grad(b.out_proj), dresid_bf16, out_in, BT, d, b.out_width, out_ld, ws,
                               ctx.write_grads);
        if (beside) cudaCheck(cudaEventRecord(wgrad_out, ws));
        phase("in_proj bwd", s);
        matmul_backward_weight(ctx.grad(b.in_proj), ctx.din, xn, BT, b.in_width, d, in_ld, ws, ctx.write_grads);
        matmul_backward_input(dxn, ctx.din, w(b.in_proj), BT, b.in_width, d, in_ld, s);
        if (beside) cudaCheck(cudaStreamWaitEvent(s, wgrad_out, 0));
        phase("rmsnorm bwd", s);
        rmsnorm_backward(dresid, dresid_bf16, ctx.grad(b.norm), ctx.norm_scratch, dxn, xhat[l], w(b.norm), rstd[l], BT, d, s);
        signal(wgrad_in, ws, s);
    }

    // The host's batches reach the device through two pinned staging buffers in turn: the
    // copy of one micro-batch runs while the host prepares the next, and no pageable copy
    // holds the host back. A buffer is refilled once its last copy has finished.
    struct Stage {
        int *inputs = nullptr, *targets = nullptr, *pos = nullptr, *rows = nullptr, *slot = nullptr;
        float *weights = nullptr, *dloss = nullptr;
        cudaEvent_t copied = nullptr;
    };
    Stage stages[2];
    int next_stage = 0;

    void allocate_stages() {
        const size_t BT = (size_t)B * T;
        for (Stage& st : stages) {
            cudaCheck(cudaMallocHost(&st.inputs, BT * sizeof(int)));
            cudaCheck(cudaMallocHost(&st.targets, BT * sizeof(int)));
            cudaCheck(cudaMallocHost(&st.pos, BT * sizeof(int)));
            cudaCheck(cudaMallocHost(&st.rows, BT * sizeof(int)));
            cudaCheck(cudaMallocHost(&st.slot, BT * sizeof(int)));
            cudaCheck(cudaMallocHost(&st.weights, BT * sizeof(float)));
            cudaCheck(cudaMallocHost(&st.dloss, sizeof(float)));
            cudaCheck(cudaEventCreateWithFlags(&st.copied, cudaEventDisableTiming));
        }
        cudaCheck(cudaMallocHost(&loss_host, sizeof(double)));
    }
    void free_stages() {
        for (Stage& st : stages) {
            for (void* p : {(void*)st.inputs, (void*)st.targets, (void*)st.pos, (void*)st.rows, (void*)st.slot,
                            (void*)st.weights, (void*)st.dloss})
                cudaFreeHost(p);
            if (st.copied) cudaEventDestroy(st.copied);
            st = Stage{};
        }
        cudaFreeHost(loss_host);
        loss_host = nullptr;
    }
    // host array -> pinned stage -> device, on stream s
    template <typename X>
    static void upload(X* dev, X* pinned, const X* host, size_t n, cudaStream_t s) {
        memcpy(pinned, host, n * sizeof(X));
        cudaCheck(cudaMemcpyAsync(dev, pinned, n * sizeof(X), cudaMemcpyHostToDevice, s));
    }

    // Forward to the per-token losses (`losses`, device), whose sum it adds to the device
    // total that loss_sum() reads. Without targets the forward stops at the final norm, and
    // compute_logits() gives the logits of chosen rows. With dloss > 0 the gradient is carried
    // back through the LM head, ready for backward(). With target_rank (device, BT ints) it
    // also records each target's rank for top-k accuracy.
    void forward(const Batch& batch, float dloss, float z_loss, cudaStream_t s = 0, int* target_rank = nullptr) {
        upload_batch(batch, dloss, s, target_rank == nullptr);
        forward_uploaded(batch.targets != nullptr, batch.weights != nullptr, dloss > 0, z_loss, target_rank, s);
    }

    // One training micro-batch: forward(batch, dloss, z_loss) and backward(). With use_graph
    // (one rank, no phase timer) the two run as a CUDA graph, captured at the first call and
    // replayed after: a small model's step is a few hundred short kernels, and launching them
    // one by one, not the GPU, sets its pace. The replay computes the same bits: it reads the
    // batch (dloss included) from the device buffers that upload_batch() fills before it.
    bool use_graph = true;
    void train_micro_batch(const Batch& batch, float dloss, float z_loss, cudaStream_t s = 0) {
        if (!use_graph || timer || grads_done) {
            forward(batch, dloss, z_loss, s);
            backward(s);
            return;
        }
        upload_batch(batch, dloss, s, true);
        const StepGraph::Key key{ctx.write_grads, batch.weights != nullptr, batch.pos != nullptr, z_loss, loss_rows};
        StepGraph& graph = graphs[key];
        if (!graph.exec) {
            buckets.reserve(B * T, cfg.padded_vocab());  // what the step allocates on first use exists before
            matmul_init();
            graph.capture([&](cudaStream_t cs) {
                forward_uploaded(true, key.weighted, true, z_loss, nullptr, cs);
                backward(cs);
            });
        }
        cudaCheck(cudaGraphLaunch(graph.exec, s));
        ctx.write_grads = false;  // (the capture's backward() cleared it too)
    }

    // the batch's arrays (and dloss, the loss gradient's scale) into the device buffers the forward reads;
    // with `gather` (and gather_loss_rows, targets and dloss > 0), the rows that carry a loss gathered where
    // they are fewer than the batch's (loss_rows)
    void upload_batch(const Batch& batch, float dloss, cudaStream_t s, bool gather) {
        const int BT = B * T;
        Stage& st = stages[next_stage];
        next_stage ^= 1;
        cudaCheck(cudaEventSynchronize(st.copied));  // its previous copies are done
        upload(d_inputs, st.inputs, batch.inputs, BT, s);
        loss_rows = BT;
        if (gather && gather_loss_rows && batch.targets && dloss > 0) {
            auto carries_loss = [&](int r) {
                return batch.targets[r] >= 0 && (!batch.weights || batch.weights[r] != 0.0f);
            };
            int n = 0;
            for (int r = 0; r < BT; r++) n += carries_loss(r);
            loss_rows = loss_row_bucket(n, BT);
            if (loss_rows < BT) {  // (pretraining, every row a loss, stops at the count)
                for (int r = 0, i = 0; r < BT; r++) {
                    const bool loss = carries_loss(r);
                    st.slot[r] = loss ? i : -1;
                    if (loss) st.rows[i++] = r;
                }
                for (int i = 0; i < loss_rows; i++) {
                    const int r = i < n ? st.rows[i] : -1;  // the padding carries no target
                    st.rows[i] = r;
                    st.targets[i] = r < 0 ? -1 : batch.targets[r];
                    if (batch.weights) st.weights[i] = r < 0 ? 0.0f : batch.weights[r];
                }
                cudaCheck(cudaMemcpyAsync(d_loss_rows, st.rows, loss_rows * sizeof(int), cudaMemcpyHostToDevice, s));
                cudaCheck(cudaMemcpyAsync(d_loss_slot, st.slot, BT * sizeof(int), cudaMemcpyHostToDevice, s));
                cudaCheck(cudaMemcpyAsync(d_targets, st.targets, loss_rows * sizeof(int), cudaMemcpyHostToDevice, s));
                if (batch.weights)
                    cudaCheck(cudaMemcpyAsync(d_weights, st.weights, loss_rows * sizeof(float), cudaMemcpyHostToDevice,
                                              s));
            }
        }
        if (batch.targets && loss_rows == BT) upload(d_targets, st.targets, batch.targets, BT, s);
        if (batch.weights && loss_rows == BT) upload(d_weights, st.weights, batch.weights, BT, s);
        if (batch.pos) upload(d_pos, st.pos, batch.pos, BT, s);
        if (dloss > 0) upload(d_dloss, st.dloss, &dloss, 1, s);
        cudaCheck(cudaEventRecord(st.copied, s));
        ctx.pos = batch.pos ? d_pos : nullptr;
    }

    // forward() from the uploaded batch; grad: with the gradient through the LM head (dloss > 0)
    void forward_uploaded(bool targets, bool weighted, bool grad, float z_loss, int* target_rank, cudaStream_t s) {
        const int BT = B * T, d = cfg.d_model;
        ctx.timer = timer;
        if (grad) buckets.build(d_inputs, BT, cfg.padded_vocab(), s);  // for the embedding backward
        phase("embedding", s);
        embedding_forward(h, d_inputs, w(layout.embedding), BT, d, s);
        for (int l = 0; l < cfg.n_layer; l++) layer_forward(l, s);
        phase("rmsnorm", s);
        const int L = cfg.n_layer;
        rmsnorm_forward(xn, xhat[L], rstd[L], h, w(layout.final_norm), BT, d, cfg.norm_eps, s);
        if (!targets) return;
        lm_head_and_loss(target_rank, weighted, grad, z_loss, s);
        loss_accumulate(loss_total, losses, loss_rows, s);
    }

    // Logits of rows [r0, r0 + rows) (rows <= logit_rows()) into `logits`, after a forward; of the rows of x
    // (the LM head's inputs) instead of the final norm's output where given
    void compute_logits(int r0, int rows, cudaStream_t s = 0, const bf16* x = nullptr) {
        if (rows > logit_rows()) THROW("compute_logits: %d rows asked, the buffer holds %d", rows, logit_rows());
        matmul_forward(logits, (x ? x : xn) + (size_t)r0 * cfg.d_model, w(layout.lm_head), rows, cfg.padded_vocab(),
                       cfg.d_model, s);
    }
    // rows of logits a chunk: set before allocate() sizes the buffer (tests set it smaller after, to run several
    // chunks); never more than the buffer holds
    int logit_chunk = LOGIT_CHUNK;
    int logit_rows() const { return (int)std::min((size_t)logit_chunk, sz.logits / cfg.padded_vocab()); }

    // The LM head and the loss run over chunks of rows, so the logits of the whole batch
    // never exist at once; with dloss > 0 each chunk's gradient goes straight through the
    // LM head (into dxn and the head's weight gradient), ready for backward(). Over loss_rows
    // gathered rows (upload_batch), their inputs and gradients sit in the residual gradient's
    // buffers, which are free until backward().
    void lm_head_and_loss(int* target_rank, bool weighted, bool grad, float z_loss, cudaStream_t s) {
        const int BT = B * T, d = cfg.d_model, Vp = cfg.padded_vocab();
        const bool gathered = loss_rows < BT;
        bf16 *x = xn, *dx = dxn;
        if (gathered) {
            phase("lm_head", s);
            x = dresid_bf16;
            dx = reinterpret_cast<bf16*>(dresid);
            copy_rows(x, xn, d_loss_rows, loss_rows, d, s);
        }
        for (int r0 = 0; r0 < loss_rows; r0 += logit_rows()) {
            const int rows = std::min(logit_rows(), loss_rows - r0);
            phase("lm_head", s);
            compute_logits(r0, rows, s, x);
            phase("loss", s);
            fused_classifier(logits, losses + r0, target_rank ? target_rank + r0 : nullptr, d_targets + r0,
                             weighted ? d_weights + r0 : nullptr, d_dloss, z_loss, rows, cfg.vocab_size, Vp, grad, s);
            if (grad) {
                phase("lm_head bwd", s);
                matmul_backward(dx + (size_t)r0 * d, ctx.grad(layout.lm_head), logits, x + (size_t)r0 * d,
                                w(layout.lm_head), rows, Vp, d, s, ctx.write_grads && r0 == 0);
            }
        }
        if (gathered && grad) copy_rows(dxn, dx, d_loss_slot, BT, d, s);  // zeros where no loss was taken
    }

    // Backward from what forward(dloss > 0) left; gradients accumulate
    // into `grads` (zero them once per optimizer step with zero_grad()).
    void backward(cudaStream_t s = 0) {
        const int BT = B * T, d = cfg.d_model, L = cfg.n_layer;
        // the forward left the gradient of the final norm's output in dxn
        phase("rmsnorm bwd", s);
        cudaCheck(cudaMemsetAsync(dresid, 0, (size_t)BT * d * sizeof(float), s));
        rmsnorm_backward(dresid, dresid_bf16, ctx.grad(layout.final_norm), ctx.norm_scratch, dxn, xhat[L],
                         w(layout.final_norm), rstd[L], BT, d, s);
        if (grads_done) grads_done(layout.final_norm, false, s);  // and an untied LM head, done in the forward
        for (int l = L - 1; l >= 0; l--) {
            layer_backward(l, s);
            if (grads_done) grads_done(layout.block(l).norm, false, s);
        }
        phase("embedding bwd", s);
        embedding_backward(ctx.grad(layout.embedding), dresid, buckets, BT, d, s);
        if (grads_done) grads_done(0, true, s);
        ctx.write_grads = false;  // the next backward adds
    }

    // The gradients are zero for the next backward. One rank: only those the backward adds to are
    // cleared (layout.added_grads(): norms, the mixers' own tensors, an untied embedding); the matmul
    // weights' are left for the next backward's weight-gradient matmuls to write instead of adding to
    // zeros (beta 0), which saves clearing them and reading them back (most of the parameters).
    // (Several ranks zero each bucket as the backward reaches it: GradReducer.)
    void zero_grad(cudaStream_t s = 0) {
        if (shard.sharded()) {
            cudaCheck(cudaMemsetAsync(grads, 0, shard.buckets.arena * sizeof(float), s));
            return;
        }
        zero_ranges(grads, added_grads, s);
        ctx.write_grads = true;
    }

    // The sum of the per-token losses of every forward (with targets) since the last read into
    // *to (pinned; loss_host by default), and the total back to zero, queued on stream s: *to holds it once
    // the stream's work is done (a training step reads it after its update, with no sync between)
    void loss_sum_to_host(cudaStream_t s, double* to = nullptr) {
        cudaCheck(cudaMemcpyAsync(to ? to : loss_host, loss_total, sizeof(double), cudaMemcpyDeviceToHost, s));
        cudaCheck(cudaMemsetAsync(loss_total, 0, sizeof(double), s));
    }
    // the same, read now: one host sync, once per evaluation
    double loss_sum(cudaStream_t s = 0) {
        loss_sum_to_host(s);
        cudaCheck(cudaStreamSynchronize(s));
        return *loss_host;
    }
};
#endif
