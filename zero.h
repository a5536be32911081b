// ZeRO sharding (no CUDA): which part of the flat parameter buffer each rank owns, where the
// backward's gradients wait in buckets until they are reduced onto their owners, and what one
// rank holds in device memory.
//
// Rank r of W owns the elements [bounds[r], bounds[r + 1]): their fp32 master weights, their
// optimizer state and their reduced fp32 gradients (ZeRO-1 and ZeRO-2); every rank keeps the
// whole bf16 compute copy. The backward accumulates gradients into buckets: runs of whole
// tensors cut where Model::backward reports the gradients above as final (the final norm, each
// block's start, the embedding); a bucket's memory is zeroed when the backward reaches it and
// is given to a later bucket once its reduction onto the owners has finished. With one rank
// there are no buckets: the whole fp32 gradient buffer is the shard.
#pragma once
#include <algorithm>
#include <cstddef>
#include <utility>
#include <vector>
#include "params.h"  // ParamTable, adamw_items, optimizer_arrays

// cuts inside a tensor fall on multiples of this many elements (256-byte aligned pieces)
constexpr size_t ZERO_ALIGN = 64;

// Cuts [0, total) into `world` contiguous ranges of about total / world elements: rank r owns
// [bounds[r], bounds[r + 1]). No cut falls inside one of the `whole` spans (sorted, disjoint
// [a, b)); one that would moves to the nearer end of the span (never before the previous cut).
inline std::vector<size_t> partition_ranges(const std::vector<std::pair<size_t, size_t>>& whole, size_t total,
                                            int world) {
    std::vector<size_t> bounds(1, 0);
    size_t w = 0;  // the first whole span that ends after the cut
    for (int r = 1; r < world; r++) {
        const size_t target = total * r / world;  // total <= MAX_PARAMS = 2^40: no overflow
        size_t cut = std::min(total, (target + ZERO_ALIGN / 2) / ZERO_ALIGN * ZERO_ALIGN);
        while (w < whole.size() && whole[w].second <= cut) w++;
        if (w < whole.size() && whole[w].first < cut)
            cut = cut - whole[w].first <= whole[w].second - cut ? whole[w].first : whole[w].second;
        bounds.push_back(std::max(cut, bounds.back()));
    }
    bounds.push_back(total);
    return bounds;
}

// the same, cut at the given tensor ends only (every tensor whole)
inline std::vector<size_t> partition_ranges(const std::vector<size_t>& tensor_ends, size_t total, int world) {
    std::vector<std::pair<size_t, size_t>> whole;
    size_t start = 0;
    for (size_t e : tensor_ends) {
        whole.push_back({start, e});
        start = e;
    }
    return partition_ranges(whole, total, world);
}

// The ranks' ranges of a parameter buffer: every block matrix (Muon orthogonalises each whole)
// is owned whole by one rank; the other tensors (AdamW's, element by element) may be cut, so
// that the embedding and the LM head spread over several ranks when there are many
inline std::vector<size_t> param_ranges(const ParamTable& P, int world) {
    std::vector<std::pair<size_t, size_t>> whole;
    for (auto& t : P.tensors)
        if (t.block_matrix) whole.push_back({t.offset, t.offset + t.count});
    return partition_ranges(whole, P.total, world);
}

// How Model::backward finishes the gradients (mamba.cuh's grad_walk): `marks`, descending,
// where it reports every gradient from the mark up as final (the final norm, each block's start
// from the last, 0 after the embedding); `forward`: the tensor whose gradient the forward
// already writes (the LM head, in its loss chunks; tied to the embedding, that is the tensor
// the backward finishes last).
struct GradWalk {
    std::vector<size_t> marks;
    size_t forward = 0;
};

