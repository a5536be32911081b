// Optimizer: AdamW on the fp32 master weights (kept as the bf16 compute copy and a low half), the global
// gradient norm with clipping, and Muon for the blocks' matrices (schedule.h has the
// learning-rate schedules).
//
// An AdamW updates the elements of its tensors that lie in [begin, end) of the flat buffer
// (all of it on one GPU; a rank's shard under ZeRO-1), cut into work items of at most
// ADAMW_ITEM elements, each inside one tensor, so a single launch knows every element's
// weight-decay flag. Its m and v hold only those elements (not the Muon matrices between
// them), item after item.
#pragma once
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>
#include "cuda_common.cuh"
#include "matmul.cuh"
#include "params.h"  // ParamTensor, adamw_items

struct AdamWConfig {
    float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f, grad_clip = 1.0f;
};

constexpr int NORM_BLOCKS = 1024;

// clip_scale = min(1, clip / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_
// VEC consecutive elements of one item (the same arithmetic for any VEC)
template <int VEC>
__device__ inline void adamw_elems(MasterWeights master, float* m, float* v, const float* grads, float clip,
                                   float lr, float beta1, float beta2, float eps, float decay, float bc1, float bc2) {
    float g[VEC], mi[VEC], vi[VEC], p[VEC];
    load_vec<VEC>(g, grads);
    load_vec<VEC>(mi, m);
    load_vec<VEC>(vi, v);
    load_master<VEC>(p, master);
    #pragma unroll
    for (int e = 0; e < VEC; e++) {
        const float ge = g[e] * clip;
        mi[e] = beta1 * mi[e] + (1.0f - beta1) * ge;
        vi[e] = beta2 * vi[e] + (1.0f - beta2) * ge * ge;
        p[e] -= lr * decay * p[e];
        p[e] -= lr * (mi[e] / bc1) / (sqrtf(vi[e] / bc2) + eps);
    }
    store_vec<VEC>(m, mi);
    store_vec<VEC>(v, vi);
    store_master<VEC>(master, p);
}

// one block per item; 4 elements a thread (16-byte accesses) when the item's pointers and
// length allow, else one
static __global__ void adamw_kernel(MasterWeights master, float* m, float* v, const float* grads,
                             const AdamWItem* items, const float* norm2, float grad_clip, float lr,
                             float beta1, float beta2, float eps, float wd, float bc1, float bc2) {
    const AdamWItem it = items[blockIdx.x];
    const float norm = sqrtf(*norm2);
    const float clip = grad_clip > 0.0f ? fminf(1.0f, grad_clip / (norm + 1e-6f)) : 1.0f;
    const float decay = it.decay ? wd : 0.0f;
    master = master + it.start; grads += it.start;
    m += it.state; v += it.state;
    const bool wide = it.count % 4 == 0 && ((uintptr_t)grads | (uintptr_t)m | (uintptr_t)v) % 16 == 0 &&
                      ((uintptr_t)master.hi | (uintptr_t)master.lo) % 8 == 0;
    if (wide) {
        for (uint32_t k = 4 * threadIdx.x; k < it.count; k += 4 * blockDim.x)
            adamw_elems<4>(master + k, m + k, v + k, grads + k, clip, lr, beta1, beta2, eps, decay, bc1, bc2);
    } else {
        for (uint32_t k = threadIdx.x; k < it.count; k += blockDim.x)
            adamw_elems<1>(master + k, m + k, v + k, grads + k, clip, lr, beta1, beta2, eps, decay, bc1, bc2);
    }
}

__device__ inline float sumsq4(float acc, float4 a) {
    return fmaf(a.w, a.w, fmaf(a.z, a.z, fmaf(a.y, a.y, fmaf(a.x, a.x, acc))));
}

