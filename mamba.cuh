// The model: configuration, parameter layout, activations, forward and backward.
//
// A model is a string of layer symbols (SPEC.md, Hybrids); each symbol is a pre-norm
// residual block h = h + Block(RMSNorm(h)). This file reads top to bottom:
//   1. ModelConfig: sizes, presets, JSON, validation
//   2. ParamLayout: every tensor's place in the one flat parameter buffer, and its init
//   3. Activations: what the forward keeps for the backward, sized in one place
//   4. Model: forward (to the loss) and backward (to every parameter gradient)
#pragma once
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "cuda_common.cuh"
#include "matmul.cuh"
#include "embedding.cuh"
#include "norm.cuh"
#include "conv1d.cuh"
#include "ssd.cuh"
#include "loss.cuh"

// ----------------------------------------------------------------------------
// 1. Configuration

struct ModelConfig {
    std::string name = "custom";
    int vocab_size = 50277;   // real vocabulary; the matmuls use padded_vocab()
    int d_model = 768;
    int n_layer = 24;
    std::string pattern;      // one symbol per layer; "M" * n_layer when empty
    std::string ssm = "mamba2";
    int d_state = 128;        // N
    int headdim = 64;         // P
    int ngroups = 1;          // G: groups of B/C, and of the gated norm
    int expand = 2;
    int d_conv = 4;
    int chunk_size = 256;
    bool tie_embeddings = false;
    float norm_eps = 1e-5f;

    int padded_vocab() const { return (vocab_size + 127) / 128 * 128; }
    int d_inner() const { return expand * d_model; }
    int nheads() const { return d_inner() / headdim; }
    int conv_dim() const { return d_inner() + 2 * ngroups * d_state; }
    int d_in_proj() const { return 2 * d_inner() + 2 * ngroups * d_state + nheads(); }

    // fills the pattern and checks that every size divides; throws naming the value
    void finalize() {
        if (pattern.empty()) pattern = std::string(n_layer, 'M');
        if ((int)pattern.size() != n_layer)
            THROW("pattern '%s' has %d layers but n_layer is %d", pattern.c_str(), (int)pattern.size(), n_layer);
        for (char c : pattern)
            if (c != 'M') THROW("layer symbol '%c' in pattern '%s' is not supported (only 'M')", c, pattern.c_str());
        if (ssm != "mamba2") THROW("ssm '%s' is not supported (only 'mamba2')", ssm.c_str());
        if (vocab_size <= 0 || d_model <= 0 || n_layer <= 0 || d_state <= 0 || headdim <= 0 || ngroups <= 0 ||
            expand <= 0 || d_conv <= 0 || chunk_size <= 0)
            THROW("model sizes must be positive (vocab %d, d_model %d, n_layer %d, d_state %d, headdim %d, "
                  "ngroups %d, expand %d, d_conv %d, chunk %d)", vocab_size, d_model, n_layer, d_state, headdim,
                  ngroups, expand, d_conv, chunk_size);
        if (d_inner() % headdim != 0)
            THROW("d_inner %d (expand %d x d_model %d) is not divisible by headdim %d", d_inner(), expand, d_model, headdim);
        if (nheads() % ngroups != 0)
            THROW("nheads %d (d_inner %d / headdim %d) is not divisible by ngroups %d", nheads(), d_inner(), headdim, ngroups);
        if (d_inner() % ngroups != 0) THROW("d_inner %d is not divisible by ngroups %d", d_inner(), ngroups);
    }
};

// Presets (SPEC.md section 2). The mamba_ssm sizes reproduce the released models
// (GPT-NeoX vocabulary, tied embeddings); NVIDIA's 8B is untied with a 256K vocabulary.
inline const std::map<std::string, ModelConfig>& model_presets() {
    static const std::map<std::string, ModelConfig> presets = [] {
        std::map<std::string, ModelConfig> p;
        auto mamba2 = [&](const char* name, int d, int layers, int vocab, bool tied) {
            ModelConfig c;
            c.name = name; c.d_model = d; c.n_layer = layers; c.vocab_size = vocab; c.tie_embeddings = tied;
            return c;
        };
        p["mamba2-130m"] = mamba2("mamba2-130m", 768, 24, 50277, true);
        p["mamba2-370m"] = mamba2("mamba2-370m", 1024, 48, 50277, true);
        p["mamba2-780m"] = mamba2("mamba2-780m", 1536, 48, 50277, true);
        p["mamba2-1.3b"] = mamba2("mamba2-1.3b", 2048, 48, 50277, true);
        p["mamba2-2.7b"] = mamba2("mamba2-2.7b", 2560, 64, 50277, true);
        ModelConfig nv = mamba2("nvidia-mamba2-8b", 4096, 56, 256000, false);
        nv.ngroups = 8;
        p[nv.name] = nv;
        // the default model of train_mamba: small enough to learn the Brown corpus in minutes
        ModelConfig tiny = mamba2("mamba2-tiny", 384, 6, 50257, false);
        tiny.d_state = 64;
        p[tiny.name] = tiny;
        return p;
    }();
    return presets;
}

