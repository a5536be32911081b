// Benchmark of the models' matmuls (matmul.cuh, cuBLAS) at the shapes of a training step: per model at its
// bench batch, each distinct matmul of a block (in_proj and out_proj: forward, input gradient, weight gradient)
// and of the LM head (one chunk of LOGIT_CHUNK rows), timed as the engine calls it, in TFLOP/s. The weight
// gradients (fp32, added into the gradient buffer: beta 1) are also timed writing instead (beta 0), and every
// matmul against the fastest of cuBLASLt's heuristic candidates for the same call (the engine's cublasGemmEx
// leaves the choice to the library): what choosing the algorithm per shape would give. Each candidate's output
// is first compared with the engine's on a sample of elements (random operands).
// usage: dev/bench_matmul [--model NAME [-B N] [-T N]] [--iters N]   (default: the four models of the step table)
#include <algorithm>
#include <random>
#include <string>
#include <vector>
#include <cublasLt.h>
#include "flags.h"
#include "mamba.cuh"
#include "dev/timing.h"

static int kIters = 20;

// one cuBLAS call in matmul.cuh's gemm() form (column-major C(m x n) = op(A) op(B) + beta C)
struct Gemm {
    cublasOperation_t ta, tb;
    int m, n, k;
    const bf16* A; int lda;
    const bf16* B; int ldb;
    void* C; cudaDataType ctype; int ldc;
    float beta;
    double flops() const { return 2.0 * m * n * k; }
    void run() const { gemm(ta, tb, m, n, k, A, lda, B, ldb, C, ctype, ldc, beta, 0); }
};

static cublasLtHandle_t lt_handle() {
    static cublasLtHandle_t h = [] { cublasLtHandle_t x; cublasCheck(cublasLtCreate(&x)); return x; }();
    return h;
}

// SAMPLE elements of g's output spread over it, as floats: two ways of computing it are compared on them
constexpr int SAMPLE = 4096;
__device__ inline float as_float(bf16 v) { return __bfloat162float(v); }
__device__ inline float as_float(float v) { return v; }
template <typename T>
__global__ void sample_kernel(float* out, const T* c, int m, int n, int ldc) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s < SAMPLE) out[s] = as_float(c[(size_t)s * 7919 % n * ldc + (size_t)s * 104729 % m]);
}
static std::vector<float> sample_output(const Gemm& g) {
    static float* d = cuda_malloc_n<float>(SAMPLE, "output sample");
    if (g.ctype == CUDA_R_32F) sample_kernel<<<SAMPLE / 256, 256>>>(d, (const float*)g.C, g.m, g.n, g.ldc);
    else sample_kernel<<<SAMPLE / 256, 256>>>(d, (const bf16*)g.C, g.m, g.n, g.ldc);
    cudaCheckLast();
    std::vector<float> h(SAMPLE);
    cudaCheck(cudaMemcpy(h.data(), d, SAMPLE * sizeof(float), cudaMemcpyDeviceToHost));
    return h;
}

