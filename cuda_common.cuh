// CUDA helpers shared by every kernel header: error checks, bf16, allocation with
// a clear out-of-memory message.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <tuple>
#include <type_traits>
#include <utility>
#include "common.h"
#include "kernel_sizes.h"  // bf16 (cuda_bf16.h's), COLSUM_CHUNKS, colsum_scratch_floats
#include "params.h"        // master_high, master_low, master_join

inline void cuda_check(cudaError_t err, const char* file, int line) {
    if (err != cudaSuccess) {
        fprintf(stderr, "CUDA error at %s:%d: %s\n", file, line, cudaGetErrorString(err));
        exit(EXIT_FAILURE);
    }
}
#define cudaCheck(err) cuda_check((err), __FILE__, __LINE__)
// after every kernel launch
#define cudaCheckLast() cuda_check(cudaGetLastError(), __FILE__, __LINE__)

// raises a kernel's dynamic shared-memory limit above the default 48 KB, once per kernel, device and
// size (the attribute stays set: launches after the first, and graph replays, skip the driver call)
inline void set_max_smem(const void* kernel, size_t bytes) {
    static std::map<std::pair<const void*, int>, size_t> limit;
    int dev;
    cudaCheck(cudaGetDevice(&dev));
    size_t& cur = limit[{kernel, dev}];
    if (bytes <= cur) return;
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    cur = bytes;
}
template <typename K>
inline void set_max_smem(K* kernel, size_t bytes) { set_max_smem((const void*)kernel, bytes); }

// the most dynamic shared memory a block may ask for after set_max_smem (227 KB on sm_90), per device
inline size_t max_smem_optin() {
    static std::map<int, size_t> known;
    int dev;
    cudaCheck(cudaGetDevice(&dev));
    size_t& n = known[dev];
    if (!n) {
        int v;
        cudaCheck(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
        n = (size_t)v;
    }
    return n;
}

// the device's SMs (cached per device)
inline int sm_count() {
    static std::map<int, int> known;
    int dev;
    cudaCheck(cudaGetDevice(&dev));
    int& n = known[dev];
    if (!n) cudaCheck(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
}

// blocks of `threads` threads and `smem` bytes of dynamic shared memory that an SM holds at once (cached per
// kernel, size and device)
inline int occupancy(const void* kernel, int threads, size_t smem) {
    static std::map<std::tuple<const void*, int, size_t, int>, int> known;
    int dev;
    cudaCheck(cudaGetDevice(&dev));
    int& n = known[{kernel, threads, smem, dev}];
    if (!n) {
        set_max_smem(kernel, smem);
        cudaCheck(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem));
        if (n < 1) THROW("a kernel of %d threads and %zu bytes of shared memory does not fit on an SM", threads, smem);
    }
    return n;
}
template <typename K>
inline int occupancy(K* kernel, int threads, size_t smem) { return occupancy((const void*)kernel, threads, smem); }

// cudaMalloc that ends the program with the size asked for and what was free.
// bytes handed out by cuda_malloc so far: the engine allocates once at set-up and frees at
// exit, so this is its peak (the figure torch.cuda.max_memory_allocated gives; no CUDA
// context, no cuBLAS workspace)
inline size_t& cuda_allocated_bytes() { static size_t n = 0; return n; }

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
    cuda_allocated_bytes() += bytes;
    return ptr;
}

template <typename T>
inline T* cuda_malloc_n(size_t n, const char* what) { return (T*)cuda_malloc(n * sizeof(T), what); }

// ----------------------------------------------------------------------------
// Vector access: VEC consecutive values moved by one load or store (16 bytes at most), the
// widest the pointers and row strides allow. Memory-bound kernels take VEC as a template
// parameter and their launchers pick it with vec_width.

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

