// Token shards and the training data loader (host only).
//
// Shard file (llm.c layout, little endian):
//   int32 header[256]: [0] magic 20240520, [1] version (1 = uint16 tokens, 2 = uint32 tokens),
//                      [2] token count, rest 0
//   then `count` tokens of the version's width. Writers pick uint16 when vocab <= 65536.
//   Documents are laid out as EOT doc EOT doc ...: the end-of-text token opens every document.
//
// Loss-mask companion file for fine-tuning, "<shard>.mask" (optional):
//   int32 header[256]: [0] magic 20240521, [1] version 1, [2] count (= the shard's count), rest 0
//   then `count` uint8: mask[i] = 1 if token i counts in the loss as a target, 0 if not.
//   The loader turns targets whose token has mask 0 into -1 (masked).
//
// DataLoader: every shard matching a glob (sorted) is memory-mapped. A sample is T+1
// consecutive tokens starting at a multiple of T inside one shard (samples never cross
// shards); inputs are its first T tokens, targets its last T. Each epoch visits the global
// sample list in a deterministic order: a Fisher-Yates shuffle driven by splitmix64 seeded
// by (seed, epoch), or the natural order with shuffle = false. Rank r of R takes entries
// r, r+R, r+2R, ... of that order (S / R samples each; the last S mod R entries of each
// epoch's order are skipped so all ranks step in lockstep). Batches run on across epoch
// ends. pos_in_doc[t] is the position of input token t in its document as far as the
// sample sees it: 0 at the sample start and at every EOT token, +1 otherwise.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fcntl.h>
#include <glob.h>
#include <string>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <utility>
#include <vector>
#include "common.h"

constexpr int32_t SHARD_MAGIC = 20240520;
constexpr int32_t MASK_MAGIC = 20240521;
constexpr int SHARD_HEADER_INTS = 256;
constexpr size_t SHARD_HEADER_BYTES = SHARD_HEADER_INTS * sizeof(int32_t);

// ----------------------------------------------------------------------------
// writing

static inline void write_header_and_data(const std::string& path, int32_t magic, int32_t version, int64_t count,
                                         const void* data, size_t bytes) {
    if (count > INT32_MAX) THROW("'%s': %lld tokens do not fit the int32 count of the header", path.c_str(), (long long)count);
    int32_t header[SHARD_HEADER_INTS] = {};
    header[0] = magic;
    header[1] = version;
    header[2] = (int32_t)count;
    // write then rename, so an interrupted run never leaves a valid-looking partial file
    std::string tmp = path + ".tmp";
    FILE* f = fopen_or_throw(tmp, "wb");
    fwrite_or_throw(header, sizeof(header), 1, f, tmp);
    if (bytes) fwrite_or_throw(data, 1, bytes, f, tmp);
    if (fclose(f) != 0) THROW("cannot close '%s'", tmp.c_str());
    if (rename(tmp.c_str(), path.c_str()) != 0) THROW("cannot rename '%s' to '%s'", tmp.c_str(), path.c_str());
}

// Writes a shard with uint16 tokens if vocab_size <= 65536, else uint32.
static inline void write_shard(const std::string& path, const std::vector<uint32_t>& tokens, int vocab_size) {
    for (size_t i = 0; i < tokens.size(); i++)
        if (tokens[i] >= (uint32_t)vocab_size)
            THROW("'%s': token %u at index %zu is >= vocab size %d", path.c_str(), tokens[i], i, vocab_size);
    if (vocab_size <= 65536) {
        std::vector<uint16_t> t16(tokens.begin(), tokens.end());
        write_header_and_data(path, SHARD_MAGIC, 1, (int64_t)tokens.size(), t16.data(), t16.size() * 2);
    } else {
        write_header_and_data(path, SHARD_MAGIC, 2, (int64_t)tokens.size(), tokens.data(), tokens.size() * 4);
    }
}

static inline void write_mask(const std::string& path, const std::vector<uint8_t>& mask) {
    write_header_and_data(path, MASK_MAGIC, 1, (int64_t)mask.size(), mask.data(), mask.size());
}

// ----------------------------------------------------------------------------
// reading

