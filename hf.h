// Hugging Face and mamba_ssm model directories in and out (no CUDA).
//
// A directory holds config.json, the weights as safetensors (one file or shards with an
// index) and the tokenizer files. Four transformers classes map to the engine's models:
//   MambaForCausalLM      all-M patterns with Mamba-1 layers
//   Mamba2ForCausalLM     all-M patterns with Mamba-2 layers
//   NemotronHForCausalLM  hybrids: M (Mamba-2), * (attention, no RoPE), + (its '-', an MLP of
//                         relu2 or gelu without a gate)
//   LlamaForCausalLM      Transformers: "*+" repeated, RoPE, SwiGLU
// and state-spaces/mamba's own layout (config.json with ssm_cfg, backbone.embedding.weight)
// is read as well. Every HF tensor is a contiguous slice of one of our tensors (HF's
// matrices are PyTorch Linear's (out, in), as ours; Llama's q/k/v and gate/up are row blocks
// of our fused qkv_proj and up_proj; conv1d's (C, 1, K) is our (C, K)), so conversion is a
// table of names, shapes and offsets (hf_tensors) read or written in one pass.
//
// Conventions that match and need no permutation: Mamba-2's in_proj columns [z | x B C | dt]
// and its conv over [x B C]; Mamba-1's [x | z] and x_proj's [dt | B | C]; RoPE rotate-half
// (pairs (i, i + Dh/2), as HF's Llama); SwiGLU's silu(gate) * up; the gated norm
// (norm_before_gate=False) over groups of d_inner / ngroups channels.
//
// Vocabulary: we keep rows padded to a multiple of 128; an export writes the true
// vocabulary (vocab_size rows). An import takes vocab_size from config.json and reads that
// many rows of the embedding and head; mamba_ssm pads its tensors (pad_vocab_size_multiple,
// 50277 -> 50280), those extra rows are never real tokens and are dropped.
#pragma once
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "common.h"
#include "model_config.h"
#include "params.h"
#include "safetensors.h"
#include "tokenizer.h"
#include "data/sft.h"

enum class HfKind { Mamba, Mamba2, NemotronH, Llama, MambaSsm };

inline const char* hf_class(HfKind k) {
    switch (k) {
        case HfKind::Mamba: return "MambaForCausalLM";
        case HfKind::Mamba2: return "Mamba2ForCausalLM";
        case HfKind::NemotronH: return "NemotronHForCausalLM";
        case HfKind::Llama: return "LlamaForCausalLM";
        default: return "mamba_ssm MambaLMHeadModel";
    }
}
inline const char* hf_model_type(HfKind k) {
    switch (k) {
        case HfKind::Mamba: return "mamba";
        case HfKind::Mamba2: return "mamba2";
        case HfKind::NemotronH: return "nemotron_h";
        case HfKind::Llama: return "llama";
        default: return "mamba_ssm";
    }
}
// a --class flag: the model_type or the class name
inline HfKind hf_kind_from_name(const std::string& s) {
    for (HfKind k : {HfKind::Mamba, HfKind::Mamba2, HfKind::NemotronH, HfKind::Llama})
        if (s == hf_model_type(k) || s == hf_class(k)) return k;
    THROW("unknown model class '%s' (mamba, mamba2, nemotron_h, llama)", s.c_str());
}

// ---- JSON as Python writes it: bare NaN, Infinity and -Infinity (time_step_limit's
// [0.0, Infinity]) are not JSON; they are read as the strings "NaN", "Infinity", "-Infinity",
// and so is transformers 5's encoding of them, {"__float__": "Infinity"}.
inline void unwrap_py_floats(nlohmann::json& j) {
    if (j.is_object() && j.size() == 1 && j.contains("__float__") && j["__float__"].is_string()) {
        j = nlohmann::json(j["__float__"].get<std::string>());
        return;
    }
    if (j.is_structured())
        for (auto& v : j) unwrap_py_floats(v);
}
inline nlohmann::json parse_py_json(const std::string& text, const std::string& origin) {
    std::string s;
    s.reserve(text.size());
    bool in_str = false;
    for (size_t i = 0; i < text.size(); i++) {
        const char c = text[i];
        if (in_str) {
            s += c;
            if (c == '\\' && i + 1 < text.size()) s += text[++i];
            else if (c == '"') in_str = false;
            continue;
        }
        if (c == '"') { in_str = true; s += c; continue; }
        bool replaced = false;
        for (const char* word : {"-Infinity", "Infinity", "NaN"}) {
            const size_t n = strlen(word);
            if (text.compare(i, n, word) == 0) { s += std::string("\"") + word + "\""; i += n - 1; replaced = true; break; }
        }
        if (!replaced) s += c;
    }
    try {
        nlohmann::json j = nlohmann::json::parse(s);
        unwrap_py_floats(j);
        return j;
    } catch (const nlohmann::json::exception& e) {
        THROW("'%s' is not valid JSON: %s", origin.c_str(), e.what());
    }
}
inline nlohmann::json read_py_json(const std::string& path) {
    require_regular_file(path, "JSON file");
    std::ifstream f(path);
    if (!f) THROW("cannot open '%s': %s", path.c_str(), std::strerror(errno));
    return parse_py_json(std::string(std::istreambuf_iterator<char>(f), {}), path);
}

// the shortest decimal that reads back as the same float (1e-05, not 9.99999974738e-06)
inline double json_float(float f) {
    for (int p = 6; p < 10; p++) {
        const double d = std::stod(strformat("%.*g", p, (double)f));
        if ((float)d == f) return d;
    }
    return f;
}

// ---- config.json -> ModelConfig

// Reads fields of an HF config with their defaults; a field whose value the engine cannot
// run is refused naming the file, the field and its value.
struct HfConfigReader {
    const nlohmann::json& j;
    std::string origin;

