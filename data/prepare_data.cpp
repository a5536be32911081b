// prepare_data: text and JSONL to token shards, shard inspection, BPE training, and the
// Brown corpus converter used by data/prepare_default.sh. Shard format: dataloader.h.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "common.h"
#include "dataloader.h"
#include "tokenizer.h"
#include "data/bpe_trainer.h"
#include "data/sft.h"

namespace fs = std::filesystem;

static const char* USAGE =
    "usage:\n"
    "  prepare_data shards --tokenizer PATH --out DIR [--name NAME] [--shard-tokens N]\n"
    "               [--val-fraction F | --val-docs N] [--jsonl-field FIELD] [--seed S] INPUT...\n"
    "      INPUT: a text file (one document), a .jsonl file (one document per line, the string\n"
    "      FIELD, default \"text\"), or a directory (its *.txt and *.jsonl files, recursively).\n"
    "      Each document is preceded by the EOT token. Validation takes every (1/F)-th document\n"
    "      (default F 0.05; --seed S, default 0, picks the offset) or the first N documents.\n"
    "      Writes DIR/NAME_val_000000.bin, DIR/NAME_train_000000.bin, ... of at most N tokens\n"
    "      (default name \"data\", default 100000000 tokens per shard).\n"
    "  prepare_data inspect [--tokenizer PATH] [--n N] SHARD\n"
    "      header, dtype, id range, document count and the first N tokens (default 64) decoded.\n"
    "  prepare_data train-bpe --vocab-size N --out tokenizer.json [--special TOK ...] INPUT...\n"
    "      byte-level BPE on INPUT (as for shards); default special token <|endoftext|>.\n"
    "  prepare_data sft --tokenizer PATH --out DIR [--name NAME] [--template chatml|alpaca|FILE.json]\n"
    "               [--system TEXT] [--format auto|alpaca|chat] [--seq-len T] [--max-len N]\n"
    "               [--overflow truncate|drop] [--val-fraction F | --val-examples N] [--seed S] INPUT...\n"
    "      instruction data for fine-tuning. INPUT: a .jsonl file (or a directory of them) of Alpaca\n"
    "      records {instruction, input (optional), output} or chat records {messages: [{role,\n"
    "      content}, ...]} (--format auto tells them apart by the 'messages' key). Each example is\n"
    "      rendered with the template (default chatml: <|im_start|>ROLE\\nCONTENT<|im_end|>\\n per turn;\n"
    "      --system TEXT adds a system turn to examples without one) and written as EOT ex EOT ex\n"
    "      ... EOT into DIR/NAME_{train,val}_000000.bin (default name \"sft\") with a loss mask\n"
    "      SHARD.mask: 1 on every response and the stop token that ends it, 0 elsewhere.\n"
    "      --seq-len T (default 256; 0: plain concatenation) keeps each example inside one T-token\n"
    "      training window (the gap padded with masked EOT tokens). Examples longer than --max-len\n"
    "      tokens (default T; an example's tokens + 1 EOT) are truncated or dropped (--overflow,\n"
    "      default truncate). Validation takes every (1/F)-th example (default F 0.1) or the first N.\n"
    "      Also writes DIR/tokenizer.json (the tokenizer plus <|im_start|>, <|im_end|>) and\n"
    "      DIR/template.json, which finetune_mamba reads.\n"
    "  prepare_data brown SRC_DIR OUT_DIR\n"
    "      the tagged Brown corpus (files ca01..cr09 in SRC_DIR) to plain text, one OUT_DIR/<id>.txt\n"
    "      per text.\n";

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Flags of one subcommand: `--name value` pairs (a flag in `multi` may repeat) and positionals.
struct Args {
    std::map<std::string, std::vector<std::string>> flags;
    std::vector<std::string> positional;