// A read-only memory map of a shard or mask file, header validated.
class MappedFile {
public:
    MappedFile() = default;
    MappedFile(const std::string& path, int32_t magic) : path_(path) {
        int fd = open(path.c_str(), O_RDONLY);
        if (fd < 0) THROW("cannot open '%s'", path.c_str());
        struct stat st;
        if (fstat(fd, &st) != 0) { close(fd); THROW("cannot stat '%s'", path.c_str()); }
        size_ = (size_t)st.st_size;
        if (size_ < SHARD_HEADER_BYTES) {
            close(fd);
            THROW("'%s' is truncated: %zu bytes, smaller than the %zu-byte header", path.c_str(), size_, SHARD_HEADER_BYTES);
        }
        void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        close(fd);
        if (p == MAP_FAILED) THROW("cannot mmap '%s' (%zu bytes)", path.c_str(), size_);
        base_ = (const uint8_t*)p;
        const int32_t* h = header();
        if (h[0] != magic) THROW("'%s' has bad magic %d (expected %d)", path.c_str(), h[0], magic);
        int32_t max_version = magic == SHARD_MAGIC ? 2 : 1;
        if (h[1] < 1 || h[1] > max_version)
            THROW("'%s' has unknown version %d (expected %s)", path.c_str(), h[1],
                  magic == SHARD_MAGIC ? "1 = uint16 or 2 = uint32 tokens" : "1");
        if (h[2] < 0) THROW("'%s' has negative count %d", path.c_str(), h[2]);
        size_t expect = (size_t)h[2] * elem_bytes();
        if (size_ - SHARD_HEADER_BYTES != expect)
            THROW("'%s': header count %d x %zu bytes = %zu bytes, but the file holds %zu bytes after the header",
                  path.c_str(), h[2], elem_bytes(), expect, size_ - SHARD_HEADER_BYTES);
    }
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    MappedFile(MappedFile&& o) noexcept { *this = std::move(o); }
    MappedFile& operator=(MappedFile&& o) noexcept {
        std::swap(path_, o.path_);
        std::swap(base_, o.base_);
        std::swap(size_, o.size_);
        return *this;
    }
    ~MappedFile() {
        if (base_) munmap((void*)base_, size_);
    }

    const int32_t* header() const { return (const int32_t*)base_; }
    int version() const { return header()[1]; }
    size_t count() const { return (size_t)header()[2]; }
    // bytes per element: mask files hold uint8, shards uint16 or uint32
    size_t elem_bytes() const { return header()[0] == MASK_MAGIC ? 1 : (header()[1] == 1 ? 2 : 4); }
    const uint8_t* data() const { return base_ + SHARD_HEADER_BYTES; }
    const std::string& path() const { return path_; }
    bool is_open() const { return base_ != nullptr; }

private:
    std::string path_;
    const uint8_t* base_ = nullptr;
    size_t size_ = 0;
};

// A token shard with its optional loss mask.
class Shard {
public:
    // vocab_size > 0: every token id is checked against it
    explicit Shard(const std::string& path, int vocab_size = 0) : file_(path, SHARD_MAGIC) {
        if (vocab_size > 0 && !(file_.version() == 1 && vocab_size >= 65536)) {
            for (size_t i = 0; i < size(); i++)
                if (token(i) >= (uint32_t)vocab_size)
                    THROW("shard '%s': token id %u at index %zu is >= vocab size %d", path.c_str(), token(i), i, vocab_size);
        }
        std::string mask_path = path + ".mask";
        if (access(mask_path.c_str(), F_OK) == 0) {
            mask_ = MappedFile(mask_path, MASK_MAGIC);
            if (mask_.count() != size())
                THROW("mask '%s' has %zu entries but shard '%s' has %zu tokens", mask_path.c_str(), mask_.count(),
                      path.c_str(), size());
        }
    }
    size_t size() const { return file_.count(); }
    int version() const { return file_.version(); }
    const std::string& path() const { return file_.path(); }
    uint32_t token(size_t i) const {
        if (file_.version() == 1) {
            uint16_t v;
            memcpy(&v, file_.data() + 2 * i, 2);
            return v;
        }
        uint32_t v;
        memcpy(&v, file_.data() + 4 * i, 4);
        return v;
    }
    bool has_mask() const { return mask_.is_open(); }
    bool masked(size_t i) const { return has_mask() && mask_.data()[i] == 0; }

private:
    MappedFile file_;
    MappedFile mask_;
};

// Document boundaries inside packed rows: each row of a batch is cut where a document
// starts (an EOT input token starts one, as pos_in_doc counts) and every piece gets a row of
// its own, padded with EOT inputs and masked targets. A causal model run on these rows sees
// nothing of the other documents: its state starts fresh at each document (the SSM state,
// the conv window, attention) and positions count from the document's start.
struct DocRows {
    std::vector<int> inputs, targets;
    int rows = 0;
};

inline DocRows split_documents(const int* inputs, const int* targets, int B, int T, int eot) {
    DocRows d;
    for (int b = 0; b < B; b++) {
        const int* in = inputs + (size_t)b * T;
        const int* tg = targets + (size_t)b * T;
        for (int start = 0; start < T;) {
            int end = start + 1;
            while (end < T && in[end] != eot) end++;
            d.inputs.insert(d.inputs.end(), in + start, in + end);
            d.targets.insert(d.targets.end(), tg + start, tg + end);
            d.inputs.insert(d.inputs.end(), T - (end - start), eot);
            d.targets.insert(d.targets.end(), T - (end - start), -1);
            d.rows++;
            start = end;
        }
    }
    return d;
}

static inline std::vector<std::string> glob_sorted(const std::string& pattern) {
    glob_t g;
    std::vector<std::string> out;
    int rc = glob(pattern.c_str(), 0, nullptr, &g);
    if (rc == 0)
        for (size_t i = 0; i < g.gl_pathc; i++) out.push_back(g.gl_pathv[i]);
    globfree(&g);
    if (rc != 0 && rc != GLOB_NOMATCH) THROW("glob '%s' failed (code %d)", pattern.c_str(), rc);
    std::sort(out.begin(), out.end());
    return out;
}

