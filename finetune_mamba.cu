// finetune_mamba: supervised fine-tuning of a train_mamba checkpoint (any layer pattern) on
// instruction shards with a loss mask (prepare_data sft), on one GPU or many (mpirun), and
// generation with the chat template from a checkpoint (--generate). Run with --help for the
// flags; README.md ("Fine-tuning (SFT)") documents the workflow.
//
// The loss is the mean cross-entropy over the response tokens only (the mask's 1s; prompt
// targets are -1): sum over valid targets / their count in the optimizer step. Examples are
// packed back to back, each its own document: nothing flows from one into the next. Each step goes
// through the Trainer of train_mamba (trainer.cuh): AdamW or Muon + AdamW, ZeRO-2 over the
// ranks. If the checkpoint's vocabulary lacks the tokenizer's special tokens (<|im_start|>,
// <|im_end|>), the model is rebuilt with the larger vocabulary: every tensor copied by name,
// the new embedding and LM-head rows set to the mean of the existing rows (session.cuh).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>
#include "flags.h"
#include "schedule.h"
#include "metrics.h"
#include "mamba.cuh"
#include "trainer.cuh"
#include "dataloader.h"
#include "tokenizer.h"
#include "checkpoint.cuh"
#include "comm_nccl.cuh"
#include "session.cuh"
#include "data/sft.h"
#include "hf.h"

struct Args {
    std::string init;  // empty: "checkpoints" (fine-tuning) or "checkpoints_sft" (--generate)
    std::string init_from;  // a Hugging Face / mamba_ssm directory instead (hf.h)
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
    OptimArgs opt;
    uint64_t seed = 1337;
    int val_every = 50, val_batches = 0;
    std::string ckpt_dir = "checkpoints_sft";
    int ckpt_every = 0;
    std::vector<std::string> sample_prompts;
    std::vector<std::string> generate;
    bool greedy = false, dry_run = false, profile = false;
    float temperature = 0.7f, top_p = 0.9f;
    int max_new = 64;
};

