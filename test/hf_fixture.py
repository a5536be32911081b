"""Hugging Face and mamba_ssm model directories for the CPU tests of hf.h, with their logits.

Each fixture is a small random model written the way transformers' save_pretrained (or
state-spaces/mamba) writes it: config.json with the class's own field names, weights as
safetensors under the class's own tensor names and shapes (separate q/k/v and gate/up,
conv1d as (C, 1, K), the vocabulary unpadded, or padded as mamba_ssm pads it). ref.bin (the
MCTF dump format of HACKING.md) holds a batch of token ids and the logits a float64 forward
written in the class's terms computes from the stored (rounded) weights; the C++ test
imports the directory and runs the double reference model on the same ids. The SSM and
attention cores are pytorch_ref.py's; what this file checks is the mapping: names, splits,
shapes, the config fields, dtypes and shards.

No transformers here (Debian's python3-torch only); test/hf_roundtrip.py checks the same
against transformers itself on the GPU machine.

Usage: /usr/bin/python3 test/hf_fixture.py --out test/dumps/hf
       /usr/bin/python3 test/hf_fixture.py --to-safetensors DIR   (DIR/pytorch_model.bin -> DIR/model.safetensors)
"""
import argparse
import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_ref import causal_attention, gated_rmsnorm, rmsnorm, rope, selective_scan, ssm_scan, write_dump  # noqa: E402

torch.set_default_dtype(torch.float64)

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def save_safetensors(path, tensors, dtype, metadata=None):
    """tensors: list of (name, float64 tensor); written as `dtype` (F32, F16, BF16)."""
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, t in tensors:
        t = t.detach().to(ST_DTYPES[dtype]).contiguous()
        raw = (t.view(torch.int16) if t.dtype != torch.float32 else t).numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


def save_model(d, tensors, dtype, shards=1):
    os.makedirs(d, exist_ok=True)
    if shards == 1:
        save_safetensors(os.path.join(d, "model.safetensors"), tensors, dtype, {"format": "pt"})
        return
    per = math.ceil(len(tensors) / shards)
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = tensors[s * per:(s + 1) * per]
        save_safetensors(os.path.join(d, name), part, dtype, {"format": "pt"})
        for n, t in part:
            weight_map[n] = name
            total += t.numel() * (4 if dtype == "F32" else 2)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


class Weights:
    """Random weights under HF names, rounded to the storage dtype as they are made (the
    reference computes from exactly what the file holds)."""

    def __init__(self, seed, dtype):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.items = []
        self.p = {}

    def add(self, name, t):
        t = t.to(ST_DTYPES[self.dtype]).to(torch.float64)
        self.items.append((name, t))
        self.p[name] = t
        return t

    def normal(self, name, shape, std):
        return self.add(name, torch.randn(shape, generator=self.gen) * std)

    def around(self, name, shape, mean, spread):
        return self.add(name, mean + (torch.rand(shape, generator=self.gen) * 2 - 1) * spread)


def conv(x, w, b):
    """HF's conv1d: weight (C, 1, K), pad K-1, the first T outputs, then SiLU."""
    T, K = x.shape[1], w.shape[-1]
    return F.silu(F.conv1d(x.transpose(1, 2), w, b, padding=K - 1, groups=w.shape[0])[..., :T].transpose(1, 2))


def mamba1_mixer(W, x_, cfg, xn):
    di, N, R = cfg["expand"] * cfg["hidden_size"], cfg["state_size"], cfg["time_step_rank"]
    p = W.p
    x, z = (xn @ p[x_ + "in_proj.weight"].T).chunk(2, dim=-1)
    u = conv(x, p[x_ + "conv1d.weight"], p[x_ + "conv1d.bias"])
    dt, Bm, Cm = torch.split(u @ p[x_ + "x_proj.weight"].T, [R, N, N], dim=-1)
    delta = F.softplus(dt @ p[x_ + "dt_proj.weight"].T + p[x_ + "dt_proj.bias"])
    y = selective_scan(u, delta, -torch.exp(p[x_ + "A_log"]), Bm, Cm, p[x_ + "D"]) * F.silu(z)
    return y @ p[x_ + "out_proj.weight"].T