inline ModelConfig model_preset(const std::string& name) {
    auto& p = model_presets();
    auto it = p.find(name);
    if (it == p.end()) {
        std::string names;
        for (auto& kv : p) names += (names.empty() ? "" : ", ") + kv.first;
        THROW("unknown model '%s' (presets: %s)", name.c_str(), names.c_str());
    }
    ModelConfig c = it->second;
    c.finalize();
    return c;
}

// JSON config (keys as in HACKING.md); unknown keys are an error so typos do not pass silently.
inline ModelConfig model_config_from_json(const std::string& path) {
    std::ifstream f(path);
    if (!f) THROW("cannot open model config '%s'", path.c_str());
    nlohmann::json j;
    try { j = nlohmann::json::parse(f); } catch (const std::exception& e) {
        THROW("model config '%s' is not valid JSON: %s", path.c_str(), e.what());
    }
    ModelConfig c;
    c.name = path;
    for (auto& [key, v] : j.items()) {
        try {
            if (key == "vocab_size") c.vocab_size = v.get<int>();
            else if (key == "d_model") c.d_model = v.get<int>();
            else if (key == "n_layer") c.n_layer = v.get<int>();
            else if (key == "pattern") c.pattern = v.get<std::string>();
            else if (key == "ssm") c.ssm = v.get<std::string>();
            else if (key == "d_state") c.d_state = v.get<int>();
            else if (key == "headdim") c.headdim = v.get<int>();
            else if (key == "ngroups") c.ngroups = v.get<int>();
            else if (key == "expand") c.expand = v.get<int>();
            else if (key == "d_conv") c.d_conv = v.get<int>();
            else if (key == "chunk_size") c.chunk_size = v.get<int>();
            else if (key == "tie_embeddings") c.tie_embeddings = v.get<bool>();
            else if (key == "norm_eps") c.norm_eps = v.get<float>();
            else if (key == "name") c.name = v.get<std::string>();
            else THROW("model config '%s': unknown key '%s'", path.c_str(), key.c_str());
        } catch (const nlohmann::json::exception& e) {
            THROW("model config '%s': bad value for '%s': %s", path.c_str(), key.c_str(), e.what());
        }
    }
    if (j.contains("pattern") && !j.contains("n_layer")) c.n_layer = (int)c.pattern.size();
    c.finalize();
    return c;
}

inline nlohmann::json model_config_to_json(const ModelConfig& c) {
    return {{"name", c.name}, {"vocab_size", c.vocab_size}, {"d_model", c.d_model}, {"n_layer", c.n_layer},
            {"pattern", c.pattern}, {"ssm", c.ssm}, {"d_state", c.d_state}, {"headdim", c.headdim},
            {"ngroups", c.ngroups}, {"expand", c.expand}, {"d_conv", c.d_conv}, {"chunk_size", c.chunk_size},
            {"tie_embeddings", c.tie_embeddings}, {"norm_eps", c.norm_eps}};
}

// ----------------------------------------------------------------------------
// 2. Parameter layout: one flat buffer, every tensor at a fixed offset

enum class Init { Normal002, LinearUniform, ConvUniform, OutProjUniform, Ones, ALog, DtBias, Zero };

struct TensorInfo {
    std::string name;
    size_t offset = 0, count = 0;
    std::vector<int> shape;
    bool decay;      // AdamW weight decay: matrices, embeddings and conv weights only
    Init init;
    std::string kind;  // which part of the model it belongs to, for the dry-run breakdown
};

// offsets of one Mamba-2 layer's tensors (HACKING.md gives the order)
struct Mamba2Offsets { size_t norm, in_proj, conv_w, conv_b, dt_bias, A_log, D, gate_norm, out_proj; };

