// A corpus as documents, read in bounded batches and tokenized on many threads
// (prepare_data shards and train-bpe):
//   - input_files: the files of the INPUT arguments (directories searched recursively,
//     sorted); anything that is not a regular file is refused by its type;
//   - DocumentReader: a .txt file is one document, a .jsonl file one document per non-blank
//     line (the string field given). Documents come in batches of Segments of about a given
//     size, so memory stays bounded for any corpus; a long text file is cut into segments at
//     places where tokenizing the parts gives exactly the ids of the whole (bpe::find_cut),
//     so one huge document is streamed too, and its parts tokenize in parallel;
//   - tokenize_batch: every segment of a batch on N threads (each with its own PieceCache);
//     a segment's ids do not depend on the thread that made them, so the output is the same
//     for any number of threads.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>
#include <nlohmann/json.hpp>
#include "common.h"
#include "tokenizer.h"

inline bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The input files: files as given, directories as their files (recursively, sorted) whose
// names end in one of `exts`. FIFOs, devices and sockets are refused, given or found.
inline std::vector<std::string> input_files(const std::vector<std::string>& inputs, const std::vector<std::string>& exts) {
    namespace fs = std::filesystem;
    std::vector<std::string> files;
    std::string names;
    for (auto& x : exts) names += (names.empty() ? "*" : " or *") + x;
    for (auto& in : inputs) {
        std::error_code ec;
        if (!fs::is_directory(in, ec)) {
            require_regular_file(in, "input");
            files.push_back(in);
            continue;
        }
        std::vector<std::string> found;
        for (fs::recursive_directory_iterator it(in, ec), end; !ec && it != end; it.increment(ec)) {
            const std::string p = it->path().string();
            if (it->is_directory(ec) || std::none_of(exts.begin(), exts.end(), [&](auto& x) { return ends_with(p, x); }))
                continue;
            require_regular_file(p, "input");
            found.push_back(p);
        }
        if (ec) THROW("cannot read directory '%s': %s", in.c_str(), ec.message().c_str());
        if (found.empty()) THROW("directory '%s' holds no %s file", in.c_str(), names.c_str());
        std::sort(found.begin(), found.end());
        files.insert(files.end(), found.begin(), found.end());
    }
    return files;
}

// Lines of a file of any length (POSIX getline), numbered from 1; I/O errors name the file
// and the reason.
class LineReader {
public:
    explicit LineReader(const std::string& path) : path_(path) {
        require_regular_file(path, "input");
        f_ = fopen(path.c_str(), "rb");
        if (!f_) THROW("cannot open '%s': %s", path.c_str(), strerror(errno));
    }
    LineReader(const LineReader&) = delete;
    ~LineReader() {
        free(buf_);
        if (f_) fclose(f_);
    }
    // the next line without its '\n'; false at the end of the file
    bool next(std::string& line) {
        errno = 0;
        const ssize_t n = getline(&buf_, &cap_, f_);
        if (n < 0) {
            if (ferror(f_)) THROW("cannot read '%s': %s", path_.c_str(), strerror(errno));
            return false;
        }
        bytes_ += (size_t)n;
        line_++;
        line.assign(buf_, (size_t)n - (n > 0 && buf_[n - 1] == '\n'));
        return true;
    }
    long line_number() const { return line_; }
    size_t bytes() const { return bytes_; }

private:
    std::string path_;
    FILE* f_ = nullptr;
    char* buf_ = nullptr;
    size_t cap_ = 0, bytes_ = 0;
    long line_ = 0;
};

inline bool is_blank(const std::string& line) { return line.find_first_not_of(" \t\r") == std::string::npos; }

// One piece of work: a document, or a part of one, and what tokenizing it gave.
struct Segment {
    std::string text;              // the text; for json, the JSONL line that holds it
    bool json = false;
    bool starts_doc = false;       // the first segment of a document (the end-of-text token goes before it)
    bool val = false;              // its document goes to validation (set on every segment)
    const std::string* path = nullptr;
    long line = 0;                 // of a JSONL line
    std::vector<uint32_t> tokens;  // results
    size_t text_bytes = 0;
    std::string error;
};

// the document text of a segment (a JSONL line parsed, its string field taken)
inline void resolve_text(Segment& s, const std::string& field) {
    if (!s.json) return;
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(s.text);
    } catch (const std::exception& e) {
        THROW("'%s' line %ld is not valid JSON: %s", s.path->c_str(), s.line, e.what());
    }
    if (!j.is_object() || !j.contains(field) || !j[field].is_string())
        THROW("'%s' line %ld has no string field '%s'", s.path->c_str(), s.line, field.c_str());
    s.text = j[field].get<std::string>();
    s.json = false;
}

class DocumentReader {
public:
    static constexpr size_t kSegment = 256 << 10;  // a long text is cut near every 256 KB

    // is_val(i): whether document i (from 0, in input order) goes to validation
    DocumentReader(std::vector<std::string> files, std::function<bool(size_t)> is_val)
        : files_(std::move(files)), is_val_(std::move(is_val)) {}
    DocumentReader(const DocumentReader&) = delete;
    ~DocumentReader() {
        if (f_) fclose(f_);
    }