    Args(int argc, char** argv, const std::vector<std::string>& known) {
        for (int i = 0; i < argc; i++) {
            std::string a = argv[i];
            if (a.rfind("--", 0) != 0) { positional.push_back(a); continue; }
            if (std::find(known.begin(), known.end(), a) == known.end())
                throw UsageError(strformat("unknown flag '%s'", a.c_str()));
            if (i + 1 >= argc) throw UsageError(strformat("flag '%s' needs a value", a.c_str()));
            flags[a].push_back(argv[++i]);
        }
    }
    bool has(const std::string& f) const { return flags.count(f) > 0; }
    std::string str(const std::string& f, const std::string& def = "") const {
        auto it = flags.find(f);
        if (it == flags.end()) return def;
        if (it->second.size() > 1) throw UsageError(strformat("flag '%s' given more than once", f.c_str()));
        return it->second[0];
    }
    std::string required(const std::string& f) const {
        if (!has(f)) throw UsageError(strformat("missing required flag '%s'", f.c_str()));
        return str(f);
    }
    long long integer(const std::string& f, long long def) const {
        if (!has(f)) return def;
        std::string v = str(f);
        char* end;
        long long x = strtoll(v.c_str(), &end, 10);
        if (v.empty() || *end) throw UsageError(strformat("flag '%s' wants an integer, got '%s'", f.c_str(), v.c_str()));
        return x;
    }
    double real(const std::string& f, double def) const {
        if (!has(f)) return def;
        std::string v = str(f);
        char* end;
        double x = strtod(v.c_str(), &end);
        if (v.empty() || *end) throw UsageError(strformat("flag '%s' wants a number, got '%s'", f.c_str(), v.c_str()));
        return x;
    }
};

static std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) THROW("cannot open '%s'", path.c_str());
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

static bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The input files: files as given, directories as their files (recursively, sorted) whose
// names end in one of `exts`.
static std::vector<std::string> input_files(const std::vector<std::string>& inputs, const std::vector<std::string>& exts) {
    std::vector<std::string> files;
    for (auto& in : inputs) {
        if (fs::is_directory(in)) {
            std::vector<std::string> found;
            for (auto& e : fs::recursive_directory_iterator(in)) {
                std::string p = e.path().string();
                for (auto& x : exts)
                    if (e.is_regular_file() && ends_with(p, x)) { found.push_back(p); break; }
            }
            std::string names;
            for (auto& x : exts) names += (names.empty() ? "*" : " or *") + x;
            if (found.empty()) THROW("directory '%s' holds no %s file", in.c_str(), names.c_str());
            std::sort(found.begin(), found.end());
            files.insert(files.end(), found.begin(), found.end());
        } else if (fs::is_regular_file(in)) {
            files.push_back(in);
        } else {
            THROW("input '%s' is neither a file nor a directory", in.c_str());
        }
    }
    return files;
}

// Calls `doc` for every document of the inputs, in order (directories sorted).
static void for_each_document(const std::vector<std::string>& inputs, const std::string& jsonl_field,
                              const std::function<void(const std::string&)>& doc) {
    const std::vector<std::string> files = input_files(inputs, {".txt", ".jsonl"});
    for (auto& path : files) {
        if (!ends_with(path, ".jsonl")) {
            doc(read_file(path));
            continue;
        }
        std::ifstream f(path, std::ios::binary);
        if (!f) THROW("cannot open '%s'", path.c_str());
        std::string line;
        for (long lineno = 1; std::getline(f, line); lineno++) {
            if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
            nlohmann::json j;
            try {
                j = nlohmann::json::parse(line);
            } catch (const std::exception& e) {
                THROW("'%s' line %ld is not valid JSON: %s", path.c_str(), lineno, e.what());
            }
            if (!j.is_object() || !j.contains(jsonl_field) || !j[jsonl_field].is_string())
                THROW("'%s' line %ld has no string field '%s'", path.c_str(), lineno, jsonl_field.c_str());
            doc(j[jsonl_field].get<std::string>());
        }
    }
}

