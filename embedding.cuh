// Token embedding: the residual stream starts as out[r] = wte[token[r]] (fp32).
// The backward sums, for each distinct token, the gradient rows of its positions in a fixed
// order (positions grouped by token on the host), so it needs no atomics.
#pragma once
#include <algorithm>
#include <vector>
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

// positions grouped by token id: token[i] occurs at positions[offsets[i] .. offsets[i+1])
struct EmbeddingBuckets {
    int num = 0, capacity = 0;
    int *tokens = nullptr, *offsets = nullptr, *positions = nullptr;  // device
    std::vector<int> h_tokens, h_offsets, h_positions;

    void build(const int* host_tokens, int BT, cudaStream_t s) {
        if (BT > capacity) {
            release();
            capacity = BT;
            tokens = cuda_malloc_n<int>(BT, "embedding buckets");
            offsets = cuda_malloc_n<int>(BT + 1, "embedding buckets");
            positions = cuda_malloc_n<int>(BT, "embedding buckets");
        }
        std::vector<int> order(BT);
        for (int i = 0; i < BT; i++) order[i] = i;
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return host_tokens[a] < host_tokens[b]; });
        h_tokens.clear(); h_offsets.clear(); h_positions = order;
        for (int i = 0; i < BT; i++)
            if (i == 0 || host_tokens[order[i]] != host_tokens[order[i - 1]]) {
                h_tokens.push_back(host_tokens[order[i]]);
                h_offsets.push_back(i);
            }
        h_offsets.push_back(BT);
        num = (int)h_tokens.size();
        cudaCheck(cudaMemcpyAsync(tokens, h_tokens.data(), num * sizeof(int), cudaMemcpyHostToDevice, s));
        cudaCheck(cudaMemcpyAsync(offsets, h_offsets.data(), (num + 1) * sizeof(int), cudaMemcpyHostToDevice, s));
        cudaCheck(cudaMemcpyAsync(positions, h_positions.data(), BT * sizeof(int), cudaMemcpyHostToDevice, s));
        cudaCheck(cudaStreamSynchronize(s));  // the host vectors are reused by the next build
    }
    void release() {
        cudaFree(tokens); cudaFree(offsets); cudaFree(positions);
        tokens = offsets = positions = nullptr;
        capacity = 0;
    }
    ~EmbeddingBuckets() { release(); }
};

// one block per distinct token; threads over channels
static __global__ void embedding_backward_kernel(float* dwte, const float* dout, const int* tokens, const int* offsets,
                                          const int* positions, int C) {
    const int b = blockIdx.x;
    const int tok = tokens[b], p0 = offsets[b], p1 = offsets[b + 1];
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = 0.0f;
        for (int p = p0; p < p1; p++) acc += dout[(size_t)positions[p] * C + c];
        dwte[(size_t)tok * C + c] += acc;
    }
}

inline void embedding_backward(float* dwte, const float* dout, const EmbeddingBuckets& bk, int C, cudaStream_t s) {
    if (bk.num == 0) return;
    embedding_backward_kernel<<<bk.num, 256, 0, s>>>(dwte, dout, bk.tokens, bk.offsets, bk.positions, C);
    cudaCheckLast();
}
