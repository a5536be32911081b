// The model: configuration, parameter layout, activations, forward and backward.
//
// A model is a string of layer symbols (SPEC.md, Hybrids); each symbol is a pre-norm
// residual block h = h + Block(RMSNorm(h)). This file reads top to bottom:
//   1. ModelConfig: sizes, presets, JSON, validation
//   2. ParamLayout: every tensor's place in the one flat parameter buffer, and its init
//   3. Activations: what the forward keeps for the backward, sized in one place
//   4. Model: forward (to the loss) and backward (to every parameter gradient)
#pragma once
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "cuda_common.cuh"
#include "matmul.cuh"
#include "embedding.cuh"
#include "norm.cuh"
#include "conv1d.cuh"
#include "ssd.cuh"
#include "loss.cuh"
#include "mlp.cuh"
#include "scan.cuh"
#include "attention.cuh"
#include "optim.cuh"

// ----------------------------------------------------------------------------
// 1. Configuration

struct ModelConfig {
    std::string name = "custom";
    int vocab_size = 50277;   // real vocabulary; the matmuls use padded_vocab()
    int d_model = 768;
    int n_layer = 24;         // symbols of the pattern (each its own residual block)
    std::string pattern;      // 'M' Mamba, '*' attention, '+' MLP; from the ratios below when empty
    double attn_ratio = 0.0, mlp_ratio = 0.0;  // SPEC.md's allocation (Hybrids) when pattern is empty
    // 'M' layers: one kind per model
    std::string ssm = "mamba2";  // mamba2 | mamba1
    int d_state = 128;        // N
    int expand = 2;
    int d_conv = 4;
    int headdim = 64;         // Mamba-2: P
    int ngroups = 1;          // Mamba-2: groups of B/C, and of the gated norm
    int chunk_size = 256;     // Mamba-2: SSD chunk
    int dt_rank = 0;          // Mamba-1: 0 means ceil(d_model / 16)
    // '*' layers
    int n_heads = 0;          // 0 means d_model / attn_head_dim
    int n_kv_heads = 0;       // 0 means n_heads
    int attn_head_dim = 64;
    bool rope = false;
    float rope_theta = 10000.0f;
    // '+' layers
    std::string mlp = "swiglu";  // swiglu | gelu | relu2
    int d_ff = 0;             // hidden size; 0 means 4 * d_model
    bool tie_embeddings = false;
    float norm_eps = 1e-5f;

    int padded_vocab() const { return (vocab_size + 127) / 128 * 128; }
    int d_inner() const { return expand * d_model; }
    bool mamba1() const { return ssm == "mamba1"; }
    bool has(char kind) const { return pattern.find(kind) != std::string::npos; }
    // Mamba-2
    int nheads() const { return d_inner() / headdim; }
    int conv_dim() const { return mamba1() ? d_inner() : d_inner() + 2 * ngroups * d_state; }
    int d_in_proj() const { return mamba1() ? 2 * d_inner() : 2 * d_inner() + 2 * ngroups * d_state + nheads(); }
    // Mamba-1
    int dt_rank_() const { return dt_rank > 0 ? dt_rank : (d_model + 15) / 16; }
    int d_x_proj() const { return dt_rank_() + 2 * d_state; }
    // attention
    int q_heads() const { return n_heads > 0 ? n_heads : d_model / attn_head_dim; }
    int kv_heads() const { return n_kv_heads > 0 ? n_kv_heads : q_heads(); }
    int d_qkv() const { return (q_heads() + 2 * kv_heads()) * attn_head_dim; }
    // MLP
    int ff() const { return d_ff > 0 ? d_ff : 4 * d_model; }
    MlpAct mlp_act() const { return mlp_act_from_name(mlp); }
    int d_up() const { return mlp_up_width(mlp_act()) * ff(); }

    // fills the pattern and checks that every size divides; throws naming the value
    void finalize();
};

// Python's round(): half to even (the allocation below is specified with it)
inline long round_half_even(double x) {
    double r = std::floor(x), f = x - r;
    if (f > 0.5 || (f == 0.5 && std::fmod(r, 2.0) != 0.0)) r += 1.0;
    return (long)r;
}

// The layer allocation of NVIDIA's hybrid study (SPEC.md, Hybrids, Algorithm 1): attention
// layers spread evenly between Mamba sections, then MLP layers spread over the Mamba ones.
inline std::string allocate_pattern(int total, double attn_ratio, double mlp_ratio) {
    if (total <= 0) THROW("layer count must be positive, got %d", total);
    if (attn_ratio < 0 || mlp_ratio < 0 || attn_ratio + mlp_ratio > 1)
        THROW("attention ratio %g and MLP ratio %g must be >= 0 with a sum <= 1", attn_ratio, mlp_ratio);
    const long attn = round_half_even(total * attn_ratio);
    long mamba = total - attn;
    std::string types(total, 'M');
    double section = (double)mamba / (attn + 1), x = section;
    for (int l = 0; l < total; l++) {
        if (x < 0.5) { types[l] = '*'; x += section; }
        else x -= 1;
    }
    const long mlp = round_half_even(total * mlp_ratio);
    if (mlp > 0) {
        mamba -= mlp;
        double ratio = (double)mamba / mlp;
        x = ratio;
        for (int l = 0; l < total; l++) {
            if (types[l] != 'M') continue;
            if (x < 0.5) { types[l] = '+'; x += ratio; }
            else x -= 1;
        }
    }
    return types;
}

inline void ModelConfig::finalize() {
    if (pattern.empty()) pattern = allocate_pattern(n_layer, attn_ratio, mlp_ratio);
    if ((int)pattern.size() != n_layer)
        THROW("pattern '%s' has %d layers but n_layer is %d", pattern.c_str(), (int)pattern.size(), n_layer);
    for (char c : pattern)
        if (c != 'M' && c != '*' && c != '+')
            THROW("layer symbol '%c' in pattern '%s' is not one of M (Mamba), * (attention), + (MLP)", c, pattern.c_str());
    if (ssm != "mamba2" && ssm != "mamba1") THROW("ssm '%s' is not one of mamba2, mamba1", ssm.c_str());
    if (vocab_size <= 0 || d_model <= 0 || n_layer <= 0)
        THROW("model sizes must be positive (vocab %d, d_model %d, n_layer %d)", vocab_size, d_model, n_layer);
    if (has('M')) {
        if (d_state <= 0 || expand <= 0 || d_conv <= 0 || d_state > 256)
            THROW("Mamba sizes must be positive, d_state at most 256 (d_state %d, expand %d, d_conv %d)", d_state,
                  expand, d_conv);
        if (!mamba1()) {
            if (headdim <= 0 || ngroups <= 0 || chunk_size <= 0)
                THROW("Mamba-2 sizes must be positive (headdim %d, ngroups %d, chunk %d)", headdim, ngroups, chunk_size);
            if (d_inner() % headdim != 0)
                THROW("d_inner %d (expand %d x d_model %d) is not divisible by headdim %d", d_inner(), expand, d_model,
                      headdim);
            if (nheads() % ngroups != 0)
                THROW("nheads %d (d_inner %d / headdim %d) is not divisible by ngroups %d", nheads(), d_inner(), headdim,
                      ngroups);
            // what the SSD kernels are built for (ssd.cuh)
            if ((headdim != 32 && headdim != 64) || (d_state != 64 && d_state != 128) ||
                (chunk_size != 64 && chunk_size != 128 && chunk_size != 256))
                THROW("Mamba-2 needs headdim 32 or 64, d_state 64 or 128 and chunk 64, 128 or 256 (got %d, %d, %d)",
                      headdim, d_state, chunk_size);
        }
    }
    if (has('*')) {
        if (attn_head_dim != 64 && attn_head_dim != 128)
            THROW("attention head_dim %d is not supported (64 or 128)", attn_head_dim);
        if (q_heads() <= 0 || kv_heads() <= 0 || q_heads() % kv_heads() != 0)
            THROW("attention heads %d are not a multiple of kv heads %d", q_heads(), kv_heads());
    }
    if (has('+')) {
        mlp_act();  // validates the name
        if (ff() <= 0) THROW("MLP hidden size must be positive, got %d", ff());
    }
}

