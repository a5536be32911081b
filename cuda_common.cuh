// CUDA helpers shared by every kernel header: error checks, bf16, allocation with
// a clear out-of-memory message.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>
#include "common.h"

typedef __nv_bfloat16 bf16;

inline void cuda_check(cudaError_t err, const char* file, int line) {
    if (err != cudaSuccess) {
        fprintf(stderr, "CUDA error at %s:%d: %s\n", file, line, cudaGetErrorString(err));
        exit(EXIT_FAILURE);
    }
}
#define cudaCheck(err) cuda_check((err), __FILE__, __LINE__)
// after every kernel launch
#define cudaCheckLast() cuda_check(cudaGetLastError(), __FILE__, __LINE__)

// cudaMalloc that ends the program with the size asked for and what was free.
inline void* cuda_malloc(size_t bytes, const char* what) {
    void* ptr = nullptr;
    cudaError_t err = cudaMalloc(&ptr, bytes);
    if (err == cudaErrorMemoryAllocation) {
        size_t free_b = 0, total_b = 0;
        cudaGetLastError();
        cudaMemGetInfo(&free_b, &total_b);
        fprintf(stderr, "error: out of GPU memory allocating %s: %.3f GiB asked, %.3f GiB free of %.3f GiB\n",
                what, bytes / 1073741824.0, free_b / 1073741824.0, total_b / 1073741824.0);
        exit(EXIT_FAILURE);
    }
    cuda_check(err, __FILE__, __LINE__);
    return ptr;
}

template <typename T>
inline T* cuda_malloc_n(size_t n, const char* what) { return (T*)cuda_malloc(n * sizeof(T), what); }
