// Training checkpoints: everything a run needs to continue bit for bit.
//
// File layout (little endian):
//   char magic[8] = "MAMBACK1"
//   uint64 header_bytes, then a JSON header: model config, step, tokens seen, parameter
//     count, loader state size, the decay-mixture loader's state if any, and the list of
//     optimizer state arrays ("optimizer": [[name, floats], ...]; AdamW m and v when absent;
//     AdamW's m and v hold the elements of the tensors it updates only, in its items' order)
//   the loader state (raw bytes of DataLoader::State)
//   float master[n], then each optimizer state array in the listed order
// A run of W > 1 ranks (ZeRO-1) writes each rank's optimizer arrays to NAME.rankR-of-W
// (the same layout: magic, JSON header, arrays) and lists none in the main file, whose
// header records W; the main file is written last, after every rank's file.
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
    long tokens = 0;             // tokens trained on (the schedule's clock when it counts tokens)
    DataLoader::State loader{};
    bool has_mix = false;        // a second data mixture (WSD decay phase) and its position
    DataLoader::State mix_loader{};
};

// optimizer state: named float arrays, saved after the master weights in this order
using OptState = std::vector<std::pair<std::string, std::vector<float>>>;

inline OptState adamw_state(const AdamW& opt) {
    OptState st(2);
    st[0].first = "adamw.m"; st[1].first = "adamw.v";
    opt.get_state(st[0].second, st[1].second);
    return st;
}

static const char kCheckpointMagic[8] = {'M', 'A', 'M', 'B', 'A', 'C', 'K', '1'};

inline std::string checkpoint_name(const std::string& dir, int step) {
    char name[64];
    snprintf(name, sizeof(name), "step_%08d.ckpt", step);
    return dir + "/" + name;
}
inline std::string checkpoint_shard_name(const std::string& path, int rank, int world) {
    return path + ".rank" + std::to_string(rank) + "-of-" + std::to_string(world);
}

inline nlohmann::json opt_arrays(const OptState& opt) {
    nlohmann::json arrays = nlohmann::json::array();
    for (auto& [n, v] : opt) arrays.push_back({n, v.size()});
    return arrays;
}

// magic, header, then the raw parts, to path.tmp, flushed, renamed to path
inline void write_atomic(const std::string& path, const nlohmann::json& h,
                         const std::vector<std::pair<const void*, size_t>>& parts) {
    const std::string tmp = path + ".tmp", header = h.dump();
    uint64_t header_bytes = header.size();
    FILE* f = fopen_or_throw(tmp, "wb");
    fwrite_or_throw(kCheckpointMagic, 1, 8, f, tmp);
    fwrite_or_throw(&header_bytes, sizeof(header_bytes), 1, f, tmp);
    fwrite_or_throw(header.data(), 1, header.size(), f, tmp);
    for (auto& [p, n] : parts) fwrite_or_throw(p, 1, n, f, tmp);
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) THROW("cannot flush checkpoint '%s'", tmp.c_str());
    fclose(f);
    std::filesystem::rename(tmp, path);
}

// Writes this rank's part of a checkpoint and returns the main file's path. With several
// ranks, `barrier` runs between the ranks' optimizer files and rank 0's main file, and the
// model's master weights must be complete on rank 0.
template <typename Barrier>
inline std::string checkpoint_save(const std::string& dir, const TrainState& st, const Model& model,
                                   const OptState& opt, const ModelConfig& cfg, int rank, int world, Barrier&& barrier) {
    std::filesystem::create_directories(dir);
    const std::string path = checkpoint_name(dir, st.step);
    std::vector<std::pair<const void*, size_t>> arrays;
    for (auto& [n, v] : opt) arrays.push_back({v.data(), v.size() * sizeof(float)});
    if (world > 1) {
        write_atomic(checkpoint_shard_name(path, rank, world),
                     {{"rank", rank}, {"world", world}, {"step", st.step}, {"optimizer", opt_arrays(opt)}}, arrays);
        barrier();
        arrays.clear();
    }
    if (rank == 0) {
        nlohmann::json h = {{"config", model_config_to_json(cfg)}, {"step", st.step}, {"tokens", st.tokens},
                            {"num_params", model.layout.total}, {"loader_state_bytes", sizeof(st.loader)},
                            {"world", world}, {"optimizer", world > 1 ? nlohmann::json::array() : opt_arrays(opt)}};
        if (st.has_mix) h["mix_loader"] = {st.mix_loader.epoch, st.mix_loader.position};
        std::vector<float> master = model.get_master();
        arrays.insert(arrays.begin(), {{&st.loader, sizeof(st.loader)}, {master.data(), master.size() * sizeof(float)}});
        write_atomic(path, h, arrays);
    }
    barrier();  // no rank reads the checkpoint before it exists
    return path;
}

