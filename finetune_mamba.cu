// finetune_mamba: supervised fine-tuning of a train_mamba checkpoint (any layer pattern) on
// instruction shards with a loss mask (prepare_data sft), and generation with the chat
// template from a checkpoint (--generate). Run with --help for the flags; README.md
// ("Fine-tuning (SFT)") documents the workflow.
//
// The loss is the mean cross-entropy over the response tokens only (the mask's 1s; prompt
// targets are -1): sum over valid targets / their count in the optimizer step. If the
// checkpoint's vocabulary lacks the tokenizer's special tokens (<|im_start|>, <|im_end|>),
// the model is rebuilt with the larger vocabulary: every tensor copied by name, the new
// embedding and LM-head rows set to the mean of the existing rows (session.cuh, resize_vocab).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <unistd.h>
#include <vector>
#include "mamba.cuh"
#include "optim.cuh"
#include "dataloader.h"
#include "tokenizer.h"
#include "checkpoint.cuh"
#include "session.cuh"
#include "data/sft.h"

struct Args {
    std::string init;  // empty: "checkpoints" (fine-tuning) or "checkpoints_sft" (--generate)
    std::string train_data = "data/sft/sft_train_*.bin", val_data = "data/sft/sft_val_*.bin";
    std::string tokenizer = "data/sft/tokenizer.json";
    std::string tmpl;  // empty: template.json beside the tokenizer, else chatml
    std::string system;
    int B = 8, T = 256;
    long total_batch = 0;
    int steps = 300;
    double epochs = 0;  // > 0: steps from the training set's size
    float lr = 5e-4f, min_lr = 5e-5f;
    long warmup = 20;
    float weight_decay = 0.0f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, grad_clip = 1.0f;
    uint64_t seed = 1337;
    int val_every = 50, val_batches = 0;
    std::string ckpt_dir = "checkpoints_sft";
    int ckpt_every = 0;
    std::vector<std::string> sample_prompts;
    std::vector<std::string> generate;
    bool greedy = false;
    float temperature = 0.7f, top_p = 0.9f;
    int max_new = 64;
};

static void usage() {
    printf(
        "usage: finetune_mamba [flags]                     fine-tune a checkpoint on SFT shards\n"
        "       finetune_mamba --generate PROMPT [flags]   answer a prompt with the chat template\n"
        "model and data:\n"
        "  --init PATH             train_mamba or finetune_mamba checkpoint, file or directory (its latest)\n"
        "                          (default checkpoints; with --generate checkpoints_sft)\n"
        "  --train-data GLOB       shards with .mask files (default data/sft/sft_train_*.bin)\n"
        "  --val-data GLOB         (default data/sft/sft_val_*.bin)\n"
        "  --tokenizer PATH        the tokenizer prepare_data sft wrote (default data/sft/tokenizer.json)\n"
        "  --template NAME|FILE    chatml | alpaca | FILE.json (default: template.json beside the\n"
        "                          tokenizer, else chatml); --system TEXT: a system turn for --generate\n"
        "batch and schedule:\n"
        "  -B, --batch-size N      micro-batch sequences (default 8)\n"
        "  -T, --seq-len N         sequence length (default 256; the --seq-len of prepare_data sft)\n"
        "  --total-batch N         tokens per optimizer step, a multiple of B*T (default B*T)\n"
        "  --steps N               optimizer steps (default 300)\n"
        "  --epochs F              instead of --steps: F passes over the training set\n"
        "  --lr F --min-lr F       peak and final learning rate, cosine (default 5e-4, 5e-5)\n"
        "  --warmup N              warmup steps (default 20)\n"
        "  --weight-decay F        (default 0) --beta1 F --beta2 F --eps F --grad-clip F (default 1)\n"
        "run:\n"
        "  --seed N                data order and sampling (default 1337)\n"
        "  --val-every N           masked validation loss every N steps (default 50; 0 = none)\n"
        "  --val-batches N         batches per evaluation (default 0 = the whole validation set)\n"
        "  --sample-prompt P       with each evaluation, the greedy answer to P (repeatable)\n"
        "  --ckpt-dir DIR          checkpoints (default checkpoints_sft)\n"
        "  --ckpt-every N          also every N steps (default 0: only at the end)\n"
        "generation:\n"
        "  --generate PROMPT       the user turn (repeatable); prints the model's response\n"
        "  --greedy                argmax decoding (default: sampling)\n"
        "  --temperature F         (default 0.7) --top-p F (nucleus, default 0.9)\n"
        "  --max-new N             at most N new tokens (default 64); stops at the template's stop token\n");
}

