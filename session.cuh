// Training-session helpers shared by train_mamba and finetune_mamba: the MFU peak, loss
// weights, evaluation on a validation set (masked targets excluded), sampling and
// generation, and resizing a model's vocabulary (fine-tuning adds special tokens).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>
#include "mamba.cuh"
#include "dataloader.h"
#include "tokenizer.h"

// dense bf16 peak of the GPU for MFU (ANCHORS.md: datasheet figures)
static double peak_flops(const cudaDeviceProp& p) {
    std::string n = p.name;
    if (n.find("H100") != std::string::npos || n.find("H200") != std::string::npos) return 989e12;
    if (n.find("A100") != std::string::npos) return 312e12;
    return 0;
}

// positional loss weights tanh(pos / 10) (SPEC.md section 3), pos each token's position in
// its sequence or document
static void positional_weights(std::vector<float>& w, const std::vector<int>& pos) {
    w.resize(pos.size());
    for (size_t i = 0; i < pos.size(); i++) w[i] = std::tanh(pos[i] / 10.0f);
}

// mean loss and top-1/top-5 accuracy over the valid (unmasked) targets of `batches` batches
// from the start of `val`; `valid` counts those targets. samples > 0 (an unshuffled loader):
// only its first `samples` samples count, so that a set that is not a whole number of
// batches counts every sample once (the rows that wrap around are masked). documents: the
// rows' documents run apart (--doc-reset, fine-tuning's examples).
struct EvalResult { double loss, top1, top5; long valid; };

static EvalResult evaluate(Model& model, DataLoader& val, int batches, size_t samples = 0, bool documents = false) {
    val.reset();
    double top1 = 0, top5 = 0;
    long n = 0;
    const int B = model.B, T = model.T;
    std::vector<int> rank((size_t)B * T), targets;
    for (int i = 0; i < batches; i++) {
        val.next_batch();
        const int* tg = val.targets();
        if (samples > 0 && (size_t)(i + 1) * B > samples) {
            targets.assign(tg, tg + (size_t)B * T);
            for (int b = 0; b < B; b++)
                if ((size_t)i * B + b >= samples) std::fill(targets.begin() + (size_t)b * T, targets.begin() + (size_t)(b + 1) * T, -1);
            tg = targets.data();
        }
        model.forward({val.inputs(), tg, nullptr, documents ? val.pos_in_doc() : nullptr}, 0.0f, 0.0f, 0, model.d_rank);
        cudaCheck(cudaMemcpy(rank.data(), model.d_rank, rank.size() * sizeof(int), cudaMemcpyDeviceToHost));
        for (int r : rank) {
            if (r < 0) continue;  // masked target
            top1 += r < 1;
            top5 += r < 5;
            n++;
        }
    }
    const double d = std::max(n, 1L);
    return {model.loss_sum() / d, top1 / d, top5 / d, n};  // the losses of every batch, read once
}

// an evaluation over several ranks' shares: each rank's result, weighted by its count
// (`sum` adds a value over the ranks)
template <typename Sum>
static EvalResult combine_eval(const EvalResult& e, Sum&& sum) {
    const double n = sum((double)e.valid);
    if (n <= 0) return e;
    return {sum(e.loss * e.valid) / n, sum(e.top1 * e.valid) / n, sum(e.top5 * e.valid) / n, (long)n};
}

static void print_eval(const EvalResult& e, int step) {
    printf("step %5d | val loss %.4f | top-1 %.2f%% | top-5 %.2f%%\n", step, e.loss, 100 * e.top1, 100 * e.top5);
    fflush(stdout);
}

// ----------------------------------------------------------------------------
// sampling

// greedy: argmax; else softmax(logits / temperature) restricted to the smallest set of
// most likely tokens whose probability reaches top_p (nucleus sampling; 1 = all)
struct Sampling {
    bool greedy = false;
    float temperature = 0.8f, top_p = 1.0f;
};

// next token from a row of logits over the real vocabulary [0, V)
static int sample_token(const bf16* row, int V, const Sampling& s, SplitMix64& rng) {
    float mx = -1e30f;
    int arg = 0;
    for (int j = 0; j < V; j++) {
        float l = __bfloat162float(row[j]);
        if (l > mx) { mx = l; arg = j; }
    }
    if (s.greedy || s.temperature <= 0.0f) return arg;
    std::vector<double> p(V);
    double sum = 0;
    for (int j = 0; j < V; j++) sum += p[j] = std::exp((__bfloat162float(row[j]) - mx) / s.temperature);
    if (s.top_p >= 1.0f) {  // inverse CDF over the whole vocabulary
        double r = rng.uniform() * sum;
        for (int j = 0; j < V; j++) { r -= p[j]; if (r <= 0) return j; }
        return V - 1;
    }
    std::vector<int> order(V);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    double kept = 0;
    size_t k = 0;
    while (k < order.size() && kept < s.top_p * sum) kept += p[order[k++]];
    double r = rng.uniform() * kept;
    for (size_t i = 0; i < k; i++) { r -= p[order[i]]; if (r <= 0) return order[i]; }
    return order[k - 1];
}

