// prepare_data: text and JSONL to token shards, instruction data to shards with loss
// masks, shard inspection, BPE training, and the Brown corpus converter used by
// data/prepare_default.sh. Shard format: dataloader.h. Every command checks its flags and
// inputs before any work, and writes its outputs as one staged set (StagedFiles): a failed
// run leaves what was there untouched and no temporary file behind.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <sstream>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "common.h"
#include "dataloader.h"
#include "flags.h"
#include "tokenizer.h"
#include "data/bpe_trainer.h"
#include "data/corpus.h"
#include "data/sft.h"

namespace fs = std::filesystem;

static const char* USAGE =
    "usage: prepare_data COMMAND [flags] ARGS...      (prepare_data COMMAND --help: its flags)\n"
    "  shards     text and JSONL documents to token shards (a training corpus)\n"
    "  sft        instruction records to token shards with loss masks (fine-tuning)\n"
    "  inspect    a shard's header, id range, documents, mask and first tokens\n"
    "  train-bpe  a byte-level BPE tokenizer trained on text\n"
    "  brown      the tagged Brown corpus to plain text files\n";

static double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

static void require_flag(const Flags& f, const char* cmd, const char* flag) {
    if (!f.given(flag)) THROW("%s: missing required flag %s (see prepare_data %s --help)", cmd, flag, cmd);
}

// the output directory, created if missing; `created` tells whether this run made it
static void make_out_dir(const std::string& dir, bool& created) {
    std::error_code ec;
    created = !fs::exists(dir, ec);
    fs::create_directories(dir, ec);
    if (ec) THROW("cannot create the output directory '%s': %s", dir.c_str(), ec.message().c_str());
    if (!fs::is_directory(dir)) THROW("output '%s' exists and is not a directory", dir.c_str());
}

// Removes DIR/NAME_{train,val}_<digits>.bin and their .mask files that are not in `keep`:
// a rerun replaces the whole set, so stale shards of an earlier, larger run do not mix in.
static void remove_stale(const std::string& dir, const std::string& name, const std::vector<std::string>& keep) {
    for (auto& e : fs::directory_iterator(dir)) {
        const std::string f = e.path().filename().string();
        std::string rest;
        for (const char* split : {"_train_", "_val_"})
            if (f.rfind(name + split, 0) == 0) rest = f.substr(name.size() + strlen(split));
        const size_t digits = rest.find_first_not_of("0123456789");
        if (digits == 0 || digits == std::string::npos) continue;
        const std::string ext = rest.substr(digits);
        if (ext != ".bin" && ext != ".bin.mask") continue;
        const std::string p = dir + "/" + f;
        if (std::find(keep.begin(), keep.end(), p) == keep.end()) fs::remove(p);
    }
}

static void write_text_file(const std::string& path, const std::string& text) {
    FILE* f = fopen_or_throw(path, "wb");
    const bool ok = fwrite(text.data(), 1, text.size(), f) == text.size();
    const int err = errno;
    if (fclose(f) != 0 || !ok) THROW("cannot write '%s': %s", path.c_str(), strerror(ok ? errno : err));
}

// ----------------------------------------------------------------------------
// shards

static const char* SHARDS_USAGE =
    "usage: prepare_data shards --tokenizer PATH --out DIR [flags] INPUT...\n"
    "  INPUT: a text file (one document), a .jsonl file (one document per line, its string\n"
    "  --jsonl-field), or a directory (its *.txt and *.jsonl files, recursively, sorted).\n"
    "  Writes DIR/NAME_val_000000.bin, DIR/NAME_train_000000.bin, ... (each document preceded\n"
    "  by the end-of-text token), replacing an earlier set of NAME only when all succeeded.\n"
    "  Text is ordinary text: a literal <|endoftext|> in a document is not the end-of-text\n"
    "  token (unless --allow-special). Output is identical for any --threads.\n"
    "flags:";