static Args parse_args(int argc, char** argv) {
    Args a;
    for (int i = 1; i < argc; i++) {
        std::string f = argv[i];
        if (f == "--help" || f == "-h") { usage(); exit(0); }
        if (f == "--greedy") { a.greedy = true; continue; }
        if (i + 1 >= argc) THROW("flag '%s' needs a value (see --help)", f.c_str());
        std::string v = argv[++i];
        auto to_long = [&] { return flag_long(f, v); };
        auto to_float = [&] { return flag_double(f, v); };
        if (f == "--init") a.init = v;
        else if (f == "--train-data") a.train_data = v;
        else if (f == "--val-data") a.val_data = v;
        else if (f == "--tokenizer") a.tokenizer = v;
        else if (f == "--template") a.tmpl = v;
        else if (f == "--system") a.system = v;
        else if (f == "-B" || f == "--batch-size") a.B = (int)to_long();
        else if (f == "-T" || f == "--seq-len") a.T = (int)to_long();
        else if (f == "--total-batch") a.total_batch = to_long();
        else if (f == "--steps") a.steps = (int)to_long();
        else if (f == "--epochs") a.epochs = to_float();
        else if (f == "--lr") a.lr = (float)to_float();
        else if (f == "--min-lr") a.min_lr = (float)to_float();
        else if (f == "--warmup") a.warmup = to_long();
        else if (f == "--weight-decay") a.weight_decay = (float)to_float();
        else if (f == "--beta1") a.beta1 = (float)to_float();
        else if (f == "--beta2") a.beta2 = (float)to_float();
        else if (f == "--eps") a.eps = (float)to_float();
        else if (f == "--grad-clip") a.grad_clip = (float)to_float();
        else if (f == "--seed") a.seed = (uint64_t)to_long();
        else if (f == "--val-every") a.val_every = (int)to_long();
        else if (f == "--val-batches") a.val_batches = (int)to_long();
        else if (f == "--sample-prompt") a.sample_prompts.push_back(v);
        else if (f == "--ckpt-dir") a.ckpt_dir = v;
        else if (f == "--ckpt-every") a.ckpt_every = (int)to_long();
        else if (f == "--generate") a.generate.push_back(v);
        else if (f == "--temperature") a.temperature = (float)to_float();
        else if (f == "--top-p") a.top_p = (float)to_float();
        else if (f == "--max-new") a.max_new = (int)to_long();
        else THROW("unknown flag '%s' (see --help)", f.c_str());
    }
    if (a.B <= 0 || a.T <= 0) THROW("batch size and sequence length must be positive (B %d, T %d)", a.B, a.T);
    if (a.steps <= 0) THROW("--steps must be positive, got %d", a.steps);
    if (a.epochs < 0) THROW("--epochs must be positive, got %g", a.epochs);
    if (a.val_batches < 0) THROW("--val-batches must be >= 0, got %d", a.val_batches);
    if (a.max_new <= 0) THROW("--max-new must be positive, got %d", a.max_new);
    if (a.temperature < 0 || a.top_p <= 0 || a.top_p > 1)
        THROW("--temperature must be >= 0 and --top-p in (0, 1] (got %g, %g)", a.temperature, a.top_p);
    if (a.total_batch == 0) a.total_batch = (long)a.B * a.T;
    if (a.total_batch % ((long)a.B * a.T) != 0)
        THROW("--total-batch %ld is not a multiple of B*T = %d*%d = %ld", a.total_batch, a.B, a.T, (long)a.B * a.T);
    if (a.init.empty()) a.init = a.generate.empty() ? "checkpoints" : "checkpoints_sft";
    return a;
}