// Presets (SPEC.md section 2). The mamba_ssm sizes reproduce the released models
// (GPT-NeoX vocabulary, tied embeddings); NVIDIA's 8B models are untied with a 256K
// vocabulary. The *-tiny models train on the Brown corpus (GPT-2 vocabulary) in minutes.
inline const std::map<std::string, ModelConfig>& model_presets() {
    static const std::map<std::string, ModelConfig> presets = [] {
        std::map<std::string, ModelConfig> p;
        auto make = [&](const char* name, const char* ssm, int d, int layers, int vocab, bool tied) {
            ModelConfig c;
            c.name = name; c.ssm = ssm; c.d_model = d; c.n_layer = layers; c.vocab_size = vocab; c.tie_embeddings = tied;
            if (c.mamba1()) c.d_state = 16;
            return c;
        };
        auto add = [&](const ModelConfig& c) { p[c.name] = c; };
        add(make("mamba2-130m", "mamba2", 768, 24, 50277, true));
        add(make("mamba2-370m", "mamba2", 1024, 48, 50277, true));
        add(make("mamba2-780m", "mamba2", 1536, 48, 50277, true));
        add(make("mamba2-1.3b", "mamba2", 2048, 48, 50277, true));
        add(make("mamba2-2.7b", "mamba2", 2560, 64, 50277, true));
        add(make("mamba-130m", "mamba1", 768, 24, 50277, true));
        add(make("mamba-370m", "mamba1", 1024, 48, 50277, true));
        add(make("mamba-790m", "mamba1", 1536, 48, 50277, true));
        add(make("mamba-1.4b", "mamba1", 2048, 48, 50277, true));
        add(make("mamba-2.8b", "mamba1", 2560, 64, 50277, true));
        add(make("mamba-7b", "mamba1", 4096, 64, 50432, false));
        ModelConfig nv1 = make("nvidia-mamba-8b", "mamba1", 4096, 56, 256000, false);
        nv1.d_state = 128;
        add(nv1);
        ModelConfig nv2 = make("nvidia-mamba2-8b", "mamba2", 4096, 56, 256000, false);
        nv2.ngroups = 8;
        add(nv2);
        // 24 Mamba-2, 4 attention (32 heads, 8 KV groups, 128 channels), 28 GELU MLP (4x)
        ModelConfig hy = nv2;
        hy.name = "nvidia-hybrid-8b"; hy.attn_ratio = 0.08; hy.mlp_ratio = 0.5;
        hy.n_heads = 32; hy.n_kv_heads = 8; hy.attn_head_dim = 128; hy.mlp = "gelu";
        add(hy);
        // 32 Transformer layers (attention + SwiGLU MLP with 2/3 of 4d hidden, rounded to 64), RoPE
        ModelConfig tf = make("nvidia-transformer-8b", "mamba2", 4096, 64, 256000, false);
        for (int i = 0; i < 32; i++) tf.pattern += "*+";
        tf.n_heads = 32; tf.attn_head_dim = 128; tf.rope = true; tf.d_ff = 10944;
        add(tf);
        // single-GPU models for the default corpus
        ModelConfig tiny = make("mamba2-tiny", "mamba2", 384, 6, 50257, false);
        tiny.d_state = 64;
        add(tiny);
        add(make("mamba-tiny", "mamba1", 384, 6, 50257, false));
        ModelConfig htiny = tiny;  // 24 layers: 2 attention, 12 GELU MLP, 10 Mamba-2 (about 25M block parameters)
        htiny.name = "hybrid-tiny"; htiny.n_layer = 24; htiny.attn_ratio = 0.08; htiny.mlp_ratio = 0.5;
        htiny.n_kv_heads = 2; htiny.mlp = "gelu";
        add(htiny);
        ModelConfig ttiny = tiny;  // 10 Transformer layers with SwiGLU (2/3 of 4d) and RoPE (about 24M)
        ttiny.name = "transformer-tiny"; ttiny.n_layer = 20; ttiny.pattern.clear();
        for (int i = 0; i < 10; i++) ttiny.pattern += "*+";
        ttiny.rope = true; ttiny.d_ff = 1024;
        add(ttiny);
        ModelConfig h13 = make("hybrid-1.3b", "mamba2", 2048, 48, 50277, true);  // the NVIDIA mix at 1.3B
        h13.attn_ratio = 0.08; h13.mlp_ratio = 0.5; h13.n_heads = 16; h13.n_kv_heads = 4; h13.attn_head_dim = 128;
        h13.mlp = "gelu";
        add(h13);
        return p;
    }();
    return presets;
}

inline ModelConfig model_preset(const std::string& name) {
    auto& p = model_presets();
    auto it = p.find(name);
    if (it == p.end()) {
        std::string names;
        for (auto& kv : p) names += (names.empty() ? "" : ", ") + kv.first;
        THROW("unknown model '%s' (presets: %s)", name.c_str(), names.c_str());
    }
    ModelConfig c = it->second;
    c.finalize();
    return c;
}

// JSON config (keys as in HACKING.md) from a parsed object; `origin` names it in errors.
// Unknown keys are an error so typos do not pass silently.
inline ModelConfig model_config_from_json(const nlohmann::json& j, const std::string& origin) {
    ModelConfig c;
    c.name = origin;
    for (auto& [key, v] : j.items()) {
        try {
            if (key == "vocab_size") c.vocab_size = v.get<int>();
            else if (key == "d_model") c.d_model = v.get<int>();
            else if (key == "n_layer") c.n_layer = v.get<int>();
            else if (key == "pattern") c.pattern = v.get<std::string>();
            else if (key == "attn_ratio") c.attn_ratio = v.get<double>();
            else if (key == "mlp_ratio") c.mlp_ratio = v.get<double>();
            else if (key == "ssm") c.ssm = v.get<std::string>();
            else if (key == "d_state") c.d_state = v.get<int>();
            else if (key == "headdim") c.headdim = v.get<int>();
            else if (key == "ngroups") c.ngroups = v.get<int>();
            else if (key == "expand") c.expand = v.get<int>();
            else if (key == "d_conv") c.d_conv = v.get<int>();
            else if (key == "chunk_size") c.chunk_size = v.get<int>();
            else if (key == "dt_rank") c.dt_rank = v.get<int>();
            else if (key == "n_heads") c.n_heads = v.get<int>();
            else if (key == "n_kv_heads") c.n_kv_heads = v.get<int>();
            else if (key == "attn_head_dim") c.attn_head_dim = v.get<int>();
            else if (key == "rope") c.rope = v.get<bool>();
            else if (key == "rope_theta") c.rope_theta = v.get<float>();
            else if (key == "mlp") c.mlp = v.get<std::string>();
            else if (key == "d_ff") c.d_ff = v.get<int>();
            else if (key == "tie_embeddings") c.tie_embeddings = v.get<bool>();
            else if (key == "norm_eps") c.norm_eps = v.get<float>();
            else if (key == "name") c.name = v.get<std::string>();
            else THROW("model config '%s': unknown key '%s'", origin.c_str(), key.c_str());
        } catch (const nlohmann::json::exception& e) {
            THROW("model config '%s': bad value for '%s': %s", origin.c_str(), key.c_str(), e.what());
        }
    }
    if (j.contains("pattern") && !j.contains("n_layer")) c.n_layer = (int)c.pattern.size();
    c.finalize();
    return c;
}