def mamba2_mixer(W, x_, di, H, P, G, N, eps, xn):
    p = W.p
    Bsz, T, _ = xn.shape
    z, xbc, dt = torch.split(xn @ p[x_ + "in_proj.weight"].T, [di, di + 2 * G * N, H], dim=-1)
    x, Bm, Cm = torch.split(conv(xbc, p[x_ + "conv1d.weight"], p[x_ + "conv1d.bias"]), [di, G * N, G * N], dim=-1)
    y = ssm_scan(x.reshape(Bsz, T, H, P), Bm.reshape(Bsz, T, G, N), Cm.reshape(Bsz, T, G, N),
                 F.softplus(dt + p[x_ + "dt_bias"]), -torch.exp(p[x_ + "A_log"]), p[x_ + "D"]).reshape(Bsz, T, di)
    return gated_rmsnorm(y, z, p[x_ + "norm.weight"], G, eps) @ p[x_ + "out_proj.weight"].T


def attention(W, a_, q_, Hq, Hkv, Dh, theta, xn):
    p = W.p
    Bsz, T, _ = xn.shape
    q = (xn @ p[a_ + q_ + "q_proj.weight"].T).reshape(Bsz, T, Hq, Dh)
    k = (xn @ p[a_ + q_ + "k_proj.weight"].T).reshape(Bsz, T, Hkv, Dh)
    v = (xn @ p[a_ + q_ + "v_proj.weight"].T).reshape(Bsz, T, Hkv, Dh)
    if theta:
        q, k = rope(q, theta), rope(k, theta)
    return causal_attention(q, k, v).reshape(Bsz, T, Hq * Dh) @ p[a_ + q_ + "o_proj.weight"].T


def mamba2_weights(W, x_, d, di, H, G, N, K):
    W.normal(x_ + "in_proj.weight", (2 * di + 2 * G * N + H, d), d ** -0.5)
    W.normal(x_ + "conv1d.weight", (di + 2 * G * N, 1, K), 0.5)
    W.normal(x_ + "conv1d.bias", (di + 2 * G * N,), 0.3)
    W.around(x_ + "dt_bias", (H,), -3.0, 1.5)
    W.around(x_ + "A_log", (H,), 1.0, 1.0)
    W.around(x_ + "D", (H,), 1.0, 0.5)
    W.around(x_ + "norm.weight", (di,), 1.0, 0.3)
    W.normal(x_ + "out_proj.weight", (d, di), di ** -0.5)


def fixture_mamba(out):
    # MambaForCausalLM: an odd vocabulary, an explicit dt rank, tie_word_embeddings left out
    # (its default, True), fp32
    cfg = {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": 97, "hidden_size": 32,
           "state_size": 16, "num_hidden_layers": 2, "expand": 2, "conv_kernel": 4, "time_step_rank": 5,
           "layer_norm_epsilon": 1e-5, "use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
           "residual_in_fp32": True, "time_step_min": 0.001, "initializer_range": 0.1, "transformers_version": "4.46.0"}
    W = Weights(11, "F32")
    d, V, di, N, R = 32, 97, 64, 16, 5
    W.normal("backbone.embeddings.weight", (V, d), 1.0)
    for i in range(2):
        x_ = f"backbone.layers.{i}.mixer."
        W.around(f"backbone.layers.{i}.norm.weight", (d,), 1.0, 0.3)
        W.normal(x_ + "in_proj.weight", (2 * di, d), d ** -0.5)
        W.normal(x_ + "conv1d.weight", (di, 1, 4), 0.5)
        W.normal(x_ + "conv1d.bias", (di,), 0.3)
        W.normal(x_ + "x_proj.weight", (R + 2 * N, di), di ** -0.5)
        W.normal(x_ + "dt_proj.weight", (di, R), R ** -0.5)
        W.around(x_ + "dt_proj.bias", (di,), -3.0, 1.5)
        W.add(x_ + "A_log", torch.log(torch.rand(di, N, generator=W.gen) * 8 + 1))
        W.around(x_ + "D", (di,), 1.0, 0.5)
        W.normal(x_ + "out_proj.weight", (d, di), di ** -0.5)
    W.around("backbone.norm_f.weight", (d,), 1.0, 0.3)

    def forward(ids):
        h = W.p["backbone.embeddings.weight"][ids]
        for i in range(2):
            h = h + mamba1_mixer(W, f"backbone.layers.{i}.mixer.", cfg,
                                 rmsnorm(h, W.p[f"backbone.layers.{i}.norm.weight"], 1e-5))
        return rmsnorm(h, W.p["backbone.norm_f.weight"], 1e-5) @ W.p["backbone.embeddings.weight"].T

    return cfg, W, forward, 1