// One split's shards, PREFIX000000.bin, ... of at most shard_tokens tokens each, written as
// they fill, under staged names until the run succeeds.
struct SplitWriter {
    std::string prefix;  // DIR/NAME_split_
    size_t shard_tokens;
    int vocab_size;
    StagedFiles& staged;
    std::optional<ShardWriter> shard = {};
    std::vector<std::string> paths = {};
    size_t tokens = 0, docs = 0;

    void add(const uint32_t* t, size_t n) {
        tokens += n;
        while (n > 0) {
            if (!shard) {
                paths.push_back(strformat("%s%06zu.bin", prefix.c_str(), paths.size()));
                shard.emplace(ShardWriter::tokens(staged.stage(paths.back()), vocab_size));
            }
            const size_t k = std::min(n, shard_tokens - shard->count());
            shard->append_tokens(t, k);
            t += k;
            n -= k;
            if (shard->count() == shard_tokens) finish();
        }
    }
    void finish() {
        if (shard) shard->finish();
        shard.reset();
    }
};

static void cmd_shards(int argc, char** argv) {
    std::string tokenizer, out, name = "data", field = "text";
    long long shard_tokens = 100000000, val_docs = 0;
    double val_fraction = 0.05;
    uint64_t seed = 0;
    int threads = available_cores();
    bool allow_special = false;
    Flags f(SHARDS_USAGE);
    f.add({"--tokenizer"}, &tokenizer, "PATH", "encoder.json + vocab.bpe directory, or a tokenizer.json");
    f.add({"--out"}, &out, "DIR", "output directory (created if missing)");
    f.add({"--name"}, &name, "NAME", "shard name prefix");
    f.add({"--shard-tokens"}, &shard_tokens, "N", "tokens per shard at most", Range::between(1, INT32_MAX));
    f.add({"--val-fraction"}, &val_fraction, "F",
          "validation takes every (1/F)-th document (a systematic\nsample; --seed picks the offset)", Range::between(0, 1));
    f.add({"--val-docs"}, &val_docs, "N", "validation takes the first N documents instead", Range::at_least(0));
    f.add({"--jsonl-field"}, &field, "FIELD", "the string field of a JSONL record that holds the text");
    f.add({"--seed"}, &seed, "S", "offset of the validation sample");
    f.add({"--threads"}, &threads, "N", "tokenizing threads (default: every core)", Range::between(1, 4096));
    f.flag({"--allow-special"}, &allow_special,
           "read special-token text in documents (<|endoftext|> ...) as those\ntokens instead of as text");
    const std::vector<std::string> inputs = f.parse(argc, argv, 2);
    require_flag(f, "shards", "--tokenizer");
    require_flag(f, "shards", "--out");
    if (inputs.empty()) THROW("shards: no INPUT given (see prepare_data shards --help)");
    if (f.given("--val-fraction") && f.given("--val-docs")) THROW("shards: give --val-fraction or --val-docs, not both");
    if (f.given("--val-docs")) val_fraction = 0;
    if (name.empty() || name.find('/') != std::string::npos) THROW("shards: --name '%s' must be a plain file name prefix", name.c_str());

    Tokenizer tok = Tokenizer::load(tokenizer);
    const int eot = tok.eot_token();
    if (eot < 0) THROW("tokenizer '%s' has no <|endoftext|> token to separate documents", tokenizer.c_str());
    const std::vector<std::string> files = input_files(inputs, {".txt", ".jsonl"});
    size_t total_bytes = 0;
    for (auto& p : files) total_bytes += fs::file_size(p);
    bool created = false;
    make_out_dir(out, created);
    try {
        StagedFiles staged;
        SplitWriter train{out + "/" + name + "_train_", (size_t)shard_tokens, tok.vocab_size(), staged};
        SplitWriter val{out + "/" + name + "_val_", (size_t)shard_tokens, tok.vocab_size(), staged};
        // a systematic sample: document i is val when i*F + offset crosses an integer, so val
        // takes a fraction F spread evenly over the input order (Brown's genres alike)
        const double offset = (SplitMix64(seed).next() >> 11) * 0x1.0p-53;
        DocumentReader reader(files, [&](size_t i) {
            return val_fraction > 0 ? std::floor((i + 1) * val_fraction + offset) > std::floor(i * val_fraction + offset)
                                    : (long long)i < val_docs;
        });
        std::vector<Tokenizer::PieceCache> caches(threads);
        const size_t batch_bytes = std::max<size_t>(16 << 20, (size_t)threads << 21);
        const uint32_t eot_id = (uint32_t)eot;
        size_t text_bytes = 0;
        const auto t0 = std::chrono::steady_clock::now();
        double last_print = 0;
        auto progress = [&](bool done) {
            const double dt = std::max(seconds_since(t0), 1e-9), mb = reader.bytes_read() / 1e6;
            const size_t toks = train.tokens + val.tokens;
            if (done)
                printf("done: %zu docs (%zu val), %zu tokens (%zu val), %.1f MB text, %.0f tokens/s, %.2f MB/s, %.1f s, "
                       "%d threads\n", reader.documents(), val.docs, toks, val.tokens, mb, toks / dt, mb / dt, dt, threads);
            else
                printf("... %zu docs, %zu tokens, %.1f of %.1f MB (%.0f%%), %.1f MB/s, %.2fM tokens/s, ETA %.0f s\n",
                       reader.documents(), toks, mb, total_bytes / 1e6, 100.0 * mb / std::max(total_bytes / 1e6, 1e-9),
                       mb / dt, toks / dt / 1e6, (total_bytes / 1e6 - mb) / std::max(mb / dt, 1e-9));
            fflush(stdout);
        };
        std::vector<Segment> batch = reader.next(batch_bytes);
        while (!batch.empty()) {
            std::vector<Segment> next;
            {
                TokenizeBatch run(batch, tok, field, allow_special, caches);
                next = reader.next(batch_bytes);  // read on while the batch is tokenized
            }
            for (Segment& s : batch) {
                if (!s.error.empty()) throw std::runtime_error(s.error);
                SplitWriter& w = s.val ? val : train;
                if (s.starts_doc) {
                    w.docs++;
                    w.add(&eot_id, 1);
                }
                w.add(s.tokens.data(), s.tokens.size());
                text_bytes += s.text_bytes;
            }
            batch = std::move(next);
            if (seconds_since(t0) - last_print >= 2.0) {
                last_print = seconds_since(t0);
                progress(false);
            }
        }
        train.finish();
        val.finish();
        progress(true);
        const size_t docs = reader.documents();
        if (docs == 0) THROW("no documents: the input files are empty (or hold only blank lines)");
        if (text_bytes == 0) THROW("no text: all %zu documents are empty", docs);
        if (train.docs == 0) THROW("no training documents: all %zu documents went to validation", docs);
        staged.commit();
        std::vector<std::string> keep = train.paths;
        keep.insert(keep.end(), val.paths.begin(), val.paths.end());
        remove_stale(out, name, keep);
        printf("wrote %zu train shard(s) (%zu tokens) and %zu val shard(s) (%zu tokens) to %s/%s_*.bin\n",
               train.paths.size(), train.tokens, val.paths.size(), val.tokens, out.c_str(), name.c_str());
    } catch (...) {
        std::error_code ec;
        if (created) fs::remove(out, ec);  // only if empty: this run made it and left nothing in it
        throw;
    }
}

