// Training checkpoints: everything a run needs to continue bit for bit, and the one reader
// that train_mamba (--resume) and finetune_mamba (--init, --generate) share.
//
// File layout (little endian):
//   char magic[8] = "MAMBACK1"
//   uint64 header_bytes, then a JSON header: model config, step, tokens seen, parameter
//     count, loader state size, the decay-mixture loader's state if any, the list of
//     optimizer state arrays ("optimizer": [[name, floats], ...]; AdamW's m and v hold the
//     elements of the tensors it updates only, in its items' order), the number of ranks
//     that wrote it, and a checksum of the payload
//   the payload: the loader state (raw bytes of DataLoader::State), float master[n], then
//     each optimizer state array in the listed order
// A run of W > 1 ranks (ZeRO) writes each rank's part to NAME.rankR-of-W (the same layout:
// magic, JSON header with "master": [begin, end), its range of the parameter buffer, then the
// fp32 master weights of that range and the rank's optimizer arrays); the main file records W
// and the ranks' ranges ("master_shards": [bounds...]) and holds the loader state only. It is
// written last, after every rank's file. (Files from before the master weights were sharded
// hold them whole in the main file; they still load.)
// Files are written to NAME.tmp and renamed (a crash never leaves a torn checkpoint; a
// failed write removes the .tmp). A reader checks the header's fields and types, the file's
// size against them, and the checksum, and names the file in every error.
#pragma once
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "common.h"
#include "mamba.cuh"
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

static const char kCheckpointMagic[8] = {'M', 'A', 'M', 'B', 'A', 'C', 'K', '1'};

inline std::string checkpoint_name(const std::string& dir, int step) {
    char name[64];
    snprintf(name, sizeof(name), "step_%08d.ckpt", step);
    return dir + "/" + name;
}
inline std::string checkpoint_shard_name(const std::string& path, int rank, int world) {
    return path + ".rank" + std::to_string(rank) + "-of-" + std::to_string(world);
}

// 64-bit checksum of the payload, 8 bytes at a time (a multiply-rotate mix: fast, and any
// flipped or moved word changes it)
struct Checksum {
    uint64_t h = 0x9E3779B97F4A7C15ULL;
    void add(const void* p, size_t n) {
        const unsigned char* b = (const unsigned char*)p;
        size_t i = 0;
        for (; i + 8 <= n; i += 8) {
            uint64_t w;
            memcpy(&w, b + i, 8);
            mix(w);
        }
        uint64_t tail = 0;
        memcpy(&tail, b + i, n - i);
        mix(tail ^ ((uint64_t)(n - i) << 56));
    }
    void mix(uint64_t w) {
        h ^= w * 0xBF58476D1CE4E5B9ULL;
        h = (h << 31 | h >> 33) * 0x94D049BB133111EBULL;
    }
    std::string hex() const { return strformat("%016llx", (unsigned long long)h); }
};

using Parts = std::vector<std::pair<const void*, size_t>>;

inline nlohmann::json opt_arrays(const OptState& opt) {
    nlohmann::json arrays = nlohmann::json::array();
    for (auto& [n, v] : opt) arrays.push_back({n, v.size()});
    return arrays;
}

// magic, header (with the payload's checksum), then the payload parts, written atomically
inline void write_atomic(const std::string& path, nlohmann::json h, const Parts& parts) {
    Checksum sum;
    for (auto& [p, n] : parts) sum.add(p, n);
    h["checksum"] = sum.hex();
    const std::string header = h.dump();
    const uint64_t header_bytes = header.size();
    write_file_atomically(path, [&](FILE* f, const std::string& tmp) {
        fwrite_or_throw(kCheckpointMagic, 1, 8, f, tmp);
        fwrite_or_throw(&header_bytes, sizeof(header_bytes), 1, f, tmp);
        fwrite_or_throw(header.data(), 1, header.size(), f, tmp);
        for (auto& [p, n] : parts) fwrite_or_throw(p, 1, n, f, tmp);
    });
}

