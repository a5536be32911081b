// Optimizer: AdamW on the fp32 master weights (writing the bf16 compute copy), the global
// gradient norm with clipping, and the learning-rate schedules.
//
// The flat parameter buffer is cut into work items of at most ADAMW_ITEM elements, each
// inside one tensor, so a single launch knows every element's weight-decay flag. An AdamW
// owns the elements [begin, end) of the buffer (all of it on one GPU; a rank's shard under
// ZeRO-1).
#pragma once
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>
#include "cuda_common.cuh"

struct ParamTensor { size_t offset, count; bool decay; };

struct AdamWConfig {
    float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f, grad_clip = 1.0f;
};

constexpr size_t ADAMW_ITEM = 4096;
constexpr int NORM_BLOCKS = 1024;

struct AdamWItem { size_t start; uint32_t count; uint32_t decay; };

// clip_scale = min(1, clip / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_
static __global__ void adamw_kernel(float* master, bf16* params, float* m, float* v, const float* grads,
                             const AdamWItem* items, size_t begin, const float* norm2, float grad_clip, float lr,
                             float beta1, float beta2, float eps, float wd, float bc1, float bc2) {
    const AdamWItem it = items[blockIdx.x];
    const float norm = sqrtf(*norm2);
    const float clip = grad_clip > 0.0f ? fminf(1.0f, grad_clip / (norm + 1e-6f)) : 1.0f;
    const float decay = it.decay ? wd : 0.0f;
    for (uint32_t k = threadIdx.x; k < it.count; k += blockDim.x) {
        const size_t i = it.start + k, j = i - begin;  // j: index into this optimizer's state
        const float g = grads[i] * clip;
        const float mi = beta1 * m[j] + (1.0f - beta1) * g;
        const float vi = beta2 * v[j] + (1.0f - beta2) * g * g;
        m[j] = mi;
        v[j] = vi;
        float p = master[i];
        p -= lr * decay * p;
        p -= lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
        master[i] = p;
        params[i] = __float2bfloat16(p);
    }
}

