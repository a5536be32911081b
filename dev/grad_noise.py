#!/usr/bin/env python3
"""The bf16 noise floor of every gradient that test_gpu's model cases compare with the float64 dumps, per variant.

test/pytorch_ref.py computes it (bf16_errors: its models again with bf16 rounding at the engine's rounding points,
forward and gradient, each variant rounding at a different subset of the points) and writes each gradient's largest
distance over the variants into the dumps as noise.grad.<name>; test_model holds the gradient to max(kGradTol,
kNoiseFactor x that). Printed, per variant: the tensors whose floor reaches kGradTol / kNoiseFactor = 0.025 in some
variant, those whose tolerance rises above the fixed 0.05.

usage: /usr/bin/python3 dev/grad_noise.py [MODEL ...]      (default: every model of pytorch_ref.py)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test"))
import pytorch_ref as R  # noqa: E402

GRAD_TOL, NOISE_FACTOR = 0.05, 2.0  # test_model's kGradTol and kNoiseFactor


def main():
    names = sys.argv[1:] or list(R.CONFIGS)
    shown = GRAD_TOL / NOISE_FACTOR
    for name in names:
        spec = R.CONFIGS[name]
        exact = R.bf16_gradients(spec, ())
        errs = R.bf16_errors(spec, exact)
        noisy = [k for k in exact if max(e[k] for e in errs.values()) >= shown]
        print(f"{name}: {len(exact)} gradients, {len(noisy)} with a variant at >= {shown:g} rel L2"
              + (" (variants: " + "; ".join(errs) + ")" if noisy else ""))
        for k in noisy:
            print(f"  grad.{k:24s} |ref| {exact[k].norm().item():.2e}  " +
                  "  ".join(f"{errs[v][k]:.4f}" for v in errs))


if __name__ == "__main__":
    main()
