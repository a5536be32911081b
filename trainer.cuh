// One training step for every binary: train_mamba (its runs and --bench) and finetune_mamba
// go through the same Trainer, so fine-tuning has Muon and several GPUs (ZeRO) too.
//
// A step: the forward and backward of its micro-batches (gradient accumulation), the loss as
// the mean over the step's valid targets on every rank, then the update: the global gradient
// norm, AdamW (and Muon for the blocks' matrices) over this rank's range of the parameter
// buffer, and the new bf16 weights shared with every rank.
//
// One rank: the micro-batches accumulate into the whole fp32 gradient buffer, which is the
// rank's shard. Several ranks (ZeRO-2, zero.h): each micro-batch's gradients are reduced onto
// their owners bucket by bucket while its backward runs (GradReducer), and the owners add them
// up in their fp32 shards; a rank holds the fp32 master weights, optimizer state and gradients
// of its own range only.
#pragma once
#include <memory>
#include <string>
#include <vector>
#include "mamba.cuh"
#include "optim.cuh"
#include "comm.cuh"
#include "checkpoint.cuh"
#include "flags.h"

// the optimizer and step flags both binaries take
struct OptimArgs {
    std::string optimizer = "adamw";  // adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    float weight_decay = 0.1f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, grad_clip = 1.0f;
    float muon_lr = 0, muon_momentum = 0.95f;  // muon_lr 0: the AdamW peak lr
    double bucket_mb = 32;                     // gradient reduction buckets (several GPUs)
    bool eager = false;                        // no CUDA graph for the micro-batches (Model::train_micro_batch)
    size_t bucket_elems() const { return (size_t)(bucket_mb * (1 << 20) / sizeof(float)); }
};

inline void add_optimizer_flags(Flags& f, OptimArgs& o) {
    f.add({"--weight-decay"}, &o.weight_decay, "F", "AdamW and Muon weight decay", Range::at_least(0));
    f.add({"--beta1"}, &o.beta1, "F", "AdamW beta1", Range{0, 1, false, true});
    f.add({"--beta2"}, &o.beta2, "F", "AdamW beta2", Range{0, 1, false, true});
    f.add({"--eps"}, &o.eps, "F", "AdamW epsilon", Range::above(0));
    f.add({"--grad-clip"}, &o.grad_clip, "F", "global gradient norm clip (0: none)", Range::at_least(0));
    f.choice({"--optimizer"}, &o.optimizer, {"adamw", "muon"},
             "Muon for the blocks' 2-D matrices, AdamW for the rest; or AdamW for all");
    f.add({"--muon-lr"}, &o.muon_lr, "F", "Muon's peak lr (default: --lr; the update's RMS matches AdamW's)",
          Range::at_least(0));
    f.add({"--muon-momentum"}, &o.muon_momentum, "F", "Muon's Nesterov momentum", Range{0, 1, false, true});
    f.add({"--bucket-mb"}, &o.bucket_mb, "F",
          "several GPUs: gradients reduced during the backward in buckets of at least\nF MiB of whole blocks "
          "(0: one bucket, all at once after the backward)",
          Range::at_least(0));
    f.flag({"--eager"}, &o.eager,
           "launch each micro-batch's kernels one by one instead of replaying the\nCUDA graph captured at the first "
           "(one GPU; --profile is always eager)");
}

// zero.h's memory plan counts the optimizers' small buffers as optim.cuh allocates them
static_assert(PLAN_NORM_PARTIALS == NORM_BLOCKS && PLAN_MUON_PARTIALS == MUON_NORM_BLOCKS, "zero.h mirrors optim.cuh");

// AdamW's tensors as the rank's shards see them: cut to [begin, end), offsets from begin
inline std::vector<ParamTensor> shard_view(const std::vector<ParamTensor>& tensors, size_t begin, size_t end) {
    std::vector<ParamTensor> v;
    for (const ParamTensor& t : tensors) {
        const size_t a = std::max(t.offset, begin), b = std::min(t.offset + t.count, end);
        if (a < b) v.push_back({a - begin, b - a, t.decay});
    }
    return v;
}

