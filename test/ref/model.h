// Double reference of the whole language model, composed from the layer references:
// embedding -> layers (one per pattern symbol: M Mamba-1/2, * attention, + MLP) -> final
// RMSNorm -> lm_head -> loss.
// Parameters and gradients are named double vectors (names and order as in HACKING.md,
// unpadded vocab); the forward keeps every activation the backward needs.
#pragma once
#include <cmath>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "common.h"
#include "test/ref/linear.h"
#include "test/ref/embedding.h"
#include "test/ref/norm.h"
#include "test/ref/conv1d.h"
#include "test/ref/ssd.h"
#include "test/ref/scan.h"
#include "test/ref/attention.h"
#include "test/ref/mlp.h"
#include "test/ref/loss.h"
#include "test/ref/adamw.h"

namespace ref {

struct ModelConfig {
    int vocab_size = 0, d_model = 0, n_layer = 0;
    std::string pattern, ssm = "mamba2";
    int d_state = 128, headdim = 64, ngroups = 1, expand = 2, d_conv = 4, chunk_size = 256, dt_rank = 0;
    int n_heads = 0, n_kv_heads = 0, attn_head_dim = 64;
    bool rope = false;
    double rope_theta = 10000.0;
    std::string mlp = "swiglu";
    int d_ff = 0;
    bool tie_embeddings = false;
    double norm_eps = 1e-5;

    int d_inner() const { return expand * d_model; }
    bool mamba1() const { return ssm == "mamba1"; }
    int nheads() const { return d_inner() / headdim; }
    int conv_dim() const { return mamba1() ? d_inner() : d_inner() + 2 * ngroups * d_state; }
    int d_in_proj() const { return mamba1() ? 2 * d_inner() : 2 * d_inner() + 2 * ngroups * d_state + nheads(); }
    int x_proj_dim() const { return dt_rank + 2 * d_state; }
    int d_qkv() const { return (n_heads + 2 * n_kv_heads) * attn_head_dim; }
    int d_up() const { return mlp == "swiglu" ? 2 * d_ff : d_ff; }

    // the dumps' JSON (test/pytorch_ref.py writes every key its layers use)
    static ModelConfig from_json(const std::string& path) {
        std::ifstream f(path);
        if (!f) THROW("cannot open model config '%s'", path.c_str());
        nlohmann::json j = nlohmann::json::parse(f);
        ModelConfig c;
        c.vocab_size = j.at("vocab_size").get<int>();
        c.d_model = j.at("d_model").get<int>();
        c.n_layer = j.at("n_layer").get<int>();
        c.pattern = j.value("pattern", std::string(c.n_layer, 'M'));
        c.ssm = j.value("ssm", c.ssm);
        c.d_state = j.value("d_state", c.d_state);
        c.headdim = j.value("headdim", c.headdim);
        c.ngroups = j.value("ngroups", c.ngroups);
        c.expand = j.value("expand", c.expand);
        c.d_conv = j.value("d_conv", c.d_conv);
        c.chunk_size = j.value("chunk_size", c.chunk_size);
        c.dt_rank = j.value("dt_rank", (c.d_model + 15) / 16);
        c.n_heads = j.value("n_heads", 0);
        c.n_kv_heads = j.value("n_kv_heads", c.n_heads);
        c.attn_head_dim = j.value("attn_head_dim", c.attn_head_dim);
        c.rope = j.value("rope", c.rope);
        c.rope_theta = j.value("rope_theta", c.rope_theta);
        c.mlp = j.value("mlp", c.mlp);
        c.d_ff = j.value("d_ff", 4 * c.d_model);
        c.tie_embeddings = j.value("tie_embeddings", c.tie_embeddings);
        c.norm_eps = j.value("norm_eps", c.norm_eps);
        if ((int)c.pattern.size() != c.n_layer) THROW("'%s': pattern length != n_layer", path.c_str());
        if (c.pattern.find('M') != std::string::npos && !c.mamba1() && (c.d_inner() % c.headdim || c.nheads() % c.ngroups))
            THROW("'%s': bad head/group sizes", path.c_str());
        return c;
    }
};

using Tensors = std::map<std::string, std::vector<double>>;

// AdamW weight decay applies to matrices, embeddings and conv weights; never to norm
// weights, conv_bias, dt_bias, A_log, D.
// test/pytorch_ref.py and mamba.cuh's ParamLayout use the same groups.
inline bool weight_decays(const std::string& name) {
    std::string leaf = name.substr(name.rfind('.') + 1);
    for (const char* m : {"embedding", "lm_head", "in_proj", "out_proj", "conv_weight", "x_proj", "dt_proj", "qkv_proj",
                          "o_proj", "up_proj", "down_proj"})
        if (leaf == m) return true;
    return false;
}

// One residual block: h += out_proj(mixer(in_proj(rmsnorm(h)))). The kinds differ in the
// mixer (from in_proj's output to out_proj's input) and its own parameters.
struct Layer {
    ModelConfig c;
    std::string pre;  // "layers.{i}."
    std::string in_name, out_name;
    int in_width, out_in_width;  // in_proj output and out_proj input columns
    std::vector<double> h_in, rstd, xn, in_out, out_in;  // kept for the backward