static double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ----------------------------------------------------------------------------
// shards

// Collects one split's tokens and writes a shard each time `shard_tokens` are ready.
struct ShardSink {
    std::string prefix;  // DIR/NAME_split_
    size_t shard_tokens;
    int vocab_size;
    std::vector<uint32_t> buf = {};
    int shards = 0;
    size_t tokens = 0, docs = 0;

    void add(const std::vector<uint32_t>& doc) {
        buf.insert(buf.end(), doc.begin(), doc.end());
        tokens += doc.size();
        docs++;
        while (buf.size() >= shard_tokens) {
            std::vector<uint32_t> shard(buf.begin(), buf.begin() + shard_tokens);
            buf.erase(buf.begin(), buf.begin() + shard_tokens);
            write(shard);
        }
    }
    void finish() {
        if (!buf.empty()) write(buf);
        buf.clear();
    }
    void write(const std::vector<uint32_t>& shard) {
        write_shard(strformat("%s%06d.bin", prefix.c_str(), shards++), shard, vocab_size);
    }
};

static void cmd_shards(int argc, char** argv) {
    Args a(argc, argv, {"--tokenizer", "--out", "--name", "--shard-tokens", "--val-fraction", "--val-docs",
                        "--jsonl-field", "--seed"});
    if (a.positional.empty()) throw UsageError("shards: no INPUT given");
    if (a.has("--val-fraction") && a.has("--val-docs")) throw UsageError("give --val-fraction or --val-docs, not both");
    const std::string out = a.required("--out"), name = a.str("--name", "data");
    const long long shard_tokens = a.integer("--shard-tokens", 100000000);
    const double val_fraction = a.has("--val-docs") ? 0.0 : a.real("--val-fraction", 0.05);
    const long long val_docs = a.integer("--val-docs", 0);
    const uint64_t seed = (uint64_t)a.integer("--seed", 0);
    if (shard_tokens <= 0 || shard_tokens > INT32_MAX) throw UsageError("--shard-tokens must be in [1, 2^31)");
    if (val_fraction < 0 || val_fraction > 1) throw UsageError("--val-fraction must be in [0, 1]");
    if (val_docs < 0) throw UsageError("--val-docs must be >= 0");

    Tokenizer tok = Tokenizer::load(a.required("--tokenizer"));
    const int eot = tok.eot_token();
    if (eot < 0) THROW("tokenizer '%s' has no <|endoftext|> token to separate documents", a.str("--tokenizer").c_str());
    fs::create_directories(out);
    // a rerun replaces the whole set: stale shards of an earlier, larger run would mix in
    for (auto& old : glob_sorted(out + "/" + name + "_train_*.bin")) fs::remove(old);
    for (auto& old : glob_sorted(out + "/" + name + "_val_*.bin")) fs::remove(old);

    ShardSink train{out + "/" + name + "_train_", (size_t)shard_tokens, tok.vocab_size()};
    ShardSink val{out + "/" + name + "_val_", (size_t)shard_tokens, tok.vocab_size()};
    auto t0 = std::chrono::steady_clock::now();
    double last_print = 0;
    size_t docs = 0, bytes = 0;
    auto progress = [&](const char* tag) {
        double dt = std::max(seconds_since(t0), 1e-9);
        size_t toks = train.tokens + val.tokens;
        printf("%s %zu docs (%zu val), %zu tokens (%zu val), %.1f MB text, %.0f tokens/s, %.2f MB/s, %.1f s\n", tag,
               docs, val.docs, toks, val.tokens, bytes / 1e6, toks / dt, bytes / 1e6 / dt, dt);
        fflush(stdout);
    };
    const double val_offset = (SplitMix64(seed).next() >> 11) * 0x1.0p-53;
    std::vector<uint32_t> ids;
    for_each_document(a.positional, a.str("--jsonl-field", "text"), [&](const std::string& text) {
        // a systematic sample: document i is val when i*F + offset crosses an integer, so val
        // takes a fraction F spread evenly over the input order (Brown's genres alike)
        bool is_val = val_fraction > 0 ? std::floor((docs + 1) * val_fraction + val_offset) >
                                             std::floor(docs * val_fraction + val_offset)
                                       : (long long)docs < val_docs;
        ids.assign(1, (uint32_t)eot);
        std::vector<uint32_t> enc = tok.encode(text);
        ids.insert(ids.end(), enc.begin(), enc.end());
        (is_val ? val : train).add(ids);
        docs++;
        bytes += text.size();
        if (seconds_since(t0) - last_print >= 2.0) {
            last_print = seconds_since(t0);
            progress("...");
        }
    });
    train.finish();
    val.finish();
    progress("done:");
    printf("wrote %d train shard(s) (%zu tokens) and %d val shard(s) (%zu tokens) to %s/%s_*.bin\n", train.shards,
           train.tokens, val.shards, val.tokens, out.c_str(), name.c_str());
    if (train.tokens == 0) THROW("no training documents: every document went to validation");
}

