"""`dapo ablate`: a ladder of configurations, each one change away from the one before, run with
the same budget and seeds; then a table and figures in the manner of the paper's Table 1 and
Figures 2, 4 and 6.

The default ladder is the paper's (Table 1), built from a full DAPO config:

    naive GRPO                  eps_high = eps_low, sample-level loss, no overlong filtering,
                                no soft overlong punishment, no dynamic sampling
    + overlong filtering        overlong_filter
    + clip-higher               eps_high
    + soft overlong punishment  overlong_buffer_len (and overlong_penalty_factor)
    + token-level loss          loss_agg
    + dynamic sampling          dynamic_sampling

Each rung takes its value from the given config, so the last rung is that config. A user's own
ladder is a YAML list of {name, set: {field: value}} applied one after another (the first on top
of the config).

Budget: every arm stops once it has sampled `budget` responses (config.max_samples), the cost
that dominates an RL step (and the one dynamic sampling spends more of per train step); wall time
would depend on the machine's load, and train steps would hide dynamic sampling's extra
generation. Each arm has its own run directory under OUT/<rung>/seed<k>; `dapo ablate` run again
skips finished arms and resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dapo.config import DAPOConfig
from dapo.errors import ConfigError

__all__ = ["Rung", "arm_configs", "load_rungs", "paper_ladder", "run_ablation", "summarize", "write_report"]


@dataclass(frozen=True)
class Rung:
    name: str
    changes: dict[str, Any]  # config fields set on top of the rung before


# What naive GRPO sets (the paper's Table 1 baseline), and the order the paper adds DAPO's parts back.
PAPER_STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("+ overlong filtering", ("overlong_filter",)),
    ("+ clip-higher", ("eps_high",)),
    ("+ soft overlong punishment", ("overlong_buffer_len", "overlong_penalty_factor")),
    ("+ token-level loss", ("loss_agg",)),
    ("+ dynamic sampling", ("dynamic_sampling",)),
]


def naive_grpo(config: DAPOConfig) -> dict[str, Any]:
    return {"overlong_filter": False, "eps_high": config.eps_low, "overlong_buffer_len": 0,
            "overlong_penalty_factor": config.overlong_penalty_factor, "loss_agg": "seq-mean-token-mean",
            "dynamic_sampling": False}


def paper_ladder(config: DAPOConfig) -> list[Rung]:
    """The paper's ladder from naive GRPO up to `config` (which must be a full DAPO config: each
    rung has to change something)."""
    base = naive_grpo(config)
    rungs = [Rung("naive GRPO", base)]
    for name, names in PAPER_STEPS:
        changes = {n: getattr(config, n) for n in names if getattr(config, n) != base[n]}
        if not changes:
            raise ConfigError(f"the rung '{name}' would change nothing: the config has {names[0]} = "
                              f"{getattr(config, names[0])!r}, as naive GRPO does; give the config DAPO's value")
        rungs.append(Rung(name, changes))
    return rungs


def load_rungs(path: str | Path) -> list[Rung]:
    """A user's ladder: a YAML list of {name: ..., set: {field: value, ...}}."""
    import yaml

    items = yaml.safe_load(Path(path).read_text())
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: expected a non-empty list of rungs ({{name: ..., set: {{field: value}}}})")
    known = {f.name for f in fields(DAPOConfig)}
    rungs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"name", "set"} or not isinstance(item.get("set", {}), dict):
            raise ConfigError(f"{path}: rung {i + 1} must be {{name: ..., set: {{field: value}}}}, got {item!r}")
        changes = {k.replace("-", "_"): v for k, v in (item.get("set") or {}).items()}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"{path}: rung {i + 1} sets unknown config field(s) {', '.join(unknown)}")
        rungs.append(Rung(str(item.get("name") or f"rung {i + 1}"), changes))
    return rungs


def slug(index: int, name: str) -> str:
    return f"{index}-" + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "rung")


def arm_configs(config: DAPOConfig, rungs: Sequence[Rung], seeds: Sequence[int], budget: int,
                out: Path) -> list[tuple[int, str, int, DAPOConfig]]:
    """(rung index, rung name, seed, config) of every arm: the rungs' changes applied in turn.
    Seed by seed, so an ablation cut short has every rung of its first seeds."""
    ladder, current = [], config
    for rung in rungs:
        current = current.replace(**rung.changes)
        ladder.append(current)
    # keep_last 1: a dozen arms of two full checkpoints each (model and optimizer state, 1.6 GB each
    # for the default model) filled this machine's disk.
    return [(i, rung.name, seed, c.replace(seed=seed, max_samples=budget, eval_before=False, verbose=False,
                                           keep_last=1, output_dir=str(out / slug(i, rung.name) / f"seed{seed}")))
            for seed in seeds for i, (rung, c) in enumerate(zip(rungs, ladder))]