// ModelConfig from a checkpoint header's "config" (model_config_to_json's keys)
static ModelConfig config_from_json(const nlohmann::json& j, const std::string& ckpt) {
    ModelConfig c = model_config_from_json(j, ckpt);
    if (model_config_to_json(c) != j)
        THROW("checkpoint '%s': its config %s does not round-trip (%s)", ckpt.c_str(), j.dump().c_str(),
              model_config_to_json(c).dump().c_str());
    return c;
}

// The model config and fp32 master weights of a checkpoint (its optimizer state is not
// used: fine-tuning starts AdamW afresh).
static std::vector<float> load_checkpoint_weights(const std::string& path, ModelConfig& cfg, int& step) {
    FILE* f = nullptr;
    nlohmann::json h = checkpoint_header(path, &f);
    std::vector<float> master;
    try {
        cfg = config_from_json(h.at("config"), path);
        const size_t n = h.at("num_params").get<size_t>(), skip = h.at("loader_state_bytes").get<size_t>();
        ParamLayout layout(cfg);
        if (n != layout.total) THROW("checkpoint '%s' holds %zu parameters, its config gives %zu", path.c_str(), n, layout.total);
        step = h.at("step").get<int>();
        std::vector<char> loader(skip);
        if (skip) fread_or_throw(loader.data(), 1, skip, f, path);
        master.resize(n);
        fread_or_throw(master.data(), sizeof(float), n, f, path);
    } catch (const nlohmann::json::exception& e) {
        fclose(f);
        THROW("checkpoint '%s' has a corrupt header: %s", path.c_str(), e.what());
    } catch (...) {
        fclose(f);
        throw;
    }
    fclose(f);
    return master;
}

// Loads --init; grows the vocabulary to the tokenizer's if it is smaller.
static std::vector<float> load_model_weights(const Args& a, const Tokenizer& tok, ModelConfig& cfg) {
    const std::string path = checkpoint_resolve(a.init);
    int step = 0;
    std::vector<float> master = load_checkpoint_weights(path, cfg, step);
    printf("loaded %s: %s, pattern %s, step %d, vocabulary %d\n", path.c_str(), cfg.name.c_str(), cfg.pattern.c_str(),
           step, cfg.vocab_size);
    if (cfg.vocab_size < tok.vocab_size()) {
        ModelConfig grown = cfg;
        grown.vocab_size = tok.vocab_size();
        grown.finalize();
        master = resize_vocab(master, cfg, grown);
        printf("vocabulary grown %d -> %d for the special tokens (new embedding and LM-head rows = mean of the "
               "existing rows):", cfg.vocab_size, grown.vocab_size);
        for (int id = cfg.vocab_size; id < grown.vocab_size; id++) printf(" %s %d", tok.decode_token(id).c_str(), id);
        printf("\n");
        cfg = grown;
    }
    return master;
}

static sft::Template load_template(const Args& a) {
    std::string t = a.tmpl;
    if (t.empty()) {
        namespace fs = std::filesystem;
        fs::path dir = fs::is_directory(a.tokenizer) ? fs::path(a.tokenizer) : fs::path(a.tokenizer).parent_path();
        fs::path beside = dir / "template.json";
        t = fs::exists(beside) ? beside.string() : "chatml";
    }
    sft::Template tmpl = sft::load_template(t);
    if (!a.system.empty()) tmpl.default_system = a.system;
    return tmpl;
}

