// Timing shared by the microbenchmarks: the median of cudaEvent timings after a warm-up.
#pragma once
#include <algorithm>
#include <vector>
#include "cuda_common.cuh"

template <typename F>
static float time_ms(F&& f, int warmup, int iters) {
    for (int i = 0; i < warmup; i++) f();
    cudaEvent_t a, b;
    cudaCheck(cudaEventCreate(&a));
    cudaCheck(cudaEventCreate(&b));
    std::vector<float> ms;
    for (int i = 0; i < iters; i++) {
        cudaCheck(cudaEventRecord(a));
        f();
        cudaCheck(cudaEventRecord(b));
        cudaCheck(cudaEventSynchronize(b));
        float t;
        cudaCheck(cudaEventElapsedTime(&t, a, b));
        ms.push_back(t);
    }
    cudaCheck(cudaEventDestroy(a));
    cudaCheck(cudaEventDestroy(b));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}