// ----------------------------------------------------------------------------
// inspect

static void cmd_inspect(int argc, char** argv) {
    Args a(argc, argv, {"--tokenizer", "--n"});
    if (a.positional.size() != 1) throw UsageError("inspect: give exactly one SHARD");
    const std::string path = a.positional[0];
    const long long n = a.integer("--n", 64);
    std::unique_ptr<Tokenizer> tok;
    if (a.has("--tokenizer")) tok = std::make_unique<Tokenizer>(Tokenizer::load(a.str("--tokenizer")));
    Shard sh(path, tok ? tok->vocab_size() : 0);
    printf("file      %s (%ju bytes)\n", path.c_str(), (uintmax_t)fs::file_size(path));
    printf("header    magic %d, version %d (%s tokens), count %zu\n", SHARD_MAGIC, sh.version(),
           sh.version() == 1 ? "uint16" : "uint32", sh.size());
    uint32_t lo = UINT32_MAX, hi = 0;
    size_t eots = 0, masked = 0;
    const int eot = tok ? tok->eot_token() : -1;
    for (size_t i = 0; i < sh.size(); i++) {
        uint32_t t = sh.token(i);
        lo = std::min(lo, t);
        hi = std::max(hi, t);
        eots += (int64_t)t == eot;
        masked += sh.masked(i);
    }
    if (sh.size()) printf("ids       min %u, max %u\n", lo, hi);
    if (tok) printf("documents %zu (EOT id %d)\n", eots, eot);
    if (sh.has_mask()) printf("mask      %s.mask: %zu of %zu tokens masked\n", path.c_str(), masked, sh.size());
    std::vector<uint32_t> head;
    for (size_t i = 0; i < sh.size() && (long long)i < n; i++) head.push_back(sh.token(i));
    printf("first %zu tokens:", head.size());
    for (uint32_t t : head) printf(" %u", t);
    printf("\n");
    if (tok) printf("decoded:\n%s\n", tok->decode(head).c_str());
}

// ----------------------------------------------------------------------------
// train-bpe

static void cmd_train_bpe(int argc, char** argv) {
    Args a(argc, argv, {"--vocab-size", "--out", "--special", "--jsonl-field"});
    if (a.positional.empty()) throw UsageError("train-bpe: no INPUT given");
    const long long vocab = a.integer("--vocab-size", 0);
    if (vocab <= 256) throw UsageError("train-bpe: --vocab-size must be > 256 (the byte tokens)");
    const std::string out = a.required("--out");
    std::vector<std::string> specials = a.has("--special") ? a.flags.at("--special")
                                                           : std::vector<std::string>{"<|endoftext|>"};
    std::vector<std::string> texts;
    for_each_document(a.positional, a.str("--jsonl-field", "text"), [&](const std::string& t) { texts.push_back(t); });
    auto t0 = std::chrono::steady_clock::now();
    Tokenizer tok = train_bpe(texts, (int)vocab, specials);
    tok.save_hf(out);
    printf("trained a %d-token BPE on %zu documents in %.1f s, wrote %s\n", tok.vocab_size(), texts.size(),
           seconds_since(t0), out.c_str());
}

