// Simulated ranks, for tests: `world` ranks of one process on one GPU, each a host thread with
// its own Model, Trainer and reduction stream, so that the sharding (partition, owners, gradient
// buckets, checkpoint files, resume) runs with several ranks where NCCL refuses two ranks on one
// GPU.
//
// The threads take turns: one runs at a time, from one collective to the next, in rank order,
// so the engine's host code needs no locks (cuBLAS's handle, the allocation counter). The last
// rank to reach a collective performs it for all: host sums in rank order; device work on the
// world's own stream once every rank's stream has reached the call, with every rank's stream
// then waiting for it (NCCL's semantics, through events); device sums in rank order, so a run
// repeats bit for bit. The ranks' compute shares the default stream (cuBLAS repeats its results
// bit for bit only with one stream active), their reductions overlap it on their own streams.
#pragma once
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>
#include "comm.cuh"

// thrown in the ranks that stop because another failed
struct SimStopped {};

struct SimWorld {
    enum Kind { SUM_DOUBLE, SUM_LONG, BARRIER, ALLREDUCE, ALL_GATHER, REDUCE_SCATTER };
    static const char* name(int k) {
        static const char* names[] = {"sum(double)", "sum(long)", "barrier", "allreduce_sum", "all_gather", "reduce_scatter"};
        return names[k];
    }
    // one rank's call of a collective, and a host sum's result
    struct Call {
        int kind = 0;
        long seq = 0;           // the rank's count of collectives before it
        double d = 0;           // SUM_DOUBLE
        long l = 0;             // SUM_LONG
        float* f = nullptr;     // ALLREDUCE: x; REDUCE_SCATTER: the bucket
        bf16* b = nullptr;      // ALL_GATHER
        size_t n = 0, lo = 0, hi = 0;
        float* shard = nullptr;
        const std::vector<size_t>* bounds = nullptr;
        bool accumulate = false;
        cudaStream_t s = nullptr;
    };

    int world;
    std::mutex mu;
    std::condition_variable cv;
    int turn = 0;              // the rank that runs
    int waiting = 0;           // ranks whose call of the current collective is in
    int finished = 0;          // ranks whose body has returned
    std::exception_ptr error;  // the first failure; every other rank stops at its next turn
    std::vector<Call> calls;
    std::vector<cudaEvent_t> arrived;  // per rank: its stream reached the device collective
    cudaEvent_t done_ev = nullptr;
    cudaStream_t work = nullptr;

    explicit SimWorld(int w) : world(w), calls(w), arrived(w) {
        for (cudaEvent_t& e : arrived) cudaCheck(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        cudaCheck(cudaEventCreateWithFlags(&done_ev, cudaEventDisableTiming));
        cudaCheck(cudaStreamCreateWithFlags(&work, cudaStreamNonBlocking));
    }
    SimWorld(const SimWorld&) = delete;
    SimWorld& operator=(const SimWorld&) = delete;
    ~SimWorld() {
        for (cudaEvent_t e : arrived) cudaEventDestroy(e);
        cudaEventDestroy(done_ev);
        cudaStreamDestroy(work);
    }

    // rank r waits (lk held) for its turn; a failure elsewhere stops it, and so does a wait of
    // a minute (the ranks' calls do not match: a deadlock), with a message for all
    void await(std::unique_lock<std::mutex>& lk, int r) {
        if (!cv.wait_for(lk, std::chrono::seconds(60), [&] { return turn == r || error; }) && !error) {
            error = std::make_exception_ptr(std::runtime_error(strformat(
                "simulated ranks: rank %d waited a minute for its turn (rank %d's); the ranks' collectives do not match",
                r, turn)));
            cv.notify_all();
        }
        if (error) throw SimStopped{};
    }

    // every rank's call is in: does the collective for all (the last rank's thread)
    void perform() {
        const Call& c0 = calls[0];
        for (int r = 1; r < world; r++)
            if (calls[r].kind != c0.kind || calls[r].seq != c0.seq)
                THROW("simulated ranks: rank %d's collective #%ld is %s, rank 0's #%ld is %s", r, calls[r].seq,
                      name(calls[r].kind), c0.seq, name(c0.kind));
        switch (c0.kind) {
            case SUM_DOUBLE: {
                double t = 0;
                for (const Call& c : calls) t += c.d;
                for (Call& c : calls) c.d = t;
                return;
            }
            case SUM_LONG: {
                long t = 0;
                for (const Call& c : calls) t += c.l;
                for (Call& c : calls) c.l = t;
                return;
            }
            case BARRIER: return;
            default: break;
        }
        for (cudaEvent_t e : arrived) cudaCheck(cudaStreamWaitEvent(work, e, 0));
        if (c0.kind == ALLREDUCE) {  // rank 0's x collects the sum, the others copy it
            for (int r = 1; r < world; r++) add_into(c0.f, calls[r].f, c0.n, work);
            for (int r = 1; r < world; r++)
                cudaCheck(cudaMemcpyAsync(calls[r].f, c0.f, c0.n * sizeof(float), cudaMemcpyDeviceToDevice, work));
        } else if (c0.kind == ALL_GATHER) {
            const std::vector<size_t>& bounds = *c0.bounds;
            for (int o = 0; o < world; o++)
                for (int r = 0; r < world; r++)
                    if (r != o)
                        cudaCheck(cudaMemcpyAsync(calls[r].b + bounds[o], calls[o].b + bounds[o],
                                                  (bounds[o + 1] - bounds[o]) * sizeof(bf16), cudaMemcpyDeviceToDevice, work));
        } else {  // REDUCE_SCATTER: each owner's piece, summed in rank order
            const std::vector<size_t>& bounds = *c0.bounds;
            for (int o = 0; o < world; o++) {
                const size_t a = std::max(c0.lo, bounds[o]), b = std::min(c0.hi, bounds[o + 1]);
                if (a >= b) continue;
                float* dst = calls[o].shard + (a - bounds[o]);
                int r = 0;
                if (!c0.accumulate)
                    cudaCheck(cudaMemcpyAsync(dst, calls[r++].f + (a - c0.lo), (b - a) * sizeof(float),
                                              cudaMemcpyDeviceToDevice, work));
                for (; r < world; r++) add_into(dst, calls[r].f + (a - c0.lo), b - a, work);
            }
        }
        cudaCheck(cudaEventRecord(done_ev, work));
        for (const Call& c : calls) cudaCheck(cudaStreamWaitEvent(c.s, done_ev, 0));
    }
};

struct SimComm : Comm {
    SimWorld& w;
    long seq = 0;
    SimComm(SimWorld& world_, int r) : w(world_) {
        rank = r;
        world = w.world;
    }

