// Double reference of the whole language model, composed from the layer references:
// embedding -> layers (one per pattern character) -> final RMSNorm -> lm_head -> loss.
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
#include "test/ref/loss.h"
#include "test/ref/adamw.h"

namespace ref {

struct ModelConfig {
    int vocab_size = 0, d_model = 0, n_layer = 0;
    std::string pattern, ssm = "mamba2";
    int d_state = 128, headdim = 64, ngroups = 1, expand = 2, d_conv = 4, chunk_size = 256;
    bool tie_embeddings = false;
    double norm_eps = 1e-5;

    int d_inner() const { return expand * d_model; }
    int nheads() const { return d_inner() / headdim; }
    int conv_dim() const { return d_inner() + 2 * ngroups * d_state; }
    int d_in_proj() const { return 2 * d_inner() + 2 * ngroups * d_state + nheads(); }

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
        c.tie_embeddings = j.value("tie_embeddings", c.tie_embeddings);
        c.norm_eps = j.value("norm_eps", c.norm_eps);
        if ((int)c.pattern.size() != c.n_layer) THROW("'%s': pattern length != n_layer", path.c_str());
        if (c.d_inner() % c.headdim || c.nheads() % c.ngroups) THROW("'%s': bad head/group sizes", path.c_str());
        return c;
    }
};

using Tensors = std::map<std::string, std::vector<double>>;

// AdamW weight decay applies to matrices, embeddings and conv weights (embedding, lm_head,
// in_proj, out_proj, conv_weight); never to norm weights, conv_bias, dt_bias, A_log, D.
// test/pytorch_ref.py and mamba.cuh's ParamLayout use the same groups.
inline bool weight_decays(const std::string& name) {
    std::string leaf = name.substr(name.rfind('.') + 1);
    return leaf == "embedding" || leaf == "lm_head" || leaf == "in_proj" || leaf == "out_proj" ||
           leaf == "conv_weight";
}

// One residual layer: forward adds its output to h (BT, d); backward takes dh (gradient of
// the layer's output stream) and accumulates the gradient of its input stream into it.
struct Layer {
    virtual ~Layer() = default;
    virtual void declare(std::vector<std::pair<std::string, size_t>>& shapes) const = 0;
    virtual void forward(double* h, const Tensors& params, int B, int T) = 0;
    virtual void backward(double* dh, const Tensors& params, Tensors& grads, int B, int T) = 0;
};

struct Mamba2Layer : Layer {
    ModelConfig c;
    std::string pre;  // "layers.{i}."
    // activations kept for the backward
    std::vector<double> h_in, rstd, xn, zxbcdt, z, xBC, xbc, x, Bm, Cm, dt_raw, y, gate_rstd, g;

    Mamba2Layer(const ModelConfig& cfg, int i) : c(cfg), pre("layers." + std::to_string(i) + ".") {}

    void declare(std::vector<std::pair<std::string, size_t>>& s) const override {
        size_t d = c.d_model, H = c.nheads();
        s.push_back({pre + "norm", d});
        s.push_back({pre + "in_proj", (size_t)c.d_in_proj() * d});
        s.push_back({pre + "conv_weight", (size_t)c.conv_dim() * c.d_conv});
        s.push_back({pre + "conv_bias", (size_t)c.conv_dim()});
        s.push_back({pre + "dt_bias", H});
        s.push_back({pre + "A_log", H});
        s.push_back({pre + "D", H});
        s.push_back({pre + "gate_norm", (size_t)c.d_inner()});
        s.push_back({pre + "out_proj", d * c.d_inner()});
    }

    // copy columns [off, off + n) of each row of src (rows, stride) into/out of a contiguous (rows, n)
    static void gather_cols(double* dst, const double* src, size_t rows, int stride, int off, int n) {
        for (size_t r = 0; r < rows; r++)
            for (int j = 0; j < n; j++) dst[r * n + j] = src[r * stride + off + j];
    }
    static void scatter_cols(double* dst, const double* src, size_t rows, int stride, int off, int n) {
        for (size_t r = 0; r < rows; r++)
            for (int j = 0; j < n; j++) dst[r * stride + off + j] = src[r * n + j];
    }