// Master weights of `n` values as this build lays them out: a checkpoint written before tensors were aligned
// (params.h's PARAM_ALIGN) holds them packed, tensor after tensor, and each moves to its aligned place
inline bool checkpoint_packed(const ModelConfig& cfg, size_t n) {
    return n != ParamLayout(cfg).total && n == ParamLayout(cfg, 1).total;
}
inline void check_param_count(const std::string& path, const ModelConfig& cfg, size_t n) {
    const size_t aligned = ParamLayout(cfg).total, packed = ParamLayout(cfg, 1).total;
    if (n != aligned && n != packed)
        THROW("checkpoint '%s' holds %zu parameters; this build lays its config out in %zu (or %zu packed, as "
              "builds before 2026-12-07 wrote them)", path.c_str(), n, aligned, packed);
}
inline std::vector<float> unpack_master(const std::vector<float>& m, const ModelConfig& cfg) {
    const ParamLayout now(cfg), packed(cfg, 1);
    if (m.size() != packed.total || packed.total == now.total) return m;  // this build's layout (check_param_count)
    std::vector<float> out(now.total, 0.0f);
    for (size_t k = 0; k < now.tensors.size(); k++) {
        const TensorInfo &a = packed.tensors[k], &b = now.tensors[k];
        std::copy(m.begin() + a.offset, m.begin() + a.offset + a.count, out.begin() + b.offset);
    }
    return out;
}

// the ranks' ranges of a model's parameter buffer (zero.h)
inline std::vector<size_t> checkpoint_bounds(const ModelConfig& cfg, int world) { return param_ranges(ParamLayout(cfg), world); }

// Writes this rank's part of a checkpoint and returns the main file's path: `master` holds
// the fp32 master weights of the rank's range (one rank: all of them). With several ranks,
// `barrier` runs between the ranks' files and rank 0's main file.
template <typename Barrier>
inline std::string checkpoint_save(const std::string& dir, const TrainState& st, const std::vector<float>& master,
                                   const OptState& opt, const ModelConfig& cfg, int rank, int world, Barrier&& barrier) {
    const std::vector<size_t> bounds = checkpoint_bounds(cfg, world);
    if (master.size() != bounds[rank + 1] - bounds[rank])
        THROW("checkpoint: rank %d of %d saves %zu master weights, its range holds %zu", rank, world, master.size(),
              bounds[rank + 1] - bounds[rank]);
    std::filesystem::create_directories(dir);
    const std::string path = checkpoint_name(dir, st.step);
    Parts parts = {{master.data(), master.size() * sizeof(float)}};
    for (auto& [n, v] : opt) parts.push_back({v.data(), v.size() * sizeof(float)});
    if (world > 1) {
        write_atomic(checkpoint_shard_name(path, rank, world),
                     {{"rank", rank}, {"world", world}, {"step", st.step}, {"master", {bounds[rank], bounds[rank + 1]}},
                      {"optimizer", opt_arrays(opt)}}, parts);
        barrier();
        parts.clear();
    }
    if (rank == 0) {
        nlohmann::json h = {{"config", model_config_to_json(cfg)}, {"step", st.step}, {"tokens", st.tokens},
                            {"num_params", bounds.back()}, {"loader_state_bytes", sizeof(st.loader)},
                            {"world", world}, {"optimizer", world > 1 ? nlohmann::json::array() : opt_arrays(opt)}};
        if (world > 1) h["master_shards"] = bounds;
        if (st.has_mix) h["mix_loader"] = {st.mix_loader.epoch, st.mix_loader.position};
        parts.insert(parts.begin(), {&st.loader, sizeof(st.loader)});
        write_atomic(path, h, parts);
    }
    barrier();  // no rank reads the checkpoint before it exists
    return path;
}

// a checkpoint file, or a directory: its step_NNNNNNNN.ckpt of the highest step (parsed, so
// step_100000000 comes after step_99999999 and a stray step_final.ckpt is no candidate)
inline std::string checkpoint_resolve(const std::string& path) {
    std::error_code ec;
    if (!std::filesystem::is_directory(path, ec)) {
        require_regular_file(path, "checkpoint");
        return path;
    }
    std::string best;
    long best_step = -1;
    for (auto& e : std::filesystem::directory_iterator(path)) {
        const std::string n = e.path().filename().string();
        if (n.size() < 11 || n.rfind("step_", 0) != 0 || n.substr(n.size() - 5) != ".ckpt") continue;
        const std::string digits = n.substr(5, n.size() - 10);
        if (digits.empty() || digits.size() > 12 || digits.find_first_not_of("0123456789") != std::string::npos) continue;
        const long step = std::stol(digits);
        if (step > best_step) { best_step = step; best = e.path().string(); }
    }
    if (best.empty()) THROW("no step_NNNNNNNN.ckpt checkpoint in directory '%s'", path.c_str());
    return best;
}

