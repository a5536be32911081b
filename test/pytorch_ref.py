"""Float64 PyTorch reference of the language models (Mamba-2, Mamba-1, attention and MLP
layers in any pattern), written independently of the C++/CUDA code (Mamba-2's SSM in its
quadratic form over the whole sequence, where the C++ reference runs the sequential
recurrence; autograd does every backward).

For each config X it writes X.bin (MCTF tensor dump, format in HACKING.md) and X.json
(train_mamba's model config): inputs, targets, loss weights, parameters (unpadded vocab),
logits, loss, every gradient, then the losses of 10 AdamW steps on the same batch, then each
gradient's bf16 noise floor (bf16_errors below), which sets its tolerance in test_model.

Usage: /usr/bin/python3 test/pytorch_ref.py --out test/dumps
"""
import argparse
import importlib.util
import json
import math
import os
import struct

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
torch.set_num_threads(os.cpu_count() or 1)

CONFIGS = {
    "mamba2_tiny": dict(
        model=dict(vocab_size=1000, d_model=128, n_layer=2, pattern="MM", ssm="mamba2", d_state=64, headdim=64,
                   ngroups=2, expand=2, d_conv=4, chunk_size=256, tie_embeddings=False, norm_eps=1e-5),
        B=2, T=300, z_loss=1e-4, positional_weights=True, masked_targets=7, seed=1234),
    "mamba2_tied": dict(
        model=dict(vocab_size=777, d_model=64, n_layer=3, pattern="MMM", ssm="mamba2", d_state=128, headdim=64,
                   ngroups=1, expand=2, d_conv=4, chunk_size=64, tie_embeddings=True, norm_eps=1e-5),
        B=3, T=77, z_loss=0.0, positional_weights=False, masked_targets=0, seed=4321),
    "mamba1_tiny": dict(
        model=dict(vocab_size=1000, d_model=128, n_layer=2, pattern="MM", ssm="mamba1", d_state=16, expand=2,
                   d_conv=4, dt_rank=8, tie_embeddings=False, norm_eps=1e-5),
        B=2, T=150, z_loss=1e-4, positional_weights=True, masked_targets=5, seed=99),
    "hybrid_tiny": dict(
        model=dict(vocab_size=500, d_model=128, n_layer=6, pattern="M*+M+*", ssm="mamba2", d_state=64, headdim=32,
                   ngroups=2, expand=2, d_conv=4, chunk_size=64, n_heads=4, n_kv_heads=2, attn_head_dim=64,
                   rope=False, mlp="gelu", d_ff=256, tie_embeddings=False, norm_eps=1e-5),
        B=2, T=100, z_loss=0.0, positional_weights=True, masked_targets=3, seed=7),
    "transformer_tiny": dict(
        model=dict(vocab_size=300, d_model=128, n_layer=4, pattern="*+*+", n_heads=4, n_kv_heads=1,
                   attn_head_dim=64, rope=True, rope_theta=10000.0, mlp="swiglu", d_ff=192, tie_embeddings=True,
                   norm_eps=1e-5),
        # at 3e-3 this batch's loss oscillates (4.32 -> 4.39 -> 3.96 at steps 5-7): bf16 rounding
        # then moves it by several percent, so the ten steps run at 1e-3
        B=2, T=70, z_loss=1e-4, positional_weights=False, masked_targets=0, seed=2024, lr=1e-3),
}
ADAMW = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)
ADAMW_STEPS = 10


