// Supervised fine-tuning data (host only): instruction records to tokens and a loss mask.
//
// Records, one JSON object per line of a .jsonl file:
//   Alpaca: {"instruction": "...", "input": "..." (optional), "output": "..."}
//           one user turn (the template's input_join of instruction and input, or the
//           instruction alone when input is absent or empty) and one assistant turn (output)
//   chat:   {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
//
// A template renders every turn as prefix + content + suffix (each piece tokenized on its
// own, so the pieces' token boundaries are the same in training and at generation). The
// default, ChatML:
//   <|im_start|>system\n{content}<|im_end|>\n          (when there is a system turn)
//   <|im_start|>user\n{content}<|im_end|>\n
//   <|im_start|>assistant\n{content}<|im_end|>\n
// Content is ordinary text (Tokenizer::encode_ordinary): a message holding "<|im_end|>" or
// "<|endoftext|>" cannot forge a turn or a stop token; only the template's prefixes and
// suffixes produce special ids (render's allow_special reads content's specials too).
// Loss mask: 1 on the content of every assistant turn and on its suffix up to and including
// the template's stop token (all of the suffix if the stop token is not in it): the model
// learns the response and to end it. With <|endoftext|> as the stop token (the Alpaca
// template), the end-of-text token that closes the example is trained too. Everything else
// (system and user turns, the assistant prefix, padding) is 0.
//
// Layout in a shard: EOT ex1 EOT ex2 EOT ... exN EOT, so every example is preceded and
// followed by the end-of-text token (the shard convention: EOT opens every document). With
// a sequence length T (SftStream), examples never straddle a loader window: an example that
// would cross position k*T is moved to the next window and the gap filled with EOT tokens of
// mask 0; the stream then ends at a window boundary plus one token (no example is cut off
// by the loader's last partial window). An example's length is its tokens plus one
// end-of-text token; it fits the context if length <= T.
#pragma once
#include <algorithm>
#include <map>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "common.h"
#include "tokenizer.h"