template <int VEC>
__device__ inline void load_vec(float* out, const bf16* p) {
    const Pack<bf16, VEC> pk = *reinterpret_cast<const Pack<bf16, VEC>*>(p);
    #pragma unroll
    for (int e = 0; e < VEC; e++) out[e] = __bfloat162float(pk.v[e]);
}
template <int VEC>
__device__ inline void load_vec(float* out, const float* p) {
    const Pack<float, VEC> pk = *reinterpret_cast<const Pack<float, VEC>*>(p);
    #pragma unroll
    for (int e = 0; e < VEC; e++) out[e] = pk.v[e];
}
template <int VEC>
__device__ inline void store_vec(bf16* p, const float* v) {
    Pack<bf16, VEC> pk;
    #pragma unroll
    for (int e = 0; e < VEC; e++) pk.v[e] = __float2bfloat16(v[e]);
    *reinterpret_cast<Pack<bf16, VEC>*>(p) = pk;
}
template <int VEC>
__device__ inline void store_vec(float* p, const float* v) {
    Pack<float, VEC> pk;
    #pragma unroll
    for (int e = 0; e < VEC; e++) pk.v[e] = v[e];
    *reinterpret_cast<Pack<float, VEC>*>(p) = pk;
}

// The fp32 master weights of a range of the parameter buffer: hi, the bf16 compute copy of the
// range (the weights' high halves), and lo, their low halves (params.h: master_join)
struct MasterWeights {
    bf16* hi;
    int16_t* lo;
    HOST_DEVICE MasterWeights operator+(size_t k) const { return {hi + k, lo + k}; }
};