// One open checkpoint file (main or rank shard): its header, checked, and its payload.
struct CheckpointFile {
    std::string path;
    nlohmann::json h;
    std::vector<std::pair<std::string, size_t>> arrays;  // optimizer arrays: name, floats
    std::vector<size_t> shards;        // main file of several ranks: their ranges (empty: the master weights are here)
    size_t master_begin = 0, master_end = 0;  // a rank's file: the range of its master weights (none: empty)
    FILE* f = nullptr;
    Checksum sum;

    CheckpointFile(const CheckpointFile&) = delete;
    CheckpointFile& operator=(const CheckpointFile&) = delete;
    ~CheckpointFile() { if (f) fclose(f); }

    // opens and checks the header; `main`: a main file (config, loader, master weights), else
    // a rank's optimizer file
    CheckpointFile(const std::string& p, bool main) : path(p) {
        f = fopen_or_throw(path, "rb");
        try {
            check_header(main);
        } catch (...) {
            fclose(f);
            f = nullptr;
            throw;
        }
    }
    void check_header(bool main) {
        char magic[8];
        fread_or_throw(magic, 1, 8, f, path);
        if (memcmp(magic, kCheckpointMagic, 8) != 0) THROW("'%s' is not a mamba.cu checkpoint (bad magic)", path.c_str());
        uint64_t header_bytes;
        fread_or_throw(&header_bytes, sizeof(header_bytes), 1, f, path);
        if (header_bytes > (1u << 20)) THROW("checkpoint '%s' has a corrupt header size %llu", path.c_str(), (unsigned long long)header_bytes);
        std::string header(header_bytes, '\0');
        fread_or_throw(header.data(), 1, header_bytes, f, path);
        try {
            h = nlohmann::json::parse(header);
        } catch (const std::exception& e) {
            THROW("checkpoint '%s' has a corrupt header: %s", path.c_str(), e.what());
        }
        auto bad = [&](const std::string& what) { THROW("checkpoint '%s': corrupt header: %s", path.c_str(), what.c_str()); };
        if (!h.is_object()) bad("not a JSON object");
        auto need_int = [&](const char* k, long lo) {
            if (!h.contains(k) || !h[k].is_number_integer() || h[k].get<long>() < lo)
                bad(strformat("'%s' must be an integer >= %ld", k, lo));
            return h[k].get<long>();
        };
        need_int("step", 0);
        need_int("world", 1);
        if (main) {
            if (!h.contains("config") || !h["config"].is_object()) bad("no model config");
            need_int("tokens", 0);
            need_int("num_params", 1);
            if (need_int("loader_state_bytes", 0) != (long)sizeof(DataLoader::State))
                bad("its loader state is not this build's");
        }
        if (!h.contains("optimizer") || !h["optimizer"].is_array()) bad("no optimizer array list");
        for (auto& a : h["optimizer"]) {
            if (!a.is_array() || a.size() != 2 || !a[0].is_string() || !a[1].is_number_unsigned())
                bad("optimizer arrays must be [name, floats] pairs");
            arrays.push_back({a[0].get<std::string>(), a[1].get<size_t>()});
        }
        if (h.contains("mix_loader") && !(h["mix_loader"].is_array() && h["mix_loader"].size() == 2 &&
                                           h["mix_loader"][0].is_number_unsigned() && h["mix_loader"][1].is_number_unsigned()))
            bad("'mix_loader' must be [epoch, position]");
        auto offsets = [&](const char* k) {
            std::vector<size_t> v;
            if (!h[k].is_array()) bad(strformat("'%s' must be a list of offsets", k));
            for (auto& x : h[k]) {
                if (!x.is_number_unsigned() || (!v.empty() && x.get<size_t>() < v.back()))
                    bad(strformat("'%s' must be ascending offsets", k));
                v.push_back(x.get<size_t>());
            }
            return v;
        };
        if (main && h.contains("master_shards")) {
            shards = offsets("master_shards");
            if (shards.size() != h["world"].get<size_t>() + 1 || shards.size() < 3 || shards.front() != 0 ||
                shards.back() != h["num_params"].get<size_t>())
                bad("'master_shards' must cut [0, num_params) into 'world' ranges");
        }
        if (!main && h.contains("master")) {
            const std::vector<size_t> m = offsets("master");
            if (m.size() != 2) bad("'master' must be [begin, end]");
            master_begin = m[0];
            master_end = m[1];
        }
        // the file holds exactly what the header lists
        size_t payload = (master_end - master_begin) * sizeof(float);
        if (main) payload += sizeof(DataLoader::State) + (shards.empty() ? h["num_params"].get<size_t>() * sizeof(float) : 0);
        for (auto& a : arrays) payload += a.second * sizeof(float);
        const size_t expect = 16 + header_bytes + payload;
        const size_t have = std::filesystem::file_size(path);
        if (have != expect)
            THROW("checkpoint '%s' is %zu bytes, its header describes %zu (%s)", path.c_str(), have, expect,
                  have < expect ? "truncated" : "trailing bytes");
    }
    void read(void* dst, size_t bytes) {
        fread_or_throw(dst, 1, bytes, f, path);
        sum.add(dst, bytes);
    }
    // after the whole payload is read: the checksum (files from before it was written have none)
    void verify() {
        if (h.contains("checksum") && h["checksum"] != sum.hex())
            THROW("checkpoint '%s' is corrupt: its payload's checksum %s is not the header's %s", path.c_str(),
                  sum.hex().c_str(), h["checksum"].dump().c_str());
    }
};

