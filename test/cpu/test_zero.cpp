// ZeRO without a GPU (zero.h): the partition of the parameter buffer into rank ranges, the
// gradient buckets and their arena (replayed here against the order the backward takes them),
// the memory plan per rank (the 8B presets at 8 and 64 ranks fit 80 GiB; train_mamba --dry-run
// --ranks prints the plan), and checkpoints of several ranks (master weights in the rank files,
// gathered by checkpoint_weights, refused with another rank count or a foreign rank file).
#include <catch2/catch.hpp>
#include "test/test_util.h"
#include <algorithm>
#include <regex>
#include "checkpoint.cuh"

namespace {  // file-local: all test files link into one binary (same-named helper types would clash)

static const char* kBig[] = {"nvidia-mamba2-8b", "nvidia-hybrid-8b", "mamba-7b", "nvidia-mamba-8b"};
static const double kGiB = 1 << 30;

TEST_CASE("zero: ranges are balanced, never cut a block matrix, and cover the buffer", "[zero]") {
    for (const char* name : {"mamba2-370m", "hybrid-1.3b", "mamba-1.4b", "nvidia-hybrid-8b", "mamba-7b"}) {
        const ParamLayout L(model_preset(name));
        size_t largest = 0;  // the largest block matrix: a cut moves at most half of it
        for (auto& t : L.tensors)
            if (t.block_matrix) largest = std::max(largest, t.count);
        CHECK(param_ranges(L, 1) == std::vector<size_t>({0, L.total}));
        for (int world : {2, 3, 4, 8, 64}) {
            INFO(name << " on " << world << " ranks");
            const std::vector<size_t> b = param_ranges(L, world);
            REQUIRE(b.size() == (size_t)world + 1);
            CHECK(b.front() == 0);
            CHECK(b.back() == L.total);
            for (int r = 0; r < world; r++) {
                CHECK(b[r] < b[r + 1]);  // nobody owns nothing
                const size_t ideal = L.total * r / world;
                CHECK((b[r] > ideal ? b[r] - ideal : ideal - b[r]) <= largest / 2 + ZERO_ALIGN);
            }
            for (auto& t : L.tensors)
                for (int r = 1; r < world; r++) {
                    const bool inside = b[r] > t.offset && b[r] < t.offset + t.count;
                    if (t.block_matrix) CHECK(!inside);            // Muon's matrices stay whole
                    if (inside) CHECK(b[r] % ZERO_ALIGN == 0);      // aligned cuts inside AdamW's tensors
                }
        }
    }
    // a model too small for its ranks is refused, naming the rank
    const ParamLayout tiny(model_preset("mamba2-tiny"));
    CHECK_THROWS_WITH(make_sharding(tiny, grad_walk(tiny), 100000, 0, 0), Catch::Contains("would own no parameters"));
}

// the buckets live at each moment of one micro-batch, in the order GradReducer takes and
// releases them (taken before the forward; at each mark the completed ones go to their
// reduction and stay busy until the next close)
static void replay(const BucketPlan& p, const GradWalk& w, const std::function<void(const std::vector<int>&)>& live) {
    std::vector<int> open = {p.of(w.forward)}, busy;
    if (p.of(w.marks[0]) != open[0]) open.push_back(p.of(w.marks[0]));
    for (size_t m : w.marks) {
        live([&] { std::vector<int> v = open; v.insert(v.end(), busy.begin(), busy.end()); return v; }());
        std::vector<int> still, closed;
        for (int k : open) (p.lo[k] >= m ? closed : still).push_back(k);
        if (!closed.empty()) busy = closed;
        open = still;
        if (m > 0 && std::find(open.begin(), open.end(), p.of(m - 1)) == open.end()) open.push_back(p.of(m - 1));
    }
}

TEST_CASE("zero: gradient buckets hold whole blocks, and the buckets in use never share memory", "[zero]") {
    for (const char* name : {"hybrid-tiny", "mamba2-370m", "mamba-2.8b", "nvidia-hybrid-8b", "nvidia-mamba2-8b"}) {
        const ModelConfig c = model_preset(name);
        const ParamLayout L(c);
        const GradWalk w = grad_walk(L);
        CHECK(w.forward == (c.tie_embeddings ? L.embedding : L.lm_head));
        for (size_t elems : {(size_t)0, (size_t)1, (size_t)(32u << 20) / 4, L.total / 3}) {
            INFO(name << ", buckets of " << elems << " elements");
            const BucketPlan p = plan_buckets(w, L.total, elems);
            REQUIRE(p.count() >= 1);
            CHECK(p.lo.front() == 0);
            CHECK(p.hi.back() == L.total);
            for (int k = 0; k < p.count(); k++) {
                if (k > 0) CHECK(p.lo[k] == p.hi[k - 1]);
                CHECK(std::find(w.marks.begin(), w.marks.end(), p.lo[k]) != w.marks.end());  // cut where the backward reports
                if (k > 0) CHECK(p.size(k) >= elems);  // the lowest takes what is left
                CHECK(p.at[k] + p.size(k) <= p.arena);
                CHECK(std::find(p.shares[k].begin(), p.shares[k].end(), k) != p.shares[k].end());
            }
            if (elems == 0) CHECK(p.count() == 1);
            if (elems == 1) CHECK(p.count() == (int)w.marks.size());  // one bucket a segment
            for (auto& t : L.tensors) CHECK(p.of(t.offset) == p.of(t.offset + t.count - 1));  // a tensor in one bucket
            CHECK(p.arena <= L.total);
            int checks = 0;
            replay(p, w, [&](const std::vector<int>& live) {
                for (size_t i = 0; i < live.size(); i++)
                    for (size_t j = i + 1; j < live.size(); j++) {
                        const int a = live[i], b = live[j];
                        CHECK((p.at[a] + p.size(a) <= p.at[b] || p.at[b] + p.size(b) <= p.at[a]));
                        // the backward waits on exactly the buckets whose memory it takes over
                        const bool share = std::count(p.shares[a].begin(), p.shares[a].end(), b) > 0;
                        CHECK(!share);
                    }
                checks++;
            });
            CHECK(checks == (int)w.marks.size());
        }
    }
    // the 8B models: the arena is the embedding's (or the LM head's) gradient and about two blocks'
    for (const char* name : kBig) {
        const ParamLayout L(model_preset(name));
        const BucketPlan p = plan_buckets(grad_walk(L), L.total, (32u << 20) / 4);
        INFO(name << ": arena " << p.arena << " of " << L.total);
        CHECK(p.arena < L.total / 4);
    }
}

static RankMemory plan(const ModelConfig& c, int world, int rank, bool muon, int B, int T, bool recompute,
                       size_t bucket_elems = (32u << 20) / 4) {
    const ParamLayout L(c);
    return rank_memory(L, make_sharding(L, grad_walk(L), world, rank, bucket_elems), muon,
                       activation_sizes(c, B, T, recompute).total_bytes);
}

TEST_CASE("zero: the memory plan adds up over the ranks and is today's estimate on one rank", "[zero]") {
    for (const char* name : {"mamba2-370m", "hybrid-1.3b"}) {
        const ModelConfig c = model_preset(name);
        const ParamLayout L(c);
        for (bool muon : {false, true}) {
            INFO(name << (muon ? " muon" : " adamw"));
            const RankMemory one = plan(c, 1, 0, muon, 4, 1024, true);
            CHECK(one.weights + one.grad_buckets + one.master == 8 * L.total);  // bf16 copy, fp32 grads, the masters' low halves
            CHECK(one.grad_shard == 0);
            CHECK(one.optimizer == optimizer_state_bytes(L, muon));
            CHECK(one.activations == activation_sizes(c, 4, 1024, true).total_bytes);
            for (int world : {2, 3, 8}) {
                RankMemory sum;
                for (int r = 0; r < world; r++) {
                    const RankMemory m = plan(c, world, r, muon, 4, 1024, true);
                    CHECK(m.weights == 2 * L.total);
                    CHECK(m.grad_buckets < 4 * L.total);
                    sum.master += m.master;
                    sum.grad_shard += m.grad_shard;
                    sum.optimizer += m.optimizer;
                }
                CHECK(sum.master == 2 * L.total);
                CHECK(sum.grad_shard == 4 * L.total);
                CHECK(sum.optimizer == one.optimizer);
            }
        }
    }
}

TEST_CASE("zero: the 8B presets fit 80 GiB per rank at 8 and 64 ranks (B=1, T=4096, recompute), not on one", "[zero]") {
    for (const char* name : kBig) {
        const ModelConfig c = model_preset(name);
        for (bool muon : {false, true}) {
            for (int world : {8, 64}) {
                double worst = 0;
                for (int r = 0; r < world; r++) worst = std::max(worst, (double)plan(c, world, r, muon, 1, 4096, true).total());
                INFO(name << (muon ? " muon" : " adamw") << " on " << world << " ranks: " << worst / kGiB << " GiB + "
                          << CUDA_CONTEXT_GIB << " GiB context");
                CHECK(worst / kGiB + CUDA_CONTEXT_GIB <= 80.0);
            }
            CHECK(plan(c, 1, 0, muon, 1, 4096, true).total() / kGiB > 80.0);  // the issue: one rank cannot hold it
        }
    }
}

TEST_CASE("zero: train_mamba --dry-run --ranks N --gpu-mem G prints the largest rank's plan and whether it fits", "[zero][cli]") {
    std::string out;
    REQUIRE(run_cmd("./train_mamba --dry-run --model nvidia-hybrid-8b -B 1 -T 4096 --recompute --ranks 8 --gpu-mem 80", out) == 0);
    INFO(out);
    const ModelConfig c = model_preset("nvidia-hybrid-8b");
    int worst = 0;
    for (int r = 1; r < 8; r++)
        if (plan(c, 8, r, false, 1, 4096, true).total() > plan(c, 8, worst, false, 1, 4096, true).total()) worst = r;
    const RankMemory m = plan(c, 8, worst, false, 1, 4096, true);
    CHECK_THAT(out, Catch::Contains(strformat("memory estimate for B=1 T=4096 (recompute) per rank of 8: parameters+grads "
                                              "%.2f GiB", m.model() / kGiB)));
    CHECK_THAT(out, Catch::Contains(strformat("  rank %d of 8: bf16 weights %.2f, gradient buckets %.2f, gradient shard "
                                              "%.2f, master weights' low halves %.2f, optimizer state %.2f", worst, m.weights / kGiB,
                                              m.grad_buckets / kGiB, m.grad_shard / kGiB, m.master / kGiB,
                                              m.optimizer / kGiB)));
    CHECK_THAT(out, Catch::Contains(strformat(": %.2f GiB, and about 0.5 GiB of CUDA context", m.total() / kGiB)));
    CHECK_THAT(out, Catch::Contains("fits 80 GiB: yes"));
    REQUIRE(run_cmd("./train_mamba --dry-run --model nvidia-hybrid-8b -B 1 -T 4096 --recompute --gpu-mem 80", out) == 0);
    CHECK_THAT(out, Catch::Contains("fits 80 GiB: no"));
    // the ranks' batch: --total-batch is checked against B*T*ranks
    CHECK(run_cmd("./train_mamba --dry-run -B 2 -T 64 --total-batch 384 --ranks 4", out) == 1);
    CHECK_THAT(out, Catch::Contains("not a multiple of B*T*ranks = 2*64*4 = 512"));
    CHECK(run_cmd("./train_mamba -B 2 -T 64 --ranks 4", out) == 1);
    CHECK_THAT(out, Catch::Contains("--ranks and --gpu-mem plan memory for --dry-run"));
    CHECK(run_cmd("./train_mamba --dry-run --ranks 100000", out) == 1);
    CHECK_THAT(out, Catch::Contains("would own no parameters"));
}

TEST_CASE("zero: --logit-chunk sizes the logits buffer: the plan grows by the rows it adds", "[zero][cli]") {
    const ModelConfig c = model_preset("mamba2-370m");
    const size_t Vp = c.padded_vocab();
    const size_t base = activation_sizes(c, 4, 2048, false).total_bytes;
    CHECK(activation_sizes(c, 4, 2048, false, LOGIT_CHUNK).total_bytes == base);
    CHECK(activation_sizes(c, 4, 2048, false, 8192).total_bytes == base + (8192 - LOGIT_CHUNK) * Vp * 2);
    CHECK(activation_sizes(c, 4, 2048, false, 100000).total_bytes == base + (8192 - LOGIT_CHUNK) * Vp * 2);  // B*T rows at most
    CHECK(activation_sizes(c, 4, 2048, false, 512).total_bytes == base - (LOGIT_CHUNK - 512) * Vp * 2);
    std::string out;
    REQUIRE(run_cmd("./train_mamba --dry-run --model mamba2-370m -B 4 -T 2048 --logit-chunk 8192", out) == 0);
    INFO(out);
    const RankMemory m = rank_memory(ParamLayout(c), make_sharding(ParamLayout(c), grad_walk(ParamLayout(c)), 1, 0,
                                                                    (32u << 20) / 4),
                                     false, activation_sizes(c, 4, 2048, false, 8192).total_bytes);
    CHECK_THAT(out, Catch::Contains(strformat("activations %.2f GiB", m.activations / kGiB)));
    CHECK(run_cmd("./train_mamba --dry-run --logit-chunk 0", out) == 1);
    CHECK_THAT(out, Catch::Contains("--logit-chunk"));
}

// ----------------------------------------------------------------------------
// checkpoints of several ranks

static const std::string kDir = "/tmp/mamba_zero_ckpt_test";

static ModelConfig tiny_config() {
    ModelConfig c;
    c.vocab_size = 300; c.d_model = 64; c.n_layer = 3; c.pattern = "M*+"; c.d_state = 64; c.headdim = 32;
    c.n_heads = 2; c.attn_head_dim = 64; c.d_ff = 96;
    c.finalize();
    return c;
}

// rank r's master weights and optimizer arrays, recognisable
static OptState tiny_opt(const ParamLayout& L, bool muon, size_t begin, size_t end, int r) {
    OptState opt;
    for (auto& [name, n] : optimizer_arrays(L, muon, begin, end)) {
        opt.push_back({name, std::vector<float>(n)});
        for (size_t i = 0; i < n; i++) opt.back().second[i] = (float)(i % 13) + 100.0f * r + name.size();
    }
    return opt;
}

TEST_CASE("zero: a checkpoint of 3 ranks keeps each rank's master weights in its file and loads back", "[zero][checkpoint]") {
    REQUIRE(system(("rm -rf " + kDir + " && mkdir -p " + kDir).c_str()) == 0);
    const ModelConfig c = tiny_config();
    const ParamLayout L(c);
    std::vector<float> master(L.total);
    for (size_t i = 0; i < master.size(); i++) master[i] = 0.001f * (float)(i % 997) - 0.3f;
    const int W = 3;
    const std::vector<size_t> b = param_ranges(L, W);
    TrainState st;
    st.step = 7;
    st.tokens = 7000;
    st.loader = {2, 5};
    std::string path;
    for (int r = W - 1; r >= 0; r--) {  // rank 0 last: its main file follows every rank's file
        const std::vector<float> shard(master.begin() + b[r], master.begin() + b[r + 1]);
        path = checkpoint_save(kDir + "/w3", st, shard, tiny_opt(L, true, b[r], b[r + 1], r), c, r, W, [] {});
    }
    // the main file holds the loader state, no weights
    CheckpointFile main(path, true);
    CHECK(main.shards == b);
    CHECK(std::filesystem::file_size(path) < 16 + 4096 + sizeof(DataLoader::State));
    // the full weights, gathered from the rank files (fine-tuning and generation read these)
    ModelConfig c2;
    int step = 0;
    CHECK(checkpoint_weights(path, c2, step) == master);
    CHECK(step == 7);
    // each rank resumes from its own file
    for (int r = 0; r < W; r++) {
        OptState opt = tiny_opt(L, true, b[r], b[r + 1], r), want = opt;
        for (auto& a : opt) std::fill(a.second.begin(), a.second.end(), NAN);
        TrainState got;
        const std::vector<float> shard = checkpoint_load(path, got, opt, c, r, W);
        CHECK(shard == std::vector<float>(master.begin() + b[r], master.begin() + b[r + 1]));
        CHECK(opt == want);
        CHECK(got.step == 7);
        CHECK(got.loader.position == 5);
    }
    // another rank count is refused with the count to use
    OptState opt2 = tiny_opt(L, true, param_ranges(L, 2)[0], param_ranges(L, 2)[1], 0);
    TrainState got;
    CHECK_THROWS_WITH(checkpoint_load(path, got, opt2, c, 0, 2), Catch::Contains("was written by 3 rank(s)") &&
                                                                      Catch::Contains("mpirun -np 3"));
    // a rank file of another checkpoint is refused, naming both files
    st.step = 8;
    for (int r = W - 1; r >= 0; r--) {
        const std::vector<float> shard(master.begin() + b[r], master.begin() + b[r + 1]);
        checkpoint_save(kDir + "/w3", st, shard, tiny_opt(L, true, b[r], b[r + 1], r), c, r, W, [] {});
    }
    REQUIRE(system(("cp " + kDir + "/w3/step_00000008.ckpt.rank1-of-3 " + path + ".rank1-of-3").c_str()) == 0);
    CHECK_THROWS_WITH(checkpoint_weights(path, c2, step), Catch::Contains("does not belong") &&
                                                              Catch::Contains("rank1-of-3"));
    OptState opt1 = tiny_opt(L, true, b[1], b[2], 1);
    CHECK_THROWS_WITH(checkpoint_load(path, got, opt1, c, 1, W), Catch::Contains("does not belong"));
    // a missing rank file is named
    REQUIRE(system(("rm " + path + ".rank1-of-3").c_str()) == 0);
    CHECK_THROWS_WITH(checkpoint_weights(path, c2, step), Catch::Contains("rank1-of-3"));
}

}  // namespace