// the fastest of cuBLASLt's heuristic candidates for g (ms), and how many there were; -1 if none ran. Each
// candidate first computes g with beta 0, which must match the engine's call on the sample (else it is not timed)
static double lt_best(const Gemm& g, int* candidates) {
    constexpr int WANT = 16;
    constexpr size_t WS = 64 << 20;
    static void* ws = cuda_malloc(WS, "cuBLASLt workspace");
    cublasLtMatmulDesc_t op;
    cublasCheck(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &g.ta, sizeof(g.ta)));
    cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &g.tb, sizeof(g.tb)));
    // stored shapes (before op): A is m x k or k x m, B k x n or n x k
    cublasLtMatrixLayout_t la, lb, lc;
    const bool at = g.ta != CUBLAS_OP_N, bt = g.tb != CUBLAS_OP_N;
    cublasCheck(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, at ? g.k : g.m, at ? g.m : g.k, g.lda));
    cublasCheck(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, bt ? g.n : g.k, bt ? g.k : g.n, g.ldb));
    cublasCheck(cublasLtMatrixLayoutCreate(&lc, g.ctype, g.m, g.n, g.ldc));
    cublasLtMatmulPreference_t pref;
    cublasCheck(cublasLtMatmulPreferenceCreate(&pref));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &WS, sizeof(WS)));
    cublasLtMatmulHeuristicResult_t res[WANT];
    int got = 0;
    cublasCheck(cublasLtMatmulAlgoGetHeuristic(lt_handle(), op, la, lb, lc, lc, pref, WANT, res, &got));
    const float alpha = 1.f, zero = 0.f;
    Gemm written = g;
    written.beta = 0.f;
    written.run();
    const std::vector<float> ref = sample_output(written);
    float scale = 0;
    for (float v : ref) scale = std::max(scale, std::fabs(v));
    if (!(scale > 0)) THROW("bench_matmul: the engine's output sample is all zero or not finite (m %d n %d k %d)", g.m,
                            g.n, g.k);
    double best = -1;
    for (int i = 0; i < got; i++) {
        auto call = [&](const float* beta) {
            cublasCheck(cublasLtMatmul(lt_handle(), op, &alpha, g.A, la, g.B, lb, beta, g.C, lc, g.C, lc,
                                       &res[i].algo, ws, WS, 0));
        };
        call(&zero);
        const std::vector<float> got_sample = sample_output(g);
        float err = 0;
        for (int j = 0; j < SAMPLE; j++) err = std::max(err, std::fabs(got_sample[j] - ref[j]));
        if (!(err <= 1e-2f * scale)) {  // bf16 outputs differ by a rounding step at most
            printf("  candidate %d FAIL: max difference %.3g against the engine's output (largest %.3g)\n", i, err, scale);
            continue;
        }
        const double ms = time_ms([&] { call(&g.beta); }, 2, std::max(3, kIters / 4));
        if (best < 0 || ms < best) best = ms;
    }
    *candidates = got;
    cublasCheck(cublasLtMatmulPreferenceDestroy(pref));
    for (auto l : {la, lb, lc}) cublasCheck(cublasLtMatrixLayoutDestroy(l));
    cublasCheck(cublasLtMatmulDescDestroy(op));
    return best;
}

static void report(const std::string& what, const Gemm& g) {
    const double ms = time_ms([&] { g.run(); }, 3, kIters);
    int cand = 0;
    const double best = lt_best(g, &cand);
    if (best < 0) {
        printf("  %-30s m %6d n %6d k %6d %8.3f ms %5.0f TFLOP/s | none of %d cuBLASLt candidates ran\n", what.c_str(),
               g.m, g.n, g.k, ms, g.flops() / ms / 1e9, cand);
        return;
    }
    printf("  %-30s m %6d n %6d k %6d %8.3f ms %5.0f TFLOP/s | best of %2d cuBLASLt candidates %8.3f ms %5.0f (%.2fx)\n",
           what.c_str(), g.m, g.n, g.k, ms, g.flops() / ms / 1e9, cand, best, g.flops() / best / 1e9, ms / best);
}