namespace sft {

struct Turn { std::string role, content; };

struct Template {
    std::string name = "chatml";
    // prefix and suffix of each role's turn
    std::map<std::string, std::pair<std::string, std::string>> roles = {
        {"system", {"<|im_start|>system\n", "<|im_end|>\n"}},
        {"user", {"<|im_start|>user\n", "<|im_end|>\n"}},
        {"assistant", {"<|im_start|>assistant\n", "<|im_end|>\n"}}};
    std::string stop = "<|im_end|>";                         // one token: ends a response
    std::string input_join = "{instruction}\n\n{input}";      // Alpaca instruction + input -> user turn
    std::string default_system;                               // a system turn for examples without one
    std::vector<std::string> specials = {"<|im_start|>", "<|im_end|>"};  // added to the tokenizer
};

inline nlohmann::json template_to_json(const Template& t) {
    nlohmann::json j = {{"name", t.name}, {"stop", t.stop}, {"input_join", t.input_join},
                        {"default_system", t.default_system}, {"specials", t.specials}};
    for (auto& [role, ps] : t.roles) j[role] = {ps.first, ps.second};
    return j;
}

// JSON keys: "user", "assistant" ([prefix, suffix]), "stop" required; "system",
// "input_join", "default_system", "specials", "name" optional.
inline Template template_from_json(const nlohmann::json& j, const std::string& where) {
    Template t;
    t.roles.clear();
    t.specials.clear();
    t.name = where;
    try {
        if (!j.is_object()) THROW("%s: a template is a JSON object", where.c_str());
        for (auto& [key, v] : j.items()) {
            if (key == "system" || key == "user" || key == "assistant") {
                if (!v.is_array() || v.size() != 2 || !v[0].is_string() || !v[1].is_string())
                    THROW("%s: '%s' must be [prefix, suffix] (two strings)", where.c_str(), key.c_str());
                t.roles[key] = {v[0].get<std::string>(), v[1].get<std::string>()};
            } else if (key == "stop") t.stop = v.get<std::string>();
            else if (key == "input_join") t.input_join = v.get<std::string>();
            else if (key == "default_system") t.default_system = v.get<std::string>();
            else if (key == "specials") t.specials = v.get<std::vector<std::string>>();
            else if (key == "name") t.name = v.get<std::string>();
            else THROW("%s: unknown template key '%s'", where.c_str(), key.c_str());
        }
    } catch (const nlohmann::json::exception& e) {
        THROW("%s: bad template value: %s", where.c_str(), e.what());
    }
    for (const char* need : {"user", "assistant"})
        if (!t.roles.count(need)) THROW("%s: the template has no '%s' [prefix, suffix]", where.c_str(), need);
    if (t.stop.empty()) THROW("%s: the template has no 'stop' token", where.c_str());
    return t;
}

// chatml (the default) or alpaca (Stanford Alpaca's prompt, the response closed by <|endoftext|>)
inline Template builtin_template(const std::string& name) {
    Template t;
    if (name == "chatml") return t;
    if (name == "alpaca") {
        t.name = "alpaca";
        t.roles = {{"system", {"", "\n\n"}}, {"user", {"### Instruction:\n", "\n\n"}},
                   {"assistant", {"### Response:\n", "\n\n"}}};
        t.stop = "<|endoftext|>";
        t.input_join = "{instruction}\n\n### Input:\n{input}";
        t.default_system = "Below is an instruction that describes a task. Write a response that appropriately "
                           "completes the request.";
        return t;
    }
    THROW("unknown template '%s' (chatml, alpaca, or a template .json file)", name.c_str());
}

// a built-in name or a .json file
inline Template load_template(const std::string& name_or_path) {
    if (name_or_path.size() > 5 && name_or_path.substr(name_or_path.size() - 5) == ".json") {
        const std::string text = read_file_or_throw(name_or_path, "template");
        nlohmann::json j;
        try { j = nlohmann::json::parse(text); } catch (const std::exception& e) {
            THROW("template '%s' is not valid JSON: %s", name_or_path.c_str(), e.what());
        }
        return template_from_json(j, "template '" + name_or_path + "'");
    }
    return builtin_template(name_or_path);
}

// Adds the template's special tokens (and ChatML's, which every SFT tokenizer carries) to
// the tokenizer; checks that the stop string is one token.
inline void add_template_specials(Tokenizer& tok, const Template& t) {
    std::vector<std::string> sp = {"<|im_start|>", "<|im_end|>"};
    for (auto& s : t.specials) if (std::find(sp.begin(), sp.end(), s) == sp.end()) sp.push_back(s);
    tok.add_special_tokens(sp);
    if (tok.eot_token() < 0) THROW("the tokenizer has no <|endoftext|> token to separate examples");
    if (tok.encode(t.stop).size() != 1)
        THROW("template stop '%s' is not a single token (list it in the template's \"specials\")", t.stop.c_str());
}

inline std::string replace_all(std::string s, const std::string& from, const std::string& to) {
    for (size_t p = 0; (p = s.find(from, p)) != std::string::npos; p += to.size()) s.replace(p, from.size(), to);
    return s;
}

enum class Format { Auto, Alpaca, Chat };

// One JSONL record to turns; `where` ("'FILE' line N") prefixes every error.
inline std::vector<Turn> parse_record(const nlohmann::json& j, const Template& t, Format fmt, const std::string& where,
                                      bool* is_chat = nullptr) {
    if (!j.is_object()) THROW("%s: a record must be a JSON object", where.c_str());
    if (fmt == Format::Auto) fmt = j.contains("messages") ? Format::Chat : Format::Alpaca;
    if (is_chat) *is_chat = fmt == Format::Chat;
    std::vector<Turn> turns;
    auto str_field = [&](const nlohmann::json& o, const char* key, const std::string& ctx) -> std::string {
        if (!o.contains(key)) THROW("%s: missing field '%s'%s", where.c_str(), key, ctx.c_str());
        if (!o[key].is_string()) THROW("%s: field '%s'%s is not a string", where.c_str(), key, ctx.c_str());
        return o[key].get<std::string>();
    };
    if (fmt == Format::Chat) {
        if (!j.contains("messages")) THROW("%s: missing field 'messages' (chat format)", where.c_str());
        const auto& m = j["messages"];
        if (!m.is_array() || m.empty()) THROW("%s: 'messages' must be a non-empty array", where.c_str());
        for (size_t i = 0; i < m.size(); i++) {
            std::string ctx = strformat(" of message %zu", i);
            if (!m[i].is_object()) THROW("%s: message %zu is not an object", where.c_str(), i);
            Turn turn{str_field(m[i], "role", ctx), str_field(m[i], "content", ctx)};
            if (!t.roles.count(turn.role))
                THROW("%s: message %zu has role '%s', which the template '%s' does not know", where.c_str(), i,
                      turn.role.c_str(), t.name.c_str());
            turns.push_back(turn);
        }
    } else {
        std::string instruction = str_field(j, "instruction", " (Alpaca format)");
        std::string output = str_field(j, "output", " (Alpaca format)");
        std::string input;
        if (j.contains("input") && !j["input"].is_null()) input = str_field(j, "input", "");
        std::string user = input.empty() ? instruction
                                         : replace_all(replace_all(t.input_join, "{instruction}", instruction), "{input}", input);
        if (j.contains("system") && j["system"].is_string()) turns.push_back({"system", j["system"].get<std::string>()});
        turns.push_back({"user", user});
        turns.push_back({"assistant", output});
    }
    if (!t.default_system.empty() && turns[0].role != "system") {
        if (!t.roles.count("system")) THROW("template '%s' has a default system text but no system turn", t.name.c_str());
        turns.insert(turns.begin(), Turn{"system", t.default_system});
    }
    return turns;
}

// tokens of one example (without the end-of-text tokens around it) and their mask;
// close_mask: the mask of the end-of-text token that follows it
struct Rendered {
    std::vector<uint32_t> tokens;
    std::vector<uint8_t> mask;
    uint8_t close_mask = 0;
    size_t trained() const { size_t n = close_mask; for (uint8_t m : mask) n += m; return n; }
};

// special: special-token text in `text` becomes those tokens (template pieces), else it is text
inline void append_piece(Rendered& r, const Tokenizer& tok, const std::string& text, uint8_t m, bool special) {
    tok.encode_into(text, r.tokens, special);
    r.mask.resize(r.tokens.size(), m);
}

inline Rendered render(const std::vector<Turn>& turns, const Template& t, const Tokenizer& tok,
                       bool allow_special = false) {
    Rendered r;
    const int stop = tok.token_id(t.stop), eot = tok.eot_token();
    for (size_t i = 0; i < turns.size(); i++) {
        auto it = t.roles.find(turns[i].role);
        if (it == t.roles.end()) THROW("template '%s' has no role '%s'", t.name.c_str(), turns[i].role.c_str());
        const bool assistant = turns[i].role == "assistant";
        append_piece(r, tok, it->second.first, 0, true);
        append_piece(r, tok, turns[i].content, assistant ? 1 : 0, allow_special);
        bool stopped = false;
        for (uint32_t id : tok.encode(it->second.second)) {
            r.tokens.push_back(id);
            r.mask.push_back(assistant && !stopped ? 1 : 0);
            stopped |= (int)id == stop;
        }
        if (assistant && i + 1 == turns.size() && !stopped && stop == eot) r.close_mask = 1;
    }
    return r;
}

// The prompt for generation: EOT, the turns, then the assistant prefix (the model writes
// the response and its stop token next).
inline std::vector<uint32_t> render_prompt(std::vector<Turn> turns, const Template& t, const Tokenizer& tok) {
    if (!t.default_system.empty() && (turns.empty() || turns[0].role != "system"))
        turns.insert(turns.begin(), Turn{"system", t.default_system});
    Rendered r = render(turns, t, tok);
    std::vector<uint32_t> out = {(uint32_t)tok.eot_token()};
    out.insert(out.end(), r.tokens.begin(), r.tokens.end());
    auto it = t.roles.find("assistant");
    for (uint32_t id : tok.encode(it->second.first)) out.push_back(id);
    return out;
}

// Truncates an example to `max_len` (its tokens plus the closing end-of-text token);
// returns false if nothing to learn remains.
inline bool truncate(Rendered& r, size_t max_len) {
    if (r.tokens.size() + 1 <= max_len) return true;
    size_t keep = max_len > 0 ? max_len - 1 : 0;
    r.tokens.resize(keep);
    r.mask.resize(keep);
    r.close_mask = 0;  // the response was cut before its end
    return r.trained() > 0;
}

// The token stream of one split (layout above). T = 0: plain concatenation.
struct SftStream {
    int T = 0;
    uint32_t eot = 0;
    std::vector<uint32_t> tokens;
    std::vector<uint8_t> mask;
    size_t examples = 0, pad_tokens = 0;

