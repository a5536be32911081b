"""The Hugging Face round trip on the GPU machine, against transformers itself.

For each class (MambaForCausalLM, Mamba2ForCausalLM, NemotronHForCausalLM, LlamaForCausalLM;
several layers, GQA, odd vocabularies, tied and untied heads) it
  1. builds a random model with transformers (every 1-D parameter moved off its init, the
     embedding at unit scale so logits are far from ties) and save_pretrained()s it;
  2. runs our engine on that directory (build/hf_logits imports it with hf.h) and
     transformers on a fixed batch of token ids, and compares the logits;
  3. trains our copy a few steps (train_mamba --init-from DIR ... --export OUT), reloads OUT
     in transformers, compares the logits again, and 32 greedy tokens after a 16-token prompt.
It prints one table and exits 1 if any check fails.

Tolerance: logits ||ours - hf|| / ||hf|| < 2e-2. Our forward runs in bf16 (weights rounded
to bf16, 2^-9 relative; bf16 activations between kernels; bf16 logits out of the LM head),
transformers in fp32 on the same weights: a few layers of 0.2-0.4% per-op rounding add up to
0.5-1%. Argmax agreement >= 97% of positions. Greedy: the sequences must match, except that
they may part at a near tie: where transformers' top two logits differ by less than 3 times
the largest logit error measured at step 2 (then the check stops there and says so).

NemotronH: sequences stay inside one Mamba chunk (T <= chunk_size 128); the slow
(no-kernel) path of some transformers versions mixes the states of chunks up (transformers
issue 47246). Mamba2ForCausalLM is built with one group: its gated norm is not grouped in
transformers (ours, mamba_ssm's and NemotronH's are).

Usage (from the repository root, after make build/hf_logits train_mamba):
  python3 test/hf_roundtrip.py [--bin .] [--work /tmp/hf_roundtrip]
  python3 test/hf_roundtrip.py --val-loss DIR --val-data SHARD [-T 256 --batches 20 -B 16]
      transformers' mean loss of an exported model over the first B x batches windows of
      T + 1 tokens of a shard (compare with train_mamba's validation loss)
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import torch

TOL_LOGITS, MIN_ARGMAX, PROMPT, NEW = 2e-2, 0.97, 16, 32


def hf_models():
    from transformers import LlamaConfig, Mamba2Config, MambaConfig
    return [
        ("mamba", True, lambda: MambaConfig(vocab_size=1001, hidden_size=128, state_size=16, num_hidden_layers=3,
                                            expand=2, conv_kernel=4, time_step_rank=8, layer_norm_epsilon=1e-5,
                                            tie_word_embeddings=True), 100),
        ("mamba", False, lambda: MambaConfig(vocab_size=999, hidden_size=128, state_size=16, num_hidden_layers=2,
                                             expand=2, conv_kernel=4, layer_norm_epsilon=1e-5,
                                             tie_word_embeddings=False), 100),
        ("mamba2", False, lambda: Mamba2Config(vocab_size=1003, hidden_size=128, state_size=64, num_heads=8,
                                               head_dim=32, n_groups=1, expand=2, conv_kernel=4, num_hidden_layers=3,
                                               chunk_size=64, layer_norm_epsilon=1e-5, tie_word_embeddings=False), 100),
        ("mamba2", True, lambda: Mamba2Config(vocab_size=1005, hidden_size=128, state_size=128, num_heads=4,
                                              head_dim=64, n_groups=1, expand=2, conv_kernel=4, num_hidden_layers=2,
                                              chunk_size=256, layer_norm_epsilon=1e-5, tie_word_embeddings=True), 100),
        ("nemotron_h", False, lambda: nemotron_config("M*-M-*", tie=False), 100),
        ("nemotron_h", True, lambda: nemotron_config("M-M*", tie=True, act="gelu"), 100),
        ("llama", True, lambda: LlamaConfig(vocab_size=1009, hidden_size=128, intermediate_size=320,
                                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                            max_position_embeddings=4096), 100),
        ("llama", False, lambda: LlamaConfig(vocab_size=997, hidden_size=256, intermediate_size=512,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                             head_dim=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                             max_position_embeddings=4096), 100),
    ]


def nemotron_config(pattern, tie, act="relu2"):
    """A Nemotron-H config in the published files' field names (hybrid_override_pattern, n_groups,
    ...), which every transformers version reads; GQA 4:2, two groups (a grouped gated norm)."""
    import tempfile
    from transformers import AutoConfig
    d = {"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "vocab_size": 1007, "hidden_size": 128,
         "hybrid_override_pattern": pattern, "num_hidden_layers": len(pattern), "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 256, "mlp_hidden_act": act,
         "ssm_state_size": 64, "mamba_num_heads": 8, "mamba_head_dim": 32, "n_groups": 2, "conv_kernel": 4,
         "expand": 2, "chunk_size": 128, "use_conv_bias": True, "mamba_proj_bias": False, "use_bias": False,
         "attention_bias": False, "mlp_bias": False, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": tie,
         "time_step_min": 1e-30, "residual_in_fp32": True, "max_position_embeddings": 4096}
    with tempfile.TemporaryDirectory() as tmp:  # read as a published config.json is
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(d, f)
        return AutoConfig.from_pretrained(tmp)


def perturb(model, seed):
    """Every 1-D parameter off its init (norm weights of one, D of one would hide a swapped
    tensor), the embedding at unit scale (logits spread out, far from ties)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape, generator=g))
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight.copy_(torch.randn(out.weight.shape, generator=g) * emb.shape[1] ** -0.5)