    // the next segments in input order, about `bytes` of text in all; empty at the end
    std::vector<Segment> next(size_t bytes) {
        std::vector<Segment> batch;
        size_t got = 0;
        while (got < bytes && open()) {
            Segment s;
            if (!(lines_ ? read_line(s) : read_text(s))) { close(); continue; }
            got += s.text.size();
            batch.push_back(std::move(s));
        }
        return batch;
    }
    size_t documents() const { return docs_; }
    size_t bytes_read() const { return bytes_done_ + (lines_ ? lines_->bytes() : 0); }

private:
    const std::vector<std::string> files_;
    std::function<bool(size_t)> is_val_;
    size_t next_file_ = 0, docs_ = 0, bytes_done_ = 0;
    std::unique_ptr<LineReader> lines_;  // the open .jsonl file
    FILE* f_ = nullptr;                  // or the open text file
    std::string buf_;                    // its text read but not yet handed out
    bool eof_ = false, first_ = true, val_ = false;  // val_: the open document's split

    // true when a file is open, opening the next one if none is
    bool open() {
        if (lines_ || f_) return true;
        if (next_file_ == files_.size()) return false;
        const std::string& path = files_[next_file_++];
        if (ends_with(path, ".jsonl")) {
            lines_ = std::make_unique<LineReader>(path);
            return true;
        }
        require_regular_file(path, "input");
        f_ = fopen(path.c_str(), "rb");
        if (!f_) THROW("cannot open '%s': %s", path.c_str(), strerror(errno));
        buf_.clear();
        eof_ = false;
        first_ = true;
        return true;
    }
    void close() {
        if (lines_) bytes_done_ += lines_->bytes();
        lines_.reset();
        if (f_) fclose(f_);
        f_ = nullptr;
    }
    const std::string& current_path() const { return files_[next_file_ - 1]; }
    void start_document(Segment& s) {
        s.starts_doc = true;
        s.val = val_ = is_val_(docs_++);
    }

    bool read_line(Segment& s) {
        do {
            if (!lines_->next(s.text)) return false;
        } while (is_blank(s.text));
        s.json = true;
        s.path = &current_path();
        s.line = lines_->line_number();
        start_document(s);
        return true;
    }

    // appends up to `n` bytes of the open text file to buf_ (in chunks: a small file costs
    // its size, not n)
    void fill(size_t n) {
        char chunk[1 << 16];
        while (n > 0) {
            const size_t got = fread(chunk, 1, std::min(n, sizeof(chunk)), f_);
            buf_.append(chunk, got);
            bytes_done_ += got;
            n -= got;
            if (got == 0) {
                if (ferror(f_)) THROW("cannot read '%s': %s", current_path().c_str(), strerror(errno));
                eof_ = true;
                return;
            }
        }
    }

    // The next part of the open text file (one document): about kSegment bytes, cut where
    // the parts tokenize as the whole does, or the rest of the file; false at its end.
    bool read_text(Segment& s) {
        if (!first_ && eof_ && buf_.empty()) return false;
        if (!eof_ && buf_.size() < 2 * kSegment) fill(2 * kSegment - buf_.size());
        size_t cut = bpe::find_cut(buf_, kSegment);
        while (cut == std::string::npos && !eof_) {  // no place to cut yet: read on
            const size_t from = buf_.size() - 2;
            fill(kSegment);
            cut = bpe::find_cut(buf_, from);
        }
        if (cut == std::string::npos || cut == buf_.size()) {  // the rest of the file
            s.text.swap(buf_);
            buf_.clear();
        } else {
            s.text = buf_.substr(0, cut);
            buf_.erase(0, cut);
        }
        s.path = &current_path();
        if (first_) start_document(s);
        else s.val = val_;
        first_ = false;
        return true;
    }
};

// Tokenizes every segment of `batch` on `threads` threads that start at construction;
// the destructor waits for them, so a batch can be tokenized while the next one is read.
// caches: one per thread. Errors stay in each segment's `error`.
class TokenizeBatch {
public:
    TokenizeBatch(std::vector<Segment>& batch, const Tokenizer& tok, const std::string& jsonl_field, bool special,
                  std::vector<Tokenizer::PieceCache>& caches) {
        auto work = [&batch, &tok, &jsonl_field, special, &caches, this](size_t worker) {
            for (size_t i; (i = next_++) < batch.size();) {
                Segment& s = batch[i];
                try {
                    resolve_text(s, jsonl_field);
                    s.text_bytes = s.text.size();
                    tok.encode_into(s.text, s.tokens, special, &caches[worker]);
                } catch (const std::exception& e) {
                    s.error = e.what();
                }
                std::string().swap(s.text);
            }
        };
        try {
            for (size_t w = 0; w < caches.size(); w++) pool_.emplace_back(work, w);
        } catch (...) {  // no thread to be had: finish with those started
            for (auto& t : pool_) t.join();
            throw;
        }
    }
    TokenizeBatch(const TokenizeBatch&) = delete;
    ~TokenizeBatch() {
        for (auto& t : pool_) t.join();
    }

private:
    std::atomic<size_t> next_{0};
    std::vector<std::thread> pool_;
};