// ----------------------------------------------------------------------------
// sft: instruction data to shards with a loss mask (data/sft.h has the format)

static void cmd_sft(int argc, char** argv) {
    Args a(argc, argv, {"--tokenizer", "--out", "--name", "--template", "--system", "--format", "--seq-len",
                        "--max-len", "--overflow", "--val-fraction", "--val-examples", "--seed"});
    if (a.positional.empty()) throw UsageError("sft: no INPUT given");
    if (a.has("--val-fraction") && a.has("--val-examples"))
        throw UsageError("give --val-fraction or --val-examples, not both");
    const std::string out = a.required("--out"), name = a.str("--name", "sft");
    const long long T = a.integer("--seq-len", 256);
    const long long max_len = a.integer("--max-len", T);
    const std::string overflow = a.str("--overflow", "truncate"), format = a.str("--format", "auto");
    const double val_fraction = a.has("--val-examples") ? 0.0 : a.real("--val-fraction", 0.1);
    const long long val_examples = a.integer("--val-examples", 0);
    const uint64_t seed = (uint64_t)a.integer("--seed", 0);
    if (T < 0 || T > (1 << 24)) throw UsageError("--seq-len must be in [0, 2^24]");
    if (max_len < 0) throw UsageError("--max-len must be >= 0 (0: no limit)");
    if (T > 0 && (max_len == 0 || max_len > T))
        throw UsageError(strformat("--max-len %lld must be in [1, --seq-len %lld]", max_len, T));
    if (overflow != "truncate" && overflow != "drop") throw UsageError("--overflow must be truncate or drop");
    if (format != "auto" && format != "alpaca" && format != "chat") throw UsageError("--format must be auto, alpaca or chat");
    if (val_fraction < 0 || val_fraction > 1) throw UsageError("--val-fraction must be in [0, 1]");
    if (val_examples < 0) throw UsageError("--val-examples must be >= 0");
    const sft::Format fmt = format == "alpaca" ? sft::Format::Alpaca : format == "chat" ? sft::Format::Chat
                                                                                        : sft::Format::Auto;
    sft::Template tmpl = sft::load_template(a.str("--template", "chatml"));
    if (a.has("--system")) tmpl.default_system = a.str("--system");

    Tokenizer tok = Tokenizer::load(a.required("--tokenizer"));
    sft::add_template_specials(tok, tmpl);
    const uint32_t eot = (uint32_t)tok.eot_token();
    printf("special tokens:");
    std::vector<std::string> shown = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
    for (auto& s : tmpl.specials) if (std::find(shown.begin(), shown.end(), s) == shown.end()) shown.push_back(s);
    for (auto& s : shown) printf(" %s %d", s.c_str(), tok.token_id(s));
    printf(" (vocab %d); template %s, stop %s (id %d)\n", tok.vocab_size(), tmpl.name.c_str(), tmpl.stop.c_str(),
           tok.token_id(tmpl.stop));

    const std::vector<std::string> files = input_files(a.positional, {".jsonl"});

    sft::SftStream train((int)T, eot), val((int)T, eot);
    size_t read = 0, n_chat = 0, truncated = 0, dropped_long = 0, dropped_cut = 0, no_response = 0;
    const double val_offset = (SplitMix64(seed).next() >> 11) * 0x1.0p-53;
    for (auto& path : files) {
        std::ifstream f(path, std::ios::binary);
        if (!f) THROW("cannot open '%s'", path.c_str());
        std::string line;
        for (long lineno = 1; std::getline(f, line); lineno++) {
            if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
            const std::string where = strformat("'%s' line %ld", path.c_str(), lineno);
            nlohmann::json j;
            try {
                j = nlohmann::json::parse(line);
            } catch (const std::exception& e) {
                THROW("%s is not valid JSON: %s", where.c_str(), e.what());
            }
            bool chat = false;
            std::vector<sft::Turn> turns = sft::parse_record(j, tmpl, fmt, where, &chat);
            // the same systematic split as `shards`, over examples
            const bool is_val = val_fraction > 0 ? std::floor((read + 1) * val_fraction + val_offset) >
                                                       std::floor(read * val_fraction + val_offset)
                                                 : (long long)read < val_examples;
            read++;
            n_chat += chat;
            sft::Rendered r = sft::render(turns, tmpl, tok);
            if (r.trained() == 0) { no_response++; continue; }
            if (max_len > 0 && r.tokens.size() + 1 > (size_t)max_len) {
                if (overflow == "drop") { dropped_long++; continue; }
                if (!sft::truncate(r, (size_t)max_len)) { dropped_cut++; continue; }
                truncated++;
            }
            (is_val ? val : train).add(r);
        }
    }
    train.finish();
    val.finish();
    printf("examples: %zu read (%zu Alpaca, %zu chat), %zu train, %zu val\n", read, read - n_chat, n_chat,
           train.examples, val.examples);
    printf("longer than --max-len %lld (--overflow %s): %zu truncated, %zu dropped, %zu dropped as nothing of the "
           "response was left; %zu without an assistant turn dropped\n", max_len, overflow.c_str(), truncated,
           dropped_long, dropped_cut, no_response);
    if (train.examples == 0) THROW("no training examples: every example was dropped or went to validation");

    fs::create_directories(out);
    for (auto& old : glob_sorted(out + "/" + name + "_*_*.bin*")) fs::remove(old);
    auto write_split = [&](sft::SftStream& s, const char* split) {
        std::string path = strformat("%s/%s_%s_000000.bin", out.c_str(), name.c_str(), split);
        write_shard(path, s.tokens, tok.vocab_size());
        write_mask(path + ".mask", s.mask);
        printf("%s: %zu examples, %zu tokens (%zu trained, %zu padding) -> %s (+ .mask)\n", split, s.examples,
               s.tokens.size(), s.trained(), s.pad_tokens, path.c_str());
    };
    write_split(train, "train");
    if (val.examples > 0) write_split(val, "val");
    tok.save_hf(out + "/tokenizer.json");
    {
        std::ofstream tf(out + "/template.json");
        tf << sft::template_to_json(tmpl).dump(1) << "\n";
        if (!tf) THROW("cannot write '%s/template.json'", out.c_str());
    }
    printf("wrote %s/tokenizer.json and %s/template.json\n", out.c_str(), out.c_str());
}

