#!/usr/bin/env python3
"""Anchor (reference) numbers from PyTorch + mamba_ssm's Triton code.

Run from the repository root:  python3 dev/anchor_mamba_ssm.py

Needs: a CUDA GPU, torch, triton, einops, packaging; the mamba source checkout
in anchors/mamba (its CUDA extensions need NOT be built: mamba_ssm/__init__.py,
which imports selective_scan_cuda, is never executed).

Part A: mamba_chunk_scan_combined (SSD Triton kernels), forward and fwd+bwd,
        timed with triton.testing.do_bench (median), at the shapes of
        dev/bench_ssd.cu, plain and with packed documents (seq_idx); one line
        per shape, "anchor ssd B4 T4096 H64 P64 N128 G1: fwd 0.563 ms | fwd+bwd
        4.367 ms" ("anchor ssd-docs ..." with documents), which the benchmark
        reads through ANCHOR_LOG (dev/anchors.h). Then the plain case again
        replayed from a CUDA graph (triton.testing.do_bench_cudagraph): the
        Python launches between the kernels are not timed, which bound the
        eager figures on hosts with slow CPUs ("anchor ssd-graph ..."; a
        capture that fails is logged and skipped; --no-graph skips it).
Part B: a Mamba-2 370M language model (48 x [h = h + Mamba2(RMSNorm(h))],
        d_model 1024, tied embeddings), fp32 weights, bf16 autocast, fused
        AdamW, batch 8 x 2048 random tokens: ms/step, tokens/s, peak memory.
"""

import argparse
import gc
import importlib.machinery
import importlib.util
import math
import os
import re
import sys
import time
import traceback
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network on the GPU machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAMBA_ROOT = os.path.join(ROOT, "anchors", "mamba")  # git-ignored checkout of state-spaces/mamba
MAMBA_PKG = os.path.join(MAMBA_ROOT, "mamba_ssm")


def log(*args):
    print(*args, flush=True)


# --------------------------------------------------------------------------
# Import mamba_ssm's pure-Python / Triton modules without its __init__.py
# --------------------------------------------------------------------------
def install_mamba_namespace():
    """Register `mamba_ssm` as an (unexecuted) package whose __path__ is the
    source folder, so `import mamba_ssm.ops.triton.ssd_combined` etc. work
    without running mamba_ssm/__init__.py (which imports the unbuilt
    selective_scan_cuda extension). The subpackages' __init__.py are empty and
    are imported normally."""
    if not os.path.isfile(os.path.join(MAMBA_PKG, "ops", "triton", "ssd_combined.py")):
        raise FileNotFoundError(f"mamba_ssm source not found under {MAMBA_PKG}")
    if MAMBA_ROOT not in sys.path:
        sys.path.insert(0, MAMBA_ROOT)

    # Unbuilt CUDA extensions: a None entry in sys.modules makes `import X`
    # raise ImportError, so mamba_ssm's optional imports take their fallbacks
    # (torch's nn.Conv1d path in Mamba2) even if a broken copy were installed.
    for name in ("causal_conv1d", "selective_scan_cuda"):
        sys.modules[name] = None

    # huggingface_hub is only used by mamba2.py as a mixin base class
    # (PyTorchModelHubMixin, for save/load). Stub it only if it is missing.
    try:
        import huggingface_hub  # noqa: F401
        from huggingface_hub import PyTorchModelHubMixin  # noqa: F401
    except Exception as e:  # ImportError or a broken install
        log(f"note: huggingface_hub unavailable ({type(e).__name__}: {e}); using a stub mixin")
        hf = types.ModuleType("huggingface_hub")

        class PyTorchModelHubMixin:  # minimal stand-in, no hub features
            pass

        hf.PyTorchModelHubMixin = PyTorchModelHubMixin
        sys.modules["huggingface_hub"] = hf

    if "mamba_ssm" not in sys.modules:
        spec = importlib.machinery.ModuleSpec("mamba_ssm", None, is_package=True)
        spec.submodule_search_locations = [MAMBA_PKG]
        pkg = importlib.util.module_from_spec(spec)
        pkg.__path__ = [MAMBA_PKG]
        pkg.__file__ = None
        version = "unknown"
        try:
            with open(os.path.join(MAMBA_PKG, "__init__.py")) as f:
                m = re.search(r'__version__\s*=\s*["\']([^"\']+)["\']', f.read())
                if m:
                    version = m.group(1)
        except OSError:
            pass
        pkg.__version__ = version
        sys.modules["mamba_ssm"] = pkg
    return sys.modules["mamba_ssm"]