// Per-block sums of squares over a fixed grid (the same order, so the same sum, every step), then one block adds
// them in order. It reads every gradient once: the body as float4, four loads in flight a thread (one float a
// thread left the memory idle); block 0 also takes the elements before the first 16-byte boundary and after the
// last whole float4 (a ZeRO shard starts anywhere).
static __global__ void sumsq_partial_kernel(float* partial, const float* x, size_t n) {
    const size_t to16 = (16 - (uintptr_t)x % 16) % 16 / sizeof(float), head = n < to16 ? n : to16;
    const float4* v = reinterpret_cast<const float4*>(x + head);
    const size_t nv = (n - head) / 4, tail = head + 4 * nv, stride = (size_t)gridDim.x * blockDim.x;
    float acc = 0.0f;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < nv; i += 4 * stride) {
        float4 a[4];
        #pragma unroll
        for (int k = 0; k < 4; k++) a[k] = v[i + k * stride];
        #pragma unroll
        for (int k = 0; k < 4; k++) acc = sumsq4(acc, a[k]);
    }
    for (; i < nv; i += stride) acc = sumsq4(acc, v[i]);
    if (blockIdx.x == 0) {  // fewer than 4 each
        if (threadIdx.x < head) acc = fmaf(x[threadIdx.x], x[threadIdx.x], acc);
        if (tail + threadIdx.x < n) acc = fmaf(x[tail + threadIdx.x], x[tail + threadIdx.x], acc);
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

static __global__ void sum_in_order_kernel(float* out, const float* partial, int n) {
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) *out = acc;
}

struct AdamW {
    AdamWConfig cfg;
    size_t begin, end;
    size_t n_state = 0;  // elements it updates: the length of m and v
    float *m = nullptr, *v = nullptr, *partial = nullptr, *norm2 = nullptr;
    AdamWItem* items = nullptr;
    int num_items = 0;

    AdamW(const std::vector<ParamTensor>& tensors, size_t begin_, size_t end_, AdamWConfig c)
        : cfg(c), begin(begin_), end(end_) {
        if (end <= begin) THROW("AdamW: empty parameter range [%zu, %zu)", begin, end);
        std::vector<AdamWItem> h = adamw_items(tensors, begin, end);
        num_items = (int)h.size();
        // no items when a ZeRO-1 range holds Muon matrices only: no state, no launch, but
        // the gradient norm is still computed here
        if (num_items > 0) {
            n_state = h.back().state + h.back().count;
            items = cuda_malloc_n<AdamWItem>(h.size(), "AdamW work items");
            cudaCheck(cudaMemcpy(items, h.data(), h.size() * sizeof(AdamWItem), cudaMemcpyHostToDevice));
            m = cuda_malloc_n<float>(n_state, "AdamW m");
            v = cuda_malloc_n<float>(n_state, "AdamW v");
            cudaCheck(cudaMemset(m, 0, n_state * sizeof(float)));
            cudaCheck(cudaMemset(v, 0, n_state * sizeof(float)));
        }
        partial = cuda_malloc_n<float>(NORM_BLOCKS, "grad norm partials");
        norm2 = cuda_malloc_n<float>(1, "grad norm");
    }
    AdamW(const AdamW&) = delete;
    AdamW& operator=(const AdamW&) = delete;
    ~AdamW() { for (void* p : {(void*)m, (void*)v, (void*)partial, (void*)norm2, (void*)items}) cudaFree(p); }

    // squared global norm of grads[0, n), left on the device (no host sync)
    float* grad_norm_squared(const float* grads, size_t n, cudaStream_t s) {
        sumsq_partial_kernel<<<NORM_BLOCKS, 256, 0, s>>>(partial, grads, n);
        cudaCheckLast();
        sum_in_order_kernel<<<1, 1024, 0, s>>>(norm2, partial, NORM_BLOCKS);
        cudaCheckLast();
        return norm2;
    }

    // master: the weights of [begin, end)
    void step(MasterWeights master, const float* grads, const float* grad_norm2, float lr, int t, cudaStream_t s) {
        if (num_items == 0) return;
        const float bc1 = 1.0f - std::pow(cfg.beta1, (float)t), bc2 = 1.0f - std::pow(cfg.beta2, (float)t);
        adamw_kernel<<<num_items, 256, 0, s>>>(master, m, v, grads, items, grad_norm2, cfg.grad_clip, lr,
                                               cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, bc1, bc2);
        cudaCheckLast();
    }

