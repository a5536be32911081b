// Safetensors files (no CUDA): the format Hugging Face models ship their weights in.
//
// A file is an 8-byte little-endian header length N, then N bytes of JSON, then the raw
// tensors (little endian, row-major). The JSON maps each tensor's name to
//   {"dtype": "F32" | "F16" | "BF16" | ..., "shape": [d0, d1, ...], "data_offsets": [begin, end]}
// (offsets into the data that follows the header) and may hold "__metadata__", a map of
// strings. A model too large for one file is split into shards beside an index,
// model.safetensors.index.json: {"metadata": {"total_size": bytes}, "weight_map": {name: file}}.
//
// Reading maps each file into memory (nothing is read until a tensor is asked for) and
// checks the whole header first: a truncated file, an offset outside the data, a size that
// does not match the shape, or a dtype other than F32, F16 and BF16 is an error naming the
// file and the tensor. Writing converts fp32 values to the chosen dtype (round to nearest
// even) and writes tensors in the order given, contiguous, with the header padded to 8 bytes.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <nlohmann/json.hpp>
#include "common.h"

enum class Dtype { F32, F16, BF16 };

inline const char* dtype_name(Dtype d) { return d == Dtype::F32 ? "F32" : d == Dtype::F16 ? "F16" : "BF16"; }
inline size_t dtype_bytes(Dtype d) { return d == Dtype::F32 ? 4 : 2; }
// from a safetensors dtype name; false for one this engine does not read
inline bool dtype_from_name(const std::string& s, Dtype& d) {
    if (s == "F32") d = Dtype::F32;
    else if (s == "F16") d = Dtype::F16;
    else if (s == "BF16") d = Dtype::BF16;
    else return false;
    return true;
}
// --dtype flag values and config.json's torch_dtype names
inline Dtype dtype_from_flag(const std::string& s) {
    if (s == "fp32" || s == "float32") return Dtype::F32;
    if (s == "fp16" || s == "float16") return Dtype::F16;
    if (s == "bf16" || s == "bfloat16") return Dtype::BF16;
    THROW("unknown dtype '%s' (fp32, bf16, fp16)", s.c_str());
}
inline const char* torch_dtype_name(Dtype d) {
    return d == Dtype::F32 ? "float32" : d == Dtype::F16 ? "float16" : "bfloat16";
}

// ---- scalar conversions (bit exact, no hardware half types needed)

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays a (quiet) NaN
    u += 0x7fffu + ((u >> 16) & 1);  // round to nearest even
    return (uint16_t)(u >> 16);
}
inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t u;
    if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);  // inf, NaN
    else if (exp != 0) u = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0) u = sign;
    else {  // subnormal: value = man * 2^-24
        float f = (float)man * 5.9604644775390625e-8f;
        memcpy(&u, &f, 4);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00;                // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00;               // rounds to >= 65520: inf
    if (a >= 0x38800000u) {                                   // normal half
        uint32_t v = a - (112u << 23);
        v += 0xfffu + ((v >> 13) & 1);                        // round to nearest even
        return sign | (uint16_t)(v >> 13);
    }
    if (a < 0x33000000u) return sign;                         // below half the smallest subnormal
    // subnormal: shift the 24-bit significand into place, rounding to nearest even
    const uint32_t e = a >> 23, m = (a & 0x7fffff) | 0x800000, shift = 126 - e;  // 14..24
    uint32_t v = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (v & 1))) v++;
    return sign | (uint16_t)v;
}

// ---- reading

struct StTensor {
    std::string name;
    Dtype dtype = Dtype::F32;
    std::vector<int64_t> shape;
    const unsigned char* data = nullptr;  // inside the mapped file
    size_t bytes = 0;
    std::string file;                     // for messages
    size_t numel() const {
        size_t n = 1;
        for (int64_t s : shape) n *= (size_t)s;
        return n;
    }
};

inline std::string shape_str(const std::vector<int64_t>& s) {
    std::string r = "[";
    for (size_t i = 0; i < s.size(); i++) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + "]";
}

