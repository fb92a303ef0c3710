"""DAPO vs the losses after it, on configs/arithmetic.yaml: held-out avg@8 / pass@8 after N train
steps (default 16), each `policy_loss` with its paper's settings (configs/<name>.yaml), side by side
in one run. Two runs at a time, one thread each (2 cores); every run has the same seed, prompts,
budget of train steps and evaluation.

    python benchmarks/policy_losses.py [--train-steps 16] [--losses vanilla gspo cispo] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_line

ROOT = Path(__file__).resolve().parent.parent
LOSSES = ["vanilla", "gspo", "cispo", "sapo", "clip_cov", "kl_cov", "geo_mean"]


def command(loss: str, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """`dapo train` on the arithmetic config with the loss's preset on top (vanilla: DAPO itself)."""
    import yaml

    preset = {} if loss == "vanilla" else yaml.safe_load((ROOT / "configs" / f"{loss}.yaml").read_text())
    overrides = {**preset, "threads": 1, "train_steps": args.train_steps, "eval_every": 0, "save_every": 0,
                 "seed": args.seed, "output_dir": str(run_dir), "max_num_gen_batches": 64}
    flags = [a for k, v in overrides.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return [sys.executable, "-m", "dapo.cli", "train", "--config", str(ROOT / "configs" / "arithmetic.yaml"), *flags]


def summary(loss: str, run_dir: Path, seconds: float, code: int) -> dict:
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = evals[-1] if len(evals) > 1 else {}
    return {"loss": loss, "exit": code, "steps": len(metrics), "seconds": round(seconds, 1),
            "avg@8 before": evals[0].get("avg@8") if evals else None, "avg@8 after": last.get("avg@8"),
            "pass@8 after": last.get("pass@8"),
            "entropy last": metrics[-1]["entropy"] if metrics else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--losses", nargs="+", default=LOSSES, choices=LOSSES)
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (one thread each)")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pending = list(args.losses)
        running: dict[str, tuple[subprocess.Popen, Path, float]] = {}
        while pending or running:
            while pending and len(running) < args.parallel:
                loss = pending.pop(0)
                run_dir = Path(tmp) / loss
                log = open(Path(tmp) / f"{loss}.log", "w")
                proc = subprocess.Popen(command(loss, args, run_dir), stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
                running[loss] = (proc, run_dir, time.perf_counter())
            time.sleep(2)
            for loss, (proc, run_dir, start) in list(running.items()):
                if proc.poll() is not None:
                    del running[loss]
                    rows.append(summary(loss, run_dir, time.perf_counter() - start, proc.returncode))
                    print(json.dumps(rows[-1]), flush=True)
                    if proc.returncode != 0:
                        print((Path(tmp) / f"{loss}.log").read_text()[-2000:], flush=True)
    order = {name: i for i, name in enumerate(args.losses)}
    print(f"\n| policy_loss | avg@8 before | avg@8 after {args.train_steps} steps | pass@8 after | entropy (last "
          "step) | wall s |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: order[r["loss"]]):
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {r['loss']} | {fmt(r['avg@8 before'])} | {fmt(r['avg@8 after'])} | {fmt(r['pass@8 after'])} | "
              f"{fmt(r['entropy last'])} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