// the response to one user prompt, without its stop token; `stopped`: the stop token came
static std::string respond(Model& model, const Tokenizer& tok, const sft::Template& tmpl, const std::string& prompt,
                           int max_new, const Sampling& s, SplitMix64& rng, bool* stopped = nullptr) {
    const int stop = tok.token_id(tmpl.stop), eot = tok.eot_token();
    std::vector<uint32_t> p = sft::render_prompt({{"user", prompt}}, tmpl, tok);
    std::vector<uint32_t> out = generate(model, p, max_new, s, {stop, eot}, rng, eot);
    bool st = !out.empty() && ((int)out.back() == stop || (int)out.back() == eot);
    if (st) out.pop_back();
    if (stopped) *stopped = st;
    return tok.decode(out);
}

static int run_generate(const Args& a, const Tokenizer& tok, const sft::Template& tmpl) {
    ModelConfig cfg;
    std::vector<float> master = load_model_weights(a, tok, cfg);
    matmul_init();
    Model model(cfg);
    model.set_master(master);
    size_t longest = 0;
    for (auto& g : a.generate) longest = std::max(longest, sft::render_prompt({{"user", g}}, tmpl, tok).size());
    model.allocate(1, (int)ceil_div(longest + a.max_new, 16) * 16);
    Sampling s;
    s.greedy = a.greedy;
    s.temperature = a.temperature;
    s.top_p = a.top_p;
    SplitMix64 rng(a.seed);
    printf("template %s; %s\n", tmpl.name.c_str(),
           a.greedy ? "greedy" : strformat("temperature %g, top-p %g", a.temperature, a.top_p).c_str());
    for (auto& g : a.generate) {
        bool stopped = false;
        std::string r = respond(model, tok, tmpl, g, a.max_new, s, rng, &stopped);
        printf("user: %s\nassistant: %s%s\n", g.c_str(), r.c_str(), stopped ? "" : " [--max-new reached]");
        fflush(stdout);
    }
    return 0;
}

static void print_sft_eval(Model& model, DataLoader& val, int batches, size_t samples, int step) {
    EvalResult e = evaluate(model, val, batches, samples);
    printf("step %5d | val loss %.4f (masked: %ld response tokens) | top-1 %.2f%% | top-5 %.2f%%\n", step, e.loss,
           e.valid, 100 * e.top1, 100 * e.top5);
    fflush(stdout);
}