// n values of a tensor as fp32, from element `first` on
inline void st_to_f32(const StTensor& t, size_t first, size_t n, float* out) {
    const unsigned char* p = t.data + first * dtype_bytes(t.dtype);
    if (t.dtype == Dtype::F32) { memcpy(out, p, n * 4); return; }
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        out[i] = t.dtype == Dtype::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
}

// One safetensors file, memory-mapped, its header checked.
class SafetensorsFile {
public:
    explicit SafetensorsFile(const std::string& path) : path_(path) {
        require_regular_file(path, "safetensors file");
        const int fd = open(path.c_str(), O_RDONLY);
        if (fd < 0) THROW("cannot open '%s': %s", path.c_str(), std::strerror(errno));
        struct stat st;
        if (fstat(fd, &st) != 0) { close(fd); THROW("cannot stat '%s': %s", path.c_str(), std::strerror(errno)); }
        size_ = (size_t)st.st_size;
        if (size_ > 0) {
            void* m = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
            if (m == MAP_FAILED) { close(fd); THROW("cannot map '%s': %s", path.c_str(), std::strerror(errno)); }
            map_ = (const unsigned char*)m;
        }
        close(fd);
        try {
            parse();
        } catch (...) {
            unmap();
            throw;
        }
    }
    ~SafetensorsFile() { unmap(); }
    SafetensorsFile(const SafetensorsFile&) = delete;
    SafetensorsFile& operator=(const SafetensorsFile&) = delete;

    const std::string& path() const { return path_; }
    const std::map<std::string, StTensor>& tensors() const { return tensors_; }
    const std::map<std::string, std::string>& metadata() const { return metadata_; }
    const StTensor* find(const std::string& name) const {
        auto it = tensors_.find(name);
        return it == tensors_.end() ? nullptr : &it->second;
    }

private:
    std::string path_;
    const unsigned char* map_ = nullptr;
    size_t size_ = 0;
    std::map<std::string, StTensor> tensors_;
    std::map<std::string, std::string> metadata_;

    void unmap() {
        if (map_) munmap((void*)map_, size_);
        map_ = nullptr;
    }

    void parse() {
        const char* p = path_.c_str();
        if (size_ < 8) THROW("safetensors file '%s' is truncated: %zu bytes, not even the 8-byte header length", p, size_);
        uint64_t n;
        memcpy(&n, map_, 8);
        if (n > size_ - 8)
            THROW("safetensors file '%s' is truncated: its header is %llu bytes but only %zu follow", p,
                  (unsigned long long)n, size_ - 8);
        nlohmann::json h;
        try {
            h = nlohmann::json::parse(std::string((const char*)map_ + 8, n));
        } catch (const std::exception& e) {
            THROW("safetensors file '%s' has a header that is not JSON: %s", p, e.what());
        }
        if (!h.is_object()) THROW("safetensors file '%s': the header is not a JSON object", p);
        const size_t data_size = size_ - 8 - n;
        const unsigned char* data = map_ + 8 + n;
        for (auto it = h.begin(); it != h.end(); ++it) {
            const std::string& name = it.key();
            const nlohmann::json& v = it.value();
            if (name == "__metadata__") {
                if (!v.is_object()) THROW("safetensors file '%s': __metadata__ is not an object", p);
                for (auto m = v.begin(); m != v.end(); ++m)
                    if (m.value().is_string()) metadata_[m.key()] = m.value().get<std::string>();
                continue;
            }
            auto bad = [&](const std::string& why) { THROW("safetensors file '%s': tensor '%s' %s", p, name.c_str(), why.c_str()); };
            if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
                bad("needs dtype, shape and data_offsets");
            StTensor t;
            t.name = name;
            t.file = path_;
            if (!v["dtype"].is_string()) bad("has a dtype that is not a string");
            const std::string dt = v["dtype"].get<std::string>();
            if (!dtype_from_name(dt, t.dtype)) bad("has dtype " + dt + ", which is not one of F32, F16, BF16");
            if (!v["shape"].is_array()) bad("has a shape that is not a list");
            for (auto& d : v["shape"]) {
                if (!d.is_number_unsigned()) bad("has a shape " + v["shape"].dump() + " that is not a list of sizes");
                t.shape.push_back(d.get<int64_t>());
            }
            const auto& off = v["data_offsets"];
            if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
                bad("has data_offsets that are not [begin, end]");
            const uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
            if (b > e) bad(strformat("has data_offsets [%llu, %llu] that run backwards", (unsigned long long)b, (unsigned long long)e));
            if (e > data_size)
                THROW("safetensors file '%s' is truncated: tensor '%s' needs data bytes [%llu, %llu) but the file holds %zu",
                      p, name.c_str(), (unsigned long long)b, (unsigned long long)e, data_size);
            double elems = 1;  // in double first: a shape's product must not wrap
            for (int64_t s : t.shape) elems *= (double)s;
            if (elems * dtype_bytes(t.dtype) != (double)(e - b))
                bad(strformat("has %llu bytes, but shape %s of %s needs %.0f", (unsigned long long)(e - b),
                              shape_str(t.shape).c_str(), dt.c_str(), elems * dtype_bytes(t.dtype)));
            t.data = data + b;
            t.bytes = e - b;
            tensors_[name] = t;
        }
    }
};