    const nlohmann::json* get(std::initializer_list<const char*> keys) const {
        for (const char* k : keys)
            if (j.contains(k) && !j[k].is_null()) return &j[k];
        return nullptr;
    }
    [[noreturn]] void refuse(const std::string& key, const nlohmann::json& v, const std::string& why) const {
        THROW("%s: %s = %s is not supported: %s", origin.c_str(), key.c_str(), v.dump().c_str(), why.c_str());
    }
    int integer(std::initializer_list<const char*> keys, int def, bool required = false) const {
        const nlohmann::json* v = get(keys);
        if (!v) {
            if (required) THROW("%s: the field '%s' is missing", origin.c_str(), *keys.begin());
            return def;
        }
        if (!v->is_number_integer() || v->get<int64_t>() < 0 || v->get<int64_t>() > (1LL << 31) - 1)
            THROW("%s: '%s' must be a non-negative integer, got %s", origin.c_str(), *keys.begin(), v->dump().c_str());
        return v->get<int>();
    }
    double number(std::initializer_list<const char*> keys, double def) const {
        const nlohmann::json* v = get(keys);
        if (!v) return def;
        if (!v->is_number()) THROW("%s: '%s' must be a number, got %s", origin.c_str(), *keys.begin(), v->dump().c_str());
        return v->get<double>();
    }
    bool boolean(std::initializer_list<const char*> keys, bool def) const {
        const nlohmann::json* v = get(keys);
        if (!v) return def;
        if (!v->is_boolean()) THROW("%s: '%s' must be true or false, got %s", origin.c_str(), *keys.begin(), v->dump().c_str());
        return v->get<bool>();
    }
    std::string str(std::initializer_list<const char*> keys, const std::string& def) const {
        const nlohmann::json* v = get(keys);
        if (!v) return def;
        if (!v->is_string()) THROW("%s: '%s' must be a string, got %s", origin.c_str(), *keys.begin(), v->dump().c_str());
        return v->get<std::string>();
    }
    // a field that must have one value (or be absent)
    template <typename T>
    void expect(std::initializer_list<const char*> keys, const T& want, const std::string& why) const {
        const nlohmann::json* v = get(keys);
        if (v && *v != nlohmann::json(want)) refuse(*keys.begin(), *v, why);
    }
    // dt is never clamped here: a limit other than (0, inf) is refused
    void no_dt_limit(std::initializer_list<const char*> keys) const {
        const nlohmann::json* v = get(keys);
        if (!v) return;
        const bool open = v->is_array() && v->size() == 2 && (*v)[0].is_number() && (*v)[0].get<double>() == 0.0 &&
                          (*v)[1] == "Infinity";
        if (!open) refuse(*keys.begin(), *v, "the engine does not clamp dt (only [0.0, Infinity] is accepted)");
    }
};

// which of the supported layouts a config.json describes
inline HfKind hf_kind_of(const nlohmann::json& j, const std::string& origin) {
    if (!j.is_object()) THROW("%s: a config is a JSON object", origin.c_str());
    if (j.contains("model_type") && j["model_type"].is_string()) {
        const std::string t = j["model_type"].get<std::string>();
        for (HfKind k : {HfKind::Mamba, HfKind::Mamba2, HfKind::NemotronH, HfKind::Llama})
            if (t == hf_model_type(k)) {
                if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
                    j["architectures"][0] != hf_class(k))
                    THROW("%s: architectures = %s is not supported: only %s (a causal LM) is read", origin.c_str(),
                          j["architectures"].dump().c_str(), hf_class(k));
                return k;
            }
        THROW("%s: model_type = \"%s\" is not supported (mamba, mamba2, nemotron_h, llama, or mamba_ssm's config.json "
              "with ssm_cfg)", origin.c_str(), t.c_str());
    }
    if (j.contains("ssm_cfg") || (j.contains("d_model") && j.contains("n_layer"))) return HfKind::MambaSsm;
    THROW("%s: neither a transformers config (model_type) nor a mamba_ssm config (d_model, n_layer, ssm_cfg)",
          origin.c_str());
}

