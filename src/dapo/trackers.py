"""Experiment trackers behind one small interface: `log(step, metrics)` and `close()`.

Both are optional: TensorBoard (local event files under RUN_DIR/tensorboard, works offline;
needs the `tensorboard` package) and Weights & Biases (needs `wandb`; honours WANDB_MODE=offline,
WANDB_PROJECT, WANDB_ENTITY). Each is imported only when selected, so neither is a dependency.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from dapo.config import TRACKERS
from dapo.errors import ConfigError


class Tracker(Protocol):
    def log(self, step: int, metrics: Mapping[str, Any]) -> None: ...
    def close(self) -> None: ...


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a metrics row (trackers plot numbers; bools and None are skipped)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


class TensorBoardTracker:
    """Event files under RUN_DIR/tensorboard; view with `tensorboard --logdir RUN_DIR/tensorboard`."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch imports tensorboard lazily; it is absent from a bare install
            raise ConfigError("trackers: 'tensorboard' needs the tensorboard package: pip install tensorboard"
                              ) from e
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for k, v in scalars(metrics).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run; set WANDB_MODE=offline to log without an account or network
    (upload later with `wandb sync RUN_DIR/wandb/offline-run-*`)."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("trackers: 'wandb' needs the wandb package: pip install wandb "
                              "(set WANDB_MODE=offline to log without an account)") from e
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dapo"), name=Path(run_dir).name,
                              dir=str(run_dir), config=dict(config))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.run.log(scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Fans each call out to every selected tracker."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log(step, metrics)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def make_trackers(names: Sequence[str], run_dir: Path, config: Mapping[str, Any]) -> Trackers:
    """Build the trackers named in the config; a missing optional package raises ConfigError now,
    before any training time is spent."""
    built: list[Tracker] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            built.append(TensorBoardTracker(run_dir))
        elif name == "wandb":
            built.append(WandbTracker(run_dir, config))
        else:
            raise ConfigError(f"trackers: unknown tracker {name!r}; choose from {list(TRACKERS)}")
    return Trackers(built)