def mamba_commit():
    try:
        with open(os.path.join(MAMBA_ROOT, "COMMIT")) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


# --------------------------------------------------------------------------
# Part A: SSD kernel anchor
# --------------------------------------------------------------------------
# (name, batch, seqlen, nheads, headdim, dstate, ngroups): the shapes of dev/bench_ssd.cu
SSD_SHAPES = [
    ("bench", 4, 4096, 64, 64, 128, 1),  # ANCHORS.md
    ("370m", 8, 2048, 32, 64, 128, 1),   # mamba2-370m layer
    ("2.7b", 4, 2048, 80, 64, 128, 1),   # mamba2-2.7b layer
    ("T1024", 4, 1024, 64, 64, 128, 1),
    ("T512", 4, 512, 64, 64, 128, 1),
    ("B1T16k", 1, 16384, 64, 64, 128, 1),  # hybrid-1.3b layer at B1 T16384
]
SSD_CHUNK = 256
# packed documents: lengths cycled from index b in row b until the row is full (as dev/bench_ssd.cu)
DOC_LENGTHS = [100, 37, 250, 8, 1200, 64, 19, 500, 3, 180, 2000, 45]


def doc_seq_idx(batch, seqlen, dev):
    """mamba_ssm's seq_idx (batch, seqlen) int32: the index of each token's document in its row."""
    import torch
    rows = []
    for b in range(batch):
        idx, t, k, d = [], 0, b, 0
        while t < seqlen:
            n = min(DOC_LENGTHS[k % len(DOC_LENGTHS)], seqlen - t)
            idx += [d] * n
            t, k, d = t + n, k + 1, d + 1
        rows.append(idx)
    return torch.tensor(rows, dtype=torch.int32, device=dev)


