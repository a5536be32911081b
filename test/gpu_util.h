// Helpers shared by the GPU kernel tests: device copies, NaN poison, bf16-exact random
// inputs, strided outputs read back, and the checks against the double reference.
#pragma once
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <random>
#include <vector>
#include "cuda_common.cuh"
#include "test/test_util.h"

static const bf16 kPoison = __ushort_as_bfloat16((unsigned short)0x7fc0);  // NaN

template <typename T>
static T* to_device(const std::vector<T>& h) {
    T* d = cuda_malloc_n<T>(h.size(), "test buffer");
    cudaCheck(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}
template <typename T>
static std::vector<T> to_host(const T* d, size_t n) {
    std::vector<T> h(n);
    cudaCheck(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}
inline void cuda_free_all(std::initializer_list<void*> ps) {
    for (void* p : ps) cudaCheck(cudaFree(p));
}

// device outputs poisoned before a kernel runs: all bits set is NaN in bf16 and fp32
template <typename T>
inline void poison(T* d, size_t n) { cudaCheck(cudaMemset(d, 0xff, n * sizeof(T))); }
inline void poison_bytes(void* d, size_t bytes) { cudaCheck(cudaMemset(d, 0xff, bytes)); }

struct Rng {
    std::mt19937_64 gen;
    explicit Rng(uint64_t seed) : gen(seed) {}
    double normal() { return std::normal_distribution<double>(0.0, 1.0)(gen); }
    double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(gen); }
};

// a value rounded to bf16, and the rounded value as double for the reference
static bf16 round_bf16(double v, double* out) {
    bf16 b = __float2bfloat16((float)v);
    *out = (double)__bfloat162float(b);
    return b;
}

// the columns [c0, c0 + n) of every row of a (rows, row) bf16 matrix, as double (rows, n)
inline std::vector<double> columns(const std::vector<bf16>& m, size_t rows, int row, int c0, int n) {
    std::vector<double> r(rows * n);
    for (size_t t = 0; t < rows; t++)
        for (int i = 0; i < n; i++) r[t * n + i] = __bfloat162float(m[t * row + c0 + i]);
    return r;
}
// every value of a (rows, row) bf16 matrix outside the columns [c0, c0 + n) is NaN: a strided output
// (poisoned before the kernel ran) was not written in its gaps
inline bool nan_outside(const std::vector<bf16>& m, size_t rows, int row, int c0, int n) {
    for (size_t t = 0; t < rows; t++)
        for (int i = 0; i < row; i++)
            if ((i < c0 || i >= c0 + n) && !std::isnan(__bfloat162float(m[t * row + i]))) return false;
    return true;
}
// what a kernel added to an accumulating fp32 output that started at `start`: elements [off, off + n)
inline std::vector<double> added(const std::vector<float>& got, const std::vector<float>& start, size_t off, size_t n) {
    std::vector<double> r(n);
    for (size_t i = 0; i < n; i++) r[i] = (double)got[off + i] - start[off + i];
    return r;
}
// bit-identical results (reruns must repeat)
template <typename T>
inline bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// relative L2 below tol; where the reference is exactly zero (a degenerate shape, e.g. T = 1,
// where the terms cancel), the kernel's values, cancelling up to fp32 rounding, must stay
// below zero_tol in norm
static void check_close(const char* name, const std::vector<double>& got, const std::vector<double>& ref, double tol,
                        double zero_tol = 1e-4) {
    double rn = 0, gn = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        rn += ref[i] * ref[i];
        gn += std::isfinite(got[i]) ? got[i] * got[i] : INFINITY;
    }
    INFO(name << ": rel L2 " << rel_l2(got, ref) << ", |ref| " << std::sqrt(rn) << ", |got| " << std::sqrt(gn));
    if (rn == 0) CHECK(std::sqrt(gn) < zero_tol);
    else CHECK(rel_l2(got, ref) < tol);
}

// fp32 master weights on the device as the optimizers keep them (cuda_common.cuh's
// MasterWeights: the bf16 compute copy and the low halves)
struct DeviceMaster {
    size_t n;
    MasterWeights w;
    explicit DeviceMaster(size_t n_)
        : n(n_), w{cuda_malloc_n<bf16>(n_, "master high halves"), cuda_malloc_n<int16_t>(n_, "master low halves")} {}
    DeviceMaster(const DeviceMaster&) = delete;
    DeviceMaster& operator=(const DeviceMaster&) = delete;
    ~DeviceMaster() { cuda_free_all({w.hi, w.lo}); }
    void set(const std::vector<float>& host) {
        REQUIRE(host.size() == n);
        upload_master(w.hi, w.lo, host.data(), n, 0, n);
    }
    std::vector<float> get() const { return download_master(w, n); }
    std::vector<bf16> compute_copy() const { return to_host(w.hi, n); }
};

// the bf16 compute copy of an fp32 master weight (params.h's rounding), as a float
inline float master_bf16(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    const uint32_t hb = (uint32_t)master_high(bits) << 16;
    float h;
    std::memcpy(&h, &hb, 4);
    return h;
}