// ----------------------------------------------------------------------------

class DataLoader {
public:
    // where the next batch starts: `position` counts samples of this rank's share of `epoch`
    struct State {
        uint64_t epoch;
        uint64_t position;
    };

    DataLoader(const std::string& pattern, int B, int T, int rank = 0, int world = 1, uint64_t seed = 0,
               bool shuffle = true, int vocab_size = 0, int eot = -1)
        : B_(B), T_(T), rank_(rank), world_(world), seed_(seed), shuffle_(shuffle), eot_(eot) {
        if (B <= 0 || T <= 0) THROW("DataLoader: B and T must be positive, got B=%d T=%d", B, T);
        if (world <= 0 || rank < 0 || rank >= world) THROW("DataLoader: rank %d is not in [0, %d)", rank, world);
        std::vector<std::string> paths = glob_sorted(pattern);
        if (paths.empty()) THROW("no file matches the data pattern '%s'", pattern.c_str());
        first_sample_.push_back(0);
        for (auto& p : paths) {
            shards_.emplace_back(p, vocab_size);
            size_t n = shards_.back().size();
            size_t samples = n > 0 ? (n - 1) / (size_t)T : 0;
            if (samples == 0)
                THROW("shard '%s' has %zu tokens, too few for one sample of T+1 = %d tokens", p.c_str(), n, T + 1);
            first_sample_.push_back(first_sample_.back() + samples);
            num_tokens_ += n;
        }
        if (num_samples() >= (1ULL << 32)) THROW("'%s': %zu samples exceed the 2^32 limit", pattern.c_str(), num_samples());
        if (num_samples() < (size_t)world)
            THROW("'%s' has %zu samples of T+1 = %d tokens, fewer than the %d ranks", pattern.c_str(), num_samples(),
                  T + 1, world);
        inputs_.resize((size_t)B * T);
        targets_.resize((size_t)B * T);
        pos_in_doc_.resize((size_t)B * T);
        restore(State{0, 0});
    }

    // fills inputs(), targets(), pos_in_doc() with the next B samples of this rank
    void next_batch() {
        for (int b = 0; b < B_; b++) {
            size_t g = order_[rank_ + state_.position * world_];
            load_sample(g, b);
            if (++state_.position == samples_per_rank()) restore(State{state_.epoch + 1, 0});
        }
    }

    const int* inputs() const { return inputs_.data(); }
    const int* targets() const { return targets_.data(); }   // -1 where the loss mask is 0
    const int* pos_in_doc() const { return pos_in_doc_.data(); }

    State state() const { return state_; }
    void restore(const State& s) {
        if (s.position >= samples_per_rank())
            THROW("DataLoader: cannot restore position %llu, an epoch has %zu samples per rank",
                  (unsigned long long)s.position, samples_per_rank());
        if (order_.empty() || s.epoch != state_.epoch) build_order(s.epoch);
        state_ = s;
    }
    void reset() { restore(State{0, 0}); }

    size_t num_samples() const { return first_sample_.back(); }  // in one epoch, all ranks
    size_t samples_per_rank() const { return num_samples() / (size_t)world_; }
    size_t num_tokens() const { return num_tokens_; }
    size_t num_shards() const { return shards_.size(); }

private:
    void build_order(uint64_t epoch) {
        order_.resize(num_samples());
        for (size_t i = 0; i < order_.size(); i++) order_[i] = (uint32_t)i;
        if (shuffle_) {
            SplitMix64 rng(seed_ * 0xD1B54A32D192ED03ULL ^ (epoch + 1) * 0x9E3779B97F4A7C15ULL);
            for (size_t i = order_.size() - 1; i > 0; i--) std::swap(order_[i], order_[rng.below(i + 1)]);
        }
        state_.epoch = epoch;
    }

    void load_sample(size_t g, int b) {
        size_t s = std::upper_bound(first_sample_.begin(), first_sample_.end(), g) - first_sample_.begin() - 1;
        const Shard& sh = shards_[s];
        size_t start = (g - first_sample_[s]) * (size_t)T_;
        int* in = inputs_.data() + (size_t)b * T_;
        int* tg = targets_.data() + (size_t)b * T_;
        int* pos = pos_in_doc_.data() + (size_t)b * T_;
        for (int t = 0; t < T_; t++) {
            in[t] = (int)sh.token(start + t);
            tg[t] = sh.masked(start + t + 1) ? -1 : (int)sh.token(start + t + 1);
            pos[t] = (t == 0 || in[t] == eot_) ? 0 : pos[t - 1] + 1;
        }
    }

    int B_, T_, rank_, world_;
    uint64_t seed_;
    bool shuffle_;
    int eot_;
    std::vector<Shard> shards_;
    std::vector<size_t> first_sample_;  // global index of each shard's first sample, plus the total
    size_t num_tokens_ = 0;
    std::vector<uint32_t> order_;       // this epoch's order of global sample indices
    State state_{0, 0};
    std::vector<int> inputs_, targets_, pos_in_doc_;
};
