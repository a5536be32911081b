// Token embedding: the residual stream starts as out[r] = wte[token[r]] (fp32).
// The backward sums, for each distinct token, the gradient rows of its positions in a fixed
// order (positions grouped by token on the device), so it needs no atomics.
#pragma once
#include <algorithm>
#include <cub/cub.cuh>
#include "cuda_common.cuh"

static __global__ void embedding_forward_kernel(float* out, const int* tokens, const bf16* wte, int BT, int C) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)BT * C) return;
    const int r = (int)(i / C), c = (int)(i % C);
    out[i] = __bfloat162float(wte[(size_t)tokens[r] * C + c]);
}

inline void embedding_forward(float* out, const int* tokens, const bf16* wte, int BT, int C, cudaStream_t s) {
    embedding_forward_kernel<<<ceil_div((size_t)BT * C, 256), 256, 0, s>>>(out, tokens, wte, BT, C);
    cudaCheckLast();
}

// Positions grouped by token id, built on the device with no host round trip: a stable radix
// sort of (token, position) pairs puts each token's positions in ascending order, a run-length
// encoding gives the distinct tokens and their counts, a scan their first places. Token
// unique[i] occurs at sorted[offsets[i] .. offsets[i] + counts[i]); *num distinct tokens.
static __global__ void iota_kernel(int* p, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = i;
}

struct EmbeddingBuckets {
    int capacity = 0, vocab = 0;
    int *iota = nullptr, *keys = nullptr, *sorted = nullptr, *unique = nullptr, *counts = nullptr, *offsets = nullptr,
        *num = nullptr;
    void* temp = nullptr;
    size_t temp_bytes = 0;

    EmbeddingBuckets() = default;
    EmbeddingBuckets(const EmbeddingBuckets&) = delete;
    EmbeddingBuckets& operator=(const EmbeddingBuckets&) = delete;
    ~EmbeddingBuckets() { release(); }

    // d_tokens: BT ids in [0, V), on the device
    void build(const int* d_tokens, int BT, int V, cudaStream_t s) {
        reserve(BT, V);
        iota_kernel<<<ceil_div((size_t)BT, 256), 256, 0, s>>>(iota, BT);
        cudaCheckLast();
        size_t bytes = temp_bytes;
        cudaCheck(cub::DeviceRadixSort::SortPairs(temp, bytes, d_tokens, keys, iota, sorted, BT, 0, bits(), s));
        bytes = temp_bytes;
        cudaCheck(cub::DeviceRunLengthEncode::Encode(temp, bytes, keys, unique, counts, num, BT, s));
        bytes = temp_bytes;
        cudaCheck(cub::DeviceScan::ExclusiveSum(temp, bytes, counts, offsets, BT, s));
    }

    // room for BT tokens of a vocabulary of V
    void reserve(int BT, int V) {
        if (BT <= capacity && V == vocab) return;
        release();
        capacity = BT;
        vocab = V;
        for (int** p : {&iota, &keys, &sorted, &unique, &counts, &offsets}) *p = cuda_malloc_n<int>(BT, "embedding buckets");
        num = cuda_malloc_n<int>(1, "embedding buckets");
        size_t a = 0, b = 0, c = 0;  // the largest temporary storage of the three steps
        cudaCheck(cub::DeviceRadixSort::SortPairs(nullptr, a, keys, keys, iota, sorted, BT, 0, bits()));
        cudaCheck(cub::DeviceRunLengthEncode::Encode(nullptr, b, keys, unique, counts, num, BT));
        cudaCheck(cub::DeviceScan::ExclusiveSum(nullptr, c, counts, offsets, BT));
        temp_bytes = std::max({a, b, c});
        temp = cuda_malloc(temp_bytes, "embedding buckets");
    }

private:
    int bits() const { int b = 1; while ((1 << b) < vocab) b++; return b; }  // the sort looks at these
    void release() {
        for (void* p : {(void*)iota, (void*)keys, (void*)sorted, (void*)unique, (void*)counts, (void*)offsets,
                        (void*)num, temp})
            cudaFree(p);
        capacity = 0;
    }
};

// one block per distinct token (the grid covers every position: blocks past *num return);
// threads over channels; each token's positions summed in ascending order
static __global__ void embedding_backward_kernel(float* dwte, const float* dout, const int* unique, const int* counts,
                                                 const int* offsets, const int* sorted, const int* num, int C) {
    const int b = blockIdx.x;
    if (b >= *num) return;
    const int tok = unique[b], p0 = offsets[b], p1 = p0 + counts[b];
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = 0.0f;
        for (int p = p0; p < p1; p++) acc += dout[(size_t)sorted[p] * C + c];
        dwte[(size_t)tok * C + c] += acc;
    }
}

// dwte += the sum of dout's rows per token (bk built from the same BT tokens)
inline void embedding_backward(float* dwte, const float* dout, const EmbeddingBuckets& bk, int BT, int C, cudaStream_t s) {
    embedding_backward_kernel<<<BT, 256, 0, s>>>(dwte, dout, bk.unique, bk.counts, bk.offsets, bk.sorted, bk.num, C);
    cudaCheckLast();
}
