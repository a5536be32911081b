// Byte-level BPE tokenizer, GPT-2's algorithm (host only):
//   1. special tokens (<|endoftext|>, ChatML's <|im_start|> ...) are cut out whole first;
//   2. the rest is split by GPT-2's pre-tokenisation pattern
//        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      matched by hand with ICU's Unicode categories;
//   3. each piece's UTF-8 bytes are mapped to printable characters (bytes_to_unicode) and
//      merged pair by pair, lowest merge rank first.
// Loads GPT-2's encoder.json + vocab.bpe or a Hugging Face tokenizer.json (byte-level BPE),
// and writes tokenizer.json. Bytes that are not valid UTF-8 pass through as single
// characters, so decode(encode(x)) == x for any byte string.
#pragma once
#include <algorithm>
#include <climits>
#include <cstring>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>
#include <nlohmann/json.hpp>
#include <unicode/uchar.h>
#include "common.h"

namespace bpe {

// GPT-2's reversible byte -> printable code point map
inline const std::vector<uint32_t>& byte_to_codepoint() {
    static const std::vector<uint32_t> map = [] {
        std::vector<uint32_t> m(256);
        int n = 0;
        for (int b = 0; b < 256; b++) {
            bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            m[b] = printable ? (uint32_t)b : 256 + n++;
        }
        return m;
    }();
    return map;
}

inline void append_utf8(std::string& s, uint32_t cp) {
    if (cp < 0x80) s += (char)cp;
    else if (cp < 0x800) { s += (char)(0xC0 | (cp >> 6)); s += (char)(0x80 | (cp & 0x3F)); }
    else if (cp < 0x10000) {
        s += (char)(0xE0 | (cp >> 12)); s += (char)(0x80 | ((cp >> 6) & 0x3F)); s += (char)(0x80 | (cp & 0x3F));
    } else {
        s += (char)(0xF0 | (cp >> 18)); s += (char)(0x80 | ((cp >> 12) & 0x3F));
        s += (char)(0x80 | ((cp >> 6) & 0x3F)); s += (char)(0x80 | (cp & 0x3F));
    }
}

// bytes -> their printable form (a UTF-8 string of mapped code points)
inline std::string bytes_to_printable(const std::string& bytes) {
    std::string out;
    for (unsigned char b : bytes) append_utf8(out, byte_to_codepoint()[b]);
    return out;
}

// Decodes one UTF-8 character at s[i]; returns its length and code point. An invalid or
// truncated sequence yields one byte with code point -1 (classified as "other").
inline int utf8_next(const std::string& s, size_t i, int32_t& cp) {
    const unsigned char c = s[i];
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > s.size()) { cp = -1; return 1; }
    if (len == 1) { cp = c; return 1; }
    int32_t v = c & (0x3F >> (len - 1));
    for (int k = 1; k < len; k++) {
        unsigned char d = s[i + k];
        if ((d & 0xC0) != 0x80) { cp = -1; return 1; }
        v = (v << 6) | (d & 0x3F);
    }
    static const int32_t min_for_len[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (v < min_for_len[len] || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) { cp = -1; return 1; }
    cp = v;
    return len;
}

// printable string -> original bytes
inline std::string printable_to_bytes(const std::string& s) {
    static const std::vector<int> inverse = [] {
        std::vector<int> inv(512, -1);
        for (int b = 0; b < 256; b++) inv[byte_to_codepoint()[b]] = b;
        return inv;
    }();
    std::string out;
    for (size_t i = 0; i < s.size();) {
        int32_t cp;
        i += utf8_next(s, i, cp);
        if (cp < 0 || cp >= 512 || inverse[cp] < 0) THROW("token text is not byte-level BPE (code point %d)", cp);
        out += (char)inverse[cp];
    }
    return out;
}

// JavaScript's \s (what the reference encoder's regex uses)
inline bool is_space(int32_t c) {
    return c == ' ' || (c >= 0x09 && c <= 0x0D) || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
           c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000 || c == 0xFEFF;
}
inline bool is_letter(int32_t c) { return c >= 0 && (U_GET_GC_MASK(c) & U_GC_L_MASK) != 0; }
inline bool is_number(int32_t c) { return c >= 0 && (U_GET_GC_MASK(c) & U_GC_N_MASK) != 0; }
inline bool is_other(int32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); }

