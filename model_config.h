// Model configuration (no CUDA): sizes, the layer pattern, presets, JSON config files.
//
// A model is a string of layer symbols (SPEC.md, Hybrids), each a pre-norm residual block
// h = h + Block(RMSNorm(h)): 'M' a Mamba layer (Mamba-2, or Mamba-1 with ssm = "mamba1"),
// '*' causal GQA attention, '+' an MLP. mamba.cuh builds the blocks from the pattern.
#pragma once
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "common.h"

// the layer symbols a pattern may hold (mamba.cuh's make_block builds one block per symbol)
constexpr const char* LAYER_SYMBOLS = "M*+";

enum class MlpAct { SwiGLU, GELU, ReLU2 };

inline MlpAct mlp_act_from_name(const std::string& name) {
    if (name == "swiglu") return MlpAct::SwiGLU;
    if (name == "gelu") return MlpAct::GELU;
    if (name == "relu2") return MlpAct::ReLU2;
    THROW("unknown MLP activation '%s' (swiglu, gelu, relu2)", name.c_str());
}
// up_proj rows per hidden unit: SwiGLU has a gate and an up row
inline int mlp_up_width(MlpAct kind) { return kind == MlpAct::SwiGLU ? 2 : 1; }

struct ModelConfig {
    std::string name = "custom";
    int vocab_size = 50277;   // real vocabulary; the matmuls use padded_vocab()
    int d_model = 768;
    int n_layer = 24;         // symbols of the pattern (each its own residual block)
    std::string pattern;      // 'M' Mamba, '*' attention, '+' MLP; from the ratios below when empty
    double attn_ratio = 0.0, mlp_ratio = 0.0;  // SPEC.md's allocation (Hybrids) when pattern is empty
    // 'M' layers: one kind per model
    std::string ssm = "mamba2";  // mamba2 | mamba1
    int d_state = 0;          // N; 0 means the kind's default: 128 for Mamba-2, 16 for Mamba-1
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

    int padded_vocab() const { return (int)((vocab_size + 127L) / 128 * 128); }
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
    int d_attn() const { return q_heads() * attn_head_dim; }
    int d_qkv() const { return (q_heads() + 2 * kv_heads()) * attn_head_dim; }
    // MLP
    int ff() const { return d_ff > 0 ? d_ff : 4 * d_model; }
    MlpAct mlp_act() const { return mlp_act_from_name(mlp); }
    int d_up() const { return mlp_up_width(mlp_act()) * ff(); }

