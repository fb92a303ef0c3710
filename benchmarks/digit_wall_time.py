"""Wall time of the default `dapo train` (the seed's digit example), as a newcomer runs it.

For each seed: `dapo train --seed S` in a subprocess, timed from start to exit (model load, both
evaluations and the summary included), and the share of 32 sampled answers that are exactly "5"
after training. `--old` adds the same runs with dynamic sampling as it was before streaming refill,
prompt skipping and the confidence-bound stop (`--refill rounds --no-prompt-skip --solved-accuracy 1`).
`--lora` adds the same runs training rank-16 LoRA adapters (`--lora-rank 16 --lr 3e-4`).
`--carry` adds the same runs with surplus groups carried to the next step, uncorrected (the default
before 2026-12-06: `--surplus carry --stale-correction none`).

    python benchmarks/digit_wall_time.py --seeds 0 1 2 [--old] [--lora] [--carry]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time

from common import machine_line

OLD = ["--refill", "rounds", "--no-prompt-skip", "--solved-accuracy", "1"]
LORA = ["--lora-rank", "16", "--lr", "3e-4"]
CARRY = ["--surplus", "carry", "--stale-correction", "none"]


def run(seed: int, extra: list[str]) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dapo", "train", "--seed", str(seed), "--no-verbose",
                               "--output-dir", f"{tmp}/run", *extra], capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dapo train failed:\n{proc.stderr[-3000:]}")
    share = float(re.search(r'exactly "5" [0-9.]+ before training, ([0-9.]+) after', proc.stdout).group(1))
    steps = int(re.search(r"train steps\s*\|?\s*(\d+)", proc.stdout).group(1))
    return seconds, share, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--old", action="store_true", help="also run the pre-streaming dynamic sampling")
    p.add_argument("--lora", action="store_true", help="also run with rank-16 LoRA adapters")
    p.add_argument("--carry", action="store_true", help="also run with the surplus carried over (before 2026-12-06)")
    args = p.parse_args()
    print(machine_line())
    variants = ({"dapo train (defaults)": []} | ({"old dynamic sampling": OLD} if args.old else {})
                | ({"LoRA r16, lr 3e-4": LORA} if args.lora else {})
                | ({"surplus carried, uncorrected": CARRY} if args.carry else {}))
    print("| variant | seed | wall seconds | train steps | share of \"5\" after |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, extra in variants.items():
        rows = [run(seed, extra) for seed in args.seeds]
        for seed, (seconds, share, steps) in zip(args.seeds, rows):
            print(f"| {name} | {seed} | {seconds:.1f} | {steps} | {share:.3f} |", flush=True)
        summary[name] = (statistics.median(r[0] for r in rows), min(r[1] for r in rows))
    for name, (median, worst) in summary.items():
        print(f"{name}: median {median:.1f} s, lowest share {worst:.3f}")


if __name__ == "__main__":
    main()
