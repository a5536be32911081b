// One training step for every binary: train_mamba (its runs and --bench) and finetune_mamba
// go through the same Trainer, so fine-tuning has Muon and several GPUs (ZeRO-1) too.
//
// A step: the forward and backward of its micro-batches (gradient accumulation; the last
// one's gradients are reduced onto their owners while its backward runs), the loss as the
// mean over the step's valid targets on every rank, then the update: the global gradient
// norm, AdamW (and Muon for the blocks' matrices) over this rank's range of the parameter
// buffer, and the new bf16 weights shared with every rank.
#pragma once
#include <memory>
#include <string>
#include <vector>
#include "mamba.cuh"
#include "optim.cuh"
#include "comm.cuh"
#include "checkpoint.cuh"
#include "flags.h"

// the optimizer flags both binaries take
struct OptimArgs {
    std::string optimizer = "adamw";  // adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    float weight_decay = 0.1f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, grad_clip = 1.0f;
    float muon_lr = 0, muon_momentum = 0.95f;  // muon_lr 0: the AdamW peak lr
    double bucket_mb = 32;                     // gradient reduction buckets (several GPUs)
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
          "several GPUs: gradients reduced during the backward in buckets of F MiB\n(0: all at once after the backward)",
          Range::at_least(0));
}

struct Trainer {
    Model& model;
    Comm& comm;
    std::vector<size_t> bounds;  // rank r owns [bounds[r], bounds[r + 1]) of the parameter buffer
    size_t begin, end;
    GradReducer reducer;
    AdamW adamw;
    std::unique_ptr<Muon> muon;
    double muon_scale = 1.0;  // Muon's lr / AdamW's lr (the schedule's shape is shared)
    float* norm2 = nullptr;   // the last step's squared gradient norm (device)

    static AdamWConfig adamw_config(const OptimArgs& a) {
        AdamWConfig c;
        c.beta1 = a.beta1; c.beta2 = a.beta2; c.eps = a.eps; c.weight_decay = a.weight_decay; c.grad_clip = a.grad_clip;
        return c;
    }

    // lr: AdamW's peak (Muon's is muon_lr, or the same)
    Trainer(Model& m, Comm& c, const OptimArgs& a, float lr)
        : model(m), comm(c), bounds(param_ranges(m.layout, c.world)), begin(bounds[c.rank]), end(bounds[c.rank + 1]),
          reducer(c, bounds, (size_t)(a.bucket_mb * (1 << 20) / sizeof(float))),
          adamw(adamw_tensors(m.layout, a.optimizer == "muon"), begin, end, adamw_config(a)) {
        if (a.optimizer != "muon") return;
        std::vector<MuonMatrix> mats;
        for (auto& t : m.layout.tensors)
            if (t.block_matrix && t.offset >= begin && t.offset < end) mats.push_back({t.offset, t.shape[0], t.shape[1]});
        MuonConfig mc;
        mc.momentum = a.muon_momentum; mc.weight_decay = a.weight_decay; mc.grad_clip = a.grad_clip;
        if (!mats.empty()) muon = std::make_unique<Muon>(mats, mc);
        muon_scale = a.muon_lr > 0 ? a.muon_lr / lr : 1.0;
    }

    // The step's valid targets over every rank (the loss is their mean)
    long count_valid(const int* targets, size_t n) const {
        long valid = 0;
        for (size_t i = 0; i < n; i++) valid += targets[i] >= 0;
        return comm.sum(valid);
    }

    // Forward and backward of `passes` micro-batches of the model's B x T, one after another
    // in the arrays of `step` (each rank its own; weights and pos may be null). The gradients
    // are zeroed first and accumulate; the last pass's backward reduces them onto their
    // owners. Returns the step's loss (valid: count_valid's total).
    double accumulate(const Batch& step, int passes, long valid, float z_loss) {
        const size_t local = (size_t)model.B * model.T;
        model.zero_grad();
        for (int p = 0; p < passes; p++) {
            model.grads_done = nullptr;
            if (comm.multi() && p == passes - 1) {
                reducer.begin();
                model.grads_done = [this](size_t lo, bool last, cudaStream_t s) { reducer.ready(model.grads, lo, last, s); };
            }
            auto at = [&](auto* a) { return a ? a + p * local : nullptr; };
            model.forward({at(step.inputs), at(step.targets), at(step.weights), at(step.pos)}, 1.0f / valid, z_loss);
            model.backward();
        }
        model.grads_done = nullptr;
        return comm.sum(model.loss_sum()) / valid;  // the step's one read of the loss
    }

    // the step is dropped (a loss spike): wait for the reductions already launched, apply nothing
    void discard() { reducer.finish(0); }

    // The update at learning rate lr for step t (from 1); returns the global gradient norm.
    float update(float lr, int t, cudaStream_t s = 0) {
        reducer.finish(s);
        model.phase("optimizer", s);
        norm2 = adamw.grad_norm_squared(model.grads + begin, end - begin, s);
        comm.allreduce_sum(norm2, 1, s);
        adamw.step(model.master, model.params, model.grads, norm2, lr, t, s);
        if (muon) muon->step(model.master, model.params, model.grads, norm2, (float)(lr * muon_scale), s);
        comm.broadcast_ranges(model.params, bounds, s);
        comm.wait(s);
        float h;
        cudaCheck(cudaMemcpyAsync(&h, norm2, sizeof(float), cudaMemcpyDeviceToHost, s));
        cudaCheck(cudaStreamSynchronize(s));
        return std::sqrt(h);
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

    // every rank writes its part; rank 0 the weights (gathered from their owners first)
    std::string save(const std::string& dir, const TrainState& st) {
        if (comm.multi()) {
            comm.broadcast_ranges(model.master, bounds, 0);
            comm.wait(0);
        }
        const std::vector<float> master = comm.root() ? model.get_master() : std::vector<float>();
        return checkpoint_save(dir, st, master, state(), model.cfg, comm.rank, comm.world, [&] { comm.barrier(); });
    }
    TrainState load(const std::string& path) {
        TrainState st;
        OptState os = state();  // the arrays this run holds, filled from the file
        model.set_master(checkpoint_load(path, st, os, model.cfg, comm.rank, comm.world));
        set_state(os);
        return st;
    }
};
