// Fused cross-entropy over the padded vocabulary: one block per row reads the bf16 logits into
// registers (never an fp32 copy), writes the row's loss, then overwrites the row
// with its gradient. Per row i with weight w_i (1 without weights; 0 when targets[i] < 0):
//   lse = logsumexp(logits[i, :V]); ce = lse - logits[i, t_i]
//   losses[i] = w_i (ce + z_loss lse^2)
//   dlogits[i, j] = dloss w_i (softmax_j (1 + 2 z_loss lse) - [j == t_i]); 0 for padded j >= V
// (dloss, the step's 1 / valid targets, is read from the device: a captured step replays with
// the value its batch uploaded)
//   target_rank[i] = #{j < V : logits[i, j] > logits[i, t_i]} (for top-k accuracy)
// loss_accumulate adds the sum of the per-token losses to a device total (no host sync).
#pragma once
#include <cfloat>
#include "cuda_common.cuh"

constexpr int LOSS_THREADS = 512;
// 8-wide vectors of its row that a thread keeps in registers from the logsumexp pass to the gradient's (64
// registers a thread leave two blocks an SM, so one block's loads overlap the other's arithmetic): LOSS_THREADS *
// 8 * LOSS_CACHED = 28672 logits of a row are read from memory once; the gradient pass reads the rest again from
// L2 (GPT-2's 50257: 43% of the row). Reading the whole row twice took 8% longer at the 370m shape.
constexpr int LOSS_CACHED = 7;

// the 8 logits of a vector as floats, -inf past V (pad columns and the row's end count for nothing)
__device__ inline void logits8(float (&l)[8], const uint4& raw, int j0, int V) {
    const bf16* v = reinterpret_cast<const bf16*>(&raw);
    #pragma unroll
    for (int k = 0; k < 8; k++) l[k] = j0 + k < V ? __bfloat162float(v[k]) : -INFINITY;
}

// A part of a row's logsumexp: the largest logit m of the part, the sum of exp(l - m) over it, and how
// many of its logits beat the target's (exact in a float below 2^24). Parts merge in any grouping.
struct LsePart { float m, s, above; };
struct LseMerge {
    __device__ LsePart operator()(const LsePart& a, const LsePart& b) const {
        const float m = fmaxf(a.m, b.m);
        return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m), a.above + b.above};
    }
};
__device__ inline LsePart shfl_xor(const LsePart& p, int lane_mask) {
    return {shfl_xor(p.m, lane_mask), shfl_xor(p.s, lane_mask), shfl_xor(p.above, lane_mask)};
}

// One pass for the logsumexp (a running max per thread, its sum rescaled when the max grows) and one
// block-wide merge, then the gradient over the padded row
static __global__ void __launch_bounds__(LOSS_THREADS, 2)
fused_classifier_kernel(bf16* logits, float* losses, int* target_rank, const int* targets, const float* weights,
                        const float* dloss, float z_loss, int V, int Vp, bool write_dlogits) {
    const int row = blockIdx.x, first = threadIdx.x * 8, stride = LOSS_THREADS * 8;
    const int rest = first + LOSS_CACHED * stride;  // the thread's first vector past its cached ones
    bf16* x = logits + (size_t)row * Vp;
    const int t = targets[row];
    const float w = t < 0 ? 0.0f : (weights ? weights[row] : 1.0f);
    const float xt = t < 0 ? 0.0f : __bfloat162float(x[t]);
    uint4 cache[LOSS_CACHED];
    #pragma unroll
    for (int i = 0; i < LOSS_CACHED; i++) {
        const int j0 = first + i * stride;
        cache[i] = j0 < Vp ? *reinterpret_cast<const uint4*>(x + j0) : make_uint4(0, 0, 0, 0);
    }
    LsePart part{-FLT_MAX, 0.0f, 0.0f};  // -inf logits (past V) add nothing
    auto add = [&](const uint4& raw, int j0) {
        float l[8], vm = -FLT_MAX;
        logits8(l, raw, j0, V);
        #pragma unroll
        for (int k = 0; k < 8; k++) { vm = fmaxf(vm, l[k]); part.above += l[k] > xt ? 1.0f : 0.0f; }
        if (vm > part.m) { part.s *= __expf(part.m - vm); part.m = vm; }
        #pragma unroll
        for (int k = 0; k < 8; k++) part.s += __expf(l[k] - part.m);
    };
    #pragma unroll
    for (int i = 0; i < LOSS_CACHED; i++) add(cache[i], first + i * stride);
    for (int j0 = rest; j0 < V; j0 += stride) add(*reinterpret_cast<const uint4*>(x + j0), j0);
    const LsePart all = block_reduce(part, LseMerge{});
    const float lse = all.m + logf(all.s);
    if (threadIdx.x == 0) {
        losses[row] = w * (lse - xt + z_loss * lse * lse);
        if (target_rank) target_rank[row] = t < 0 ? -1 : (int)all.above;
    }
    if (!write_dlogits) return;
    const float scale = *dloss * w, pscale = 1.0f + 2.0f * z_loss * lse;
    auto grad = [&](const uint4& raw, int j0) {  // 0 for the pad columns
        float l[8];
        logits8(l, raw, j0, V);
        uint4 out;
        bf16* g = reinterpret_cast<bf16*>(&out);
        #pragma unroll
        for (int k = 0; k < 8; k++)
            g[k] = __float2bfloat16(scale * (__expf(l[k] - lse) * pscale - (j0 + k == t ? 1.0f : 0.0f)));
        *reinterpret_cast<uint4*>(x + j0) = out;
    };
    #pragma unroll
    for (int i = 0; i < LOSS_CACHED; i++)
        if (first + i * stride < Vp) grad(cache[i], first + i * stride);
    for (int j0 = rest; j0 < Vp; j0 += stride) grad(*reinterpret_cast<const uint4*>(x + j0), j0);
}