// The weights of a model directory: model.safetensors, or the shards that
// model.safetensors.index.json lists (or a single .safetensors file given by path).
class SafetensorsModel {
public:
    explicit SafetensorsModel(const std::string& path) : where_(path) {
        namespace fs = std::filesystem;
        std::error_code ec;
        if (!fs::is_directory(path, ec)) { add_file(path); return; }
        const std::string index = path + "/model.safetensors.index.json";
        if (fs::exists(index)) {
            std::ifstream f(index);
            if (!f) THROW("cannot open '%s'", index.c_str());
            nlohmann::json j;
            try { j = nlohmann::json::parse(f); } catch (const std::exception& e) {
                THROW("'%s' is not valid JSON: %s", index.c_str(), e.what());
            }
            if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
                THROW("'%s' has no weight_map object", index.c_str());
            std::map<std::string, size_t> opened;
            for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
                if (!it.value().is_string()) THROW("'%s': weight_map['%s'] is not a file name", index.c_str(), it.key().c_str());
                const std::string file = it.value().get<std::string>();
                if (file.find('/') != std::string::npos) THROW("'%s': shard name '%s' is not a plain file name", index.c_str(), file.c_str());
                if (!opened.count(file)) { opened[file] = files_.size(); add_file(path + "/" + file); }
                const SafetensorsFile& shard = *files_[opened[file]];
                const StTensor* t = shard.find(it.key());
                if (!t) THROW("'%s' lists tensor '%s' in '%s', which does not hold it", index.c_str(), it.key().c_str(), shard.path().c_str());
                tensors_[it.key()] = t;
            }
            return;
        }
        if (fs::exists(path + "/model.safetensors")) { add_file(path + "/model.safetensors"); return; }
        THROW("'%s' has neither model.safetensors nor model.safetensors.index.json (a pytorch_model.bin must be "
              "converted first: test/hf_fixture.py --to-safetensors)", path.c_str());
    }

    const StTensor* find(const std::string& name) const {
        auto it = tensors_.find(name);
        return it == tensors_.end() ? nullptr : it->second;
    }
    const StTensor& get(const std::string& name) const {
        const StTensor* t = find(name);
        if (!t) THROW("tensor '%s' is missing from '%s'", name.c_str(), where_.c_str());
        return *t;
    }
    std::vector<std::string> names() const {
        std::vector<std::string> n;
        for (auto& [k, v] : tensors_) n.push_back(k);
        return n;
    }
    const std::string& where() const { return where_; }
    const std::map<std::string, std::string>& metadata() const { return files_.at(0)->metadata(); }

private:
    std::string where_;
    std::vector<std::unique_ptr<SafetensorsFile>> files_;
    std::map<std::string, const StTensor*> tensors_;

    void add_file(const std::string& file) {
        files_.push_back(std::make_unique<SafetensorsFile>(file));
        for (auto& [name, t] : files_.back()->tensors()) {
            if (tensors_.count(name)) THROW("tensor '%s' is in '%s' and in '%s'", name.c_str(), tensors_[name]->file.c_str(), file.c_str());
            tensors_[name] = &t;
        }
    }
};

