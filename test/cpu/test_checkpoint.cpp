// Checkpoint files without a GPU: the round trip of weights, optimizer arrays and training
// state; the latest checkpoint of a directory by its parsed step; and every corrupt file
// refused with the file named (bad header fields, trailing bytes, truncation, a flipped
// payload byte); a write that fails (the disk full) leaves no .tmp behind. The metrics log
// and its resume.
#include <catch2/catch.hpp>
#include "test/test_util.h"
#include <csignal>
#include <fstream>
#include <sys/resource.h>
#include "checkpoint.cuh"
#include "metrics.h"

namespace {  // file-local: all test files link into one binary (same-named helper types would clash)

static const std::string kDir = "/tmp/mamba_ckpt_test";

static ModelConfig tiny_config() {
    ModelConfig c;
    c.vocab_size = 300; c.d_model = 64; c.n_layer = 2; c.pattern = "M+"; c.d_state = 64; c.headdim = 32;
    c.finalize();
    return c;
}

// a checkpoint of the tiny model with recognisable contents; returns its path
static std::string write_tiny(const std::string& dir, int step, std::vector<float>* master_out = nullptr) {
    const ModelConfig c = tiny_config();
    const ParamLayout L(c);
    std::vector<float> master(L.total);
    for (size_t i = 0; i < master.size(); i++) master[i] = 0.001f * (float)(i % 997) - 0.3f;
    OptState opt;
    for (auto& [name, n] : optimizer_arrays(L, false, 0, L.total)) {
        opt.push_back({name, std::vector<float>(n)});
        for (size_t i = 0; i < n; i++) opt.back().second[i] = (float)(i % 13) * (name == "adamw.m" ? 1.f : 2.f);
    }
    TrainState st;
    st.step = step;
    st.tokens = 1000L * step;
    st.loader = {3, 17};
    if (master_out) *master_out = master;
    return checkpoint_save(dir, st, master, opt, c, 0, 1, [] {});
}

static std::string slurp(const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
}
static void spit(const std::string& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

TEST_CASE("checkpoint: round trip of weights, optimizer arrays and training state", "[checkpoint]") {
    REQUIRE(system(("rm -rf " + kDir + " && mkdir -p " + kDir).c_str()) == 0);
    std::vector<float> master;
    const std::string path = write_tiny(kDir + "/a", 12, &master);
    CHECK(path == kDir + "/a/step_00000012.ckpt");
    const ModelConfig c = tiny_config();
    const ParamLayout L(c);
    OptState opt;
    for (auto& [name, n] : optimizer_arrays(L, false, 0, L.total)) opt.push_back({name, std::vector<float>(n, NAN)});
    TrainState st;
    std::vector<float> got = checkpoint_load(path, st, opt, c);
    CHECK(got == master);
    CHECK(st.step == 12);
    CHECK(st.tokens == 12000);
    CHECK(st.loader.epoch == 3);
    CHECK(st.loader.position == 17);
    REQUIRE(opt.size() == 2);
    CHECK(opt[1].second[5] == 10.0f);
    ModelConfig c2;
    int step = 0;
    CHECK(checkpoint_weights(path, c2, step) == master);
    CHECK(step == 12);
    CHECK(model_config_to_json(c2) == model_config_to_json(c));
    // another optimizer set-up is refused, naming both
    OptState muon = opt;
    muon.push_back({"muon.momentum", std::vector<float>(10)});
    CHECK_THROWS_WITH(checkpoint_load(path, st, muon, c), Catch::Contains("muon.momentum(10)") && Catch::Contains(path));
}

TEST_CASE("checkpoint: a directory resumes from its highest parsed step", "[checkpoint]") {
    REQUIRE(system(("rm -rf " + kDir + " && mkdir -p " + kDir + "/d").c_str()) == 0);
    const std::string p9 = write_tiny(kDir + "/d", 99999999);
    write_tiny(kDir + "/d", 7);
    // step_100000000 sorts before step_99999999 as text
    REQUIRE(system(("cp " + p9 + " " + kDir + "/d/step_100000000.ckpt").c_str()) == 0);
    CHECK(checkpoint_resolve(kDir + "/d") == kDir + "/d/step_100000000.ckpt");
    // strays are no candidates
    REQUIRE(system(("cp " + p9 + " " + kDir + "/d/step_final.ckpt && cp " + p9 + " " + kDir + "/d/step_9x.ckpt && cp " +
                    p9 + " " + kDir + "/d/step_999999999.ckpt.tmp").c_str()) == 0);
    CHECK(checkpoint_resolve(kDir + "/d") == kDir + "/d/step_100000000.ckpt");
    CHECK_THROWS_WITH(checkpoint_resolve(kDir + "/empty_does_not_exist"), Catch::Contains("empty_does_not_exist"));
    REQUIRE(system(("mkdir -p " + kDir + "/none").c_str()) == 0);
    CHECK_THROWS_WITH(checkpoint_resolve(kDir + "/none"), Catch::Contains("no step_NNNNNNNN.ckpt"));
}

TEST_CASE("checkpoint: corrupt files are refused with the file named", "[checkpoint]") {
    REQUIRE(system(("rm -rf " + kDir + " && mkdir -p " + kDir).c_str()) == 0);
    const std::string good = write_tiny(kDir + "/g", 5);
    const std::string bytes = slurp(good);
    const ModelConfig c = tiny_config();
    const ParamLayout L(c);
    const ArraySizes arrays = optimizer_arrays(L, false, 0, L.total);
    uint64_t hb;
    memcpy(&hb, bytes.data() + 8, 8);
    const std::string header = bytes.substr(16, hb), payload = bytes.substr(16 + hb);
    auto with_header = [&](const std::string& name, const std::string& h) {
        std::string s = bytes.substr(0, 8);
        uint64_t n = h.size();
        s.append((const char*)&n, 8);
        s += h + payload;
        spit(kDir + "/" + name, s);
        return kDir + "/" + name;
    };
    auto edit = [&](const std::string& name, const std::function<void(nlohmann::json&)>& f) {
        nlohmann::json j = nlohmann::json::parse(header);
        f(j);
        return with_header(name, j.dump());
    };
    CHECK_NOTHROW(checkpoint_check(with_header("same.ckpt", header), c, arrays, 0, 1));
    CHECK_THROWS_WITH(checkpoint_check(edit("neg.ckpt", [](auto& j) { j["step"] = -5; }), c, arrays, 0, 1),
                      Catch::Contains("neg.ckpt") && Catch::Contains("'step' must be an integer >= 0"));
    CHECK_THROWS_WITH(checkpoint_check(edit("str.ckpt", [](auto& j) { j["num_params"] = "many"; }), c, arrays, 0, 1),
                      Catch::Contains("str.ckpt") && Catch::Contains("num_params"));
    CHECK_THROWS_WITH(checkpoint_check(edit("opt.ckpt", [](auto& j) { j["optimizer"] = {{"adamw.m"}}; }), c, arrays, 0, 1),
                      Catch::Contains("opt.ckpt") && Catch::Contains("[name, floats]"));
    CHECK_THROWS_WITH(checkpoint_check(with_header("arr.ckpt", "[1, 2]"), c, arrays, 0, 1),
                      Catch::Contains("arr.ckpt") && Catch::Contains("not a JSON object"));
    CHECK_THROWS_WITH(checkpoint_check(with_header("junk.ckpt", "{\"step\": "), c, arrays, 0, 1),
                      Catch::Contains("junk.ckpt") && Catch::Contains("corrupt header"));
    spit(kDir + "/trail.ckpt", bytes + "extra");
    CHECK_THROWS_WITH(checkpoint_check(kDir + "/trail.ckpt", c, arrays, 0, 1),
                      Catch::Contains("trail.ckpt") && Catch::Contains("trailing bytes"));
    spit(kDir + "/short.ckpt", bytes.substr(0, bytes.size() - 4));
    CHECK_THROWS_WITH(checkpoint_check(kDir + "/short.ckpt", c, arrays, 0, 1),
                      Catch::Contains("short.ckpt") && Catch::Contains("truncated"));
    spit(kDir + "/magic.ckpt", "NOTACKPT" + bytes.substr(8));
    CHECK_THROWS_WITH(checkpoint_check(kDir + "/magic.ckpt", c, arrays, 0, 1), Catch::Contains("bad magic"));
    // one flipped payload byte: the header still checks, the checksum does not
    std::string flipped = bytes;
    flipped[flipped.size() - 3] ^= 0x40;
    spit(kDir + "/flip.ckpt", flipped);
    CHECK_NOTHROW(checkpoint_check(kDir + "/flip.ckpt", c, arrays, 0, 1));
    OptState opt;
    for (auto& [name, n] : arrays) opt.push_back({name, std::vector<float>(n)});
    TrainState st;
    CHECK_THROWS_WITH(checkpoint_load(kDir + "/flip.ckpt", st, opt, c),
                      Catch::Contains("flip.ckpt") && Catch::Contains("checksum"));
    // not a regular file
    CHECK_THROWS_WITH(checkpoint_resolve("/dev/null"), Catch::Contains("not a regular file"));
    // another model is refused, naming both configs
    ModelConfig other = c;
    other.d_model = 32;
    other.finalize();
    CHECK_THROWS_WITH(checkpoint_check(good, other, arrays, 0, 1), Catch::Contains("holds model"));
    CHECK_THROWS_WITH(checkpoint_check(good, c, arrays, 0, 2), Catch::Contains("mpirun -np 1"));
}

TEST_CASE("checkpoint: a file of the packed layout (before tensors were aligned) loads into the aligned one", "[checkpoint]") {
    REQUIRE(system(("rm -rf " + kDir + " && mkdir -p " + kDir).c_str()) == 0);
    std::vector<float> master;
    const std::string good = write_tiny(kDir + "/g", 9, &master);
    const ModelConfig c = tiny_config();
    const ParamLayout L(c), packed(c, 1);
    REQUIRE(packed.total < L.total);  // its 4-head vectors leave gaps
    for (const TensorInfo& t : L.tensors) CHECK(t.offset % PARAM_ALIGN == 0);
    CHECK(packed.elements() == L.elements());
    CHECK(packed.total == L.elements());
    // the good file rewritten as an earlier build wrote it: the same tensors packed (no checksum, as before
    // checksums; the optimizer arrays do not depend on the layout)
    const std::string bytes = slurp(good);
    uint64_t hb;
    memcpy(&hb, bytes.data() + 8, 8);
    nlohmann::json h = nlohmann::json::parse(bytes.substr(16, hb));
    h["num_params"] = packed.total;
    h.erase("checksum");
    const size_t loader = sizeof(DataLoader::State), master_at = 16 + hb + loader;
    std::vector<float> p(packed.total);
    for (size_t k = 0; k < L.tensors.size(); k++)
        std::copy_n(master.begin() + L.tensors[k].offset, L.tensors[k].count, p.begin() + packed.tensors[k].offset);
    const std::string hs = h.dump();
    std::string s = bytes.substr(0, 8);
    const uint64_t n = hs.size();
    s.append((const char*)&n, 8);
    s += hs + bytes.substr(16 + hb, loader) + std::string((const char*)p.data(), p.size() * 4) +
         bytes.substr(master_at + L.total * 4);
    const std::string path = kDir + "/packed.ckpt";
    spit(path, s);
    // every tensor where this build has it, the gaps zero
    std::vector<float> want(L.total, 0.0f);
    for (const TensorInfo& t : L.tensors) std::copy_n(master.begin() + t.offset, t.count, want.begin() + t.offset);
    REQUIRE(want != master);  // the gaps of write_tiny's file held values
    ModelConfig c2;
    int step = 0;
    CHECK(checkpoint_weights(path, c2, step) == want);
    CHECK(step == 9);
    const ArraySizes arrays = optimizer_arrays(L, false, 0, L.total);
    OptState opt, opt_good;
    for (auto& [name, k] : arrays) opt.push_back({name, std::vector<float>(k, NAN)});
    opt_good = opt;
    TrainState st, st_good;
    CHECK(checkpoint_load(path, st, opt, c) == want);
    checkpoint_load(good, st_good, opt_good, c);
    CHECK(opt == opt_good);
    CHECK(st.step == 9);
    CHECK(st.loader.position == st_good.loader.position);
    // a count that is neither layout's is refused
    h["num_params"] = packed.total + 1;
    const std::string hs2 = h.dump();
    std::string bad = bytes.substr(0, 8);
    const uint64_t n2 = hs2.size();
    bad.append((const char*)&n2, 8);
    bad += hs2 + s.substr(16 + n, loader) + std::string((const char*)p.data(), p.size() * 4) + std::string(4, '\0') +
           bytes.substr(master_at + L.total * 4);
    spit(kDir + "/odd.ckpt", bad);
    CHECK_THROWS_WITH(checkpoint_weights(kDir + "/odd.ckpt", c2, step),
                      Catch::Contains("odd.ckpt") && Catch::Contains(std::to_string(packed.total + 1)));
    CHECK_THROWS_WITH(checkpoint_check(kDir + "/odd.ckpt", c, arrays, 0, 1),
                      Catch::Contains("odd.ckpt") && Catch::Contains(std::to_string(packed.total + 1)) &&
                          Catch::Contains(std::to_string(L.total)));
    // packed and written by 2 ranks: its ranges cut the packed layout, so it cannot resume 2 ranks here
    nlohmann::json h2 = nlohmann::json::parse(bytes.substr(16, hb));
    h2["num_params"] = packed.total;
    h2["world"] = 2;
    h2["master_shards"] = {0, packed.total / 2, packed.total};
    h2["optimizer"] = nlohmann::json::array();
    h2.erase("checksum");
    const std::string hs3 = h2.dump();
    std::string two = bytes.substr(0, 8);
    const uint64_t n3 = hs3.size();
    two.append((const char*)&n3, 8);
    two += hs3 + bytes.substr(16 + hb, loader);
    spit(kDir + "/packed2.ckpt", two);
    CHECK_THROWS_WITH(checkpoint_check(kDir + "/packed2.ckpt", c, arrays, 0, 2),
                      Catch::Contains("packed2.ckpt") && Catch::Contains("cannot resume here") &&
                          Catch::Contains("finetune_mamba --init"));
}

TEST_CASE("checkpoint: a write that fails leaves the old file and no .tmp", "[checkpoint]") {
    REQUIRE(system(("rm -rf " + kDir + " && mkdir -p " + kDir).c_str()) == 0);
    const std::string first = write_tiny(kDir + "/f", 3);
    const std::string before = slurp(first);
    // the disk is "full": files may not grow past 64 KiB (SIGXFSZ ignored: write() fails with EFBIG)
    struct rlimit old;
    getrlimit(RLIMIT_FSIZE, &old);
    auto prev = signal(SIGXFSZ, SIG_IGN);
    struct rlimit small = old;
    small.rlim_cur = 64 << 10;
    REQUIRE(setrlimit(RLIMIT_FSIZE, &small) == 0);
    bool threw = false;
    try {
        write_tiny(kDir + "/f", 3);
    } catch (const std::exception& e) {
        threw = true;
        CHECK_THAT(e.what(), Catch::Contains("step_00000003.ckpt.tmp"));
    }
    setrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, prev);
    CHECK(threw);
    CHECK_FALSE(std::filesystem::exists(first + ".tmp"));
    CHECK(slurp(first) == before);
}

TEST_CASE("metrics log: lines per step and evaluation; a resume keeps what its checkpoint had", "[checkpoint][metrics]") {
    REQUIRE(system(("rm -rf " + kDir + " && mkdir -p " + kDir).c_str()) == 0);
    {
        MetricsLog m;
        m.open(kDir + "/run", -1);
        for (int s = 1; s <= 8; s++) m.write({{"step", s}, {"loss", 10.0 - s}});
        m.write({{"step", 8}, {"val_loss", 2.5}});
    }
    auto lines = [&] {
        std::vector<nlohmann::json> v;
        std::ifstream f(kDir + "/run/metrics.jsonl");
        std::string l;
        while (std::getline(f, l)) v.push_back(nlohmann::json::parse(l));
        return v;
    };
    REQUIRE(lines().size() == 9);
    CHECK(lines()[8]["val_loss"] == 2.5);
    {
        MetricsLog m;  // resumed from the step-5 checkpoint: steps 6..8 are run again
        m.open(kDir + "/run", 5);
        m.write({{"step", 6}, {"loss", 3.75}});
    }
    auto v = lines();
    REQUIRE(v.size() == 6);
    CHECK(v[4]["step"] == 5);
    CHECK(v[5]["loss"] == 3.75);
    {
        MetricsLog m;  // a new run starts a new log
        m.open(kDir + "/run", -1);
    }
    CHECK(lines().empty());
}

}  // namespace
