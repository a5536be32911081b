// Byte-level BPE tokenizer, GPT-2's algorithm (host only):
//   1. encode() cuts special tokens (<|endoftext|>, ChatML's <|im_start|> ...) out whole
//      first; encode_ordinary() reads their text as ordinary text, as tiktoken's
//      encode_ordinary does. Data content takes encode_ordinary: only a template or the
//      document separator may produce special ids, never the text of a document;
//   2. the text is split by GPT-2's pre-tokenisation pattern
//        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      matched by hand (piece_end) with ICU's Unicode categories, without copying;
//   3. each piece starts as its single-byte tokens, and the lowest-ranked adjacent pair is
//      merged, every occurrence left to right, until no pair has a merge: by rescanning for
//      a short piece, and for a long one by buckets of positions per rank over a linked list
//      of symbols, O(n log n) for n bytes (rescanning is quadratic: 82 s for 300 KB of
//      letters without a space, 0.1 s now).
// Loads GPT-2's encoder.json + vocab.bpe or a Hugging Face tokenizer.json (byte-level BPE),
// and writes tokenizer.json. Bytes that are not valid UTF-8 pass through as single
// characters, so decode(encode(x)) == x for any byte string. A Tokenizer is immutable once
// loaded (but for add_special_tokens): any number of threads may encode with it at once,
// each with its own PieceCache.
//
// SentencePiece models (a tokenizer.model file, as NVIDIA's 256K vocabulary and many
// published models ship) sit behind the same interface, run by Debian's libsentencepiece:
// its control and user-defined pieces (<s>, </s>, ...) are the special tokens, </s> the
// end of text (unless the model has <|endoftext|>), and added special tokens (ChatML's) take
// the ids after its pieces. save_hf writes such a tokenizer as a tokenizer.json of this
// engine's own kind ({"model": {"type": "SentencePiece", "proto": base64}, "added_tokens"}),
// which load reads back (prepare_data sft -> finetune_mamba); Hugging Face exports carry the
// tokenizer.model itself (hf.h).
#pragma once
#include <algorithm>
#include <array>
#include <cstring>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sentencepiece_processor.h>
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
inline std::string bytes_to_printable(std::string_view bytes) {
    std::string out;
    for (unsigned char b : bytes) append_utf8(out, byte_to_codepoint()[b]);
    return out;
}

