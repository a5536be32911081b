// convert_hf: models between this engine's checkpoints and Hugging Face / state-spaces/mamba
// directories (hf.h has the mappings). Host code only (g++): the parameter layout is mamba.cuh's
// host half.
//
//   convert_hf export CKPT OUT_DIR [flags]   a checkpoint (file, or a directory's latest) to a
//                                            directory transformers loads (config.json,
//                                            safetensors, tokenizer files)
//   convert_hf import HF_DIR OUT_DIR         an HF or mamba_ssm directory to a step-0 checkpoint
//                                            OUT_DIR/step_00000000.ckpt (finetune_mamba --init
//                                            reads it) and its tokenizer beside it
//   convert_hf config HF_DIR                 the engine's config for HF_DIR (JSON) and its class
#include <cstdio>
#include <filesystem>
#include "flags.h"
#include "checkpoint.cuh"
#include "hf.h"

static const char* kUsage =
    "usage: convert_hf export CKPT OUT_DIR [flags]   checkpoint -> Hugging Face directory\n"
    "       convert_hf import HF_DIR OUT_DIR         Hugging Face / mamba_ssm directory -> step-0 checkpoint\n"
    "       convert_hf config HF_DIR                 the engine config an HF directory maps to";

int main(int argc, char** argv) {
    try {
        std::string tokenizer, tpl, dtype = "fp32", cls;
        double shard_mb = 5000;
        Flags f(kUsage);
        f.section("export:");
        f.add({"--tokenizer"}, &tokenizer, "PATH", "tokenizer to write beside the model (GPT-2 files, tokenizer.json)");
        f.add({"--template"}, &tpl, "FILE", "SFT template.json for the chat template (default: beside the tokenizer)");
        f.choice({"--dtype"}, &dtype, {"fp32", "bf16", "fp16"}, "weights' dtype (fp32 keeps the master weights exactly)");
        f.add({"--class"}, &cls, "NAME", "mamba | mamba2 | nemotron_h | llama (default: from the model's layers)");
        f.add({"--shard-mb"}, &shard_mb, "F", "largest safetensors file in MB (several with an index above it)",
              Range::above(0));
        const std::vector<std::string> pos = f.parse(argc, argv);
        if (pos.empty()) THROW("no command (export, import, config); see --help");
        const std::string cmd = pos[0];
        auto need = [&](size_t n) {
            if (pos.size() != n + 1) THROW("'%s' takes %zu argument(s), got %zu (see --help)", cmd.c_str(), n, pos.size() - 1);
        };
        if (cmd == "export") {
            need(2);
            ModelConfig cfg;
            int step = 0;
            const std::string ckpt = checkpoint_resolve(pos[1]);
            const std::vector<float> master = checkpoint_weights(ckpt, cfg, step);
            HfSaveOptions o;
            o.tokenizer = tokenizer;
            o.template_path = tpl;
            o.dtype = dtype_from_flag(dtype);
            o.max_shard_bytes = (size_t)(shard_mb * 1e6);
            o.cls = cls;
            const HfKind k = hf_save<ParamLayout>(pos[2], cfg, master, o);
            printf("%s (step %d, %s) -> %s: %s, %s weights%s\n", ckpt.c_str(), step, cfg.name.c_str(), pos[2].c_str(),
                   hf_class(k), dtype.c_str(), tokenizer.empty() ? ", no tokenizer" : ", tokenizer");
        } else if (cmd == "import") {
            need(2);
            ModelConfig cfg;
            HfKind k;
            const std::vector<float> master = hf_load<ParamLayout>(pos[1], cfg, &k);
            const std::string path = checkpoint_save(pos[2], TrainState{}, master, OptState{}, cfg, 0, 1, [] {});
            const std::vector<std::string> tok = hf_tokenizer_files(pos[1]);
            for (const std::string& t : tok)
                std::filesystem::copy_file(pos[1] + "/" + t, pos[2] + "/" + t, std::filesystem::copy_options::overwrite_existing);
            printf("%s (%s) -> %s: model %s, %zu parameters%s\n", pos[1].c_str(), hf_class(k), path.c_str(),
                   cfg.name.c_str(), master.size(), tok.empty() ? ", no tokenizer" : ", tokenizer copied");
        } else if (cmd == "config") {
            need(1);
            HfKind k;
            const ModelConfig cfg = hf_read_config(pos[1], k);
            printf("class: %s\n%s\n", hf_class(k), model_config_to_json(cfg).dump().c_str());
        } else {
            THROW("unknown command '%s' (export, import, config)", cmd.c_str());
        }
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
