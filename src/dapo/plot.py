"""`dapo plot RUN_DIR [RUN_DIR ...]`: a PNG dashboard of one or several runs.

Reads RUN_DIR/metrics.jsonl (and eval.jsonl when present). Each panel is one question a
person watching an RL run asks; each run gets one colour across all panels, and the series
inside a panel are told apart by line style, so several runs overlay without a legend per line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dapo.errors import DapoError
from dapo.metrics import read_evals, read_metrics


@dataclass(frozen=True)
class Series:
    key: str          # metrics.jsonl key, or "eval:KEY" for an eval.jsonl key
    label: str
    style: str = "-"  # matplotlib line style; the run decides the colour


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: tuple[Series, ...]


PANELS: tuple[Panel, ...] = (
    Panel("Reward (mean over sampled responses)", "reward", (
        Series("reward_mean", "all sampled"), Series("batch_reward_mean", "train batch (kept groups)", "--"))),
    Panel("Accuracy", "share correct", (
        Series("accuracy", "all sampled"), Series("batch_accuracy", "train batch (kept groups)", "-."),
        Series("eval:avg@*", "eval avg@k", "--"),
        Series("eval:pass@*", "eval pass@k", ":"))),
    Panel("Response length", "tokens", (
        Series("response_length_mean", "mean"), Series("response_length_max", "max", "--"))),
    Panel("Entropy of the policy", "nats / token", (Series("entropy", "entropy"),)),
    Panel("Clipped token share", "share of tokens", (
        Series("clip_frac_low", "low (ratio < 1 - eps_low)"), Series("clip_frac_high", "high (ratio > 1 + eps_high)", "--"))),
    Panel("KL to the old policy (approx_kl)", "nats / token", (Series("approx_kl", "approx_kl"),)),
    Panel("Dynamic sampling: groups per step", "groups", (
        Series("groups_kept", "kept"), Series("groups_dropped_all_same", "dropped (equal rewards)", "--"))),
    Panel("Time per step", "seconds", (
        Series("gen_seconds", "generation"), Series("train_seconds", "training", "--"))),
    Panel("Share of responses truncated", "share", (Series("truncated_share", "truncated"),)),
)


@dataclass
class RunData:
    name: str
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]] = field(default_factory=list)


def load_run(run_dir: str | Path) -> RunData:
    path = Path(run_dir)
    if not (path / "metrics.jsonl").is_file():
        raise DapoError(f"{str(path)!r} has no metrics.jsonl; pass a run directory written by `dapo train`")
    metrics = read_metrics(path)
    if not metrics:
        raise DapoError(f"{str(path / 'metrics.jsonl')!r} is empty: the run has not finished a train step yet")
    return RunData(path.resolve().name, metrics, read_evals(path))


def points(run: RunData, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one series; rows lacking the key or holding null are skipped.
    An `eval:avg@*` key matches the first eval column with that prefix (k varies by config)."""
    rows, name = run.metrics, key
    if key.startswith("eval:"):
        rows, name = run.evals, key[len("eval:"):]
        if name.endswith("*"):
            name = next((k for r in rows for k in r if k.startswith(name[:-1])), name)
    xs, ys = [], []
    for r in rows:
        v = r.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r.get("step", 0))
            ys.append(float(v))
    return xs, ys


def unique_names(runs: Sequence[RunData]) -> list[str]:
    """Run labels for the legend: directory names, disambiguated when two runs share one."""
    names = [r.name for r in runs]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]


def render(runs: Sequence[RunData], out: str | Path) -> Path:
    """Draw the dashboard into a PNG file and return its path."""
    # The object-oriented API with the Agg canvas: no display, no global pyplot state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    cols = 3
    rows = -(-len(PANELS) // cols)
    fig = Figure(figsize=(6.0 * cols, 3.6 * rows + 0.9), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    names = unique_names(runs)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, PANELS):
        drawn: list[Series] = []
        for run, colour in zip(runs, colours):
            for s in panel.series:
                xs, ys = points(run, s.key)
                if not xs:
                    continue
                # Mark the points of short series (a 2-step run beside a long one, sparse
                # evaluations) so they stay visible.
                marked = len(xs) <= 30 or s.key.startswith("eval:")
                ax.plot(xs, ys, s.style, color=colour, linewidth=1.6, marker="o" if marked else None, markersize=3.5)
                if s not in drawn:
                    drawn.append(s)
        ax.set_title(panel.title, fontsize=11)
        ax.set_xlabel("train step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif len(panel.series) > 1:
            # Line styles tell series apart; in black, so they are not mistaken for runs.
            handles = [Line2D([], [], linestyle=s.style, color="black" if len(runs) > 1 else colours[0])
                       for s in drawn]
            ax.legend(handles, [s.label for s in drawn], fontsize=8, loc="best", framealpha=0.8)
    for ax in axes[len(PANELS):]:
        ax.set_visible(False)
    title = f"dapo run {names[0]}" if len(runs) == 1 else f"dapo: {len(runs)} runs compared"
    fig.suptitle(title, fontsize=14, fontweight="bold")
    if len(runs) > 1:
        fig.legend([Line2D([], [], color=c, linewidth=3) for c in colours], names, loc="outside lower center",
                   ncol=min(len(runs), 4), fontsize=10, title="runs")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def default_output(run_dirs: Sequence[str | Path]) -> Path:
    """One run: RUN_DIR/dashboard.png; several: dashboard.png in the current directory."""
    return Path(run_dirs[0]) / "dashboard.png" if len(run_dirs) == 1 else Path("dashboard.png")


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Load the runs and write their dashboard; the entry point of `dapo plot`."""
    runs = [load_run(d) for d in run_dirs]
    return render(runs, out or default_output(run_dirs))
