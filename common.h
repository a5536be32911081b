// Host-side helpers shared by every binary: error reporting and checked file I/O.
// Library code throws std::runtime_error with a message that names the offending
// file or value; each main() catches it, prints "error: ..." and exits 1.
#pragma once
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <cstring>
#include <filesystem>
#include <string>
#include <sched.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>
#include <vector>

// functions of plain integers and pointers that kernels call too (nvcc builds them for both sides)
#ifdef __CUDACC__
#define HOST_DEVICE __host__ __device__
#else
#define HOST_DEVICE
#endif

inline std::string strformat(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    char buf[1024];
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    return std::string(buf);
}

#define THROW(...) throw std::runtime_error(strformat(__VA_ARGS__))

inline const char* file_type_name(mode_t mode) {
    if (S_ISDIR(mode)) return "a directory";
    if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISSOCK(mode)) return "a socket";
    return "a special file";
}

inline void require_regular_file(const std::string& path, const char* what) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) THROW("cannot open %s '%s': %s", what, path.c_str(), strerror(errno));
    if (!S_ISREG(st.st_mode))
        THROW("%s '%s' is %s, not a regular file", what, path.c_str(), file_type_name(st.st_mode));
}

inline FILE* fopen_or_throw(const std::string& path, const char* mode) {
    if (mode[0] == 'r') require_regular_file(path, "file");
    FILE* f = fopen(path.c_str(), mode);
    if (!f) THROW("cannot open '%s' (mode %s): %s", path.c_str(), mode, strerror(errno));
    return f;
}

inline void fread_or_throw(void* dst, size_t size, size_t count, FILE* f, const std::string& path) {
    if (fread(dst, size, count, f) != count)
        THROW("short read from '%s': %s", path.c_str(), ferror(f) ? strerror(errno) : "unexpected end of file");
}

inline void fwrite_or_throw(const void* src, size_t size, size_t count, FILE* f, const std::string& path) {
    if (fwrite(src, size, count, f) != count) THROW("short write to '%s': %s", path.c_str(), strerror(errno));
}

inline size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

// the cores this process may run on (its affinity mask: under mpirun's binding, fewer than the machine's)
inline int available_cores() {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1u, std::thread::hardware_concurrency());
}

// splitmix64: a fixed generator, so shuffles and initialisations are identical on every
// platform and library
struct SplitMix64 {
    static constexpr uint64_t STEP = 0x9E3779B97F4A7C15ULL;  // the state's increment per draw
    uint64_t state;
    explicit SplitMix64(uint64_t seed) : state(seed) {}
    // the stream k draws further on: the state after k draws is seed + k STEP, so any position is one multiply away
    void skip(uint64_t k) { state += k * STEP; }
    uint64_t next() {
        uint64_t z = (state += STEP);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }
    // uniform in [0, n) by multiply-shift (bias below 2^-32 for the sizes used here)
    uint64_t below(uint64_t n) { return (uint64_t)(((unsigned __int128)next() * n) >> 64); }
    double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
    double normal() {  // Box-Muller
        double u1 = uniform(), u2 = uniform();
        return std::sqrt(-2.0 * std::log(1.0 - u1)) * std::cos(2.0 * M_PI * u2);
    }
};


// ----------------------------------------------------------------------------
// Input files must be regular files: a FIFO would block the reader forever and a
// directory or device fails later with a puzzling message. `what` names the file's role
// ("shard", "tokenizer file", ...) in the error.

// the whole of a regular file
inline std::string read_file_or_throw(const std::string& path, const char* what) {
    require_regular_file(path, what);
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) THROW("cannot open %s '%s': %s", what, path.c_str(), strerror(errno));
    std::string s;
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0) s.append(buf, n);
    const bool failed = ferror(f);
    fclose(f);
    if (failed) THROW("cannot read %s '%s': %s", what, path.c_str(), strerror(errno));
    return s;
}

// Writes `path` whole or not at all: write(f, tmp) fills the temporary path + ".tmp", which
// is flushed to the disk and renamed over path; on any error the temporary is removed and the
// error passed on, so a crash or a full disk leaves the old file (or none) and no .tmp behind.
template <class Write>
void write_file_atomically(const std::string& path, Write&& write) {
    const std::string tmp = path + ".tmp";
    FILE* f = fopen_or_throw(tmp, "wb");
    try {
        write(f, tmp);
        if (fflush(f) != 0 || fsync(fileno(f)) != 0) THROW("cannot write '%s': %s", tmp.c_str(), strerror(errno));
        const int rc = fclose(f);
        f = nullptr;
        if (rc != 0) THROW("cannot write '%s': %s", tmp.c_str(), strerror(errno));
        std::filesystem::rename(tmp, path);
    } catch (...) {
        if (f) fclose(f);
        std::error_code ec;
        std::filesystem::remove(tmp, ec);
        throw;
    }
}

// A set of output files that appears together or not at all: each file is written under
// the temporary name stage(path) returns (path + ".tmp"); commit() renames them all into
// place once every one was written. Until then nothing at the final names changes, and the
// destructor removes the temporaries of a set that was not committed (an error, a full
// disk), so a failed run leaves neither partial files nor changes behind.
class StagedFiles {
public:
    StagedFiles() = default;
    StagedFiles(const StagedFiles&) = delete;
    StagedFiles& operator=(const StagedFiles&) = delete;
    ~StagedFiles() {
        for (auto& p : staged_) remove((p + ".tmp").c_str());
    }
    std::string stage(const std::string& path) {
        staged_.push_back(path);
        return path + ".tmp";
    }
    void commit() {
        while (!staged_.empty()) {
            const std::string p = staged_.back(), tmp = p + ".tmp";
            if (rename(tmp.c_str(), p.c_str()) != 0)
                THROW("cannot rename '%s' to '%s': %s", tmp.c_str(), p.c_str(), strerror(errno));
            staged_.pop_back();
        }
    }

private:
    std::vector<std::string> staged_;
};