    void get_state(std::vector<float>& hm, std::vector<float>& hv) const {
        hm.resize(n_state); hv.resize(n_state);
        if (n_state == 0) return;
        cudaCheck(cudaMemcpy(hm.data(), m, n_state * sizeof(float), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(hv.data(), v, n_state * sizeof(float), cudaMemcpyDeviceToHost));
    }
    void set_state(const std::vector<float>& hm, const std::vector<float>& hv) {
        if (hm.size() != n_state || hv.size() != n_state)
            THROW("AdamW state has %zu/%zu values, this optimizer holds %zu (the elements of its tensors in "
                  "[%zu, %zu))", hm.size(), hv.size(), n_state, begin, end);
        if (n_state == 0) return;
        cudaCheck(cudaMemcpy(m, hm.data(), n_state * sizeof(float), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(v, hv.data(), n_state * sizeof(float), cudaMemcpyHostToDevice));
    }
};

// ----------------------------------------------------------------------------
// Muon (momentum orthogonalised by Newton-Schulz) for the 2-D matrices of the blocks; the
// rest (embeddings, LM head, norms, biases, conv1d, A_log, D, dt_bias) stays with AdamW,
// with its own learning rate. Per matrix W (rows, cols), row-major at `offset` of the flat
// buffers:
//   g   = grad * clip_scale            (the global-norm clip, computed as AdamW does)
//   buf = momentum * buf + g
//   u   = nesterov ? g + momentum * buf : buf
//   O   = NewtonSchulz5(u)             (bf16 on tensor cores, fp32 accumulation)
//   W   = W * (1 - lr * wd) - lr * 0.2 * sqrt(max(rows, cols)) * O
// The 0.2 sqrt(max(rows, cols)) factor (Moonlight) gives the update the RMS of a typical
// AdamW update (~0.2), so both groups can share weight decay and similar learning rates.
// The momentum of each matrix is contiguous in the order given, so a ZeRO-1 rank can own
// whole matrices: build its Muon from the matrices it owns.

struct MuonConfig { float momentum = 0.95f; bool nesterov = true; int ns_steps = 5; float weight_decay = 0.1f; float grad_clip = 1.0f; };
struct MuonMatrix { size_t offset; int rows, cols; };  // row-major (rows, cols) at this offset of the flat buffers

// quintic Newton-Schulz coefficients (Keller Jordan): p(s) = a s + b s^3 + c s^5 pushes every
// singular value of a matrix with spectral norm <= 1 into about [0.7, 1.2] in 5 steps
constexpr float MUON_NS_A = 3.4445f, MUON_NS_B = -4.7750f, MUON_NS_C = 2.0315f;
constexpr int MUON_NORM_BLOCKS = 256;  // at most this many partial sums per matrix

inline float muon_update_scale(int rows, int cols) { return 0.2f * std::sqrt((float)std::max(rows, cols)); }

__device__ inline float muon_clip_scale(const float* norm2, float grad_clip) {
    if (grad_clip <= 0.0f || norm2 == nullptr) return 1.0f;
    return fminf(1.0f, grad_clip / (sqrtf(*norm2) + 1e-6f));
}

// buf = momentum * buf + g; partial[block] = sum of u^2 over this block's elements
static __global__ void muon_momentum_kernel(float* buf, float* partial, const float* grads, const float* norm2,
                                            float grad_clip, float momentum, int nesterov, size_t n) {
    const float clip = muon_clip_scale(norm2, grad_clip);
    float acc = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = grads[i] * clip;
        const float b = momentum * buf[i] + g;
        buf[i] = b;
        const float u = nesterov ? g + momentum * b : b;
        acc += u * u;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// X = u / (||u||_F + 1e-7) in bf16, u recomputed from the updated buf
static __global__ void muon_normalize_kernel(bf16* X, const float* buf, const float* grads, const float* norm2,
                                             const float* unorm2, float grad_clip, float momentum, int nesterov,
                                             size_t n) {
    const float clip = muon_clip_scale(norm2, grad_clip);
    const float inv = 1.0f / (sqrtf(*unorm2) + 1e-7f);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float b = buf[i];
        const float u = nesterov ? grads[i] * clip + momentum * b : b;
        X[i] = __float2bfloat16(u * inv);
    }
}

// master = master * (1 - lr wd) - lr * scale * O
static __global__ void muon_apply_kernel(MasterWeights master, const bf16* O, float scale, float lr, float wd,
                                         size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float p;
        load_master<1>(&p, master + i);
        p -= lr * wd * p;
        p -= lr * scale * __bfloat162float(O[i]);
        store_master<1>(master + i, &p);
    }
}

// In place on X (row-major rows x cols, bf16): `steps` quintic Newton-Schulz iterations on
// the small side, X <- a X + (b A + c A A) X with A = X X^T (or, for rows > cols, on X^T:
// X <- a X + X (b A + c A A) with A = X^T X, which is the same thing transposed, so no
// explicit transposes). X2 (rows*cols), A and Bm (min(rows,cols)^2) are workspaces; the
// result ends in X (the pointers are swapped back when steps is odd by one last copy).
inline void newton_schulz5(bf16* X, bf16* X2, bf16* A, bf16* Bm, int rows, int cols, int steps, cudaStream_t s) {
    // cuBLAS is column-major: the row-major (rows, cols) data is the column-major V = X^T (cols x rows, ld cols)
    const int m = std::min(rows, cols);
    const size_t xbytes = (size_t)rows * cols * sizeof(bf16), abytes = (size_t)m * m * sizeof(bf16);
    bf16 *cur = X, *nxt = X2;
    for (int it = 0; it < steps; it++) {
        if (rows <= cols) {
            // A = X X^T = V^T V (rows x rows, symmetric)
            gemm(CUBLAS_OP_T, CUBLAS_OP_N, rows, rows, cols, cur, cols, cur, cols, A, CUDA_R_16BF, rows, 0.0f, s);
        } else {
            // A = X^T X = V V^T (cols x cols, symmetric)
            gemm(CUBLAS_OP_N, CUBLAS_OP_T, cols, cols, rows, cur, cols, cur, cols, A, CUDA_R_16BF, cols, 0.0f, s);
        }
        // Bm = b A + c A A
        cudaCheck(cudaMemcpyAsync(Bm, A, abytes, cudaMemcpyDeviceToDevice, s));
        gemm(CUBLAS_OP_N, CUBLAS_OP_N, m, m, m, A, m, A, m, Bm, CUDA_R_16BF, m, MUON_NS_B, s, MUON_NS_C);
        cudaCheck(cudaMemcpyAsync(nxt, cur, xbytes, cudaMemcpyDeviceToDevice, s));
        if (rows <= cols) {
            // X' = a X + Bm X  <=>  V' = a V + V Bm (Bm symmetric)
            gemm(CUBLAS_OP_N, CUBLAS_OP_N, cols, rows, rows, cur, cols, Bm, rows, nxt, CUDA_R_16BF, cols, MUON_NS_A, s);
        } else {
            // X' = a X + X Bm  <=>  V' = a V + Bm V
            gemm(CUBLAS_OP_N, CUBLAS_OP_N, cols, rows, cols, Bm, cols, cur, cols, nxt, CUDA_R_16BF, cols, MUON_NS_A, s);
        }
        std::swap(cur, nxt);
    }
    if (cur != X) cudaCheck(cudaMemcpyAsync(X, cur, xbytes, cudaMemcpyDeviceToDevice, s));
}

struct Muon {
    MuonConfig cfg;
    std::vector<MuonMatrix> mats;
    std::vector<size_t> state_offset;  // where each matrix's momentum starts in `momentum`
    size_t total = 0;                  // momentum floats
    float* momentum = nullptr;
    bf16 *X = nullptr, *X2 = nullptr, *A = nullptr, *Bm = nullptr;  // Newton-Schulz workspace (largest matrix)
    float *partial = nullptr, *unorm2 = nullptr;