    Layer(const ModelConfig& cfg, int i, const char* in_name_, const char* out_name_, int in_w, int out_in_w)
        : c(cfg), pre("layers." + std::to_string(i) + "."), in_name(in_name_), out_name(out_name_), in_width(in_w),
          out_in_width(out_in_w) {}
    virtual ~Layer() = default;

    // the mixer's own parameters, in buffer order after in_proj (before out_proj)
    virtual void declare_mixer(std::vector<std::pair<std::string, size_t>>& s) const { (void)s; }
    // in_out (BT, in_width) -> out_in (BT, out_in_width)
    virtual void mixer_forward(const Tensors& p, int B, int T) = 0;
    // gradient of out_in -> gradient of in_out (written); the mixer's parameter gradients accumulate
    virtual void mixer_backward(double* din_out, const double* dout_in, const Tensors& p, Tensors& grads, int B, int T) = 0;

    const double* P(const Tensors& p, const char* n) const { return p.at(pre + n).data(); }
    double* G(Tensors& g, const char* n) const { return g.at(pre + n).data(); }

    void declare(std::vector<std::pair<std::string, size_t>>& s) const {
        s.push_back({pre + "norm", (size_t)c.d_model});
        s.push_back({pre + in_name, (size_t)in_width * c.d_model});
        declare_mixer(s);
        s.push_back({pre + out_name, (size_t)c.d_model * out_in_width});
    }

    void forward(double* h, const Tensors& p, int B, int T) {
        const int d = c.d_model;
        const size_t BT = (size_t)B * T;
        h_in.assign(h, h + BT * d);
        rstd.resize(BT); xn.resize(BT * d); in_out.resize(BT * in_width); out_in.resize(BT * out_in_width);
        rmsnorm_forward(xn.data(), rstd.data(), h, p.at(pre + "norm").data(), (int)BT, d, c.norm_eps);
        linear_forward(in_out.data(), xn.data(), p.at(pre + in_name).data(), (int)BT, in_width, d);
        mixer_forward(p, B, T);
        std::vector<double> out(BT * d);
        linear_forward(out.data(), out_in.data(), p.at(pre + out_name).data(), (int)BT, d, out_in_width);
        for (size_t i = 0; i < BT * d; i++) h[i] += out[i];
    }

    // dh: gradient of the block's output stream in, of its input stream out
    void backward(double* dh, const Tensors& p, Tensors& grads, int B, int T) {
        const int d = c.d_model;
        const size_t BT = (size_t)B * T;
        std::vector<double> dout_in(BT * out_in_width), din_out(BT * in_width), dxn(BT * d);
        linear_backward(dout_in.data(), grads.at(pre + out_name).data(), dh, out_in.data(), p.at(pre + out_name).data(),
                        (int)BT, d, out_in_width);
        mixer_backward(din_out.data(), dout_in.data(), p, grads, B, T);
        linear_backward(dxn.data(), grads.at(pre + in_name).data(), din_out.data(), xn.data(),
                        p.at(pre + in_name).data(), (int)BT, in_width, d);
        rmsnorm_backward(dh, grads.at(pre + "norm").data(), dxn.data(), h_in.data(), p.at(pre + "norm").data(),
                         rstd.data(), (int)BT, d);
    }
};

// copy columns [off, off + n) of each row of src (rows, stride) into/out of a contiguous (rows, n)
inline std::vector<double> gather_cols(const std::vector<double>& src, size_t rows, int stride, int off, int n) {
    std::vector<double> dst(rows * n);
    for (size_t r = 0; r < rows; r++)
        for (int j = 0; j < n; j++) dst[r * n + j] = src[r * stride + off + j];
    return dst;
}
inline void scatter_cols(double* dst, const std::vector<double>& src, size_t rows, int stride, int off, int n) {
    for (size_t r = 0; r < rows; r++)
        for (int j = 0; j < n; j++) dst[r * stride + off + j] = src[r * n + j];
}

// Mamba-2: in_proj -> [z | xBC | dt]; xbc = silu(conv(xBC)) = [x | B | C]; y = ssd(...);
// out_in = gated_rmsnorm(y, z)
struct Mamba2Layer : Layer {
    std::vector<double> z, xBC, xbc, x, Bm, Cm, dt_raw, y, gate_rstd;

