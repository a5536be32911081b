#!/usr/bin/env python3
"""The bf16 noise floor of every gradient that test_gpu's model cases compare with the float64 dumps.

test/pytorch_ref.py's models run again with bf16 rounding where the engine keeps bf16 (the weights as matmul
operands, the norms' outputs, the mixers' inner results and outputs, the logits) and the gradients flowing back
through those points rounded the same way. Each variant rounds at a different subset of the points, as one kernel
or another rounds at different places; the relative L2 distance of its gradients from the float64 ones is what a
correct bf16 implementation can land on. Printed: the tensors whose distance reaches half of test_model's
tolerance (kGradTol = 0.05) in some variant.

usage: /usr/bin/python3 dev/grad_noise.py [MODEL ...]      (default: every model of pytorch_ref.py)
"""
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test"))
import pytorch_ref as R  # noqa: E402

GRAD_TOL = 0.05
POINTS = ("norm", "inner", "mixer", "weights", "logits")
VARIANTS = {"all": POINTS, "no mixer outputs": ("norm", "inner", "weights", "logits"),
            "no inner results": ("norm", "mixer", "weights", "logits"), "weights and norms": ("norm", "weights")}


class RoundBoth(torch.autograd.Function):
    """bf16 rounding forward, and of the gradient backward"""
    @staticmethod
    def forward(ctx, x):
        return x.to(torch.bfloat16).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.to(torch.bfloat16).to(g.dtype)


def rounded(fn):
    return lambda *a, **k: RoundBoth.apply(fn(*a, **k))


def gradients(name, points):
    ref = importlib.reload(R)  # a fresh module: patches of the previous variant gone
    if "norm" in points:
        ref.rmsnorm, ref.gated_rmsnorm = rounded(ref.rmsnorm), rounded(ref.gated_rmsnorm)
    if "inner" in points:
        ref.ssm_scan, ref.selective_scan = rounded(ref.ssm_scan), rounded(ref.selective_scan)
        ref.causal_attention = rounded(ref.causal_attention)
        ref.LM.conv = rounded(ref.LM.conv)
    if "mixer" in points:
        for m in ("mamba2_mixer", "mamba1_mixer", "attention", "mlp"):
            setattr(ref.LM, m, rounded(getattr(ref.LM, m)))
    spec = ref.CONFIGS[name]
    model, inputs, targets, weights = ref.model_and_batch(spec)
    leaves = model.params
    if "weights" in points:  # the bf16 copy in the forward, the gradient to the full-precision leaf
        model.params = {k: v + (v.to(torch.bfloat16).to(v.dtype) - v).detach() if v.dim() >= 2 else v
                        for k, v in leaves.items()}
    logits = model.forward(inputs)
    if "logits" in points:
        logits = RoundBoth.apply(logits)
    ref.loss_fn(logits, targets, weights, spec["z_loss"]).backward()
    return {k: v.grad.clone() for k, v in leaves.items()}


def main():
    names = sys.argv[1:] or list(R.CONFIGS)
    for name in names:
        exact = gradients(name, ())
        errs = {}
        for v, points in VARIANTS.items():
            g = gradients(name, points)
            errs[v] = {k: ((g[k] - exact[k]).norm() / exact[k].norm()).item() for k in exact}
        noisy = [k for k in exact if max(errs[v][k] for v in VARIANTS) >= GRAD_TOL / 2]
        print(f"{name}: {len(exact)} gradients, {len(noisy)} with a variant at >= {GRAD_TOL / 2:g} rel L2"
              + (" (variants: " + "; ".join(VARIANTS) + ")" if noisy else ""))
        for k in noisy:
            print(f"  grad.{k:24s} |ref| {exact[k].norm().item():.2e}  " +
                  "  ".join(f"{errs[v][k]:.4f}" for v in VARIANTS))


if __name__ == "__main__":
    main()