static Args parse_args(int argc, char** argv) {
    Args a;
    a.opt.weight_decay = 0.0f;  // fine-tuning's default
    Flags f("usage: finetune_mamba [flags]                     fine-tune a checkpoint on SFT shards\n"
            "       finetune_mamba --generate PROMPT [flags]   answer a prompt with the chat template");
    f.section("model and data:");
    f.add({"--init"}, &a.init, "PATH",
          "train_mamba or finetune_mamba checkpoint, file or directory (its latest)\n(default checkpoints; with "
          "--generate checkpoints_sft)");
    f.add({"--init-from"}, &a.init_from, "DIR", "a Hugging Face or mamba_ssm model directory instead of --init");
    f.add({"--train-data"}, &a.train_data, "GLOB", "shards with .mask files");
    f.add({"--val-data"}, &a.val_data, "GLOB", "validation shards");
    f.add({"--tokenizer"}, &a.tokenizer, "PATH", "the tokenizer prepare_data sft wrote");
    f.add({"--template"}, &a.tmpl, "NAME|FILE",
          "chatml | alpaca | FILE.json (default: template.json beside the\ntokenizer, else chatml)");
    f.add({"--system"}, &a.system, "TEXT", "a system turn for --generate");
    f.section("batch and schedule:");
    f.add({"-B", "--batch-size"}, &a.B, "N", "micro-batch sequences", Range::at_least(1));
    f.add({"-T", "--seq-len"}, &a.T, "N", "sequence length (the --seq-len of prepare_data sft)", Range::at_least(1));
    f.add({"--total-batch"}, &a.total_batch, "N", "tokens per optimizer step, a multiple of B*T*ranks (default B*T*ranks)",
          Range::at_least(1));
    f.add({"--steps"}, &a.steps, "N", "optimizer steps", Range::at_least(1));
    f.add({"--epochs"}, &a.epochs, "F", "instead of --steps: F passes over the training set", Range::above(0));
    f.add({"--lr"}, &a.lr, "F", "peak learning rate, cosine", Range::above(0));
    f.add({"--min-lr"}, &a.min_lr, "F", "final learning rate", Range::at_least(0));
    f.add({"--warmup"}, &a.warmup, "N", "warmup steps", Range::at_least(0));
    add_optimizer_flags(f, a.opt);
    f.section("run:");
    f.add({"--seed"}, &a.seed, "N", "data order and sampling");
    f.add({"--val-every"}, &a.val_every, "N", "masked validation loss every N steps (0: none)", Range::at_least(0));
    f.add({"--val-batches"}, &a.val_batches, "N", "batches per evaluation (default: the whole validation set)",
          Range::at_least(1));
    f.repeat({"--sample-prompt"}, &a.sample_prompts, "P", "with each evaluation, the greedy answer to P (repeatable)");
    f.add({"--ckpt-dir"}, &a.ckpt_dir, "DIR", "checkpoints and the metrics log (metrics.jsonl)");
    f.add({"--ckpt-every"}, &a.ckpt_every, "N", "also every N steps (default 0: only at the end)", Range::at_least(0));
    f.flag({"--profile"}, &a.profile,
           "time of each phase (kernel family) per step from the 4th, printed at the end\n(each kernel launched by "
           "the host: slower steps)");
    f.flag({"--dry-run"}, &a.dry_run, "check the flags, checkpoint, tokenizer, template and data; no GPU");
    f.section("generation:");
    f.repeat({"--generate"}, &a.generate, "PROMPT", "the user turn (repeatable); prints the model's response");
    f.flag({"--greedy"}, &a.greedy, "argmax decoding (default: sampling)");
    f.add({"--temperature"}, &a.temperature, "F", "sampling temperature", Range::above(0));
    f.add({"--top-p"}, &a.top_p, "F", "nucleus sampling", Range{0, 1, true, false});
    f.add({"--max-new"}, &a.max_new, "N", "at most N new tokens; stops at the template's stop token", Range::at_least(1));
    std::vector<std::string> rest = f.parse(argc, argv);
    if (!rest.empty()) THROW("unexpected argument '%s' (see --help)", rest[0].c_str());
    if (f.given("--init") && f.given("--init-from")) THROW("--init and --init-from both name the model: give one");
    if (f.given("--epochs") && f.given("--steps")) THROW("--epochs and --steps both set the length: give one");
    if (!f.given("--val-batches")) a.val_batches = 0;
    if ((long)a.B * a.T > (1L << 24)) THROW("B*T = %ld tokens per micro-batch is more than 2^24", (long)a.B * a.T);
    if (a.init.empty()) a.init = a.generate.empty() ? "checkpoints" : "checkpoints_sft";
    return a;
}

