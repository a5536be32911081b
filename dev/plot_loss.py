#!/usr/bin/env python3
"""Loss curves of one or several runs from their metrics logs (train_mamba / finetune_mamba
write DIR/metrics.jsonl next to their checkpoints) into a PNG.

usage: /usr/bin/python3 dev/plot_loss.py RUN_DIR_OR_JSONL [...] [-o loss.png] [--x tokens|steps]
           [--smooth N] [--labels A,B,...]

Each run draws its training loss (a moving average over N steps, default 10, the raw loss
faint behind it) and its validation loss (markers). Needs Debian's python3-matplotlib.
"""
import argparse
import json
import os
import sys


def read_log(path):
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    train, val = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"error: {path} line {n}: {e}")
            (val if "val_loss" in row else train).append(row)
    return path, train, val


def moving_average(values, n):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("-o", "--out", default="loss.png")
    ap.add_argument("--x", choices=["tokens", "steps"], default="steps")
    ap.add_argument("--smooth", type=int, default=10)
    ap.add_argument("--labels", default="")
    ap.add_argument("--title", default="")
    a = ap.parse_args()
    if a.smooth < 1:
        sys.exit("error: --smooth must be at least 1")
    labels = a.labels.split(",") if a.labels else []
    if labels and len(labels) != len(a.runs):
        sys.exit(f"error: {len(labels)} labels for {len(a.runs)} runs")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for i, run in enumerate(a.runs):
        path, train, val = read_log(run)
        if not train and not val:
            sys.exit(f"error: {path} has no metrics")
        label = labels[i] if labels else os.path.basename(os.path.dirname(os.path.abspath(path)))
        color = f"C{i}"
        tokens_per_step = train[0]["tokens"] / train[0]["step"] if train and train[0]["step"] else 0
        xs = lambda rows: [r["tokens"] if a.x == "tokens" else r["step"] for r in rows]
        if train:
            loss = [r["loss"] for r in train]
            ax.plot(xs(train), loss, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(xs(train), moving_average(loss, a.smooth), color=color, linewidth=1.5, label=f"{label} train")
        if val:
            vx = [r["step"] * tokens_per_step if a.x == "tokens" else r["step"] for r in val]
            ax.plot(vx, [r["val_loss"] for r in val], "o--", color=color, markersize=4, label=f"{label} val")
    ax.set_xlabel("tokens" if a.x == "tokens" else "optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(a.title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
