// hf_logits: the engine's logits (and greedy continuations) for a batch of token ids, from a
// Hugging Face / mamba_ssm directory or a checkpoint. test/hf_roundtrip.py compares them with
// transformers' on the GPU machine.
//
//   hf_logits MODEL --tokens IN --out OUT [--greedy N --prompt-len P]
// IN:  int32 B, int32 T, then B*T int32 token ids
// OUT: int32 B, int32 T, int32 V, then B*T*V float32 logits (the bf16 LM head's output)
// with --greedy N: OUT.greedy, int32 B, int32 N, then B*N int32: each row's first P tokens
// continued by N argmax tokens (the forward re-run on the growing sequence, session.cuh's generate)
#include <cstdio>
#include "flags.h"
#include "checkpoint.cuh"
#include "session.cuh"
#include "hf.h"

static std::vector<int32_t> read_ints(const std::string& path) {
    FILE* f = fopen_or_throw(path, "rb");
    std::vector<int32_t> v;
    int32_t x;
    while (fread(&x, 4, 1, f) == 1) v.push_back(x);
    fclose(f);
    return v;
}

int main(int argc, char** argv) {
    try {
        std::string tokens, out;
        int greedy = 0, prompt_len = 0;
        Flags f("usage: hf_logits MODEL --tokens IN --out OUT [--greedy N --prompt-len P]");
        f.add({"--tokens"}, &tokens, "FILE", "int32 B, T, then B*T ids");
        f.add({"--out"}, &out, "FILE", "int32 B, T, V, then float32 logits");
        f.add({"--greedy"}, &greedy, "N", "also continue each row's first P tokens greedily by N", Range::at_least(0));
        f.add({"--prompt-len"}, &prompt_len, "P", "prompt tokens of each row for --greedy", Range::at_least(1));
        const std::vector<std::string> pos = f.parse(argc, argv);
        if (pos.size() != 1 || tokens.empty() || out.empty()) THROW("need MODEL, --tokens and --out (see --help)");
        if (greedy > 0 && prompt_len == 0) THROW("--greedy needs --prompt-len");

        ModelConfig cfg;
        std::vector<float> master;
        if (hf_is_model_dir(pos[0])) master = hf_load<ParamLayout>(pos[0], cfg);
        else { int step; master = checkpoint_weights(checkpoint_resolve(pos[0]), cfg, step); }
        const std::vector<int32_t> in = read_ints(tokens);
        if (in.size() < 2 || (size_t)in[0] * in[1] + 2 != in.size()) THROW("'%s' is not int32 B, T and B*T ids", tokens.c_str());
        const int B = in[0], T = in[1], V = cfg.vocab_size, Vp = cfg.padded_vocab();
        std::vector<int> ids(in.begin() + 2, in.end());
        for (int id : ids) if (id < 0 || id >= V) THROW("token id %d is outside the vocabulary of %d", id, V);

        matmul_init();
        Model model(cfg);
        model.set_master(master);
        model.allocate(B, T);
        model.forward({ids.data()}, 0.0f, 0.0f);
        std::vector<float> logits((size_t)B * T * V);
        std::vector<bf16> chunk;
        for (int r0 = 0; r0 < B * T; r0 += model.logit_rows()) {
            const int rows = std::min(model.logit_rows(), B * T - r0);
            model.compute_logits(r0, rows);
            chunk.resize((size_t)rows * Vp);
            cudaCheck(cudaMemcpy(chunk.data(), model.logits, chunk.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < V; j++) logits[(size_t)(r0 + r) * V + j] = __bfloat162float(chunk[(size_t)r * Vp + j]);
        }
        FILE* o = fopen_or_throw(out, "wb");
        const int32_t head[3] = {B, T, V};
        fwrite_or_throw(head, 4, 3, o, out);
        fwrite_or_throw(logits.data(), 4, logits.size(), o, out);
        fclose(o);

        if (greedy > 0) {
            if (prompt_len > T) THROW("--prompt-len %d exceeds T = %d", prompt_len, T);
            model.free_activations();
            model.allocate(1, prompt_len + greedy + 1);
            std::vector<int32_t> g = {B, greedy};
            SplitMix64 rng(0);
            Sampling s;
            s.greedy = true;
            for (int b = 0; b < B; b++) {
                const std::vector<uint32_t> prompt(ids.begin() + (size_t)b * T, ids.begin() + (size_t)b * T + prompt_len);
                const std::vector<uint32_t> gen = generate(model, prompt, greedy, s, {}, rng);
                if ((int)gen.size() != greedy) THROW("generated %zu tokens, asked for %d", gen.size(), greedy);
                g.insert(g.end(), gen.begin(), gen.end());
            }
            const std::string gp = out + ".greedy";
            FILE* go = fopen_or_throw(gp, "wb");
            fwrite_or_throw(g.data(), 4, g.size(), go, gp);
            fclose(go);
        }
        printf("%s: %s, logits of %d x %d tokens over %d%s -> %s\n", pos[0].c_str(), cfg.name.c_str(), B, T, V,
               greedy ? strformat(", greedy %d", greedy).c_str() : "", out.c_str());
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