// Loads --init (or --init-from); grows the vocabulary to the tokenizer's if it is smaller.
static std::vector<float> load_model_weights(const Args& a, const Tokenizer& tok, ModelConfig& cfg) {
    const std::string path = a.init_from.empty() ? checkpoint_resolve(a.init) : a.init_from;
    int step = 0;
    std::vector<float> master = a.init_from.empty() ? checkpoint_weights(path, cfg, step) : hf_load<ParamLayout>(path, cfg);
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

static int run_generate(const Args& a, const Tokenizer& tok, const sft::Template& tmpl, const ModelConfig& cfg,
                        const std::vector<float>& master) {
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

static int run(const Args& a, Comm& comm) {
    // everything that needs no GPU first
    Tokenizer tok = Tokenizer::load(a.tokenizer);
    sft::Template tmpl = load_template(a);
    sft::add_template_specials(tok, tmpl);
    ModelConfig cfg;
    std::vector<float> master = load_model_weights(a, tok, cfg);
    if (!a.generate.empty()) {
        if (a.dry_run) { printf("dry run: every check passed\n"); return 0; }
        int ndev = 0;
        if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) THROW("no CUDA GPU found");
        return comm.root() ? run_generate(a, tok, tmpl, cfg, master) : 0;
    }
    const int eot = tok.eot_token();
    DataLoader train(a.train_data, a.B, a.T, comm.rank, comm.world, a.seed, true, cfg.vocab_size, eot);
    DataLoader val(a.val_data, a.B, a.T, comm.rank, comm.world, a.seed, false, cfg.vocab_size, eot);
    const long micro_tokens = (long)a.B * a.T * comm.world;
    const long tokens_per_step = a.total_batch > 0 ? a.total_batch : micro_tokens;
    if (tokens_per_step % micro_tokens != 0)
        THROW("--total-batch %ld is not a multiple of B*T*ranks = %d*%d*%d = %ld", tokens_per_step, a.B, a.T, comm.world,
              micro_tokens);
    const int accum = (int)(tokens_per_step / micro_tokens);
    const int steps = a.epochs > 0 ? (int)std::max(1.0, std::ceil(a.epochs * train.samples_per_rank() / ((double)a.B * accum)))
                                   : a.steps;
    const int val_batches = a.val_batches > 0 ? a.val_batches : (int)std::max<size_t>(1, ceil_div(val.samples_per_rank(), a.B));
    const LRSchedule sched = LRSchedule::cosine(a.lr, a.min_lr, std::min<long>(a.warmup, steps), steps);
    printf("data: train %zu tokens (%zu samples of T=%d), val %zu tokens (%zu samples, %d batches per evaluation)\n",
           train.num_tokens(), train.num_samples(), a.T, val.num_tokens(), val.num_samples(), val_batches);
    printf("fine-tuning: %d steps of %ld tokens (B=%d T=%d accum=%d%s), schedule %s, %s\n", steps, tokens_per_step, a.B,
           a.T, accum, a.epochs > 0 ? strformat(", %g epochs", a.epochs).c_str() : "", sched.describe().c_str(),
           a.opt.optimizer == "muon" ? "Muon + AdamW" : "AdamW");
    if (a.dry_run) { printf("dry run: every check passed\n"); return 0; }

    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) THROW("no CUDA GPU found (use --dry-run without one)");
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, comm.local_rank));
    printf("device: %s, %d SMs, %.1f GiB%s\n", prop.name, prop.multiProcessorCount,
           prop.totalGlobalMem / double(1 << 30), comm.multi() ? strformat("; %d ranks", comm.world).c_str() : "");
    matmul_init();
    Model model(cfg, comm.world, comm.rank, a.opt.bucket_elems());
    model.set_master(master);
    model.allocate(a.B, a.T);
    Trainer trainer(model, comm, a.opt, a.lr);
    const double peak = peak_flops(prop) * comm.world, fpt = flops_per_token(cfg, a.T);
    MetricsLog metrics;
    if (comm.root()) metrics.open(a.ckpt_dir, -1);
    Sampling greedy;
    greedy.greedy = true;
    SplitMix64 rng(a.seed);
    auto eval_and_sample = [&](int step) {
        const EvalResult e = combine_eval(evaluate(model, val, val_batches, a.val_batches > 0 ? 0 : val.samples_per_rank(), true),
                                          [&](double v) { return comm.sum(v); });
        printf("step %5d | val loss %.4f (masked: %ld response tokens) | top-1 %.2f%% | top-5 %.2f%%\n", step, e.loss,
               e.valid, 100 * e.top1, 100 * e.top5);
        metrics.write({{"step", step}, {"val_loss", e.loss}, {"top1", e.top1}, {"top5", e.top5}});
        for (auto& p : a.sample_prompts) {
            if (!comm.root()) break;
            std::string r = respond(model, tok, tmpl, p, 48, greedy, rng);
            for (size_t k; (k = r.find('\n')) != std::string::npos;) r.replace(k, 1, "\\n");
            printf("sample: %s -> %s\n", p.c_str(), r.c_str());
        }
        fflush(stdout);
    };

    const size_t local = (size_t)a.B * a.T;
    std::vector<int> inputs((size_t)accum * local), targets(inputs.size()), pos(inputs.size());
    // a step's micro-batches into the host arrays, and their count of response tokens (over every rank)
    auto draw = [&] {
        for (int m = 0; m < accum; m++) {
            train.next_batch();
            std::copy(train.inputs(), train.inputs() + local, inputs.begin() + m * local);
            std::copy(train.targets(), train.targets() + local, targets.begin() + m * local);
            std::copy(train.pos_in_doc(), train.pos_in_doc() + local, pos.begin() + m * local);
        }
        return trainer.count_valid(targets.data(), targets.size());
    };
    // A step's line and metrics once its results are read. Steps stay in flight (not with --profile): step k is
    // read after step k + 1 is launched, so the host draws and uploads the next batch and launches it while the
    // GPU runs this one, and the GPU does not wait for the host between steps. A step's time is the GPU's, from
    // the end of the step before it (Trainer::StepResult).
    struct Launched { int step; long valid; float lr; };
    std::optional<Launched> pending;  // kept in flight, not read yet
    auto report = [&](const Launched& l, const Trainer::StepResult& r) {
        const double dt = r.ms / 1e3, tps = tokens_per_step / dt, mfu = peak > 0 ? 100.0 * fpt * tps / peak : 0.0;
        printf("step %5d | loss %.4f (%ld response tokens) | lr %.2e | norm %.3f | %.1f ms | %.0f tok/s | MFU %.1f%%\n",
               l.step, r.loss, l.valid, l.lr, r.norm, dt * 1e3, tps, mfu);
        fflush(stdout);
        metrics.write({{"step", l.step}, {"tokens", (long)l.step * tokens_per_step}, {"loss", r.loss}, {"lr", l.lr},
                       {"grad_norm", r.norm}, {"ms", dt * 1e3}, {"tokens_per_s", tps}, {"mfu", mfu},
                       {"response_tokens", l.valid}});
    };
    auto drain = [&] {  // before what reads the weights or prints out of turn
        if (pending) report(*pending, trainer.finish_previous());
        pending.reset();
    };
    long valid = draw();
    PhaseTimer timer;
    for (int step = 0; step < steps; step++) {
        const bool last = step == steps - 1;
        if (a.val_every > 0 && step % a.val_every == 0) {
            drain();
            eval_and_sample(step);
        }
        model.timer = a.profile && step >= 3 ? &timer : nullptr;  // the step only, not the evaluation
        const float lr = (float)sched.at(step + 1);
        const long step_valid = valid;
        if (step_valid > 0) {
            trainer.accumulate({inputs.data(), targets.data(), nullptr, pos.data()}, accum, step_valid, 0.0f);
            trainer.update(lr, step + 1);
        }
        model.timer = nullptr;
        const DataLoader::State resume_at = train.state();  // before the next step's batch: where a resume goes on
        if (!last) valid = draw();
        const Launched now{step + 1, step_valid, lr};
        if (step_valid == 0) {
            drain();
            printf("step %5d | no response token in the batch: skipped\n", step + 1);
        } else if (!a.profile) {
            if (pending) report(*pending, trainer.finish_previous());
            trainer.keep_in_flight();
            pending = now;
        } else {
            const Trainer::StepResult r = trainer.finish();
            if (step >= 3) {
                timer.mark("end", 0);
                timer.collect();
            }
            report(now, r);
        }
        if ((a.ckpt_every > 0 && (step + 1) % a.ckpt_every == 0) || last) {
            drain();
            TrainState st;
            st.step = step + 1;
            st.tokens = (long)(step + 1) * tokens_per_step;
            st.loader = resume_at;
            printf("checkpoint: %s\n", trainer.save(a.ckpt_dir, st).c_str());
        }
    }
    timer.print();  // (--profile; skipped steps left out)
    if (a.val_every > 0) eval_and_sample(steps);
    printf("model config for train_mamba --resume: %s\n", model_config_to_json(cfg).dump().c_str());
    return 0;
}

int main(int argc, char** argv) { return main_on_ranks(argc, argv, parse_args, run); }
