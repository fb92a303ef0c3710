"""Time to held-out avg@8 >= 0.8 on configs/arithmetic.yaml, two variants side by side in one run.

Both run at once, one thread each, so each has one of the two cores:

- `--compare sampling` (default): dynamic sampling as it is now (streaming refill, prompt skipping,
  confidence-bound stop, pi_old from the sampler) against the behaviour of 2026-11-25: Algorithm 1
  as written (fixed rounds of gen_batch_size, no skipping) and pi_old recomputed by a forward.
- `--compare engines`: dapo's HF sampler against vLLM as the rollout engine (needs .venv-vllm).
- `--compare trl`: dapo against TRL 1.16's GRPOTrainer configured as DAPO without dynamic sampling
  (benchmarks/trl_arithmetic.py, in the TRL virtualenv), on the same model, prompts, held-out sums
  and reward. This script first writes the task file TRL reads (the task's records as dapo builds
  them, dapo's prompt token ids and stop tokens, reward probes and the resolved config); TRL derives
  its settings from it, evaluates every `--eval-every` dapo steps' worth of optimizer steps (2 per
  train step) and stops at the bar or after `--max-seconds` of training.

Training seconds are the sum of `step_seconds` (generation + update) up to the evaluation that
first reaches the bar; evaluation time is not counted (TRL: the callback's clock, evaluation left out).

    python benchmarks/arithmetic_time_to_learn.py [--train-steps 20] [--eval-every 2]
    python benchmarks/arithmetic_time_to_learn.py --compare engines   # hf vs vllm (needs .venv-vllm)
    python benchmarks/arithmetic_time_to_learn.py --compare trl [--trl-python .bench-venv-trl/bin/python]
    python benchmarks/arithmetic_time_to_learn.py --export-task task.json   # only write TRL's task file
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import machine_line

BAR = 0.8
CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "arithmetic.yaml")  # from any directory
SAMPLING = {"now (stream, skip, bound, sampler pi_old)": [],
            "before (rounds, no skip, recomputed pi_old)": ["--refill", "rounds", "--no-prompt-skip",
                                                            "--solved-accuracy", "1", "--old-logprobs", "recompute"]}
ENGINES = {"hf engine": [], "vllm engine": ["--rollout-engine", "vllm", "--vllm-kv-cache-gb", "1"]}
TRL_SCRIPT = Path(__file__).parent / "trl_arithmetic.py"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def dapo_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields every `dapo train` of this script sets on top of configs/arithmetic.yaml."""
    out: dict[str, Any] = {"threads": 1, "train_steps": args.train_steps, "eval_every": args.eval_every,
                           "save_every": 0, "seed": args.seed}
    if args.max_eval_prompts:
        out["max_eval_prompts"] = args.max_eval_prompts
    return out