inline ModelConfig model_config_from_json(const std::string& path) {
    std::ifstream f(path);
    if (!f) THROW("cannot open model config '%s'", path.c_str());
    nlohmann::json j;
    try { j = nlohmann::json::parse(f); } catch (const std::exception& e) {
        THROW("model config '%s' is not valid JSON: %s", path.c_str(), e.what());
    }
    return model_config_from_json(j, path);
}

inline nlohmann::json model_config_to_json(const ModelConfig& c) {
    return {{"name", c.name}, {"vocab_size", c.vocab_size}, {"d_model", c.d_model}, {"n_layer", c.n_layer},
            {"pattern", c.pattern}, {"ssm", c.ssm}, {"d_state", c.d_state}, {"expand", c.expand},
            {"d_conv", c.d_conv}, {"headdim", c.headdim}, {"ngroups", c.ngroups}, {"chunk_size", c.chunk_size},
            {"dt_rank", c.dt_rank_()}, {"n_heads", c.q_heads()}, {"n_kv_heads", c.kv_heads()},
            {"attn_head_dim", c.attn_head_dim}, {"rope", c.rope}, {"rope_theta", c.rope_theta}, {"mlp", c.mlp},
            {"d_ff", c.ff()}, {"tie_embeddings", c.tie_embeddings}, {"norm_eps", c.norm_eps}};
}

// ----------------------------------------------------------------------------
// 2. Parameter layout: one flat buffer, every tensor at a fixed offset

enum class Init { Normal002, LinearUniform, ConvUniform, OutProjUniform, Ones, ALogUniform, ALogS4D, DtBias };

struct TensorInfo {
    std::string name;
    size_t offset = 0, count = 0;
    std::vector<int> shape;
    bool decay;        // AdamW weight decay: matrices, embeddings and conv weights only
    bool block_matrix; // a 2-D matrix of a block (Muon's group; dt_proj and conv weights excepted)
    Init init;
    std::string kind;  // which part of the model it belongs to, for the dry-run breakdown
};

// Offsets of one layer's tensors. Every block is norm -> in_proj -> mixer -> out_proj; the
// mixer's own parameters depend on the kind (HACKING.md lists each kind's tensors in order):
//   Mamba-2 'M': conv_w, conv_b, dt_bias, A_log, D, gate_norm
//   Mamba-1 'M': conv_w, conv_b, x_proj, dt_proj, dt_bias, A_log, D
//   attention '*': in_proj = qkv_proj, out_proj = o_proj;  MLP '+': in_proj = up_proj, out_proj = down_proj
struct LayerOffsets {
    char kind;
    size_t norm, in_proj, out_proj;
    size_t conv_w = 0, conv_b = 0, x_proj = 0, dt_proj = 0, dt_bias = 0, A_log = 0, D = 0, gate_norm = 0;
};

struct ParamLayout {
    std::vector<TensorInfo> tensors;
    std::vector<LayerOffsets> layers;
    size_t embedding = 0, final_norm = 0, lm_head = 0;
    size_t total = 0;

    size_t add(const std::string& name, std::vector<int> shape, bool decay, Init init, const std::string& kind,
               bool block_matrix = false) {
        TensorInfo t;
        t.name = name; t.shape = shape; t.decay = decay; t.block_matrix = block_matrix; t.init = init; t.kind = kind;
        t.offset = total;
        t.count = 1;
        for (int s : shape) t.count *= (size_t)s;
        total += t.count;
        tensors.push_back(t);
        return t.offset;
    }
    // a block's 2-D matrix: decayed, in Muon's group
    size_t matrix(const std::string& name, int rows, int cols, Init init, const std::string& kind) {
        return add(name, {rows, cols}, true, init, kind, true);
    }

    explicit ParamLayout(const ModelConfig& c) {
        const int d = c.d_model, Vp = c.padded_vocab(), di = c.d_inner();
        embedding = add("embedding", {Vp, d}, true, Init::Normal002, "embedding");
        for (int l = 0; l < c.n_layer; l++) {
            std::string p = "layers." + std::to_string(l) + ".";
            LayerOffsets o;
            o.kind = c.pattern[l];
            o.norm = add(p + "norm", {d}, false, Init::Ones, "norms");
            if (o.kind == 'M') {
                const std::string k = c.ssm;
                o.in_proj = matrix(p + "in_proj", c.d_in_proj(), d, Init::LinearUniform, k);
                o.conv_w = add(p + "conv_weight", {c.conv_dim(), c.d_conv}, true, Init::ConvUniform, k);
                o.conv_b = add(p + "conv_bias", {c.conv_dim()}, false, Init::ConvUniform, k);
                if (c.mamba1()) {
                    o.x_proj = matrix(p + "x_proj", c.d_x_proj(), di, Init::LinearUniform, k);
                    o.dt_proj = add(p + "dt_proj", {di, c.dt_rank_()}, true, Init::LinearUniform, k);
                    o.dt_bias = add(p + "dt_bias", {di}, false, Init::DtBias, k);
                    o.A_log = add(p + "A_log", {di, c.d_state}, false, Init::ALogS4D, k);
                    o.D = add(p + "D", {di}, false, Init::Ones, k);
                } else {
                    o.dt_bias = add(p + "dt_bias", {c.nheads()}, false, Init::DtBias, k);
                    o.A_log = add(p + "A_log", {c.nheads()}, false, Init::ALogUniform, k);
                    o.D = add(p + "D", {c.nheads()}, false, Init::Ones, k);
                    o.gate_norm = add(p + "gate_norm", {di}, false, Init::Ones, "norms");
                }
                o.out_proj = matrix(p + "out_proj", d, di, Init::OutProjUniform, k);
            } else if (o.kind == '*') {
                o.in_proj = matrix(p + "qkv_proj", c.d_qkv(), d, Init::LinearUniform, "attention");
                o.out_proj = matrix(p + "o_proj", d, c.q_heads() * c.attn_head_dim, Init::OutProjUniform, "attention");
            } else {
                o.in_proj = matrix(p + "up_proj", c.d_up(), d, Init::LinearUniform, "mlp");
                o.out_proj = matrix(p + "down_proj", d, c.ff(), Init::OutProjUniform, "mlp");
            }
            layers.push_back(o);
        }
        final_norm = add("final_norm", {d}, false, Init::Ones, "norms");
        lm_head = c.tie_embeddings ? embedding : add("lm_head", {Vp, d}, true, Init::LinearUniform, "lm_head");
    }