    // this rank's call; returns, with its result in w.calls[rank], when its turn comes back
    void collective(SimWorld::Call c) {
        c.seq = seq++;
        if (c.kind >= SimWorld::ALLREDUCE) cudaCheck(cudaEventRecord(w.arrived[rank], c.s));
        std::unique_lock<std::mutex> lk(w.mu);
        if (w.finished > 0) THROW("simulated ranks: rank %d calls %s after another rank has finished", rank, SimWorld::name(c.kind));
        w.calls[rank] = c;
        w.waiting++;
        if (rank == world - 1) {
            w.perform();
            w.waiting = 0;
            w.turn = 0;
        } else {
            w.turn = rank + 1;
        }
        w.cv.notify_all();
        w.await(lk, rank);
    }

    double sum(double v) override {
        SimWorld::Call c;
        c.kind = SimWorld::SUM_DOUBLE;
        c.d = v;
        collective(c);
        return w.calls[rank].d;
    }
    long sum(long v) override {
        SimWorld::Call c;
        c.kind = SimWorld::SUM_LONG;
        c.l = v;
        collective(c);
        return w.calls[rank].l;
    }
    void barrier() override {
        SimWorld::Call c;
        c.kind = SimWorld::BARRIER;
        collective(c);
    }
    void allreduce_sum(float* x, size_t n, cudaStream_t s) override {
        SimWorld::Call c;
        c.kind = SimWorld::ALLREDUCE;
        c.f = x;
        c.n = n;
        c.s = s;
        collective(c);
    }
    void all_gather(bf16* buf, const std::vector<size_t>& bounds, cudaStream_t s) override {
        SimWorld::Call c;
        c.kind = SimWorld::ALL_GATHER;
        c.b = buf;
        c.bounds = &bounds;
        c.s = s;
        collective(c);
    }
    void reduce_scatter(float* bucket, size_t lo, size_t hi, float* shard, const std::vector<size_t>& bounds,
                        bool accumulate, cudaStream_t s) override {
        SimWorld::Call c;
        c.kind = SimWorld::REDUCE_SCATTER;
        c.f = bucket;
        c.lo = lo;
        c.hi = hi;
        c.shard = shard;
        c.bounds = &bounds;
        c.accumulate = accumulate;
        c.s = s;
        collective(c);
    }
    void wait(cudaStream_t s) override { cudaCheck(cudaStreamSynchronize(s)); }
    void wait_event(cudaEvent_t e) override { cudaCheck(cudaEventSynchronize(e)); }
};

// Runs body(comm) as `world` simulated ranks, each in its own thread, taking turns (above);
// rethrows the first rank's error once every thread has stopped.
inline void run_sim_ranks(int world, const std::function<void(Comm&)>& body) {
    SimWorld w(world);
    std::vector<std::thread> threads;
    for (int r = 0; r < world; r++) {
        threads.emplace_back([&w, &body, r] {
            SimComm comm(w, r);
            try {
                {
                    std::unique_lock<std::mutex> lk(w.mu);
                    w.await(lk, r);
                }
                body(comm);
                std::lock_guard<std::mutex> lk(w.mu);
                if (w.waiting > 0 && !w.error)
                    w.error = std::make_exception_ptr(std::runtime_error(strformat(
                        "simulated ranks: rank %d finished while %d rank(s) wait in a collective", r, w.waiting)));
                w.finished++;
                w.turn = r + 1;
                w.cv.notify_all();
            } catch (const SimStopped&) {
            } catch (...) {
                std::lock_guard<std::mutex> lk(w.mu);
                if (!w.error) w.error = std::current_exception();
                w.cv.notify_all();
            }
        });
    }
    for (std::thread& t : threads) t.join();
    cudaCheck(cudaDeviceSynchronize());
    if (w.error) std::rethrow_exception(w.error);
}