inline std::string checkpoint_save(const std::string& dir, const TrainState& st, const Model& model,
                                   const OptState& opt, const ModelConfig& cfg) {
    return checkpoint_save(dir, st, model, opt, cfg, 0, 1, [] {});
}

inline std::string checkpoint_save(const std::string& dir, const TrainState& st, const Model& model, const AdamW& opt,
                                   const ModelConfig& cfg) {
    return checkpoint_save(dir, st, model, adamw_state(opt), cfg);
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

// Loads the weights into `model` and returns the training state; `opt` receives the
// optimizer arrays, which must have the names and sizes it is given with (a run with another
// optimizer set-up is refused, naming what differs).
inline TrainState checkpoint_load(const std::string& path, Model& model, OptState& opt, const ModelConfig& cfg,
                                  int rank = 0, int world = 1) {
    FILE* f = nullptr;
    nlohmann::json h = checkpoint_header(path, &f);
    const int saved_world = h.value("world", 1);
    if (saved_world != world) {
        fclose(f);
        THROW("checkpoint '%s' was written by %d rank(s), with the optimizer state sharded among them; resume it "
              "with mpirun -np %d (this run has %d)", path.c_str(), saved_world, saved_world, world);
    }
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
    FILE* fo = f;  // where the optimizer arrays are: this file, or this rank's own
    nlohmann::json arrays = h.value("optimizer", nlohmann::json::array({{"adamw.m", n}, {"adamw.v", n}}));
    if (world > 1) {
        const std::string shard = checkpoint_shard_name(path, rank, world);
        arrays = checkpoint_header(shard, &fo)["optimizer"];
    }
    std::string have, want;
    for (auto& a : arrays) have += a[0].get<std::string>() + "(" + std::to_string(a[1].get<size_t>()) + ") ";
    for (auto& [name, v] : opt) want += name + "(" + std::to_string(v.size()) + ") ";
    if (have != want) {
        fclose(f);
        if (fo != f) fclose(fo);
        THROW("checkpoint '%s' holds optimizer state %sbut this run needs %s(AdamW's m and v cover only the "
              "tensors AdamW updates: their size follows from the model, --optimizer and the ranks)", path.c_str(),
              have.c_str(), want.c_str());
    }
    TrainState st;
    st.step = h["step"].get<int>();
    st.tokens = h.value("tokens", 0L);
    if (h.contains("mix_loader")) {
        st.has_mix = true;
        st.mix_loader = {h["mix_loader"][0].get<uint64_t>(), h["mix_loader"][1].get<uint64_t>()};
    }
    fread_or_throw(&st.loader, sizeof(st.loader), 1, f, path);
    std::vector<float> master(n);
    fread_or_throw(master.data(), sizeof(float), n, f, path);
    for (auto& [name, v] : opt) fread_or_throw(v.data(), sizeof(float), v.size(), fo, path);
    fclose(f);
    if (fo != f) fclose(fo);
    model.set_master(master);
    return st;
}

inline TrainState checkpoint_load(const std::string& path, Model& model, AdamW& opt, const ModelConfig& cfg) {
    OptState st = adamw_state(opt);
    TrainState ts = checkpoint_load(path, model, st, cfg);
    opt.set_state(st[0].second, st[1].second);
    return ts;
}