// The engine's config for an HF or mamba_ssm config.json (finalized; its name is the
// caller's). Sizes that HF does not hold keep our defaults (so an imported published model
// equals its preset); what the engine cannot run is refused naming the field.
inline ModelConfig hf_config_from_json(const nlohmann::json& j, const std::string& origin, HfKind& kind) {
    kind = hf_kind_of(j, origin);
    const HfConfigReader r{j, origin};
    ModelConfig c;
    if (const nlohmann::json* q = r.get({"quantization_config"})) r.refuse("quantization_config", *q, "quantized weights");
    switch (kind) {
        case HfKind::Mamba: {
            c.ssm = "mamba1";
            c.vocab_size = r.integer({"vocab_size"}, 50280);
            c.d_model = r.integer({"hidden_size"}, 768);
            c.n_layer = r.integer({"num_hidden_layers"}, 32);
            c.d_state = r.integer({"state_size"}, 16);
            c.expand = r.integer({"expand"}, 2);
            c.d_conv = r.integer({"conv_kernel"}, 4);
            const nlohmann::json* rank = r.get({"time_step_rank"});
            if (rank && !(rank->is_string() && *rank == "auto")) c.dt_rank = r.integer({"time_step_rank"}, 0);
            c.norm_eps = (float)r.number({"layer_norm_epsilon"}, 1e-5);
            c.tie_embeddings = r.boolean({"tie_word_embeddings"}, true);
            r.expect({"use_bias"}, false, "in_proj and out_proj have no bias here");
            r.expect({"use_conv_bias"}, true, "conv1d always has a bias here");
            r.expect({"hidden_act"}, "silu", "the Mamba layers use SiLU");
            r.expect({"intermediate_size"}, c.expand * c.d_model, "it must be expand x hidden_size");
            c.pattern = std::string(c.n_layer, 'M');
            break;
        }
        case HfKind::Mamba2: {
            c.vocab_size = r.integer({"vocab_size"}, 32768);
            c.d_model = r.integer({"hidden_size"}, 4096);
            c.n_layer = r.integer({"num_hidden_layers"}, 64);
            c.d_state = r.integer({"state_size"}, 128);
            c.expand = r.integer({"expand"}, 2);
            c.d_conv = r.integer({"conv_kernel"}, 4);
            c.ngroups = r.integer({"n_groups"}, 8);
            c.headdim = r.integer({"head_dim"}, 64);
            c.chunk_size = r.integer({"chunk_size"}, 256);
            c.norm_eps = (float)r.number({"layer_norm_epsilon"}, 1e-5);
            c.tie_embeddings = r.boolean({"tie_word_embeddings"}, false);
            const int heads = r.integer({"num_heads"}, 128);
            if ((long)heads * c.headdim != (long)c.expand * c.d_model)
                r.refuse("num_heads", heads, strformat("num_heads x head_dim (%d x %d) must equal expand x hidden_size (%d x %d)",
                                                       heads, c.headdim, c.expand, c.d_model));
            r.expect({"use_bias"}, false, "in_proj and out_proj have no bias here");
            r.expect({"use_conv_bias"}, true, "conv1d always has a bias here");
            r.expect({"hidden_act"}, "silu", "the Mamba layers use SiLU");
            r.expect({"rms_norm"}, true, "the gated norm is an RMSNorm here");
            r.no_dt_limit({"time_step_limit"});
            c.pattern = std::string(c.n_layer, 'M');
            break;
        }
        case HfKind::NemotronH: {
            c.vocab_size = r.integer({"vocab_size"}, 131072);
            c.d_model = r.integer({"hidden_size"}, 4096);
            // the layers: hybrid_override_pattern (M * -) or, as transformers 5 saves them, layers_block_type
            if (const nlohmann::json* list = r.get({"layers_block_type"})) {
                if (!list->is_array()) r.refuse("layers_block_type", *list, "it must be a list of layer types");
                for (auto& t : *list) {
                    const std::string s = t.is_string() ? t.get<std::string>() : "";
                    if (s == "mamba" || s == "linear_attention") c.pattern += 'M';
                    else if (s == "attention" || s == "full_attention") c.pattern += '*';
                    else if (s == "mlp") c.pattern += '+';
                    else r.refuse("layers_block_type", t, "only mamba, attention and mlp layers exist here (no MoE)");
                }
            } else {
                const std::string p = r.str({"hybrid_override_pattern"}, "");
                if (p.empty()) THROW("%s: the field 'hybrid_override_pattern' is missing", origin.c_str());
                for (char ch : p) {
                    if (ch == 'M' || ch == '*') c.pattern += ch;
                    else if (ch == '-') c.pattern += '+';
                    else r.refuse("hybrid_override_pattern", p, strformat("layer '%c' (only M, * and - exist here; E is MoE)", ch));
                }
            }
            c.n_layer = (int)c.pattern.size();
            if (c.n_layer == 0) THROW("%s: the model has no layers", origin.c_str());
            c.d_state = r.integer({"ssm_state_size"}, 128);
            c.ngroups = r.integer({"n_groups", "mamba_n_groups"}, 8);
            c.headdim = r.integer({"mamba_head_dim"}, 64);
            c.d_conv = r.integer({"conv_kernel", "mamba_d_conv"}, 4);
            c.chunk_size = r.integer({"chunk_size", "mamba_chunk_size"}, 128);
            const int mheads = r.integer({"mamba_num_heads"}, 128);
            const long inner = (long)mheads * c.headdim;
            if (c.has('M')) {
                if (inner % c.d_model != 0)
                    r.refuse("mamba_num_heads", mheads, strformat("mamba_num_heads x mamba_head_dim = %ld must be a multiple "
                                                                  "of hidden_size %d (d_inner = expand x d_model here)", inner, c.d_model));
                c.expand = (int)(inner / c.d_model);
            }
            c.n_heads = r.integer({"num_attention_heads"}, 32);
            c.n_kv_heads = r.integer({"num_key_value_heads"}, c.n_heads);
            c.attn_head_dim = r.integer({"head_dim", "attention_head_dim"}, c.d_model / std::max(c.n_heads, 1));
            c.d_ff = r.integer({"intermediate_size"}, 21504);
            const std::string act = r.str({"mlp_hidden_act"}, "relu2");
            if (act == "relu2" || act == "gelu") c.mlp = act;
            else r.refuse("mlp_hidden_act", act, "the MLP layers here are relu2 or gelu (exact erf form)");
            c.norm_eps = (float)r.number({"layer_norm_epsilon"}, 1e-5);
            c.tie_embeddings = r.boolean({"tie_word_embeddings"}, false);
            r.expect({"use_bias"}, false, "in_proj and out_proj have no bias here");
            r.expect({"mamba_proj_bias"}, false, "in_proj and out_proj have no bias here");
            r.expect({"use_conv_bias", "mamba_conv_bias"}, true, "conv1d always has a bias here");
            r.expect({"mamba_hidden_act"}, "silu", "the Mamba layers use SiLU");
            r.expect({"attention_bias"}, false, "the attention projections have no bias here");
            r.expect({"mlp_bias"}, false, "the MLP projections have no bias here");
            r.no_dt_limit({"time_step_limit", "mamba_dt_limit"});
            if (const nlohmann::json* w = r.get({"sliding_window"})) r.refuse("sliding_window", *w, "attention here is full causal");
            break;
        }
        case HfKind::Llama: {
            c.vocab_size = r.integer({"vocab_size"}, 32000);
            c.d_model = r.integer({"hidden_size"}, 4096);
            const int layers = r.integer({"num_hidden_layers"}, 32);
            for (int i = 0; i < layers; i++) c.pattern += "*+";
            c.n_layer = (int)c.pattern.size();
            c.n_heads = r.integer({"num_attention_heads"}, 32);
            c.n_kv_heads = r.integer({"num_key_value_heads"}, c.n_heads);
            c.attn_head_dim = r.integer({"head_dim"}, c.d_model / std::max(c.n_heads, 1));
            c.d_ff = r.integer({"intermediate_size"}, 11008);
            c.mlp = "swiglu";
            c.rope = true;
            double theta = r.number({"rope_theta"}, 10000.0);
            if (const nlohmann::json* rp = r.get({"rope_parameters"})) {  // transformers 5
                if (!rp->is_object()) r.refuse("rope_parameters", *rp, "it must be an object");
                const std::string type = rp->value("rope_type", std::string("default"));
                if (type != "default") r.refuse("rope_parameters", *rp, "only the default RoPE (no scaling) exists here");
                if (rp->contains("rope_theta") && (*rp)["rope_theta"].is_number()) theta = (*rp)["rope_theta"].get<double>();
            }
            if (const nlohmann::json* rs = r.get({"rope_scaling"})) {
                if (!(rs->is_object() && rs->value("rope_type", rs->value("type", std::string())) == "default"))
                    r.refuse("rope_scaling", *rs, "only the default RoPE (no scaling) exists here");
            }
            c.rope_theta = (float)theta;
            c.norm_eps = (float)r.number({"rms_norm_eps"}, 1e-6);
            c.tie_embeddings = r.boolean({"tie_word_embeddings"}, false);
            r.expect({"hidden_act"}, "silu", "the MLP here is SwiGLU (silu)");
            r.expect({"attention_bias"}, false, "the attention projections have no bias here");
            r.expect({"mlp_bias"}, false, "the MLP projections have no bias here");
            r.expect({"pretraining_tp"}, 1, "its split matmuls are not reproduced here");
            break;
        }
        case HfKind::MambaSsm: {
            c.vocab_size = r.integer({"vocab_size"}, 50277, true);
            c.d_model = r.integer({"d_model"}, 2560, true);
            c.n_layer = r.integer({"n_layer"}, 64, true);
            c.tie_embeddings = r.boolean({"tie_embeddings"}, true);
            r.expect({"rms_norm"}, true, "the norms are RMSNorms here");
            if (r.integer({"d_intermediate"}, 0) != 0)
                r.refuse("d_intermediate", j["d_intermediate"], "mamba_ssm's MLP layers are not read (use a transformers layout)");
            if (const nlohmann::json* a = r.get({"attn_layer_idx"}))
                if (!a->empty()) r.refuse("attn_layer_idx", *a, "mamba_ssm's attention layers are not read (use a transformers layout)");
            const nlohmann::json ssm = j.contains("ssm_cfg") && j["ssm_cfg"].is_object() ? j["ssm_cfg"] : nlohmann::json::object();
            const HfConfigReader s{ssm, origin + " ssm_cfg"};
            const std::string layer = s.str({"layer"}, "Mamba1");
            if (layer == "Mamba1") c.ssm = "mamba1";
            else if (layer != "Mamba2") s.refuse("layer", layer, "only Mamba1 and Mamba2 layers exist here");
            c.d_state = s.integer({"d_state"}, c.mamba1() ? 16 : 128);
            c.d_conv = s.integer({"d_conv"}, 4);
            c.expand = s.integer({"expand"}, 2);
            s.expect({"bias"}, false, "in_proj and out_proj have no bias here");
            s.expect({"conv_bias"}, true, "conv1d always has a bias here");
            if (c.mamba1()) {
                const nlohmann::json* rank = s.get({"dt_rank"});
                if (rank && !(rank->is_string() && *rank == "auto")) c.dt_rank = s.integer({"dt_rank"}, 0);
            } else {
                c.headdim = s.integer({"headdim"}, 64);
                c.ngroups = s.integer({"ngroups"}, 1);
                c.chunk_size = s.integer({"chunk_size"}, 256);
                s.expect({"rmsnorm"}, true, "the gated norm is an RMSNorm here");
                s.expect({"norm_before_gate"}, false, "the gated norm runs after the gate here");
                s.expect({"D_has_hdim"}, false, "D is one value per head here");
                if (const nlohmann::json* d = s.get({"d_ssm"}))
                    if (*d != nlohmann::json(c.expand * c.d_model)) s.refuse("d_ssm", *d, "the SSM spans all of d_inner here");
                s.no_dt_limit({"dt_limit"});
            }
            c.pattern = std::string(c.n_layer, 'M');
            break;
        }
    }
    try {
        c.finalize();
    } catch (const std::exception& e) {
        THROW("%s: %s", origin.c_str(), e.what());
    }
    return c;
}

