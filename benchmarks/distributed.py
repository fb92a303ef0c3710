"""Time per train step at 1 and 2 data-parallel ranks (torchrun + FSDP2, gloo on CPU) on the
arithmetic config (configs/arithmetic.yaml, SmolLM2-135M), a few steps only.

Each setting is a `dapo train` subprocess; the step times come from its metrics.jsonl
(step_seconds = generation rounds + update; gen_seconds and train_seconds separately). The first
step is left out of the means (warm-up). Usage:

    python benchmarks/distributed.py [--steps 4] [--out /tmp/dapo-bench-dist]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = [  # (ranks, threads per rank)
    (1, 1),
    (1, 2),
    (2, 1),
]


def run(ranks: int, threads: int, steps: int, out: Path) -> dict[str, float]:
    run_dir = out / f"ranks{ranks}-threads{threads}"
    args = ["train", "--config", "configs/arithmetic.yaml", "--train-steps", str(steps), "--threads", str(threads),
            "--max-eval-prompts", "1", "--eval-samples", "1", "--save-every", "0", "--eval-every", "0",
            "--output-dir", str(run_dir), "--overwrite"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                 "-m", "dapo.cli"] if ranks > 1 else [sys.executable, "-m", "dapo"])
    start = time.perf_counter()
    done = subprocess.run([*launcher, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {"ranks": ranks, "threads": threads, "wall": wall, "step": mean("step_seconds"),
            "gen": mean("gen_seconds"), "train": mean("train_seconds"), "rounds": mean("gen_rounds")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="/tmp/dapo-bench-dist")
    args = parser.parse_args()
    results = [run(r, t, args.steps, Path(args.out)) for r, t in SETTINGS]
    base = {r["threads"]: r for r in results if r["ranks"] == 1}
    print("| ranks x threads | step s | generation s (rounds) | update s | speed-up vs 1x1 | vs 1x2 | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['ranks']} x {r['threads']} | {r['step']:.2f} | {r['gen']:.2f} ({r['rounds']:.1f}) | "
              f"{r['train']:.2f} | {base[1]['step'] / r['step']:.2f} | {base[2]['step'] / r['step']:.2f} | "
              f"{r['wall']:.0f} |")
    two = next(r for r in results if r["ranks"] == 2)
    print(f"scaling efficiency at 2 ranks (speed-up over 1 rank x 1 thread / 2): {base[1]['step'] / two['step'] / 2:.2f}; "
          f"update only: {base[1]['train'] / two['train'] / 2:.2f}")


if __name__ == "__main__":
    main()
