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

// Writes one shard or mask file front to back: the header (its count filled in by
// finish()), then the elements as they come, so no file needs to fit in memory. The file
// is written at the path given: callers write to a StagedFiles temporary, so a file cut
// short by an error never carries a shard's name.
class ShardWriter {
public:
    // a token shard of uint16 tokens if vocab_size <= 65536, else uint32
    static ShardWriter tokens(const std::string& path, int vocab_size) {
        return ShardWriter(path, SHARD_MAGIC, vocab_size <= 65536 ? 1 : 2, vocab_size);
    }
    static ShardWriter mask(const std::string& path) { return ShardWriter(path, MASK_MAGIC, 1, 0); }

    ShardWriter(ShardWriter&& o) noexcept
        : path_(std::move(o.path_)), f_(o.f_), magic_(o.magic_), version_(o.version_), vocab_(o.vocab_), count_(o.count_) {
        o.f_ = nullptr;
    }
    ShardWriter(const ShardWriter&) = delete;
    ~ShardWriter() {
        if (f_) fclose(f_);
    }

    void append_tokens(const uint32_t* t, size_t n) {
        for (size_t i = 0; i < n; i++)
            if (t[i] >= (uint32_t)vocab_)
                THROW("'%s': token %u at index %zu is >= vocab size %d", path_.c_str(), t[i], count_ + i, vocab_);
        if (version_ == 2) { write(t, 4 * n, n); return; }
        uint16_t buf[4096];
        for (size_t i = 0; i < n; i += 4096) {
            const size_t m = std::min<size_t>(4096, n - i);
            for (size_t k = 0; k < m; k++) buf[k] = (uint16_t)t[i + k];
            write(buf, 2 * m, m);
        }
    }
    void append_mask(const uint8_t* m, size_t n) { write(m, n, n); }
    size_t count() const { return count_; }

    // writes the count into the header and closes the file
    void finish() {
        int32_t header[SHARD_HEADER_INTS] = {};
        header[0] = magic_;
        header[1] = version_;
        header[2] = (int32_t)count_;
        if (fflush(f_) != 0 || fseek(f_, 0, SEEK_SET) != 0 || fwrite(header, sizeof(header), 1, f_) != 1) fail();
        FILE* f = f_;
        f_ = nullptr;
        if (fclose(f) != 0) THROW("cannot write '%s': %s", path_.c_str(), strerror(errno));
    }

private:
    std::string path_;
    FILE* f_ = nullptr;
    int32_t magic_, version_;
    int vocab_;
    size_t count_ = 0;

    ShardWriter(const std::string& path, int32_t magic, int32_t version, int vocab)
        : path_(path), magic_(magic), version_(version), vocab_(vocab) {
        f_ = fopen_or_throw(path, "wb");
        const int32_t zeros[SHARD_HEADER_INTS] = {};  // the header, once the count is known
        if (fwrite(zeros, sizeof(zeros), 1, f_) != 1) fail();
    }
    void write(const void* data, size_t bytes, size_t n) {
        if (count_ + n > (size_t)INT32_MAX)
            THROW("'%s': %zu elements do not fit the int32 count of the header", path_.c_str(), count_ + n);
        if (bytes && fwrite(data, 1, bytes, f_) != bytes) fail();
        count_ += n;
    }
    [[noreturn]] void fail() const { THROW("cannot write '%s': %s", path_.c_str(), strerror(errno)); }
};

// Writes a shard with uint16 tokens if vocab_size <= 65536, else uint32: to a temporary,
// renamed into place when complete (removed on an error).
static inline void write_shard(const std::string& path, const std::vector<uint32_t>& tokens, int vocab_size) {
    StagedFiles out;
    ShardWriter w = ShardWriter::tokens(out.stage(path), vocab_size);
    w.append_tokens(tokens.data(), tokens.size());
    w.finish();
    out.commit();
}

static inline void write_mask(const std::string& path, const std::vector<uint8_t>& mask) {
    StagedFiles out;
    ShardWriter w = ShardWriter::mask(out.stage(path));
    w.append_mask(mask.data(), mask.size());
    w.finish();
    out.commit();
}

// ----------------------------------------------------------------------------
// reading

// A read-only memory map of a shard or mask file, header validated.
class MappedFile {
public:
    MappedFile() = default;
    MappedFile(const std::string& path, int32_t magic) : path_(path) {
        // non-blocking, so a FIFO is refused by its type instead of waiting for a writer
        int fd = open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) THROW("cannot open '%s': %s", path.c_str(), strerror(errno));
        struct stat st;
        if (fstat(fd, &st) != 0) {
            const int err = errno;
            close(fd);
            THROW("cannot stat '%s': %s", path.c_str(), strerror(err));
        }
        if (!S_ISREG(st.st_mode)) {
            close(fd);
            THROW("'%s' is %s, not a regular file", path.c_str(), file_type_name(st.st_mode));
        }
        size_ = (size_t)st.st_size;
        if (size_ < SHARD_HEADER_BYTES) {
            close(fd);
            THROW("'%s' is truncated: %zu bytes, smaller than the %zu-byte header", path.c_str(), size_, SHARD_HEADER_BYTES);
        }
        void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        const int err = errno;
        close(fd);
        if (p == MAP_FAILED) THROW("cannot mmap '%s' (%zu bytes): %s", path.c_str(), size_, strerror(err));
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