def part_a(args):
    import torch
    import triton
    import triton.testing
    from mamba_ssm.ops.triton.ssd_combined import (
        mamba_chunk_scan_combined,
        ssd_chunk_scan_combined_ref,
    )

    dev = torch.device("cuda")
    names = args.ssd_shapes.split(",")
    for name, batch, seqlen, nheads, headdim, dstate, ngroups in SSD_SHAPES:
        if name not in names:
            continue
        label = f"B{batch} T{seqlen} H{nheads} P{headdim} N{dstate} G{ngroups}"
        log(f"[A] mamba_chunk_scan_combined {name}: {label} chunk={SSD_CHUNK}; x/B/C bf16, "
            f"dt/A/D/dt_bias fp32, dt_softplus")

        g = torch.Generator(device=dev)
        g.manual_seed(1234)
        x = torch.randn(batch, seqlen, nheads, headdim, device=dev, dtype=torch.bfloat16, generator=g)
        Bm = torch.randn(batch, seqlen, ngroups, dstate, device=dev, dtype=torch.bfloat16, generator=g)
        Cm = torch.randn(batch, seqlen, ngroups, dstate, device=dev, dtype=torch.bfloat16, generator=g)
        # raw dt: small noise around dt_bias; softplus(dt + dt_bias) lands in ~[1e-3, 1e-1]
        dt = 0.5 * torch.randn(batch, seqlen, nheads, device=dev, dtype=torch.float32, generator=g)
        dt0 = torch.exp(torch.rand(nheads, device=dev, generator=g) * (math.log(0.1) - math.log(1e-3))
                        + math.log(1e-3))
        dt_bias = (dt0 + torch.log(-torch.expm1(-dt0))).float()  # inverse softplus
        A = -(1.0 + 15.0 * torch.rand(nheads, device=dev, dtype=torch.float32, generator=g))  # in [-16, -1]
        D = torch.randn(nheads, device=dev, dtype=torch.float32, generator=g)
        dout = torch.randn(batch, seqlen, nheads, headdim, device=dev, dtype=torch.bfloat16, generator=g)
        leaves = [x, dt, A, Bm, Cm, D, dt_bias]

        def fwd(seq_idx=None):
            return mamba_chunk_scan_combined(x, dt, A, Bm, Cm, chunk_size=SSD_CHUNK, D=D,
                                             dt_bias=dt_bias, dt_softplus=True, seq_idx=seq_idx)

        def fwd_bwd(seq_idx=None):
            fwd(seq_idx).backward(dout)  # gradient of <out, dout> w.r.t. the inputs

        times = {}
        for docs in ([False, True] if not args.no_docs else [False]):
            seq_idx = doc_seq_idx(batch, seqlen, dev) if docs else None
            for t in leaves:
                t.requires_grad_(False)
            # the first call compiles + autotunes the Triton kernels (not timed by do_bench's median)
            t0 = time.perf_counter()
            with torch.no_grad():
                y = fwd(seq_idx)
            torch.cuda.synchronize()
            log(f"[A] first forward{' (documents)' if docs else ''}: {time.perf_counter() - t0:.1f} s; "
                f"finite={bool(torch.isfinite(y).all())}")
            if not args.no_check and not docs and name == names[0]:
                try:  # mamba_ssm's pure-torch reference on a slice, in fp32
                    sl = (slice(0, 1), slice(0, 1024))
                    with torch.no_grad():
                        ref = ssd_chunk_scan_combined_ref(x[sl].float(), dt[sl], A, Bm[sl].float(), Cm[sl].float(),
                                                          SSD_CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True)
                    err = (y[sl].float() - ref).abs().max().item()
                    log(f"[A] check vs ssd_chunk_scan_combined_ref (fp32, batch 0, first 1024 steps): "
                        f"max abs err {err:.3e} (max |ref| {ref.abs().max().item():.3e})")
                except Exception:
                    log("[A] reference check failed (timing continues):")
                    traceback.print_exc(file=sys.stdout)
                    sys.stdout.flush()
            del y
            with torch.no_grad():
                ms_fwd = triton.testing.do_bench(lambda: fwd(seq_idx), warmup=args.warmup_ms, rep=args.rep_ms,
                                                 return_mode="median")
            for t in leaves:
                t.requires_grad_(True)
            t0 = time.perf_counter()
            fwd_bwd(seq_idx)
            torch.cuda.synchronize()
            log(f"[A] first fwd+bwd{' (documents)' if docs else ''}: {time.perf_counter() - t0:.1f} s; "
                f"finite grads={all(bool(torch.isfinite(t.grad).all()) for t in leaves)}")
            ms_fb = triton.testing.do_bench(lambda: fwd_bwd(seq_idx), warmup=args.warmup_ms, rep=args.rep_ms,
                                            grad_to_none=leaves, return_mode="median")
            times[docs] = (ms_fwd, ms_fb)
        # the lines dev/bench_ssd.cu looks up (dev/anchors.h)
        log(f"anchor ssd {label}: fwd {times[False][0]:.3f} ms | fwd+bwd {times[False][1]:.3f} ms")
        if True in times:
            log(f"anchor ssd-docs {label}: fwd {times[True][0]:.3f} ms | fwd+bwd {times[True][1]:.3f} ms")
        if not args.no_graph:
            try:  # leaves still require grad: the backward is captured with the forward
                with torch.no_grad():
                    ms_fwd = triton.testing.do_bench_cudagraph(lambda: fwd(), rep=args.rep_ms, return_mode="median")
                ms_fb = triton.testing.do_bench_cudagraph(lambda: fwd_bwd(), rep=args.rep_ms, grad_to_none=leaves,
                                                          return_mode="median")
                log(f"anchor ssd-graph {label}: fwd {ms_fwd:.3f} ms | fwd+bwd {ms_fb:.3f} ms")
            except Exception as e:
                log(f"[A] CUDA-graph timing failed, skipped: {type(e).__name__}: {e}")
                torch.cuda.synchronize()
        del x, Bm, Cm, dt, dout, leaves
        gc.collect()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------