# --- running ------------------------------------------------------------------------------------

def run_ablation(config: DAPOConfig, rungs: Sequence[Rung], seeds: Sequence[int], budget: int, out: Path,
                 log: Callable[[str], None] = print) -> Path:
    """Run every arm not finished yet (resuming a started one), then write the table and figures.
    Returns the report's path."""
    from dapo.build import evaluate_config
    from dapo.trainer import train

    out.mkdir(parents=True, exist_ok=True)
    arms = arm_configs(config, rungs, seeds, budget, out)
    meta = json.loads(json.dumps({"budget_samples": budget, "seeds": list(seeds),
                                  "rungs": [{"name": r.name, "changes": r.changes} for r in rungs]}))
    meta_file = out / "ablation.json"
    if meta_file.exists():  # resuming: finished arms are reused only if they ran the same ladder
        old = json.loads(meta_file.read_text())
        if {k: old.get(k) for k in meta} != meta:
            raise ConfigError(f"{out} holds an ablation with another budget, seeds or ladder ({meta_file}); "
                              f"give another --out, or the same settings to resume it")
    meta_file.write_text(json.dumps(meta, indent=1) + "\n")
    start_file = out / "start.json"  # the starting model's held-out scores, once per seed
    start = json.loads(start_file.read_text()) if start_file.exists() else {}
    for seed in seeds:
        if str(seed) not in start:
            log(f"-- evaluating the starting model (seed {seed})")
            start[str(seed)] = evaluate_config(config.replace(seed=seed))
            start_file.write_text(json.dumps(start, indent=1) + "\n")
    for n, (i, name, seed, arm) in enumerate(arms, 1):
        run_dir = Path(arm.output_dir)
        if (run_dir / "arm.json").exists():
            continue
        log(f"-- arm {n}/{len(arms)}: {name}, seed {seed} -> {run_dir}")
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
            result = train(arm, resume=run_dir)
        else:
            result = train(arm.replace(overwrite=True))
        (run_dir / "arm.json").write_text(json.dumps({"rung": i, "name": name, "seed": seed, "steps": result.steps,
                                                      "eval_after": result.eval_after}, indent=1) + "\n")
    return write_report(out)


# --- the report -----------------------------------------------------------------------------------

def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's log, the last one per step: an arm resumed from a checkpoint older than
    its last logged step re-runs those steps and appends their rows again."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return sorted({r.get("step", 0): r for r in rows}.values(), key=lambda r: r.get("step", 0))


def _avg_key(rows: Sequence[dict[str, Any]], prefix: str) -> str | None:
    return next((k for r in rows for k in r if k.startswith(prefix)), None)


def load_arm(run_dir: Path, start: dict[str, Any]) -> dict[str, Any]:
    """One arm's curves: held-out accuracy by step (step 0: the starting model), and per train step
    the sampled answers' entropy, mean length and truncated share, and the time spent."""
    evals = [{"step": 0, **start}] + [r for r in _jsonl(run_dir / "eval.jsonl") if r.get("step", 0) > 0]
    metrics = _jsonl(run_dir / "metrics.jsonl")
    return {"evals": evals, "metrics": metrics, "meta": json.loads((run_dir / "arm.json").read_text())}