def fixture_mamba2(out):
    # Mamba2ForCausalLM: untied, bf16, in two shards with an index; one group (HF's Mamba2
    # normalises the gated norm over the whole width)
    cfg = {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "vocab_size": 101, "hidden_size": 32,
           "state_size": 64, "num_hidden_layers": 2, "expand": 2, "conv_kernel": 4, "n_groups": 1, "num_heads": 2,
           "head_dim": 32, "chunk_size": 64, "layer_norm_epsilon": 1e-5, "use_bias": False, "use_conv_bias": True,
           "hidden_act": "silu", "rms_norm": True, "residual_in_fp32": True, "tie_word_embeddings": False,
           "time_step_limit": [0.0, math.inf]}
    W = Weights(12, "BF16")
    d, V, di, H, P, G, N = 32, 101, 64, 2, 32, 1, 64
    W.normal("backbone.embeddings.weight", (V, d), 1.0)
    for i in range(2):
        W.around(f"backbone.layers.{i}.norm.weight", (d,), 1.0, 0.3)
        mamba2_weights(W, f"backbone.layers.{i}.mixer.", d, di, H, G, N, 4)
    W.around("backbone.norm_f.weight", (d,), 1.0, 0.3)
    W.normal("lm_head.weight", (V, d), d ** -0.5)

    def forward(ids):
        h = W.p["backbone.embeddings.weight"][ids]
        for i in range(2):
            h = h + mamba2_mixer(W, f"backbone.layers.{i}.mixer.", di, H, P, G, N, 1e-5,
                                 rmsnorm(h, W.p[f"backbone.layers.{i}.norm.weight"], 1e-5))
        return rmsnorm(h, W.p["backbone.norm_f.weight"], 1e-5) @ W.p["lm_head.weight"].T

    return cfg, W, forward, 2


NEMOTRON = "M*-M-"


def fixture_nemotron_h(out):
    # NemotronHForCausalLM as transformers 5 saves it: layers_block_type in its names, the
    # model.* prefix, n_groups 2 (grouped gated norm), GQA 2:1, relu2 MLP, fp16
    types = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    d, V, di, H, P, G, N, Hq, Hkv, Dh, ff = 32, 89, 64, 2, 32, 2, 64, 2, 1, 64, 48
    cfg = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "vocab_size": V, "hidden_size": d,
           "layers_block_type": [types[c] for c in NEMOTRON], "num_attention_heads": Hq, "num_key_value_heads": Hkv,
           "head_dim": Dh, "intermediate_size": ff, "mlp_hidden_act": "relu2", "ssm_state_size": N,
           "mamba_num_heads": H, "mamba_head_dim": P, "mamba_n_groups": G, "mamba_d_conv": 4, "mamba_chunk_size": 128,
           "mamba_conv_bias": True, "mamba_proj_bias": False, "use_bias": False, "attention_bias": False,
           "mlp_bias": False, "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False,
           "time_step_limit": [0.0, math.inf], "num_nextn_predict_layers": 0}
    W = Weights(13, "F16")
    W.normal("model.embeddings.weight", (V, d), 1.0)
    for i, c in enumerate(NEMOTRON):
        x_ = f"model.layers.{i}.mixer."
        W.around(f"model.layers.{i}.norm.weight", (d,), 1.0, 0.3)
        if c == "M":
            mamba2_weights(W, x_, d, di, H, G, N, 4)
        elif c == "*":
            W.normal(x_ + "q_proj.weight", (Hq * Dh, d), d ** -0.5)
            W.normal(x_ + "k_proj.weight", (Hkv * Dh, d), d ** -0.5)
            W.normal(x_ + "v_proj.weight", (Hkv * Dh, d), d ** -0.5)
            W.normal(x_ + "o_proj.weight", (d, Hq * Dh), (Hq * Dh) ** -0.5)
        else:
            W.normal(x_ + "up_proj.weight", (ff, d), d ** -0.5)
            W.normal(x_ + "down_proj.weight", (d, ff), ff ** -0.5)
    W.around("model.norm_f.weight", (d,), 1.0, 0.3)
    W.normal("lm_head.weight", (V, d), d ** -0.5)

    def forward(ids):
        h = W.p["model.embeddings.weight"][ids]
        for i, c in enumerate(NEMOTRON):
            x_ = f"model.layers.{i}.mixer."
            xn = rmsnorm(h, W.p[f"model.layers.{i}.norm.weight"], 1e-6)
            if c == "M":
                h = h + mamba2_mixer(W, x_, di, H, P, G, N, 1e-6, xn)
            elif c == "*":
                h = h + attention(W, x_, "", Hq, Hkv, Dh, None, xn)
            else:
                h = h + (F.relu(xn @ W.p[x_ + "up_proj.weight"].T) ** 2) @ W.p[x_ + "down_proj.weight"].T
        return rmsnorm(h, W.p["model.norm_f.weight"], 1e-6) @ W.p["lm_head.weight"].T

    return cfg, W, forward, 1


