// ZeRO on one GPU, through simulated ranks (comm_sim.cuh): the real Trainer, Model and
// checkpoint code with N = 2, 3, 4 ranks, each rank a thread with its own master shard,
// gradient buckets and shard, optimizer state and reduction stream. N ranks give the one-rank
// run's losses over 10 steps (AdamW and Muon, gradient accumulation, --recompute, tied
// embeddings) within multi_gpu.sh's 1%, and its first step's loss and gradient norm to
// rounding; bucket sizes and reruns give the same bits; a dropped step (the spike guard's
// discard) leaves no trace; N ranks resume bit for bit from their files, whose weights
// checkpoint_weights gathers; each rank allocates exactly what zero.h's plan says. One rank's
// micro-batches replayed as a captured CUDA graph give the bits of the eager launches.
#include <catch2/catch.hpp>
#include <cmath>
#include "test/test_util.h"
#include "trainer.cuh"
#include "comm_sim.cuh"

namespace gpu_test_zero {  // this file's helpers: all test files link into one binary (same-named types would clash)

static const std::string kDir = "/tmp/mamba_zero_test";
static const int kB = 2, kT = 64;

// Mamba-2, attention and MLP blocks (test/pytorch_ref.py's hybrid_tiny)
static ModelConfig hybrid(bool tied) {
    ModelConfig c;
    c.vocab_size = 500; c.d_model = 128; c.n_layer = 6; c.pattern = "M*+M+*"; c.ssm = "mamba2"; c.d_state = 64;
    c.headdim = 32; c.ngroups = 2; c.chunk_size = 64; c.n_heads = 4; c.n_kv_heads = 2; c.attn_head_dim = 64;
    c.mlp = "gelu"; c.d_ff = 256; c.tie_embeddings = tied;
    c.finalize();
    return c;
}

struct Setup {
    ModelConfig cfg = hybrid(false);
    std::string optimizer = "adamw";
    bool recompute = false;
    int micro = 12;             // micro-batches of kB x kT per step, over all ranks (1, 2, 3 and 4 divide it)
    double bucket_mb = 32;
    int steps = 10;
    std::string save_dir;       // checkpoints every save_every steps
    int save_every = 0;
    std::string resume;
    int discard_at = 0;         // this step first runs a corrupt batch that is dropped (Trainer::discard)
    bool eager = false;         // --eager: no CUDA graph (one rank)
    bool documents = false;     // loss weights and document positions with the batches
    bool in_flight = false;     // each step read after the next is launched (finetune_mamba's loop)
};

struct RunResult {
    std::vector<double> losses;
    std::vector<float> norms, master;       // master: the ranks' shards end to end
    std::vector<size_t> model_bytes, activation_bytes, trainer_bytes;  // what each rank allocated
    double discarded_loss = 0;              // the dropped step's loss, read before its discard
};

// step s's micro-batch m: counting modulo 50 from random starts (learnable), every 13th target masked
static void micro_batch(int step, int m, bool corrupt, int V, int* inputs, int* targets) {
    SplitMix64 rng(1000003ull * step + 7919ull * m + (corrupt ? 17 : 0));
    for (int b = 0; b < kB; b++) {
        int tok = (int)(rng.next() % 50);
        for (int t = 0; t < kT; t++) {
            const int i = b * kT + t, next = corrupt ? (int)(rng.next() % V) : (tok + 1) % 50;
            inputs[i] = tok;
            targets[i] = (i % 13 == 5) ? -1 : next;
            tok = next;
        }
    }
}

// s.steps steps on `world` ranks (one: the plain one-rank Comm, as train_mamba without mpirun)
static RunResult train(const Setup& s, int world) {
    REQUIRE(s.micro % world == 0);  // else the ranks together see fewer micro-batches than one rank
    RunResult out;
    out.model_bytes.resize(world);
    out.activation_bytes.resize(world);
    out.trainer_bytes.resize(world);
    std::vector<std::vector<float>> shards(world);
    const float lr = 2e-3f;
    auto body = [&](Comm& comm) {
        const int r = comm.rank, passes = s.micro / world;
        OptimArgs o;
        o.optimizer = s.optimizer;
        o.bucket_mb = s.bucket_mb;
        o.eager = s.eager;
        size_t before = cuda_allocated_bytes();
        Model model(s.cfg, world, r, o.bucket_elems());
        out.model_bytes[r] = cuda_allocated_bytes() - before;
        model.recompute = s.recompute;
        before = cuda_allocated_bytes();
        model.allocate(kB, kT);
        out.activation_bytes[r] = cuda_allocated_bytes() - before;
        before = cuda_allocated_bytes();
        Trainer trainer(model, comm, o, lr);
        out.trainer_bytes[r] = cuda_allocated_bytes() - before;
        TrainState st;
        if (!s.resume.empty()) st = trainer.load(s.resume);
        else model.init(42);
        const size_t local = (size_t)kB * kT;
        std::vector<int> inputs(passes * local), targets(passes * local), pos(passes * local);
        std::vector<float> weights(passes * local);
        for (size_t i = 0; i < pos.size(); i++) {  // documents of 37 tokens, weights 0.5 .. 1.5
            pos[i] = (int)(i % kT) % 37;
            weights[i] = 0.5f + (float)(i % 5) * 0.25f;
        }
        auto step_batch = [&](bool corrupt) {  // this rank's micro-batches of the step: r * passes ...
            for (int p = 0; p < passes; p++)
                micro_batch(st.step, r * passes + p, corrupt, s.cfg.vocab_size, inputs.data() + p * local,
                            targets.data() + p * local);
            const long valid = trainer.count_valid(targets.data(), targets.size());
            if (s.documents)
                trainer.accumulate({inputs.data(), targets.data(), weights.data(), pos.data()}, passes, valid, 1e-4f);
            else
                trainer.accumulate({inputs.data(), targets.data()}, passes, valid, 0.0f);
        };
        bool pending = false;  // a step kept in flight, not read yet
        auto record = [&](const Trainer::StepResult& res) {
            REQUIRE(res.ms > 0.0f);
            if (r == 0) {
                out.losses.push_back(res.loss);
                out.norms.push_back(res.norm);
            }
        };
        auto drain = [&] {
            if (pending) record(trainer.finish_previous());
            pending = false;
        };
        while (st.step < s.steps) {
            if (st.step + 1 == s.discard_at) {  // its loss read early, as train_mamba's spike check does
                step_batch(true);
                const double loss = trainer.loss();
                if (r == 0) out.discarded_loss = loss;
                trainer.discard();
            }
            step_batch(false);
            st.step++;
            trainer.update(lr, st.step);
            if (s.in_flight) {
                drain();
                trainer.keep_in_flight();
                pending = true;
            } else {
                record(trainer.finish());
            }
            if (s.save_every > 0 && st.step % s.save_every == 0) {
                drain();
                trainer.save(s.save_dir, st);
            }
        }
        drain();
        shards[r] = model.get_master();
    };
    if (world == 1) {
        Comm one;
        body(one);
    } else {
        run_sim_ranks(world, body);
    }
    for (auto& sh : shards) out.master.insert(out.master.end(), sh.begin(), sh.end());
    return out;
}

static double rel_diff(double a, double b) { return std::fabs(a - b) / std::max(std::fabs(a), 1e-30); }

// multi_gpu.sh's tolerance: every step's loss within 1% of the one-rank run's; the first step
// (the same weights) to rounding: its loss is the same per-token losses summed in another
// order, its gradient norm the same micro-batch gradients summed in another order
static void check_matches(const RunResult& one, const RunResult& many, const char* what) {
    INFO(what);
    REQUIRE(one.losses.size() == many.losses.size());
    for (size_t i = 0; i < one.losses.size(); i++) {
        INFO("step " << i + 1 << ": loss " << one.losses[i] << " (1 rank) vs " << many.losses[i] << ", norm "
                     << one.norms[i] << " vs " << many.norms[i]);
        CHECK(std::isfinite(many.losses[i]));
        CHECK(rel_diff(one.losses[i], many.losses[i]) < 0.01);
    }
    CHECK(rel_diff(one.losses[0], many.losses[0]) < 1e-12);
    CHECK(rel_diff(one.norms[0], many.norms[0]) < 1e-5);
    CHECK(one.losses.back() < one.losses.front() - 0.1);  // the run learns: the comparison means something
    std::vector<double> a(one.master.begin(), one.master.end()), b(many.master.begin(), many.master.end());
    INFO("weights after the run: rel L2 " << rel_l2(b, a));
    CHECK(rel_l2(b, a) < 1e-2);
}

// the same losses, norms and weights (== on finite floats: the same bits, up to the sign of zero)
static bool same_run(const RunResult& a, const RunResult& b) {
    return a.losses == b.losses && a.norms == b.norms && a.master == b.master;
}

TEST_CASE("zero: 2 and 4 simulated ranks give one rank's losses over 10 steps (AdamW, Muon, accumulation, recompute)", "[zero]") {
    matmul_init();
    for (const char* opt : {"adamw", "muon"}) {
        Setup s;
        s.optimizer = opt;
        const RunResult one = train(s, 1);
        check_matches(one, train(s, 2), (std::string(opt) + ": 2 ranks, 6 micro-batches each").c_str());
        s.recompute = true;
        check_matches(one, train(s, 4), (std::string(opt) + ": 4 ranks, 3 micro-batches each, recompute").c_str());
    }
    Setup tied;
    tied.cfg = hybrid(true);  // the embedding's gradient from the forward's LM head and the backward's end
    check_matches(train(tied, 1), train(tied, 3), "tied embeddings: 3 ranks (uneven ranges)");
}

TEST_CASE("zero: simulated ranks repeat bit for bit, whatever the bucket size", "[zero]") {
    matmul_init();
    Setup s;
    s.optimizer = "muon";
    s.steps = 4;
    const RunResult base = train(s, 3);
    CHECK(same_run(base, train(s, 3)));
    for (double mb : {0.0, 1e-6, 0.05}) {  // one bucket; one per block; a few blocks each
        INFO("buckets of " << mb << " MiB");
        s.bucket_mb = mb;
        CHECK(same_run(base, train(s, 3)));
    }
}

TEST_CASE("steps kept in flight (finetune_mamba) give the bits of steps read one by one, on 1 and 3 ranks", "[zero]") {
    // step k read after step k + 1 is launched: its loss and norm from its own slot, not the next step's;
    // a checkpoint between them (the loop drains first)
    matmul_init();
    for (int world : {1, 3}) {
        INFO(world << " rank(s)");
        Setup s;
        s.steps = 6;
        const RunResult plain = train(s, world);
        s.in_flight = true;
        s.save_dir = kDir + "/in_flight_" + std::to_string(world);
        s.save_every = 4;
        const RunResult flying = train(s, world);
        REQUIRE(flying.losses.size() == (size_t)s.steps);
        CHECK(flying.losses.front() != flying.losses.back());  // each step its own loss
        CHECK(same_run(plain, flying));
    }
}

TEST_CASE("one rank: the micro-batches replayed as a CUDA graph give the eager launches' bits", "[zero][graph]") {
    matmul_init();
    for (int variant = 0; variant < 4; variant++) {
        Setup s;
        s.steps = 4;
        s.optimizer = variant == 1 ? "muon" : "adamw";
        s.recompute = variant == 2;
        s.documents = variant == 3;  // another graph: weights, positions and a z-loss
        s.cfg = hybrid(variant == 1);
        INFO("variant " << variant << ": " << s.optimizer << (s.recompute ? ", recompute" : "")
                        << (s.documents ? ", weights and documents" : ""));
        const RunResult graph = train(s, 1);
        s.eager = true;
        const RunResult eager = train(s, 1);
        CHECK(eager.losses.back() < eager.losses.front());  // it trains
        CHECK(same_run(graph, eager));
    }
}

TEST_CASE("zero: a dropped step (the spike guard's discard) leaves no trace in the owners' gradients", "[zero]") {
    matmul_init();
    Setup s;
    s.steps = 4;
    s.bucket_mb = 1e-6;
    const RunResult clean = train(s, 2);
    s.discard_at = 3;
    const RunResult dropped = train(s, 2);
    CHECK(same_run(clean, dropped));
    // the early read is the corrupt batch's own loss (random targets: above the clean step's), not a stale
    // copy of the step before's
    CHECK(std::isfinite(dropped.discarded_loss));
    CHECK(dropped.discarded_loss > clean.losses[2]);
    CHECK(dropped.discarded_loss != clean.losses[1]);
}

TEST_CASE("zero: 3 simulated ranks resume bit for bit from their checkpoint files", "[zero][checkpoint]") {
    matmul_init();
    REQUIRE(system(("rm -rf " + kDir + " && mkdir -p " + kDir).c_str()) == 0);
    Setup s;
    s.optimizer = "muon";
    s.steps = 6;
    s.save_every = 3;
    s.save_dir = kDir + "/straight";
    const RunResult straight = train(s, 3);
    s.save_dir = kDir + "/resumed";
    s.resume = kDir + "/straight/step_00000003.ckpt";
    const RunResult resumed = train(s, 3);
    CHECK(std::vector<double>(straight.losses.begin() + 3, straight.losses.end()) == resumed.losses);
    CHECK(straight.master == resumed.master);
    std::string out;
    for (const char* f : {"", ".rank0-of-3", ".rank1-of-3", ".rank2-of-3"}) {
        INFO("step_00000006.ckpt" << f);
        CHECK(run_cmd("cmp " + kDir + "/straight/step_00000006.ckpt" + f + " " + kDir + "/resumed/step_00000006.ckpt" + f,
                      out) == 0);
    }
    // the whole weights, gathered from the rank files
    ModelConfig c;
    int step = 0;
    CHECK(checkpoint_weights(kDir + "/straight/step_00000006.ckpt", c, step) == straight.master);
    CHECK(step == 6);
    // another rank count is refused with the one to use
    s.save_dir = kDir + "/other";
    CHECK_THROWS_WITH(train(s, 2), Catch::Contains("was written by 3 rank(s)"));
}

TEST_CASE("zero: each simulated rank allocates exactly zero.h's plan for it", "[zero]") {
    matmul_init();
    for (const char* opt : {"adamw", "muon"}) {
        for (int world : {1, 2, 3, 4}) {
            Setup s;
            s.optimizer = opt;
            s.steps = 1;
            s.recompute = world % 2 == 1;
            s.bucket_mb = 0.05;
            const RunResult run = train(s, world);
            const ParamLayout L(s.cfg);
            const size_t act = activation_sizes(s.cfg, kB, kT, s.recompute).total_bytes;
            for (int r = 0; r < world; r++) {
                INFO(opt << ", rank " << r << " of " << world);
                OptimArgs o;
                o.bucket_mb = s.bucket_mb;
                const RankMemory m = rank_memory(L, make_sharding(L, grad_walk(L), world, r, o.bucket_elems()),
                                                 s.optimizer == "muon", act);
                CHECK(run.model_bytes[r] == m.model());
                CHECK(run.activation_bytes[r] == m.activations);
                CHECK(run.trainer_bytes[r] == m.trainer());
                if (world > 1) CHECK(m.grad_buckets < 4 * L.total);  // no whole fp32 gradient buffer
            }
        }
    }
}

}  // namespace gpu_test_zero