    const TensorInfo& find(const std::string& name) const {
        for (auto& t : tensors) if (t.name == name) return t;
        THROW("no parameter named '%s'", name.c_str());
    }
};

// The tensors AdamW updates: all of them, or with Muon all but the blocks' 2-D matrices
inline std::vector<ParamTensor> adamw_tensors(const ParamLayout& L, bool with_muon) {
    std::vector<ParamTensor> v;
    for (auto& t : L.tensors)
        if (!(with_muon && t.block_matrix)) v.push_back({t.offset, t.count, t.decay});
    return v;
}

// optimizer state of the whole buffer: AdamW's m and v over its tensors, Muon's momentum
// over the rest (the tensors tile the buffer)
inline size_t optimizer_state_bytes(const ParamLayout& L, bool with_muon) {
    size_t adamw = 0;
    for (const ParamTensor& t : adamw_tensors(L, with_muon)) adamw += t.count;
    return (2 * adamw + (L.total - adamw)) * sizeof(float);
}

// mamba_ssm's initialisation: embedding N(0, 0.02); Linear kaiming-uniform (bound
// 1/sqrt(fan_in); for Mamba-1's dt_proj that is its dt_rank^-0.5), each block's output
// matrix further divided by sqrt(n_layer); conv1d bound 1/sqrt(K); Mamba-2 A = -U[1, 16]
// per head, Mamba-1 A[:, n] = -(n + 1) (S4D-real), A_log = log(-A); dt log-uniform in
// [1e-3, 1e-1] (floor 1e-4) stored as dt_bias = softplus^-1(dt); norms and D ones.
// Padded vocab rows stay zero.
inline void init_parameters(float* master, const ParamLayout& layout, const ModelConfig& c, uint64_t seed) {
    SplitMix64 rng(seed);
    for (const TensorInfo& t : layout.tensors) {
        float* p = master + t.offset;
        int fan_in = t.shape.size() == 2 ? t.shape[1] : 1;
        for (size_t i = 0; i < t.count; i++) {
            double u = 2.0 * rng.uniform() - 1.0;  // U(-1, 1)
            switch (t.init) {
                case Init::Normal002: p[i] = (float)(0.02 * rng.normal()); break;
                case Init::LinearUniform: p[i] = (float)(u / std::sqrt((double)fan_in)); break;
                case Init::OutProjUniform: p[i] = (float)(u / std::sqrt((double)fan_in) / std::sqrt((double)c.n_layer)); break;
                case Init::ConvUniform: p[i] = (float)(u / std::sqrt((double)c.d_conv)); break;
                case Init::Ones: p[i] = 1.0f; break;
                case Init::ALogUniform: p[i] = (float)std::log(1.0 + 15.0 * rng.uniform()); break;
                case Init::ALogS4D: p[i] = (float)std::log(1.0 + (double)(i % t.shape[1])); break;
                case Init::DtBias: {
                    double dt = std::exp(std::log(1e-3) + rng.uniform() * (std::log(1e-1) - std::log(1e-3)));
                    dt = std::max(dt, 1e-4);
                    p[i] = (float)(dt + std::log(-std::expm1(-dt)));  // softplus^-1
                    break;
                }
            }
        }
        if (t.name == "embedding" || t.name == "lm_head")  // padded rows never take part
            std::fill(p + (size_t)c.vocab_size * c.d_model, p + t.count, 0.0f);
    }
}

// ----------------------------------------------------------------------------
// 3. Activations: sized once for (B, T). The forward keeps per layer the residual stream
// (fp32), its norm's rstd and what the layer's backward cannot cheaply redo:
//   every kind: the in_proj output (Mamba-2 [z | xBC | dt], Mamba-1 [x | z], attention
//               [q | k | v] after RoPE, MLP the pre-activation)
//   Mamba:      the scan output y (out_proj's input) and the scan's chunk states;
//               Mamba-2 the gated norm's rstd; Mamba-1 the x_proj output [dt | B | C]
//   attention:  its output (o_proj's input) and the logsumexp of each row
// Cheap results (the norm output, the conv output, the gated norm output, Mamba-1's dt,
// the MLP activation) are recomputed in the backward into buffers shared by all layers.

// rows of logits that exist at once (the LM head and the loss run chunk by chunk)
constexpr int LOGIT_CHUNK = 2048;

inline SSDShape ssd_shape(const ModelConfig& c, int B, int T) {
    return SSDShape{B, T, c.nheads(), c.headdim, c.ngroups, c.d_state, c.chunk_size};
}
inline ScanShape scan_shape(const ModelConfig& c, int B, int T) { return ScanShape{B, T, c.d_inner(), c.d_state}; }
inline AttnShape attn_shape(const ModelConfig& c, int B, int T) {
    return AttnShape{B, T, c.q_heads(), c.kv_heads(), c.attn_head_dim};
}

// elements per layer kind (saved: bytes)
struct LayerActSizes { size_t in_out = 0, x_proj_out = 0, y = 0, stats = 0, saved = 0; };

inline LayerActSizes layer_act_sizes(const ModelConfig& c, char kind, int B, int T) {
    const size_t BT = (size_t)B * T;
    LayerActSizes s;
    if (kind == 'M' && c.mamba1()) {
        s.in_out = BT * c.d_in_proj();
        s.x_proj_out = BT * c.d_x_proj();
        s.y = BT * c.d_inner();
        s.saved = scan_saved_bytes(scan_shape(c, B, T));
    } else if (kind == 'M') {
        s.in_out = BT * c.d_in_proj();
        s.y = BT * c.d_inner();
        s.stats = BT * c.ngroups;
        s.saved = ssd_saved_bytes(ssd_shape(c, B, T));
    } else if (kind == '*') {
        s.in_out = BT * c.d_qkv();
        s.y = BT * c.q_heads() * c.attn_head_dim;
        s.stats = BT * c.q_heads();
    } else {
        s.in_out = BT * c.d_up();
    }
    return s;
}

// the largest of each buffer over the kinds in the pattern
inline LayerActSizes max_layer_act_sizes(const ModelConfig& c, int B, int T) {
    LayerActSizes m;
    for (char k : std::string("M*+")) {
        if (!c.has(k)) continue;
        LayerActSizes l = layer_act_sizes(c, k, B, T);
        m.in_out = std::max(m.in_out, l.in_out);
        m.x_proj_out = std::max(m.x_proj_out, l.x_proj_out);
        m.y = std::max(m.y, l.y);
        m.stats = std::max(m.stats, l.stats);
        m.saved = std::max(m.saved, l.saved);
    }
    return m;
}

struct ActivationSizes {
    size_t resid, rstd;                                   // per layer boundary / per norm
    size_t xn, xbc, g, dt, logits, losses, mixer_scratch;  // shared, forward
    size_t dresid, din, dxbc, dy, dg, dxproj, norm_scratch;  // shared, backward
    size_t total_bytes;
};