// Splits text into GPT-2 pre-tokens (byte ranges), following the pattern's alternatives in order.
inline std::vector<std::string> pretokenize(const std::string& text) {
    std::vector<int32_t> cps;
    std::vector<size_t> pos;  // byte offset of each character, plus the end
    for (size_t i = 0; i < text.size();) {
        int32_t cp;
        pos.push_back(i);
        i += utf8_next(text, i, cp);
        cps.push_back(cp);
    }
    pos.push_back(text.size());
    const size_t n = cps.size();
    std::vector<std::string> out;
    auto run = [&](size_t j, bool (*cls)(int32_t)) { while (j < n && cls(cps[j])) j++; return j; };
    for (size_t i = 0; i < n;) {
        size_t j = i;
        if (cps[i] == '\'') {  // contractions, lower case only as in GPT-2
            static const char* suffixes[] = {"s", "t", "re", "ve", "m", "ll", "d"};
            for (const char* sfx : suffixes) {
                size_t k = 0, L = strlen(sfx);
                while (k < L && i + 1 + k < n && cps[i + 1 + k] == sfx[k]) k++;
                if (k == L) { j = i + 1 + L; break; }
            }
        }
        if (j == i) {
            const size_t s = (cps[i] == ' ' && i + 1 < n) ? i + 1 : i;  // the optional leading space
            for (auto cls : {is_letter, is_number, is_other}) {
                if (cls(cps[s]) && (s == i + 1 || cls(cps[i]))) { j = run(s, cls); break; }
                if (s != i && cls(cps[i])) { j = run(i, cls); break; }
            }
        }
        if (j == i) {  // whitespace: \s+(?!\S) leaves the last space for the next piece; else \s+
            size_t e = run(i, is_space);
            j = (e < n && e - 1 > i) ? e - 1 : e;
        }
        out.push_back(text.substr(pos[i], pos[j] - pos[i]));
        i = j;
    }
    return out;
}

}  // namespace bpe

class Tokenizer {
public:
    // GPT-2's files: encoder.json (printable token -> id) and vocab.bpe (merges, rank order)
    static Tokenizer load_gpt2(const std::string& encoder_json, const std::string& vocab_bpe) {
        Tokenizer t;
        nlohmann::json enc = read_json(encoder_json);
        std::vector<std::string> merges;
        std::ifstream f(vocab_bpe);
        if (!f) THROW("cannot open '%s'", vocab_bpe.c_str());
        std::string line;
        while (std::getline(f, line)) {
            if (line.empty() || line.rfind("#version", 0) == 0) continue;
            merges.push_back(line);
        }
        t.build(enc, merges, vocab_bpe);
        t.add_special_tokens({"<|endoftext|>"});
        return t;
    }

    // Hugging Face tokenizer.json of a byte-level BPE model (merges as "a b" or ["a", "b"])
    static Tokenizer load_hf(const std::string& path) {
        nlohmann::json j = read_json(path);
        Tokenizer t;
        try {
            const auto& model = j.at("model");
            if (model.value("type", std::string("BPE")) != "BPE")
                THROW("'%s': model type '%s' is not BPE", path.c_str(), model.value("type", std::string()).c_str());
            std::vector<std::string> merges;
            for (const auto& m : model.at("merges"))
                merges.push_back(m.is_string() ? m.get<std::string>() : m.at(0).get<std::string>() + " " + m.at(1).get<std::string>());
            t.build(model.at("vocab"), merges, path);
            if (j.contains("added_tokens") && j["added_tokens"].is_array())
                for (const auto& a : j["added_tokens"]) {
                    std::string content = a.at("content").get<std::string>();
                    int id = a.at("id").get<int>();
                    if (id >= (int)t.id_to_bytes_.size()) t.id_to_bytes_.resize(id + 1);
                    t.id_to_bytes_[id] = content;
                    t.specials_.push_back({content, id});
                }
        } catch (const nlohmann::json::exception& e) {
            THROW("'%s' is not a byte-level BPE tokenizer.json: %s", path.c_str(), e.what());
        }
        return t;
    }