static int run(const Args& a) {
    Tokenizer tok = Tokenizer::load(a.tokenizer);
    sft::Template tmpl = load_template(a);
    sft::add_template_specials(tok, tmpl);
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) THROW("no CUDA GPU found");
    if (!a.generate.empty()) return run_generate(a, tok, tmpl);

    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs, %.1f GiB\n", prop.name, prop.multiProcessorCount, prop.totalGlobalMem / double(1 << 30));
    ModelConfig cfg;
    std::vector<float> master = load_model_weights(a, tok, cfg);
    matmul_init();
    Model model(cfg);
    model.set_master(master);
    model.allocate(a.B, a.T);
    const ParamLayout& layout = model.layout;

    const int eot = tok.eot_token();
    DataLoader train(a.train_data, a.B, a.T, 0, 1, a.seed, true, cfg.vocab_size, eot);
    DataLoader val(a.val_data, a.B, a.T, 0, 1, a.seed, false, cfg.vocab_size, eot);
    const int accum = (int)(a.total_batch / ((long)a.B * a.T));
    const long tokens_per_step = a.total_batch;
    const int steps = a.epochs > 0 ? (int)std::max(1.0, std::ceil(a.epochs * train.samples_per_rank() / ((double)a.B * accum)))
                                   : a.steps;
    const int val_batches = a.val_batches > 0 ? a.val_batches : (int)std::max<size_t>(1, ceil_div(val.samples_per_rank(), a.B));
    printf("data: train %zu tokens (%zu samples of T=%d), val %zu tokens (%zu samples, %d batches per evaluation)\n",
           train.num_tokens(), train.num_samples(), a.T, val.num_tokens(), val.num_samples(), val_batches);

    AdamWConfig ocfg;
    ocfg.beta1 = a.beta1; ocfg.beta2 = a.beta2; ocfg.eps = a.eps; ocfg.weight_decay = a.weight_decay;
    ocfg.grad_clip = a.grad_clip;
    AdamW opt(adamw_tensors(layout, false), 0, layout.total, ocfg);
    LRSchedule sched = LRSchedule::cosine(a.lr, a.min_lr, std::min<long>(a.warmup, steps), steps);
    printf("fine-tuning: %d steps of %ld tokens (B=%d T=%d accum=%d%s), schedule %s\n", steps, tokens_per_step, a.B,
           a.T, accum, a.epochs > 0 ? strformat(", %g epochs", a.epochs).c_str() : "", sched.describe().c_str());
    const double peak = peak_flops(prop), fpt = flops_per_token(cfg, a.T);
    Sampling greedy;
    greedy.greedy = true;
    SplitMix64 rng(a.seed);
    auto eval_and_sample = [&](int step) {
        print_sft_eval(model, val, val_batches, a.val_batches > 0 ? 0 : val.samples_per_rank(), step);
        for (auto& p : a.sample_prompts) {
            std::string r = respond(model, tok, tmpl, p, 48, greedy, rng);
            for (size_t k; (k = r.find('\n')) != std::string::npos;) r.replace(k, 1, "\\n");
            printf("sample: %s -> %s\n", p.c_str(), r.c_str());
        }
        fflush(stdout);
    };

    std::vector<int> inputs((size_t)accum * a.B * a.T), targets(inputs.size());
    for (int step = 0; step < steps; step++) {
        const bool last = step == steps - 1;
        if (a.val_every > 0 && step % a.val_every == 0) eval_and_sample(step);
        auto t0 = std::chrono::steady_clock::now();
        long valid = 0;
        for (int m = 0; m < accum; m++) {
            train.next_batch();
            size_t off = (size_t)m * a.B * a.T;
            std::copy(train.inputs(), train.inputs() + a.B * a.T, inputs.begin() + off);
            std::copy(train.targets(), train.targets() + a.B * a.T, targets.begin() + off);
        }
        for (int t : targets) valid += t >= 0;
        const long units = step + 1;
        const float lr = (float)sched.at(units);
        if (valid == 0) {
            printf("step %5d | no response token in the batch: skipped\n", step + 1);
        } else {
            model.zero_grad();
            for (int m = 0; m < accum; m++) {
                size_t off = (size_t)m * a.B * a.T;
                model.forward(inputs.data() + off, targets.data() + off, nullptr, 1.0f / valid, 0.0f);
                model.backward();
            }
            const double loss = model.loss_sum() / valid;
            float* norm2 = opt.grad_norm_squared(model.grads, layout.total, 0);
            opt.step(model.master, model.params, model.grads, norm2, lr, step + 1, 0);
            float h_norm2;
            cudaCheck(cudaMemcpy(&h_norm2, norm2, sizeof(float), cudaMemcpyDeviceToHost));
            double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            double tps = tokens_per_step / dt;
            printf("step %5d | loss %.4f (%ld response tokens) | lr %.2e | norm %.3f | %.1f ms | %.0f tok/s | MFU %.1f%%\n",
                   step + 1, loss, valid, lr, std::sqrt(h_norm2), dt * 1e3, tps,
                   peak > 0 ? 100.0 * fpt * tps / peak : 0.0);
            fflush(stdout);
        }
        if ((a.ckpt_every > 0 && (step + 1) % a.ckpt_every == 0) || last) {
            TrainState st;
            st.step = step + 1;
            st.tokens = (long)(step + 1) * tokens_per_step;
            st.loader = train.state();
            std::string path = checkpoint_save(a.ckpt_dir, st, model, opt, cfg);
            printf("checkpoint: %s\n", path.c_str());
        }
    }
    if (a.val_every > 0) eval_and_sample(steps);
    printf("model config for train_mamba --resume: %s\n", model_config_to_json(cfg).dump().c_str());
    return 0;
}

int main(int argc, char** argv) {
    try {
        return run(parse_args(argc, argv));
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
