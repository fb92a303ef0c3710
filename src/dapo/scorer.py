"""Stage: rewards, the calling side. `RewardScorer` scores a whole generation round with ONE call
per reward function (TRL's convention: the function gets the batch), in persistent worker
processes that enforce a per-call time limit, and returns the accuracy with the scores.

Why worker processes: a time limit needs a process we can kill (signal.alarm only works on the
main thread and cannot interrupt C code). Why forked ones: a fork inherits the functions as they
are (lambdas, closures, functions from files), with no pickling; only data crosses the pipe.
Why they are safe for reward functions that use torch or numpy: a child forked from a process
whose OpenMP pool has run hangs on its first parallel region (GNU libgomp is not fork-safe), so
each worker sets torch to one thread before it calls anything; a parallel region is then never
entered (a test runs a torch reward function with the trainer at 2 threads).
Workers live as long as the scorer: a round costs two pipe messages per function, not a process
start per group and function (benchmarks/README.md: reward-scoring overhead).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dapo.errors import RewardError
from dapo.progress import stderr_warning
from dapo.rewards import (RewardFn, RewardFunction, TrainerState, _text, all_none_warning, as_completions, call_reward,
                          check_reward_values)


@dataclass
class RoundScores:
    """Scores of one call of every reward function on a round of completions."""

    scores: torch.Tensor                 # [N, F] unweighted; NaN where a function returned None, 0 for errors
    correct: torch.Tensor | None = None  # [N] 1.0 where the accuracy function scored >= 1
    errors: int = 0                      # values scored 0 because of an error (reward_errors='zero')
    first_error: str | None = None


def _serve(conn: Any, parent_end: Any, fns: list[RewardFn]) -> None:
    """Worker loop: receive (function index, kwargs), send back ('ok', values) or ('error', text)."""
    parent_end.close()  # so that the trainer's exit reads as end-of-file here
    _die_with_parent()
    # A terminal's Ctrl-C reaches the whole process group: the trainer decides what to do with it
    # (finish the step, checkpoint), so the worker must neither die nor run the trainer's
    # inherited handler. SIGTERM from the parent still ends it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)  # the forked OpenMP pool is dead: never enter a parallel region
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, kwargs = message
        try:
            result = call_reward(fns[index], **kwargs)
            if result is not None and not isinstance(result, (str, bytes)) and hasattr(result, "__iter__"):
                result = list(result)
            conn.send(("ok", result))
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as a message
            try:
                conn.send(("error", f"{type(e).__name__}: {e}"))
            except Exception:  # noqa: BLE001 - an unpicklable message must not kill the worker
                conn.send(("error", type(e).__name__))


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the trainer dies, even by SIGKILL (a worker left
    behind would hold the trainer's stdout open and its memory)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pipe's end-of-file ends the worker instead
        pass


class _Worker:
    def __init__(self, fns: list[RewardFn]) -> None:
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe(duplex=True)
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork in a threaded process; the child only runs reward calls.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.proc = ctx.Process(target=_serve, args=(child, self.conn, fns), daemon=True)
            self.proc.start()
        child.close()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(2.0)
        self.kill()


class RewardScorer:
    """Scores completions with `reward_fns` and judges them with `accuracy`.

    One worker process per function, forked when first needed and reused; with `timeout <= 0` the
    functions run in this process with no limit. Use as a context manager (or call `close`).
    """

    def __init__(self, reward_fns: Sequence[RewardFunction], accuracy: RewardFn | None = None, *,
                 accuracy_name: str = "accuracy", timeout: float = 0.0, on_error: str = "raise",
                 warn: Callable[[str], None] = stderr_warning) -> None:
        self.reward_fns = list(reward_fns)
        self.warn = warn
        self.timeout, self.on_error = timeout, on_error
        # The accuracy function is usually the first reward function: reuse its scores.
        self.accuracy_column: int | None = None
        self.accuracy: RewardFunction | None = None
        if accuracy is not None:
            same = [j for j, rf in enumerate(self.reward_fns) if rf.fn is accuracy]
            if same:
                self.accuracy_column = same[0]
            else:
                self.accuracy = RewardFunction(accuracy_name, accuracy)
        self._fns = [rf.fn for rf in self.reward_fns] + ([self.accuracy.fn] if self.accuracy else [])
        self._workers: dict[int, _Worker] = {}
        self._warned_all_none = False

    @property
    def has_accuracy(self) -> bool:
        return self.accuracy_column is not None or self.accuracy is not None

    # --- the public calls -------------------------------------------------------------------
    def score(self, records: Sequence[dict[str, Any]], texts: Sequence[str], *, with_accuracy: bool = True,
              completion_ids: Sequence[Sequence[int]] | None = None,
              trainer_state: TrainerState | None = None) -> RoundScores:
        """Score completion i (`texts[i]`, answering `records[i]`) with every reward function, one
        call each over the whole round; columns other than the prompt, the completions' token ids
        and the trainer's progress go to the functions as TRL passes them."""
        prompts, completions, columns = _trl_arguments(records, texts)
        extra = {"completion_ids": completion_ids, "trainer_state": trainer_state}
        names = [rf.name for rf in self.reward_fns]
        indices = list(range(len(self.reward_fns)))
        if with_accuracy and self.accuracy is not None:
            names.append(self.accuracy.name)
            indices.append(len(self.reward_fns))
        values, errors, first = self._call(indices, names, prompts, completions, columns, extra)
        out = RoundScores(values[:, : len(self.reward_fns)], None, errors, first)
        warning = all_none_warning(out.scores, prompts, completions)
        if warning is not None and not self._warned_all_none:
            self._warned_all_none = True
            self.warn(f"dapo: warning: {warning}")
        if with_accuracy and self.has_accuracy:
            column = self.accuracy_column if self.accuracy_column is not None else len(self.reward_fns)
            out.correct = (values[:, column] >= 1.0).float()
        return out

    def judge(self, records: Sequence[dict[str, Any]], texts: Sequence[str], *,
              completion_ids: Sequence[Sequence[int]] | None = None,
              trainer_state: TrainerState | None = None) -> RoundScores:
        """Only the accuracy function (evaluation): `correct` and the error counts."""
        if not self.has_accuracy:
            raise ValueError("this scorer has no accuracy function")
        index = self.accuracy_column if self.accuracy_column is not None else len(self.reward_fns)
        name = self.accuracy.name if self.accuracy is not None else self.reward_fns[index].name
        prompts, completions, columns = _trl_arguments(records, texts)
        extra = {"completion_ids": completion_ids, "trainer_state": trainer_state}
        values, errors, first = self._call([index], [name], prompts, completions, columns, extra)
        return RoundScores(torch.zeros(len(texts), 0), (values[:, 0] >= 1.0).float(), errors, first)

    def close(self) -> None:
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a scorer dropped without close() must not leave processes behind
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # --- calling and checking ------------------------------------------------------------------
    def _call(self, indices: list[int], names: list[str], prompts: list[Any], completions: list[Any],
              columns: dict[str, list[Any]], extra: dict[str, Any] | None = None) -> tuple[torch.Tensor, int, str | None]:
        n = len(completions)
        values = torch.zeros(n, len(indices))
        problems = Problems(self.on_error, prompts)
        kwargs = {"prompts": prompts, "completions": completions, "columns": columns, **(extra or {})}
        if self.timeout <= 0:
            results = []
            for i in indices:
                try:
                    results.append(("ok", call_reward(self._fns[i], **kwargs)))
                except Exception as e:  # noqa: BLE001 - any user error becomes one clear message
                    results.append(("error", f"{type(e).__name__}: {e}"))
        else:
            results = self._call_in_workers(indices, kwargs)
        for column, (name, (status, payload)) in enumerate(zip(names, results)):
            if status != "ok":
                problems.fail(name, payload if status != "error" else f"raised {payload}", n)
                continue
            checked, bad = check_reward_values(name, payload, n, completions)
            for index, problem in bad:
                problems.fail(name, problem, n if index is None else 1, at=index or 0)
            values[:, column] = torch.tensor(checked, dtype=values.dtype)
        return values, problems.errors, problems.first

    def _call_in_workers(self, indices: list[int], kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
        """Send every call at once (the functions run in parallel, one worker each), then collect
        each answer by its own deadline; a worker past it is killed and replaced next time."""
        sent: dict[int, float] = {}
        results: dict[int, tuple[str, Any]] = {}
        for i in indices:
            worker = self._workers.get(i)
            if worker is None or not worker.proc.is_alive():
                worker = self._workers[i] = _Worker(self._fns)
            try:
                worker.conn.send((i, kwargs))
                sent[i] = time.monotonic()
            except (OSError, ValueError) as e:  # a dead pipe, or data that cannot be pickled
                results[i] = ("error", f"{type(e).__name__}: {e}")
                self._drop(i)
        for i, start in sent.items():
            worker = self._workers[i]
            left = max(self.timeout - (time.monotonic() - start), 0.0)
            if not worker.conn.poll(left):
                results[i] = ("timeout", f"took longer than reward_timeout={self.timeout:g} s")
                self._drop(i)
                continue
            try:
                results[i] = worker.conn.recv()
            except (EOFError, OSError):
                worker.proc.join(1.0)
                results[i] = ("died", f"raised an error that killed its worker process (exit code "
                                      f"{worker.proc.exitcode})")
                self._drop(i)
        return [results[i] for i in indices]

    def _drop(self, index: int) -> None:
        worker = self._workers.pop(index, None)
        if worker is not None:
            worker.kill()


class Problems:
    """Collects reward errors: raises at once with reward_errors='raise', else counts them."""

    def __init__(self, on_error: str, prompts: Sequence[Any]) -> None:
        self.on_error, self.prompts = on_error, prompts
        self.errors, self.first = 0, None

    def fail(self, name: str, problem: str, bad: int, at: int = 0) -> None:
        where = f" (record: prompt {_text(self.prompts[at])[:80]!r})" if self.prompts else ""
        message = f"reward function {name!r} {problem}{where}"
        if self.on_error != "zero":
            raise RewardError(message)
        self.errors += bad
        self.first = self.first or message


def _trl_arguments(records: Sequence[dict[str, Any]], texts: Sequence[str]) -> tuple[list[Any], list[Any], dict[str, list[Any]]]:
    """TRL's call arguments for completion i answering records[i]: prompts, completions (strings, or
    one assistant message for a chat prompt) and every other column, one value per completion."""
    prompts = [r["prompt"] for r in records]
    completions = [as_completions(r["prompt"], [t])[0] for r, t in zip(records, texts)]
    names: list[str] = []
    for r in records:
        names.extend(k for k in r if k != "prompt" and k not in names)
    columns = {k: [r.get(k) for r in records] for k in names}
    return prompts, completions, columns


# --- one-shot helpers (tests, small scripts) -------------------------------------------------------
def score_completions(reward_fns: Sequence[RewardFunction], prompts: Sequence[Any], completions: Sequence[Any],
                      columns: dict[str, Sequence[Any]], *, timeout: float = 0.0, on_error: str = "raise",
                      completion_ids: Sequence[Sequence[int]] | None = None,
                      trainer_state: TrainerState | None = None) -> RoundScores:
    """Call every reward function once on a batch given in TRL's form, through a throw-away scorer."""
    extra = {"completion_ids": completion_ids, "trainer_state": trainer_state}
    with RewardScorer(reward_fns, timeout=timeout, on_error=on_error) as scorer:
        values, errors, first = scorer._call(list(range(len(reward_fns))), [rf.name for rf in reward_fns],
                                             list(prompts), list(completions),
                                             {k: list(v) for k, v in columns.items()}, extra)
    return RoundScores(values, None, errors, first)


def score_group(reward_fns: Sequence[RewardFunction], record: dict[str, Any], texts: Sequence[str], *,
                timeout: float = 0.0, on_error: str = "raise", completion_ids: Sequence[Sequence[int]] | None = None,
                trainer_state: TrainerState | None = None) -> RoundScores:
    """Score the completions of one record (its other columns go to the reward functions)."""
    with RewardScorer(reward_fns, timeout=timeout, on_error=on_error) as scorer:
        return scorer.score([record] * len(texts), texts, completion_ids=completion_ids, trainer_state=trainer_state)
