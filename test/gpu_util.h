// Helpers shared by the GPU kernel tests: device copies, NaN poison, bf16-exact random
// inputs, and the relative-L2 check against the double reference.
#pragma once
#include <catch2/catch.hpp>
#include <cmath>
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