// With recompute, one set of per-layer buffers (the largest kind's) serves every layer:
// the backward reruns each layer's forward before its backward.
inline ActivationSizes activation_sizes(const ModelConfig& c, int B, int T, bool recompute = false) {
    ActivationSizes s{};
    const size_t BT = (size_t)B * T, d = c.d_model, L = c.n_layer;
    const bool M = c.has('M'), M1 = M && c.mamba1(), M2 = M && !c.mamba1(), A = c.has('*'), P = c.has('+');
    s.resid = BT * d;
    s.rstd = BT;
    s.xn = BT * d;
    s.xbc = M ? BT * c.conv_dim() : 0;
    s.g = std::max(M2 ? BT * c.d_inner() : 0, P ? BT * c.ff() : 0);
    s.dt = M1 ? BT * c.d_inner() : 0;
    s.logits = std::min(BT, (size_t)LOGIT_CHUNK) * c.padded_vocab();
    s.losses = BT;
    s.mixer_scratch = std::max({M2 ? ssd_scratch_bytes(ssd_shape(c, B, T)) : 0,
                                M1 ? scan_scratch_bytes(scan_shape(c, B, T)) : 0,
                                A ? attention_scratch_bytes(attn_shape(c, B, T)) : 0});
    s.dresid = BT * d;
    size_t kept = 0;
    LayerActSizes mx = max_layer_act_sizes(c, B, T);
    for (char k : c.pattern) {
        LayerActSizes l = recompute ? mx : layer_act_sizes(c, k, B, T);
        kept += (l.in_out + l.x_proj_out + l.y) * 2 + l.stats * 4 + l.saved;
        if (recompute) break;
    }
    s.din = mx.in_out;
    s.dy = mx.y;
    s.dxproj = mx.x_proj_out;
    s.dxbc = s.xbc;
    s.dg = std::max(s.g, s.dt);  // Mamba-1 keeps dt's gradient here
    s.norm_scratch = rmsnorm_backward_scratch_floats((int)BT, (int)d);
    if (M2) s.norm_scratch = std::max(s.norm_scratch, gated_rmsnorm_backward_scratch_floats((int)BT, c.d_inner()));
    if (M) s.norm_scratch = std::max(s.norm_scratch, conv1d_backward_scratch_floats(B, T, c.conv_dim(), c.d_conv));
    s.total_bytes = (L + 1) * s.resid * 4 + (recompute ? 2 : L + 1) * s.rstd * 4 + kept +
                    (s.xn + s.xbc + s.g + s.dt + s.logits) * 2 + s.losses * 4 + s.mixer_scratch +
                    s.dresid * 4 + (s.dresid + s.xn + s.din + s.dxbc + s.dy + s.dg + s.dxproj) * 2 +
                    s.norm_scratch * 4 + BT * (3 * sizeof(int) + sizeof(float)) +  // inputs, targets, ranks, weights
                    sizeof(double);                                                 // the loss total
    return s;
}

// Model FLOPs of one token's forward + backward (ANCHORS.md): 6 per matmul parameter (the
// embedding lookup excluded), plus the chunked SSD's matmuls and causal attention's
// (forward: QK^T and PV over T/2 keys on average; backward twice the forward), for
// sequences of length T.
inline double flops_per_token(const ModelConfig& c, int T) {
    const double d = c.d_model, di = c.d_inner();
    double matmul_params = (double)c.padded_vocab() * d;  // lm head
    double fwd_extra = 0;
    for (char k : c.pattern) {
        if (k == 'M' && c.mamba1()) {
            matmul_params += (double)c.d_in_proj() * d + (double)c.d_x_proj() * di + di * c.dt_rank_() + d * di;
        } else if (k == 'M') {
            const double Q = c.chunk_size, N = c.d_state, P = c.headdim, H = c.nheads(), G = c.ngroups;
            matmul_params += (double)c.d_in_proj() * d + d * di;
            fwd_extra += 2 * Q * N * G + 2 * Q * P * H + 4 * N * P * H;  // CB^T, scores x, states, state output
        } else if (k == '*') {
            matmul_params += (double)c.d_qkv() * d + d * c.q_heads() * c.attn_head_dim;
            fwd_extra += 2.0 * T * c.q_heads() * c.attn_head_dim;  // 4 T Hq Dh / 2 (causal)
        } else {
            matmul_params += (double)c.d_up() * d + d * c.ff();
        }
    }
    return 6.0 * matmul_params + 3.0 * fwd_extra;
}

// ----------------------------------------------------------------------------
// Optional per-phase timing (train_mamba --bench --profile): an event at each named mark;
// the time up to the next mark is charged to the mark's name.
struct PhaseTimer {
    std::vector<std::pair<std::string, cudaEvent_t>> marks;
    std::map<std::string, double> ms;
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
    }
};

// ----------------------------------------------------------------------------
// 4. The model on the GPU

// what one layer keeps from its forward for its backward (null where its kind keeps nothing)
struct LayerActs {
    float* rstd = nullptr;       // its norm
    bf16* in_out = nullptr;      // in_proj output
    bf16* x_proj_out = nullptr;  // Mamba-1: [dt | B | C]
    bf16* y = nullptr;           // Mamba: scan output; attention: attention output
    float* stats = nullptr;      // Mamba-2: gated norm rstd (BT, G); attention: logsumexp (B, Hq, T)
    void* saved = nullptr;       // Mamba: the scan's chunk states
};

struct Model {
    ModelConfig cfg;
    ParamLayout layout;
    float* master = nullptr;  // fp32 master weights
    bf16* params = nullptr;   // bf16 compute copy, same offsets
    float* grads = nullptr;   // fp32 gradients, same offsets

    // activations for the (B, T) given to allocate()
    int B = 0, T = 0;
    bool recompute = false;  // set before allocate(): keep only the residual stream per layer
    ActivationSizes sz{};
    std::vector<float*> resid;  // n_layer + 1 boundaries of the residual stream
    std::vector<LayerActs> acts;
    float* final_rstd = nullptr;
    bf16 *xn = nullptr, *xbc = nullptr, *g = nullptr, *dt = nullptr, *logits = nullptr;
    bf16 *dresid_bf16 = nullptr, *dxn = nullptr, *din = nullptr, *dxbc = nullptr, *dy = nullptr, *dg = nullptr,
         *dxproj = nullptr;
    float *dresid = nullptr, *losses = nullptr, *norm_scratch = nullptr;
    double* loss_total = nullptr;  // the per-token losses summed over forwards, read by loss_sum()
    void* mixer_scratch = nullptr;
    int *d_inputs = nullptr, *d_targets = nullptr, *d_rank = nullptr;
    float* d_weights = nullptr;
    EmbeddingBuckets buckets;
    std::vector<void*> owned;   // every activation allocation, freed together
    PhaseTimer* timer = nullptr;  // set to time each phase
    void phase(const char* name, cudaStream_t s) { if (timer) timer->mark(name, s); }
    // Called by backward() as the gradients become final from the end of the buffer down:
    // grads[lo, total) are done (queued on the stream); `last` at the end. Multi-GPU runs
    // start reducing them while the backward goes on.
    std::function<void(size_t lo, bool last, cudaStream_t s)> grads_done;

    explicit Model(const ModelConfig& c) : cfg(c), layout(c) {
        master = cuda_malloc_n<float>(layout.total, "fp32 master weights");
        params = cuda_malloc_n<bf16>(layout.total, "bf16 weights");
        grads = cuda_malloc_n<float>(layout.total, "fp32 gradients");
        cudaCheck(cudaMemset(grads, 0, layout.total * sizeof(float)));
    }
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    ~Model() {
        for (void* p : {(void*)master, (void*)params, (void*)grads}) cudaFree(p);
        free_activations();
    }