    // a directory with encoder.json + vocab.bpe, or a tokenizer.json (file or in the directory)
    static Tokenizer load(const std::string& path) {
        namespace fs = std::filesystem;
        if (fs::is_directory(path)) {
            if (fs::exists(path + "/encoder.json") && fs::exists(path + "/vocab.bpe"))
                return load_gpt2(path + "/encoder.json", path + "/vocab.bpe");
            if (fs::exists(path + "/tokenizer.json")) return load_hf(path + "/tokenizer.json");
            THROW("tokenizer directory '%s' has neither encoder.json + vocab.bpe nor tokenizer.json", path.c_str());
        }
        if (!fs::exists(path)) THROW("tokenizer '%s' does not exist", path.c_str());
        return load_hf(path);
    }

    void save_hf(const std::string& path) const {
        nlohmann::json vocab = nlohmann::json::object(), merges = nlohmann::json::array(), added = nlohmann::json::array();
        std::vector<bool> special(id_to_bytes_.size(), false);
        for (auto& [s, id] : specials_) {
            special[id] = true;
            added.push_back({{"id", id}, {"content", s}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                             {"normalized", false}, {"special", true}});
        }
        for (size_t id = 0; id < id_to_bytes_.size(); id++)
            vocab[special[id] ? id_to_bytes_[id] : bpe::bytes_to_printable(id_to_bytes_[id])] = id;
        std::vector<std::pair<int, std::string>> ordered;
        for (auto& [pair, rank] : ranks_) ordered.push_back({rank, pair});
        std::sort(ordered.begin(), ordered.end());
        for (auto& [rank, pair] : ordered) merges.push_back(pair);
        nlohmann::json j = {
            {"version", "1.0"}, {"added_tokens", added}, {"normalizer", nullptr},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
            {"post_processor", nullptr},
            {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
            {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
                       {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
                       {"vocab", vocab}, {"merges", merges}}}};
        std::string tmp = path + ".tmp";
        {
            std::ofstream f(tmp);
            if (!f) THROW("cannot write '%s'", tmp.c_str());
            f << j.dump(1) << "\n";
            if (!f) THROW("cannot write '%s'", tmp.c_str());
        }
        std::filesystem::rename(tmp, path);
    }

    // appends tokens that are not in the vocabulary yet (ChatML tokens for fine-tuning)
    void add_special_tokens(const std::vector<std::string>& tokens) {
        for (const std::string& s : tokens) {
            int id = token_id(s);
            if (id < 0) {
                id = (int)id_to_bytes_.size();
                id_to_bytes_.push_back(s);
                printable_to_id_[bpe::bytes_to_printable(s)] = id;
            }
            bool known = false;
            for (auto& sp : specials_) known |= sp.first == s;
            if (!known) specials_.push_back({s, id});
        }
    }

    std::vector<uint32_t> encode(const std::string& text) const {
        std::vector<uint32_t> out;
        size_t i = 0;
        while (i < text.size()) {
            // the earliest special token (the longest at a tie) splits the text
            size_t best = std::string::npos, best_len = 0;
            int best_id = -1;
            for (auto& [s, id] : specials_) {
                size_t p = text.find(s, i);
                if (p != std::string::npos && (p < best || (p == best && s.size() > best_len))) {
                    best = p; best_len = s.size(); best_id = id;
                }
            }
            size_t stop = best == std::string::npos ? text.size() : best;
            for (const std::string& piece : bpe::pretokenize(text.substr(i, stop - i))) encode_piece(piece, out);
            if (best == std::string::npos) break;
            out.push_back((uint32_t)best_id);
            i = best + best_len;
        }
        return out;
    }

    std::string decode(const std::vector<uint32_t>& ids) const {
        std::string out;
        for (uint32_t id : ids) out += decode_token(id);
        return out;
    }
    std::string decode_token(uint32_t id) const {
        if (id >= id_to_bytes_.size()) THROW("token id %u is outside the vocabulary of %zu", id, id_to_bytes_.size());
        return id_to_bytes_[id];
    }

    int vocab_size() const { return (int)id_to_bytes_.size(); }
    int eot_token() const { return token_id("<|endoftext|>"); }
    int token_id(const std::string& s) const {
        for (auto& [sp, id] : specials_) if (sp == s) return id;
        auto it = printable_to_id_.find(bpe::bytes_to_printable(s));
        return it == printable_to_id_.end() ? -1 : it->second;
    }

    // for the trainer: a tokenizer from byte sequences of ids and ordered merges
    static Tokenizer from_parts(const std::vector<std::string>& id_to_bytes,
                                const std::vector<std::pair<std::string, std::string>>& merges) {
        Tokenizer t;
        t.id_to_bytes_ = id_to_bytes;
        for (size_t id = 0; id < id_to_bytes.size(); id++) t.printable_to_id_[bpe::bytes_to_printable(id_to_bytes[id])] = (int)id;
        for (size_t r = 0; r < merges.size(); r++)
            t.ranks_[bpe::bytes_to_printable(merges[r].first) + " " + bpe::bytes_to_printable(merges[r].second)] = (int)r;
        return t;
    }

private:
    std::vector<std::string> id_to_bytes_;                 // raw bytes of each token
    std::unordered_map<std::string, int> printable_to_id_;  // printable form -> id
    std::unordered_map<std::string, int> ranks_;            // "a b" (printable) -> merge rank
    std::vector<std::pair<std::string, int>> specials_;     // matched whole, never split
    mutable std::unordered_map<std::string, std::vector<uint32_t>> cache_;

    static nlohmann::json read_json(const std::string& path) {
        std::ifstream f(path);
        if (!f) THROW("cannot open '%s'", path.c_str());
        try { return nlohmann::json::parse(f); } catch (const std::exception& e) {
            THROW("'%s' is not valid JSON: %s", path.c_str(), e.what());
        }
    }

    void build(const nlohmann::json& vocab, const std::vector<std::string>& merges, const std::string& path) {
        for (auto& [tok, idj] : vocab.items()) {
            int id = idj.get<int>();
            if (id < 0) THROW("'%s': negative token id for '%s'", path.c_str(), tok.c_str());
            if (id >= (int)id_to_bytes_.size()) id_to_bytes_.resize(id + 1);
            printable_to_id_[tok] = id;
            try { id_to_bytes_[id] = bpe::printable_to_bytes(tok); } catch (const std::exception&) {
                id_to_bytes_[id] = tok;  // a special token stored in the vocabulary
            }
        }
        for (size_t r = 0; r < merges.size(); r++) {
            if (merges[r].find(' ') == std::string::npos) THROW("'%s': merge %zu '%s' is not 'a b'", path.c_str(), r, merges[r].c_str());
            ranks_[merges[r]] = (int)r;
        }
    }

    // BPE of one pre-token: merge the lowest-ranked adjacent pair until none is left
    void encode_piece(const std::string& piece, std::vector<uint32_t>& out) const {
        auto hit = cache_.find(piece);
        if (hit != cache_.end()) { out.insert(out.end(), hit->second.begin(), hit->second.end()); return; }
        std::vector<std::string> parts;  // printable symbols
        for (unsigned char b : piece) { std::string s; bpe::append_utf8(s, bpe::byte_to_codepoint()[b]); parts.push_back(s); }
        while (parts.size() > 1) {
            int best = INT_MAX;
            size_t at = 0;
            for (size_t k = 0; k + 1 < parts.size(); k++) {
                auto it = ranks_.find(parts[k] + " " + parts[k + 1]);
                if (it != ranks_.end() && it->second < best) { best = it->second; at = k; }
            }
            if (best == INT_MAX) break;
            const std::string a = parts[at], b = parts[at + 1];
            std::vector<std::string> merged;
            for (size_t k = 0; k < parts.size(); k++) {
                if (k + 1 < parts.size() && parts[k] == a && parts[k + 1] == b) { merged.push_back(a + b); k++; }
                else merged.push_back(parts[k]);
            }
            parts.swap(merged);
        }
        std::vector<uint32_t> ids;
        for (const std::string& p : parts) {
            auto it = printable_to_id_.find(p);
            if (it == printable_to_id_.end()) THROW("BPE symbol '%s' is not in the vocabulary", p.c_str());
            ids.push_back((uint32_t)it->second);
        }
        if (cache_.size() < 1000000) cache_[piece] = ids;
        out.insert(out.end(), ids.begin(), ids.end());
    }
};
