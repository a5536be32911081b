// Training checkpoints: everything a run needs to continue bit for bit.
//
// File layout (little endian):
//   char magic[8] = "MAMBACK1"
//   uint64 header_bytes, then a JSON header: model config, step, parameter count,
//     loader state size
//   the loader state (raw bytes of DataLoader::State)
//   float master[n], float adam_m[n], float adam_v[n]
// Files are written to NAME.tmp and renamed, so a crash never leaves a torn checkpoint.
#pragma once
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <unistd.h>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "common.h"
#include "mamba.cuh"
#include "optim.cuh"
#include "dataloader.h"

struct TrainState {
    int step = 0;
    DataLoader::State loader{};
};

static const char kCheckpointMagic[8] = {'M', 'A', 'M', 'B', 'A', 'C', 'K', '1'};

inline std::string checkpoint_save(const std::string& dir, const TrainState& st, const Model& model, const AdamW& opt,
                                   const ModelConfig& cfg) {
    std::filesystem::create_directories(dir);
    char name[64];
    snprintf(name, sizeof(name), "step_%08d.ckpt", st.step);
    const std::string path = dir + "/" + name, tmp = path + ".tmp";
    nlohmann::json h = {{"config", model_config_to_json(cfg)}, {"step", st.step},
                        {"num_params", model.layout.total}, {"loader_state_bytes", sizeof(st.loader)}};
    std::string header = h.dump();
    uint64_t header_bytes = header.size();
    std::vector<float> master = model.get_master(), m, v;
    opt.get_state(m, v);
    FILE* f = fopen_or_throw(tmp, "wb");
    fwrite_or_throw(kCheckpointMagic, 1, 8, f, tmp);
    fwrite_or_throw(&header_bytes, sizeof(header_bytes), 1, f, tmp);
    fwrite_or_throw(header.data(), 1, header.size(), f, tmp);
    fwrite_or_throw(&st.loader, sizeof(st.loader), 1, f, tmp);
    for (auto* vec : {&master, &m, &v}) fwrite_or_throw(vec->data(), sizeof(float), vec->size(), f, tmp);
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) THROW("cannot flush checkpoint '%s'", tmp.c_str());
    fclose(f);
    std::filesystem::rename(tmp, path);
    return path;
}

// a checkpoint file, or a directory: its latest step_*.ckpt
inline std::string checkpoint_resolve(const std::string& path) {
    if (!std::filesystem::is_directory(path)) {
        if (!std::filesystem::exists(path)) THROW("checkpoint '%s' does not exist", path.c_str());
        return path;
    }
    std::vector<std::string> found;
    for (auto& e : std::filesystem::directory_iterator(path)) {
        std::string n = e.path().filename().string();
        if (n.rfind("step_", 0) == 0 && n.size() > 5 && n.substr(n.size() - 5) == ".ckpt") found.push_back(e.path().string());
    }
    if (found.empty()) THROW("no step_*.ckpt checkpoint in directory '%s'", path.c_str());
    std::sort(found.begin(), found.end());
    return found.back();
}

// Reads the header only: the model config a checkpoint was written with.
inline nlohmann::json checkpoint_header(const std::string& path, FILE** keep_open = nullptr) {
    FILE* f = fopen_or_throw(path, "rb");
    char magic[8];
    fread_or_throw(magic, 1, 8, f, path);
    if (memcmp(magic, kCheckpointMagic, 8) != 0) { fclose(f); THROW("'%s' is not a mamba.cu checkpoint (bad magic)", path.c_str()); }
    uint64_t header_bytes;
    fread_or_throw(&header_bytes, sizeof(header_bytes), 1, f, path);
    if (header_bytes > (1u << 20)) { fclose(f); THROW("checkpoint '%s' has a corrupt header size %llu", path.c_str(), (unsigned long long)header_bytes); }
    std::string header(header_bytes, '\0');
    fread_or_throw(header.data(), 1, header_bytes, f, path);
    if (keep_open) *keep_open = f; else fclose(f);
    try { return nlohmann::json::parse(header); } catch (const std::exception& e) {
        THROW("checkpoint '%s' has a corrupt header: %s", path.c_str(), e.what());
    }
}

inline TrainState checkpoint_load(const std::string& path, Model& model, AdamW& opt, const ModelConfig& cfg) {
    FILE* f = nullptr;
    nlohmann::json h = checkpoint_header(path, &f);
    if (h["config"] != model_config_to_json(cfg)) {
        fclose(f);
        THROW("checkpoint '%s' holds model %s, but this run builds %s", path.c_str(), h["config"].dump().c_str(),
              model_config_to_json(cfg).dump().c_str());
    }
    size_t n = h["num_params"].get<size_t>();
    if (n != model.layout.total || h["loader_state_bytes"].get<size_t>() != sizeof(DataLoader::State)) {
        fclose(f);
        THROW("checkpoint '%s' does not match this build (params %zu vs %zu)", path.c_str(), n, model.layout.total);
    }
    TrainState st;
    st.step = h["step"].get<int>();
    fread_or_throw(&st.loader, sizeof(st.loader), 1, f, path);
    std::vector<float> master(n), m(n), v(n);
    for (auto* vec : {&master, &m, &v}) fread_or_throw(vec->data(), sizeof(float), n, f, path);
    fclose(f);
    model.set_master(master);
    opt.set_state(m, v);
    return st;
}