def fixture_llama(out):
    # LlamaForCausalLM: tied, GQA 2:1, head_dim 64 over a hidden size of 32, rope_theta in
    # transformers 5's rope_parameters, rms_norm_eps 1e-6, fp32
    d, V, Hq, Hkv, Dh, ff, L, theta = 32, 83, 2, 1, 64, 40, 2, 500000.0
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": d,
           "intermediate_size": ff, "num_hidden_layers": L, "num_attention_heads": Hq, "num_key_value_heads": Hkv,
           "head_dim": Dh, "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
           "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "attention_bias": False,
           "mlp_bias": False, "max_position_embeddings": 4096}
    W = Weights(14, "F32")
    W.normal("model.embed_tokens.weight", (V, d), 1.0)
    for i in range(L):
        h_ = f"model.layers.{i}."
        W.around(h_ + "input_layernorm.weight", (d,), 1.0, 0.3)
        W.normal(h_ + "self_attn.q_proj.weight", (Hq * Dh, d), d ** -0.5)
        W.normal(h_ + "self_attn.k_proj.weight", (Hkv * Dh, d), d ** -0.5)
        W.normal(h_ + "self_attn.v_proj.weight", (Hkv * Dh, d), d ** -0.5)
        W.normal(h_ + "self_attn.o_proj.weight", (d, Hq * Dh), (Hq * Dh) ** -0.5)
        W.around(h_ + "post_attention_layernorm.weight", (d,), 1.0, 0.3)
        W.normal(h_ + "mlp.gate_proj.weight", (ff, d), d ** -0.5)
        W.normal(h_ + "mlp.up_proj.weight", (ff, d), d ** -0.5)
        W.normal(h_ + "mlp.down_proj.weight", (d, ff), ff ** -0.5)
    W.around("model.norm.weight", (d,), 1.0, 0.3)

    def forward(ids):
        p = W.p
        h = p["model.embed_tokens.weight"][ids]
        for i in range(L):
            h_ = f"model.layers.{i}."
            h = h + attention(W, h_, "self_attn.", Hq, Hkv, Dh, theta, rmsnorm(h, p[h_ + "input_layernorm.weight"], 1e-6))
            xn = rmsnorm(h, p[h_ + "post_attention_layernorm.weight"], 1e-6)
            act = F.silu(xn @ p[h_ + "mlp.gate_proj.weight"].T) * (xn @ p[h_ + "mlp.up_proj.weight"].T)
            h = h + act @ p[h_ + "mlp.down_proj.weight"].T
        return rmsnorm(h, p["model.norm.weight"], 1e-6) @ p["model.embed_tokens.weight"].T

    return cfg, W, forward, 1