// the matmuls of one step of `c` at B x T, each distinct block shape once
static void bench_model(const ModelConfig& c, int B, int T) {
    const ParamLayout layout(c);
    const int BT = B * T, d = c.d_model, Vp = c.padded_vocab(), rows = std::min(BT, LOGIT_CHUNK);
    printf("%s B=%d T=%d (%d layers, d_model %d, vocab %d)\n", c.name.c_str(), B, T, c.n_layer, d, Vp);
    std::vector<std::pair<int, int>> seen;
    size_t wmax = (size_t)Vp * d, amax = (size_t)rows * Vp;
    for (int l = 0; l < c.n_layer; l++) {
        const BlockBase& b = layout.block(l);
        wmax = std::max(wmax, (size_t)std::max(b.in_width, b.out_width) * d);
        amax = std::max(amax, (size_t)BT * std::max({b.in_stride, b.out_width, d}));
    }
    // operands: random bf16 (the values do not change the time); outputs fp32-sized to hold either type
    std::vector<bf16> host(std::max(wmax, amax));
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> uniform(-0.5f, 0.5f);
    for (auto& v : host) v = __float2bfloat16(uniform(rng));
    auto upload = [&](size_t n) {
        bf16* p = cuda_malloc_n<bf16>(n, "bench operand");
        cudaCheck(cudaMemcpy(p, host.data(), n * sizeof(bf16), cudaMemcpyHostToDevice));
        return p;
    };
    bf16 *W = upload(wmax), *X = upload(amax), *Y = upload(amax);
    float* out = cuda_malloc_n<float>(std::max(wmax, amax), "bench output");
    cudaCheck(cudaMemset(out, 0, std::max(wmax, amax) * sizeof(float)));
    // ld: the row stride of out and dout (the block's in_stride for in_proj)
    auto trio = [&](const std::string& name, int M, int N, int K, bool residual, int ld) {
        // forward out(M,N) = inp(M,K) W(N,K)^T (bf16, or the fp32 residual stream added to)
        report(name + " fwd", {CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, W, K, X, K, out, residual ? CUDA_R_32F : CUDA_R_16BF,
                               ld, residual ? 1.f : 0.f});
        // input gradient dinp(M,K) = dout(M,N) W(N,K)
        report(name + " dgrad", {CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, W, K, Y, ld, out, CUDA_R_16BF, K, 0.f});
        // weight gradient dW(N,K) += dout^T inp, then written (beta 0)
        const Gemm wg{CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, X, K, Y, ld, out, CUDA_R_32F, K, 1.f};
        report(name + " wgrad (+=)", wg);
        Gemm w0 = wg;
        w0.beta = 0.f;
        report(name + " wgrad (=)", w0);
    };
    for (int l = 0; l < c.n_layer; l++) {
        const BlockBase& b = layout.block(l);
        if (std::find(seen.begin(), seen.end(), std::make_pair(b.in_width, b.out_width)) != seen.end()) continue;
        seen.push_back({b.in_width, b.out_width});
        trio(std::string(b.in_name), BT, b.in_width, d, false, b.in_stride);
        trio("out_proj/" + std::string(1, c.pattern[l]), BT, d, b.out_width, true, d);
    }
    trio("lm_head", rows, Vp, d, false, Vp);
    for (void* p : {(void*)W, (void*)X, (void*)Y, (void*)out}) cudaCheck(cudaFree(p));
}

int main(int argc, char** argv) {
    struct Run { std::string model; int B, T; };
    std::vector<Run> runs = {{"nvidia-transformer-8b", 2, 4096}, {"hybrid-1.3b", 4, 2048},
                             {"mamba2-370m", 8, 2048}, {"mamba2-2.7b", 4, 2048}};
    Run one{"", 1, 2048};
    try {
        Flags f("usage: bench_matmul [flags]   (default: the four models of the step table)");
        f.add({"--model"}, &one.model, "NAME", "one model only, at -B and -T");
        f.add({"-B"}, &one.B, "N", "its micro-batch sequences", Range::at_least(1));
        f.add({"-T"}, &one.T, "N", "its sequence length", Range::at_least(1));
        f.add({"--iters"}, &kIters, "N", "timed repetitions of each matmul", Range::at_least(1));
        if (!f.parse(argc, argv).empty()) THROW("bench_matmul takes no positional arguments (see --help)");
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    if (!one.model.empty()) runs = {one};
    try {
        matmul_init();
        for (const Run& r : runs) {
            ModelConfig c = model_preset(r.model, false);
            if (r.model == "nvidia-transformer-8b") {  // the step table's 8 x "*+" (the layers repeat)
                c.pattern = "*+";
                c.n_layer = 2;
            }
            c.finalize();
            bench_model(c, r.B, r.T);
        }
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