    Mamba2Layer(const ModelConfig& cfg, int i) : Layer(cfg, i, "in_proj", "out_proj", cfg.d_in_proj(), cfg.d_inner()) {}

    void declare_mixer(std::vector<std::pair<std::string, size_t>>& s) const override {
        size_t H = c.nheads();
        s.push_back({pre + "conv_weight", (size_t)c.conv_dim() * c.d_conv});
        s.push_back({pre + "conv_bias", (size_t)c.conv_dim()});
        s.push_back({pre + "dt_bias", H});
        s.push_back({pre + "A_log", H});
        s.push_back({pre + "D", H});
        s.push_back({pre + "gate_norm", (size_t)c.d_inner()});
    }

    void mixer_forward(const Tensors& p, int B, int T) override {
        const int di = c.d_inner(), H = c.nheads(), GN = c.ngroups * c.d_state, cd = c.conv_dim(), dip = c.d_in_proj();
        const size_t BT = (size_t)B * T;
        z = gather_cols(in_out, BT, dip, 0, di);
        xBC = gather_cols(in_out, BT, dip, di, cd);
        dt_raw = gather_cols(in_out, BT, dip, di + cd, H);
        xbc.resize(BT * cd); y.resize(BT * di); gate_rstd.resize(BT * c.ngroups);
        conv1d_silu_forward(xbc.data(), xBC.data(), P(p, "conv_weight"), P(p, "conv_bias"), B, T, cd, c.d_conv);
        x = gather_cols(xbc, BT, cd, 0, di);
        Bm = gather_cols(xbc, BT, cd, di, GN);
        Cm = gather_cols(xbc, BT, cd, di + GN, GN);
        ssd_forward(y.data(), x.data(), Bm.data(), Cm.data(), dt_raw.data(), P(p, "dt_bias"), P(p, "A_log"), P(p, "D"),
                    B, T, H, c.headdim, c.ngroups, c.d_state);
        gated_rmsnorm_forward(out_in.data(), gate_rstd.data(), y.data(), z.data(), P(p, "gate_norm"), (int)BT, di,
                              c.ngroups, c.norm_eps);
    }

    void mixer_backward(double* din_out, const double* dg, const Tensors& p, Tensors& grads, int B, int T) override {
        const int di = c.d_inner(), H = c.nheads(), GN = c.ngroups * c.d_state, cd = c.conv_dim(), dip = c.d_in_proj();
        const size_t BT = (size_t)B * T;
        std::vector<double> dy(BT * di), dz(BT * di), dx(BT * di), dB(BT * GN), dC(BT * GN), ddt(BT * H),
            dxbc(BT * cd), dxBC(BT * cd);
        gated_rmsnorm_backward(dy.data(), dz.data(), G(grads, "gate_norm"), dg, y.data(), z.data(), P(p, "gate_norm"),
                               gate_rstd.data(), (int)BT, di, c.ngroups);
        ssd_backward(dx.data(), dB.data(), dC.data(), ddt.data(), G(grads, "dt_bias"), G(grads, "A_log"), G(grads, "D"),
                     dy.data(), x.data(), Bm.data(), Cm.data(), dt_raw.data(), P(p, "dt_bias"), P(p, "A_log"),
                     P(p, "D"), B, T, H, c.headdim, c.ngroups, c.d_state);
        scatter_cols(dxbc.data(), dx, BT, cd, 0, di);
        scatter_cols(dxbc.data(), dB, BT, cd, di, GN);
        scatter_cols(dxbc.data(), dC, BT, cd, di + GN, GN);
        conv1d_silu_backward(dxBC.data(), G(grads, "conv_weight"), G(grads, "conv_bias"), dxbc.data(), xBC.data(),
                             P(p, "conv_weight"), P(p, "conv_bias"), B, T, cd, c.d_conv);
        scatter_cols(din_out, dz, BT, dip, 0, di);
        scatter_cols(din_out, dxBC, BT, dip, di, cd);
        scatter_cols(din_out, ddt, BT, dip, di + cd, H);
    }
};

// Mamba-1: in_proj -> [x | z]; u = silu(conv(x)); x_proj(u) = [dt | B | C];
// delta_raw = dt_proj(dt); out_in = scan(u, delta_raw, z, B, C) (gate included)
struct Mamba1Layer : Layer {
    std::vector<double> x, z, u, xdbc, dtr, Bm, Cm, delta_raw;