// ----------------------------------------------------------------------------
// brown: tagged Brown corpus (word/tag tokens) to plain text

static bool all_chars_in(const std::string& w, const char* set) {
    return !w.empty() && w.find_first_not_of(set) == std::string::npos;
}

// Rejoins the words of one tagged line into `out` with natural English spacing. `glue`: the
// next word attaches without a space (after an opening quote or bracket); `in_squote`: a
// lone ' opened a single quote (the corpus uses ' for both ends, and for no apostrophe).
struct Detok {
    bool glue = false, in_squote = false;
};
static void detokenize_line(const std::vector<std::string>& words, std::string& out, Detok& st) {
    for (const std::string& raw : words) {
        std::string w = raw;
        bool opening = false, closing = false;
        if (w == "``") { w = "\""; opening = true; }
        else if (w == "''") { w = "\""; closing = true; }
        else if (w == "`") { w = "'"; opening = true; }
        else if (w == "'") { st.in_squote = !st.in_squote; opening = st.in_squote; closing = !opening; }
        else if (w == "(" || w == "[" || w == "{") opening = true;
        else if (all_chars_in(w, ",.;:?!)]}")) closing = true;
        // the corpus repeats some sentence ends ("Jr. .", "; ;")
        if (w.size() == 1 && strchr(".;?!", w[0]) && !out.empty() && out.back() == w[0]) continue;
        if (!out.empty() && !st.glue && !closing) out += ' ';
        out += w;
        st.glue = opening;
    }
}