// fp32 weights host[0, n) to the device, split: the high halves of all n to hi, the low halves of
// host[lo_begin, lo_begin + lo_n) to lo (a rank keeps the low halves of its own range only)
inline void upload_master(bf16* hi, int16_t* lo, const float* host, size_t n, size_t lo_begin, size_t lo_n) {
    std::vector<uint16_t> h(n);
    std::vector<int16_t> l(n);
    master_split(host, n, h.data(), l.data());
    cudaCheck(cudaMemcpy(hi, h.data(), n * sizeof(bf16), cudaMemcpyHostToDevice));
    if (lo_n) cudaCheck(cudaMemcpy(lo, l.data() + lo_begin, lo_n * sizeof(int16_t), cudaMemcpyHostToDevice));
}
// the n fp32 weights that m holds, joined on the host
inline std::vector<float> download_master(MasterWeights m, size_t n) {
    std::vector<uint16_t> h(n);
    std::vector<int16_t> l(n);
    cudaCheck(cudaMemcpy(h.data(), m.hi, n * sizeof(bf16), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(l.data(), m.lo, n * sizeof(int16_t), cudaMemcpyDeviceToHost));
    std::vector<float> w(n);
    master_unsplit(h.data(), l.data(), n, w.data());
    return w;
}

template <int VEC>
__device__ inline void load_master(float* w, MasterWeights m) {
    const Pack<bf16, VEC> hi = *reinterpret_cast<const Pack<bf16, VEC>*>(m.hi);
    const Pack<int16_t, VEC> lo = *reinterpret_cast<const Pack<int16_t, VEC>*>(m.lo);
    #pragma unroll
    for (int e = 0; e < VEC; e++) w[e] = __uint_as_float(master_join(__bfloat16_as_ushort(hi.v[e]), lo.v[e]));
}
template <int VEC>
__device__ inline void store_master(MasterWeights m, const float* w) {
    Pack<bf16, VEC> hi;
    Pack<int16_t, VEC> lo;
    #pragma unroll
    for (int e = 0; e < VEC; e++) {
        const uint32_t bits = __float_as_uint(w[e]);
        hi.v[e] = __ushort_as_bfloat16(master_high(bits));
        lo.v[e] = master_low(bits);
    }
    *reinterpret_cast<Pack<bf16, VEC>*>(m.hi) = hi;
    *reinterpret_cast<Pack<int16_t, VEC>*>(m.lo) = lo;
}

// the widest of max_vec, max_vec/2, ..., 1 that every pointer is aligned to (in elements of
// elem_bytes) and every count (row strides, channel counts, column offsets) divides by
inline int vec_width(int max_vec, int elem_bytes, std::initializer_list<const void*> ptrs,
                     std::initializer_list<long> counts) {
    int v = max_vec;
    for (; v > 1; v /= 2) {
        bool ok = true;
        for (const void* p : ptrs) ok = ok && (reinterpret_cast<uintptr_t>(p) % ((uintptr_t)v * elem_bytes) == 0);
        for (long n : counts) ok = ok && n % v == 0;
        if (ok) break;
    }
    return v;
}

// launch(std::integral_constant<int, V>()) with V = vec, a power of two <= MAX: a launcher's
// one call site for every vector width its kernel is built for
template <int MAX, typename F>
inline void vec_dispatch(int vec, F&& launch) {
    if constexpr (MAX > 1) {
        if (vec < MAX) return vec_dispatch<MAX / 2>(vec, launch);
    }
    launch(std::integral_constant<int, MAX>());
}

// ----------------------------------------------------------------------------
// Deterministic column sums: out[c, v] (+)= sum over rows r of term(r, c, v), for the
// weight gradients of per-channel parameters (norm weights, conv weights and bias).
// Rows are cut into chunks (a count fixed by the shape; colsum_chunk_rows in kernel_sizes.h); the
// backward kernels sum their chunk's rows for their channels and write one partial row per chunk,
// partial[(chunk * C + c) * NV + v]; colsum_finalize adds the chunk partials in chunk order: no
// atomics, so the result is the same bit for bit on every run.

// store(c, v, sum) receives each column's total. A block takes COLSUM_COLS columns (a 32-byte sector of a
// partial row) and blockDim.y lanes of chunks: lane y sums chunks y, y + lanes, ... in order, then the lanes'
// sums meet in a fixed tree: the same bits every run. Many lanes a column keep many loads in flight: a norm
// backward leaves up to 1024 partial rows, which one thread a column would read one after another.
constexpr int COLSUM_COLS = 8;

template <int NV, typename Store>
__global__ void __launch_bounds__(1024) colsum_finalize_kernel(const float* partial, Store store, int C, int chunks) {
    extern __shared__ float red[];  // [NV][lanes][COLSUM_COLS]
    const int lanes = blockDim.y, x = threadIdx.x, y = threadIdx.y;
    const int c = blockIdx.x * COLSUM_COLS + x;
    float sum[NV] = {};
    if (c < C) {
        #pragma unroll 4
        for (int k = y; k < chunks; k += lanes)
            #pragma unroll
            for (int v = 0; v < NV; v++) sum[v] += partial[((size_t)k * C + c) * NV + v];
    }
    #pragma unroll
    for (int v = 0; v < NV; v++) red[(v * lanes + y) * COLSUM_COLS + x] = sum[v];
    __syncthreads();
    for (int half = lanes / 2; half > 0; half /= 2) {
        if (y < half)
            #pragma unroll
            for (int v = 0; v < NV; v++)
                red[(v * lanes + y) * COLSUM_COLS + x] += red[(v * lanes + y + half) * COLSUM_COLS + x];
        __syncthreads();
    }
    if (c < C)
        for (int v = y; v < NV; v += lanes) store(c, v, red[v * lanes * COLSUM_COLS + x]);
}

// chunks: how many partial rows (COLSUM_CHUNKS, or the count of a kernel's own blocks); lanes, a power of two
// from 4 to 128, give each thread about 8 chunks
template <int NV, typename Store>
inline void colsum_finalize(const float* partial, Store store, int C, cudaStream_t s, int chunks = COLSUM_CHUNKS) {
    int lanes = 4;
    while (lanes < 128 && lanes * 8 < chunks) lanes *= 2;
    colsum_finalize_kernel<NV><<<ceil_div(C, COLSUM_COLS), dim3(COLSUM_COLS, lanes),
                                 sizeof(float) * NV * lanes * COLSUM_COLS, s>>>(partial, store, C, chunks);
    cudaCheckLast();
}

// reductions by an associative op, the same bits on every run; a value type other than float brings its own
// shfl_xor (found by argument-dependent lookup), e.g. a struct that shuffles each field
struct AddOp { __device__ float operator()(float a, float b) const { return a + b; } };
__device__ inline float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffff, v, lane_mask); }

// warp-wide: every lane gets it
template <typename T, typename Op>
__device__ inline T warp_reduce(T v, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
    return v;
}
__device__ inline float warp_sum(float v) { return warp_reduce(v, AddOp{}); }

// block-wide (blockDim.x a multiple of 32, at most 1024), the warps' results in warp order; every
// thread gets it. It synchronises before reusing its slots, so calls may follow each other
template <typename T, typename Op>
__device__ inline T block_reduce(T v, Op op) {
    __shared__ T red[32];
    v = warp_reduce(v, op);
    __syncthreads();
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    T t = red[0];
    for (int w = 1; w < (int)blockDim.x / 32; w++) t = op(t, red[w]);
    return t;
}
__device__ inline float block_sum(float v) { return block_reduce(v, AddOp{}); }

