"""Training speed on short responses, this checkout against another revision, side by side.

The long-response work (chunked log-probs, the rows layout, activation checkpointing, the
layout cost model) must not slow down the workloads dapo already ran well: short answers behind
a shared prompt. For each workload this times one `Actor.update` (mu passes, old log-probs,
optimizer steps: the whole training half of a train step) on the default model, with the
default config, and compares the code of this checkout with `--against REV` (default: the
commit before the long-response merge). Both run in fresh subprocesses, alternated A/B/A/B, so
drift of the machine hits both alike; the figure is the median of `--repeats` updates per run
and the best of `--rounds` runs.

    python benchmarks/short_responses.py [--against adcd8bb] [--lora]

`--lora` adds this checkout with rank-16 LoRA adapters (same workloads) as a third column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_line

ROOT = Path(__file__).resolve().parent.parent
# name: (groups, G, prompt tokens, response tokens, config overrides)
WORKLOADS = {
    "digit (defaults: 1 x 32, prompt 45, 4 tokens)": (1, 32, 45, 4, {}),
    "arithmetic (8 x 8, prompt 60, 12 tokens)": (8, 8, 60, 12, {"group_size": 8, "train_batch_size": 8,
                                                                 "mini_batch_size": 4, "mu": 1}),
    "throughput (1 x 16, prompt 256, 32 tokens)": (1, 16, 256, 32, {"group_size": 16}),
    "throughput (1 x 16, prompt 1024, 32 tokens)": (1, 16, 1024, 32, {"group_size": 16, "max_prompt_len": 1100}),
}


def child(name: str, repeats: int, lora: bool) -> None:
    """In a subprocess whose `dapo` is the code under test: time Actor.update on one workload."""
    import torch

    from common import default_model, synthetic_batch
    from dapo.actor import Actor
    from dapo.config import DAPOConfig

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    groups, G, prompt_len, response_len, overrides = WORKLOADS[name]
    config = DAPOConfig(**overrides, **({"lora_rank": 16, "lr": 3e-4} if lora else {}))
    model = default_model(16 if lora else 0)
    actor = Actor(model, config, pad_id=2)
    batch = synthetic_batch(groups, G, prompt_len, response_len)
    actor.update(batch)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        actor.update(batch)
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times), "tokens": len(batch) * response_len}))


def run(src: Path, name: str, repeats: int, lora: bool = False) -> float:
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT / 'benchmarks'}"}
    out = subprocess.run([sys.executable, __file__, "--child", name, "--repeats", str(repeats)] + (["--lora"] if lora else []),
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{name} with {src} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", default="adcd8bb", help="git revision to compare with (default: before the "
                   "long-response merge)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.repeats, args.lora)
        return
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.against], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            head = ["| workload | now (s) | " + f"{args.against} (s) | now / {args.against} |"
                    + (" LoRA r16 (s) | LoRA / now |" if args.lora else "")]
            print(head[0])
            print("|---|---|---|---|" + ("---|---|" if args.lora else ""))
            for name in WORKLOADS:
                now, before, lora = [], [], []
                for _ in range(args.rounds):
                    now.append(run(ROOT / "src", name, args.repeats))
                    before.append(run(old / "src", name, args.repeats))
                    if args.lora:
                        lora.append(run(ROOT / "src", name, args.repeats, lora=True))
                line = f"| {name} | {min(now):.3f} | {min(before):.3f} | {min(now) / min(before):.3f} |"
                if args.lora:
                    line += f" {min(lora):.3f} | {min(lora) / min(now):.3f} |"
                print(line, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)


if __name__ == "__main__":
    main()
