"""Stage: metrics. One object owns everything a run shows and writes about itself: the run
directory's logs (metrics.jsonl, eval.jsonl, samples.jsonl: metrics.py), the experiment trackers
(trackers.py), the console (the seed's lines or a progress display: progress.py), warnings, and
what is said once per run. Rank 0 gets a `Reporter`; the other ranks a `SilentReporter`.

Library functions that may warn outside a run (checkpoint verification, the prompt template,
the reward scorer) take a `warn` callable; their default is `stderr_warning`, and inside a run
the Reporter's `warning` is passed instead. Only progress.py prints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dapo.progress import NullProgress, Progress, make_progress, stderr_warning

__all__ = ["Reporter", "SilentReporter", "make_reporter", "stderr_warning"]


class Reporter:
    """Rank 0's reporting: created with the trainer, `open`ed on the run directory by `fit`."""

    def __init__(self, verbose: bool = True, trackers: Sequence[str] = ()) -> None:
        self.verbose, self.tracker_names = verbose, list(trackers)
        self.display: Progress = NullProgress()  # the console; before `open`, warnings go to stderr
        self.logger: Any = None
        self.trackers: Any = None
        self._said: set[str] = set()

    # --- the run directory ----------------------------------------------------------------------
    def open(self, run_dir: Path, config: Any, resuming: bool, checkpoint_bytes: int) -> None:
        """Check the run directory can hold a checkpoint, claim it (config.yaml), open the logs and
        trackers, and start the console display."""
        from dapo.checkpoint import check_run_dir
        from dapo.metrics import MetricsLogger
        from dapo.rundir import prepare_run_dir
        from dapo.trackers import make_trackers

        check_run_dir(run_dir, checkpoint_bytes)
        prepare_run_dir(run_dir, config, resuming=resuming)  # refuses another run's directory
        self.logger = MetricsLogger(run_dir, resume=resuming)
        self.trackers = make_trackers(self.tracker_names, run_dir, config.to_dict())
        self.display = make_progress(self.verbose)

    def close(self) -> None:
        self.display.close()
        if self.trackers is not None:
            self.trackers.close()
        self.display, self.logger, self.trackers = NullProgress(), None, None

    # --- what a run reports ---------------------------------------------------------------------
    def step(self, step: int, stats: dict[str, Any], samples: list[dict[str, Any]] | None = None) -> None:
        """A finished train step: its metrics row, the trackers, the sampled completions when given,
        and the console."""
        if self.logger is not None:
            self.logger.log(step, stats)
            self.trackers.log(step, stats)
            if samples is not None:
                self.logger.log_samples(step, samples)
        self.display.step_done(step, stats)

    def evaluated(self, step: int, label: str, scores: Mapping[str, float]) -> None:
        if not scores:
            return
        if self.logger is not None:
            self.logger.log_eval(step, dict(scores))
            self.trackers.log(step, {f"eval/{k}": v for k, v in scores.items()})
        self.display.evaluated(label, scores)

    def warning(self, text: str) -> None:
        """`text` is the whole line, e.g. "dapo: warning: ..."."""
        self.display.warning(text)

    def warn_once(self, key: str, text: str) -> None:
        """`warning(text)` the first time `key` is given in this run."""
        if key not in self._said:
            self._said.add(key)
            self.warning(text)

    def once(self, key: str) -> Callable[[str], None]:
        """A `warn` callable that says its first warning only (for functions called per record)."""
        return lambda text: self.warn_once(key, text)


class SilentReporter(Reporter):
    """Ranks other than 0: rank 0 reports for the run; these write and print nothing."""

    def open(self, run_dir: Path, config: Any, resuming: bool, checkpoint_bytes: int) -> None:
        pass

    def step(self, step: int, stats: dict[str, Any], samples: list[dict[str, Any]] | None = None) -> None:
        pass

    def evaluated(self, step: int, label: str, scores: Mapping[str, float]) -> None:
        pass

    def warning(self, text: str) -> None:
        pass


def make_reporter(rank: int, verbose: bool = True, trackers: Sequence[str] = ()) -> Reporter:
    return Reporter(verbose, trackers) if rank == 0 else SilentReporter(verbose, trackers)
