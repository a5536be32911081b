// Multi-GPU communication: Open MPI launches the ranks and carries NCCL's id; NCCL moves the
// tensors. A run started without mpirun is one rank and touches neither MPI nor NCCL.
//
// ZeRO-1 here: the flat parameter buffer is cut at tensor boundaries into one contiguous
// range per rank (balanced by element count, zero.h's partition_ranges), so every
// tensor, and so every Muon matrix, is owned whole by one rank. During the backward each
// finished bucket of gradients is summed onto its owners (ncclReduce per owner: together a
// reduce-scatter with uneven pieces, GradReducer below); the owner updates its range's fp32
// master weights and optimizer state; the updated bf16 weights go back to every rank (one
// ncclBroadcast per range, grouped: an all-gather).
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>
#include <mpi.h>
#include <nccl.h>
#include "cuda_common.cuh"
#include "zero.h"  // partition_ranges

// an error on any rank ends the whole job with a message naming the rank
[[noreturn]] inline void comm_abort(const char* what) {
    int rank = 0, init = 0;
    MPI_Initialized(&init);
    if (init) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    fprintf(stderr, "rank %d: %s; aborting the job\n", rank, what);
    fflush(stderr);
    if (init) MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

inline void nccl_check(ncclResult_t r, const char* file, int line) {
    if (r != ncclSuccess && r != ncclInProgress) {
        char msg[512];
        snprintf(msg, sizeof(msg), "NCCL error '%s' at %s:%d", ncclGetErrorString(r), file, line);
        comm_abort(msg);
    }
}
#define ncclCheck(r) nccl_check((r), __FILE__, __LINE__)

struct Comm {
    int rank = 0, world = 1, local_rank = 0;
    ncclComm_t nccl = nullptr;
    double timeout_s = 600;  // a collective that takes longer ends the job (a dead or stuck rank)

    bool mpi = false;

    // under mpirun: MPI_Init, the GPU from the local rank, and the NCCL communicator
    void init(int* argc, char*** argv) {
        if (!getenv("OMPI_COMM_WORLD_SIZE")) return;  // not launched by mpirun: one rank
        MPI_Init(argc, argv);
        mpi = true;
        MPI_Comm_rank(MPI_COMM_WORLD, &rank);
        MPI_Comm_size(MPI_COMM_WORLD, &world);
        const char* lr = getenv("OMPI_COMM_WORLD_LOCAL_RANK");
        local_rank = lr ? atoi(lr) : 0;
        int ndev = 0;
        if (cudaGetDeviceCount(&ndev) == cudaSuccess && ndev > 0) {
            if (local_rank >= ndev)
                comm_abort(strformat("local rank %d has no GPU (this node has %d)", local_rank, ndev).c_str());
            cudaCheck(cudaSetDevice(local_rank));
        }
        if (world == 1) return;
        ncclUniqueId id;
        if (rank == 0) ncclCheck(ncclGetUniqueId(&id));
        MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
        ncclCheck(ncclCommInitRank(&nccl, world, id, rank));
    }

    void finalize() {
        if (nccl) ncclCheck(ncclCommDestroy(nccl));
        nccl = nullptr;
        if (mpi) MPI_Finalize();
        mpi = false;
    }

    bool multi() const { return world > 1; }
    bool root() const { return rank == 0; }

    // With several ranks: waits for the stream's work, polling NCCL's asynchronous error
    // state, so a failed or stuck collective ends the job instead of hanging it.
    void wait(cudaStream_t s) {
        if (!multi()) return;  // one rank: the next copy to the host waits anyway
        const auto t0 = std::chrono::steady_clock::now();
        for (;;) {
            cudaError_t e = cudaStreamQuery(s);
            if (e == cudaSuccess) return;
            if (e != cudaErrorNotReady) cudaCheck(e);
            if (nccl) {
                ncclResult_t async;
                ncclCheck(ncclCommGetAsyncError(nccl, &async));
                if (async != ncclSuccess) {
                    ncclCommAbort(nccl);
                    comm_abort(strformat("NCCL asynchronous error '%s'", ncclGetErrorString(async)).c_str());
                }
            }
            double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            if (waited > timeout_s) {
                if (nccl) ncclCommAbort(nccl);
                comm_abort(strformat("a collective did not finish in %.0f s (another rank died or hangs)", waited).c_str());
            }
            std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
    }

    // host values summed over the ranks (small: loss sums, token counts)
    double sum(double v) const {
        if (!multi()) return v;
        double out;
        MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        return out;
    }
    long sum(long v) const {
        if (!multi()) return v;
        long out;
        MPI_Allreduce(&v, &out, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
        return out;
    }
    void barrier() const { if (multi()) MPI_Barrier(MPI_COMM_WORLD); }

    void allreduce_sum(float* x, size_t n, cudaStream_t s) {
        if (multi()) ncclCheck(ncclAllReduce(x, x, n, ncclFloat, ncclSum, nccl, s));
    }
    // buf[bounds[r], bounds[r+1]) from rank r to every rank, for every r
    template <typename T>
    void broadcast_ranges(T* buf, const std::vector<size_t>& bounds, cudaStream_t s) {
        if (!multi()) return;
        static_assert(sizeof(T) == 2 || sizeof(T) == 4, "bf16 or fp32");
        const ncclDataType_t type = sizeof(T) == 2 ? ncclBfloat16 : ncclFloat;
        ncclCheck(ncclGroupStart());
        for (int r = 0; r < world; r++) {
            const size_t a = bounds[r], n = bounds[r + 1] - a;
            if (n) ncclCheck(ncclBroadcast(buf + a, buf + a, n, type, r, nccl, s));
        }
        ncclCheck(ncclGroupEnd());
    }
};

// Reduces the gradients onto their owners while the backward still runs. The backward
// finishes the buffer from its end down (LM head and final norm, then the blocks from the
// last, then the embedding), so after each of its marks the span [ready(mark), total) is
// final. Once the finished but unsent span reaches `bucket` elements it goes out on the
// communication stream (one ncclReduce per owner it touches); the last mark sends the rest.
struct GradReducer {
    Comm& comm;
    std::vector<size_t> bounds;  // owner ranges (partition_ranges)
    size_t bucket;               // elements per launch; 0: everything at the last mark
    size_t sent = 0;             // [sent, total) is on its way
    cudaStream_t stream = nullptr;
    cudaEvent_t ready_ev = nullptr, done_ev = nullptr;

    GradReducer(Comm& c, std::vector<size_t> b, size_t bucket_elems) : comm(c), bounds(std::move(b)), bucket(bucket_elems) {
        if (!comm.multi()) return;
        cudaCheck(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        cudaCheck(cudaEventCreateWithFlags(&ready_ev, cudaEventDisableTiming));
        cudaCheck(cudaEventCreateWithFlags(&done_ev, cudaEventDisableTiming));
    }
    ~GradReducer() {
        if (stream) cudaStreamDestroy(stream);
        if (ready_ev) cudaEventDestroy(ready_ev);
        if (done_ev) cudaEventDestroy(done_ev);
    }

    void begin() { sent = bounds.back(); }

    // the backward (on stream s) has finished grads[lo, total); `last` marks its end
    void ready(float* grads, size_t lo, bool last, cudaStream_t s) {
        if (!comm.multi() || sent <= lo) return;
        if (!last && (bucket == 0 || sent - lo < bucket)) return;
        cudaCheck(cudaEventRecord(ready_ev, s));
        cudaCheck(cudaStreamWaitEvent(stream, ready_ev, 0));
        ncclCheck(ncclGroupStart());
        for (int r = 0; r < comm.world; r++) {
            const size_t a = std::max(lo, bounds[r]), b = std::min(sent, bounds[r + 1]);
            if (a < b) ncclCheck(ncclReduce(grads + a, grads + a, b - a, ncclFloat, ncclSum, r, comm.nccl, stream));
        }
        ncclCheck(ncclGroupEnd());
        sent = lo;
    }

    // stream s waits for every launched reduction
    void finish(cudaStream_t s) {
        if (!comm.multi()) return;
        cudaCheck(cudaEventRecord(done_ev, stream));
        cudaCheck(cudaStreamWaitEvent(s, done_ev, 0));
    }
};
