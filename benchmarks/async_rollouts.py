"""Asynchronous rollouts against lock-step: time to held-out avg@8 >= 0.8 on configs/arithmetic.yaml.

One `dapo train` at a time (each has the whole machine), arms interleaved per seed:

- lock-step:  max_staleness 0, all threads to the one process (generate, then train)
- async k=1:  a generator process samples the next step's round while the trainer trains, the
              threads split between them (one core each on a 2-core machine)
- async k=2:  the same, two steps ahead

Training seconds are the sum of `step_seconds` up to the evaluation that first reaches the bar
(evaluation time left out). Busy shares: of the summed step seconds, the trainer's update
(`train_seconds`), the generator's sampling (`gen_seconds` in lock-step, `generator_seconds` in
the asynchronous arms, which overlap the update) and the trainer's wait for data (`wait_seconds`).
Prints one row per run, then held-out avg@8 against train step per arm (learning per step).

    python benchmarks/async_rollouts.py [--seeds 0 1] [--train-steps 10] [--eval-every 2] [--config ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import machine_line

ROOT = Path(__file__).resolve().parent.parent
BAR = 0.8
ARMS = {"lock-step": ["--max-staleness", "0"], "async k=1": ["--max-staleness", "1"],
        "async k=2": ["--max-staleness", "2"]}


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def summary(run: Path, key: str) -> dict[str, Any]:
    metrics, evals = read(run / "metrics.jsonl"), read(run / "eval.jsonl")
    elapsed = {m["step"]: sum(r["step_seconds"] for r in metrics if r["step"] <= m["step"]) for m in metrics}
    reached = next((e for e in evals if e["step"] > 0 and e[key] >= BAR), None)
    total = sum(m["step_seconds"] for m in metrics)
    gen = sum(m["generator_seconds"] if "generator_seconds" in m else m["gen_seconds"] for m in metrics)
    return {"seconds_to_bar": elapsed[reached["step"]] if reached else None,
            "step_to_bar": reached["step"] if reached else None,
            "final": evals[-1][key], "curve": {e["step"]: e[key] for e in evals}, "seconds": total,
            "train_share": sum(m["train_seconds"] for m in metrics) / total, "gen_share": gen / total,
            "wait_share": sum(m.get("wait_seconds", 0.0) for m in metrics) / total,
            "staleness": sum(m.get("staleness_mean", 0.0) for m in metrics) / len(metrics),
            "publish": max(m.get("weight_publish_seconds", 0.0) for m in metrics),
            "load": max(m.get("weight_load_seconds", 0.0) for m in metrics)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "arithmetic.yaml"))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--key", default="avg@8")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more dapo train options, last")
    ap.add_argument("--out", default="runs/async_rollouts")
    args = ap.parse_args()
    print(machine_line())
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for seed in args.seeds:
        for arm in args.arms:
            run = Path(args.out) / f"{arm.replace(' ', '').replace('=', '')}-seed{seed}"
            cmd = [sys.executable, "-m", "dapo", "train", "--config", args.config, *ARMS[arm], "--seed", str(seed),
                   "--threads", str(args.threads), "--train-steps", str(args.train_steps), "--eval-every",
                   str(args.eval_every), "--save-every", "0", "--keep-last", "1", "--no-verbose", "--overwrite",
                   "--output-dir", str(run), *args.extra]
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode:
                sys.exit(f"{arm} seed {seed} failed:\n{proc.stderr[-3000:]}")
            results[(arm, seed)] = r = summary(run, args.key)
            print(f"  {arm} seed {seed}: {r}", flush=True)
    print(f"\n| seed | arm | train s to {args.key} >= {BAR} (step) | {args.key} at the end | train s, all steps | "
          "update share | sampling share | trainer waiting share | mean staleness | weight publish / load s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        for arm in args.arms:
            r = results[(arm, seed)]
            bar = f"{r['seconds_to_bar']:.0f} ({r['step_to_bar']})" if r["seconds_to_bar"] else "not reached"
            print(f"| {seed} | {arm} | {bar} | {r['final']:.3f} | {r['seconds']:.0f} | {r['train_share']:.2f} | "
                  f"{r['gen_share']:.2f} | {r['wait_share']:.2f} | {r['staleness']:.2f} | "
                  f"{r['publish']:.2f} / {r['load']:.2f} |")
    base = args.arms[0]
    for arm in args.arms[1:]:
        pairs = [(results[(base, s)], results[(arm, s)]) for s in args.seeds]
        if all(a["seconds_to_bar"] and b["seconds_to_bar"] for a, b in pairs):
            ratio = sum(a["seconds_to_bar"] for a, _ in pairs) / sum(b["seconds_to_bar"] for _, b in pairs)
            print(f"\n{arm} against {base}: time to {BAR} {ratio:.2f}x shorter over the seeds; final {args.key} "
                  + ", ".join(f"{b['final'] - a['final']:+.3f}" for a, b in pairs))
    steps = sorted({s for r in results.values() for s in r["curve"]})
    print("\n| arm | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for arm in args.arms:
        means = [sum(results[(arm, seed)]["curve"].get(s, float("nan")) for seed in args.seeds) / len(args.seeds)
                 for s in steps]
        print(f"| {arm} | " + " | ".join(f"{m:.3f}" for m in means) + " |")


if __name__ == "__main__":
    main()