// ----------------------------------------------------------------------------
// inspect

static void cmd_inspect(int argc, char** argv) {
    std::string tokenizer;
    long long n = 64;
    Flags f("usage: prepare_data inspect [--tokenizer PATH] [--n N] SHARD\n"
            "  header, dtype, id range, document count, mask and the first N tokens (decoded with a tokenizer)\n"
            "flags:");
    f.add({"--tokenizer"}, &tokenizer, "PATH", "decode the tokens and count the documents");
    f.add({"--n"}, &n, "N", "tokens to show", Range::at_least(0));
    const std::vector<std::string> args = f.parse(argc, argv, 2);
    if (args.size() != 1) THROW("inspect: give exactly one SHARD (see prepare_data inspect --help)");
    const std::string path = args[0];
    std::optional<Tokenizer> tok;
    if (!tokenizer.empty()) tok = Tokenizer::load(tokenizer);
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
    std::string out, field = "text";
    int vocab = 0;
    std::vector<std::string> specials;
    Flags f("usage: prepare_data train-bpe --vocab-size N --out tokenizer.json [--special TOK ...] INPUT...\n"
            "  byte-level BPE on INPUT (files and directories as for shards)\n"
            "flags:");
    f.add({"--vocab-size"}, &vocab, "N", "tokens in all: 256 bytes, the merges, the special tokens",
          Range::between(257, 1 << 24));
    f.add({"--out"}, &out, "FILE", "the tokenizer.json to write");
    f.repeat({"--special"}, &specials, "TOK", "a special token (repeat for more; default <|endoftext|>)");
    f.add({"--jsonl-field"}, &field, "FIELD", "the string field of a JSONL record that holds the text");
    const std::vector<std::string> inputs = f.parse(argc, argv, 2);
    require_flag(f, "train-bpe", "--vocab-size");
    require_flag(f, "train-bpe", "--out");
    if (inputs.empty()) THROW("train-bpe: no INPUT given (see prepare_data train-bpe --help)");
    if (specials.empty()) specials = {"<|endoftext|>"};
    // the parts of a long document pre-tokenize as the whole does: the trainer sees the same pieces
    std::vector<std::string> texts;
    DocumentReader reader(input_files(inputs, {".txt", ".jsonl"}), [](size_t) { return false; });
    for (auto batch = reader.next(16 << 20); !batch.empty(); batch = reader.next(16 << 20))
        for (Segment& s : batch) {
            resolve_text(s, field);
            texts.push_back(std::move(s.text));
        }
    auto t0 = std::chrono::steady_clock::now();
    Tokenizer tok = train_bpe(texts, vocab, specials);
    tok.save_hf(out);
    printf("trained a %d-token BPE on %zu documents in %.1f s, wrote %s\n", tok.vocab_size(), reader.documents(),
           seconds_since(t0), out.c_str());
}

