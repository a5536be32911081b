// Reader of the tensor dumps written by test/pytorch_ref.py (format in HACKING.md):
// "MCTF", int32 count, then per tensor: int32 name_len, name, int32 ndim, int64 dims[ndim],
// float64 data[prod(dims)]. Little endian.
#pragma once
#include <cstring>
#include <map>
#include <string>
#include <vector>
#include "common.h"

struct Tensor {
    std::vector<int64_t> dims;  // empty for a scalar
    std::vector<double> data;
};

struct TensorFile {
    std::string path;
    std::map<std::string, Tensor> tensors;

    TensorFile() = default;
    explicit TensorFile(const std::string& p) : path(p) {
        FILE* f = fopen_or_throw(path, "rb");
        try {
            read_all(f);
        } catch (...) {
            fclose(f);
            throw;
        }
        fclose(f);
    }

    const Tensor& get(const std::string& name) const {
        auto it = tensors.find(name);
        if (it == tensors.end()) THROW("no tensor '%s' in '%s'", name.c_str(), path.c_str());
        return it->second;
    }
    bool has(const std::string& name) const { return tensors.count(name) != 0; }

private:
    void read_all(FILE* f) {
        char magic[4];
        fread_or_throw(magic, 1, 4, f, path);
        if (memcmp(magic, "MCTF", 4) != 0) THROW("'%s' is not a tensor dump (bad magic)", path.c_str());
        int32_t count;
        fread_or_throw(&count, sizeof(count), 1, f, path);
        if (count < 0) THROW("'%s': negative tensor count %d", path.c_str(), count);
        for (int32_t i = 0; i < count; i++) {
            int32_t name_len, ndim;
            fread_or_throw(&name_len, sizeof(name_len), 1, f, path);
            if (name_len <= 0 || name_len > 4096) THROW("'%s': bad name length %d", path.c_str(), name_len);
            std::string name(name_len, '\0');
            fread_or_throw(&name[0], 1, name_len, f, path);
            fread_or_throw(&ndim, sizeof(ndim), 1, f, path);
            if (ndim < 0 || ndim > 8) THROW("'%s': tensor '%s' has bad ndim %d", path.c_str(), name.c_str(), ndim);
            Tensor t;
            t.dims.resize(ndim);
            if (ndim) fread_or_throw(t.dims.data(), sizeof(int64_t), ndim, f, path);
            size_t n = 1;
            for (int64_t d : t.dims) {
                if (d < 0 || d > (int64_t)1 << 32) THROW("'%s': tensor '%s' has bad dim %lld", path.c_str(),
                                                         name.c_str(), (long long)d);
                n *= (size_t)d;
            }
            t.data.resize(n);
            if (n) fread_or_throw(t.data.data(), sizeof(double), n, f, path);
            if (tensors.count(name)) THROW("'%s': duplicate tensor '%s'", path.c_str(), name.c_str());
            tensors[name] = std::move(t);
        }
        if (fgetc(f) != EOF) THROW("'%s': trailing bytes after %d tensors", path.c_str(), count);
    }
};