# Part B: whole-model anchor (Mamba-2 370M)
# --------------------------------------------------------------------------
def make_rmsnorm(dim, eps=1e-5):
    import torch
    import torch.nn as nn

    if hasattr(nn, "RMSNorm"):  # torch >= 2.4: torch's own RMSNorm
        return nn.RMSNorm(dim, eps=eps)

    class PlainRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (xf * self.weight).to(x.dtype)

    return PlainRMSNorm()


VOCAB = 50277
PAD_VOCAB_MULTIPLE = 8  # as mamba_ssm's MambaConfig.pad_vocab_size_multiple
VOCAB_PADDED = ((VOCAB + PAD_VOCAB_MULTIPLE - 1) // PAD_VOCAB_MULTIPLE) * PAD_VOCAB_MULTIPLE  # 50280
D_MODEL = 1024


def build_lm(n_layer, d_model=D_MODEL, vocab_padded=VOCAB_PADDED):
    """Mamba-2 LM: embedding -> n_layer x [h = h + Mamba2(RMSNorm(h))] -> RMSNorm -> tied head.
    Builds on the current default device (use `with torch.device("cuda"):`)."""
    import torch.nn as nn
    import torch.nn.functional as F
    from mamba_ssm.modules import mamba2 as mamba2_mod

    # Force the torch nn.Conv1d path inside Mamba2 (causal_conv1d is not built).
    if mamba2_mod.causal_conv1d_fn is not None:
        log("[B] note: causal_conv1d_fn was importable; forcing the torch conv1d path")
    mamba2_mod.causal_conv1d_fn = None
    Mamba2 = mamba2_mod.Mamba2

    class Block(nn.Module):
        def __init__(self, layer_idx):
            super().__init__()
            self.norm = make_rmsnorm(d_model)
            # Mamba2 defaults (d_state 128, headdim 64, expand 2, d_conv 4, chunk 256,
            # ngroups 1, gated RMSNorm) except use_mem_eff_path=False: the default fused
            # path (mamba_split_conv1d_scan_combined) calls causal_conv1d's CUDA functions.
            self.mixer = Mamba2(d_model, layer_idx=layer_idx, use_mem_eff_path=False)

        def forward(self, h):
            return h + self.mixer(self.norm(h))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(vocab_padded, d_model)
            self.layers = nn.ModuleList([Block(i) for i in range(n_layer)])
            self.norm_f = make_rmsnorm(d_model)
            nn.init.normal_(self.embedding.weight, std=0.02)

        def forward(self, ids):
            h = self.embedding(ids)
            for blk in self.layers:
                h = blk(h)
            h = self.norm_f(h)
            return F.linear(h, self.embedding.weight)  # tied LM head

    return LM()


def part_b(args):
    import torch
    import torch.nn.functional as F

    d_model, n_layer = D_MODEL, args.layers
    vocab, vocab_padded = VOCAB, VOCAB_PADDED
    batch, seqlen = args.batch, args.seqlen

    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with torch.device(dev):
        model = build_lm(n_layer)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    m0 = model.layers[0].mixer
    log(f"[B] Mamba-2 LM: d_model {d_model}, {n_layer} layers, vocab {vocab} padded to {vocab_padded}, "
        f"tied embeddings, {n_params / 1e6:.1f}M params (fp32); mixer: d_state {m0.d_state}, "
        f"headdim {m0.headdim}, nheads {m0.nheads}, expand {m0.expand}, d_conv {m0.d_conv}, "
        f"chunk {m0.chunk_size}, ngroups {m0.ngroups}, rmsnorm {m0.rmsnorm}, "
        f"use_mem_eff_path {m0.use_mem_eff_path}; norms: {type(model.norm_f).__name__}")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    log(f"[B] fused AdamW lr 1e-3 betas (0.9, 0.95) wd 0.1 on {len(decay)} matrices/embedding/conv "
        f"weights, 0 on {len(no_decay)} vectors (norm weights, biases, A_log, D, dt_bias)")

    g = torch.Generator(device=dev)
    g.manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seqlen), device=dev, generator=g)
    tgt = torch.randint(0, vocab, (batch, seqlen), device=dev, generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            logits = model(ids)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), tgt.view(-1))
        loss.backward()
        opt.step()
        return loss

    for i in range(args.warmup_steps):
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        log(f"[B] warmup step {i}: {time.perf_counter() - t0:.2f} s, loss {loss.item():.4f}")

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    dt_s = time.perf_counter() - t0
    ms_step = dt_s * 1e3 / args.steps
    tok_s = batch * seqlen * args.steps / dt_s
    peak = torch.cuda.max_memory_allocated() / 1e9
    log(f"[B] last loss {loss.item():.4f} (ln vocab = {math.log(vocab):.4f})")
    log(f"anchor mamba2-370m: {ms_step:.1f} ms/step, {tok_s:,.0f} tokens/s, peak {peak:.2f} GB "
        f"(batch {batch} x {seqlen}, {args.steps} timed steps after {args.warmup_steps} warmup)")