// ----------------------------------------------------------------------------
// sft: instruction data to shards with a loss mask (data/sft.h has the format)

static const char* SFT_USAGE =
    "usage: prepare_data sft --tokenizer PATH --out DIR [flags] INPUT...\n"
    "  instruction data for fine-tuning. INPUT: a .jsonl file (or a directory of them) of Alpaca\n"
    "  records {instruction, input (optional), output} or chat records {messages: [{role,\n"
    "  content}, ...]}. Each example is rendered with the template and written as EOT ex EOT ex\n"
    "  ... EOT into DIR/NAME_{train,val}_000000.bin with a loss mask SHARD.mask: 1 on every\n"
    "  response and the stop token that ends it, 0 elsewhere. Content is ordinary text: a\n"
    "  literal <|im_end|> in a message is not the template's token (unless --allow-special).\n"
    "  Also writes DIR/tokenizer.json (the tokenizer plus the template's special tokens) and\n"
    "  DIR/template.json, which finetune_mamba reads; the set replaces an earlier one only\n"
    "  when all succeeded.\n"
    "flags:";

static void cmd_sft(int argc, char** argv) {
    std::string tokenizer, out, name = "sft", template_name = "chatml", system, format = "auto", overflow = "truncate";
    long long T = 0, max_len = 0, val_examples = 0;
    double val_fraction = 0.1;
    uint64_t seed = 0;
    bool allow_special = false;
    Flags f(SFT_USAGE);
    f.add({"--tokenizer"}, &tokenizer, "PATH", "encoder.json + vocab.bpe directory, or a tokenizer.json");
    f.add({"--out"}, &out, "DIR", "output directory (created if missing)");
    f.add({"--name"}, &name, "NAME", "shard name prefix");
    f.add({"--template"}, &template_name, "T", "chatml, alpaca, or a template FILE.json");
    f.add({"--system"}, &system, "TEXT", "a system turn for examples without one");
    f.choice({"--format"}, &format, {"auto", "alpaca", "chat"}, "record format (auto: chat when it has 'messages')");
    f.add({"--seq-len"}, &T, "T",
          "the old layout: keep each example inside one T-token training window,\nthe gap padded with masked EOT tokens (default 0: examples back to back,\neach its own document; training runs them apart)",
          Range::between(0, 1 << 24));
    f.add({"--max-len"}, &max_len, "N", "longest example in tokens, its closing EOT included (default: T\nwith --seq-len, else no limit; 0: no limit)",
          Range::at_least(0));
    f.choice({"--overflow"}, &overflow, {"truncate", "drop"}, "what happens to an example longer than --max-len");
    f.add({"--val-fraction"}, &val_fraction, "F", "validation takes every (1/F)-th example", Range::between(0, 1));
    f.add({"--val-examples"}, &val_examples, "N", "validation takes the first N examples instead", Range::at_least(0));
    f.add({"--seed"}, &seed, "S", "offset of the validation sample");
    f.flag({"--allow-special"}, &allow_special,
           "read special-token text in message content as those tokens\ninstead of as text");
    const std::vector<std::string> inputs = f.parse(argc, argv, 2);
    require_flag(f, "sft", "--tokenizer");
    require_flag(f, "sft", "--out");
    if (inputs.empty()) THROW("sft: no INPUT given (see prepare_data sft --help)");
    if (f.given("--val-fraction") && f.given("--val-examples")) THROW("sft: give --val-fraction or --val-examples, not both");
    if (f.given("--val-examples")) val_fraction = 0;
    if (!f.given("--max-len")) max_len = T;
    if (T > 0 && (max_len == 0 || max_len > T))
        THROW("sft: --max-len %lld must be in [1, --seq-len %lld]", max_len, T);
    if (name.empty() || name.find('/') != std::string::npos) THROW("sft: --name '%s' must be a plain file name prefix", name.c_str());
    const sft::Format fmt = format == "alpaca" ? sft::Format::Alpaca : format == "chat" ? sft::Format::Chat
                                                                                        : sft::Format::Auto;
    sft::Template tmpl = sft::load_template(template_name);
    if (f.given("--system")) tmpl.default_system = system;

    Tokenizer tok = Tokenizer::load(tokenizer);
    sft::add_template_specials(tok, tmpl);
    const uint32_t eot = (uint32_t)tok.eot_token();
    const std::vector<std::string> files = input_files(inputs, {".jsonl"});
    printf("special tokens:");
    std::vector<std::string> shown = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
    for (auto& s : tmpl.specials) if (std::find(shown.begin(), shown.end(), s) == shown.end()) shown.push_back(s);
    for (auto& s : shown) printf(" %s %d", s.c_str(), tok.token_id(s));
    printf(" (vocab %d); template %s, stop %s (id %d)\n", tok.vocab_size(), tmpl.name.c_str(), tmpl.stop.c_str(),
           tok.token_id(tmpl.stop));

    sft::SftStream train((int)T, eot), val((int)T, eot);
    size_t read = 0, n_chat = 0, truncated = 0, dropped_long = 0, dropped_cut = 0, no_response = 0;
    const double val_offset = (SplitMix64(seed).next() >> 11) * 0x1.0p-53;
    for (auto& path : files) {
        LineReader lines(path);
        for (std::string line; lines.next(line);) {
            if (is_blank(line)) continue;
            const std::string where = strformat("'%s' line %ld", path.c_str(), lines.line_number());
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
            sft::Rendered r = sft::render(turns, tmpl, tok, allow_special);
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
    if (read == 0) THROW("no examples: the input files are empty (or hold only blank lines)");
    if (train.examples == 0) THROW("no training examples: every example was dropped or went to validation");

    bool created = false;
    make_out_dir(out, created);
    try {
        StagedFiles staged;
        std::vector<std::string> written;
        auto write_split = [&](sft::SftStream& s, const char* split) {
            const std::string path = strformat("%s/%s_%s_000000.bin", out.c_str(), name.c_str(), split);
            ShardWriter shard = ShardWriter::tokens(staged.stage(path), tok.vocab_size());
            shard.append_tokens(s.tokens.data(), s.tokens.size());
            shard.finish();
            ShardWriter mask = ShardWriter::mask(staged.stage(path + ".mask"));
            mask.append_mask(s.mask.data(), s.mask.size());
            mask.finish();
            written.insert(written.end(), {path, path + ".mask"});
            printf("%s: %zu examples, %zu tokens (%zu trained, %zu padding) -> %s (+ .mask)\n", split, s.examples,
                   s.tokens.size(), s.trained(), s.pad_tokens, path.c_str());
        };
        write_split(train, "train");
        if (val.examples > 0) write_split(val, "val");
        tok.save_hf(staged.stage(out + "/tokenizer.json"));
        write_text_file(staged.stage(out + "/template.json"), sft::template_to_json(tmpl).dump(1) + "\n");
        staged.commit();
        remove_stale(out, name, written);
    } catch (...) {
        std::error_code ec;
        if (created) fs::remove(out, ec);
        throw;
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
    Flags f("usage: prepare_data brown SRC_DIR OUT_DIR\n"
            "  the tagged Brown corpus (files ca01..cr09 in SRC_DIR) to plain text, one OUT_DIR/<id>.txt per text");
    const std::vector<std::string> args = f.parse(argc, argv, 2);
    if (args.size() != 2) THROW("brown: give SRC_DIR and OUT_DIR (see prepare_data brown --help)");
    const std::string src = args[0], out = args[1];
    std::vector<std::string> ids;
    std::error_code ec;
    for (fs::directory_iterator it(src, ec), end; !ec && it != end; it.increment(ec)) {
        std::string f = it->path().filename().string();
        // text files are named c + genre letter a..r + two digits (ca01 ... cr09)
        if (f.size() == 4 && f[0] == 'c' && f[1] >= 'a' && f[1] <= 'r' && isdigit(f[2]) && isdigit(f[3])) ids.push_back(f);
    }
    if (ec) THROW("cannot read directory '%s': %s", src.c_str(), ec.message().c_str());
    if (ids.empty()) THROW("'%s' holds no Brown corpus files (ca01 ... cr09)", src.c_str());
    std::sort(ids.begin(), ids.end());
    bool created = false;
    make_out_dir(out, created);
    size_t bytes = 0;
    for (auto& id : ids) {
        const std::string path = src + "/" + id;
        std::string text = brown_to_text(read_file_or_throw(path, "Brown corpus file"), path);
        StagedFiles staged;
        write_text_file(staged.stage(out + "/" + id + ".txt"), text);
        staged.commit();
        bytes += text.size();
    }
    printf("converted %zu Brown texts (%.2f MB of text) into %s\n", ids.size(), bytes / 1e6, out.c_str());
}

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "%s", USAGE);
        return 1;
    }
    const std::string cmd = argv[1];
    try {
        if (cmd == "shards") cmd_shards(argc, argv);
        else if (cmd == "inspect") cmd_inspect(argc, argv);
        else if (cmd == "train-bpe") cmd_train_bpe(argc, argv);
        else if (cmd == "brown") cmd_brown(argc, argv);
        else if (cmd == "sft") cmd_sft(argc, argv);
        else if (cmd == "-h" || cmd == "--help") { printf("%s", USAGE); return 0; }
        else THROW("unknown command '%s' (shards, sft, inspect, train-bpe, brown; see prepare_data --help)", cmd.c_str());
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
