"""Benchmark 1: wall seconds of training until 80% of 32 sampled answers to the digit prompt are "5".

Runs, side by side and per seed: dapo with its default digit settings; the naive per-sequence path of
our own code (every response recomputes its prompt, one sequence per forward, as the seed does); and
TRL's GRPOTrainer configured as DAPO (benchmarks/trl_digit.py, in its own virtualenv). Evaluation
time is excluded from every clock. Prints the median over seeds and the ratios.

    python benchmarks/digit_time_to_learn.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import machine_line
from dapo import DAPOConfig
from dapo.advantages import group_advantages
from dapo.models import default_model_dir
from dapo.trainer import Trainer

BAR = 0.8


def run_dapo(seed: int, naive: bool, max_seconds: float, threads: int) -> dict:
    overrides = {"shared_prompt": False, "max_tokens_per_micro_batch": 64} if naive else {}
    with tempfile.TemporaryDirectory() as tmp:
        config = DAPOConfig(seed=seed, verbose=False, output_dir=tmp, train_steps=10_000, threads=threads,
                            **overrides)
        run = Trainer(config)
        clock, step_times = 0.0, []
        while clock < max_seconds:
            start = time.perf_counter()
            batch, _ = run.collector.collect(run.step + 1)
            batch.advantages = group_advantages(batch.grouped(batch.rewards)).flatten()
            run.actor.update(batch, run.step + 1)
            run.step += 1
            step_times.append(time.perf_counter() - start)
            clock += step_times[-1]
            share = run.evaluate()["avg@32"]  # not on the clock
            print(f"  {'naive' if naive else 'dapo '} seed {seed} step {run.step} train_s {clock:6.1f} share {share:.3f}",
                  flush=True)
            if share >= BAR:
                break
    return {"seed": seed, "reached": share >= BAR, "steps": run.step, "train_seconds": clock,
            "median_step_seconds": statistics.median(step_times)}


def run_trl(seed: int, max_seconds: float, python: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trl.json"
        cmd = [python, str(Path(__file__).parent / "trl_digit.py"), "--model", str(default_model_dir()),
               "--seed", str(seed), "--max-seconds", str(max_seconds), "--out", str(out)]
        log = Path(tmp) / "trl.log"
        with log.open("w") as f:  # TRL prints a dict per step; keep our lines readable
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"TRL run failed:\n{log.read_text()[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--threads", type=int, default=0, help="0: all cores")
    p.add_argument("--trl-python", default=".bench-venv-trl/bin/python",
                   help="python of a virtualenv with benchmarks/trl_requirements.txt installed")
    p.add_argument("--skip", nargs="*", default=[], choices=["dapo", "naive", "trl"])
    args = p.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    print(machine_line())
    results: dict[str, list[dict]] = {}
    for name in ("dapo", "naive", "trl"):
        if name in args.skip:
            continue
        for seed in args.seeds:
            if name == "trl":
                r = run_trl(seed, args.max_seconds, args.trl_python)
            else:
                r = run_dapo(seed, name == "naive", args.max_seconds, threads)
            results.setdefault(name, []).append(r)
            print(f"{name} seed {seed}: {json.dumps(r)}", flush=True)

    print(f"\nTime to {BAR:.0%} \"5\" (32 samples, temperature 1), median of seeds {args.seeds}:")
    print("| trainer | reached | median steps | median train seconds | median s/step |")
    print("|---|---|---|---|---|")
    medians = {}
    for name, rs in results.items():
        medians[name] = statistics.median(r["train_seconds"] for r in rs)
        print(f"| {name} | {sum(r['reached'] for r in rs)}/{len(rs)} | {statistics.median(r['steps'] for r in rs)} | "
              f"{medians[name]:.1f} | {statistics.median(r['median_step_seconds'] for r in rs):.2f} |")
    if "dapo" in medians:
        for other in ("naive", "trl"):
            if other in medians:
                print(f"{other} / dapo time ratio: {medians[other] / medians['dapo']:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
