// Trains a byte-level BPE tokenizer (as Mambaoutai trained its own): pre-tokenise with
// GPT-2's pattern, count the distinct pieces, start from the 256 byte tokens and merge the
// most frequent adjacent pair until the vocabulary (special tokens included) is full.
// Pair counts are updated incrementally, touching only the pieces that hold the merged
// pair, so a few MB of text train in seconds. Ties go to the pair of smallest token ids,
// so training is deterministic.
#pragma once
#include <map>
#include <queue>
#include <unordered_map>
#include <unordered_set>
#include "tokenizer.h"

inline Tokenizer train_bpe(const std::vector<std::string>& texts, int vocab_size,
                           const std::vector<std::string>& special_tokens) {
    const int num_merges = vocab_size - 256 - (int)special_tokens.size();
    if (num_merges < 0)
        THROW("vocab size %d is smaller than 256 bytes + %zu special tokens", vocab_size, special_tokens.size());

    // distinct pieces with their counts, as sequences of token ids
    std::unordered_map<std::string, long> piece_count;
    for (const std::string& text : texts)
        for (const std::string& p : bpe::pretokenize(text)) piece_count[p]++;
    std::vector<std::vector<int>> words;
    std::vector<long> freq;
    for (auto& [p, c] : piece_count) {
        words.emplace_back(p.begin(), p.end());
        for (int& x : words.back()) x = (unsigned char)x;
        freq.push_back(c);
    }

    auto key = [](int a, int b) { return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b; };
    std::unordered_map<uint64_t, long> pair_count;
    std::unordered_map<uint64_t, std::vector<int>> pair_words;  // may hold stale entries
    auto add_pairs = [&](int w, long sign) {
        const std::vector<int>& s = words[w];
        for (size_t k = 0; k + 1 < s.size(); k++) {
            uint64_t kk = key(s[k], s[k + 1]);
            pair_count[kk] += sign * freq[w];
            if (sign > 0) pair_words[kk].push_back(w);
        }
    };
    for (int w = 0; w < (int)words.size(); w++) add_pairs(w, +1);

    // max-heap of (count, pair) with lazy deletion; smaller pair key wins a tie
    struct Entry { long count; uint64_t pair; };
    auto cmp = [](const Entry& a, const Entry& b) { return a.count != b.count ? a.count < b.count : a.pair > b.pair; };
    std::priority_queue<Entry, std::vector<Entry>, decltype(cmp)> heap(cmp);
    for (auto& [p, c] : pair_count) heap.push({c, p});

    std::vector<std::string> id_bytes(256);
    for (int b = 0; b < 256; b++) id_bytes[b] = std::string(1, (char)b);
    std::vector<std::pair<std::string, std::string>> merges;
    std::vector<int> stamp(words.size(), -1);
    while ((int)merges.size() < num_merges && !heap.empty()) {
        Entry e = heap.top();
        heap.pop();
        auto it = pair_count.find(e.pair);
        if (it == pair_count.end() || it->second != e.count) continue;  // stale
        if (e.count <= 0) break;
        const int a = (int)(e.pair >> 32), b = (int)(uint32_t)e.pair, id = (int)id_bytes.size();
        merges.push_back({id_bytes[a], id_bytes[b]});
        id_bytes.push_back(id_bytes[a] + id_bytes[b]);
        std::vector<int> touched = std::move(pair_words[e.pair]);
        pair_words.erase(e.pair);
        std::unordered_set<uint64_t> changed;
        for (int w : touched) {
            if (stamp[w] == id) continue;
            stamp[w] = id;
            std::vector<int>& s = words[w];
            bool has = false;
            for (size_t k = 0; k + 1 < s.size() && !has; k++) has = s[k] == a && s[k + 1] == b;
            if (!has) continue;
            for (size_t k = 0; k + 1 < s.size(); k++) changed.insert(key(s[k], s[k + 1]));
            add_pairs(w, -1);
            std::vector<int> merged;
            for (size_t k = 0; k < s.size(); k++) {
                if (k + 1 < s.size() && s[k] == a && s[k + 1] == b) { merged.push_back(id); k++; }
                else merged.push_back(s[k]);
            }
            s.swap(merged);
            add_pairs(w, +1);
            for (size_t k = 0; k + 1 < s.size(); k++) changed.insert(key(s[k], s[k + 1]));
        }
        for (uint64_t p : changed) {
            auto pc = pair_count.find(p);
            if (pc == pair_count.end()) continue;
            if (pc->second <= 0) pair_count.erase(pc);
            else heap.push({pc->second, p});
        }
    }
    Tokenizer tok = Tokenizer::from_parts(id_bytes, merges);
    tok.add_special_tokens(special_tokens);
    return tok;
}