struct ParamLayout {
    std::vector<TensorInfo> tensors;
    std::vector<Mamba2Offsets> layers;  // one per 'M' layer
    size_t embedding = 0, final_norm = 0, lm_head = 0;
    size_t total = 0;

    size_t add(const std::string& name, std::vector<int> shape, bool decay, Init init, const std::string& kind) {
        TensorInfo t;
        t.name = name; t.shape = shape; t.decay = decay; t.init = init; t.kind = kind; t.offset = total;
        t.count = 1;
        for (int s : shape) t.count *= (size_t)s;
        total += t.count;
        tensors.push_back(t);
        return t.offset;
    }

    explicit ParamLayout(const ModelConfig& c) {
        const int d = c.d_model, Vp = c.padded_vocab();
        embedding = add("embedding", {Vp, d}, true, Init::Normal002, "embedding");
        for (int l = 0; l < c.n_layer; l++) {
            std::string p = "layers." + std::to_string(l) + ".";
            Mamba2Offsets o;
            o.norm = add(p + "norm", {d}, false, Init::Ones, "norms");
            o.in_proj = add(p + "in_proj", {c.d_in_proj(), d}, true, Init::LinearUniform, "mamba2");
            o.conv_w = add(p + "conv_weight", {c.conv_dim(), c.d_conv}, true, Init::ConvUniform, "mamba2");
            o.conv_b = add(p + "conv_bias", {c.conv_dim()}, false, Init::ConvUniform, "mamba2");
            o.dt_bias = add(p + "dt_bias", {c.nheads()}, false, Init::DtBias, "mamba2");
            o.A_log = add(p + "A_log", {c.nheads()}, false, Init::ALog, "mamba2");
            o.D = add(p + "D", {c.nheads()}, false, Init::Ones, "mamba2");
            o.gate_norm = add(p + "gate_norm", {c.d_inner()}, false, Init::Ones, "norms");
            o.out_proj = add(p + "out_proj", {d, c.d_inner()}, true, Init::OutProjUniform, "mamba2");
            layers.push_back(o);
        }
        final_norm = add("final_norm", {d}, false, Init::Ones, "norms");
        lm_head = c.tie_embeddings ? embedding : add("lm_head", {Vp, d}, true, Init::LinearUniform, "lm_head");
    }

    const TensorInfo& find(const std::string& name) const {
        for (auto& t : tensors) if (t.name == name) return t;
        THROW("no parameter named '%s'", name.c_str());
    }
};

// mamba_ssm's initialisation: embedding N(0, 0.02); Linear kaiming-uniform (bound
// 1/sqrt(fan_in)), out_proj further divided by sqrt(n_layer); conv1d bound 1/sqrt(K);
// A = -[1..16] uniform, A_log = log of it; dt log-uniform in [1e-3, 1e-1] (floor 1e-4)
// stored as dt_bias = softplus^-1(dt); norms and D ones. Padded vocab rows stay zero.
inline void init_parameters(float* master, const ParamLayout& layout, const ModelConfig& c, uint64_t seed) {
    SplitMix64 rng(seed);
    for (const TensorInfo& t : layout.tensors) {
        float* p = master + t.offset;
        int fan_in = t.shape.size() == 2 ? t.shape[1] : 1;
        for (size_t i = 0; i < t.count; i++) {
            double u = 2.0 * rng.uniform() - 1.0;  // U(-1, 1)
            switch (t.init) {
                case Init::Normal002: p[i] = (float)(0.02 * rng.normal()); break;
                case Init::LinearUniform: p[i] = (float)(u / std::sqrt((double)fan_in)); break;
                case Init::OutProjUniform: p[i] = (float)(u / std::sqrt((double)fan_in) / std::sqrt((double)c.n_layer)); break;
                case Init::ConvUniform: p[i] = (float)(u / std::sqrt((double)c.d_conv)); break;
                case Init::Ones: p[i] = 1.0f; break;
                case Init::Zero: p[i] = 0.0f; break;
                case Init::ALog: p[i] = (float)std::log(1.0 + 15.0 * rng.uniform()); break;
                case Init::DtBias: {
                    double dt = std::exp(std::log(1e-3) + rng.uniform() * (std::log(1e-1) - std::log(1e-3)));
                    dt = std::max(dt, 1e-4);
                    p[i] = (float)(dt + std::log(-std::expm1(-dt)));  // softplus^-1
                    break;
                }
            }
        }
        if (t.name == "embedding" || t.name == "lm_head")  // padded rows never take part
            std::fill(p + (size_t)c.vocab_size * c.d_model, p + t.count, 0.0f);
    }
}

