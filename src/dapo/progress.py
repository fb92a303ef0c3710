"""Console display of a training run, the only place that prints during training: the seed
example's lines (`VerboseProgress`, the default), a live `rich` progress display on a terminal,
one plain line per train step otherwise (CI logs, `| tee`, files), and the summary table that
ends `dapo train`. Ranks other than 0 get `NullProgress`.

The trainer calls the hooks of `Progress`; the formatting is done by pure functions
(`eta_seconds`, `step_line`, `summary_rows`) so it is testable without a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, Protocol


def stderr_warning(text: str) -> None:
    """A warning line outside a run, or before its display exists (the default `warn` of library
    functions: checkpoint verification, prompt templating, reward scoring)."""
    print(text, file=sys.stderr, flush=True)


def once(warn: Callable[[str], None]) -> Callable[[str], None]:
    """`warn`, but speaking only the first time it is called."""
    said = False

    def first_only(text: str) -> None:
        nonlocal said
        if not said:
            said = True
            warn(text)
    return first_only


# --- pure formatting -------------------------------------------------------------------------
def eta_seconds(elapsed: float, done: int, total: int) -> float | None:
    """Time left if the remaining steps take as long as the finished ones did on average;
    None before the first step finishes (no estimate is better than a wild one)."""
    if done <= 0:
        return None
    return max(total - done, 0) * elapsed / done


def format_duration(seconds: float | None) -> str:
    """`1:02:03`, `2:03`, or `?` when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def step_line(step: int, total: int, stats: Mapping[str, Any], eta: float | None) -> str:
    """One line describing a finished train step, for logs."""
    if stats.get("reward_mean") is None:  # filled by carried-over groups: nothing was sampled
        parts = [f"step {step}/{total}", f"carried over: batch reward {stats.get('batch_reward_mean', 0.0):.3f}"]
    else:
        parts = [f"step {step}/{total}", f"reward {stats['reward_mean']:.3f}"]
        if stats.get("accuracy") is not None:
            parts.append(f"acc {stats['accuracy']:.3f}")
        parts.append(f"len {stats.get('response_length_mean', 0.0):.1f}")
    parts += [f"entropy {stats.get('entropy', 0.0):.3f}",
              f"kept {stats.get('groups_kept', 0)} dropped {stats.get('groups_dropped_all_same', 0)} "
              f"in {stats.get('gen_rounds', 0)} rounds",
              f"{stats.get('step_seconds', 0.0):.1f} s/step",
              f"ETA {format_duration(eta)}"]
    return " | ".join(parts)


def eval_line(label: str, scores: Mapping[str, float]) -> str:
    """`eval before training: avg@32 0.031 | pass@32 0.600 | ...`"""
    return f"eval {label}: " + " | ".join(f"{k} {v:.3f}" for k, v in scores.items())


