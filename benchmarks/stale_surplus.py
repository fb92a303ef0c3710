"""What should dynamic sampling do with its surplus groups? Held-out accuracy after a few train steps
on three tasks, each surplus policy against Algorithm 1's fixed rounds, 2+ seeds.

The round that fills a step's batch often brings more informative groups than the step needs.
Before 2026-12-06 they opened the next step's batch: sampled by the policy before the last update
(one version stale) and trained with a recomputed pi_old and no correction. The arms:

- rounds:        refill 'rounds' (Algorithm 1 as written), surplus carried as before
- carry:         refill 'stream', surplus carried, uncorrected (the default before 2026-12-06)
- carry + tis:   carried, corrected by decoupled PPO (stale_correction 'tis')
- train:         the surplus trained in the step that sampled it (the default since)
- drop:          the surplus discarded (verl's DAPO recipe)

Tasks: `digit` (the seed example), `arithmetic` (configs/arithmetic.yaml) and `words`, a small
custom-reward task built here as a user would (12 prompts "Write the number N in words" in a JSONL
file, a TRL-style reward function in a .py file: 1 when the answer says the word; the 9 other numbers
up to 20 held out in another file). Each run is a
`dapo train` with one thread; two run at a time (one core each). Prints one table row per task and
arm: held-out avg@k after the last step for each seed, their mean, and what the steps trained on.

    python benchmarks/stale_surplus.py [--tasks digit arithmetic words] [--seeds 0 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import machine_line

ROOT = Path(__file__).resolve().parent.parent
ARMS: dict[str, list[str]] = {
    "rounds": ["--refill", "rounds", "--surplus", "carry", "--stale-correction", "none"],
    "carry": ["--surplus", "carry", "--stale-correction", "none"],
    "carry + tis": ["--surplus", "carry", "--stale-correction", "tis"],
    "train": ["--surplus", "train"],
    "drop": ["--surplus", "drop"],
}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
REWARD_FILE = '''import re


def number_word(prompts, completions, answer, **kwargs):
    """1 if the completion says the number's word (any case), else 0."""
    out = []
    for completion, word in zip(completions, answer):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        out.append(1.0 if re.search(rf"\\b{word}\\b", text.lower()) else 0.0)
    return out
'''


def words_task(out: Path) -> list[str]:
    """The custom-reward task's files, and the `dapo train` options that use them."""
    out.mkdir(parents=True, exist_ok=True)
    train = [0, 1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]

    def record(n: int) -> str:
        return json.dumps({"prompt": f"Write the number {n} in words. Answer with the word only.",
                           "answer": WORDS[n]})

    (out / "train.jsonl").write_text("\n".join(record(n) for n in train) + "\n")
    (out / "test.jsonl").write_text("\n".join(record(n) for n in range(21) if n not in train) + "\n")
    (out / "reward.py").write_text(REWARD_FILE)
    return ["--data", str(out / "train.jsonl"), "--eval-data", str(out / "test.jsonl"),
            "--reward", f"{out / 'reward.py'}:number_word", "--group-size", "12", "--train-batch-size", "2",
            "--gen-batch-size", "2", "--train-steps", "5", "--max-new-tokens", "8", "--eval-samples", "8"]


def task_options(task: str, out: Path) -> list[str]:
    if task == "digit":
        return ["--task", "digit", "--train-steps", "4", "--eval-samples", "64"]
    if task == "arithmetic":
        return ["--config", str(ROOT / "configs" / "arithmetic.yaml"), "--train-steps", "6"]
    return words_task(out / "words-data")


def summary(run: Path) -> dict[str, Any]:
    read = lambda name: [json.loads(x) for x in (run / name).read_text().splitlines() if x.strip()]  # noqa: E731
    metrics, evals = read("metrics.jsonl"), read("eval.jsonl")
    last = evals[-1]
    key = next(k for k in last if k.startswith("avg@"))
    return {"avg": last[key], "key": key, "steps": metrics[-1]["step"],
            "groups_trained": sum(m.get("groups_trained", 0) for m in metrics),
            "stale_groups": sum(m.get("groups_carried_over", 0) for m in metrics),
            "stale_kl": max((m.get("stale_kl") or 0.0) for m in metrics),
            "seconds": sum(m["step_seconds"] for m in metrics)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["digit", "arithmetic", "words"])
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--out", default="runs/stale_surplus")
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    print(machine_line())
    jobs = [(task, arm, seed) for task in args.tasks for seed in args.seeds for arm in args.arms]
    running: list[tuple[subprocess.Popen, tuple[str, str, int]]] = []
    results: dict[tuple[str, str, int], dict[str, Any]] = {}

    def run_dir(job: tuple[str, str, int]) -> Path:
        task, arm, seed = job
        return out / task / f"{arm.replace(' + ', '-')}-seed{seed}"

    def reap(block: bool) -> None:
        for proc, job in list(running):
            if block or proc.poll() is not None:
                if proc.wait() != 0:
                    for other, _ in running:
                        other.kill()
                    sys.exit(f"{job}: dapo train failed:\n{proc.stderr.read()[-3000:]}")
                results[job] = summary(run_dir(job))
                (run_dir(job) / "summary.json").write_text(json.dumps(results[job]))
                shutil.rmtree(run_dir(job) / "checkpoints")  # 1.6 GB each: the figures are in the logs
                running.remove((proc, job))
                print(f"  done {job}: {results[job]}", flush=True)
                block = False

    start = time.perf_counter()
    for job in jobs:
        while len(running) >= args.parallel:
            time.sleep(1)
            reap(False)
        task, arm, seed = job
        if (run_dir(job) / "summary.json").is_file():
            results[job] = json.loads((run_dir(job) / "summary.json").read_text())  # finished in an earlier call
            continue
        cmd = [sys.executable, "-m", "dapo", "train", *task_options(task, out), *ARMS[arm], "--seed", str(seed),
               "--threads", "1", "--save-every", "0", "--eval-every", "0", "--keep-last", "1", "--overwrite",
               "--output-dir", str(run_dir(job)), "--no-verbose"]
        running.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), job))
    while running:
        reap(True)
    print(f"\n{len(jobs)} runs in {time.perf_counter() - start:.0f} s\n")
    print("| task | surplus | " + " | ".join(f"held-out avg@k, seed {s}" for s in args.seeds)
          + " | mean | groups trained | of them carried over (stale) | largest stale_kl |")
    print("|---|---|" + "---|" * (len(args.seeds) + 4))
    for task in args.tasks:
        for arm in args.arms:
            rs = [results[(task, arm, s)] for s in args.seeds]
            mean = sum(r["avg"] for r in rs) / len(rs)
            print(f"| {task} ({rs[0]['key']}, {rs[0]['steps']} steps) | {arm} | "
                  + " | ".join(f"{r['avg']:.3f}" for r in rs) + f" | **{mean:.3f}** | "
                  + f"{sum(r['groups_trained'] for r in rs)} | {sum(r['stale_groups'] for r in rs)} | "
                  + f"{max(r['stale_kl'] for r in rs):.3f} |")


if __name__ == "__main__":
    main()