// ---- writing

// A tensor to write: its name, shape and fp32 values (numel of them).
struct StSource {
    std::string name;
    std::vector<int64_t> shape;
    const float* data;
    size_t numel() const {
        size_t n = 1;
        for (int64_t s : shape) n *= (size_t)s;
        return n;
    }
};

// One file: the tensors in the given order, converted to `dtype`; written to path.tmp and
// renamed, so a failed write leaves no partial file.
inline void safetensors_write(const std::string& path, const std::vector<StSource>& tensors, Dtype dtype,
                              const std::map<std::string, std::string>& metadata = {}) {
    nlohmann::ordered_json h = nlohmann::ordered_json::object();
    if (!metadata.empty()) h["__metadata__"] = metadata;
    size_t off = 0;
    for (const StSource& t : tensors) {
        const size_t bytes = t.numel() * dtype_bytes(dtype);
        h[t.name] = {{"dtype", dtype_name(dtype)}, {"shape", t.shape}, {"data_offsets", {off, off + bytes}}};
        off += bytes;
    }
    std::string header = h.dump();
    header.append((8 - header.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
    const uint64_t n = header.size();
    write_file_atomically(path, [&](FILE* f, const std::string& tmp) {
        fwrite_or_throw(&n, 8, 1, f, tmp);
        fwrite_or_throw(header.data(), 1, header.size(), f, tmp);
        std::vector<uint16_t> half;
        for (const StSource& t : tensors) {
            const size_t count = t.numel();
            if (dtype == Dtype::F32) { fwrite_or_throw(t.data, 4, count, f, tmp); continue; }
            const size_t step = 1 << 20;  // convert a slice at a time
            for (size_t i = 0; i < count; i += step) {
                const size_t m = std::min(step, count - i);
                half.resize(m);
                for (size_t k = 0; k < m; k++)
                    half[k] = dtype == Dtype::BF16 ? f32_to_bf16(t.data[i + k]) : f32_to_f16(t.data[i + k]);
                fwrite_or_throw(half.data(), 2, m, f, tmp);
            }
        }
    });
}

// A model's weights into `dir`: model.safetensors when they fit in max_shard_bytes, else
// shards model-0000i-of-0000N.safetensors of at most that size (a tensor larger than the
// limit gets a shard of its own) and model.safetensors.index.json. Returns the files written.
inline std::vector<std::string> safetensors_write_model(const std::string& dir, const std::vector<StSource>& tensors,
                                                        Dtype dtype, size_t max_shard_bytes,
                                                        const std::map<std::string, std::string>& metadata = {}) {
    std::vector<std::vector<StSource>> shards(1);
    size_t in_shard = 0, total = 0;
    for (const StSource& t : tensors) {
        const size_t bytes = t.numel() * dtype_bytes(dtype);
        if (in_shard > 0 && in_shard + bytes > max_shard_bytes) { shards.emplace_back(); in_shard = 0; }
        shards.back().push_back(t);
        in_shard += bytes;
        total += bytes;
    }
    std::vector<std::string> files;
    if (shards.size() == 1) {
        safetensors_write(dir + "/model.safetensors", tensors, dtype, metadata);
        std::error_code ec;
        std::filesystem::remove(dir + "/model.safetensors.index.json", ec);  // a stale index would win on read
        return {"model.safetensors"};
    }
    nlohmann::ordered_json map = nlohmann::ordered_json::object();
    for (size_t s = 0; s < shards.size(); s++) {
        const std::string name = strformat("model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
        safetensors_write(dir + "/" + name, shards[s], dtype, metadata);
        for (const StSource& t : shards[s]) map[t.name] = name;
        files.push_back(name);
    }
    nlohmann::ordered_json index = {{"metadata", {{"total_size", total}}}, {"weight_map", map}};
    std::ofstream f(dir + "/model.safetensors.index.json");
    f << index.dump(2) << "\n";
    if (!f) THROW("cannot write '%s/model.safetensors.index.json'", dir.c_str());
    std::error_code ec;
    std::filesystem::remove(dir + "/model.safetensors", ec);
    files.push_back("model.safetensors.index.json");
    return files;
}