def dapo_command(python: str, overrides: dict[str, Any], run_dir: str, extra: list[str]) -> list[str]:
    flags = [a for k, v in overrides.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return [python, "-m", "dapo", "train", "--config", CONFIG, *flags, "--output-dir", run_dir, *extra]


def dapo_summary(run: Path) -> dict[str, Any]:
    """Time to the bar and counts of one finished `dapo train` run, from its metrics.jsonl and eval.jsonl."""
    metrics, evals = rows(run / "metrics.jsonl"), rows(run / "eval.jsonl")
    seconds = {m["step"]: sum(r["step_seconds"] for r in metrics if r["step"] <= m["step"]) for m in metrics}
    groups = {m["step"]: sum(r["prompts_generated"] for r in metrics if r["step"] <= m["step"]) for m in metrics}
    opt_steps = {m["step"]: m["optimizer_steps"] for m in metrics}
    reached = next((e for e in evals if e["step"] > 0 and e["avg@8"] >= BAR), None)
    last = metrics[-1]["step"]
    return {"reached": reached is not None, "step_to_bar": reached["step"] if reached else None,
            "seconds_to_bar": seconds[reached["step"]] if reached else None,
            "opt_steps_to_bar": opt_steps[reached["step"]] if reached else None,
            "groups_to_bar": groups[reached["step"]] if reached else None,
            "final_avg": evals[-1]["avg@8"], "final_step": evals[-1]["step"],
            "final_opt_step": opt_steps.get(evals[-1]["step"], 0), "steps": last,
            "opt_steps": opt_steps[last], "groups": groups[last], "seconds": seconds[last],
            "update_seconds_per_step": sum(r["train_seconds"] for r in metrics) / len(metrics)}


# --- the task file for benchmarks/trl_arithmetic.py ---------------------------------------------------

def reward_probes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completions near each kind of edge of the numeric reward, scored by dapo's own function, so the
    TRL script can check that dapo.rewards, imported there from src/, scores them the same. Chat-format
    completions, as TRL passes them."""
    from dapo.rewards import numeric_reward

    probes = []
    for r in records[:: max(len(records) // 8, 1)]:  # a spread over the three levels
        a, n = r["answer"], int(r["answer"])
        for text in (a, f" {a}\n", f"{n - 1} + 1 = {a}", f"{a}.0", f"{a}.5", f"-{a}", str(n + 1), f"{a}, not {n + 1}",
                     f"{n + 1}? No: {a}", f"{a},000", f"{a}{a}", f".{a}", "", "I do not know", f"{a} apples."):
            probes.append({"completion": [{"role": "assistant", "content": text}], "answer": a})
    scores = numeric_reward(None, [p["completion"] for p in probes], [p["answer"] for p in probes])
    return [p | {"score": s} for p, s in zip(probes, scores)]


def export_task(path: Path, overrides: dict[str, Any]) -> None:
    """Write what TRL needs to train and evaluate on exactly dapo's arithmetic task, as JSON.

    The records come from dapo's own build_task on configs/arithmetic.yaml with `overrides` (the
    settings `dapo train` runs with here); messages are dapo's to_messages (the config's system
    prompt, if any) and prompt_ids dapo's encode_prompt, which the TRL script compares with its own
    templating. stop_ids are the tokens dapo's sampler stops at; config is the resolved DAPOConfig.
    """
    from dapo import DAPOConfig
    from dapo.data import encode_prompt, to_messages
    from dapo.models import load_model, load_tokenizer, stop_token_ids
    from dapo.tasks import build_task

    config = DAPOConfig.from_yaml(CONFIG, **overrides)
    task = build_task(config)
    tokenizer = load_tokenizer(config.model)
    stop_ids = sorted(stop_token_ids(load_model(config.model, config.dtype), tokenizer))  # as Trainer does

    def record(r: dict[str, Any]) -> dict[str, Any]:
        return {"messages": to_messages(r["prompt"], config.system_prompt), "answer": r["answer"],
                "level": r["level"],
                "prompt_ids": encode_prompt(tokenizer, r["prompt"], config.system_prompt, config.max_prompt_len)}

    path.write_text(json.dumps({
        "task": task.name, "config": config.to_dict(), "stop_ids": stop_ids,
        "train": [record(r) for r in task.train], "eval": [record(r) for r in task.eval],
        "reward_probes": reward_probes(task.train)}, indent=1))


# --- the comparisons ----------------------------------------------------------------------------------

def compare_dapo_variants(args: argparse.Namespace, tmp: str) -> None:
    variants = SAMPLING if args.compare == "sampling" else ENGINES
    overrides = dapo_overrides(args)
    procs = {}
    for i, (name, extra) in enumerate(variants.items()):
        python = args.vllm_python if "vllm" in extra else sys.executable
        procs[name] = (subprocess.Popen(dapo_command(python, overrides, f"{tmp}/{i}", extra), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True), Path(tmp) / str(i))
    print(f"| {'dynamic sampling' if args.compare == 'sampling' else 'rollout engine'} | train s to avg@8 >= 0.8 | "
          "steps | avg@8 at the end (step) | generated groups | train seconds in all | update s per step |")
    print("|---|---|---|---|---|---|---|")
    for name, (proc, run) in procs.items():
        _, err = proc.communicate()
        if proc.returncode != 0:
            print(f"{name}: dapo train failed:\n{err[-2000:]}")
            continue
        s = dapo_summary(run)
        to_bar = f"{s['seconds_to_bar']:.0f}" if s["reached"] else "not reached"
        print(f"| {name} | {to_bar} | {s['step_to_bar'] or '-'} | {s['final_avg']:.3f} ({s['final_step']}) | "
              f"{s['groups']} | {s['seconds']:.0f} | {s['update_seconds_per_step']:.2f} |", flush=True)


def compare_trl(args: argparse.Namespace, tmp: str) -> None:
    from dapo.models import default_model_dir

    if not Path(args.trl_python).is_file():
        raise SystemExit(f"no TRL virtualenv python at {args.trl_python}; create it (torch first, from the local CPU "
                         "wheel): python3 -m venv .bench-venv-trl && .bench-venv-trl/bin/pip install torch==2.13.0 && "
                         ".bench-venv-trl/bin/pip install -r benchmarks/trl_requirements.txt")
    overrides = dapo_overrides(args)
    task_file = Path(tmp) / "arithmetic_task.json"
    export_task(task_file, overrides)  # before either run starts: neither is slowed by it
    dapo_run, trl_out, trl_log = Path(tmp) / "dapo", Path(tmp) / "trl.json", Path(tmp) / "trl.log"
    dapo = subprocess.Popen(dapo_command(sys.executable, overrides, str(dapo_run), []), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    with trl_log.open("w") as log:  # TRL prints a dict per step; keep them out of the table
        trl = subprocess.Popen([args.trl_python, str(TRL_SCRIPT), "--task-file", str(task_file),
                                "--model", str(default_model_dir()), "--seed", str(args.seed), "--threads", "1",
                                "--max-seconds", str(args.max_seconds), "--out", str(trl_out)],
                               stdout=log, stderr=subprocess.STDOUT)
        _, dapo_err = dapo.communicate()
        trl.wait()
    table: list[dict[str, Any]] = []
    if dapo.returncode != 0:
        print(f"dapo train failed:\n{dapo_err[-2000:]}")
    else:
        s = dapo_summary(dapo_run)
        table.append(s | {"name": "dapo (stream, skip, bound)", "unit": "train steps", "units_to_bar": s["step_to_bar"],
                          "units": s["steps"]})
    if trl.returncode != 0 or not trl_out.is_file():
        print(f"TRL run failed (log {trl_log}):\n{trl_log.read_text()[-3000:]}")
    else:
        t = json.loads(trl_out.read_text())
        table.append({"name": "TRL GRPOTrainer (dapo loss, no dynamic sampling)", "reached": t["reached"],
                      "seconds_to_bar": t["train_seconds_to_bar"], "opt_steps_to_bar": t["optimizer_steps_to_bar"],
                      "groups_to_bar": t["groups_to_bar"], "unit": "generations",
                      "units_to_bar": t["generations_to_bar"], "units": t["generations"],
                      "opt_steps": t["optimizer_steps"], "groups": t["groups_generated"],
                      "final_avg": t["final"]["avg@8"], "final_opt_step": t["final"]["optimizer_step"],
                      "seconds": t["train_seconds"]})
    print(f"| trainer | reached | train s to avg@8 >= {BAR} | optimizer steps to bar | groups generated to bar | "
          "optimizer steps run | groups generated | avg@8 at the end (optimizer step) | train seconds in all |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        hit = r["reached"]
        to_bar = f"{r['seconds_to_bar']:.0f}" if hit else "not reached"
        steps_to_bar = f"{r['opt_steps_to_bar']} ({r['units_to_bar']} {r['unit']})" if hit else "-"
        print(f"| {r['name']} | {'yes' if hit else 'no'} | {to_bar} | {steps_to_bar} | "
              f"{r['groups_to_bar'] if hit else '-'} | {r['opt_steps']} ({r['units']} {r['unit']}) | {r['groups']} | "
              f"{r['final_avg']:.3f} ({r['final_opt_step']}) | {r['seconds']:.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--compare", choices=["sampling", "engines", "trl"], default="sampling")
    p.add_argument("--seed", type=int, default=0, help="the run seed of every variant (dapo and TRL)")
    p.add_argument("--max-eval-prompts", type=int, default=0,
                   help="evaluate on the first N held-out prompts only (0: all 48); for smoke runs")
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    p.add_argument("--trl-python", default=".bench-venv-trl/bin/python",
                   help="python of a virtualenv with benchmarks/trl_requirements.txt installed")
    p.add_argument("--max-seconds", type=float, default=1800.0,
                   help="--compare trl: TRL stops after this many training seconds if the bar is not reached")
    p.add_argument("--keep", default=None,
                   help="directory to keep the runs in (dapo run dirs; for trl also the task file, trl.json with "
                        "the avg@8 curve and trl.log); default: a temporary directory")
    p.add_argument("--export-task", default=None, metavar="PATH",
                   help="only write the task file benchmarks/trl_arithmetic.py reads (with these options) and exit")
    args = p.parse_args()
    if args.export_task:
        export_task(Path(args.export_task), dapo_overrides(args))
        return
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        Path(work).mkdir(parents=True, exist_ok=True)
        (compare_trl if args.compare == "trl" else compare_dapo_variants)(args, work)


if __name__ == "__main__":
    main()
