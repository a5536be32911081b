// Host-side helpers shared by every binary: error reporting and checked file I/O.
// Library code throws std::runtime_error with a message that names the offending
// file or value; each main() catches it, prints "error: ..." and exits 1.
#pragma once
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <cstring>
#include <string>
#include <sys/stat.h>

inline std::string strformat(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    char buf[1024];
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    return std::string(buf);
}

#define THROW(...) throw std::runtime_error(strformat(__VA_ARGS__))

// a command-line flag's value as a whole integer or a number; the error names the flag
inline long flag_long(const std::string& flag, const std::string& v) {
    char* end;
    long x = strtol(v.c_str(), &end, 10);
    if (*end || v.empty()) THROW("flag %s expects an integer, got '%s'", flag.c_str(), v.c_str());
    return x;
}
inline double flag_double(const std::string& flag, const std::string& v) {
    char* end;
    double x = strtod(v.c_str(), &end);
    if (*end || v.empty()) THROW("flag %s expects a number, got '%s'", flag.c_str(), v.c_str());
    return x;
}

// Readers refuse what is not a regular file by its type, before opening it: a FIFO would
// block, a directory would fail later with a less clear message.
inline void require_regular_file(const std::string& path, const char* what) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) THROW("%s '%s': %s", what, path.c_str(), std::strerror(errno));
    if (!S_ISREG(st.st_mode))
        THROW("%s '%s' is not a regular file (%s)", what, path.c_str(),
              S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO" : "a device or socket");
}

inline FILE* fopen_or_throw(const std::string& path, const char* mode) {
    if (mode[0] == 'r') require_regular_file(path, "file");
    FILE* f = fopen(path.c_str(), mode);
    if (!f) THROW("cannot open '%s' (mode %s): %s", path.c_str(), mode, std::strerror(errno));
    return f;
}

inline void fread_or_throw(void* dst, size_t size, size_t count, FILE* f, const std::string& path) {
    if (fread(dst, size, count, f) != count)
        THROW("short read from '%s'%s", path.c_str(), ferror(f) ? (": " + std::string(std::strerror(errno))).c_str() : " (truncated)");
}

inline void fwrite_or_throw(const void* src, size_t size, size_t count, FILE* f, const std::string& path) {
    if (fwrite(src, size, count, f) != count) THROW("cannot write to '%s': %s", path.c_str(), std::strerror(errno));
}

inline size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

// splitmix64: a fixed generator, so shuffles and initialisations are identical on every
// platform and library
struct SplitMix64 {
    uint64_t state;
    explicit SplitMix64(uint64_t seed) : state(seed) {}
    uint64_t next() {
        uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
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