// Token ids a config.json names (bos/eos/pad), -1 where unknown
struct HfSpecialIds { int bos = -1, eos = -1, pad = -1; };

// Which class a model exports to, and why not when it has none
inline HfKind hf_export_kind(const ModelConfig& c) {
    if (c.pattern == std::string(c.n_layer, 'M')) return c.mamba1() ? HfKind::Mamba : HfKind::Mamba2;
    bool llama = c.n_layer % 2 == 0;
    for (int i = 0; i < c.n_layer; i++) llama &= c.pattern[i] == (i % 2 ? '+' : '*');
    if (llama && c.rope && c.mlp == "swiglu") return HfKind::Llama;
    return HfKind::NemotronH;
}

// Throws, naming the field, when `k` cannot express the model
inline void hf_check_expressible(const ModelConfig& c, HfKind k) {
    const char* cls = hf_class(k);
    auto no = [&](const std::string& what) { THROW("%s cannot express this model: %s", cls, what.c_str()); };
    const bool all_m = c.pattern == std::string(c.n_layer, 'M');
    switch (k) {
        case HfKind::Mamba:
            if (!all_m || !c.mamba1()) no("it holds Mamba-1 layers only (pattern '" + c.pattern + "', ssm " + c.ssm + ")");
            break;
        case HfKind::Mamba2:
            if (!all_m || c.mamba1()) no("it holds Mamba-2 layers only (pattern '" + c.pattern + "', ssm " + c.ssm + ")");
            break;
        case HfKind::NemotronH:
            if (c.has('M') && c.mamba1()) no("its Mamba layers are Mamba-2 (this model's are Mamba-1: ssm mamba1)");
            if (c.has('*') && c.rope) no("its attention has no RoPE (rope true); a Transformer (\"*+\" repeated, SwiGLU) exports to LlamaForCausalLM");
            if (c.has('+') && c.mlp == "swiglu")
                no("its MLP has no gate (mlp swiglu; relu2 and gelu export); a Transformer (\"*+\" repeated, RoPE) exports to LlamaForCausalLM");
            break;
        case HfKind::Llama: {
            bool pairs = c.n_layer % 2 == 0;
            for (int i = 0; i < c.n_layer; i++) pairs &= c.pattern[i] == (i % 2 ? '+' : '*');
            if (!pairs) no("its layers are attention + MLP pairs (pattern \"*+\" repeated, not '" + c.pattern + "')");
            if (!c.rope) no("its attention has RoPE (rope false here)");
            if (c.mlp != "swiglu") no("its MLP is SwiGLU (mlp " + c.mlp + " here)");
            break;
        }
        default: no("mamba_ssm's layout is read, not written");
    }
}