// One Brown text: paragraphs start at tab-indented lines or after blank lines; a line whose
// tags all carry "-hl" is a headline and stands alone. Paragraphs are separated by a blank line.
static std::string brown_to_text(const std::string& src, const std::string& path) {
    std::string out, para;
    Detok st;
    bool blank_before = true, after_headline = false;
    auto flush = [&]() {
        if (para.empty()) return;
        if (!out.empty()) out += "\n\n";
        out += para;
        para.clear();
        st = Detok();
    };
    std::istringstream lines(src);
    std::string line;
    while (std::getline(lines, line)) {
        std::istringstream ls(line);
        std::vector<std::string> words;
        bool headline = true;
        for (std::string tok; ls >> tok;) {
            size_t slash = tok.rfind('/');
            if (slash == std::string::npos || slash == 0) THROW("'%s': token '%s' is not word/tag", path.c_str(), tok.c_str());
            headline = headline && ends_with(tok, "-hl");
            words.push_back(tok.substr(0, slash));
        }
        if (words.empty()) { blank_before = true; continue; }
        if (line[0] == '\t' || blank_before || headline || after_headline) flush();
        detokenize_line(words, para, st);
        if (headline) flush();
        blank_before = false;
        after_headline = headline;
    }
    flush();
    return out + "\n";
}

static void cmd_brown(int argc, char** argv) {
    Args a(argc, argv, {});
    if (a.positional.size() != 2) throw UsageError("brown: give SRC_DIR and OUT_DIR");
    const std::string src = a.positional[0], out = a.positional[1];
    std::vector<std::string> ids;
    for (auto& e : fs::directory_iterator(src)) {
        std::string f = e.path().filename().string();
        // text files are named c + genre letter a..r + two digits (ca01 ... cr09)
        if (f.size() == 4 && f[0] == 'c' && f[1] >= 'a' && f[1] <= 'r' && isdigit(f[2]) && isdigit(f[3])) ids.push_back(f);
    }
    if (ids.empty()) THROW("'%s' holds no Brown corpus files (ca01 ... cr09)", src.c_str());
    std::sort(ids.begin(), ids.end());
    fs::create_directories(out);
    size_t bytes = 0;
    for (auto& id : ids) {
        std::string text = brown_to_text(read_file(src + "/" + id), src + "/" + id);
        std::string dst = out + "/" + id + ".txt";
        FILE* f = fopen_or_throw(dst, "wb");
        fwrite_or_throw(text.data(), 1, text.size(), f, dst);
        fclose(f);
        bytes += text.size();
    }
    printf("converted %zu Brown texts (%.2f MB of text) into %s\n", ids.size(), bytes / 1e6, out.c_str());
}

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "%s", USAGE);
        return 1;
    }
    std::string cmd = argv[1];
    try {
        if (cmd == "shards") cmd_shards(argc - 2, argv + 2);
        else if (cmd == "inspect") cmd_inspect(argc - 2, argv + 2);
        else if (cmd == "train-bpe") cmd_train_bpe(argc - 2, argv + 2);
        else if (cmd == "brown") cmd_brown(argc - 2, argv + 2);
        else if (cmd == "sft") cmd_sft(argc - 2, argv + 2);
        else if (cmd == "-h" || cmd == "--help") { printf("%s", USAGE); return 0; }
        else throw UsageError(strformat("unknown subcommand '%s'", cmd.c_str()));
    } catch (const UsageError& e) {
        fprintf(stderr, "error: %s\n%s", e.what(), USAGE);
        return 1;
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
