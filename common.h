// Host-side helpers shared by every binary: error reporting and checked file I/O.
// Library code throws std::runtime_error with a message that names the offending
// file or value; each main() catches it, prints "error: ..." and exits 1.
#pragma once
#include <cstdarg>
#include <cstdio>
#include <cstdint>
#include <stdexcept>
#include <string>

inline std::string strformat(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    char buf[1024];
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    return std::string(buf);
}

#define THROW(...) throw std::runtime_error(strformat(__VA_ARGS__))

inline FILE* fopen_or_throw(const std::string& path, const char* mode) {
    FILE* f = fopen(path.c_str(), mode);
    if (!f) THROW("cannot open '%s' (mode %s)", path.c_str(), mode);
    return f;
}

inline void fread_or_throw(void* dst, size_t size, size_t count, FILE* f, const std::string& path) {
    if (fread(dst, size, count, f) != count) THROW("short read from '%s'", path.c_str());
}

inline void fwrite_or_throw(const void* src, size_t size, size_t count, FILE* f, const std::string& path) {
    if (fwrite(src, size, count, f) != count) THROW("short write to '%s'", path.c_str());
}

inline size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }
