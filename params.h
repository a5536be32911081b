// The flat parameter buffer (no CUDA): every tensor's name, shape, place and optimizer group.
//
// Parameters live in one contiguous buffer with identical element offsets for the bf16
// compute copy, the fp32 gradients and the fp32 master weights. Every tensor starts at a multiple
// of PARAM_ALIGN elements; the few elements between two tensors are zero and belong to none. The
// master weights are kept as two 16-bit halves (master_split): the compute copy is their high
// half, so a rank adds only the 16-bit low half (2 bytes a parameter instead of 4). The blocks
// (mamba.cuh) declare their tensors into a ParamTable in buffer order; the optimizers and
// checkpoints see only this.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>
#include "common.h"

// An fp32 master weight's bit pattern w as its bf16 compute copy hi = w rounded to the nearest
// bf16 (ties away from zero, a tie being 2^-16 of the patterns; bf16 conversion rounds them
// to even) and the signed remainder lo = w - (hi << 16) in [-2^15, 2^15): hi << 16 + lo
// gives w back exactly, for every one of the 2^32 patterns.
HOST_DEVICE inline uint16_t master_high(uint32_t w) { return (uint16_t)((w + 0x8000u) >> 16); }
HOST_DEVICE inline int16_t master_low(uint32_t w) {
    return (int16_t)(uint16_t)(w - ((uint32_t)master_high(w) << 16));
}
HOST_DEVICE inline uint32_t master_join(uint16_t hi, int16_t lo) { return ((uint32_t)hi << 16) + (uint32_t)(int32_t)lo; }

// n fp32 master weights as their halves, and back
inline void master_split(const float* w, size_t n, uint16_t* hi, int16_t* lo) {
    for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        std::memcpy(&bits, w + i, 4);
        hi[i] = master_high(bits);
        lo[i] = master_low(bits);
    }
}
inline void master_unsplit(const uint16_t* hi, const int16_t* lo, size_t n, float* w) {
    for (size_t i = 0; i < n; i++) {
        const uint32_t bits = master_join(hi[i], lo[i]);
        std::memcpy(w + i, &bits, 4);
    }
}

// how a tensor is initialised (mamba.cuh's init_parameters)
enum class Init { Normal002, LinearUniform, ConvUniform, OutProjUniform, Ones, ALogUniform, ALogS4D, DtBias };

struct TensorInfo {
    std::string name;
    size_t offset = 0, count = 0;
    std::vector<int> shape;
    bool decay;        // AdamW weight decay: matrices, embeddings and conv weights only
    bool block_matrix; // a 2-D matrix of a block (Muon's group; dt_proj and conv weights excepted)
    Init init;
    std::string kind;  // which part of the model it belongs to, for the dry-run breakdown
};

// the largest tensor kernels index with 32-bit ints, and the largest model
constexpr size_t MAX_TENSOR = (1ull << 31) - 1, MAX_PARAMS = 1ull << 40;

// Tensor offsets are multiples of 8 elements, 16 bytes of bf16: cuBLAS runs a matrix whose bf16 copy is not
// 16-byte aligned on sm80 kernels, not Hopper's (whose TMA loads need the alignment). Packed back to back,
// mamba2-tiny's 12-element head vectors left every other layer's in_proj or out_proj unaligned (ncu, B8 T1024:
// 83 us a forward against 31 us). Checkpoints of the packed layout (align 1, before 2026-12-07) still load.
constexpr size_t PARAM_ALIGN = 8;

struct ParamTable {
    std::vector<TensorInfo> tensors;
    size_t total = 0;  // the buffer's length: the tensors and the gaps between them
    size_t align = PARAM_ALIGN;

    explicit ParamTable(size_t align_ = PARAM_ALIGN) : align(align_) {}

