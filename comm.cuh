// Communication between ranks: the few collectives the trainer uses (Comm), and the gradient
// buckets of the backward reduced onto their owners while it runs (GradReducer).
//
// Comm itself is one rank: every collective is nothing and no MPI or NCCL is touched.
// comm_nccl.cuh implements the collectives over MPI + NCCL (a run under mpirun), comm_sim.cuh
// for ranks simulated as threads of one process on one GPU (tests of the sharding).
//
// ZeRO (zero.h): the flat parameter buffer is cut into one contiguous range per rank; rank r
// keeps the fp32 master weights, the optimizer state and the reduced gradients of its range
// only. During the backward each finished bucket of gradients is summed onto its owners (a
// reduce-scatter with uneven pieces: one reduction per owner the bucket touches); the owner
// updates its range; the updated bf16 weights go back to every rank (an all-gather).
#pragma once
#include <vector>
#include "cuda_common.cuh"
#include "zero.h"  // Sharding, BucketPlan

// dst[i] += src[i]
static __global__ void add_kernel(float* dst, const float* src, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] += src[i];
}
inline void add_into(float* dst, const float* src, size_t n, cudaStream_t s) {
    if (n == 0) return;
    add_kernel<<<(int)std::min<size_t>(4096, ceil_div(n, (size_t)256)), 256, 0, s>>>(dst, src, n);
    cudaCheckLast();
}

// The collectives, each called by every rank in the same order. Device collectives run on the
// stream given: what the stream does after the call sees their result (NCCL's semantics).
struct Comm {
    int rank = 0, world = 1, local_rank = 0;
    virtual ~Comm() = default;
    bool multi() const { return world > 1; }
    bool root() const { return rank == 0; }

    // host values summed over the ranks (small: loss sums, token counts)
    virtual double sum(double v) { return v; }
    virtual long sum(long v) { return v; }
    virtual void barrier() {}
    // x (n floats on the device) summed over the ranks, on every rank
    virtual void allreduce_sum(float* /*x*/, size_t /*n*/, cudaStream_t) {}
    // buf[bounds[r], bounds[r + 1]) from rank r to every rank, for every r
    virtual void all_gather(bf16* /*buf*/, const std::vector<size_t>& /*bounds*/, cudaStream_t) {}
    // Every rank's `bucket` holds its gradients of the flat elements [lo, hi); their sum over
    // the ranks goes to the owners: owner r's `shard` (its first element is flat element
    // bounds[r]) receives its part of [lo, hi), added to what it holds with `accumulate`.
    // The bucket's contents may change.
    virtual void reduce_scatter(float* /*bucket*/, size_t /*lo*/, size_t /*hi*/, float* /*shard*/,
                                const std::vector<size_t>& /*bounds*/, bool /*accumulate*/, cudaStream_t) {}
    // waits for the stream's work, or for the work before an event (several ranks: watching for a failed
    // collective; one rank: nothing, the caller's own wait follows)
    virtual void wait(cudaStream_t) {}
    virtual void wait_event(cudaEvent_t) {}
};

// ZeRO-2's gradient buckets during the backward (several ranks; one rank has none). Before a
// micro-batch's forward the buckets that the forward and the first part of the backward write
// are taken; Model::backward reports each finished span [lo, total) (grads_done); the buckets
// it completes go to their reduction on the reducer's own stream, overlapping the rest of the
// backward, and the next bucket is taken. Taking a bucket waits for the reductions of the
// buckets that shared its memory, then zeroes it (the kernels accumulate). The first
// micro-batch of a step writes the owners' shards; later ones add to them.
struct GradReducer {
    Comm& comm;
    const Sharding& sh;
    float* arena;                // the buckets' memory (Model::grads)
    float* shard;                // this rank's reduced gradients (Model::grad_shard)
    cudaStream_t stream = nullptr;
    cudaEvent_t ready_ev = nullptr, finish_ev = nullptr;
    std::vector<cudaEvent_t> done;  // per bucket: its latest reduction has finished
    std::vector<char> open;         // per bucket: taking gradients in this micro-batch
    size_t next_mark = 0;           // the walk's mark the backward reports next
    bool accumulate = false;        // this micro-batch adds to the shards

    GradReducer(Comm& c, const Sharding& s, float* arena_, float* shard_) : comm(c), sh(s), arena(arena_), shard(shard_) {
        if (!sh.sharded()) return;
        cudaCheck(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        cudaCheck(cudaEventCreateWithFlags(&ready_ev, cudaEventDisableTiming));
        cudaCheck(cudaEventCreateWithFlags(&finish_ev, cudaEventDisableTiming));
        done.resize(sh.buckets.count());
        for (cudaEvent_t& e : done) cudaCheck(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        open.assign(sh.buckets.count(), 0);
    }
    GradReducer(const GradReducer&) = delete;
    GradReducer& operator=(const GradReducer&) = delete;
    ~GradReducer() {
        if (stream) cudaStreamDestroy(stream);
        for (cudaEvent_t e : done) cudaEventDestroy(e);
        if (ready_ev) cudaEventDestroy(ready_ev);
        if (finish_ev) cudaEventDestroy(finish_ev);
    }

    // before a micro-batch's forward (on stream s); `first`: the step's first
    void begin(bool first, cudaStream_t s) {
        accumulate = !first;
        next_mark = 0;
        take(sh.buckets.of(sh.walk.forward), s);
        take(sh.buckets.of(sh.walk.marks[0]), s);
    }

    // the backward (on stream s) has finished the gradients of [lo, total); `last` at its end
    void ready(size_t lo, bool last, cudaStream_t s) {
        const std::vector<size_t>& marks = sh.walk.marks;
        if (next_mark >= marks.size() || marks[next_mark] != lo || last != (next_mark + 1 == marks.size()))
            THROW("the backward reported gradients final from %zu%s; grad_walk expects %s", lo, last ? " (its last)" : "",
                  next_mark < marks.size() ? strformat("%zu", marks[next_mark]).c_str() : "no more");
        next_mark++;
        const BucketPlan& P = sh.buckets;
        bool waited = false;
        for (int k = P.count() - 1; k >= 0; k--) {
            if (!open[k] || P.lo[k] < lo) continue;
            if (!waited) {
                cudaCheck(cudaEventRecord(ready_ev, s));
                cudaCheck(cudaStreamWaitEvent(stream, ready_ev, 0));
                waited = true;
            }
            comm.reduce_scatter(arena + P.at[k], P.lo[k], P.hi[k], shard, sh.bounds, accumulate, stream);
            cudaCheck(cudaEventRecord(done[k], stream));
            open[k] = 0;
        }
        if (lo > 0) take(P.of(lo - 1), s);
    }

    // stream s waits for every reduction launched
    void finish(cudaStream_t s) {
        if (!sh.sharded()) return;
        cudaCheck(cudaEventRecord(finish_ev, stream));
        cudaCheck(cudaStreamWaitEvent(s, finish_ev, 0));
    }

private:
    // bucket k's memory, zeroed once the reductions of the buckets that used it have finished
    void take(int k, cudaStream_t s) {
        if (open[k]) return;
        const BucketPlan& P = sh.buckets;
        for (int j : P.shares[k]) cudaCheck(cudaStreamWaitEvent(s, done[j], 0));  // never recorded: no wait
        cudaCheck(cudaMemsetAsync(arena + P.at[k], 0, P.size(k) * sizeof(float), s));
        open[k] = 1;
    }
};