// per-block sums of squares over a fixed grid, then one block adds them in order
static __global__ void sumsq_partial_kernel(float* partial, const float* x, size_t n) {
    float acc = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc += x[i] * x[i];
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
    float *m = nullptr, *v = nullptr, *partial = nullptr, *norm2 = nullptr;
    AdamWItem* items = nullptr;
    int num_items = 0;

    AdamW(const std::vector<ParamTensor>& tensors, size_t begin_, size_t end_, AdamWConfig c)
        : cfg(c), begin(begin_), end(end_) {
        if (end <= begin) THROW("AdamW: empty parameter range [%zu, %zu)", begin, end);
        std::vector<AdamWItem> h;
        for (const ParamTensor& t : tensors) {
            size_t a = std::max(t.offset, begin), b = std::min(t.offset + t.count, end);
            for (size_t s = a; s < b; s += ADAMW_ITEM)
                h.push_back({s, (uint32_t)std::min(ADAMW_ITEM, b - s), (uint32_t)t.decay});
        }
        num_items = (int)h.size();
        items = cuda_malloc_n<AdamWItem>(h.size(), "AdamW work items");
        cudaCheck(cudaMemcpy(items, h.data(), h.size() * sizeof(AdamWItem), cudaMemcpyHostToDevice));
        m = cuda_malloc_n<float>(end - begin, "AdamW m");
        v = cuda_malloc_n<float>(end - begin, "AdamW v");
        cudaCheck(cudaMemset(m, 0, (end - begin) * sizeof(float)));
        cudaCheck(cudaMemset(v, 0, (end - begin) * sizeof(float)));
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

    void step(float* master, bf16* params, const float* grads, const float* grad_norm2, float lr, int t, cudaStream_t s) {
        const float bc1 = 1.0f - std::pow(cfg.beta1, (float)t), bc2 = 1.0f - std::pow(cfg.beta2, (float)t);
        adamw_kernel<<<num_items, 256, 0, s>>>(master, params, m, v, grads, items, begin, grad_norm2, cfg.grad_clip, lr,
                                               cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, bc1, bc2);
        cudaCheckLast();
    }

    void get_state(std::vector<float>& hm, std::vector<float>& hv) const {
        hm.resize(end - begin); hv.resize(end - begin);
        cudaCheck(cudaMemcpy(hm.data(), m, hm.size() * sizeof(float), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(hv.data(), v, hv.size() * sizeof(float), cudaMemcpyDeviceToHost));
    }
    void set_state(const std::vector<float>& hm, const std::vector<float>& hv) {
        if (hm.size() != end - begin || hv.size() != end - begin)
            THROW("AdamW state has %zu/%zu values, this optimizer holds %zu", hm.size(), hv.size(), end - begin);
        cudaCheck(cudaMemcpy(m, hm.data(), hm.size() * sizeof(float), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(v, hv.data(), hv.size() * sizeof(float), cudaMemcpyHostToDevice));
    }
};

// ----------------------------------------------------------------------------
// Learning-rate schedules, in one unit the caller picks (optimizer steps or tokens).
//   constant: linear warmup from 0, then peak
//   cosine:   linear warmup, cosine from peak to min_lr at total, min_lr after
//   wsd:      linear warmup, peak until decay_start, linear to min_lr at total
struct LRSchedule {
    std::string kind;
    double peak = 0, min_lr = 0;
    long warmup = 0, total = 0, decay_start = 0;

    static LRSchedule make(const std::string& kind, double peak, double min_lr, long warmup, long total) {
        if (peak < 0 || min_lr < 0) THROW("learning rates must be >= 0 (peak %g, min %g)", peak, min_lr);
        if (warmup < 0) THROW("warmup must be >= 0, got %ld", warmup);
        if (kind != "constant" && warmup > total) THROW("warmup %ld is longer than the schedule's total %ld", warmup, total);
        LRSchedule s;
        s.kind = kind; s.peak = peak; s.min_lr = min_lr; s.warmup = warmup; s.total = total;
        return s;
    }
    static LRSchedule constant(double peak, long warmup) { return make("constant", peak, peak, warmup, warmup); }
    static LRSchedule cosine(double peak, double min_lr, long warmup, long total) {
        return make("cosine", peak, min_lr, warmup, total);
    }
    // decay start as a fraction of total (stable_fraction >= 0) or as a position (decay_start)
    static LRSchedule wsd(double peak, double min_lr, long warmup, long total, double stable_fraction, long decay_start) {
        LRSchedule s = make("wsd", peak, min_lr, warmup, total);
        if (stable_fraction >= 0) {
            if (stable_fraction > 1) THROW("WSD stable fraction must be in [0, 1], got %g", stable_fraction);
            decay_start = (long)std::llround(stable_fraction * total);
        }
        if (decay_start < warmup || decay_start > total)
            THROW("WSD decay start %ld must lie between the warmup end %ld and the total %ld", decay_start, warmup, total);
        s.decay_start = decay_start;
        return s;
    }

    double at(long t) const {
        if (t < warmup) return peak * (double)t / warmup;
        if (kind == "constant") return peak;
        if (t >= total) return min_lr;
        if (kind == "cosine") {
            double p = (double)(t - warmup) / std::max(1L, total - warmup);
            return min_lr + 0.5 * (peak - min_lr) * (1.0 + std::cos(M_PI * p));
        }
        if (t < decay_start) return peak;  // wsd
        return peak + (min_lr - peak) * (double)(t - decay_start) / std::max(1L, total - decay_start);
    }

    std::string describe() const {
        if (kind == "constant") return strformat("constant %g after %ld warmup", peak, warmup);
        if (kind == "cosine") return strformat("cosine %g -> %g over %ld, warmup %ld", peak, min_lr, total, warmup);
        return strformat("wsd %g, warmup %ld, stable to %ld, linear to %g at %ld", peak, warmup, decay_start, min_lr, total);
    }
};