    size_t add(const std::string& name, std::vector<int> shape, bool decay, Init init, const std::string& kind,
               bool block_matrix = false) {
        TensorInfo t;
        t.name = name; t.shape = shape; t.decay = decay; t.block_matrix = block_matrix; t.init = init; t.kind = kind;
        t.offset = ceil_div(total, align) * align;
        t.count = 1;
        for (int s : shape) {
            if (s <= 0) THROW("tensor '%s' has a dimension %d", name.c_str(), s);
            t.count *= (size_t)s;
            if (t.count > MAX_TENSOR) THROW("tensor '%s' has more than 2^31 elements", name.c_str());
        }
        total = t.offset + t.count;
        if (total > MAX_PARAMS) THROW("the model has more than 2^40 parameters (at tensor '%s')", name.c_str());
        tensors.push_back(t);
        return t.offset;
    }
    // a block's 2-D matrix (rows, cols): decayed, in Muon's group
    size_t matrix(const std::string& name, int rows, int cols, Init init, const std::string& kind) {
        return add(name, {rows, cols}, true, init, kind, true);
    }

    // the model's parameters (the buffer less its gaps)
    size_t elements() const {
        size_t n = 0;
        for (auto& t : tensors) n += t.count;
        return n;
    }

    const TensorInfo& find(const std::string& name) const {
        for (auto& t : tensors) if (t.name == name) return t;
        THROW("no parameter named '%s'", name.c_str());
    }
};

// AdamW's view of a tensor: where it is and whether it decays
struct ParamTensor { size_t offset, count; bool decay; };

// AdamW's work: items of at most ADAMW_ITEM elements, each inside one tensor (so one launch
// knows every element's weight-decay flag), and their place in its compact m and v. One block
// takes an item (4 passes of 256 threads x 4). Items of 4K elements against 64K (bench_layers,
// H100): mamba2-tiny's 44M parameters 0.53 -> 0.46 ms (676 blocks had left the one wave uneven),
// hybrid-1.3b 14.3 -> 13.8, mamba2-2.7b 30.6 -> 28.0 (78 -> 90%, 95 -> 99%, 82 -> 90% of the copy);
// 16K items were slower than 4K at every size.
constexpr size_t ADAMW_ITEM = 1 << 12;

// start: the item's first element in the flat buffer; state: where its m and v start
struct AdamWItem { size_t start, state; uint32_t count, decay; };

// The work items over the tensors' elements in [begin, end), in the tensors' order, and
// their places in the compact state: each item's state follows the previous item's.
inline std::vector<AdamWItem> adamw_items(const std::vector<ParamTensor>& tensors, size_t begin, size_t end) {
    std::vector<AdamWItem> items;
    size_t state = 0;
    for (const ParamTensor& t : tensors) {
        const size_t a = std::max(t.offset, begin), b = std::min(t.offset + t.count, end);
        for (size_t s = a; s < b; s += ADAMW_ITEM) {
            const uint32_t n = (uint32_t)std::min(ADAMW_ITEM, b - s);
            items.push_back({s, state, n, (uint32_t)t.decay});
            state += n;
        }
    }
    return items;
}

// The tensors AdamW updates: all of them, or with Muon all but the blocks' 2-D matrices
inline std::vector<ParamTensor> adamw_tensors(const ParamTable& P, bool with_muon) {
    std::vector<ParamTensor> v;
    for (auto& t : P.tensors)
        if (!(with_muon && t.block_matrix)) v.push_back({t.offset, t.count, t.decay});
    return v;
}

// The optimizer state arrays of the elements in [begin, end) (a rank's range, or all), as a
// checkpoint lists them: AdamW's m and v over its items, Muon's momentum over its matrices
using ArraySizes = std::vector<std::pair<std::string, size_t>>;
inline ArraySizes optimizer_arrays(const ParamTable& P, bool with_muon, size_t begin, size_t end) {
    const std::vector<AdamWItem> items = adamw_items(adamw_tensors(P, with_muon), begin, end);
    const size_t adamw = items.empty() ? 0 : items.back().state + items.back().count;
    ArraySizes a = {{"adamw.m", adamw}, {"adamw.v", adamw}};
    if (with_muon) {
        size_t muon = 0;
        for (auto& t : P.tensors)
            if (t.block_matrix && t.offset >= begin && t.offset < end) muon += t.count;
        if (muon > 0) a.push_back({"muon.momentum", muon});
    }
    return a;
}

// optimizer state of every tensor: AdamW's m and v over its tensors, Muon's momentum over the rest
inline size_t optimizer_state_bytes(const ParamTable& P, bool with_muon) {
    size_t adamw = 0;
    for (const ParamTensor& t : adamw_tensors(P, with_muon)) adamw += t.count;
    return (2 * adamw + (P.elements() - adamw)) * sizeof(float);
}