def fixture_mamba_ssm(out):
    # state-spaces/mamba's layout: config.json with ssm_cfg (Mamba2, 2 groups), the
    # vocabulary padded to a multiple of 8 in the tensors (99 -> 104 rows), the tied head
    # saved beside the embedding, backbone.embedding (singular)
    V, Vpad, d, di, H, P, G, N = 99, 104, 32, 64, 2, 32, 2, 64
    cfg = {"d_model": d, "d_intermediate": 0, "n_layer": 2, "vocab_size": V,
           "ssm_cfg": {"layer": "Mamba2", "d_state": N, "headdim": P, "ngroups": G, "chunk_size": 64},
           "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
           "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    W = Weights(15, "F32")
    emb = W.normal("backbone.embedding.weight", (Vpad, d), 1.0)
    for i in range(2):
        W.around(f"backbone.layers.{i}.norm.weight", (d,), 1.0, 0.3)
        mamba2_weights(W, f"backbone.layers.{i}.mixer.", d, di, H, G, N, 4)
    W.around("backbone.norm_f.weight", (d,), 1.0, 0.3)
    W.add("lm_head.weight", emb)

    def forward(ids):
        h = W.p["backbone.embedding.weight"][ids]
        for i in range(2):
            h = h + mamba2_mixer(W, f"backbone.layers.{i}.mixer.", di, H, P, G, N, 1e-5,
                                 rmsnorm(h, W.p[f"backbone.layers.{i}.norm.weight"], 1e-5))
        # the padded rows' logits are not part of the vocabulary
        return (rmsnorm(h, W.p["backbone.norm_f.weight"], 1e-5) @ W.p["lm_head.weight"].T)[..., :V]

    return cfg, W, forward, 1


FIXTURES = {"mamba": fixture_mamba, "mamba2": fixture_mamba2, "nemotron_h": fixture_nemotron_h,
            "llama": fixture_llama, "mamba_ssm": fixture_mamba_ssm}


def write_fixture(name, out):
    d = os.path.join(out, name)
    cfg, W, forward, shards = FIXTURES[name](d)
    save_model(d, W.items, W.dtype, shards)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)  # Python writes Infinity bare, as transformers' configs hold it
    gen = torch.Generator().manual_seed(99)
    ids = torch.randint(0, cfg["vocab_size"], (2, 37), generator=gen)
    with torch.no_grad():
        logits = forward(ids)
    write_dump(os.path.join(d, "ref.bin"), [("inputs", ids), ("logits", logits)])
    print(f"{name}: {len(W.items)} tensors ({W.dtype}), logits {tuple(logits.shape)}")


def to_safetensors(d):
    """pytorch_model.bin (a state dict, as state-spaces/mamba ships) -> model.safetensors, in
    the tensors' own dtype; a tensor stored twice (a tied head) is written twice."""
    sd = torch.load(os.path.join(d, "pytorch_model.bin"), map_location="cpu")
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    dtypes = {names[t.dtype] for t in sd.values()}
    if len(dtypes) != 1:
        raise SystemExit(f"error: {d}/pytorch_model.bin mixes dtypes {dtypes}")
    save_safetensors(os.path.join(d, "model.safetensors"), list(sd.items()), dtypes.pop(), {"format": "pt"})
    print(f"{d}/model.safetensors: {len(sd)} tensors")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="test/dumps/hf")
    ap.add_argument("--to-safetensors", metavar="DIR", help="convert DIR/pytorch_model.bin and exit")
    ap.add_argument("--force", action="store_true", help="rewrite even if the fixtures are up to date")
    args = ap.parse_args()
    if args.to_safetensors:
        to_safetensors(args.to_safetensors)
        return
    script_time = max(os.path.getmtime(__file__), os.path.getmtime(os.path.join(os.path.dirname(__file__), "pytorch_ref.py")))
    for name in FIXTURES:
        ref = os.path.join(args.out, name, "ref.bin")
        if not args.force and os.path.exists(ref) and os.path.getmtime(ref) > script_time:
            continue
        write_fixture(name, args.out)


if __name__ == "__main__":
    main()
