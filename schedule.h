// Learning-rate schedules and the batch-size ramp-up (no CUDA).
#pragma once
#include <algorithm>
#include <cmath>
#include <string>
#include "common.h"

// Learning-rate schedules, in one unit the caller picks (optimizer steps or tokens).
//   constant: linear warmup from 0, then peak
//   cosine:   linear warmup, cosine from peak to min_lr at total, min_lr after
//   wsd:      linear warmup, peak until decay_start, linear to min_lr at total
struct LRSchedule {
    std::string kind;
    double peak = 0, min_lr = 0;
    long warmup = 0, total = 0, decay_start = 0;

    static LRSchedule make(const std::string& kind, double peak, double min_lr, long warmup, long total) {
        if (peak < 0 || min_lr < 0) THROW("learning rates must be >= 0 (peak %g, min %g)", peak, min_lr);
        if (warmup < 0) THROW("warmup must be >= 0, got %ld", warmup);
        if (kind != "constant" && warmup > total) THROW("warmup %ld is longer than the schedule's total %ld", warmup, total);
        LRSchedule s;
        s.kind = kind; s.peak = peak; s.min_lr = min_lr; s.warmup = warmup; s.total = total;
        return s;
    }
    static LRSchedule constant(double peak, long warmup) { return make("constant", peak, peak, warmup, warmup); }
    static LRSchedule cosine(double peak, double min_lr, long warmup, long total) {
        return make("cosine", peak, min_lr, warmup, total);
    }
    // decay start as a fraction of total (stable_fraction >= 0) or as a position (decay_start)
    static LRSchedule wsd(double peak, double min_lr, long warmup, long total, double stable_fraction, long decay_start) {
        LRSchedule s = make("wsd", peak, min_lr, warmup, total);
        if (stable_fraction >= 0) {
            if (stable_fraction > 1) THROW("WSD stable fraction must be in [0, 1], got %g", stable_fraction);
            decay_start = (long)std::llround(stable_fraction * total);
        }
        if (decay_start < warmup || decay_start > total)
            THROW("WSD decay start %ld must lie between the warmup end %ld and the total %ld", decay_start, warmup, total);
        s.decay_start = decay_start;
        return s;
    }

    double at(long t) const {
        if (t < warmup) return peak * (double)t / warmup;
        if (kind == "constant") return peak;
        if (t >= total) return min_lr;
        if (kind == "cosine") {
            double p = (double)(t - warmup) / std::max(1L, total - warmup);
            return min_lr + 0.5 * (peak - min_lr) * (1.0 + std::cos(M_PI * p));
        }
        if (t < decay_start) return peak;  // wsd
        return peak + (min_lr - peak) * (double)(t - decay_start) / std::max(1L, total - decay_start);
    }

    std::string describe() const {
        if (kind == "constant") return strformat("constant %g after %ld warmup", peak, warmup);
        if (kind == "cosine") return strformat("cosine %g -> %g over %ld, warmup %ld", peak, min_lr, total, warmup);
        return strformat("wsd %g, warmup %ld, stable to %ld, linear to %g at %ld", peak, warmup, decay_start, min_lr, total);
    }
};

// Batch-size ramp-up (SPEC.md section 3): the tokens of one optimizer step grow linearly
// from `start` to `target` over the first `ramp_tokens` tokens of the run, in whole
// micro-batches of `micro` tokens (at least one).
struct BatchRamp {
    long start = 0, target = 0, ramp_tokens = 0, micro = 1;
    long at(long tokens_seen) const {
        if (ramp_tokens <= 0 || tokens_seen >= ramp_tokens) return target;
        const double b = start + (double)(target - start) * (double)tokens_seen / (double)ramp_tokens;
        const long n = std::max(1L, (long)(b / (double)micro));
        return std::min(n * micro, target);
    }
};
