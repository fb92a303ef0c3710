"""Resuming a run: the pieces of trainer state that are not plain tensors, as pure functions.

`Checkpointer.state_dict` (checkpointer.py) gathers the whole state from the Actor (optimizer,
schedule), the BatchCollector (prompt sampler position, dynamic-sampling buffer as TrainBatch
columns), the engine and the RNGs; this module turns RNG states into plain containers and tensors
(so `torch.load(weights_only=True)` reads them back), finds the checkpoint to resume from, builds
the config of a resumed run, and trims the logs to the checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dapo.checkpoint import intact_checkpoint, list_checkpoints
from dapo.config import DAPOConfig, run_changing_differences
from dapo.errors import ConfigError, ResumeError
from dapo.progress import stderr_warning


# --- RNG --------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Every global RNG the run draws from: Python, NumPy, torch CPU and (if present) CUDA."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- config -----------------------------------------------------------------------------------
def find_checkpoint(run_dir: Path, warn: Callable[[str], None] = stderr_warning) -> Path:
    """The newest intact checkpoint of `run_dir` (checkpoint.verify_checkpoint): a damaged newer
    one (truncated or missing file, sha256 mismatch, unreadable config, non-finite weights,
    trainer state missing keys) is skipped with a warning naming its problem."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ResumeError(f"cannot resume: run directory {run_dir} does not exist")
    complete = list_checkpoints(run_dir)
    if not complete:
        raise ResumeError(f"cannot resume: {run_dir} holds no complete checkpoint (checkpoints/step-*/COMPLETE)")
    checkpoint = intact_checkpoint(run_dir, need_state=True, what="resuming", warn=warn)
    if checkpoint is None:
        raise ResumeError(f"cannot resume: every checkpoint of {run_dir} is damaged "
                          f"({', '.join(p.name for p in complete)}; the warnings above say how)")
    if checkpoint != complete[-1]:
        warn(f"dapo: warning: resuming {run_dir} from {checkpoint.name}, the newest intact checkpoint; the steps "
             "after it run again")
    return checkpoint


def resumed_config(run_dir: Path, overrides: dict[str, Any], checkpoint: Path | None = None) -> DAPOConfig:
    """The config a resumed run trains with: the checkpoint's own config with `overrides` applied.

    Raises ResumeError naming every field whose change would change the run.
    """
    run_dir = Path(run_dir)
    if overrides.get("output_dir") not in (None, str(run_dir)):
        raise ConfigError("--output-dir cannot be combined with --resume: the run directory is the one resumed")
    if overrides.get("overwrite"):
        raise ConfigError("--overwrite cannot be combined with --resume: resuming continues the run in place")
    saved = DAPOConfig.from_saved((checkpoint or find_checkpoint(run_dir)) / "dapo_config.yaml")
    config = DAPOConfig.from_dict({**saved.to_dict(), **overrides, "output_dir": str(run_dir)})
    check_resumable(saved, config)
    return config


def check_resumable(saved: DAPOConfig, requested: DAPOConfig) -> None:
    from dapo.rundir import run_dir_config

    # Compared as stored in the run directory: a relative path and its absolute form are the same.
    differences = run_changing_differences(run_dir_config(saved), run_dir_config(requested))
    if differences:
        raise ResumeError("cannot resume with a config that changes the run; these fields differ from the "
                          f"checkpoint: {'; '.join(differences)}. Start a new run instead, or change only "
                          "logging, output, evaluation or train_steps")


# --- logs -------------------------------------------------------------------------------------
def truncate_jsonl(path: Path, step: int) -> None:
    """Drop the rows of a per-step JSON-lines log written after `step`, so a resumed run does not
    log those steps twice. Rewritten atomically; a missing file is left missing."""
    if not path.is_file():
        return
    kept = [line for line in path.read_bytes().splitlines(keepends=True)
            if line.strip() and line.endswith(b"\n") and _row_step(line) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(kept))
    os.replace(tmp, path)


def _row_step(line: bytes) -> float:
    try:
        return float(json.loads(line.decode("utf-8")).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return float("inf")  # a torn last line from a killed process, or garbage