    void forward(double* h, const Tensors& p, int B, int T) override {
        const int d = c.d_model, di = c.d_inner(), H = c.nheads(), GN = c.ngroups * c.d_state;
        const int cd = c.conv_dim(), dip = c.d_in_proj();
        const size_t BT = (size_t)B * T;
        auto P = [&](const char* n) { return p.at(pre + n).data(); };
        h_in.assign(h, h + BT * d);
        rstd.resize(BT); xn.resize(BT * d); zxbcdt.resize(BT * dip);
        z.resize(BT * di); xBC.resize(BT * cd); dt_raw.resize(BT * H); xbc.resize(BT * cd);
        x.resize(BT * di); Bm.resize(BT * GN); Cm.resize(BT * GN); y.resize(BT * di);
        gate_rstd.resize(BT * c.ngroups); g.resize(BT * di);

        rmsnorm_forward(xn.data(), rstd.data(), h, P("norm"), (int)BT, d, c.norm_eps);
        linear_forward(zxbcdt.data(), xn.data(), P("in_proj"), (int)BT, dip, d);
        gather_cols(z.data(), zxbcdt.data(), BT, dip, 0, di);
        gather_cols(xBC.data(), zxbcdt.data(), BT, dip, di, cd);
        gather_cols(dt_raw.data(), zxbcdt.data(), BT, dip, di + cd, H);
        conv1d_silu_forward(xbc.data(), xBC.data(), P("conv_weight"), P("conv_bias"), B, T, cd, c.d_conv);
        gather_cols(x.data(), xbc.data(), BT, cd, 0, di);
        gather_cols(Bm.data(), xbc.data(), BT, cd, di, GN);
        gather_cols(Cm.data(), xbc.data(), BT, cd, di + GN, GN);
        ssd_forward(y.data(), x.data(), Bm.data(), Cm.data(), dt_raw.data(), P("dt_bias"), P("A_log"), P("D"),
                    B, T, H, c.headdim, c.ngroups, c.d_state);
        gated_rmsnorm_forward(g.data(), gate_rstd.data(), y.data(), z.data(), P("gate_norm"), (int)BT, di,
                              c.ngroups, c.norm_eps);
        std::vector<double> out(BT * d);
        linear_forward(out.data(), g.data(), P("out_proj"), (int)BT, d, di);
        for (size_t i = 0; i < BT * d; i++) h[i] += out[i];
    }

    void backward(double* dh, const Tensors& p, Tensors& grads, int B, int T) override {
        const int d = c.d_model, di = c.d_inner(), H = c.nheads(), GN = c.ngroups * c.d_state;
        const int cd = c.conv_dim(), dip = c.d_in_proj();
        const size_t BT = (size_t)B * T;
        auto P = [&](const char* n) { return p.at(pre + n).data(); };
        auto G = [&](const char* n) { return grads.at(pre + n).data(); };
        std::vector<double> dg(BT * di), dy(BT * di), dzxbcdt(BT * dip), dz(BT * di), dx(BT * di), dB(BT * GN),
            dC(BT * GN), ddt(BT * H), dxbc(BT * cd), dxBC(BT * cd), dxn(BT * d);

        linear_backward(dg.data(), G("out_proj"), dh, g.data(), P("out_proj"), (int)BT, d, di);
        gated_rmsnorm_backward(dy.data(), dz.data(), G("gate_norm"), dg.data(), y.data(), z.data(), P("gate_norm"),
                               gate_rstd.data(), (int)BT, di, c.ngroups);
        ssd_backward(dx.data(), dB.data(), dC.data(), ddt.data(), G("dt_bias"), G("A_log"), G("D"), dy.data(),
                     x.data(), Bm.data(), Cm.data(), dt_raw.data(), P("dt_bias"), P("A_log"), P("D"),
                     B, T, H, c.headdim, c.ngroups, c.d_state);
        scatter_cols(dxbc.data(), dx.data(), BT, cd, 0, di);
        scatter_cols(dxbc.data(), dB.data(), BT, cd, di, GN);
        scatter_cols(dxbc.data(), dC.data(), BT, cd, di + GN, GN);
        conv1d_silu_backward(dxBC.data(), G("conv_weight"), G("conv_bias"), dxbc.data(), xBC.data(),
                             P("conv_weight"), P("conv_bias"), B, T, cd, c.d_conv);
        scatter_cols(dzxbcdt.data(), dz.data(), BT, dip, 0, di);
        scatter_cols(dzxbcdt.data(), dxBC.data(), BT, dip, di, cd);
        scatter_cols(dzxbcdt.data(), ddt.data(), BT, dip, di + cd, H);
        linear_backward(dxn.data(), G("in_proj"), dzxbcdt.data(), xn.data(), P("in_proj"), (int)BT, dip, d);
        rmsnorm_backward(dh, G("norm"), dxn.data(), h_in.data(), P("norm"), rstd.data(), (int)BT, d);
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
            if (kind == 'M' && c.ssm == "mamba2") layers.emplace_back(new Mamba2Layer(c, i));
            else THROW("ref::Model: layer kind '%c' (ssm '%s') not implemented", kind, c.ssm.c_str());
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