// Decodes one UTF-8 character at s[i]; returns its length and code point. An invalid or
// truncated sequence yields one byte with code point -1 (classified as "other").
inline int utf8_next(std::string_view s, size_t i, int32_t& cp) {
    const unsigned char c = s[i];
    if (c < 0x80) { cp = c; return 1; }
    int len = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > s.size()) { cp = -1; return 1; }
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
inline std::string printable_to_bytes(std::string_view s) {
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

// the pattern's four classes: \s, \p{L}, \p{N} and the rest (invalid bytes included)
enum CharClass : uint8_t { SPACE, LETTER, NUMBER, OTHER };
inline CharClass char_class(int32_t c) {
    auto slow = [](int32_t x) { return is_space(x) ? SPACE : is_letter(x) ? LETTER : is_number(x) ? NUMBER : OTHER; };
    static const std::array<CharClass, 128> ascii = [&] {
        std::array<CharClass, 128> t{};
        for (int x = 0; x < 128; x++) t[x] = slow(x);
        return t;
    }();
    return c >= 0 && c < 128 ? ascii[c] : slow(c);
}

// End (byte offset) of the pre-token that starts at byte i < s.size(): the pattern's
// alternatives in order.
inline size_t piece_end(std::string_view s, size_t i) {
    const size_t n = s.size();
    int32_t c;
    const size_t len = utf8_next(s, i, c);
    if (c == '\'')  // contractions, lower case only as in GPT-2
        for (std::string_view sfx : {"s", "t", "re", "ve", "m", "ll", "d"})
            if (s.compare(i + 1, sfx.size(), sfx) == 0) return i + 1 + sfx.size();
    auto run = [&](size_t j, CharClass cls) {  // end of a run of one class from j
        int32_t d;
        while (j < n) {
            const size_t l = utf8_next(s, j, d);
            if (char_class(d) != cls) break;
            j += l;
        }
        return j;
    };
    const CharClass cls = char_class(c);
    if (cls != SPACE) return run(i + len, cls);
    if (c == ' ' && i + 1 < n) {  // ' ?\p{L}+' and its kin: a space joins the run after it
        int32_t d;
        utf8_next(s, i + 1, d);
        if (char_class(d) != SPACE) return run(i + 1, char_class(d));
    }
    // whitespace: \s+(?!\S) leaves the last whitespace character for the next piece; else \s+
    size_t j = i, last = i;
    int32_t d;
    while (j < n) {
        const size_t l = utf8_next(s, j, d);
        if (char_class(d) != SPACE) break;
        last = j;
        j += l;
    }
    return (j < n && last > i) ? last : j;
}

// GPT-2 pre-tokens of text, as strings (the BPE trainer counts them)
inline std::vector<std::string> pretokenize(std::string_view text) {
    std::vector<std::string> out;
    for (size_t i = 0; i < text.size();) {
        const size_t j = piece_end(text, i);
        out.emplace_back(text.substr(i, j - i));
        i = j;
    }
    return out;
}

// A place to cut a text into parts that tokenize, each on its own, exactly as the whole
// does: no pre-token crosses it and none near it looks across it. Between two printable
// ASCII characters X and Y there are two such places:
//   X| Y   a single space: X's run ends at the space either way and " Y..." starts a piece;
//   X\n|Y  a single newline (or tab, CR, VT, FF): always a piece of its own.
// Returns the first cut at or after `from`, or npos when the text has none there.
inline size_t find_cut(std::string_view s, size_t from) {
    auto graphic = [](char c) { return c > ' ' && c < 0x7F; };
    for (size_t p = std::max<size_t>(from, 2); p + 1 < s.size(); p++) {
        if (s[p] == ' ' && graphic(s[p - 1]) && graphic(s[p + 1])) return p;
        if (s[p - 1] >= '\t' && s[p - 1] <= '\r' && graphic(s[p - 2]) && graphic(s[p])) return p;
    }
    return std::string_view::npos;
}

// (left id, right id) -> (merge rank, merged id): an open-addressing hash table
class PairTable {
public:
    struct Merge { int32_t rank, merged; };
    void reserve(size_t n) {
        size_t cap = 16;
        while (cap < 2 * n) cap *= 2;
        slots_.assign(cap, Slot{});
        mask_ = cap - 1;
    }
    void put(int32_t a, int32_t b, Merge m) {  // a later merge of the same pair replaces the earlier
        Slot* s = &slots_[slot(key(a, b))];
        s->key = key(a, b);
        s->m = m;
    }
    const Merge* find(int32_t a, int32_t b) const {
        const Slot& s = slots_[slot(key(a, b))];
        return s.key == key(a, b) ? &s.m : nullptr;
    }

private:
    static constexpr uint64_t EMPTY = ~0ULL;
    struct Slot { uint64_t key = EMPTY; Merge m{}; };
    std::vector<Slot> slots_;
    uint64_t mask_ = 0;
    static uint64_t key(int32_t a, int32_t b) { return (uint64_t)(uint32_t)a << 32 | (uint32_t)b; }
    size_t slot(uint64_t k) const {  // linear probing from a multiplicative hash
        size_t i = (size_t)((k * 0x9E3779B97F4A7C15ULL) >> 20) & mask_;
        while (slots_[i].key != EMPTY && slots_[i].key != k) i = (i + 1) & mask_;
        return i;
    }
};

// base64 (RFC 4648) of a SentencePiece model proto inside a JSON file
inline std::string base64_encode(const std::string& in) {
    static const char* abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string out;
    for (size_t i = 0; i < in.size(); i += 3) {
        const size_t n = std::min<size_t>(3, in.size() - i);  // n bytes: n + 1 characters, then '='
        uint32_t v = 0;
        for (size_t k = 0; k < 3; k++) v = v << 8 | (k < n ? (unsigned char)in[i + k] : 0u);
        for (size_t k = 0; k < 4; k++) out += k <= n ? abc[(v >> (18 - 6 * k)) & 63] : '=';
    }
    return out;
}
inline std::string base64_decode(const std::string& in, const std::string& what) {
    std::string out;
    uint32_t v = 0;
    int bits = 0;
    for (char c : in) {
        int d = c >= 'A' && c <= 'Z' ? c - 'A' : c >= 'a' && c <= 'z' ? c - 'a' + 26 : c >= '0' && c <= '9' ? c - '0' + 52
              : c == '+' ? 62 : c == '/' ? 63 : c == '=' ? -2 : -1;
        if (d == -2) break;
        if (d < 0) THROW("%s: not base64 (character 0x%02x)", what.c_str(), (unsigned char)c);
        v = v << 6 | (uint32_t)d;
        bits += 6;
        if (bits >= 8) { bits -= 8; out += (char)((v >> bits) & 0xff); }
    }
    return out;
}

}  // namespace bpe