// The config.json of an export
inline nlohmann::ordered_json hf_config_to_json(const ModelConfig& c, HfKind k, Dtype dtype, const HfSpecialIds& ids) {
    hf_check_expressible(c, k);
    nlohmann::ordered_json j = {{"architectures", {hf_class(k)}}, {"model_type", hf_model_type(k)},
                                {"vocab_size", c.vocab_size}, {"hidden_size", c.d_model}};
    const double eps = json_float(c.norm_eps);
    switch (k) {
        case HfKind::Mamba:
            j["num_hidden_layers"] = c.n_layer;
            j["state_size"] = c.d_state;
            j["expand"] = c.expand;
            j["conv_kernel"] = c.d_conv;
            j["time_step_rank"] = c.dt_rank_();
            j["layer_norm_epsilon"] = eps;
            j["use_bias"] = false;
            j["use_conv_bias"] = true;
            j["hidden_act"] = "silu";
            j["residual_in_fp32"] = true;
            break;
        case HfKind::Mamba2:
            j["num_hidden_layers"] = c.n_layer;
            j["state_size"] = c.d_state;
            j["expand"] = c.expand;
            j["conv_kernel"] = c.d_conv;
            j["n_groups"] = c.ngroups;
            j["num_heads"] = c.nheads();
            j["head_dim"] = c.headdim;
            j["chunk_size"] = c.chunk_size;
            j["layer_norm_epsilon"] = eps;
            j["use_bias"] = false;
            j["use_conv_bias"] = true;
            j["hidden_act"] = "silu";
            j["rms_norm"] = true;
            j["residual_in_fp32"] = true;
            break;
        case HfKind::NemotronH: {
            std::string p = c.pattern;
            std::replace(p.begin(), p.end(), '+', '-');
            j["num_hidden_layers"] = c.n_layer;
            j["hybrid_override_pattern"] = p;
            j["ssm_state_size"] = c.d_state;
            j["mamba_num_heads"] = c.has('M') ? c.nheads() : 1;
            j["mamba_head_dim"] = c.headdim;
            j["n_groups"] = c.ngroups;
            j["expand"] = c.expand;
            j["conv_kernel"] = c.d_conv;
            j["chunk_size"] = c.chunk_size;
            j["mamba_hidden_act"] = "silu";
            j["use_conv_bias"] = true;
            j["mamba_proj_bias"] = false;
            j["use_bias"] = false;
            // transformers' slow path clamps dt at time_step_min on a prompt; the engine never
            // clamps, so the bound sits below any dt (it also bounds a fresh model's dt init)
            j["time_step_min"] = 1e-30;
            j["num_attention_heads"] = c.q_heads();
            j["num_key_value_heads"] = c.kv_heads();
            j["head_dim"] = c.attn_head_dim;
            j["attention_bias"] = false;
            j["intermediate_size"] = c.ff();
            j["mlp_hidden_act"] = c.mlp;
            j["mlp_bias"] = false;
            j["layer_norm_epsilon"] = eps;
            j["residual_in_fp32"] = true;
            j["max_position_embeddings"] = 8192;
            break;
        }
        case HfKind::Llama:
            j["num_hidden_layers"] = c.n_layer / 2;
            j["intermediate_size"] = c.ff();
            j["num_attention_heads"] = c.q_heads();
            j["num_key_value_heads"] = c.kv_heads();
            j["head_dim"] = c.attn_head_dim;
            j["hidden_act"] = "silu";
            j["rms_norm_eps"] = eps;
            j["rope_theta"] = json_float(c.rope_theta);
            j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", json_float(c.rope_theta)}};
            j["attention_bias"] = false;
            j["mlp_bias"] = false;
            j["max_position_embeddings"] = 8192;
            break;
        default: break;
    }
    j["tie_word_embeddings"] = c.tie_embeddings;
    if (ids.bos >= 0) j["bos_token_id"] = ids.bos;
    if (ids.eos >= 0) j["eos_token_id"] = ids.eos;
    if (ids.pad >= 0) j["pad_token_id"] = ids.pad;
    j["torch_dtype"] = torch_dtype_name(dtype);
    j["use_cache"] = true;
    return j;
}

// ---- the tensor table

struct HfTensor {
    std::string name;                  // as written
    std::vector<std::string> aliases;  // also accepted on import (mamba_ssm, transformers 5)
    std::vector<int64_t> shape;        // HF's
    size_t offset = 0, count = 0;      // our contiguous slice
    bool vocab = false;                // vocabulary rows: the file may hold more (padding)
};