// The gradient buckets: bucket k holds the gradients of [lo[k], hi[k]) (ascending; together
// [0, total)) at [at[k], at[k] + size(k)) of the bucket arena. shares[k]: the buckets whose
// places overlap k's, k among them (before zeroing k's memory the backward waits for their
// last reductions).
struct BucketPlan {
    std::vector<size_t> lo, hi, at;
    std::vector<std::vector<int>> shares;
    size_t arena = 0;  // elements

    int count() const { return (int)lo.size(); }
    size_t size(int k) const { return hi[k] - lo[k]; }
    int of(size_t offset) const { return int(std::upper_bound(lo.begin(), lo.end(), offset) - lo.begin()) - 1; }
    // where the gradient of flat element `offset` accumulates in the arena
    size_t place(size_t offset) const {
        const int k = of(offset);
        return at[k] + (offset - lo[k]);
    }
};

// Buckets of whole segments between the walk's marks, from the top down, each closed once it
// holds at least bucket_elems elements (0: one bucket, reduced after the backward). Their places
// replay one micro-batch: the buckets the forward and the backward's first segment write are
// taken first; at each mark the buckets it completes go to their reduction, and the next
// segment's bucket is taken. A bucket's place is the lowest that overlaps neither an open
// bucket nor one whose reduction started at the previous close (which gets the time of one
// more bucket's backward to finish before its memory is reused).
inline BucketPlan plan_buckets(const GradWalk& walk, size_t total, size_t bucket_elems) {
    const std::vector<size_t>& marks = walk.marks;
    if (marks.empty() || marks.back() != 0 || marks.front() >= total || walk.forward >= total)
        THROW("gradient walk: marks must descend from below %zu to 0", total);
    for (size_t i = 1; i < marks.size(); i++)
        if (marks[i] >= marks[i - 1]) THROW("gradient walk: marks must descend (%zu after %zu)", marks[i], marks[i - 1]);
    BucketPlan p;
    std::vector<size_t> cuts = {total};  // descending
    for (size_t m : marks)
        if (m > 0 && bucket_elems > 0 && cuts.back() - m >= bucket_elems) cuts.push_back(m);
    cuts.push_back(0);
    for (size_t i = cuts.size() - 1; i > 0; i--) {
        p.lo.push_back(cuts[i]);
        p.hi.push_back(cuts[i - 1]);
    }
    const int K = p.count();
    p.at.assign(K, 0);
    std::vector<int> open, flight;  // taking gradients; reduced since the last close
    auto take = [&](int k) {
        if (std::find(open.begin(), open.end(), k) != open.end()) return;
        std::vector<std::pair<size_t, size_t>> used;
        for (const std::vector<int>* v : {&open, &flight})
            for (int j : *v) used.push_back({p.at[j], p.at[j] + p.size(j)});
        std::sort(used.begin(), used.end());
        size_t x = 0;
        for (auto [a, b] : used) {
            if (a >= x + p.size(k)) break;
            x = std::max(x, b);
        }
        p.at[k] = x;
        p.arena = std::max(p.arena, x + p.size(k));
        open.push_back(k);
    };
    take(p.of(walk.forward));
    take(p.of(marks[0]));
    for (size_t m : marks) {
        std::vector<int> closed;
        for (int k : open)
            if (p.lo[k] >= m) closed.push_back(k);
        if (!closed.empty()) {
            for (int k : closed) open.erase(std::find(open.begin(), open.end(), k));
            flight = closed;
        }
        if (m > 0) take(p.of(m - 1));
    }
    p.shares.resize(K);
    for (int k = 0; k < K; k++)
        for (int j = 0; j < K; j++)
            if (p.at[j] < p.at[k] + p.size(k) && p.at[k] < p.at[j] + p.size(j)) p.shares[k].push_back(j);
    return p;
}

// What one rank of `world` owns, and (several ranks) its gradient buckets
struct Sharding {
    int rank = 0, world = 1;
    std::vector<size_t> bounds;  // rank r owns [bounds[r], bounds[r + 1])
    size_t begin = 0, end = 0;   // this rank's range
    GradWalk walk;
    BucketPlan buckets;          // several ranks only
    bool sharded() const { return world > 1; }
    size_t count() const { return end - begin; }
};