class Tokenizer {
public:
    // The ids of frequent pieces, remembered: English repeats its words, so most pieces
    // skip the merging. One per thread; it forgets everything when full (bounded memory).
    class PieceCache {
    public:
        bool find(std::string_view piece, std::vector<uint32_t>& out) {
            key_.assign(piece);
            auto it = map_.find(key_);
            if (it == map_.end()) return false;
            out.insert(out.end(), ids_.begin() + it->second.first, ids_.begin() + it->second.first + it->second.second);
            return true;
        }
        void insert(std::string_view piece, const uint32_t* ids, size_t n) {
            if (piece.size() > kMaxPiece) return;
            if (map_.size() >= kMaxEntries) { map_.clear(); ids_.clear(); }
            map_.emplace(std::string(piece), std::make_pair((uint32_t)ids_.size(), (uint32_t)n));
            ids_.insert(ids_.end(), ids, ids + n);
        }

    private:
        static constexpr size_t kMaxPiece = 64, kMaxEntries = 1 << 17;
        std::unordered_map<std::string, std::pair<uint32_t, uint32_t>> map_;  // piece -> (offset, count) in ids_
        std::vector<uint32_t> ids_;
        std::string key_;
    };

    // GPT-2's files: encoder.json (printable token -> id) and vocab.bpe (merges, rank order)
    static Tokenizer load_gpt2(const std::string& encoder_json, const std::string& vocab_bpe) {
        Tokenizer t;
        nlohmann::json enc = read_json(encoder_json);
        std::vector<std::string> merges;
        const std::string text = read_file_or_throw(vocab_bpe, "tokenizer file");
        for (size_t p = 0; p < text.size();) {
            size_t e = text.find('\n', p);
            if (e == std::string::npos) e = text.size();
            std::string line = text.substr(p, e - p);
            p = e + 1;
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
        if (j.is_object() && j.contains("model") && j["model"].is_object() && j["model"].value("type", "") == "SentencePiece")
            return load_sentencepiece_json(j, path);
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
                    if (content.empty() || id < 0) THROW("'%s': added token %d '%s' is invalid", path.c_str(), id, content.c_str());
                    if (id >= (int)t.id_to_bytes_.size()) t.id_to_bytes_.resize(id + 1);
                    t.id_to_bytes_[id] = content;
                    t.specials_.push_back({content, id});
                }
        } catch (const nlohmann::json::exception& e) {
            THROW("'%s' is not a byte-level BPE tokenizer.json: %s", path.c_str(), e.what());
        }
        return t;
    }

    // A directory with encoder.json + vocab.bpe, a tokenizer.model (SentencePiece; before a
    // tokenizer.json beside it, which for such models is a conversion) or a tokenizer.json;
    // or the file itself (a .model is SentencePiece)
    static Tokenizer load(const std::string& path) {
        namespace fs = std::filesystem;
        if (fs::is_directory(path)) {
            if (fs::exists(path + "/encoder.json") && fs::exists(path + "/vocab.bpe"))
                return load_gpt2(path + "/encoder.json", path + "/vocab.bpe");
            if (fs::exists(path + "/tokenizer.model")) return load_sentencepiece(path + "/tokenizer.model");
            if (fs::exists(path + "/tokenizer.json")) return load_hf(path + "/tokenizer.json");
            THROW("tokenizer directory '%s' has neither encoder.json + vocab.bpe, tokenizer.model nor tokenizer.json",
                  path.c_str());
        }
        if (path.size() > 6 && path.compare(path.size() - 6, 6, ".model") == 0) return load_sentencepiece(path);
        return load_hf(path);
    }

    // A SentencePiece model file, and the special tokens added after its pieces that a
    // Hugging Face tokenizer_config.json beside it lists (added_tokens_decoder)
    static Tokenizer load_sentencepiece(const std::string& path) {
        Tokenizer t = from_sentencepiece(read_file_or_throw(path, "SentencePiece model"), path);
        const std::string tc = (std::filesystem::path(path).parent_path() / "tokenizer_config.json").string();
        if (std::filesystem::exists(tc)) {
            const nlohmann::json j = read_json(tc);
            std::map<int, std::string> added;
            if (j.is_object() && j.contains("added_tokens_decoder") && j["added_tokens_decoder"].is_object())
                for (auto& [id, v] : j["added_tokens_decoder"].items())
                    if (v.is_object() && v.contains("content") && v["content"].is_string()) added[std::stoi(id)] = v["content"];
            for (auto& [id, content] : added)
                if (id >= t.sp_->GetPieceSize()) {
                    if (id != t.vocab_size()) THROW("'%s': added token %d follows no token %d", tc.c_str(), id, t.vocab_size());
                    t.add_special_tokens({content});
                }
        }
        return t;
    }
    bool is_sentencepiece() const { return sp_ != nullptr; }
    std::string sentencepiece_proto() const { return sp_ ? std::string(sp_->serialized_model_proto()) : ""; }
    // special tokens (matched whole by encode) and their ids
    const std::vector<std::pair<std::string, int>>& special_tokens() const { return specials_; }

    void save_hf(const std::string& path) const {
        if (sp_) {  // this engine's own form (see the top): the model proto and the added tokens
            nlohmann::json added = nlohmann::json::array();
            for (auto& [s, id] : specials_)
                if (id >= sp_->GetPieceSize()) added.push_back({{"id", id}, {"content", s}, {"special", true}});
            write_json(path, {{"version", "1.0"}, {"added_tokens", added},
                              {"model", {{"type", "SentencePiece"}, {"proto", bpe::base64_encode(sentencepiece_proto())}}}});
            return;
        }
        nlohmann::json vocab = nlohmann::json::object(), merges = nlohmann::json::array(), added = nlohmann::json::array();
        std::vector<bool> special(id_to_bytes_.size(), false);
        for (auto& [s, id] : specials_) {
            special[id] = true;
            added.push_back({{"id", id}, {"content", s}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                             {"normalized", false}, {"special", true}});
        }
        for (size_t id = 0; id < id_to_bytes_.size(); id++)
            vocab[special[id] ? id_to_bytes_[id] : bpe::bytes_to_printable(id_to_bytes_[id])] = id;
        for (size_t r = 0; r < merges_.size(); r++) {
            auto [a, b] = merges_[r];
            if (pairs_.find(a, b)->rank != (int32_t)r) continue;  // replaced by a later merge of the same pair
            merges.push_back(bpe::bytes_to_printable(id_to_bytes_[a]) + " " + bpe::bytes_to_printable(id_to_bytes_[b]));
        }
        nlohmann::json j = {
            {"version", "1.0"}, {"added_tokens", added}, {"normalizer", nullptr},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
            {"post_processor", nullptr},
            {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
            {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
                       {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
                       {"vocab", vocab}, {"merges", merges}}}};
        write_json(path, j);
    }
    static void write_json(const std::string& path, const nlohmann::json& j) {
        const std::string text = j.dump(1) + "\n";
        StagedFiles out;
        const std::string tmp = out.stage(path);
        FILE* f = fopen_or_throw(tmp, "wb");
        const bool ok = fwrite(text.data(), 1, text.size(), f) == text.size();
        const int err = errno;
        if (fclose(f) != 0 || !ok) THROW("cannot write '%s': %s", tmp.c_str(), strerror(ok ? errno : err));
        out.commit();
    }

    // appends tokens that are not in the vocabulary yet (ChatML tokens for fine-tuning)
    void add_special_tokens(const std::vector<std::string>& tokens) {
        for (const std::string& s : tokens) {
            if (s.empty()) THROW("a special token cannot be empty");
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

    // special-token text becomes its id (for templates and tests)
    std::vector<uint32_t> encode(std::string_view text) const {
        std::vector<uint32_t> out;
        encode_into(text, out, true);
        return out;
    }
    // all text is ordinary text (document and message content)
    std::vector<uint32_t> encode_ordinary(std::string_view text) const {
        std::vector<uint32_t> out;
        encode_into(text, out, false);
        return out;
    }
    // appends the ids of text to out; `special`: special-token text becomes its id
    void encode_into(std::string_view text, std::vector<uint32_t>& out, bool special, PieceCache* cache = nullptr) const {
        size_t i = 0;
        if (special && !specials_.empty()) {
            std::vector<size_t> next(specials_.size(), 0);  // each special's next occurrence at or after i
            for (size_t k = 0; k < specials_.size(); k++) next[k] = text.find(specials_[k].first);
            for (;;) {
                size_t best = std::string_view::npos, best_k = 0;
                for (size_t k = 0; k < specials_.size(); k++) {
                    if (next[k] != std::string_view::npos && next[k] < i) next[k] = text.find(specials_[k].first, i);
                    // the earliest; the longest at a tie
                    if (next[k] < best || (next[k] == best && next[k] != std::string_view::npos &&
                                           specials_[k].first.size() > specials_[best_k].first.size())) {
                        best = next[k];
                        best_k = k;
                    }
                }
                if (best == std::string_view::npos) break;
                encode_text(text.substr(i, best - i), out, cache);
                out.push_back((uint32_t)specials_[best_k].second);
                i = best + specials_[best_k].first.size();
            }
        }
        encode_text(text.substr(i), out, cache);
    }

    std::string decode(const std::vector<uint32_t>& ids) const {
        std::string out;
        if (sp_) {  // runs of pieces through SentencePiece (spaces as it restores them), specials as their text
            std::vector<int> run;
            auto flush = [&] { out += sp_->DecodeIds(run); run.clear(); };
            for (uint32_t id : ids) {
                if (id >= id_to_bytes_.size()) THROW("token id %u is outside the vocabulary of %zu", id, id_to_bytes_.size());
                if (id < (uint32_t)sp_->GetPieceSize() && !sp_->IsControl((int)id)) { run.push_back((int)id); continue; }
                flush();
                out += id_to_bytes_[id];
            }
            flush();
            return out;
        }
        for (uint32_t id : ids) out += decode_token(id);
        return out;
    }
    std::string decode_token(uint32_t id) const {
        if (id >= id_to_bytes_.size()) THROW("token id %u is outside the vocabulary of %zu", id, id_to_bytes_.size());
        return id_to_bytes_[id];
    }

    int vocab_size() const { return (int)id_to_bytes_.size(); }
    // <|endoftext|>; a SentencePiece model without it ends a text with its </s>
    int eot_token() const {
        const int e = token_id("<|endoftext|>");
        return e < 0 && sp_ ? sp_->eos_id() : e;
    }
    int token_id(const std::string& s) const {
        for (auto& [sp, id] : specials_) if (sp == s) return id;
        if (sp_) {
            const int id = sp_->PieceToId(s);
            return id != sp_->unk_id() || s == sp_->IdToPiece(sp_->unk_id()) ? id : -1;
        }
        auto it = printable_to_id_.find(bpe::bytes_to_printable(s));
        return it == printable_to_id_.end() ? -1 : it->second;
    }

    // for the trainer: a tokenizer from byte sequences of ids and ordered merges
    static Tokenizer from_parts(const std::vector<std::string>& id_to_bytes,
                                const std::vector<std::pair<std::string, std::string>>& merges) {
        nlohmann::json vocab = nlohmann::json::object();
        for (size_t id = 0; id < id_to_bytes.size(); id++) vocab[bpe::bytes_to_printable(id_to_bytes[id])] = id;
        std::vector<std::string> lines;
        for (auto& [a, b] : merges) lines.push_back(bpe::bytes_to_printable(a) + " " + bpe::bytes_to_printable(b));
        Tokenizer t;
        t.build(vocab, lines, "trained BPE");
        t.id_to_bytes_ = id_to_bytes;  // ids whose bytes repeat an earlier token's keep them for decode
        return t;
    }

private:
    std::shared_ptr<const sentencepiece::SentencePieceProcessor> sp_;  // a SentencePiece model, or null (BPE)
    std::vector<std::string> id_to_bytes_;                 // raw bytes of each token
    std::unordered_map<std::string, int> printable_to_id_;  // printable form -> id
    std::vector<std::pair<std::string, int>> specials_;     // matched whole, never split
    std::vector<std::pair<int32_t, int32_t>> merges_;       // the merges' (left, right) ids in rank order
    bpe::PairTable pairs_;                                  // (left, right) -> rank, merged id
    std::array<int32_t, 256> byte_id_{};                    // each byte's token (-1: none)

    static nlohmann::json read_json(const std::string& path) {
        const std::string text = read_file_or_throw(path, "tokenizer file");
        try { return nlohmann::json::parse(text); } catch (const std::exception& e) {
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
        auto id_of = [&](const std::string& printable) {
            auto it = printable_to_id_.find(printable);
            return it == printable_to_id_.end() ? -1 : it->second;
        };
        for (int b = 0; b < 256; b++) byte_id_[b] = id_of(bpe::bytes_to_printable(std::string(1, (char)b)));
        pairs_.reserve(merges.size());
        for (size_t r = 0; r < merges.size(); r++) {
            const size_t sp = merges[r].find(' ');
            if (sp == std::string::npos || merges[r].find(' ', sp + 1) != std::string::npos)
                THROW("'%s': merge %zu '%s' is not 'a b'", path.c_str(), r, merges[r].c_str());
            const std::string a = merges[r].substr(0, sp), b = merges[r].substr(sp + 1);
            const int ia = id_of(a), ib = id_of(b), iab = id_of(a + b);
            for (auto [tok, id] : {std::make_pair(a, ia), std::make_pair(b, ib), std::make_pair(a + b, iab)})
                if (id < 0) THROW("'%s': merge %zu '%s' needs '%s', which is not in the vocabulary", path.c_str(), r,
                                  merges[r].c_str(), tok.c_str());
            merges_.push_back({ia, ib});
            pairs_.put(ia, ib, {(int32_t)r, iab});
        }
    }

    // A SentencePiece model from its serialized proto. Each piece's text for decode_token:
    // U+2581 as a space, a byte piece <0xAB> as its byte, control pieces (<s>, </s>, the
    // special tokens) as written.
    static Tokenizer from_sentencepiece(const std::string& proto, const std::string& origin) {
        auto sp = std::make_shared<sentencepiece::SentencePieceProcessor>();
        const auto st = sp->LoadFromSerializedProto(proto);
        if (!st.ok()) THROW("'%s' is not a SentencePiece model: %s", origin.c_str(), st.ToString().c_str());
        Tokenizer t;
        const int n = sp->GetPieceSize();
        t.id_to_bytes_.resize(n);
        for (int id = 0; id < n; id++) {
            const std::string& piece = sp->IdToPiece(id);
            std::string& b = t.id_to_bytes_[id];
            if (sp->IsByte(id)) b = std::string(1, (char)std::stoi(piece.substr(3, 2), nullptr, 16));
            else if (sp->IsControl(id) || sp->IsUnknown(id)) b = piece;
            else
                for (size_t i = 0; i < piece.size(); i++) {
                    if (piece.compare(i, 3, "\xe2\x96\x81") == 0) { b += ' '; i += 2; }
                    else b += piece[i];
                }
            if (sp->IsControl(id)) t.specials_.push_back({piece, id});
        }
        t.sp_ = sp;
        return t;
    }
    static Tokenizer load_sentencepiece_json(const nlohmann::json& j, const std::string& path) {
        try {
            Tokenizer t = from_sentencepiece(bpe::base64_decode(j["model"].at("proto").get<std::string>(), path), path);
            std::vector<std::pair<int, std::string>> added;
            for (const auto& a : j.value("added_tokens", nlohmann::json::array())) added.push_back({a.at("id"), a.at("content")});
            std::sort(added.begin(), added.end());
            for (auto& [id, content] : added) {
                if (id != t.vocab_size()) THROW("'%s': added token %d follows no token %d", path.c_str(), id, t.vocab_size());
                t.add_special_tokens({content});
            }
            return t;
        } catch (const nlohmann::json::exception& e) {
            THROW("'%s' is not a SentencePiece tokenizer.json: %s", path.c_str(), e.what());
        }
    }

    // ordinary text: piece by piece (a SentencePiece model encodes it whole)
    void encode_text(std::string_view text, std::vector<uint32_t>& out, PieceCache* cache) const {
        if (sp_) {
            if (text.empty()) return;
            std::vector<int> ids;
            const auto st = sp_->Encode(text, &ids);
            if (!st.ok()) THROW("SentencePiece cannot encode the text: %s", st.ToString().c_str());
            out.insert(out.end(), ids.begin(), ids.end());
            return;
        }
        for (size_t i = 0; i < text.size();) {
            const size_t j = bpe::piece_end(text, i);
            encode_piece(text.substr(i, j - i), out, cache);
            i = j;
        }
    }

    int32_t byte_token(unsigned char b) const {
        if (byte_id_[b] < 0) THROW("the tokenizer has no token for the byte 0x%02x", b);
        return byte_id_[b];
    }

    void encode_piece(std::string_view piece, std::vector<uint32_t>& out, PieceCache* cache) const {
        if (piece.size() == 1) { out.push_back((uint32_t)byte_token(piece[0])); return; }
        if (cache && cache->find(piece, out)) return;
        const size_t start = out.size();
        merge_piece(piece, out);
        if (cache) cache->insert(piece, out.data() + start, out.size() - start);
    }

    // BPE of one piece: GPT-2's loop, "merge every occurrence of the lowest-ranked pair, left
    // to right, and again", rescanning the piece each time for a short one (most pieces: a
    // word, a number), and the same merges in O(n log n) for a long one (merge_long).
    static constexpr size_t kShortPiece = 32;
    void merge_piece(std::string_view piece, std::vector<uint32_t>& out) const {
        if (piece.size() > kShortPiece) { merge_long(piece, out); return; }
        int32_t ids[kShortPiece];
        size_t n = piece.size();
        for (size_t k = 0; k < n; k++) ids[k] = byte_token(piece[k]);
        for (;;) {
            int32_t best = INT32_MAX;
            for (size_t k = 0; k + 1 < n; k++)
                if (const auto* m = pairs_.find(ids[k], ids[k + 1])) best = std::min(best, m->rank);
            if (best == INT32_MAX) break;
            size_t w = 0;
            for (size_t k = 0; k < n; k++) {
                const auto* m = k + 1 < n ? pairs_.find(ids[k], ids[k + 1]) : nullptr;
                if (m && m->rank == best) {
                    ids[w++] = m->merged;
                    k++;
                } else {
                    ids[w++] = ids[k];
                }
            }
            n = w;
        }
        out.insert(out.end(), ids, ids + n);
    }

    // BPE of a long piece. Symbols form a linked list over the piece's byte positions (a merged
    // symbol keeps its left position). Adjacent pairs that have a merge wait in a bucket per
    // rank, the ranks in use in a min-heap (small: at most one entry per merge). The lowest
    // rank's positions are merged left to right, stale ones (a neighbour merged first)
    // skipped, before the pairs they create are added: GPT-2's "every occurrence of the best
    // pair, left to right", exactly, whatever the order of a file's merges. O(n log n) for a
    // piece of n bytes.
    void merge_long(std::string_view piece, std::vector<uint32_t>& out) const {
        const size_t n = piece.size();
        if (n >= (1ULL << 31)) THROW("a pre-token of %zu bytes is longer than the 2^31 the merge handles", n);
        thread_local std::vector<int32_t> id, prev, next, ranks, phase, merged_at;
        thread_local std::vector<std::vector<int32_t>> bucket;  // positions of pairs, by rank
        if (bucket.size() < merges_.size()) bucket.resize(merges_.size());
        id.resize(n);
        prev.resize(n);
        next.resize(n);
        ranks.clear();
        const auto later = std::greater<int32_t>();
        auto push = [&](int32_t p) {  // the pair starting at symbol p, if it has a merge
            if (p < 0 || next[p] >= (int32_t)n) return;
            if (const auto* m = pairs_.find(id[p], id[next[p]])) {
                std::vector<int32_t>& b = bucket[m->rank];
                if (b.empty()) {
                    ranks.push_back(m->rank);
                    std::push_heap(ranks.begin(), ranks.end(), later);
                }
                b.push_back(p);
            }
        };
        for (size_t k = 0; k < n; k++) {
            id[k] = byte_token(piece[k]);
            prev[k] = (int32_t)k - 1;
            next[k] = (int32_t)k + 1;
        }
        for (size_t k = 0; k + 1 < n; k++) push((int32_t)k);
        while (!ranks.empty()) {
            const int32_t rank = ranks.front();
            std::pop_heap(ranks.begin(), ranks.end(), later);
            ranks.pop_back();
            phase.clear();
            phase.swap(bucket[rank]);
            std::sort(phase.begin(), phase.end());
            merged_at.clear();
            for (int32_t p : phase) {
                if (id[p] < 0 || next[p] >= (int32_t)n) continue;
                const auto* m = pairs_.find(id[p], id[next[p]]);
                if (!m || m->rank != rank) continue;  // stale
                const int32_t q = next[p];
                id[p] = m->merged;
                id[q] = -1;
                next[p] = next[q];
                if (next[q] < (int32_t)n) prev[next[q]] = p;
                merged_at.push_back(p);
            }
            for (int32_t p : merged_at) {
                push(prev[p]);
                push(p);
            }
        }
        for (int32_t k = 0; k < (int32_t)n; k = next[k]) out.push_back((uint32_t)id[k]);
    }
};