def write_ints(path, head, ids):
    with open(path, "wb") as f:
        f.write(struct.pack(f"<{len(head)}i", *head))
        f.write(np.asarray(ids, dtype="<i4").tobytes())


def ours(binary, model_dir, ids, work, greedy=False):
    tok, out = os.path.join(work, "ids.bin"), os.path.join(work, "ours.bin")
    write_ints(tok, [ids.shape[0], ids.shape[1]], ids.reshape(-1))
    cmd = [binary, model_dir, "--tokens", tok, "--out", out]
    if greedy:
        cmd += ["--greedy", str(NEW), "--prompt-len", str(PROMPT)]
    run(cmd)
    raw = open(out, "rb").read()
    B, T, V = struct.unpack("<3i", raw[:12])
    logits = torch.from_numpy(np.frombuffer(raw[12:], dtype="<f4").copy()).view(B, T, V)
    gen = None
    if greedy:
        g = open(out + ".greedy", "rb").read()
        gb, gn = struct.unpack("<2i", g[:8])
        gen = torch.from_numpy(np.frombuffer(g[8:], dtype="<i4").copy()).view(gb, gn).long()
    return logits, gen


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def compare(ref, got):
    rel = ((got - ref).norm() / ref.norm()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return rel, agree, (got - ref).abs().max().item()


def greedy_check(model, prompt, our_gen, tie_margin):
    """transformers' greedy continuation against ours; they may part only at a near tie"""
    with torch.no_grad():
        hf_gen = model.generate(prompt, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)[:, PROMPT:].cpu()
    if torch.equal(hf_gen, our_gen):
        return True, "32/32"
    worst = NEW
    for b in range(prompt.shape[0]):
        diff = (hf_gen[b] != our_gen[b]).nonzero()
        if len(diff) == 0:
            continue
        k = diff[0].item()
        seq = torch.cat([prompt[b].cpu(), hf_gen[b, :k]])[None].to(prompt.device)
        with torch.no_grad():
            top2 = model(seq).logits[0, -1].float().topk(2).values
        if (top2[0] - top2[1]).item() >= tie_margin:
            return False, f"row {b} parts at token {k} (top-2 margin {(top2[0] - top2[1]).item():.3g})"
        worst = min(worst, k)
    return True, f"{worst}/32, then a near tie"


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def roundtrip(args):
    from transformers import AutoModelForCausalLM
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf_logits = os.path.join(args.bin, "build", "hf_logits")
    train = os.path.join(args.bin, "train_mamba")
    rows, ok_all = [], True
    for i, (kind, tie, make_cfg, T) in enumerate(hf_models()):
        name = f"{kind}{'-tied' if tie else ''}"
        work = os.path.join(args.work, name)
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        row = {"case": name}
        try:
            torch.manual_seed(100 + i)
            cfg = make_cfg()
            model = AutoModelForCausalLM.from_config(cfg).float().eval()
            perturb(model, 200 + i)
            src = os.path.join(work, "hf")
            model.save_pretrained(src)  # safetensors by default
            V = cfg.vocab_size
            g = torch.Generator().manual_seed(300 + i)
            ids = torch.randint(0, V, (2, T), generator=g)
            model.to(dev)
            with torch.no_grad():
                ref = model(ids.to(dev)).logits.float().cpu()
            got, _ = ours(hf_logits, src, ids, work)
            rel, agree, err = compare(ref, got)
            row.update(import_rel=rel, import_argmax=agree)
            ok = rel < TOL_LOGITS and agree >= MIN_ARGMAX

            # train our copy a few steps, export, reload in transformers
            shard = os.path.join(work, "data.bin")
            seq = torch.randint(0, V, (97,), generator=g).tolist()
            write_shard(shard, (seq * 200)[: 16384])
            out = os.path.join(work, "export")
            run([train, "--init-from", src, "--train-data", shard, "--val-data", shard, "--steps", "8", "-B", "4",
                 "-T", "64", "--lr", "1e-3", "--warmup", "2", "--val-every", "0", "--sample-every", "0",
                 "--ckpt-dir", os.path.join(work, "ckpt"), "--ckpt-every", "0", "--export", out])
            model2 = AutoModelForCausalLM.from_pretrained(out).float().to(dev).eval()  # the export is fp32
            assert type(model2).__name__ == type(model).__name__, f"reloaded as {type(model2).__name__}"
            with torch.no_grad():
                ref2 = model2(ids.to(dev)).logits.float().cpu()
            got2, gen = ours(hf_logits, out, ids, work, greedy=True)
            rel2, agree2, err2 = compare(ref2, got2)
            moved = ((ref2 - ref).norm() / ref.norm()).item()  # the training changed the model
            row.update(export_rel=rel2, export_argmax=agree2, trained_change=moved)
            ok &= rel2 < TOL_LOGITS and agree2 >= MIN_ARGMAX and moved > 1e-3
            gok, gmsg = greedy_check(model2, ids[:, :PROMPT].to(dev), gen, 3 * err2)
            row.update(greedy=gmsg)
            ok &= gok
        except Exception as e:  # one failing class does not hide the others
            row.update(error=str(e).splitlines()[-1][:200] if str(e) else type(e).__name__)
            print(f"--- {name}:\n{e}", file=sys.stderr)
            ok = False
        row["ok"] = ok
        ok_all &= ok
        rows.append(row)

    print(f"\nHugging Face round trip (logits tolerance rel {TOL_LOGITS}, argmax >= {MIN_ARGMAX:.0%})")
    print(f"{'case':<18} {'import rel':>10} {'argmax':>7} {'export rel':>10} {'argmax':>7} {'trained':>8}  {'greedy':<28} result")
    for r in rows:
        f = lambda k, fmt: (fmt % r[k]) if k in r else "-"
        print(f"{r['case']:<18} {f('import_rel', '%.2e'):>10} {f('import_argmax', '%.3f'):>7} "
              f"{f('export_rel', '%.2e'):>10} {f('export_argmax', '%.3f'):>7} {f('trained_change', '%.3f'):>8}  "
              f"{r.get('greedy', r.get('error', '-')):<28} {'PASS' if r['ok'] else 'FAIL'}")
    print(f"{sum(r['ok'] for r in rows)} passed, {sum(not r['ok'] for r in rows)} failed")
    return 0 if ok_all else 1


def val_loss(args):
    """transformers' mean next-token loss of an exported model over a shard's first windows"""
    from transformers import AutoModelForCausalLM
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    raw = np.fromfile(args.val_data, dtype="<i4", count=256)
    assert raw[0] == 20240520, f"{args.val_data}: not a token shard"
    toks = np.fromfile(args.val_data, dtype="<u2" if raw[1] == 1 else "<u4", offset=1024).astype(np.int64)
    model = AutoModelForCausalLM.from_pretrained(args.val_loss).float().to(dev).eval()
    total, n = 0.0, 0
    W = args.T + 1
    windows = [toks[s * args.T: s * args.T + W] for s in range(args.B * args.batches) if s * args.T + W <= len(toks)]
    with torch.no_grad():
        for k in range(0, len(windows), args.B):
            x = torch.from_numpy(np.stack(windows[k:k + args.B])).to(dev)
            logits = model(x[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                     reduction="sum")
            total += loss.item()
            n += x[:, 1:].numel()
    print(f"{args.val_loss}: transformers' validation loss {total / n:.4f} over {n} tokens ({len(windows)} windows of {W})")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=".", help="directory holding train_mamba and build/hf_logits")
    ap.add_argument("--work", default="/tmp/hf_roundtrip")
    ap.add_argument("--val-loss", metavar="DIR", help="an exported model: its loss on --val-data")
    ap.add_argument("--val-data")
    ap.add_argument("-T", type=int, default=256)
    ap.add_argument("-B", type=int, default=16)
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()
    if args.val_loss:
        sys.exit(val_loss(args))
    sys.exit(roundtrip(args))


if __name__ == "__main__":
    main()
