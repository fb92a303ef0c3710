"""SIGINT/SIGTERM during a run: the first asks the run to stop after the current train step and
write a checkpoint; the handlers then revert to the defaults, so a second signal exits at once.
That is safe because a checkpoint is only ever renamed into place complete."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from dapo.errors import TrainingInterrupted


class GracefulStop:
    """`with GracefulStop(where, warn) as stop:` ... `stop.signum` is the first signal received
    (None before). `where()` says (step done, train_steps) for the message. Once the run sets
    `stop.final_checkpoint` (everything trained is saved), a signal stops the final evaluation at
    once by raising TrainingInterrupted."""

    def __init__(self, where: Callable[[], tuple[int, int]], warn: Callable[[str], None]) -> None:
        self.where, self.warn = where, warn
        self.signum: int | None = None
        self.final_checkpoint: Path | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            for s in self._previous:
                signal.signal(s, self._request_stop)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        step, total = self.where()
        if self.final_checkpoint is not None:
            raise TrainingInterrupted(f"Stopped during the final evaluation; training finished at step {step}, saved "
                                      f"in {self.final_checkpoint}", signum)
        what = (f"stopping after train step {step + 1} and writing a checkpoint" if step < total else
                f"training is done (step {step}); writing its checkpoint and skipping the final evaluation")
        self.warn(f"\ndapo: {signal.Signals(signum).name} received; {what} (press Ctrl-C again to quit at once)")