// blocks of 256 threads for an elementwise pass over n items with a grid-stride loop
inline int elementwise_blocks(size_t n) { return (int)std::min<size_t>((n + 255) / 256, 132 * 16); }

// ----------------------------------------------------------------------------
// Zeroing many ranges of a float buffer in one launch (a model's gradients that are added to: a
// few small ones per layer, in one launch instead of one memset each). The ranges go in the
// kernel's parameters (no device allocation); laid end to end they form one index space, of
// which each block clears ZERO_SPAN consecutive elements.
struct ZeroRanges {
    static constexpr int MAX = 120;  // ranges a launch (1.9 KB of parameters)
    size_t at[MAX];                  // range r starts at buf[at[r]]
    size_t end[MAX];                 // and is elements [end[r - 1], end[r]) of the index space (end[-1] = 0)
    int n = 0;
};
constexpr int ZERO_SPAN = 256 * 16;

static __global__ void zero_ranges_kernel(float* buf, const ZeroRanges r) {
    const size_t lo = (size_t)blockIdx.x * ZERO_SPAN, total = r.end[r.n - 1];
    const size_t hi = lo + ZERO_SPAN < total ? lo + ZERO_SPAN : total;
    int k = 0, top = r.n - 1;  // the range holding lo: the first with end > lo
    while (k < top) {
        const int mid = (k + top) / 2;
        if (r.end[mid] > lo) top = mid;
        else k = mid + 1;
    }
    for (size_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        while (r.end[k] <= i) k++;
        buf[r.at[k] + i - (k > 0 ? r.end[k - 1] : 0)] = 0.0f;
    }
}

// buf[b, e) = 0 for each {b, e} of `ranges`
inline void zero_ranges(float* buf, const std::vector<std::pair<size_t, size_t>>& ranges, cudaStream_t s) {
    for (size_t first = 0; first < ranges.size(); first += ZeroRanges::MAX) {
        ZeroRanges r;
        size_t total = 0;
        for (size_t i = first; i < ranges.size() && r.n < ZeroRanges::MAX; i++, r.n++) {
            r.at[r.n] = ranges[i].first;
            r.end[r.n] = total += ranges[i].second - ranges[i].first;
        }
        if (total == 0) continue;
        zero_ranges_kernel<<<(unsigned)((total + ZERO_SPAN - 1) / ZERO_SPAN), 256, 0, s>>>(buf, r);
        cudaCheckLast();
    }
}

// ----------------------------------------------------------------------------
// device math shared by the kernels

constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;  // log2(e), ln(2)

// 2^x by the hardware approximation (ex2.approx, flush to zero): the exponentials of the scans'
// decays and of attention's softmax
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// softplus and sigmoid of x through e = exp(-|x|), the one exponential they share, in full precision:
// dt = softplus(dt_raw + dt_bias) enters every decay, and the hardware lg2/rcp/ex2 approximations moved
// Mamba-2's A_log gradient past its test tolerance (H200, 2026-12-03)
__device__ __forceinline__ float exp_neg_abs(float x) { return expf(-fabsf(x)); }
__device__ __forceinline__ float softplus_e(float x, float e) { return fmaxf(x, 0.f) + log1pf(e); }
__device__ __forceinline__ float sigmoid_e(float x, float e) {
    const float r = 1.f / (1.f + e);
    return x >= 0.f ? r : e * r;
}
__device__ __forceinline__ float softplus(float x) { return softplus_e(x, exp_neg_abs(x)); }
__device__ __forceinline__ float sigmoid(float x) { return sigmoid_e(x, exp_neg_abs(x)); }

// SiLU and its derivative on the hardware's ex2 and rcp approximations (a few ulp of fp32, far below the bf16
// they are stored in): with IEEE divisions the gated norm and conv1d passes were bound by instructions, not
// memory. 1 + e^-x = inf (x < -88) gives rcp = 0, the right limit.
__device__ __forceinline__ float sigmoid_fast(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }
__device__ __forceinline__ float silu(float x) { return x * sigmoid_fast(x); }
__device__ __forceinline__ float silu_grad_s(float x, float s) { return s * (1.0f + x * (1.0f - s)); }  // s = sigmoid(x)
__device__ __forceinline__ float silu_grad(float x) { return silu_grad_s(x, sigmoid_fast(x)); }  // d silu / dx