    Mamba1Layer(const ModelConfig& cfg, int i) : Layer(cfg, i, "in_proj", "out_proj", 2 * cfg.d_inner(), cfg.d_inner()) {}

    void declare_mixer(std::vector<std::pair<std::string, size_t>>& s) const override {
        size_t di = c.d_inner();
        s.push_back({pre + "conv_weight", di * c.d_conv});
        s.push_back({pre + "conv_bias", di});
        s.push_back({pre + "x_proj", (size_t)c.x_proj_dim() * di});
        s.push_back({pre + "dt_proj", di * c.dt_rank});
        s.push_back({pre + "dt_bias", di});
        s.push_back({pre + "A_log", di * c.d_state});
        s.push_back({pre + "D", di});
    }

    void mixer_forward(const Tensors& p, int B, int T) override {
        const int di = c.d_inner(), R = c.dt_rank, N = c.d_state, xp = c.x_proj_dim();
        const size_t BT = (size_t)B * T;
        x = gather_cols(in_out, BT, 2 * di, 0, di);
        z = gather_cols(in_out, BT, 2 * di, di, di);
        u.resize(BT * di); xdbc.resize(BT * xp); delta_raw.resize(BT * di);
        conv1d_silu_forward(u.data(), x.data(), P(p, "conv_weight"), P(p, "conv_bias"), B, T, di, c.d_conv);
        linear_forward(xdbc.data(), u.data(), P(p, "x_proj"), (int)BT, xp, di);
        dtr = gather_cols(xdbc, BT, xp, 0, R);
        Bm = gather_cols(xdbc, BT, xp, R, N);
        Cm = gather_cols(xdbc, BT, xp, R + N, N);
        linear_forward(delta_raw.data(), dtr.data(), P(p, "dt_proj"), (int)BT, di, R);
        selective_scan_forward(out_in.data(), u.data(), delta_raw.data(), z.data(), Bm.data(), Cm.data(),
                               P(p, "dt_bias"), P(p, "A_log"), P(p, "D"), B, T, di, N);
    }

    void mixer_backward(double* din_out, const double* dy, const Tensors& p, Tensors& grads, int B, int T) override {
        const int di = c.d_inner(), R = c.dt_rank, N = c.d_state, xp = c.x_proj_dim();
        const size_t BT = (size_t)B * T;
        std::vector<double> du(BT * di), ddelta(BT * di), dz(BT * di), dB(BT * N), dC(BT * N), ddtr(BT * R),
            dxdbc(BT * xp), du2(BT * di), dx(BT * di);
        selective_scan_backward(du.data(), ddelta.data(), dz.data(), dB.data(), dC.data(), G(grads, "A_log"),
                                G(grads, "D"), G(grads, "dt_bias"), dy, u.data(), delta_raw.data(), z.data(), Bm.data(),
                                Cm.data(), P(p, "dt_bias"), P(p, "A_log"), P(p, "D"), B, T, di, N);
        linear_backward(ddtr.data(), G(grads, "dt_proj"), ddelta.data(), dtr.data(), P(p, "dt_proj"), (int)BT, di, R);
        scatter_cols(dxdbc.data(), ddtr, BT, xp, 0, R);
        scatter_cols(dxdbc.data(), dB, BT, xp, R, N);
        scatter_cols(dxdbc.data(), dC, BT, xp, R + N, N);
        linear_backward(du2.data(), G(grads, "x_proj"), dxdbc.data(), u.data(), P(p, "x_proj"), (int)BT, xp, di);
        for (size_t i = 0; i < du.size(); i++) du[i] += du2[i];
        conv1d_silu_backward(dx.data(), G(grads, "conv_weight"), G(grads, "conv_bias"), du.data(), x.data(),
                             P(p, "conv_weight"), P(p, "conv_bias"), B, T, di, c.d_conv);
        scatter_cols(din_out, dx, BT, 2 * di, 0, di);
        scatter_cols(din_out, dz, BT, 2 * di, di, di);
    }
};

// attention: in_proj -> [q | k | v] (RoPE on q, k when enabled); out_in = causal GQA attention
struct AttentionLayer : Layer {
    std::vector<double> q, k, v, lse;  // after RoPE

