// The training recipe through the train_mamba binary (issue "training recipe"): batch
// ramp-up, loss-spike recovery, WSD continuation with a decay-phase data mixture, and Muon.
// Each runs a tiny model on synthetic shards and checks what the log and checkpoints say.
#include <catch2/catch.hpp>
#include "test/test_util.h"
#include <cmath>
#include <cstdlib>
#include <regex>
#include "checkpoint.cuh"
#include "schedule.h"
#include "dataloader.h"

namespace gpu_test_recipe {  // this file's helpers: all test files link into one binary (same-named types would clash)

static const std::string kDir = "/tmp/mamba_recipe_test";

// two shards: a learnable main set (counting modulo 50 from random starts, so a corrupt
// batch of random targets stands out) and a single repeated token (the mixture)
static void make_shards() {
    REQUIRE(system(("rm -rf " + kDir + " && mkdir -p " + kDir).c_str()) == 0);
    SplitMix64 rng(11);
    std::vector<uint32_t> tokens(40000), same(20000, 7);
    for (size_t i = 0; i < tokens.size(); i++)
        tokens[i] = i % 100 == 0 ? (uint32_t)(rng.next() % 50) : (tokens[i - 1] + 1) % 50;
    write_shard(kDir + "/main_000000.bin", tokens, 1000);
    write_shard(kDir + "/mix_000000.bin", same, 1000);
}

static std::string train_cmd(const std::string& extra) {
    return "./train_mamba --config test/dumps/mamba2_tiny.json --train-data " + kDir + "/main_*.bin --val-data " +
           kDir + "/main_*.bin -B 2 -T 64 --val-every 0 --sample-every 0 --lr 1e-3 --warmup 2 " + extra;
}

// every "step N | loss L | lr R ... [| batch B]" line of a log
struct StepLine { int step; double loss, lr; long batch; };
static std::vector<StepLine> step_lines(const std::string& log) {
    std::vector<StepLine> out;
    std::regex re(R"(step\s+(\d+) \| loss ([0-9.]+) \| lr ([0-9.e+-]+) [^\n]*?(?:\| batch (\d+))?\n)");
    for (auto it = std::sregex_iterator(log.begin(), log.end(), re); it != std::sregex_iterator(); ++it)
        out.push_back({std::stoi((*it)[1]), std::stod((*it)[2]), std::stod((*it)[3]),
                       (*it)[4].matched ? std::stol((*it)[4]) : 0L});
    return out;
}

TEST_CASE("recipe: batch ramp-up follows BatchRamp and the schedule counts tokens", "[recipe]") {
    make_shards();
    std::string log;
    // 128 -> 1024 tokens per step over 4096 tokens; the run lasts 8 x 1024 tokens
    REQUIRE(run_cmd(train_cmd("--total-batch 1024 --steps 8 --batch-ramp-start 128 --batch-ramp-tokens 4096 "
                              "--ckpt-every 0 --ckpt-dir " + kDir + "/ramp"), log) == 0);
    INFO(log);
    auto lines = step_lines(log);
    REQUIRE(lines.size() > 8);  // smaller steps at first: more of them
    BatchRamp r{128, 1024, 4096, 128};
    const long total = 8 * 1024;
    long tokens = 0;
    for (auto& l : lines) {
        CHECK(l.batch == std::min(r.at(tokens), total - tokens));  // the last step stops at the run's length
        tokens += l.batch;
    }
    CHECK(tokens == total);
    CHECK(lines.front().batch == 128);
    CHECK(lines[lines.size() - 2].batch == 1024);
}

TEST_CASE("recipe: a loss spike from a corrupt batch is rolled back and its batches skipped", "[recipe]") {
    make_shards();
    std::string log;
    REQUIRE(run_cmd(train_cmd("--total-batch 256 --steps 24 --ckpt-every 4 --spike-factor 1.3 --spike-window 5 "
                              "--inject-spike-at 14 --ckpt-dir " + kDir + "/spike"), log) == 0);
    INFO(log);
    CHECK_THAT(log, Catch::Contains("injected a corrupt batch at step 14"));
    CHECK_THAT(log, Catch::Contains("spike: step 14 loss"));
    CHECK_THAT(log, Catch::Contains("rolled back to " + kDir + "/spike/step_00000012.ckpt (step 12); skipped the "
                                    "batches of steps 13..14"));
    auto lines = step_lines(log);
    REQUIRE(!lines.empty());
    CHECK(lines.back().step == 24);  // the run still ends where it should
    for (auto& l : lines) CHECK(std::isfinite(l.loss));
    // the spike measured against the 5 steps before it (9..13, the guard's window), as the log shows them
    std::smatch m;
    REQUIRE(std::regex_search(log, m, std::regex(R"(spike: step 14 loss ([0-9.]+))")));
    double before = 0;
    for (auto& l : lines)
        if (l.step >= 9 && l.step <= 13) before += l.loss / 5;
    CHECK(std::stod(m[1]) > 1.3 * before);
    // no corrupt update was applied: after the rollback every step stays under the spike line
    for (auto& l : lines)
        if (l.step > 12) CHECK(l.loss < 1.3 * before);
}

TEST_CASE("recipe: WSD continues from a stable-phase checkpoint with a new length and a decay mixture", "[recipe]") {
    make_shards();
    std::string log;
    const std::string base = "--total-batch 256 --lr-schedule wsd --min-lr 1e-5 --ckpt-every 6 --ckpt-dir " + kDir;
    REQUIRE(run_cmd(train_cmd(base + "/wsd --steps 12 --wsd-decay-start 10"), log) == 0);
    // continue from step 6 (stable phase) for 20 steps in all, decaying from step 14 on the mixture only
    REQUIRE(run_cmd(train_cmd(base + "/wsd2 --steps 20 --wsd-decay-start 14 --resume " + kDir +
                              "/wsd/step_00000006.ckpt --mix-data '" + kDir + "/mix_*.bin' --mix-weight 1"), log) == 0);
    INFO(log);
    CHECK_THAT(log, Catch::Contains("resumed from " + kDir + "/wsd/step_00000006.ckpt at step 6"));
    auto lines = step_lines(log);
    REQUIRE(lines.size() == 14);
    CHECK(lines.front().step == 7);
    CHECK(lines[6].step == 13);
    CHECK(lines[6].lr == Approx(1e-3));  // still stable at step 13
    CHECK(lines.back().step == 20);
    CHECK(lines.back().lr == Approx(1e-5));
    // the decay-phase batches all came from the mixture: the main loader stood still from step 14,
    // the mixture's moved, and the one-token mixture is learnt fast
    auto loader_of = [](const std::string& path, DataLoader::State* main) {
        CheckpointFile ck(path, true);
        ck.read(main, sizeof(*main));
        return ck.h;
    };
    DataLoader::State at12, at18;
    loader_of(kDir + "/wsd2/step_00000012.ckpt", &at12);
    nlohmann::json h18 = loader_of(kDir + "/wsd2/step_00000018.ckpt", &at18);
    // a step is 2 micro-batches of B = 2 samples: steps 13, 14 on the main data, 15..18 on the mixture
    CHECK(at18.position == at12.position + 2 * 4);
    REQUIRE(h18.contains("mix_loader"));
    CHECK(h18["mix_loader"][1].get<uint64_t>() == 4 * 4);
    CHECK(lines[8].loss > 2 * lines[6].loss);        // step 15: the new mixture is unlike the main data
    CHECK(lines.back().loss < lines[8].loss - 2.0);  // and is learnt in the decay phase
}

TEST_CASE("recipe: Muon + AdamW trains, resumes bit for bit, and refuses an AdamW-only checkpoint", "[recipe][muon]") {
    make_shards();
    std::string log;
    const std::string muon = "--optimizer muon --total-batch 256 --ckpt-every 3 --steps 6 ";
    REQUIRE(run_cmd(train_cmd(muon + "--ckpt-dir " + kDir + "/m1"), log) == 0);
    auto lines = step_lines(log);
    REQUIRE(lines.size() == 6);
    CHECK(lines.back().loss < lines.front().loss);
    REQUIRE(run_cmd(train_cmd(muon + "--ckpt-dir " + kDir + "/m2 --resume " + kDir + "/m1/step_00000003.ckpt"), log) == 0);
    std::string a, b;
    REQUIRE(run_cmd("cmp " + kDir + "/m1/step_00000006.ckpt " + kDir + "/m2/step_00000006.ckpt", a) == 0);
    REQUIRE(run_cmd(train_cmd("--total-batch 256 --steps 4 --ckpt-every 0 --ckpt-dir " + kDir + "/m3"), b) == 0);
    CHECK(run_cmd(train_cmd(muon + "--ckpt-dir " + kDir + "/m4 --resume " + kDir + "/m3"), log) == 1);
    CHECK_THAT(log, Catch::Contains("holds optimizer state adamw.m"));
    CHECK_THAT(log, Catch::Contains("muon.momentum"));
}

}  // namespace gpu_test_recipe
