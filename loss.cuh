// Fused cross-entropy over the padded vocabulary: one block per row reads the bf16 logits
// (online max and sum, never an fp32 copy), writes the row's loss, then overwrites the row
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

static __global__ void __launch_bounds__(LOSS_THREADS)
fused_classifier_kernel(bf16* logits, float* losses, int* target_rank, const int* targets, const float* weights,
                        const float* dloss, float z_loss, int V, int Vp, bool write_dlogits) {
    __shared__ float s_max[LOSS_THREADS / 32], s_sum[LOSS_THREADS / 32];
    __shared__ int s_cnt[LOSS_THREADS / 32];
    const int row = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    bf16* x = logits + (size_t)row * Vp;
    const int t = targets[row];
    const float w = t < 0 ? 0.0f : (weights ? weights[row] : 1.0f);
    const float xt = t < 0 ? 0.0f : __bfloat162float(x[t]);

    // online softmax statistics over 8-wide vectors (Vp is a multiple of 128)
    float m = -FLT_MAX, s = 0.0f;
    int above = 0;
    for (int j0 = threadIdx.x * 8; j0 < V; j0 += LOSS_THREADS * 8) {
        uint4 raw = *reinterpret_cast<const uint4*>(x + j0);
        const bf16* v = reinterpret_cast<const bf16*>(&raw);
        #pragma unroll
        for (int k = 0; k < 8; k++) {
            if (j0 + k >= V) break;
            float l = __bfloat162float(v[k]);
            above += l > xt;
            if (l > m) { s = s * __expf(m - l) + 1.0f; m = l; }
            else s += __expf(l - m);
        }
    }
    // combine (max, sum) pairs: warp, then block
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
        float mm = fmaxf(m, m2);
        s = (m == -FLT_MAX ? 0.0f : s * __expf(m - mm)) + (m2 == -FLT_MAX ? 0.0f : s2 * __expf(m2 - mm));
        m = mm;
        above += __shfl_xor_sync(0xffffffff, above, o);
    }
    if (lane == 0) { s_max[warp] = m; s_sum[warp] = s; s_cnt[warp] = above; }
    __syncthreads();
    float M = -FLT_MAX, S = 0.0f;
    int cnt = 0;
    for (int k = 0; k < LOSS_THREADS / 32; k++) M = fmaxf(M, s_max[k]);
    for (int k = 0; k < LOSS_THREADS / 32; k++) {
        if (s_max[k] != -FLT_MAX) S += s_sum[k] * __expf(s_max[k] - M);
        cnt += s_cnt[k];
    }
    const float lse = M + logf(S);
    if (threadIdx.x == 0) {
        losses[row] = w * (lse - xt + z_loss * lse * lse);
        if (target_rank) target_rank[row] = t < 0 ? -1 : cnt;
    }
    if (!write_dlogits) return;
    const float scale = *dloss * w, pscale = 1.0f + 2.0f * z_loss * lse;
    for (int j0 = threadIdx.x * 8; j0 < Vp; j0 += LOSS_THREADS * 8) {
        uint4 raw = *reinterpret_cast<const uint4*>(x + j0);
        bf16* v = reinterpret_cast<bf16*>(&raw);
        #pragma unroll
        for (int k = 0; k < 8; k++) {
            const int j = j0 + k;
            float g = 0.0f;
            if (j < V) g = scale * (__expf(__bfloat162float(v[k]) - lse) * pscale - (j == t ? 1.0f : 0.0f));
            v[k] = __float2bfloat16(g);
        }
        *reinterpret_cast<uint4*>(x + j0) = raw;
    }
}

inline void fused_classifier(bf16* logits, float* losses, int* target_rank, const int* targets, const float* weights,
                             const float* dloss, float z_loss, int BT, int V, int Vp, bool write_dlogits, cudaStream_t s) {
    if (Vp % 8 != 0 || V > Vp) THROW("fused_classifier: padded vocab %d must be a multiple of 8 and >= V %d", Vp, V);
    fused_classifier_kernel<<<BT, LOSS_THREADS, 0, s>>>(logits, losses, target_rank, targets, weights, dloss, z_loss, V,
                                                        Vp, write_dlogits);
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