    // upload fp32 master weights from the host and refresh the bf16 copy
    void set_master(const std::vector<float>& host) {
        if (host.size() != layout.total) THROW("parameter count %zu != model's %zu", host.size(), layout.total);
        cudaCheck(cudaMemcpy(master, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
        std::vector<bf16> h16(host.size());
        for (size_t i = 0; i < host.size(); i++) h16[i] = __float2bfloat16(host[i]);
        cudaCheck(cudaMemcpy(params, h16.data(), h16.size() * sizeof(bf16), cudaMemcpyHostToDevice));
    }

    std::vector<float> get_master() const {
        std::vector<float> host(layout.total);
        cudaCheck(cudaMemcpy(host.data(), master, host.size() * sizeof(float), cudaMemcpyDeviceToHost));
        return host;
    }

    void init(uint64_t seed) {
        std::vector<float> host(layout.total);
        init_parameters(host.data(), layout, cfg, seed);
        set_master(host);
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
        sz = activation_sizes(cfg, B, T, recompute);
        for (int l = 0; l <= cfg.n_layer; l++) resid.push_back(alloc<float>(sz.resid, "residual stream"));
        for (int l = 0; l < cfg.n_layer; l++) {
            if (recompute && l > 0) { acts.push_back(acts[0]); continue; }  // one set, shared
            LayerActSizes ls = recompute ? max_layer_act_sizes(cfg, B, T) : layer_act_sizes(cfg, cfg.pattern[l], B, T);
            LayerActs a;
            a.rstd = alloc<float>(sz.rstd, "norm rstd");
            a.in_out = alloc<bf16>(ls.in_out, "in_proj output");
            a.x_proj_out = alloc<bf16>(ls.x_proj_out, "x_proj output");
            a.y = alloc<bf16>(ls.y, "mixer output");
            a.stats = alloc<float>(ls.stats, "row statistics");
            a.saved = alloc<char>(ls.saved, "scan chunk states");
            acts.push_back(a);
        }
        final_rstd = alloc<float>(sz.rstd, "final norm rstd");
        xn = alloc<bf16>(sz.xn, "norm output");
        xbc = alloc<bf16>(sz.xbc, "conv output");
        g = alloc<bf16>(sz.g, "out_proj input (recomputed)");
        dt = alloc<bf16>(sz.dt, "dt_proj output");
        logits = alloc<bf16>(sz.logits, "logits");
        losses = alloc<float>(sz.losses, "per-token losses");
        mixer_scratch = alloc<char>(sz.mixer_scratch, "scan/attention scratch");
        dresid = alloc<float>(sz.dresid, "residual gradient");
        dresid_bf16 = alloc<bf16>(sz.dresid, "residual gradient (bf16)");
        dxn = alloc<bf16>(sz.xn, "norm output gradient");
        din = alloc<bf16>(sz.din, "in_proj output gradient");
        dxbc = alloc<bf16>(sz.dxbc, "conv output gradient");
        dy = alloc<bf16>(sz.dy, "mixer output gradient");
        dg = alloc<bf16>(sz.dg, "out_proj input gradient");
        dxproj = alloc<bf16>(sz.dxproj, "x_proj output gradient");
        norm_scratch = alloc<float>(sz.norm_scratch, "norm scratch");
        d_inputs = alloc<int>((size_t)B * T, "inputs");
        d_targets = alloc<int>((size_t)B * T, "targets");
        d_rank = alloc<int>((size_t)B * T, "target ranks");
        d_weights = alloc<float>((size_t)B * T, "loss weights");
        loss_total = alloc<double>(1, "loss total");
        cudaCheck(cudaMemset(loss_total, 0, sizeof(double)));
    }

    void free_activations() {
        for (void* p : owned) cudaFree(p);
        owned.clear();
        resid.clear();
        acts.clear();
    }

    const bf16* w(size_t offset) const { return params + offset; }

    // ---- Mamba-2 layer
    // the SSD reads x, B, C from the conv output and dt from the in_proj output, in place
    struct SSDViews { const bf16 *x, *Bm, *Cm, *dt; };
    SSDViews ssd_views(int l) const {
        const int di = cfg.d_inner(), gn = cfg.ngroups * cfg.d_state;
        return {xbc, xbc + di, xbc + di + gn, acts[l].in_out + 2 * di + 2 * gn};
    }

    // what both passes run (the backward recomputes these)
    void mamba2_conv(int l, cudaStream_t s) {
        const LayerOffsets& o = layout.layers[l];
        conv1d_silu_forward(xbc, acts[l].in_out + cfg.d_inner(), cfg.d_in_proj(), w(o.conv_w), w(o.conv_b), B, T,
                            cfg.conv_dim(), cfg.d_conv, s);
    }
    void mamba2_gate(int l, cudaStream_t s) {
        const LayerOffsets& o = layout.layers[l];
        gated_rmsnorm_forward(g, acts[l].stats, acts[l].y, acts[l].in_out, cfg.d_in_proj(), w(o.gate_norm), B * T,
                              cfg.d_inner(), cfg.ngroups, cfg.norm_eps, s);
    }

    // xn -> the input of out_proj (returned)
    const bf16* mamba2_forward(int l, cudaStream_t s) {
        const LayerOffsets& o = layout.layers[l];
        phase("in_proj", s);
        matmul_forward(acts[l].in_out, xn, w(o.in_proj), B * T, cfg.d_in_proj(), cfg.d_model, s);
        phase("conv1d", s);
        mamba2_conv(l, s);
        SSDViews v = ssd_views(l);
        phase("ssd", s);
        ssd_forward(acts[l].y, acts[l].saved, mixer_scratch, v.x, cfg.conv_dim(), v.Bm, v.Cm, cfg.conv_dim(), v.dt,
                    cfg.d_in_proj(), w(o.dt_bias), w(o.A_log), w(o.D), ssd_shape(cfg, B, T), s);
        phase("gated_norm", s);
        mamba2_gate(l, s);
        return g;
    }

    // gradient of out_proj's input (in dg) -> gradient of in_proj's output (in din)
    void mamba2_backward(int l, cudaStream_t s) {
        const LayerOffsets& o = layout.layers[l];
        const int di = cfg.d_inner(), dip = cfg.d_in_proj(), gn = cfg.ngroups * cfg.d_state, cd = cfg.conv_dim();
        phase("gated_norm bwd", s);
        gated_rmsnorm_backward(dy, din, dip, grads + o.gate_norm, norm_scratch, dg, acts[l].y, acts[l].in_out, dip,
                               w(o.gate_norm), acts[l].stats, B * T, di, cfg.ngroups, s);
        SSDViews v = ssd_views(l);
        phase("ssd bwd", s);
        ssd_backward(dxbc, cd, dxbc + di, dxbc + di + gn, cd, din + 2 * di + 2 * gn, dip, grads + o.dt_bias,
                     grads + o.A_log, grads + o.D, mixer_scratch, dy, v.x, cd, v.Bm, v.Cm, cd, v.dt, dip, w(o.dt_bias),
                     w(o.A_log), w(o.D), acts[l].saved, ssd_shape(cfg, B, T), s);
        phase("conv1d bwd", s);
        conv1d_silu_backward(din + di, dip, grads + o.conv_w, grads + o.conv_b, norm_scratch, dxbc,
                             acts[l].in_out + di, dip, w(o.conv_w), w(o.conv_b), B, T, cd, cfg.d_conv, s);
    }

    // ---- Mamba-1 layer: in_proj -> [x | z]; u = silu(conv(x)); x_proj(u) -> [dt | B | C];
    // dt_proj(dt) -> delta (before bias and softplus, applied in the scan); y = scan(...) * silu(z)
    void mamba1_conv(int l, cudaStream_t s) {
        const LayerOffsets& o = layout.layers[l];
        conv1d_silu_forward(xbc, acts[l].in_out, cfg.d_in_proj(), w(o.conv_w), w(o.conv_b), B, T, cfg.d_inner(),
                            cfg.d_conv, s);
    }
    void mamba1_dt(int l, cudaStream_t s) {
        const LayerOffsets& o = layout.layers[l];
        matmul_forward(dt, acts[l].x_proj_out, w(o.dt_proj), B * T, cfg.d_inner(), cfg.dt_rank_(),
                       MatmulStrides{cfg.d_x_proj(), cfg.d_inner()}, s);
    }

    const bf16* mamba1_forward(int l, cudaStream_t s) {
        const LayerOffsets& o = layout.layers[l];
        const int di = cfg.d_inner(), R = cfg.dt_rank_(), N = cfg.d_state, xp = cfg.d_x_proj();
        const LayerActs& a = acts[l];
        phase("in_proj", s);
        matmul_forward(a.in_out, xn, w(o.in_proj), B * T, cfg.d_in_proj(), cfg.d_model, s);
        phase("conv1d", s);
        mamba1_conv(l, s);
        phase("x_proj", s);
        matmul_forward(a.x_proj_out, xbc, w(o.x_proj), B * T, xp, di, s);
        mamba1_dt(l, s);
        phase("scan", s);
        selective_scan_forward(a.y, a.saved, xbc, di, dt, di, a.in_out + di, 2 * di, a.x_proj_out + R,
                               a.x_proj_out + R + N, xp, w(o.dt_bias), w(o.A_log), w(o.D), scan_shape(cfg, B, T), s);
        return a.y;
    }

    void mamba1_backward(int l, cudaStream_t s) {
        const LayerOffsets& o = layout.layers[l];
        const int di = cfg.d_inner(), R = cfg.dt_rank_(), N = cfg.d_state, xp = cfg.d_x_proj();
        const LayerActs& a = acts[l];
        bf16* ddt = dg;  // dg holds dy's gradient only for Mamba-2 and MLP layers
        phase("scan bwd", s);
        selective_scan_backward(dxbc, di, ddt, di, din + di, 2 * di, dxproj + R, dxproj + R + N, xp, grads + o.A_log,
                                grads + o.D, grads + o.dt_bias, mixer_scratch, dy, xbc, di, dt, di, a.in_out + di,
                                2 * di, a.x_proj_out + R, a.x_proj_out + R + N, xp, w(o.dt_bias), w(o.A_log), w(o.D),
                                a.saved, scan_shape(cfg, B, T), s);
        phase("x_proj bwd", s);
        matmul_backward(dxproj, grads + o.dt_proj, ddt, a.x_proj_out, w(o.dt_proj), B * T, di, R, MatmulStrides{xp, di},
                        s);
        matmul_backward(dxbc, grads + o.x_proj, dxproj, xbc, w(o.x_proj), B * T, xp, di, MatmulStrides{di, xp, true}, s);
        phase("conv1d bwd", s);
        conv1d_silu_backward(din, 2 * di, grads + o.conv_w, grads + o.conv_b, norm_scratch, dxbc, a.in_out, 2 * di,
                             w(o.conv_w), w(o.conv_b), B, T, di, cfg.d_conv, s);
    }

    // ---- attention layer: in_proj -> [q | k | v] (RoPE applied in place); y = attention
    const bf16* attention_layer_forward(int l, cudaStream_t s) {
        const LayerOffsets& o = layout.layers[l];
        const LayerActs& a = acts[l];
        const AttnShape sh = attn_shape(cfg, B, T);
        phase("qkv_proj", s);
        matmul_forward(a.in_out, xn, w(o.in_proj), B * T, cfg.d_qkv(), cfg.d_model, s);
        phase("attention", s);
        if (cfg.rope) rope_forward(a.in_out, sh, cfg.rope_theta, s);
        attention_forward(a.y, a.stats, a.in_out, sh, s);
        return a.y;
    }

    void attention_layer_backward(int l, cudaStream_t s) {
        const LayerActs& a = acts[l];
        const AttnShape sh = attn_shape(cfg, B, T);
        phase("attention bwd", s);
        attention_backward(din, mixer_scratch, dy, a.in_out, a.y, a.stats, sh, s);
        if (cfg.rope) rope_backward(din, sh, cfg.rope_theta, s);
    }

    // ---- MLP layer: in_proj -> pre-activation a; g = act(a)
    void mlp_act(int l, cudaStream_t s) { mlp_act_forward(g, acts[l].in_out, B * T, cfg.ff(), cfg.mlp_act(), s); }

    const bf16* mlp_forward(int l, cudaStream_t s) {
        const LayerOffsets& o = layout.layers[l];
        phase("up_proj", s);
        matmul_forward(acts[l].in_out, xn, w(o.in_proj), B * T, cfg.d_up(), cfg.d_model, s);
        phase("mlp act", s);
        mlp_act(l, s);
        return g;
    }

    // ---- the layer-generic parts
    int out_proj_in(char kind) const {
        return kind == 'M' ? cfg.d_inner() : kind == '*' ? cfg.q_heads() * cfg.attn_head_dim : cfg.ff();
    }
    int in_proj_out(char kind) const {
        return kind == 'M' ? cfg.d_in_proj() : kind == '*' ? cfg.d_qkv() : cfg.d_up();
    }

    // rmsnorm(resid[l]) through the layer up to out_proj's input (returned)
    const bf16* layer_mixer_forward(int l, cudaStream_t s) {
        const LayerOffsets& o = layout.layers[l];
        phase("rmsnorm", s);
        rmsnorm_forward(xn, acts[l].rstd, resid[l], w(o.norm), B * T, cfg.d_model, cfg.norm_eps, s);
        return o.kind == '*' ? attention_layer_forward(l, s)
               : o.kind == '+' ? mlp_forward(l, s)
               : cfg.mamba1() ? mamba1_forward(l, s) : mamba2_forward(l, s);
    }

    // resid[l + 1] = resid[l] + layer(rmsnorm(resid[l]))
    void layer_forward(int l, cudaStream_t s) {
        const LayerOffsets& o = layout.layers[l];
        const bf16* out_in = layer_mixer_forward(l, s);
        phase("out_proj", s);
        matmul_forward_residual(resid[l + 1], resid[l], out_in, w(o.out_proj), B * T, cfg.d_model,
                                out_proj_in(o.kind), s);
    }

    // dresid (fp32, accumulated) and dresid_bf16 hold the gradient of resid[l + 1]; on
    // return they hold resid[l]'s
    void layer_backward(int l, cudaStream_t s) {
        const LayerOffsets& o = layout.layers[l];
        const LayerActs& a = acts[l];
        const int BT = B * T, d = cfg.d_model;
        // recompute what the forward did not keep (with recompute on, the whole layer)
        const bf16* out_in = a.y;
        bf16* dout_in = dy;
        if (o.kind == 'M' && !cfg.mamba1()) { out_in = g; dout_in = dg; }
        if (o.kind == '+') { out_in = g; dout_in = dg; }
        if (recompute) {
            PhaseTimer* t = timer;
            phase("recompute", s);
            timer = nullptr;  // the whole rerun is charged to "recompute"
            layer_mixer_forward(l, s);
            timer = t;
        } else {
            phase("recompute", s);
            rmsnorm_forward(xn, a.rstd, resid[l], w(o.norm), BT, d, cfg.norm_eps, s);
            if (o.kind == 'M' && cfg.mamba1()) { mamba1_conv(l, s); mamba1_dt(l, s); }
            else if (o.kind == 'M') { mamba2_conv(l, s); mamba2_gate(l, s); }
            else if (o.kind == '+') mlp_act(l, s);
        }
        phase("out_proj bwd", s);
        matmul_backward(dout_in, grads + o.out_proj, dresid_bf16, out_in, w(o.out_proj), BT, d, out_proj_in(o.kind), s);
        if (o.kind == '*') attention_layer_backward(l, s);
        else if (o.kind == '+') { phase("mlp act bwd", s); mlp_act_backward(din, dg, a.in_out, BT, cfg.ff(), cfg.mlp_act(), s); }
        else if (cfg.mamba1()) mamba1_backward(l, s);
        else mamba2_backward(l, s);
        phase("in_proj bwd", s);
        matmul_backward(dxn, grads + o.in_proj, din, xn, w(o.in_proj), BT, in_proj_out(o.kind), d, s);
        phase("rmsnorm bwd", s);
        rmsnorm_backward(dresid, dresid_bf16, grads + o.norm, norm_scratch, dxn, resid[l], w(o.norm), a.rstd, BT, d, s);
    }

    // Forward to the per-token losses (`losses`, device), whose sum it adds to the device
    // total that loss_sum() reads. targets may be null: the forward then stops at the final
    // norm, and compute_logits() gives the logits of chosen rows. weights may be null (all
    // 1). With dloss > 0 the gradient is carried back through the LM head, ready for
    // backward(). With target_rank (device, BT ints) it also records each target's rank for
    // top-k accuracy.
    void forward(const int* inputs, const int* targets, const float* weights, float dloss, float z_loss,
                 cudaStream_t s = 0, int* target_rank = nullptr) {
        const int BT = B * T, d = cfg.d_model;
        cudaCheck(cudaMemcpyAsync(d_inputs, inputs, BT * sizeof(int), cudaMemcpyHostToDevice, s));
        if (targets) cudaCheck(cudaMemcpyAsync(d_targets, targets, BT * sizeof(int), cudaMemcpyHostToDevice, s));
        if (weights) cudaCheck(cudaMemcpyAsync(d_weights, weights, BT * sizeof(float), cudaMemcpyHostToDevice, s));
        if (dloss > 0) buckets.build(inputs, BT, s);  // for the embedding backward

        phase("embedding", s);
        embedding_forward(resid[0], d_inputs, w(layout.embedding), BT, d, s);
        for (int l = 0; l < cfg.n_layer; l++) layer_forward(l, s);
        phase("rmsnorm", s);
        rmsnorm_forward(xn, final_rstd, resid[cfg.n_layer], w(layout.final_norm), BT, d, cfg.norm_eps, s);
        if (!targets) return;
        lm_head_and_loss(target_rank, weights != nullptr, dloss, z_loss, s);
        loss_accumulate(loss_total, losses, BT, s);
    }

    // Logits of rows [r0, r0 + rows) (rows <= logit_rows()) into `logits`, after a forward.
    void compute_logits(int r0, int rows, cudaStream_t s = 0) {
        if (rows > logit_rows()) THROW("compute_logits: %d rows asked, the buffer holds %d", rows, logit_rows());
        matmul_forward(logits, xn + (size_t)r0 * cfg.d_model, w(layout.lm_head), rows, cfg.padded_vocab(), cfg.d_model, s);
    }
    int logit_chunk = LOGIT_CHUNK;  // tests set it smaller to run several chunks
    int logit_rows() const { return std::min(B * T, std::min(logit_chunk, LOGIT_CHUNK)); }

    // The LM head and the loss run over chunks of rows, so the logits of the whole batch
    // never exist at once; with dloss > 0 each chunk's gradient goes straight through the
    // LM head (into dxn and the head's weight gradient), ready for backward().
    void lm_head_and_loss(int* target_rank, bool weighted, float dloss, float z_loss, cudaStream_t s) {
        const int BT = B * T, d = cfg.d_model, Vp = cfg.padded_vocab();
        for (int r0 = 0; r0 < BT; r0 += logit_rows()) {
            const int rows = std::min(logit_rows(), BT - r0);
            phase("lm_head", s);
            compute_logits(r0, rows, s);
            phase("loss", s);
            fused_classifier(logits, losses + r0, target_rank ? target_rank + r0 : nullptr, d_targets + r0,
                             weighted ? d_weights + r0 : nullptr, dloss, z_loss, rows, cfg.vocab_size, Vp, dloss > 0, s);
            if (dloss > 0) {
                phase("lm_head bwd", s);
                matmul_backward(dxn + (size_t)r0 * d, grads + layout.lm_head, logits, xn + (size_t)r0 * d,
                                w(layout.lm_head), rows, Vp, d, s);
            }
        }
    }

    // Backward from what forward(dloss > 0) left; gradients accumulate
    // into `grads` (zero them once per optimizer step with zero_grad()).
    void backward(cudaStream_t s = 0) {
        const int BT = B * T, d = cfg.d_model, L = cfg.n_layer;
        // the forward left the gradient of the final norm's output in dxn
        phase("rmsnorm bwd", s);
        cudaCheck(cudaMemsetAsync(dresid, 0, (size_t)BT * d * sizeof(float), s));
        rmsnorm_backward(dresid, dresid_bf16, grads + layout.final_norm, norm_scratch, dxn, resid[L],
                         w(layout.final_norm), final_rstd, BT, d, s);
        if (grads_done) grads_done(layout.final_norm, false, s);  // and an untied LM head, done in the forward
        for (int l = L - 1; l >= 0; l--) {
            layer_backward(l, s);
            if (grads_done) grads_done(layout.layers[l].norm, false, s);
        }
        phase("embedding bwd", s);
        embedding_backward(grads + layout.embedding, dresid, buckets, d, s);
        if (grads_done) grads_done(0, true, s);
    }

    void zero_grad(cudaStream_t s = 0) { cudaCheck(cudaMemsetAsync(grads, 0, layout.total * sizeof(float), s)); }

    // The sum of the per-token losses of every forward (with targets) since the last call,
    // and the total back to zero: one host sync, once per optimizer step or evaluation.
    double loss_sum() {
        double sum;
        cudaCheck(cudaMemcpy(&sum, loss_total, sizeof(double), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemset(loss_total, 0, sizeof(double)));
        return sum;
    }
};