    AttentionLayer(const ModelConfig& cfg, int i)
        : Layer(cfg, i, "qkv_proj", "o_proj", cfg.d_qkv(), cfg.n_heads * cfg.attn_head_dim) {}

    void mixer_forward(const Tensors&, int B, int T) override {
        const int Hq = c.n_heads, Hkv = c.n_kv_heads, Dh = c.attn_head_dim, W = c.d_qkv();
        const size_t BT = (size_t)B * T;
        q = gather_cols(in_out, BT, W, 0, Hq * Dh);
        k = gather_cols(in_out, BT, W, Hq * Dh, Hkv * Dh);
        v = gather_cols(in_out, BT, W, (Hq + Hkv) * Dh, Hkv * Dh);
        if (c.rope) {
            rope_forward(q.data(), B, T, Hq, Dh, c.rope_theta);
            rope_forward(k.data(), B, T, Hkv, Dh, c.rope_theta);
        }
        lse.resize(BT * Hq);
        attention_forward(out_in.data(), lse.data(), q.data(), k.data(), v.data(), B, T, Hq, Hkv, Dh);
    }

    void mixer_backward(double* din_out, const double* dy, const Tensors&, Tensors&, int B, int T) override {
        const int Hq = c.n_heads, Hkv = c.n_kv_heads, Dh = c.attn_head_dim, W = c.d_qkv();
        const size_t BT = (size_t)B * T;
        std::vector<double> dq(q.size()), dk(k.size()), dv(v.size());
        attention_backward(dq.data(), dk.data(), dv.data(), dy, q.data(), k.data(), v.data(), B, T, Hq, Hkv, Dh);
        if (c.rope) {
            rope_backward(dq.data(), B, T, Hq, Dh, c.rope_theta);
            rope_backward(dk.data(), B, T, Hkv, Dh, c.rope_theta);
        }
        scatter_cols(din_out, dq, BT, W, 0, Hq * Dh);
        scatter_cols(din_out, dk, BT, W, Hq * Dh, Hkv * Dh);
        scatter_cols(din_out, dv, BT, W, (Hq + Hkv) * Dh, Hkv * Dh);
    }
};

// MLP: in_proj (up_proj) -> a; out_in = act(a)
struct MlpLayer : Layer {
    MlpLayer(const ModelConfig& cfg, int i) : Layer(cfg, i, "up_proj", "down_proj", cfg.d_up(), cfg.d_ff) {}

    void mixer_forward(const Tensors&, int B, int T) override {
        mlp_act_forward(out_in.data(), in_out.data(), B * T, c.d_ff, c.mlp);
    }
    void mixer_backward(double* din_out, const double* dact, const Tensors&, Tensors&, int B, int T) override {
        mlp_act_backward(din_out, dact, in_out.data(), B * T, c.d_ff, c.mlp);
    }
};

struct Model {
    ModelConfig cfg;
    std::vector<std::string> names;  // parameters in buffer order
    Tensors params, grads;
    std::vector<std::unique_ptr<Layer>> layers;
    // activations of the last forward
    int B = 0, T = 0;
    std::vector<int> inputs;
    std::vector<double> h_final, final_rstd, hn, logits_, dlogits;

    explicit Model(const ModelConfig& c) : cfg(c) {
        std::vector<std::pair<std::string, size_t>> shapes;
        const size_t V = c.vocab_size, d = c.d_model;
        shapes.push_back({"embedding", V * d});
        for (int i = 0; i < c.n_layer; i++) {
            char kind = c.pattern[i];
            if (kind == 'M' && c.mamba1()) layers.emplace_back(new Mamba1Layer(c, i));
            else if (kind == 'M') layers.emplace_back(new Mamba2Layer(c, i));
            else if (kind == '*') layers.emplace_back(new AttentionLayer(c, i));
            else if (kind == '+') layers.emplace_back(new MlpLayer(c, i));
            else THROW("ref::Model: layer kind '%c' not known", kind);
            layers.back()->declare(shapes);
        }
        shapes.push_back({"final_norm", d});
        if (!c.tie_embeddings) shapes.push_back({"lm_head", V * d});
        for (auto& s : shapes) {
            names.push_back(s.first);
            params[s.first].assign(s.second, 0.0);
            grads[s.first].assign(s.second, 0.0);
        }
    }