    Muon(const std::vector<MuonMatrix>& mats_, MuonConfig c) : cfg(c), mats(mats_) {
        if (mats.empty()) THROW("Muon: no matrices");
        if (cfg.ns_steps < 0) THROW("Muon: ns_steps must be >= 0, got %d", cfg.ns_steps);
        size_t max_x = 0, max_a = 0;
        for (const MuonMatrix& mt : mats) {
            if (mt.rows <= 0 || mt.cols <= 0) THROW("Muon: matrix at offset %zu has shape (%d, %d)", mt.offset, mt.rows, mt.cols);
            state_offset.push_back(total);
            total += (size_t)mt.rows * mt.cols;
            max_x = std::max(max_x, (size_t)mt.rows * mt.cols);
            const size_t m = std::min(mt.rows, mt.cols);
            max_a = std::max(max_a, m * m);
        }
        std::vector<MuonMatrix> sorted = mats;
        std::sort(sorted.begin(), sorted.end(), [](const MuonMatrix& a, const MuonMatrix& b) { return a.offset < b.offset; });
        for (size_t i = 1; i < sorted.size(); i++)
            if (sorted[i - 1].offset + (size_t)sorted[i - 1].rows * sorted[i - 1].cols > sorted[i].offset)
                THROW("Muon: matrices at offsets %zu and %zu overlap", sorted[i - 1].offset, sorted[i].offset);
        momentum = cuda_malloc_n<float>(total, "Muon momentum");
        cudaCheck(cudaMemset(momentum, 0, total * sizeof(float)));
        X = cuda_malloc_n<bf16>(max_x, "Muon Newton-Schulz X");
        X2 = cuda_malloc_n<bf16>(max_x, "Muon Newton-Schulz X2");
        A = cuda_malloc_n<bf16>(max_a, "Muon Newton-Schulz A");
        Bm = cuda_malloc_n<bf16>(max_a, "Muon Newton-Schulz B");
        partial = cuda_malloc_n<float>(MUON_NORM_BLOCKS, "Muon norm partials");
        unorm2 = cuda_malloc_n<float>(1, "Muon norm");
    }
    Muon(const Muon&) = delete;
    Muon& operator=(const Muon&) = delete;
    ~Muon() {
        for (void* p : {(void*)momentum, (void*)X, (void*)X2, (void*)A, (void*)Bm, (void*)partial, (void*)unorm2}) cudaFree(p);
    }

