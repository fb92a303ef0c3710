"""Stage: metrics. Files in the run directory, one JSON object a line:

- metrics.jsonl: one line per train step, the same keys on every line (docs/observability.md);
- eval.jsonl: one line per evaluation (step 0 = before training, then every eval_every steps
  and after the last step), kept apart because evaluations run on their own cadence;
- samples.jsonl: the train batch's completions at step 1 and every log_samples_every steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from dapo.progress import stderr_warning


class MetricsLogger:
    def __init__(self, run_dir: Path, resume: bool = False) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.eval_path = run_dir / "eval.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        if not resume:
            for p in (self.path, self.eval_path, self.samples_path):
                p.write_text("")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        _append(self.path, [{"step": step, **metrics}])

    def log_eval(self, step: int, scores: dict[str, Any]) -> None:
        _append(self.eval_path, [{"step": step, **scores}])

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        _append(self.samples_path, [{"step": step, **s} for s in samples])


def _append(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")


def _clean(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    # Strict JSON has no NaN/inf; the trainer guards its denominators so this is a last resort.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def sample_rows(batch: Any, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per completion of a scored TrainBatch with advantages; `records` are the training
    records its prompt_index points into."""
    lengths = batch.lengths.tolist()
    return [{"group": int(batch.group[i]), "prompt": records[int(batch.prompt_index[i])]["prompt"],
             "completion": batch.completions[i], "reward": float(batch.rewards[i]),
             "advantage": float(batch.advantages[i]), "length": int(lengths[i]),
             "truncated": bool(batch.truncated[i])} for i in range(len(batch))]


def read_jsonl(path: str | Path, warn: Callable[[str], None] = stderr_warning) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log. A torn last line (no newline: the writer was killed) is left
    out with a warning; any other unreadable line raises DapoError naming the file and line."""
    from dapo.errors import DapoError

    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    rows = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        last = number == len(lines)  # no newline after it
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if last:
                warn(f"dapo: warning: {path}: ignoring the torn last line {number} (a run killed while writing it)")
                continue
            raise DapoError(f"{path}, line {number} is not a JSON object ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100]})") from None
        rows.append(row)
    return rows


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def read_evals(run_dir: str | Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / "eval.jsonl")