// A checkpoint's model config: what it was written with (the config must round-trip)
inline ModelConfig checkpoint_config(const CheckpointFile& ck) {
    ModelConfig c = model_config_from_json(ck.h["config"], ck.path);
    if (model_config_to_json(c) != ck.h["config"])
        THROW("checkpoint '%s': its config %s does not round-trip (%s)", ck.path.c_str(), ck.h["config"].dump().c_str(),
              model_config_to_json(c).dump().c_str());
    return c;
}

// A rank's file belongs to its main file: the same step and ranks, the rank's range
inline void checkpoint_check_shard(const CheckpointFile& main, const CheckpointFile& shard, int rank) {
    const size_t b = main.shards.empty() ? 0 : main.shards[rank], e = main.shards.empty() ? 0 : main.shards[rank + 1];
    if (shard.h["step"] != main.h["step"] || shard.h["world"] != main.h["world"] || !shard.h.contains("rank") ||
        shard.h["rank"] != rank || shard.master_begin != b || shard.master_end != e)
        THROW("checkpoint '%s' does not belong to '%s' (its step %s, rank %s of %s, master weights [%zu, %zu); the main "
              "file gives step %s, rank %d of %s, [%zu, %zu))", shard.path.c_str(), main.path.c_str(),
              shard.h["step"].dump().c_str(), shard.h.value("rank", nlohmann::json()).dump().c_str(),
              shard.h["world"].dump().c_str(), shard.master_begin, shard.master_end, main.h["step"].dump().c_str(), rank,
              main.h["world"].dump().c_str(), b, e);
}