// Every HF tensor of model `c` in kind `k` and its slice of our buffer (P: ParamLayout(c)).
// Each of our tensors must be covered exactly (the padded vocabulary rows excepted), so a
// tensor added to the model and not to this table is an error, not a silent omission.
inline std::vector<HfTensor> hf_tensors(const ModelConfig& c, const ParamTable& P, HfKind k) {
    const int64_t d = c.d_model, V = c.vocab_size;
    std::vector<HfTensor> out;
    std::map<std::string, size_t> covered;
    // prefix of the backbone: "backbone." (mamba_ssm, HF Mamba, Nemotron-H) or "model." (Llama;
    // transformers 5 renames Nemotron-H's backbone to model)
    const std::string pre = k == HfKind::Llama ? "model." : "backbone.";
    auto add = [&](const std::string& hf, const std::string& ours, std::vector<int64_t> shape, int64_t row0 = 0,
                   int64_t rows = -1, bool vocab = false) {
        const TensorInfo& t = P.find(ours);
        const size_t row = t.shape.size() == 2 ? (size_t)t.shape[1] : 1;
        HfTensor h;
        h.name = hf;
        if (hf.rfind("backbone.", 0) == 0) h.aliases.push_back("model." + hf.substr(9));  // transformers 5's prefix
        h.shape = shape;
        h.offset = t.offset + (size_t)row0 * row;
        h.count = 1;
        for (int64_t s : shape) h.count *= (size_t)s;
        h.vocab = vocab;
        if (rows >= 0 && h.count != (size_t)rows * row) THROW("hf_tensors: '%s' does not tile '%s'", hf.c_str(), ours.c_str());
        if (rows < 0 && !vocab && h.count != t.count)
            THROW("hf_tensors: '%s' %s does not match '%s' (%zu values)", hf.c_str(), shape_str(shape).c_str(), ours.c_str(), t.count);
        covered[ours] += h.count;
        out.push_back(h);
        return &out.back();
    };
    // embedding and head: the true vocabulary's rows
    {
        HfTensor* e = add(k == HfKind::Llama ? "model.embed_tokens.weight"
                          : k == HfKind::MambaSsm ? "backbone.embedding.weight" : "backbone.embeddings.weight",
                          "embedding", {V, d}, 0, -1, true);
        if (k == HfKind::MambaSsm) e->aliases.push_back("backbone.embeddings.weight");
        else if (k != HfKind::Llama) e->aliases.push_back("backbone.embedding.weight");
    }
    const int L = k == HfKind::Llama ? c.n_layer / 2 : c.n_layer;
    for (int i = 0; i < L; i++) {
        if (k == HfKind::Llama) {
            const std::string h = "model.layers." + std::to_string(i) + ".", a = strformat("layers.%d.", 2 * i),
                              m = strformat("layers.%d.", 2 * i + 1);
            const int64_t q = (int64_t)c.q_heads() * c.attn_head_dim, kv = (int64_t)c.kv_heads() * c.attn_head_dim,
                          ff = c.ff();
            add(h + "input_layernorm.weight", a + "norm", {d});
            add(h + "self_attn.q_proj.weight", a + "qkv_proj", {q, d}, 0, q);
            add(h + "self_attn.k_proj.weight", a + "qkv_proj", {kv, d}, q, kv);
            add(h + "self_attn.v_proj.weight", a + "qkv_proj", {kv, d}, q + kv, kv);
            add(h + "self_attn.o_proj.weight", a + "o_proj", {d, q});
            add(h + "post_attention_layernorm.weight", m + "norm", {d});
            add(h + "mlp.gate_proj.weight", m + "up_proj", {ff, d}, 0, ff);
            add(h + "mlp.up_proj.weight", m + "up_proj", {ff, d}, ff, ff);
            add(h + "mlp.down_proj.weight", m + "down_proj", {d, ff});
            continue;
        }
        const std::string h = pre + "layers." + std::to_string(i) + ".", o = strformat("layers.%d.", i),
                          x = h + "mixer.";
        add(h + "norm.weight", o + "norm", {d});
        const char sym = c.pattern[i];
        if (sym == 'M') {
            const int64_t di = c.d_inner(), K = c.d_conv, cd = c.conv_dim();
            add(x + "in_proj.weight", o + "in_proj", {(int64_t)c.d_in_proj(), d});
            add(x + "conv1d.weight", o + "conv_weight", {cd, 1, K});
            add(x + "conv1d.bias", o + "conv_bias", {cd});
            if (c.mamba1()) {
                const int64_t R = c.dt_rank_(), N = c.d_state;
                add(x + "x_proj.weight", o + "x_proj", {R + 2 * N, di});
                add(x + "dt_proj.weight", o + "dt_proj", {di, R});
                add(x + "dt_proj.bias", o + "dt_bias", {di});
                add(x + "A_log", o + "A_log", {di, N});
                add(x + "D", o + "D", {di});
            } else {
                const int64_t H = c.nheads();
                add(x + "dt_bias", o + "dt_bias", {H});
                add(x + "A_log", o + "A_log", {H});
                add(x + "D", o + "D", {H});
                add(x + "norm.weight", o + "gate_norm", {di});
            }
            add(x + "out_proj.weight", o + "out_proj", {d, di});
        } else if (sym == '*') {
            const int64_t q = (int64_t)c.q_heads() * c.attn_head_dim, kv = (int64_t)c.kv_heads() * c.attn_head_dim;
            add(x + "q_proj.weight", o + "qkv_proj", {q, d}, 0, q);
            add(x + "k_proj.weight", o + "qkv_proj", {kv, d}, q, kv);
            add(x + "v_proj.weight", o + "qkv_proj", {kv, d}, q + kv, kv);
            add(x + "o_proj.weight", o + "o_proj", {d, q});
        } else {
            add(x + "up_proj.weight", o + "up_proj", {(int64_t)c.d_up(), d});
            add(x + "down_proj.weight", o + "down_proj", {d, (int64_t)c.ff()});
        }
    }
    add(k == HfKind::Llama ? "model.norm.weight" : pre + "norm_f.weight", "final_norm", {d});
    if (!c.tie_embeddings) add("lm_head.weight", "lm_head", {V, d}, 0, -1, true);
    for (const TensorInfo& t : P.tensors) {
        const size_t want = (t.name == "embedding" || t.name == "lm_head") ? (size_t)V * d : t.count;
        if (covered[t.name] != want)
            THROW("%s has no complete place for our tensor '%s' (%zu of %zu values mapped)", hf_class(k), t.name.c_str(),
                  covered[t.name], want);
    }
    return out;
}

// tensors an import may meet and skip: the tied head's copy, RoPE's cached frequencies,
// Nemotron-H's multi-token-prediction layers (transformers skips them too)
inline bool hf_skippable(const std::string& name, const ModelConfig& c) {
    if (c.tie_embeddings && name == "lm_head.weight") return true;
    if (name.size() >= 19 && name.compare(name.size() - 19, 19, "rotary_emb.inv_freq") == 0) return true;
    return name.rfind("mtp.", 0) == 0;
}

// Our fp32 buffer (P.total values; padded vocabulary rows zero) from a directory's weights.
// A missing tensor, one of the wrong shape (both shapes named) or one with no place in the
// model is an error naming it and its file.
inline std::vector<float> hf_read_weights(const SafetensorsModel& st, const ModelConfig& c, const ParamTable& P, HfKind k) {
    std::vector<float> master(P.total, 0.0f);
    std::set<std::string> used;
    for (const HfTensor& t : hf_tensors(c, P, k)) {
        const StTensor* f = st.find(t.name);
        std::string tried = "'" + t.name + "'";
        for (const std::string& a : t.aliases) {
            if (!f && (f = st.find(a))) break;
            tried += " or '" + a + "'";
        }
        if (!f) THROW("tensor %s is missing from '%s' (the %s config asks for it)", tried.c_str(), st.where().c_str(), hf_class(k));
        bool ok = f->shape.size() == t.shape.size();
        for (size_t i = 0; ok && i < t.shape.size(); i++)
            ok = t.vocab && i == 0 ? f->shape[0] >= t.shape[0] : f->shape[i] == t.shape[i];
        if (!ok)
            THROW("tensor '%s' in '%s' has shape %s, expected %s%s", f->name.c_str(), f->file.c_str(), shape_str(f->shape).c_str(),
                  shape_str(t.shape).c_str(), t.vocab ? " (vocab_size rows, or more of padding)" : "");
        st_to_f32(*f, 0, t.count, master.data() + t.offset);
        used.insert(f->name);
    }
    for (const std::string& name : st.names())
        if (!used.count(name) && !hf_skippable(name, c))
            THROW("tensor '%s' in '%s' has no place in this %s model (does config.json describe these weights?)",
                  name.c_str(), st.find(name)->file.c_str(), hf_class(k));
    return master;
}

