"""Float64 PyTorch reference of two Muon steps (optim.cuh), written independently of the
C++/CUDA code: clip_grad_norm_ over all the matrices' gradients, momentum (Nesterov),
quintic Newton-Schulz orthogonalisation, the 0.2 sqrt(max(rows, cols)) RMS match to AdamW
and decoupled weight decay.

Writes muon_step.bin (MCTF tensor dump, format in HACKING.md):
  muon.lr, muon.momentum, muon.nesterov, muon.ns_steps, muon.weight_decay, muon.grad_clip,
  muon.count (number of matrices), clip_scale.1, clip_scale.2 (the clip factor of each step),
  and per matrix i: mats.{i}.param (rows, cols), mats.{i}.grad.1, mats.{i}.grad.2,
  mats.{i}.ns.1 (Newton-Schulz output of step 1), mats.{i}.after.1, mats.{i}.after.2
  (the parameters after each step), mats.{i}.momentum.2 (the momentum after step 2).

Usage: /usr/bin/python3 test/muon_ref.py --out test/dumps
"""
import argparse
import math
import os

import torch

from pytorch_ref import write_dump  # the MCTF dump format (HACKING.md)

torch.set_default_dtype(torch.float64)

SHAPES = [(64, 40), (33, 96), (128, 128)]
LR, MOMENTUM, NESTEROV, NS_STEPS, WD, CLIP = 0.02, 0.95, True, 5, 0.1, 1.0
# step 1's gradients are clipped (norm ~150 > 1); step 2's are not (norm ~0.15)
GRAD_SCALES = [1.0, 1e-3]


def newton_schulz5(G, steps):
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (torch.linalg.matrix_norm(G) + 1e-7)
    transposed = G.shape[0] > G.shape[1]
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum, nesterov, ns_steps, weight_decay):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        self.last_ns = []

    @torch.no_grad()
    def step(self):
        self.last_ns = []
        for group in self.param_groups:
            mom = group["momentum"]
            for p in group["params"]:
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mom).add_(g)
                u = g + mom * buf if group["nesterov"] else buf
                O = newton_schulz5(u, group["ns_steps"])
                self.last_ns.append(O.clone())
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(O, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="test/dumps")
    ap.add_argument("--force", action="store_true", help="rewrite even if the dump is up to date")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "muon_step.bin")
    if not args.force and os.path.exists(path) and os.path.getmtime(path) > os.path.getmtime(__file__):
        print(f"{path} is up to date")
        return
    gen = torch.Generator().manual_seed(4321)
    params = [torch.nn.Parameter(torch.randn(r, c, generator=gen) / math.sqrt(c)) for r, c in SHAPES]
    grads = [[torch.randn(r, c, generator=gen) * s for r, c in SHAPES] for s in GRAD_SCALES]
    opt = Muon(params, LR, MOMENTUM, NESTEROV, NS_STEPS, WD)
    records = [("muon.lr", LR), ("muon.momentum", MOMENTUM), ("muon.nesterov", float(NESTEROV)),
               ("muon.ns_steps", NS_STEPS), ("muon.weight_decay", WD), ("muon.grad_clip", CLIP),
               ("muon.count", len(SHAPES))]
    records += [(f"mats.{i}.param", p.detach().clone()) for i, p in enumerate(params)]
    for step in (1, 2):
        for i, p in enumerate(params):
            p.grad = grads[step - 1][i].clone()
            records.append((f"mats.{i}.grad.{step}", p.grad.clone()))
        norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
        records.append((f"clip_scale.{step}", min(1.0, CLIP / (norm.item() + 1e-6))))
        opt.step()
        for i, p in enumerate(params):
            records.append((f"mats.{i}.after.{step}", p.detach().clone()))
            if step == 1:
                records.append((f"mats.{i}.ns.1", opt.last_ns[i]))
    for i, p in enumerate(params):
        records.append((f"mats.{i}.momentum.2", opt.state[p]["momentum_buffer"].clone()))
    write_dump(path, records)
    print(f"wrote {path} ({len(records)} tensors)")


if __name__ == "__main__":
    main()