// ----------------------------------------------------------------------------
// 3. Activations: sized once for (B, T); the forward keeps per layer the residual
// stream (fp32), the in_proj output [z | xBC | dt], the SSD output and the norms' rstd.
// Cheap elementwise results (the norm output, the conv output, the gated norm output) are
// recomputed in the backward into shared buffers instead of being kept per layer.

// rows of logits that exist at once (the LM head and the loss run chunk by chunk)
constexpr int LOGIT_CHUNK = 2048;

struct ActivationSizes {
    size_t resid, rstd, zxbcdt, y, gate_rstd, ssd_saved;   // per layer (resid: n_layer + 1 of them)
    size_t xn, xbc, g, logits, losses, ssd_scratch;  // shared
    size_t dresid, dresid_bf16, dxn, dzxbcdt, dxbc, dy, dg, norm_scratch;
    size_t total_bytes;
};

inline SSDShape ssd_shape(const ModelConfig& c, int B, int T) {
    return SSDShape{B, T, c.nheads(), c.headdim, c.ngroups, c.d_state, c.chunk_size};
}

inline ActivationSizes activation_sizes(const ModelConfig& c, int B, int T) {
    ActivationSizes s;
    const size_t BT = (size_t)B * T, L = c.n_layer, d = c.d_model;
    SSDShape sh = ssd_shape(c, B, T);
    s.resid = BT * d;
    s.rstd = BT;
    s.zxbcdt = BT * c.d_in_proj();
    s.y = BT * c.d_inner();
    s.gate_rstd = BT * c.ngroups;
    s.ssd_saved = ssd_saved_bytes(sh);
    s.xn = BT * d;
    s.xbc = BT * c.conv_dim();
    s.g = BT * c.d_inner();
    s.logits = std::min(BT, (size_t)LOGIT_CHUNK) * c.padded_vocab();
    s.losses = BT;
    s.ssd_scratch = ssd_scratch_bytes(sh);
    s.dresid = BT * d;
    s.dresid_bf16 = BT * d;
    s.dxn = BT * d;
    s.dzxbcdt = BT * c.d_in_proj();
    s.dxbc = BT * c.conv_dim();
    s.dy = BT * c.d_inner();
    s.dg = BT * c.d_inner();
    s.norm_scratch = std::max({rmsnorm_backward_scratch_floats((int)BT, (int)d),
                               gated_rmsnorm_backward_scratch_floats((int)BT, c.d_inner()),
                               conv1d_backward_scratch_floats(B, T, c.conv_dim(), c.d_conv)});
    s.total_bytes = (L + 1) * s.resid * 4 + L * (s.rstd * 4 + s.zxbcdt * 2 + s.y * 2 + s.gate_rstd * 4 + s.ssd_saved) +
                    (s.xn + s.xbc + s.g + s.logits) * 2 + s.losses * 4 + s.ssd_scratch +
                    s.dresid * 4 + (s.dresid_bf16 + s.dxn + s.dzxbcdt + s.dxbc + s.dy + s.dg) * 2 + s.norm_scratch * 4 +
                    BT * (3 * sizeof(int) + sizeof(float));  // inputs, targets, ranks, weights
    return s;
}

// Matmul FLOPs of one token's forward + backward (6 per matmul parameter, the embedding
// lookup excluded) plus the chunked SSD's matmuls (ANCHORS.md counts them this way).
inline double flops_per_token(const ModelConfig& c) {
    const double d = c.d_model, Q = c.chunk_size, N = c.d_state, P = c.headdim, H = c.nheads(), G = c.ngroups;
    double matmul_params = (double)c.padded_vocab() * d;  // lm head
    double ssd_fwd = 0;
    for (char k : c.pattern) {
        if (k == 'M') {
            matmul_params += (double)c.d_in_proj() * d + d * c.d_inner();
            ssd_fwd += 2 * Q * N * G + 2 * Q * P * H + 4 * N * P * H;  // per token: CB^T, scores x, states, state output
        }
    }
    return 6.0 * matmul_params + 3.0 * ssd_fwd;
}

