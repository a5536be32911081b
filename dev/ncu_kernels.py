#!/usr/bin/env python3
"""Time per kernel from an `ncu --section SpeedOfLight` log (ncu's default text output).

dev/device_run.sh's `kernels` step runs one training step of a short model under ncu and prints this table:
every kernel's launches, mean duration and share of the profiled time, largest total first. ncu locks the
clocks at the base frequency, so compute-bound kernels read slower than in the step; compare the rows with
each other, not with `--bench`.

usage: dev/ncu_kernels.py NCU_LOG [--top N]
"""
import argparse
import collections
import re

LAUNCH = re.compile(r"^  (\S.*?)\s+\(\d+, \d+, \d+\)x\(\d+, \d+, \d+\), Context")
DURATION = re.compile(r"^\s+Duration\s+(\S+)\s+([\d.,]+)")
TO_US = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def kernel_name(signature):
    """the kernel's name with its template arguments, without its parameter list"""
    name = re.sub(r"^void ", "", signature)
    depth = 0
    for i, ch in enumerate(name):  # the parameter list is the first '(' outside the template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def durations(lines):
    """(kernel, microseconds) for each profiled launch"""
    name = None
    for line in lines:
        m = LAUNCH.match(line)
        if m:
            name = kernel_name(m.group(1))
            continue
        m = DURATION.match(line)
        if m and name is not None:
            yield name, float(m.group(2).replace(",", "")) * TO_US[m.group(1)]
            name = None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    total, count = collections.defaultdict(float), collections.Counter()
    with open(args.log, errors="replace") as f:
        for name, us in durations(f):
            total[name] += us
            count[name] += 1
    if not total:
        raise SystemExit(f"{args.log}: no kernel durations found (was it run with --section SpeedOfLight?)")
    grand = sum(total.values())
    print(f"{'kernel':70s} {'launches':>8s} {'mean us':>9s} {'total us':>10s} {'share':>6s}")
    for name in sorted(total, key=total.get, reverse=True)[:args.top]:
        print(f"{name[:70]:70s} {count[name]:8d} {total[name] / count[name]:9.1f} {total[name]:10.1f} "
              f"{100 * total[name] / grand:5.1f}%")
    print(f"{'all profiled kernels':70s} {sum(count.values()):8d} {'':9s} {grand:10.1f} 100.0%")


if __name__ == "__main__":
    main()