inline Sharding make_sharding(const ParamTable& P, const GradWalk& walk, int world, int rank, size_t bucket_elems) {
    if (world < 1 || rank < 0 || rank >= world) THROW("rank %d of %d ranks", rank, world);
    Sharding s;
    s.rank = rank;
    s.world = world;
    s.bounds = param_ranges(P, world);
    for (int r = 0; r < world; r++)
        if (s.bounds[r + 1] <= s.bounds[r])
            THROW("%d ranks: rank %d would own no parameters (the model's %zu parameters, its block matrices each "
                  "whole on one rank, do not split %d ways); use fewer ranks", world, r, P.total, world);
    s.begin = s.bounds[rank];
    s.end = s.bounds[rank + 1];
    s.walk = walk;
    if (world > 1) s.buckets = plan_buckets(walk, P.total, bucket_elems);
    return s;
}

// ----------------------------------------------------------------------------
// Memory plan: the bytes one rank allocates (Model, Model::allocate, Trainer), each item as the
// code allocates it. The CUDA context, cuBLAS's and NCCL's own buffers come on top (about
// CUDA_CONTEXT_GIB; more with NCCL on many ranks).

// the optimizers' small device buffers (optim.cuh's NORM_BLOCKS and MUON_NORM_BLOCKS partial
// sums; trainer.cuh checks that they agree)
constexpr size_t PLAN_NORM_PARTIALS = 1024, PLAN_MUON_PARTIALS = 256;
constexpr double CUDA_CONTEXT_GIB = 0.5;

struct RankMemory {
    size_t weights = 0;       // the bf16 compute copy of every parameter
    size_t grad_buckets = 0;  // where the backward accumulates: the bucket arena (one rank: all gradients)
    size_t grad_shard = 0;    // the rank's reduced fp32 gradients (several ranks)
    size_t master = 0;        // the low halves of the fp32 master weights of the rank's range (params.h)
    size_t optimizer = 0;     // AdamW's m and v, Muon's momentum, over the rank's range
    size_t workspace = 0;     // AdamW's work items, Muon's Newton-Schulz buffers, norm partials
    size_t activations = 0;   // activation_sizes(...).total_bytes
    size_t model() const { return weights + grad_buckets + grad_shard + master; }  // what Model's constructor takes
    size_t trainer() const { return optimizer + workspace; }                       // what Trainer's takes
    size_t total() const { return model() + activations + trainer(); }
};

inline RankMemory rank_memory(const ParamTable& P, const Sharding& s, bool muon, size_t activation_bytes) {
    RankMemory m;
    m.weights = P.total * 2;
    m.grad_buckets = (s.sharded() ? s.buckets.arena : P.total) * 4;
    m.grad_shard = s.sharded() ? s.count() * 4 : 0;
    m.master = s.count() * 2;
    for (auto& a : optimizer_arrays(P, muon, s.begin, s.end)) m.optimizer += a.second * 4;
    m.workspace = adamw_items(adamw_tensors(P, muon), s.begin, s.end).size() * sizeof(AdamWItem) +
                  (PLAN_NORM_PARTIALS + 1) * 4;
    size_t max_x = 0, max_a = 0;  // Muon's largest matrix, and its smaller side squared
    for (auto& t : P.tensors)
        if (muon && t.block_matrix && t.offset >= s.begin && t.offset < s.end) {
            const size_t small = (size_t)std::min(t.shape[0], t.shape[1]);
            max_x = std::max(max_x, t.count);
            max_a = std::max(max_a, small * small);
        }
    if (max_x > 0) m.workspace += (2 * max_x + 2 * max_a) * 2 + (PLAN_MUON_PARTIALS + 1) * 4;
    m.activations = activation_bytes;
    return m;
}