def _mean_spread(values: Sequence[float]) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def summarize(arm: dict[str, Any], threshold: float) -> dict[str, float | None]:
    evals, metrics = arm["evals"], arm["metrics"]
    avg, pas = _avg_key(evals, "avg@"), _avg_key(evals, "pass@")
    acc = [(e["step"], e[avg]) for e in evals if avg in e and e["step"] > 0]  # the arm's own, not the start
    seconds = {}
    total = 0.0
    for m in metrics:
        total += m.get("step_seconds", 0.0)
        seconds[m["step"]] = total
    reached = next((s for s, a in acc if a >= threshold), None)
    tail = metrics[-max(1, len(metrics) // 4):]  # the last quarter of the arm's train steps

    def tail_mean(key: str) -> float | None:
        vals = [m[key] for m in tail if m.get(key) is not None]
        return statistics.mean(vals) if vals else None

    return {
        "final": acc[-1][1] if acc else None, "final_pass": evals[-1].get(pas) if pas else None,
        "best": max(a for _, a in acc) if acc else None,
        "steps": len(metrics), "steps_to_threshold": reached,
        "seconds_to_threshold": seconds.get(reached, 0.0) if reached is not None else None,
        "length": tail_mean("response_length_mean"), "truncated": tail_mean("truncated_share"),
        "entropy": tail_mean("entropy"),
    }


def write_report(out: Path, threshold: float | None = None) -> Path:
    """OUT/ablation.md (the table) and OUT/ablation.png (curves), from the finished arms."""
    meta = json.loads((out / "ablation.json").read_text())
    start = json.loads((out / "start.json").read_text())
    arms: dict[int, list[dict[str, Any]]] = {}
    for i, rung in enumerate(meta["rungs"]):
        for seed in meta["seeds"]:
            run_dir = out / slug(i, rung["name"]) / f"seed{seed}"
            if (run_dir / "arm.json").exists():
                arms.setdefault(i, []).append(load_arm(run_dir, start[str(seed)]))
    avg = _avg_key([s for s in start.values()], "avg@") or "avg@k"
    if threshold is None:  # a gain of 0.1 over the starting model, averaged over the seeds
        threshold = round(statistics.mean(s[avg] for s in start.values()) + 0.1, 3)
    lines = [f"Budget: {meta['budget_samples']} sampled responses per arm; seeds {meta['seeds']}; mean ± standard "
             f"deviation over seeds. Held-out {avg} (pass@k beside it) at the end and at its best; steps and "
             f"train-step seconds until {avg} >= {threshold} (not reached: -); length, truncated share and entropy "
             f"of the sampled answers over the arm's last quarter of train steps.", "",
             f"| rung | change | {avg} end | pass end | {avg} best | train steps | steps to {threshold} | "
             f"seconds to {threshold} | mean length | truncated | entropy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    starting = [s[avg] for s in start.values()]
    lines.append(f"| start | the untrained model | {_mean_spread(starting)} | "
                 f"{_mean_spread([s.get(avg.replace('avg', 'pass')) for s in start.values()])} | | | | | | | |")
    for i, rung in enumerate(meta["rungs"]):
        rows = [summarize(a, threshold) for a in arms.get(i, [])]
        if not rows:
            continue
        change = ", ".join(f"{k}={v}" for k, v in rung["changes"].items())
        col = {k: _mean_spread([r[k] for r in rows]) for k in rows[0]}
        reached = [r["steps_to_threshold"] for r in rows]
        n_reached = sum(r is not None for r in reached)
        steps_to = _mean_spread([r for r in reached if r is not None]) + (f" ({n_reached}/{len(rows)})"
                                                                           if n_reached < len(rows) else "")
        lines.append(f"| {rung['name']} | {change} | {col['final']} | {col['final_pass']} | {col['best']} | "
                     f"{col['steps']} | {steps_to} | {col['seconds_to_threshold']} | {col['length']} | "
                     f"{col['truncated']} | {col['entropy']} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    _figure(out / "ablation.png", meta, arms, avg)
    return out / "ablation.md"


def _figure(path: Path, meta: dict[str, Any], arms: dict[int, list[dict[str, Any]]], avg: str) -> None:
    """Accuracy, entropy, mean length and truncated share against train step, one line per rung
    (mean over seeds, the band from the lowest to the highest seed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(f"held-out {avg}", "evals", avg), ("entropy of sampled tokens", "metrics", "entropy"),
              ("mean response length (tokens)", "metrics", "response_length_mean"),
              ("share truncated at max_new_tokens", "metrics", "truncated_share")]
    fig = Figure(figsize=(13, 8.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).flatten()
    for ax, (title, source, key) in zip(axes, panels):
        for i, rung in enumerate(meta["rungs"]):
            runs = arms.get(i, [])
            series = [{r["step"]: r[key] for r in a[source] if r.get(key) is not None} for a in runs]
            steps = sorted(set().union(*series)) if series else []
            steps = [s for s in steps if all(s in ser for ser in series)]
            if not steps:
                continue
            mean = [statistics.mean(ser[s] for ser in series) for s in steps]
            ax.plot(steps, mean, label=rung["name"], color=f"C{i}")
            if len(series) > 1:
                ax.fill_between(steps, [min(ser[s] for ser in series) for s in steps],
                                [max(ser[s] for ser in series) for s in steps], color=f"C{i}", alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("train step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Ablation: {meta['budget_samples']} sampled responses per arm, seeds {meta['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