struct Trainer {
    Model& model;
    Comm& comm;
    const std::vector<size_t>& bounds;  // rank r owns [bounds[r], bounds[r + 1]) of the parameter buffer
    size_t begin, end;
    GradReducer reducer;
    // the optimizers work on the rank's shards: offsets from `begin` into the master weights
    // (Model::master) and the gradients
    AdamW adamw;
    std::unique_ptr<Muon> muon;
    double muon_scale = 1.0;  // Muon's lr / AdamW's lr (the schedule's shape is shared)
    float* norm2 = nullptr;   // the last step's squared gradient norm (device)
    // A step's results: its loss and gradient norm copied to pinned memory, events where its work starts and
    // ends. finish() reads the step just launched; with keep_in_flight() the next step takes the next slot, and
    // finish_previous() reads the one before while the GPU runs it (three slots: a step's time is measured from
    // the end of the one before it, whose slot is then still unused).
    struct Slot {
        double* loss = nullptr;  // (pinned)
        float* norm2 = nullptr;  // (pinned)
        cudaEvent_t start = nullptr, done = nullptr;
        long valid = 0;          // its valid targets, and its loss once read
        double loss_sum = 0;
        bool loss_read = false, chained = false;  // chained: launched while the step before was in flight
    };
    Slot slots[3];
    int cur = 0;             // the slot of the step being launched
    bool in_flight = false;  // the step before it was kept in flight and is not read yet

    static AdamWConfig adamw_config(const OptimArgs& a) {
        AdamWConfig c;
        c.beta1 = a.beta1; c.beta2 = a.beta2; c.eps = a.eps; c.weight_decay = a.weight_decay; c.grad_clip = a.grad_clip;
        return c;
    }

    // lr: AdamW's peak (Muon's is muon_lr, or the same); the model is sharded for this rank
    // (Model(cfg, comm.world, comm.rank, ...))
    Trainer(Model& m, Comm& c, const OptimArgs& a, float lr)
        : model(m), comm(c), bounds(m.shard.bounds), begin(m.shard.begin), end(m.shard.end),
          reducer(c, m.shard, m.grads, m.grad_shard),
          adamw(shard_view(adamw_tensors(m.layout, a.optimizer == "muon"), begin, end), 0, end - begin, adamw_config(a)) {
        m.use_graph = !a.eager;
        if (m.shard.world != c.world || m.shard.rank != c.rank)
            THROW("the model is sharded for rank %d of %d, this is rank %d of %d", m.shard.rank, m.shard.world, c.rank,
                  c.world);
        for (Slot& sl : slots) {
            cudaCheck(cudaMallocHost(&sl.loss, sizeof(double)));
            cudaCheck(cudaMallocHost(&sl.norm2, sizeof(float)));
            cudaCheck(cudaEventCreate(&sl.start));
            cudaCheck(cudaEventCreate(&sl.done));
        }
        if (a.optimizer != "muon") return;
        std::vector<MuonMatrix> mats;
        for (auto& t : m.layout.tensors)
            if (t.block_matrix && t.offset >= begin && t.offset < end) mats.push_back({t.offset - begin, t.shape[0], t.shape[1]});
        MuonConfig mc;
        mc.momentum = a.muon_momentum; mc.weight_decay = a.weight_decay; mc.grad_clip = a.grad_clip;
        if (!mats.empty()) muon = std::make_unique<Muon>(mats, mc);
        muon_scale = a.muon_lr > 0 ? a.muon_lr / lr : 1.0;
    }
    Trainer(const Trainer&) = delete;
    Trainer& operator=(const Trainer&) = delete;
    ~Trainer() {
        for (Slot& sl : slots) {
            cudaFreeHost(sl.loss);
            cudaFreeHost(sl.norm2);
            cudaEventDestroy(sl.start);
            cudaEventDestroy(sl.done);
        }
    }

    // The step's valid targets over every rank (the loss is their mean)
    long count_valid(const int* targets, size_t n) const {
        long valid = 0;
        for (size_t i = 0; i < n; i++) valid += targets[i] >= 0;
        return comm.sum(valid);
    }

    // A step is launched, then waited for once: accumulate() and update() queue their work on the
    // GPU and return (their arrays are copied before they do), so the host can draw the next batch
    // while the GPU runs this one; finish() waits and gives the step's loss and gradient norm (or,
    // after keep_in_flight(), finish_previous() once the next step is launched).
    // loss() reads the loss early, before update() (one more wait: a loss spike is caught before
    // it is applied, and discard() drops the step).
    //
    // Forward and backward of `passes` micro-batches of the model's B x T, one after another
    // in the arrays of `step` (each rank its own; weights and pos may be null). One rank: the
    // gradients are zeroed first and accumulate. Several: each pass's are reduced onto their
    // owners during its backward, the first pass's written into the shards, the others added.
    // valid: count_valid's total, the loss's denominator.
    void accumulate(const Batch& step, int passes, long valid, float z_loss) {
        const size_t local = (size_t)model.B * model.T;
        const bool sharded = model.shard.sharded();
        Slot& sl = slots[cur];
        sl.chained = in_flight;
        cudaCheck(cudaEventRecord(sl.start, 0));
        if (sharded) model.grads_done = [this](size_t lo, bool last, cudaStream_t s) { reducer.ready(lo, last, s); };
        else model.zero_grad();
        for (int p = 0; p < passes; p++) {
            if (sharded) reducer.begin(p == 0, 0);
            auto at = [&](auto* a) { return a ? a + p * local : nullptr; };
            model.train_micro_batch({at(step.inputs), at(step.targets), at(step.weights), at(step.pos)}, 1.0f / valid,
                                    z_loss);
        }
        model.grads_done = nullptr;
        model.loss_sum_to_host(0, sl.loss);
        sl.valid = valid;
        sl.loss_read = false;
    }