    // fills the pattern and the defaults, and checks that every size is in range and divides;
    // throws naming the value
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
    if (!(attn_ratio >= 0 && mlp_ratio >= 0 && attn_ratio + mlp_ratio <= 1))  // also refuses NaN
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

// sizes every kernel indexes with 32-bit ints stay below this; the whole model below 2^40
constexpr long MAX_DIM = 1L << 20;

inline void ModelConfig::finalize() {
    auto in_range = [](const char* what, long v, long lo, long hi) {
        if (v < lo || v > hi) THROW("%s must be in [%ld, %ld], got %ld", what, lo, hi, v);
    };
    in_range("vocab_size", vocab_size, 1, (1L << 31) - 256);
    in_range("d_model", d_model, 1, MAX_DIM);
    in_range("n_layer", n_layer, 1, 100000);
    if (pattern.empty()) pattern = allocate_pattern(n_layer, attn_ratio, mlp_ratio);
    if ((int)pattern.size() != n_layer)
        THROW("pattern '%s' has %d layers but n_layer is %d", pattern.c_str(), (int)pattern.size(), n_layer);
    for (char c : pattern)
        if (std::string(LAYER_SYMBOLS).find(c) == std::string::npos)
            THROW("layer symbol '%c' in pattern '%s' is not one of M (Mamba), * (attention), + (MLP)", c, pattern.c_str());
    if (ssm != "mamba2" && ssm != "mamba1") THROW("ssm '%s' is not one of mamba2, mamba1", ssm.c_str());
    if (d_state == 0) d_state = mamba1() ? 16 : 128;  // the one home of this default
    if (!std::isfinite(norm_eps) || norm_eps <= 0) THROW("norm_eps must be a positive number, got %g", norm_eps);
    if (has('M')) {
        in_range("d_state", d_state, 1, 256);
        in_range("expand", expand, 1, 64);
        in_range("d_inner (expand x d_model)", (long)expand * d_model, 1, MAX_DIM);
        if (d_conv < 2 || d_conv > 4) THROW("d_conv %d is not supported by the conv1d kernel (2, 3 or 4)", d_conv);
        if (mamba1()) {
            in_range("dt_rank", dt_rank_(), 1, MAX_DIM);
        } else {
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
        if (n_heads < 0 || n_kv_heads < 0) THROW("attention heads must be positive (%d, %d)", n_heads, n_kv_heads);
        if (q_heads() <= 0 || kv_heads() <= 0 || q_heads() % kv_heads() != 0)
            THROW("attention heads %d are not a multiple of kv heads %d", q_heads(), kv_heads());
        in_range("attention width (heads x head_dim)", (long)q_heads() * attn_head_dim, 1, MAX_DIM);
        if (rope && (!std::isfinite(rope_theta) || rope_theta <= 0))
            THROW("rope_theta must be a positive number, got %g", rope_theta);
    }
    if (has('+')) {
        mlp_act();  // validates the name
        in_range("d_ff", ff(), 1, MAX_DIM);
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

inline std::string preset_names() {
    std::string names;
    for (auto& kv : model_presets()) names += (names.empty() ? "" : ", ") + kv.first;
    return names;
}

// a preset, unfinalized (so that flags can still change it) or finalized
inline ModelConfig model_preset(const std::string& name, bool finalized = true) {
    auto& p = model_presets();
    auto it = p.find(name);
    if (it == p.end()) THROW("unknown model '%s' (presets: %s)", name.c_str(), preset_names().c_str());
    ModelConfig c = it->second;
    if (finalized) c.finalize();
    return c;
}

// JSON config (keys as in HACKING.md) from a parsed object; `origin` names it in errors.
// Unknown keys are an error so typos do not pass silently; every value must have its key's
// type exactly (an integer is no 384.9, no true, no "384"), in the range of an int.
inline ModelConfig model_config_from_json(const nlohmann::json& j, const std::string& origin) {
    if (!j.is_object()) THROW("model config '%s' must be a JSON object, got %s", origin.c_str(), j.type_name());
    ModelConfig c;
    c.name = origin;
    for (auto it = j.begin(); it != j.end(); ++it) {
        const std::string& key = it.key();
        const nlohmann::json& v = it.value();
        auto bad = [&](const char* want) {
            THROW("model config '%s': bad value for '%s': expected %s, got %s", origin.c_str(), key.c_str(), want,
                  v.dump().c_str());
        };
        auto as_int = [&](int& dst) {
            if (!v.is_number_integer()) bad("an integer");
            const int64_t x = v.get<int64_t>();
            if (v.is_number_unsigned() && v.get<uint64_t>() > (uint64_t)std::numeric_limits<int>::max()) bad("an int");
            if (x < std::numeric_limits<int>::min() || x > std::numeric_limits<int>::max()) bad("an int");
            dst = (int)x;
        };
        auto as_num = [&](auto& dst) {
            if (!v.is_number()) bad("a number");
            dst = (std::remove_reference_t<decltype(dst)>)v.get<double>();
        };
        auto as_bool = [&](bool& dst) { if (!v.is_boolean()) bad("true or false"); dst = v.get<bool>(); };
        auto as_str = [&](std::string& dst) { if (!v.is_string()) bad("a string"); dst = v.get<std::string>(); };
        if (key == "vocab_size") as_int(c.vocab_size);
        else if (key == "d_model") as_int(c.d_model);
        else if (key == "n_layer") as_int(c.n_layer);
        else if (key == "pattern") as_str(c.pattern);
        else if (key == "attn_ratio") as_num(c.attn_ratio);
        else if (key == "mlp_ratio") as_num(c.mlp_ratio);
        else if (key == "ssm") as_str(c.ssm);
        else if (key == "d_state") as_int(c.d_state);
        else if (key == "headdim") as_int(c.headdim);
        else if (key == "ngroups") as_int(c.ngroups);
        else if (key == "expand") as_int(c.expand);
        else if (key == "d_conv") as_int(c.d_conv);
        else if (key == "chunk_size") as_int(c.chunk_size);
        else if (key == "dt_rank") as_int(c.dt_rank);
        else if (key == "n_heads") as_int(c.n_heads);
        else if (key == "n_kv_heads") as_int(c.n_kv_heads);
        else if (key == "attn_head_dim") as_int(c.attn_head_dim);
        else if (key == "rope") as_bool(c.rope);
        else if (key == "rope_theta") as_num(c.rope_theta);
        else if (key == "mlp") as_str(c.mlp);
        else if (key == "d_ff") as_int(c.d_ff);
        else if (key == "tie_embeddings") as_bool(c.tie_embeddings);
        else if (key == "norm_eps") as_num(c.norm_eps);
        else if (key == "name") as_str(c.name);
        else THROW("model config '%s': unknown key '%s'", origin.c_str(), key.c_str());
    }
    if (j.contains("pattern") && !j.contains("n_layer")) c.n_layer = (int)c.pattern.size();
    try {
        c.finalize();
    } catch (const std::exception& e) {
        THROW("model config '%s': %s", origin.c_str(), e.what());
    }
    return c;
}

inline ModelConfig model_config_from_json(const std::string& path) {
    require_regular_file(path, "model config");
    std::ifstream f(path);
    if (!f) THROW("cannot open model config '%s': %s", path.c_str(), std::strerror(errno));
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