// Continues `prompt` by up to max_new tokens (fewer if the model's T runs out), stopping
// after a token of `stop` (which is returned too). Re-runs the forward on the growing
// sequence in row 0 of the batch; the padding after the current position cannot influence
// it (causal model).
static std::vector<uint32_t> generate(Model& model, const std::vector<uint32_t>& prompt, int max_new,
                                      const Sampling& s, const std::vector<int>& stop, SplitMix64& rng, int pad = 0) {
    const int T = model.T, Vp = model.cfg.padded_vocab(), V = model.cfg.vocab_size;
    if (prompt.empty()) THROW("generate: empty prompt");
    if ((int)prompt.size() >= T) THROW("generate: the prompt of %zu tokens does not fit T = %d", prompt.size(), T);
    std::vector<int> inputs((size_t)model.B * T, pad);
    for (size_t i = 0; i < prompt.size(); i++) inputs[i] = (int)prompt[i];
    std::vector<bf16> row(Vp);
    std::vector<uint32_t> out;
    for (int t = (int)prompt.size() - 1; t < T - 1 && (int)out.size() < max_new; t++) {
        model.forward({inputs.data()}, 0.0f, 0.0f);
        model.compute_logits(t, 1);
        cudaCheck(cudaMemcpy(row.data(), model.logits, Vp * sizeof(bf16), cudaMemcpyDeviceToHost));
        const int next = sample_token(row.data(), V, s, rng);
        inputs[t + 1] = next;
        out.push_back((uint32_t)next);
        if (std::find(stop.begin(), stop.end(), next) != stop.end()) break;
    }
    return out;
}

// a sample of `len` tokens after an end-of-text token, temperature 0.8 (train_mamba's log)
static std::string sample_text(Model& model, const Tokenizer& tok, int len, uint64_t seed) {
    const int eot = tok.eot_token() >= 0 ? tok.eot_token() : 0;
    SplitMix64 rng(seed);
    Sampling s;
    return tok.decode(generate(model, {(uint32_t)eot}, len, s, {}, rng, eot));
}

// ----------------------------------------------------------------------------
// vocabulary resizing

// Master weights of model `from` laid out for model `to`, which differs at most in
// vocab_size: every tensor is copied by name; the embedding and LM head row by row, rows
// beyond from's vocabulary set to the mean of from's rows (a new token starts as an
// average token: its logit near the mean, its embedding in the bulk of the others), padded
// rows zero.
static std::vector<float> resize_vocab(const std::vector<float>& master, const ModelConfig& from, const ModelConfig& to) {
    ModelConfig a = from, b = to;
    a.vocab_size = b.vocab_size = 0;
    a.name = b.name = "";
    if (model_config_to_json(a) != model_config_to_json(b))
        THROW("resize_vocab: the models differ in more than the vocabulary: %s vs %s", model_config_to_json(from).dump().c_str(),
              model_config_to_json(to).dump().c_str());
    ParamLayout la(from), lb(to);
    if (master.size() != la.total) THROW("resize_vocab: %zu weights, the model has %zu", master.size(), la.total);
    std::vector<float> out(lb.total, 0.0f);
    const size_t d = from.d_model, Va = from.vocab_size, Vb = to.vocab_size;
    for (const TensorInfo& t : lb.tensors) {
        const TensorInfo& s = la.find(t.name);
        const float* src = master.data() + s.offset;
        float* dst = out.data() + t.offset;
        if (t.name == "embedding" || t.name == "lm_head") {
            std::copy(src, src + std::min(Va, Vb) * d, dst);
            std::vector<double> mean(d, 0.0);
            for (size_t r = 0; r < Va; r++)
                for (size_t c = 0; c < d; c++) mean[c] += src[r * d + c];
            for (size_t r = Va; r < Vb; r++)
                for (size_t c = 0; c < d; c++) dst[r * d + c] = (float)(mean[c] / Va);
        } else {
            if (s.count != t.count) THROW("resize_vocab: tensor '%s' has %zu vs %zu values", t.name.c_str(), s.count, t.count);
            std::copy(src, src + s.count, dst);
        }
    }
    return out;
}