// The model config and fp32 master weights of a checkpoint file, and its step (fine-tuning
// and generation start from these; the master weights of several ranks are gathered from their
// files; the optimizer state is not read, the checksums are not checked: they cover the arrays
// that are skipped).
inline std::vector<float> checkpoint_weights(const std::string& path, ModelConfig& cfg, int& step) {
    CheckpointFile ck(path, true);
    cfg = checkpoint_config(ck);
    const size_t n = ck.h["num_params"].get<size_t>();
    check_param_count(path, cfg, n);
    step = ck.h["step"].get<int>();
    DataLoader::State loader;
    ck.read(&loader, sizeof(loader));
    std::vector<float> master(n);
    if (ck.shards.empty()) {
        ck.read(master.data(), n * sizeof(float));
        return unpack_master(master, cfg);
    }
    const int world = ck.h["world"].get<int>();
    for (int r = 0; r < world; r++) {
        CheckpointFile shard(checkpoint_shard_name(path, r, world), false);
        checkpoint_check_shard(ck, shard, r);
        shard.read(master.data() + ck.shards[r], (ck.shards[r + 1] - ck.shards[r]) * sizeof(float));
    }
    return unpack_master(master, cfg);
}
// Checks that a checkpoint can resume this run (same model, ranks and optimizer set-up)
// without loading it: train_mamba does this before it sets up the GPU.
inline void checkpoint_check(const std::string& path, const ModelConfig& cfg, const ArraySizes& opt, int rank, int world) {
    CheckpointFile ck(path, true);
    const int saved_world = ck.h["world"].get<int>();
    if (saved_world != world)
        THROW("checkpoint '%s' was written by %d rank(s), with the master weights and optimizer state sharded among "
              "them; resume it with mpirun -np %d (this run has %d)", path.c_str(), saved_world, saved_world, world);
    if (ck.h["config"] != model_config_to_json(cfg))
        THROW("checkpoint '%s' holds model %s, but this run builds %s", path.c_str(), ck.h["config"].dump().c_str(),
              model_config_to_json(cfg).dump().c_str());
    const size_t n = ck.h["num_params"].get<size_t>();
    check_param_count(path, cfg, n);
    if (checkpoint_packed(cfg, n) && world > 1)  // its ranks' ranges and optimizer arrays cut the packed buffer
        THROW("checkpoint '%s' holds its tensors packed, as builds before 2026-12-07 wrote them, and its %d ranks' "
              "ranges and optimizer state cut that layout: it cannot resume here. Its weights still load: "
              "finetune_mamba --init, or convert_hf export and train_mamba --init-from", path.c_str(), world);
    std::vector<std::pair<std::string, size_t>> have = ck.arrays;
    if (world > 1) {
        if (!ck.shards.empty() && ck.shards != checkpoint_bounds(cfg, world))
            THROW("checkpoint '%s': its ranks' ranges %s are not this build's for %d ranks", path.c_str(),
                  ck.h["master_shards"].dump().c_str(), world);
        CheckpointFile shard(checkpoint_shard_name(path, rank, world), false);
        checkpoint_check_shard(ck, shard, rank);
        have = shard.arrays;
    }
    std::string h, w;
    for (auto& [name, count] : have) h += name + "(" + std::to_string(count) + ") ";
    for (auto& [name, count] : opt) w += name + "(" + std::to_string(count) + ") ";
    if (h != w)
        THROW("checkpoint '%s' holds optimizer state %sbut this run needs %s(AdamW's m and v cover only the "
              "tensors AdamW updates: their size follows from the model, --optimizer and the ranks)", path.c_str(),
              h.c_str(), w.c_str());
}

// Loads a checkpoint to resume rank `rank` of `world`: the master weights of its range
// (returned; one rank: all), its optimizer arrays into `opt` (which has the names and sizes
// this run needs) and the training state.
inline std::vector<float> checkpoint_load(const std::string& path, TrainState& st, OptState& opt,
                                          const ModelConfig& cfg, int rank = 0, int world = 1) {
    ArraySizes sizes;
    for (auto& [name, v] : opt) sizes.push_back({name, v.size()});
    checkpoint_check(path, cfg, sizes, rank, world);
    const std::vector<size_t> bounds = checkpoint_bounds(cfg, world);
    CheckpointFile ck(path, true);
    st = TrainState{};
    st.step = ck.h["step"].get<int>();
    st.tokens = ck.h["tokens"].get<long>();
    if (ck.h.contains("mix_loader")) {
        st.has_mix = true;
        st.mix_loader = {ck.h["mix_loader"][0].get<uint64_t>(), ck.h["mix_loader"][1].get<uint64_t>()};
    }
    ck.read(&st.loader, sizeof(st.loader));
    std::vector<float> master(bounds[rank + 1] - bounds[rank]);
    if (world == 1) {
        master.resize(ck.h["num_params"].get<size_t>());  // (packed: fewer)
        ck.read(master.data(), master.size() * sizeof(float));
        for (auto& [name, v] : opt) ck.read(v.data(), v.size() * sizeof(float));
        ck.verify();
        return unpack_master(master, cfg);
    }
    CheckpointFile shard(checkpoint_shard_name(path, rank, world), false);
    if (ck.shards.empty()) {  // written before the master weights were sharded: all of them here
        std::vector<float> all(bounds.back());
        ck.read(all.data(), all.size() * sizeof(float));
        std::copy(all.begin() + bounds[rank], all.begin() + bounds[rank + 1], master.begin());
    } else {
        shard.read(master.data(), master.size() * sizeof(float));
    }
    ck.verify();
    for (auto& [name, v] : opt) shard.read(v.data(), v.size() * sizeof(float));
    shard.verify();
    return master;
}