// ----------------------------------------------------------------------------
// Optional per-phase timing (train_mamba --bench --profile): an event at each named mark;
// the time up to the next mark is charged to the mark's name.
struct PhaseTimer {
    std::vector<std::pair<std::string, cudaEvent_t>> marks;
    std::map<std::string, double> ms;
    void mark(const std::string& name, cudaStream_t s) {
        cudaEvent_t e;
        cudaCheck(cudaEventCreate(&e));
        cudaCheck(cudaEventRecord(e, s));
        marks.push_back({name, e});
    }
    // adds the marks recorded so far to the totals (the last mark closes the previous one)
    void collect() {
        if (marks.empty()) return;
        cudaCheck(cudaEventSynchronize(marks.back().second));
        for (size_t i = 0; i + 1 < marks.size(); i++) {
            float t;
            cudaCheck(cudaEventElapsedTime(&t, marks[i].second, marks[i + 1].second));
            ms[marks[i].first] += t;
        }
        for (auto& m : marks) cudaCheck(cudaEventDestroy(m.second));
        marks.clear();
    }
};

// ----------------------------------------------------------------------------
// 4. The model on the GPU

struct Model {
    ModelConfig cfg;
    ParamLayout layout;
    float* master = nullptr;  // fp32 master weights
    bf16* params = nullptr;   // bf16 compute copy, same offsets
    float* grads = nullptr;   // fp32 gradients, same offsets

    // activations for the (B, T) given to allocate()
    int B = 0, T = 0;
    ActivationSizes sz{};
    std::vector<float*> resid, rstd, gate_rstd;
    std::vector<bf16*> zxbcdt, y;
    std::vector<void*> ssd_saved;
    bf16 *xn = nullptr, *xbc = nullptr, *g = nullptr, *logits = nullptr;
    bf16 *dresid_bf16 = nullptr, *dxn = nullptr, *dzxbcdt = nullptr, *dxbc = nullptr, *dy = nullptr, *dg = nullptr;
    float *dresid = nullptr, *losses = nullptr, *norm_scratch = nullptr;
    void* ssd_scratch = nullptr;
    int *d_inputs = nullptr, *d_targets = nullptr, *d_rank = nullptr;
    float* d_weights = nullptr;
    EmbeddingBuckets buckets;
    PhaseTimer* timer = nullptr;  // set to time each phase
    void phase(const char* name, cudaStream_t s) { if (timer) timer->mark(name, s); }

    explicit Model(const ModelConfig& c) : cfg(c), layout(c) {
        master = cuda_malloc_n<float>(layout.total, "fp32 master weights");
        params = cuda_malloc_n<bf16>(layout.total, "bf16 weights");
        grads = cuda_malloc_n<float>(layout.total, "fp32 gradients");
        cudaCheck(cudaMemset(grads, 0, layout.total * sizeof(float)));
    }
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    ~Model() {
        for (void* p : {(void*)master, (void*)params, (void*)grads}) cudaFree(p);
        free_activations();
    }

