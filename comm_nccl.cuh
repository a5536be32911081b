// Comm over MPI + NCCL: Open MPI launches the ranks and carries NCCL's id; NCCL moves the
// tensors. A run started without mpirun is one rank and touches neither.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>
#include <mpi.h>
#include <nccl.h>
#include "comm.cuh"

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

struct NcclComm : Comm {
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

    // Waits for the stream's work (or an event's), polling NCCL's asynchronous error state, so a failed or
    // stuck collective ends the job instead of hanging it.
    void wait(cudaStream_t s) override { poll([&] { return cudaStreamQuery(s); }); }
    void wait_event(cudaEvent_t ev) override { poll([&] { return cudaEventQuery(ev); }); }
    template <typename Query>
    void poll(Query query) {
        if (!multi()) return;  // one rank: the next copy to the host waits anyway
        const auto t0 = std::chrono::steady_clock::now();
        for (;;) {
            cudaError_t e = query();
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

    double sum(double v) override {
        if (!multi()) return v;
        double out;
        MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        return out;
    }
    long sum(long v) override {
        if (!multi()) return v;
        long out;
        MPI_Allreduce(&v, &out, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
        return out;
    }
    void barrier() override { if (multi()) MPI_Barrier(MPI_COMM_WORLD); }

    void allreduce_sum(float* x, size_t n, cudaStream_t s) override {
        if (multi()) ncclCheck(ncclAllReduce(x, x, n, ncclFloat, ncclSum, nccl, s));
    }
    // one ncclBroadcast per range, grouped
    void all_gather(bf16* buf, const std::vector<size_t>& bounds, cudaStream_t s) override {
        if (!multi()) return;
        ncclCheck(ncclGroupStart());
        for (int r = 0; r < world; r++) {
            const size_t a = bounds[r], n = bounds[r + 1] - a;
            if (n) ncclCheck(ncclBroadcast(buf + a, buf + a, n, ncclBfloat16, r, nccl, s));
        }
        ncclCheck(ncclGroupEnd());
    }
    // one ncclReduce per owner of a piece of the bucket, grouped; with `accumulate` the owner
    // first adds what its shard holds to its own piece, which the reduction then overwrites
    void reduce_scatter(float* bucket, size_t lo, size_t hi, float* shard, const std::vector<size_t>& bounds,
                        bool accumulate, cudaStream_t s) override {
        if (!multi()) return;
        const size_t a0 = std::max(lo, bounds[rank]), b0 = std::min(hi, bounds[rank + 1]);
        if (accumulate && a0 < b0) add_into(bucket + (a0 - lo), shard + (a0 - bounds[rank]), b0 - a0, s);
        ncclCheck(ncclGroupStart());
        for (int r = 0; r < world; r++) {
            const size_t a = std::max(lo, bounds[r]), b = std::min(hi, bounds[r + 1]);
            if (a >= b) continue;
            float* recv = r == rank ? shard + (a - bounds[r]) : bucket + (a - lo);  // used on the owner only
            ncclCheck(ncclReduce(bucket + (a - lo), recv, b - a, ncclFloat, ncclSum, r, nccl, s));
        }
        ncclCheck(ncclGroupEnd());
    }
};

// The main() of a program that runs on every rank (train_mamba, finetune_mamba): flags are
// parsed before MPI starts, so a bad flag ends every rank with one message and exit code 1;
// only rank 0 prints; an error on any rank of a multi-rank run ends the whole job.
template <class Args>
int main_on_ranks(int argc, char** argv, Args (*parse_args)(int, char**), int (*run)(const Args&, Comm&)) {
    Args a;
    try {
        a = parse_args(argc, argv);
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    NcclComm comm;
    comm.init(&argc, &argv);
    if (!comm.root() && !freopen("/dev/null", "w", stdout)) comm_abort("cannot silence stdout");
    int rc = 0;
    try {
        rc = run(a, comm);
    } catch (const std::exception& e) {
        if (comm.multi()) comm_abort(("error: " + std::string(e.what())).c_str());
        fprintf(stderr, "error: %s\n", e.what());
        rc = 1;
    }
    comm.finalize();
    return rc;
}