    const char* head_name() const { return cfg.tie_embeddings ? "embedding" : "lm_head"; }

    // Mean loss sum_i w_i (ce_i + z_loss lse_i^2) / #valid (HACKING.md); weights may be empty (all 1).
    double forward(const std::vector<int>& in, const std::vector<int>& targets, const std::vector<double>& weights,
                   int B_, int T_, double z_loss) {
        B = B_; T = T_;
        inputs = in;
        const size_t BT = (size_t)B * T, d = cfg.d_model, V = cfg.vocab_size;
        std::vector<double> h(BT * d);
        embedding_forward(h.data(), in.data(), params.at("embedding").data(), (int)BT, (int)d);
        for (auto& l : layers) l->forward(h.data(), params, B, T);
        h_final = h;
        final_rstd.resize(BT); hn.resize(BT * d); logits_.resize(BT * V); dlogits.resize(BT * V);
        rmsnorm_forward(hn.data(), final_rstd.data(), h.data(), params.at("final_norm").data(), (int)BT, (int)d,
                        cfg.norm_eps);
        linear_forward(logits_.data(), hn.data(), params.at(head_name()).data(), (int)BT, (int)V, (int)d);
        long valid = 0;
        for (int t : targets) valid += t >= 0;
        if (valid == 0) THROW("ref::Model::forward: every target is masked");
        std::vector<double> losses(BT);
        cross_entropy(losses.data(), dlogits.data(), logits_.data(), targets.data(),
                      weights.empty() ? nullptr : weights.data(), 1.0 / valid, z_loss, (int)BT, (int)V);
        double sum = 0.0;
        for (double l : losses) sum += l;
        return sum / valid;
    }

    const std::vector<double>& logits() const { return logits_; }

    // gradients of the last forward's loss into grads (overwritten)
    void backward() {
        const size_t BT = (size_t)B * T, d = cfg.d_model, V = cfg.vocab_size;
        for (auto& kv : grads) std::fill(kv.second.begin(), kv.second.end(), 0.0);
        std::vector<double> dhn(BT * d), dh(BT * d, 0.0);
        // tied: lm_head's gradient lands in the embedding's, summed with the lookup's below
        linear_backward(dhn.data(), grads.at(head_name()).data(), dlogits.data(), hn.data(),
                        params.at(head_name()).data(), (int)BT, (int)V, (int)d);
        rmsnorm_backward(dh.data(), grads.at("final_norm").data(), dhn.data(), h_final.data(),
                         params.at("final_norm").data(), final_rstd.data(), (int)BT, (int)d);
        for (int i = (int)layers.size() - 1; i >= 0; i--) layers[i]->backward(dh.data(), params, grads, B, T);
        embedding_backward(grads.at("embedding").data(), dh.data(), inputs.data(), (int)BT, (int)d);
    }

    // `steps` AdamW steps on one batch; returns the loss before each step. Gradients are
    // clipped to global norm `clip` as torch.nn.utils.clip_grad_norm_ does
    // (coef = clip / (norm + 1e-6), at most 1); decay groups as in weight_decays().
    std::vector<double> adamw_train(int steps, const std::vector<int>& in, const std::vector<int>& targets,
                                    const std::vector<double>& weights, int B_, int T_, double z_loss, double lr,
                                    double beta1, double beta2, double eps, double wd, double clip) {
        Tensors m, v;
        for (auto& n : names) {
            m[n].assign(params[n].size(), 0.0);
            v[n].assign(params[n].size(), 0.0);
        }
        std::vector<double> losses;
        for (int step = 1; step <= steps; step++) {
            losses.push_back(forward(in, targets, weights, B_, T_, z_loss));
            backward();
            double ss = 0.0;
            for (auto& n : names)
                for (double g : grads[n]) ss += g * g;
            double coef = std::fmin(1.0, clip / (std::sqrt(ss) + 1e-6));
            for (auto& n : names) {
                for (double& g : grads[n]) g *= coef;
                adamw_step(params[n].data(), m[n].data(), v[n].data(), grads[n].data(), params[n].size(), lr,
                           beta1, beta2, eps, weight_decays(n) ? wd : 0.0, step);
            }
        }
        return losses;
    }
};

} // namespace ref