// safetensors sources of an export (pointers into `master`)
inline std::vector<StSource> hf_sources(const ModelConfig& c, const ParamTable& P, HfKind k, const std::vector<float>& master) {
    if (master.size() != P.total) THROW("hf export: %zu weights for a model of %zu", master.size(), P.total);
    std::vector<StSource> src;
    for (const HfTensor& t : hf_tensors(c, P, k)) {
        src.push_back({t.name, t.shape, master.data() + t.offset});
        // transformers' NemotronH reads its own lm_head.weight even when tie_word_embeddings is
        // set: a tied model writes the embedding there too
        if (k == HfKind::NemotronH && c.tie_embeddings && t.offset == P.find("embedding").offset && t.vocab)
            src.push_back({"lm_head.weight", t.shape, master.data() + t.offset});
    }
    return src;
}

// ---- directories

// the imported config's name: the preset it equals (so --init-from and --model agree), else the directory's
inline std::string hf_config_name(const ModelConfig& c, const std::string& dir) {
    nlohmann::json mine = model_config_to_json(c);
    mine.erase("name");
    for (auto& [name, p] : model_presets()) {
        nlohmann::json theirs = model_config_to_json(model_preset(name));
        theirs.erase("name");
        if (mine == theirs) return name;
    }
    return std::filesystem::path(dir).filename().string().empty() ? std::filesystem::path(dir).parent_path().filename().string()
                                                                  : std::filesystem::path(dir).filename().string();
}

// A directory's config.json as an engine config (named), and its kind
inline ModelConfig hf_read_config(const std::string& dir, HfKind& kind) {
    const std::string path = dir + "/config.json";
    ModelConfig c = hf_config_from_json(read_py_json(path), path, kind);
    // transformers' NemotronH keeps (and saves) its own lm_head whatever tie_word_embeddings
    // says: a head in the weights that differs from the embedding is what the model computes
    // with, so the model is untied
    namespace fs = std::filesystem;
    if (c.tie_embeddings && (fs::exists(dir + "/model.safetensors") || fs::exists(dir + "/model.safetensors.index.json"))) {
        const SafetensorsModel st(dir);
        const StTensor* head = st.find("lm_head.weight");
        for (const char* name : {"backbone.embeddings.weight", "model.embeddings.weight", "backbone.embedding.weight",
                                 "model.embedding.weight", "model.embed_tokens.weight"}) {
            const StTensor* e = st.find(name);
            if (!head || !e) continue;
            if (e->dtype != head->dtype || e->bytes != head->bytes || std::memcmp(e->data, head->data, e->bytes) != 0) {
                printf("%s: lm_head.weight differs from %s although the config ties them: imported untied\n",
                       dir.c_str(), name);
                c.tie_embeddings = false;
            }
            break;
        }
    }
    c.name = hf_config_name(c, dir);
    return c;
}

// true for a directory that holds a model config.json (HF or mamba_ssm)
inline bool hf_is_model_dir(const std::string& path) {
    std::error_code ec;
    return std::filesystem::is_directory(path, ec) && std::filesystem::exists(path + "/config.json", ec);
}

// The model of an HF or mamba_ssm directory: its config (cfg) and fp32 weights in our buffer
// layout. Layout is ParamLayout (mamba.cuh), given by the caller so that this header needs no CUDA.
template <class Layout>
inline std::vector<float> hf_load(const std::string& dir, ModelConfig& cfg, HfKind* kind_out = nullptr) {
    HfKind kind;
    cfg = hf_read_config(dir, kind);
    const Layout L(cfg);
    const SafetensorsModel st(dir);
    if (kind_out) *kind_out = kind;
    return hf_read_weights(st, cfg, L, kind);
}