    // the step's loss over every rank: waits for the step's work queued so far
    double loss() {
        if (!slots[cur].loss_read) cudaCheck(cudaStreamSynchronize(0));
        return summed_loss(slots[cur]);
    }

    // the step is dropped (a loss spike): wait for the reductions already launched, apply nothing
    // (the next step's first micro-batch overwrites the shards)
    void discard() { reducer.finish(0); }

    // The update at learning rate lr for step t (from 1), queued on stream s; its global gradient
    // norm (summed from the owners' shards) is copied back for finish().
    void update(float lr, int t, cudaStream_t s = 0) {
        reducer.finish(s);
        model.phase("optimizer", s);
        norm2 = adamw.grad_norm_squared(model.grad_shard, end - begin, s);
        comm.allreduce_sum(norm2, 1, s);
        adamw.step(model.master(), model.grad_shard, norm2, lr, t, s);
        if (muon) muon->step(model.master(), model.grad_shard, norm2, (float)(lr * muon_scale), s);
        comm.all_gather(model.params, bounds, s);
        cudaCheck(cudaMemcpyAsync(slots[cur].norm2, norm2, sizeof(float), cudaMemcpyDeviceToHost, s));
        cudaCheck(cudaEventRecord(slots[cur].done, s));
    }

    // ms: the GPU's time for the step, from the end of the step before it when it was launched behind that one
    // (what a run of steps in flight takes a step), else from its start
    struct StepResult { double loss; float norm; float ms; };
    // waits for the step (accumulate, update) on stream s
    StepResult finish(cudaStream_t s = 0) {
        comm.wait(s);
        cudaCheck(cudaStreamSynchronize(s));
        return result(cur);
    }
    // The step just launched stays in flight: the next one takes the next slot, and finish_previous() reads
    // this one (so the host draws, uploads and launches the next step while the GPU runs this one)
    void keep_in_flight() {
        in_flight = true;
        cur = (cur + 1) % 3;
    }
    // waits for the step kept in flight (not for the one launched after it) and gives its results
    StepResult finish_previous() {
        if (!in_flight) THROW("finish_previous: no step is in flight");
        const int k = (cur + 2) % 3;
        comm.wait_event(slots[k].done);
        cudaCheck(cudaEventSynchronize(slots[k].done));
        in_flight = false;
        return result(k);
    }
    StepResult result(int k) {
        Slot& sl = slots[k];
        float ms = 0;
        cudaCheck(cudaEventElapsedTime(&ms, sl.chained ? slots[(k + 2) % 3].done : sl.start, sl.done));
        return {summed_loss(sl), std::sqrt(*sl.norm2), ms};
    }
    // the loss copied back by the step's work, summed over the ranks once a step
    double summed_loss(Slot& sl) {
        if (!sl.loss_read) {
            sl.loss_sum = comm.sum(*sl.loss) / sl.valid;
            sl.loss_read = true;
        }
        return sl.loss_sum;
    }

    size_t state_bytes() const { return (2 * adamw.n_state + (muon ? muon->state_floats() : 0)) * sizeof(float); }
    OptState state() const {
        OptState st(2);
        st[0].first = "adamw.m";
        st[1].first = "adamw.v";
        adamw.get_state(st[0].second, st[1].second);
        if (muon) {
            st.push_back({"muon.momentum", {}});
            muon->get_state(st.back().second);
        }
        return st;
    }
    void set_state(const OptState& st) {
        adamw.set_state(st[0].second, st[1].second);
        if (muon) muon->set_state(st[2].second);
    }

    // every rank writes its master shard and optimizer state; rank 0 the main file
    std::string save(const std::string& dir, const TrainState& st) {
        return checkpoint_save(dir, st, model.get_master(), state(), model.cfg, comm.rank, comm.world,
                               [&] { comm.barrier(); });
    }
    // every rank reads its master shard and optimizer state; the bf16 weights of the other
    // ranks' ranges come from their owners
    TrainState load(const std::string& path) {
        TrainState st;
        OptState os = state();  // the arrays this run holds, filled from the file
        model.set_master_shard(checkpoint_load(path, st, os, model.cfg, comm.rank, comm.world));
        comm.all_gather(model.params, bounds, 0);
        comm.wait(0);
        set_state(os);
        return st;
    }
};