def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def gated_rmsnorm(y, z, w, groups, eps):
    # mamba_ssm RMSNormGated, norm_before_gate=False: normalise y * silu(z) per group
    v = y * F.silu(z)
    vg = v.view(*v.shape[:-1], groups, v.shape[-1] // groups)
    vg = vg * torch.rsqrt(vg.pow(2).mean(-1, keepdim=True) + eps)
    return vg.view_as(v) * w


def ssm_scan(x, Bm, Cm, dt, A, D):
    """x (B,T,H,P), Bm/Cm (B,T,G,N), dt (B,T,H), A (H). The recurrence S_t = exp(dt_t A) S_{t-1} +
    dt_t x_t B_t^T, y_t = S_t C_t + D x_t, evaluated in its quadratic (attention-like) form over the
    whole sequence: y_t = sum_{s<=t} exp(sum_{s<r<=t} dt_r A) (C_t . B_s) dt_s x_s + D x_t."""
    T, H = x.shape[1], x.shape[2]
    G = Bm.shape[2]
    cum = torch.cumsum(dt * A, dim=1).transpose(1, 2)  # (B,H,T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    # mask before exp: above the diagonal the exponent is positive and must not reach the graph
    decay = torch.exp((cum[:, :, :, None] - cum[:, :, None, :]).masked_fill(~causal, -math.inf))
    CB = torch.einsum("btgn,bsgn->bgts", Cm, Bm).repeat_interleave(H // G, dim=1)  # head h: group h // (H/G)
    dtx = (dt[..., None] * x).transpose(1, 2)  # (B,H,T,P)
    return ((decay * CB) @ dtx).transpose(1, 2) + D[:, None] * x


def selective_scan(u, delta, A, Bm, Cm, D):
    """Mamba-1: u, delta (B,T,D), A (D,N), Bm/Cm (B,T,N). The recurrence h_t = exp(delta_t A) h_{t-1} +
    delta_t B_t u_t, y_t = C_t . h_t + D u_t, stepped through time."""
    Bsz, T, Dd = u.shape
    h = torch.zeros(Bsz, Dd, A.shape[1])
    ys = []
    for t in range(T):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1) + D * u


def rope(x, theta):
    """rotate-half RoPE on (B,T,H,Dh): pairs (i, i + Dh/2) turn by t * theta^(-2i/Dh)."""
    T, Dh = x.shape[1], x.shape[3]
    freq = theta ** (-torch.arange(0, Dh // 2, dtype=torch.float64) * 2 / Dh)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]  # (T, Dh/2)
    cos, sin = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
    x1, x2 = x[..., : Dh // 2], x[..., Dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def causal_attention(q, k, v):
    """q (B,T,Hq,Dh), k/v (B,T,Hkv,Dh); query head h reads kv head h // (Hq/Hkv)."""
    T, Hq, Dh = q.shape[1], q.shape[2], q.shape[3]
    rep = Hq // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(Dh)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    return torch.einsum("bhts,bshd->bthd", torch.softmax(s, dim=-1), v)


class LM:
    """Embedding -> one pre-norm residual block per pattern symbol -> final norm -> LM head."""

    def __init__(self, cfg, gen):
        self.cfg = c = cfg
        d, V = c["d_model"], c["vocab_size"]
        self.pattern = c.get("pattern", "M" * c["n_layer"])
        L = len(self.pattern)
        self.d_inner = c.get("expand", 2) * d
        di, K = self.d_inner, c.get("d_conv", 4)

        def uniform(shape, bound):
            return (torch.rand(shape, generator=gen) * 2 - 1) * bound

        def dt_bias(n):  # softplus(dt_bias) log-uniform in [1e-3, 1e-1], floor 1e-4
            dt = torch.exp(torch.rand(n, generator=gen) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
            dt = dt.clamp(min=1e-4)
            return dt + torch.log(-torch.expm1(-dt))  # inverse softplus

        # mamba_ssm-style init; names and order as in HACKING.md
        p = {"embedding": torch.randn(V, d, generator=gen) * 0.02}
        for i, kind in enumerate(self.pattern):
            pre = f"layers.{i}."
            p[pre + "norm"] = torch.ones(d)
            if kind == "M" and c["ssm"] == "mamba2":
                G, N = c["ngroups"], c["d_state"]
                H = di // c["headdim"]
                conv_dim = di + 2 * G * N
                p[pre + "in_proj"] = uniform((2 * di + 2 * G * N + H, d), 1 / math.sqrt(d))  # kaiming-uniform
                p[pre + "conv_weight"] = uniform((conv_dim, K), 1 / math.sqrt(K))  # Conv1d default, fan_in = K
                p[pre + "conv_bias"] = uniform((conv_dim,), 1 / math.sqrt(K))
                p[pre + "dt_bias"] = dt_bias(H)
                p[pre + "A_log"] = torch.log(torch.rand(H, generator=gen) * 15 + 1)  # A in U[1, 16]
                p[pre + "D"] = torch.ones(H)
                p[pre + "gate_norm"] = torch.ones(di)
                p[pre + "out_proj"] = uniform((d, di), 1 / math.sqrt(di)) / math.sqrt(L)
            elif kind == "M":
                N, R = c["d_state"], c["dt_rank"]
                p[pre + "in_proj"] = uniform((2 * di, d), 1 / math.sqrt(d))
                p[pre + "conv_weight"] = uniform((di, K), 1 / math.sqrt(K))
                p[pre + "conv_bias"] = uniform((di,), 1 / math.sqrt(K))
                p[pre + "x_proj"] = uniform((R + 2 * N, di), 1 / math.sqrt(di))
                p[pre + "dt_proj"] = uniform((di, R), 1 / math.sqrt(R))
                p[pre + "dt_bias"] = dt_bias(di)
                p[pre + "A_log"] = torch.log(torch.arange(1, N + 1, dtype=torch.float64)).repeat(di, 1)  # S4D-real
                p[pre + "D"] = torch.ones(di)
                p[pre + "out_proj"] = uniform((d, di), 1 / math.sqrt(di)) / math.sqrt(L)
            elif kind == "*":
                Hq, Hkv, Dh = c["n_heads"], c["n_kv_heads"], c["attn_head_dim"]
                p[pre + "qkv_proj"] = uniform(((Hq + 2 * Hkv) * Dh, d), 1 / math.sqrt(d))
                p[pre + "o_proj"] = uniform((d, Hq * Dh), 1 / math.sqrt(Hq * Dh)) / math.sqrt(L)
            else:
                ff = c["d_ff"]
                up = 2 * ff if c["mlp"] == "swiglu" else ff
                p[pre + "up_proj"] = uniform((up, d), 1 / math.sqrt(d))
                p[pre + "down_proj"] = uniform((d, ff), 1 / math.sqrt(ff)) / math.sqrt(L)
        p["final_norm"] = torch.ones(d)
        if not c["tie_embeddings"]:
            p["lm_head"] = uniform((V, d), 1 / math.sqrt(d))
        self.params = {k: v.requires_grad_() for k, v in p.items()}

    def conv(self, pre, x):
        # causal depthwise conv as mamba_ssm runs it: pad K-1 both sides, keep the first T outputs
        K, T = self.cfg.get("d_conv", 4), x.shape[1]
        w, b = self.params[pre + "conv_weight"], self.params[pre + "conv_bias"]
        return F.silu(F.conv1d(x.transpose(1, 2), w[:, None, :], b, padding=K - 1, groups=w.shape[0])[..., :T]
                      .transpose(1, 2))

    def mamba2_mixer(self, pre, xn):
        c, p = self.cfg, self.params
        Bsz, T, _ = xn.shape
        G, N, P, di = c["ngroups"], c["d_state"], c["headdim"], self.d_inner
        H = di // P
        zxbcdt = xn @ p[pre + "in_proj"].T
        z, xbc, dt_raw = torch.split(zxbcdt, [di, di + 2 * G * N, H], dim=-1)
        x, Bm, Cm = torch.split(self.conv(pre, xbc), [di, G * N, G * N], dim=-1)
        dt = F.softplus(dt_raw + p[pre + "dt_bias"])
        A = -torch.exp(p[pre + "A_log"])
        y = ssm_scan(x.reshape(Bsz, T, H, P), Bm.reshape(Bsz, T, G, N), Cm.reshape(Bsz, T, G, N), dt, A,
                     p[pre + "D"]).reshape(Bsz, T, di)
        g = gated_rmsnorm(y, z, p[pre + "gate_norm"], G, c["norm_eps"])
        return g @ p[pre + "out_proj"].T

    def mamba1_mixer(self, pre, xn):
        c, p = self.cfg, self.params
        N, R, di = c["d_state"], c["dt_rank"], self.d_inner
        x, z = torch.split(xn @ p[pre + "in_proj"].T, [di, di], dim=-1)
        u = self.conv(pre, x)
        dt, Bm, Cm = torch.split(u @ p[pre + "x_proj"].T, [R, N, N], dim=-1)
        delta = F.softplus(dt @ p[pre + "dt_proj"].T + p[pre + "dt_bias"])
        y = selective_scan(u, delta, -torch.exp(p[pre + "A_log"]), Bm, Cm, p[pre + "D"]) * F.silu(z)
        return y @ p[pre + "out_proj"].T

    def attention(self, pre, xn):
        c, p = self.cfg, self.params
        Bsz, T, _ = xn.shape
        Hq, Hkv, Dh = c["n_heads"], c["n_kv_heads"], c["attn_head_dim"]
        q, k, v = torch.split(xn @ p[pre + "qkv_proj"].T, [Hq * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        q, k, v = q.reshape(Bsz, T, Hq, Dh), k.reshape(Bsz, T, Hkv, Dh), v.reshape(Bsz, T, Hkv, Dh)
        if c.get("rope", False):
            q, k = rope(q, c["rope_theta"]), rope(k, c["rope_theta"])
        return causal_attention(q, k, v).reshape(Bsz, T, Hq * Dh) @ p[pre + "o_proj"].T

    def mlp(self, pre, xn):
        c, p = self.cfg, self.params
        a = xn @ p[pre + "up_proj"].T
        if c["mlp"] == "swiglu":
            gate, up = a.chunk(2, dim=-1)
            act = F.silu(gate) * up
        elif c["mlp"] == "gelu":
            act = F.gelu(a)
        else:
            act = F.relu(a) ** 2
        return act @ p[pre + "down_proj"].T

    def forward(self, inputs):
        c, p = self.cfg, self.params
        h = p["embedding"][inputs]
        for i, kind in enumerate(self.pattern):
            pre = f"layers.{i}."
            xn = rmsnorm(h, p[pre + "norm"], c["norm_eps"])
            if kind == "M":
                h = h + (self.mamba2_mixer(pre, xn) if c["ssm"] == "mamba2" else self.mamba1_mixer(pre, xn))
            elif kind == "*":
                h = h + self.attention(pre, xn)
            else:
                h = h + self.mlp(pre, xn)
        h = rmsnorm(h, p["final_norm"], c["norm_eps"])
        return h @ (p["embedding"] if c["tie_embeddings"] else p["lm_head"]).T

    def decay_groups(self):
        # AdamW weight decay on matrices, embeddings and conv weights; none on norms, biases,
        # dt_bias, A_log, D (the same rule as mamba.cuh's ParamLayout)
        decay = ("embedding", "lm_head", "in_proj", "out_proj", "conv_weight", "x_proj", "dt_proj", "qkv_proj",
                 "o_proj", "up_proj", "down_proj")
        yes = [v for k, v in self.params.items() if k.split(".")[-1] in decay]
        no = [v for k, v in self.params.items() if k.split(".")[-1] not in decay]
        return yes, no


def loss_fn(logits, targets, weights, z_loss):
    """sum_i w_i (ce_i + z_loss lse_i^2) / #valid, masked targets (-1) have w = 0."""
    V = logits.shape[-1]
    lg = logits.reshape(-1, V)
    t = targets.reshape(-1)
    valid = t >= 0
    lse = torch.logsumexp(lg, dim=-1)
    ce = lse - lg.gather(1, t.clamp(min=0)[:, None])[:, 0]
    w = torch.where(valid, weights.reshape(-1), torch.zeros_like(lse))
    return (w * (ce + z_loss * lse * lse)).sum() / valid.sum()


def write_dump(path, tensors):
    with open(path + ".tmp", "wb") as f:
        f.write(b"MCTF")
        f.write(struct.pack("<i", len(tensors)))
        for name, t in tensors:
            t = torch.as_tensor(t, dtype=torch.float64).detach().contiguous()
            nb = name.encode()
            f.write(struct.pack("<i", len(nb)) + nb)
            f.write(struct.pack("<i", t.dim()))
            f.write(struct.pack(f"<{t.dim()}q", *t.shape))
            f.write(t.numpy().astype("<f8").tobytes())
    os.replace(path + ".tmp", path)


def model_and_batch(spec):
    """the config's model and batch (inputs, targets with masked ones -1, loss weights), drawn in this order"""
    gen = torch.Generator().manual_seed(spec["seed"])
    model = LM(spec["model"], gen)
    B, T, V = spec["B"], spec["T"], spec["model"]["vocab_size"]
    inputs = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    if spec["masked_targets"]:
        idx = torch.randperm(B * T, generator=gen)[: spec["masked_targets"]]
        targets.view(-1)[idx] = -1
    pos = torch.arange(T, dtype=torch.float64).expand(B, T)
    weights = torch.tanh(pos / 10) if spec["positional_weights"] else torch.ones(B, T)
    return model, inputs, targets, weights


# The bf16 noise floor of the gradients: the model again with bf16 rounding where the engine keeps bf16 (the
# weights as matmul operands, the norms' outputs, the mixers' inner results and outputs, the logits) and the
# gradients flowing back through those points rounded the same way. Kernels round at different places, so each
# variant rounds at a different subset of the points; the distance of its gradients from float64 is what a
# correct bf16 implementation can land on.
BF16_VARIANTS = {"all": ("norm", "inner", "mixer", "weights", "logits"),
                 "no mixer outputs": ("norm", "inner", "weights", "logits"),
                 "no inner results": ("norm", "mixer", "weights", "logits"),
                 "weights and norms": ("norm", "weights")}


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


def bf16_gradients(spec, points):
    """the gradients of spec's model on its batch, rounded at the points (a subset of a BF16_VARIANTS value)"""
    # a fresh copy of this module to patch: the float64 reference itself stays as it is
    ms = importlib.util.spec_from_file_location("pytorch_ref_bf16", __file__)
    ref = importlib.util.module_from_spec(ms)
    ms.loader.exec_module(ref)
    if "norm" in points:
        ref.rmsnorm, ref.gated_rmsnorm = rounded(ref.rmsnorm), rounded(ref.gated_rmsnorm)
    if "inner" in points:
        ref.ssm_scan, ref.selective_scan = rounded(ref.ssm_scan), rounded(ref.selective_scan)
        ref.causal_attention = rounded(ref.causal_attention)
        ref.LM.conv = rounded(ref.LM.conv)
    if "mixer" in points:
        for m in ("mamba2_mixer", "mamba1_mixer", "attention", "mlp"):
            setattr(ref.LM, m, rounded(getattr(ref.LM, m)))
    model, inputs, targets, weights = ref.model_and_batch(spec)
    leaves = model.params
    if "weights" in points:  # the bf16 copy in the forward, the gradient to the full-precision leaf
        model.params = {k: v + (v.to(torch.bfloat16).to(v.dtype) - v).detach() if v.dim() >= 2 else v
                        for k, v in leaves.items()}
    logits = model.forward(inputs)
    if "logits" in points:
        logits = RoundBoth.apply(logits)
    ref.loss_fn(logits, targets, weights, spec["z_loss"]).backward()
    return {k: v.grad for k, v in leaves.items()}


def bf16_errors(spec, exact):
    """{variant: {parameter: rel L2 distance of its bf16 gradient from exact}} (exact: the float64 gradients)"""
    zero = [k for k in exact if exact[k].norm() == 0]
    if zero:  # a relative error of an all-zero gradient says nothing (and the tests never compare on zeros)
        raise ValueError(f"exact gradients all zero, no noise floor for them: {', '.join(zero)}")
    errs = {}
    for v, points in BF16_VARIANTS.items():
        g = bf16_gradients(spec, points)
        errs[v] = {k: ((g[k] - exact[k]).norm() / exact[k].norm()).item() for k in exact}
    return errs


def run_config(name, spec, out):
    cfg = spec["model"]
    model, inputs, targets, weights = model_and_batch(spec)
    z_loss = spec["z_loss"]

    records = [("inputs", inputs), ("targets", targets), ("loss_weights", weights)]
    # snapshots: the optimizer below updates parameters and clips gradients in place
    records += [(k, v.detach().clone()) for k, v in model.params.items()]
    logits = model.forward(inputs)
    loss = loss_fn(logits, targets, weights, z_loss)
    loss.backward()
    records += [("logits", logits), ("loss", loss)]
    grads = {k: v.grad.clone() for k, v in model.params.items()}
    records += [("grad." + k, g) for k, g in grads.items()]

    a = dict(ADAMW, lr=spec.get("lr", ADAMW["lr"]))
    decay, no_decay = model.decay_groups()
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a["lr"], betas=(a["beta1"], a["beta2"]), eps=a["eps"])
    step_losses = []
    params = list(model.params.values())
    for step in range(ADAMW_STEPS):
        if step > 0:  # step 0 reuses the gradients above
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model.forward(inputs), targets, weights, z_loss)
            loss.backward()
        step_losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(params, a["grad_clip"])
        opt.step()
    records.append(("step_losses", torch.tensor(step_losses)))
    records += [("adamw." + k, torch.tensor(v)) for k, v in a.items()]
    records.append(("z_loss", torch.tensor(z_loss)))
    # each gradient's noise floor: its largest distance over the variants
    errs = bf16_errors(spec, grads).values()
    records += [("noise.grad." + k, torch.tensor(max(e[k] for e in errs))) for k in grads]

    write_dump(os.path.join(out, name + ".bin"), records)
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(cfg, f, indent=1)
        f.write("\n")
    print(f"{name}: loss {step_losses[0]:.6f} -> {step_losses[-1]:.6f} after {ADAMW_STEPS} AdamW steps")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="test/dumps")
    ap.add_argument("--force", action="store_true", help="rewrite even if the dumps are up to date")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    script_time = os.path.getmtime(__file__)
    for name, spec in CONFIGS.items():
        files = [os.path.join(args.out, name + ext) for ext in (".bin", ".json")]
        if not args.force and all(os.path.exists(f) and os.path.getmtime(f) > script_time for f in files):
            continue
        run_config(name, spec, args.out)


if __name__ == "__main__":
    main()