inline void fused_classifier(bf16* logits, float* losses, int* target_rank, const int* targets, const float* weights,
                             const float* dloss, float z_loss, int BT, int V, int Vp, bool write_dlogits, cudaStream_t s) {
    if (Vp % 8 != 0 || V > Vp) THROW("fused_classifier: padded vocab %d must be a multiple of 8 and >= V %d", Vp, V);
    fused_classifier_kernel<<<BT, LOSS_THREADS, 0, s>>>(logits, losses, target_rank, targets, weights, dloss, z_loss, V,
                                                        Vp, write_dlogits);
    cudaCheckLast();
}

// The rows that carry a loss, gathered for the LM head, and their gradients scattered back (Model::
// lm_head_and_loss): out[i] = in[idx[i]], zeros where idx[i] < 0 (the gather's padding; the scatter's rows
// without a loss). Rows of d bf16 values, copied in 16-byte words where every row allows.
template <typename Word>
__global__ void copy_rows_kernel(bf16* out, const bf16* in, const int* idx, int d) {
    const int words = d * (int)sizeof(bf16) / (int)sizeof(Word), r = idx[blockIdx.x];
    Word* o = reinterpret_cast<Word*>(out + (size_t)blockIdx.x * d);
    const Word* x = reinterpret_cast<const Word*>(in + (size_t)(r < 0 ? 0 : r) * d);
    for (int k = threadIdx.x; k < words; k += blockDim.x) o[k] = r >= 0 ? x[k] : Word{};
}

inline void copy_rows(bf16* out, const bf16* in, const int* idx, int rows, int d, cudaStream_t s) {
    const bool wide = vec_width(8, sizeof(bf16), {out, in}, {d}) == 8;
    const int words = wide ? d / 8 : d, threads = std::min(128, (int)ceil_div(words, 32) * 32);
    if (wide) copy_rows_kernel<uint4><<<rows, threads, 0, s>>>(out, in, idx, d);
    else copy_rows_kernel<uint16_t><<<rows, threads, 0, s>>>(out, in, idx, d);
    cudaCheckLast();
}

constexpr int LOSS_SUM_THREADS = 1024;

// *total += sum of losses[0, n) in fp64, by one block in a fixed order (strided per thread,
// then a tree over the threads): the same bits on every run
static __global__ void __launch_bounds__(LOSS_SUM_THREADS) loss_sum_kernel(double* total, const float* losses, int n) {
    __shared__ double red[LOSS_SUM_THREADS];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += LOSS_SUM_THREADS) acc += losses[i];
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int k = LOSS_SUM_THREADS / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) red[threadIdx.x] += red[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) *total += red[0];
}

inline void loss_accumulate(double* total, const float* losses, int n, cudaStream_t s) {
    loss_sum_kernel<<<1, LOSS_SUM_THREADS, 0, s>>>(total, losses, n);
    cudaCheckLast();
}