    // grad_norm2: the squared global gradient norm (AdamW::grad_norm_squared), on the device;
    // null (or grad_clip <= 0) for no clipping
    // master: the weights of the range the matrices' offsets count from
    void step(MasterWeights master, const float* grads, const float* grad_norm2, float lr, cudaStream_t s) {
        for (size_t k = 0; k < mats.size(); k++) {
            const MuonMatrix& mt = mats[k];
            const size_t n = (size_t)mt.rows * mt.cols;
            float* buf = momentum + state_offset[k];
            const float* g = grads + mt.offset;
            // fixed grid per shape: the norm's summation order is the same on every run
            const int blocks = (int)std::min<size_t>(MUON_NORM_BLOCKS, (n + 255) / 256);
            muon_momentum_kernel<<<blocks, 256, 0, s>>>(buf, partial, g, grad_norm2, cfg.grad_clip, cfg.momentum,
                                                        cfg.nesterov, n);
            cudaCheckLast();
            sum_in_order_kernel<<<1, 256, 0, s>>>(unorm2, partial, blocks);
            cudaCheckLast();
            const int eblocks = (int)std::min<size_t>(2048, (n + 255) / 256);
            muon_normalize_kernel<<<eblocks, 256, 0, s>>>(X, buf, g, grad_norm2, unorm2, cfg.grad_clip, cfg.momentum,
                                                          cfg.nesterov, n);
            cudaCheckLast();
            newton_schulz5(X, X2, A, Bm, mt.rows, mt.cols, cfg.ns_steps, s);
            muon_apply_kernel<<<eblocks, 256, 0, s>>>(master + mt.offset, X,
                                                      muon_update_scale(mt.rows, mt.cols), lr, cfg.weight_decay, n);
            cudaCheckLast();
        }
    }

    size_t state_floats() const { return total; }
    void get_state(std::vector<float>& hm) const {
        hm.resize(total);
        cudaCheck(cudaMemcpy(hm.data(), momentum, total * sizeof(float), cudaMemcpyDeviceToHost));
    }
    void set_state(const std::vector<float>& hm) {
        if (hm.size() != total) THROW("Muon state has %zu values, this optimizer holds %zu", hm.size(), total);
        cudaCheck(cudaMemcpy(momentum, hm.data(), total * sizeof(float), cudaMemcpyHostToDevice));
    }
};