    SftStream(int T_, uint32_t eot_) : T(T_), eot(eot_), tokens{eot_}, mask{0} {}

    // end-of-text tokens (mask 0) until the last token sits at index `idx`
    void pad_to(size_t idx) {
        while (tokens.size() - 1 < idx) { tokens.push_back(eot); mask.push_back(0); pad_tokens++; }
    }
    void add(const Rendered& r) {
        const size_t R = r.tokens.size();
        if (T > 0) {
            if (R + 1 > (size_t)T) THROW("an example of %zu tokens does not fit the sequence length %d", R + 1, T);
            const size_t k = (tokens.size() - 1) / T;  // the window of the last end-of-text token
            if (tokens.size() + R > (k + 1) * (size_t)T) pad_to((k + 1) * (size_t)T);
        }
        tokens.insert(tokens.end(), r.tokens.begin(), r.tokens.end());
        mask.insert(mask.end(), r.mask.begin(), r.mask.end());
        tokens.push_back(eot);
        mask.push_back(r.close_mask);
        examples++;
    }
    // with T: pad to a window boundary plus one token, so the loader sees every window
    void finish() {
        if (T > 0) pad_to(ceil_div(tokens.size() - 1, (size_t)T) * T);
    }
    size_t trained() const { size_t n = 0; for (uint8_t m : mask) n += m; return n; }
};

}  // namespace sft