// the tokenizer files an HF directory holds (tokenizer.json, tokenizer.model: Tokenizer::load
// of the directory picks one), none if it has neither
inline std::vector<std::string> hf_tokenizer_files(const std::string& dir) {
    std::vector<std::string> files;
    for (const char* f : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"})
        if (std::filesystem::exists(dir + "/" + f)) files.push_back(f);
    if (files.empty() || files == std::vector<std::string>{"tokenizer_config.json"}) return {};
    return files;
}

// ---- tokenizer files of an export

// A Jinja chat template that renders a conversation as the engine's SFT template does:
// EOT, each turn as prefix + content + suffix, then the assistant prefix for generation.
inline std::string hf_chat_template(const sft::Template& t, const std::string& eot) {
    auto lit = [](const std::string& s) { return nlohmann::json(s).dump(); };  // a quoted, escaped literal
    std::string j = eot.empty() ? "" : "{{- " + lit(eot) + " -}}";
    if (!t.default_system.empty() && t.roles.count("system"))
        j += "{%- if messages[0]['role'] != 'system' -%}{{- " + lit(t.roles.at("system").first + t.default_system +
                                                                    t.roles.at("system").second) + " -}}{%- endif -%}";
    j += "{%- for message in messages -%}";
    bool first = true;
    for (auto& [role, ps] : t.roles) {
        j += std::string(first ? "{%- if" : "{%- elif") + " message['role'] == " + lit(role) + " -%}{{- " + lit(ps.first) +
             " + message['content'] + " + lit(ps.second) + " -}}";
        first = false;
    }
    j += "{%- endif -%}{%- endfor -%}";
    j += "{%- if add_generation_prompt -%}{{- " + lit(t.roles.at("assistant").first) + " -}}{%- endif -%}";
    return j;
}

// Writes the tokenizer files of `tokenizer_path` (anything Tokenizer::load reads): a byte-level
// BPE as tokenizer.json, a SentencePiece model as tokenizer.model (transformers converts it;
// the special tokens added after its pieces in added_tokens_decoder); tokenizer_config.json
// with the special tokens, and the chat template when `template_path` names the SFT
// template.json. Returns the ids config.json names.
inline HfSpecialIds hf_save_tokenizer(const std::string& dir, const std::string& tokenizer_path,
                                      const std::string& template_path, int model_vocab) {
    const Tokenizer tok = Tokenizer::load(tokenizer_path);
    if (tok.vocab_size() > model_vocab)
        THROW("tokenizer '%s' has %d tokens but the model's vocabulary is %d: ids past %d have no embedding",
              tokenizer_path.c_str(), tok.vocab_size(), model_vocab, model_vocab - 1);
    nlohmann::ordered_json tc = {{"clean_up_tokenization_spaces", false}, {"model_max_length", 1000000000}};
    HfSpecialIds ids;
    const int eot = tok.eot_token();
    const std::string eot_text = eot >= 0 ? tok.decode_token(eot) : "";
    if (tok.is_sentencepiece()) {
        const std::string proto = tok.sentencepiece_proto(), path = dir + "/tokenizer.model";
        FILE* f = fopen_or_throw(path, "wb");
        fwrite_or_throw(proto.data(), 1, proto.size(), f, path);
        if (fclose(f) != 0) THROW("cannot write '%s': %s", path.c_str(), std::strerror(errno));
        std::error_code ec;
        std::filesystem::remove(dir + "/tokenizer.json", ec);  // a stale one would be read first
        tc["tokenizer_class"] = "LlamaTokenizer";
        tc["add_bos_token"] = false;  // the engine's documents start with their end-of-text token, not <s>
        tc["add_eos_token"] = false;
        tc["legacy"] = true;          // every text piece encoded on its own, as here
        nlohmann::ordered_json added = nlohmann::ordered_json::object();
        for (auto& [content, id] : tok.special_tokens())
            added[std::to_string(id)] = {{"content", content}, {"lstrip", false}, {"normalized", false},
                                         {"rstrip", false}, {"single_word", false}, {"special", true}};
        tc["added_tokens_decoder"] = added;
        const int bos = tok.token_id("<s>"), unk = tok.token_id("<unk>");
        if (bos >= 0) { ids.bos = bos; tc["bos_token"] = "<s>"; }
        if (unk >= 0) tc["unk_token"] = "<unk>";
        if (eot >= 0) { ids.eos = ids.pad = eot; tc["eos_token"] = tc["pad_token"] = eot_text; }
    } else {
        tok.save_hf(dir + "/tokenizer.json");
        tc["tokenizer_class"] = "PreTrainedTokenizerFast";
        if (eot >= 0) {
            ids.bos = ids.eos = ids.pad = eot;
            tc["bos_token"] = tc["eos_token"] = tc["unk_token"] = tc["pad_token"] = eot_text;
        }
    }
    if (!template_path.empty()) {
        const sft::Template t = sft::load_template(template_path);
        tc["chat_template"] = hf_chat_template(t, eot_text);
        // generation ends at the template's stop token
        const int stop = tok.token_id(t.stop);
        if (stop >= 0) { ids.eos = stop; tc["eos_token"] = t.stop; }
    }
    std::ofstream f(dir + "/tokenizer_config.json");
    f << tc.dump(2) << "\n";
    if (!f) THROW("cannot write '%s/tokenizer_config.json'", dir.c_str());
    return ids;
}

struct HfSaveOptions {
    std::string tokenizer;          // tokenizer to export with the model ("" for none)
    std::string template_path;      // SFT template.json ("" for none; hf_save looks beside the tokenizer)
    Dtype dtype = Dtype::F32;       // of the safetensors (fp32 keeps the master weights exactly)
    size_t max_shard_bytes = 5000000000;  // transformers' default 5 GB
    std::string cls;                // class to export to ("" picks: hf_export_kind)
};

// Writes `dir` so that AutoModelForCausalLM.from_pretrained(dir) (and, with a tokenizer,
// AutoTokenizer.from_pretrained(dir)) loads the model: config.json, generation_config.json,
// safetensors weights, tokenizer files. Layout is ParamLayout (see hf_load).
template <class Layout>
inline HfKind hf_save(const std::string& dir, const ModelConfig& cfg, const std::vector<float>& master,
                      const HfSaveOptions& o = {}) {
    const HfKind k = o.cls.empty() ? hf_export_kind(cfg) : hf_kind_from_name(o.cls);
    hf_check_expressible(cfg, k);
    std::filesystem::create_directories(dir);
    HfSpecialIds ids;
    if (!o.tokenizer.empty()) {
        std::string tpl = o.template_path;
        if (tpl.empty()) {
            namespace fs = std::filesystem;
            const fs::path base = fs::is_directory(o.tokenizer) ? fs::path(o.tokenizer) : fs::path(o.tokenizer).parent_path();
            if (fs::exists(base / "template.json")) tpl = (base / "template.json").string();
        }
        ids = hf_save_tokenizer(dir, o.tokenizer, tpl, cfg.vocab_size);
    }
    const Layout L(cfg);
    safetensors_write_model(dir, hf_sources(cfg, L, k, master), o.dtype, o.max_shard_bytes, {{"format", "pt"}});
    std::ofstream f(dir + "/config.json");
    f << hf_config_to_json(cfg, k, o.dtype, ids).dump(2) << "\n";
    if (!f) THROW("cannot write '%s/config.json'", dir.c_str());
    nlohmann::ordered_json gen = nlohmann::ordered_json::object();
    if (ids.bos >= 0) gen["bos_token_id"] = ids.bos;
    if (ids.eos >= 0) gen["eos_token_id"] = ids.eos;
    if (ids.pad >= 0) gen["pad_token_id"] = ids.pad;
    std::ofstream g(dir + "/generation_config.json");
    g << gen.dump(2) << "\n";
    if (!g) THROW("cannot write '%s/generation_config.json'", dir.c_str());
    return k;
}