def summary_rows(steps: int, seconds: float, metrics: Sequence[Mapping[str, Any]], eval_before: Mapping[str, float],
                 eval_after: Mapping[str, float], checkpoint: Any, run_dir: Any,
                 stopped: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """(label, value) rows of the end-of-training summary. The final reward and accuracy are those
    of everything sampled at the last step that sampled: the step that stopped the run as solved
    (`stopped`), else the last train step that generated (a step filled by carried-over groups
    alone sampled nothing)."""
    rows = [("train steps", str(steps)), ("wall time", format_duration(seconds) + f" ({seconds:.1f} s)")]
    sampled = [m for m in metrics if m.get("reward_mean") is not None]
    last = dict(stopped) if stopped else sampled[-1] if sampled else None
    if last is not None and last.get("reward_mean") is not None:
        when = f"sampled at step {last['step']}" + (", stopped as solved" if stopped else "")
        rows.append((f"final reward (mean, {when})", f"{last['reward_mean']:.3f}"))
        if last.get("accuracy") is not None:
            rows.append((f"final train accuracy ({when})", f"{last['accuracy']:.3f}"))
    for key in eval_before:
        if key in eval_after and key != "num_prompts":  # a count, not a score
            rows.append((f"eval {key}", f"{eval_before[key]:.3f} before -> {eval_after[key]:.3f} after"))
    rows += [("checkpoint", str(checkpoint)), ("run directory", str(run_dir)),
             ("plot", f"dapo plot {run_dir}")]
    return rows


# --- the display ------------------------------------------------------------------------------
class Progress(Protocol):
    """Hooks the trainer calls; every implementation must tolerate any call order."""

    def start(self, total_steps: int, grad_steps: int, batch_groups: int) -> None: ...
    def phase(self, text: str) -> None: ...
    def generating(self, step: int) -> None: ...
    def group_scored(self, completions: Sequence[str], rewards: Sequence[float], kept: bool) -> None: ...
    def generation_round(self, step: int, rounds: int, kept: int, reward: float) -> None: ...
    def training(self, step: int) -> None: ...
    def grad_step(self, step: int, grad_step: int, objective: float) -> None: ...
    def step_done(self, step: int, stats: Mapping[str, Any]) -> None: ...
    def evaluated(self, label: str, scores: Mapping[str, float]) -> None: ...
    def note(self, text: str) -> None: ...
    def message(self, text: str) -> None: ...
    def warning(self, text: str) -> None: ...
    def close(self) -> None: ...


class NullProgress:
    """Shows nothing but warnings (on stderr): ranks other than 0, and the base of the others."""

    def start(self, total_steps: int, grad_steps: int, batch_groups: int) -> None: pass
    def phase(self, text: str) -> None: pass
    def generating(self, step: int) -> None: pass
    def group_scored(self, completions: Sequence[str], rewards: Sequence[float], kept: bool) -> None: pass
    def generation_round(self, step: int, rounds: int, kept: int, reward: float) -> None: pass
    def training(self, step: int) -> None: pass
    def grad_step(self, step: int, grad_step: int, objective: float) -> None: pass
    def step_done(self, step: int, stats: Mapping[str, Any]) -> None: pass
    def evaluated(self, label: str, scores: Mapping[str, float]) -> None: pass
    def note(self, text: str) -> None: pass
    def message(self, text: str) -> None: pass
    def close(self) -> None: pass

    def warning(self, text: str) -> None:
        stderr_warning(text)


class VerboseProgress(NullProgress):
    """The seed example's console lines: every sampled response with its reward, every grad step."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream
        self.total = self.grad_steps = 0

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def start(self, total_steps: int, grad_steps: int, batch_groups: int) -> None:
        self.total, self.grad_steps = total_steps, grad_steps

    def generating(self, step: int) -> None:
        self._print("-- Generating rollouts")

    def group_scored(self, completions: Sequence[str], rewards: Sequence[float], kept: bool) -> None:
        for text, r in zip(completions, rewards):
            self._print(f"Reward: {r:.3f}; Response: {text.replace(chr(10), chr(92) + 'n')}")
        if not kept:
            self._print("Sampled group would give no learning signal; resampling...")

    def training(self, step: int) -> None:
        self._print("-- Training")

    def grad_step(self, step: int, grad_step: int, objective: float) -> None:
        self._print(f"Grad step {grad_step}/{self.grad_steps} in train step {step}/{self.total} completed. "
                    f"Objective: {objective:.6f}")

    def note(self, text: str) -> None:
        self._print(text)

    def message(self, text: str) -> None:
        self._print(text)


class PlainProgress(NullProgress):
    """One line per train step and evaluation; no cursor movement, so logs stay readable."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream
        self.total = 0
        self.t0 = time.perf_counter()

    def _print(self, line: str) -> None:
        # Resolve sys.stdout at call time so pytest's capture and redirections are honoured.
        print(line, file=self.stream or sys.stdout, flush=True)

    def start(self, total_steps: int, grad_steps: int, batch_groups: int) -> None:
        self.total = total_steps
        self.t0 = time.perf_counter()

    def phase(self, text: str) -> None:
        self._print(f"-- {text}")

    def message(self, text: str) -> None:
        self._print(text)

    def step_done(self, step: int, stats: Mapping[str, Any]) -> None:
        if step == 1:
            self.t0 = time.perf_counter() - stats.get("step_seconds", 0.0)
        eta = eta_seconds(time.perf_counter() - self.t0, step, self.total)
        self._print(step_line(step, self.total, stats, eta))

    def evaluated(self, label: str, scores: Mapping[str, float]) -> None:
        if scores:
            self._print(eval_line(label, scores))


class RichProgress(NullProgress):
    """Live bars for train steps, the generation rounds of dynamic sampling and grad steps."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console or Console()
        self.bars = Progress(SpinnerColumn(), TextColumn("[bold]{task.description:<12}"), BarColumn(bar_width=30),
                             MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                             console=self.console, transient=False)
        self.total = 0
        self.t0 = time.perf_counter()
        self.step_task = self.gen_task = self.grad_task = None
        self.last_info = ""

    def start(self, total_steps: int, grad_steps: int, batch_groups: int) -> None:
        self.total = total_steps
        self.t0 = time.perf_counter()
        self.bars.start()
        self.step_task = self.bars.add_task("train steps", total=total_steps, info="")
        self.gen_task = self.bars.add_task("generation", total=batch_groups, info="")
        self.grad_task = self.bars.add_task("grad steps", total=grad_steps, info="")

    def phase(self, text: str) -> None:
        if self.step_task is not None:
            self.bars.update(self.step_task, info=f"{self.last_info}  [dim]{text}")
        else:
            self.console.print(f"-- {text}", highlight=False)

    def generation_round(self, step: int, rounds: int, kept: int, reward: float) -> None:
        if self.gen_task is not None:
            if rounds == 1:  # a new train step: restart the per-step bars
                self.bars.reset(self.gen_task)
                self.bars.reset(self.grad_task, info="")
            self.bars.update(self.gen_task, completed=kept, info=f"round {rounds}, reward {reward:.3f}")

    def grad_step(self, step: int, grad_step: int, objective: float) -> None:
        if self.grad_task is not None:
            self.bars.update(self.grad_task, completed=grad_step, info=f"objective {objective:+.4f}")

    def step_done(self, step: int, stats: Mapping[str, Any]) -> None:
        if self.step_task is None:
            return
        if step == 1:
            self.t0 = time.perf_counter() - stats.get("step_seconds", 0.0)
        eta = eta_seconds(time.perf_counter() - self.t0, step, self.total)
        acc = f"  acc {stats['accuracy']:.3f}" if stats.get("accuracy") is not None else ""
        reward = ("carried over" if stats.get("reward_mean") is None else f"reward {stats['reward_mean']:.3f}")
        self.last_info = (f"{reward}{acc}  "
                          f"{stats.get('step_seconds', 0.0):.1f} s/step  ETA {format_duration(eta)}")
        self.bars.update(self.step_task, completed=step, info=self.last_info)

    def evaluated(self, label: str, scores: Mapping[str, float]) -> None:
        if scores:
            self.console.print(eval_line(label, scores), highlight=False)

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def close(self) -> None:
        self.bars.stop()
        # After the bars stop, later phases and evaluations print as lines.
        self.step_task = self.gen_task = self.grad_task = None


def make_progress(verbose: bool, stream: IO[str] | None = None) -> Progress:
    """Verbose: the seed's lines; a terminal: live bars; else plain lines."""
    if verbose:
        return VerboseProgress(stream)
    out = stream or sys.stdout
    if getattr(out, "isatty", lambda: False)():
        from rich.console import Console

        return RichProgress(Console(file=out))
    return PlainProgress(stream)


def print_summary(rows: Sequence[tuple[str, str]], stream: IO[str] | None = None) -> None:
    """The end-of-training table; plain box characters when the output is not a terminal."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    out = stream or sys.stdout
    # Off a terminal rich assumes 80 columns and would fold long paths; logs have no width, and a
    # path on one line can be copied.
    console = Console(file=out, width=None if out.isatty() else 10_000)
    table = Table(title="dapo train: summary", box=box.SIMPLE if out.isatty() else box.ASCII, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