    // upload fp32 master weights from the host and refresh the bf16 copy
    void set_master(const std::vector<float>& host) {
        if (host.size() != layout.total) THROW("parameter count %zu != model's %zu", host.size(), layout.total);
        cudaCheck(cudaMemcpy(master, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
        std::vector<bf16> h16(host.size());
        for (size_t i = 0; i < host.size(); i++) h16[i] = __float2bfloat16(host[i]);
        cudaCheck(cudaMemcpy(params, h16.data(), h16.size() * sizeof(bf16), cudaMemcpyHostToDevice));
    }

    std::vector<float> get_master() const {
        std::vector<float> host(layout.total);
        cudaCheck(cudaMemcpy(host.data(), master, host.size() * sizeof(float), cudaMemcpyDeviceToHost));
        return host;
    }

    void init(uint64_t seed) {
        std::vector<float> host(layout.total);
        init_parameters(host.data(), layout, cfg, seed);
        set_master(host);
    }

    void allocate(int B_, int T_) {
        free_activations();
        B = B_; T = T_;
        sz = activation_sizes(cfg, B, T);
        const int L = cfg.n_layer;
        for (int l = 0; l <= L; l++) resid.push_back(cuda_malloc_n<float>(sz.resid, "residual stream"));
        for (int l = 0; l < L; l++) {
            rstd.push_back(cuda_malloc_n<float>(sz.rstd, "norm rstd"));
            zxbcdt.push_back(cuda_malloc_n<bf16>(sz.zxbcdt, "in_proj output"));
            y.push_back(cuda_malloc_n<bf16>(sz.y, "ssd output"));
            gate_rstd.push_back(cuda_malloc_n<float>(sz.gate_rstd, "gated norm rstd"));
            ssd_saved.push_back(cuda_malloc(sz.ssd_saved, "ssd saved state"));
        }
        rstd.push_back(cuda_malloc_n<float>(sz.rstd, "final norm rstd"));
        xn = cuda_malloc_n<bf16>(sz.xn, "norm output");
        xbc = cuda_malloc_n<bf16>(sz.xbc, "conv output");
        g = cuda_malloc_n<bf16>(sz.g, "gated norm output");
        logits = cuda_malloc_n<bf16>(sz.logits, "logits");
        losses = cuda_malloc_n<float>(sz.losses, "per-token losses");
        ssd_scratch = cuda_malloc(sz.ssd_scratch, "ssd scratch");
        dresid = cuda_malloc_n<float>(sz.dresid, "residual gradient");
        dresid_bf16 = cuda_malloc_n<bf16>(sz.dresid_bf16, "residual gradient (bf16)");
        dzxbcdt = cuda_malloc_n<bf16>(sz.dzxbcdt, "in_proj output gradient");
        dxbc = cuda_malloc_n<bf16>(sz.dxbc, "conv output gradient");
        dy = cuda_malloc_n<bf16>(sz.dy, "ssd output gradient");
        dg = cuda_malloc_n<bf16>(sz.dg, "gated norm output gradient");
        dxn = cuda_malloc_n<bf16>(sz.dxn, "norm output gradient");
        norm_scratch = cuda_malloc_n<float>(sz.norm_scratch, "norm scratch");
        d_inputs = cuda_malloc_n<int>((size_t)B * T, "inputs");
        d_targets = cuda_malloc_n<int>((size_t)B * T, "targets");
        d_rank = cuda_malloc_n<int>((size_t)B * T, "target ranks");
        d_weights = cuda_malloc_n<float>((size_t)B * T, "loss weights");
    }

    void free_activations() {
        for (auto* p : resid) cudaFree(p);
        for (auto* p : rstd) cudaFree(p);
        for (auto* p : gate_rstd) cudaFree(p);
        for (auto* p : zxbcdt) cudaFree(p);
        for (auto* p : y) cudaFree(p);
        for (auto* p : ssd_saved) cudaFree(p);
        resid.clear(); rstd.clear(); gate_rstd.clear(); zxbcdt.clear(); y.clear(); ssd_saved.clear();
        for (void* p : {(void*)xn, (void*)xbc, (void*)g, (void*)logits, (void*)losses, ssd_scratch,
                        (void*)dresid, (void*)dresid_bf16, (void*)dxn, (void*)dzxbcdt, (void*)dxbc, (void*)dy, (void*)dg,
                        (void*)norm_scratch, (void*)d_inputs, (void*)d_targets, (void*)d_rank, (void*)d_weights})
            cudaFree(p);
        xn = xbc = g = logits = dresid_bf16 = dxn = dzxbcdt = dxbc = dy = dg = nullptr;
        losses = dresid = norm_scratch = d_weights = nullptr;
        ssd_scratch = nullptr;
        d_inputs = d_targets = d_rank = nullptr;
    }

    // --- pieces of one Mamba-2 layer that both passes run (the backward recomputes them)
    const bf16* w(size_t offset) const { return params + offset; }

    void mamba2_conv(int l, cudaStream_t s) {
        const Mamba2Offsets& o = layout.layers[l];
        conv1d_silu_forward(xbc, zxbcdt[l] + cfg.d_inner(), cfg.d_in_proj(), w(o.conv_w), w(o.conv_b), B, T,
                            cfg.conv_dim(), cfg.d_conv, s);
    }

    void mamba2_gate(int l, cudaStream_t s) {
        const Mamba2Offsets& o = layout.layers[l];
        gated_rmsnorm_forward(g, gate_rstd[l], y[l], zxbcdt[l], cfg.d_in_proj(), w(o.gate_norm), B * T,
                              cfg.d_inner(), cfg.ngroups, cfg.norm_eps, s);
    }

    // the SSD reads x, B, C from the conv output and dt from the in_proj output, in place
    struct SSDViews { const bf16 *x, *Bm, *Cm, *dt; };
    SSDViews ssd_views(int l) const {
        const int di = cfg.d_inner(), gn = cfg.ngroups * cfg.d_state;
        return {xbc, xbc + di, xbc + di + gn, zxbcdt[l] + 2 * di + 2 * gn};
    }

    // Forward to the per-token losses (`losses`, device; loss_sum() on the host). targets
    // may be null: the forward then stops at the final norm, and compute_logits() gives the
    // logits of chosen rows. weights may be null (all 1). With dloss > 0 the gradient is
    // carried back through the LM head, ready for backward(). With target_rank (device, BT
    // ints) it also records each target's rank for top-k accuracy.
    void forward(const int* inputs, const int* targets, const float* weights, float dloss, float z_loss,
                 cudaStream_t s = 0, int* target_rank = nullptr) {
        const int BT = B * T, d = cfg.d_model, Vp = cfg.padded_vocab();
        cudaCheck(cudaMemcpyAsync(d_inputs, inputs, BT * sizeof(int), cudaMemcpyHostToDevice, s));
        if (targets) cudaCheck(cudaMemcpyAsync(d_targets, targets, BT * sizeof(int), cudaMemcpyHostToDevice, s));
        if (weights) cudaCheck(cudaMemcpyAsync(d_weights, weights, BT * sizeof(float), cudaMemcpyHostToDevice, s));
        if (dloss > 0) buckets.build(inputs, BT, s);  // for the embedding backward

        phase("embedding", s);
        embedding_forward(resid[0], d_inputs, w(layout.embedding), BT, d, s);
        const SSDShape sh = ssd_shape(cfg, B, T);
        for (int l = 0; l < cfg.n_layer; l++) {
            const Mamba2Offsets& o = layout.layers[l];
            phase("rmsnorm", s);
            rmsnorm_forward(xn, rstd[l], resid[l], w(o.norm), BT, d, cfg.norm_eps, s);
            phase("in_proj", s);
            matmul_forward(zxbcdt[l], xn, w(o.in_proj), BT, cfg.d_in_proj(), d, s);
            phase("conv1d", s);
            mamba2_conv(l, s);
            SSDViews v = ssd_views(l);
            phase("ssd", s);
            ssd_forward(y[l], ssd_saved[l], ssd_scratch, v.x, cfg.conv_dim(), v.Bm, v.Cm, cfg.conv_dim(), v.dt,
                        cfg.d_in_proj(), w(o.dt_bias), w(o.A_log), w(o.D), sh, s);
            phase("gated_norm", s);
            mamba2_gate(l, s);
            phase("out_proj", s);
            matmul_forward_residual(resid[l + 1], resid[l], g, w(o.out_proj), BT, d, cfg.d_inner(), s);
        }
        phase("rmsnorm", s);
        rmsnorm_forward(xn, rstd[cfg.n_layer], resid[cfg.n_layer], w(layout.final_norm), BT, d, cfg.norm_eps, s);
        if (targets) lm_head_and_loss(target_rank, weights != nullptr, dloss, z_loss, s);
    }

    // Logits of rows [r0, r0 + rows) (rows <= logit_rows()) into `logits`, after a forward.
    void compute_logits(int r0, int rows, cudaStream_t s = 0) {
        if (rows > logit_rows()) THROW("compute_logits: %d rows asked, the buffer holds %d", rows, logit_rows());
        matmul_forward(logits, xn + (size_t)r0 * cfg.d_model, w(layout.lm_head), rows, cfg.padded_vocab(), cfg.d_model, s);
    }
    int logit_chunk = LOGIT_CHUNK;  // tests set it smaller to run several chunks
    int logit_rows() const { return std::min(B * T, std::min(logit_chunk, LOGIT_CHUNK)); }

    // The LM head and the loss run over chunks of rows, so the logits of the whole batch
    // never exist at once; with dloss > 0 each chunk's gradient goes straight through the
    // LM head (into dxn and the head's weight gradient), ready for backward().
    void lm_head_and_loss(int* target_rank, bool weighted, float dloss, float z_loss, cudaStream_t s) {
        const int BT = B * T, d = cfg.d_model, Vp = cfg.padded_vocab();
        for (int r0 = 0; r0 < BT; r0 += logit_rows()) {
            const int rows = std::min(logit_rows(), BT - r0);
            phase("lm_head", s);
            compute_logits(r0, rows, s);
            phase("loss", s);
            fused_classifier(logits, losses + r0, target_rank ? target_rank + r0 : nullptr, d_targets + r0,
                             weighted ? d_weights + r0 : nullptr, dloss, z_loss, rows, cfg.vocab_size, Vp, dloss > 0, s);
            if (dloss > 0) {
                phase("lm_head bwd", s);
                matmul_backward(dxn + (size_t)r0 * d, grads + layout.lm_head, logits, xn + (size_t)r0 * d,
                                w(layout.lm_head), rows, Vp, d, s);
            }
        }
    }

    // Backward from what forward(dloss > 0) left; gradients accumulate
    // into `grads` (zero them once per optimizer step with zero_grad()).
    void backward(cudaStream_t s = 0) {
        const int BT = B * T, d = cfg.d_model, L = cfg.n_layer;
        const int di = cfg.d_inner(), dip = cfg.d_in_proj(), gn = cfg.ngroups * cfg.d_state, cd = cfg.conv_dim();
        const SSDShape sh = ssd_shape(cfg, B, T);
        // the forward left the gradient of the final norm's output in dxn
        phase("rmsnorm bwd", s);
        cudaCheck(cudaMemsetAsync(dresid, 0, (size_t)BT * d * sizeof(float), s));
        rmsnorm_backward(dresid, dresid_bf16, grads + layout.final_norm, norm_scratch, dxn, resid[L],
                         w(layout.final_norm), rstd[L], BT, d, s);
        for (int l = L - 1; l >= 0; l--) {
            const Mamba2Offsets& o = layout.layers[l];
            // recompute what the forward did not keep
            phase("recompute", s);
            rmsnorm_forward(xn, rstd[l], resid[l], w(o.norm), BT, d, cfg.norm_eps, s);
            mamba2_conv(l, s);
            mamba2_gate(l, s);
            // out_proj: dresid_bf16 is the gradient of this block's output
            phase("out_proj bwd", s);
            matmul_backward(dg, grads + o.out_proj, dresid_bf16, g, w(o.out_proj), BT, d, di, s);
            phase("gated_norm bwd", s);
            gated_rmsnorm_backward(dy, dzxbcdt, dip, grads + o.gate_norm, norm_scratch, dg, y[l], zxbcdt[l], dip,
                                   w(o.gate_norm), gate_rstd[l], BT, di, cfg.ngroups, s);
            SSDViews v = ssd_views(l);
            phase("ssd bwd", s);
            ssd_backward(dxbc, cd, dxbc + di, dxbc + di + gn, cd, dzxbcdt + 2 * di + 2 * gn, dip,
                         grads + o.dt_bias, grads + o.A_log, grads + o.D, ssd_scratch, dy,
                         v.x, cd, v.Bm, v.Cm, cd, v.dt, dip, w(o.dt_bias), w(o.A_log), w(o.D), ssd_saved[l], sh, s);
            phase("conv1d bwd", s);
            conv1d_silu_backward(dzxbcdt + di, dip, grads + o.conv_w, grads + o.conv_b, norm_scratch, dxbc,
                                 zxbcdt[l] + di, dip, w(o.conv_w), w(o.conv_b), B, T, cd, cfg.d_conv, s);
            phase("in_proj bwd", s);
            matmul_backward(dxn, grads + o.in_proj, dzxbcdt, xn, w(o.in_proj), BT, dip, d, s);
            phase("rmsnorm bwd", s);
            rmsnorm_backward(dresid, dresid_bf16, grads + o.norm, norm_scratch, dxn, resid[l], w(o.norm), rstd[l],
                             BT, d, s);
        }
        phase("embedding bwd", s);
        embedding_backward(grads + layout.embedding, dresid, buckets, d, s);
    }

    void zero_grad(cudaStream_t s = 0) { cudaCheck(cudaMemsetAsync(grads, 0, layout.total * sizeof(float), s)); }

    // sum of the per-token losses of the last forward (host sync)
    double loss_sum() const {
        std::vector<float> h((size_t)B * T);
        cudaCheck(cudaMemcpy(h.data(), losses, h.size() * sizeof(float), cudaMemcpyDeviceToHost));
        double sum = 0;
        for (float x : h) sum += x;
        return sum;
    }
};
