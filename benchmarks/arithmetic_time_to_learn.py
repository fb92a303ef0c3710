"""Time to held-out avg@8 >= 0.8 on configs/arithmetic.yaml: dynamic sampling as it is now
(streaming refill, prompt skipping, confidence-bound stop) against Algorithm 1 as written (fixed
rounds of gen_batch_size, no skipping), side by side in one run: both `dapo train` processes run
at once, one thread each, so each has one of the two cores.

Training seconds are the sum of `step_seconds` (generation + update) up to the evaluation that
first reaches the bar; evaluation time is not counted.

    python benchmarks/arithmetic_time_to_learn.py [--train-steps 20] [--eval-every 2]
    python benchmarks/arithmetic_time_to_learn.py --compare engines   # hf vs vllm (needs .venv-vllm)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine_line

BAR = 0.8
SAMPLING = {"now (stream, skip, bound)": [],
            "before (rounds, no skip)": ["--refill", "rounds", "--no-prompt-skip", "--solved-accuracy", "1"]}
ENGINES = {"hf engine": [], "vllm engine": ["--rollout-engine", "vllm", "--vllm-kv-cache-gb", "1"]}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--compare", choices=["sampling", "engines"], default="sampling")
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    args = p.parse_args()
    variants = SAMPLING if args.compare == "sampling" else ENGINES
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for i, (name, extra) in enumerate(variants.items()):
            python = args.vllm_python if "vllm" in extra else sys.executable
            cmd = [python, "-m", "dapo", "train", "--config", "configs/arithmetic.yaml", "--threads", "1",
                   "--train-steps", str(args.train_steps), "--eval-every", str(args.eval_every),
                   "--save-every", "0", "--output-dir", f"{tmp}/{i}", *extra]
            procs[name] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
                           Path(tmp) / str(i))
        print(f"| {'dynamic sampling' if args.compare == 'sampling' else 'rollout engine'} | train s to avg@8 >= 0.8 | steps | avg@8 at the end (step) | "
              "generated groups | train seconds in all |")
        print("|---|---|---|---|---|---|")
        for name, (proc, run) in procs.items():
            _, err = proc.communicate()
            if proc.returncode != 0:
                print(f"{name}: dapo train failed:\n{err[-2000:]}")
                continue
            metrics, evals = rows(run / "metrics.jsonl"), rows(run / "eval.jsonl")
            seconds = {m["step"]: sum(r["step_seconds"] for r in metrics if r["step"] <= m["step"]) for m in metrics}
            reached = next((e for e in evals if e["step"] > 0 and e["avg@8"] >= BAR), None)
            last = evals[-1]
            to_bar = f"{seconds[reached['step']]:.0f}" if reached else "not reached"
            print(f"| {name} | {to_bar} | {reached['step'] if reached else '-'} | {last['avg@8']:.3f} "
                  f"({last['step']}) | {sum(m['prompts_generated'] for m in metrics)} | "
                  f"{seconds[metrics[-1]['step']]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