# --------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["a", "b", "both"], default="both")
    ap.add_argument("--warmup-ms", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench rep (ms)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--no-check", action="store_true", help="skip the Part A reference check")
    ap.add_argument("--ssd-shapes", default=",".join(sh[0] for sh in SSD_SHAPES),
                    help="Part A shapes, comma-separated (default: all of dev/bench_ssd.cu)")
    ap.add_argument("--no-docs", action="store_true", help="Part A without the packed-documents timings")
    ap.add_argument("--no-graph", action="store_true", help="Part A without the CUDA-graph timings")
    args = ap.parse_args()

    t_start = time.perf_counter()
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except Exception as e:
        triton_version = f"unavailable ({type(e).__name__}: {e})"
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton_version}")
    if not torch.cuda.is_available():
        log("error: CUDA is not available")
        return 1
    log(f"GPU: {torch.cuda.get_device_name(0)} (capability {torch.cuda.get_device_capability(0)}), "
        f"CUDA {torch.version.cuda}")

    try:
        pkg = install_mamba_namespace()
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
        import mamba_ssm.ops.triton.layernorm_gated  # noqa: F401
        import mamba_ssm.modules.mamba2 as m2
        log(f"mamba_ssm {pkg.__version__} from {MAMBA_PKG} (commit {mamba_commit()}); "
            f"causal_conv1d_fn={m2.causal_conv1d_fn}, "
            f"selective_state_update={'yes' if m2.selective_state_update is not None else 'no'}")
    except Exception:
        log("error: importing mamba_ssm from the checkout failed:")
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()
        return 1

    ok = True
    for name, part in (("a", part_a), ("b", part_b)):
        if args.part not in (name, "both"):
            continue
        try:
            part(args)
        except Exception:  # one part failing still runs the other
            ok = False
            log(f"Part {name.upper()} failed:")
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
        gc.collect()
        torch.cuda.empty_cache()
    log(f"total time {time.perf_counter() - t_start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
