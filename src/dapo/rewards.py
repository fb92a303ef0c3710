"""Stage: rewards. Task rewards from reward functions, then overlong reward shaping (Eq. 13).

Reward functions follow TRL's convention: f(prompts, completions, **columns) -> list[float],
one float per completion; `columns` are the dataset's other columns, one value per completion.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dapo.errors import RewardError

RewardFn = Callable[..., Sequence[float]]


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, factor: float = 1.0) -> torch.Tensor:
    """Soft overlong punishment, DAPO Eq. 13.

        R_length(y) = 0                                  if |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                    = -1                                 if |y| > L_max
    scaled by `factor`. |y| counts generated tokens including the EOS token.

    Args:
        lengths: [N] response lengths (any integer or float dtype).
        max_len: L_max. buffer_len: L_cache (0 disables shaping: all zeros).
    Returns:
        [N] float penalties in [-factor, 0], added to the task reward.
    """
    lengths = lengths.float()
    if buffer_len <= 0:
        return torch.zeros_like(lengths)
    expected = max_len - buffer_len
    penalty = torch.clamp((expected - lengths) / buffer_len, min=-1.0, max=0.0)
    return penalty * factor


# --- built-in reward functions (TRL convention) ---------------------------------------------

def _text(completion: Any) -> str:
    """A completion is a string, or chat messages whose last message holds the text."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def digit_reward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """The seed's reward: 0 unless the stripped answer is one digit d, else 1 - |d - 5| / 9."""
    out = []
    for c in completions:
        s = _text(c).strip()
        out.append(1.0 - abs(int(s) - 5) / 9.0 if len(s) == 1 and s.isdigit() else 0.0)
    return out


def digit_accuracy(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """1.0 when the stripped answer is exactly "5"."""
    return [1.0 if _text(c).strip() == "5" else 0.0 for c in completions]


def _answers(answer: Any, n: int, name: str, answer_column: str = "answer",
             columns: dict[str, Any] | None = None) -> list[Any]:
    if answer_column != "answer":
        answer = (columns or {}).get(answer_column)
    if answer is None:
        raise ValueError(f"the {name} reward needs an {answer_column!r} column in the data")
    return list(answer) if isinstance(answer, (list, tuple)) else [answer] * n


def exact_match_reward(prompts: Sequence[Any], completions: Sequence[Any], answer: Any = None, *,
                       answer_column: str = "answer", **columns: Any) -> list[float]:
    """1.0 when the stripped completion equals the stripped answer column (`answer_column`), else 0.0."""
    answers = _answers(answer, len(completions), "exact_match", answer_column, columns)
    return [1.0 if _text(c).strip() == str(a).strip() else 0.0 for c, a in zip(completions, answers)]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> float | None:
    """The last number written in `text` ("1,234" counts as 1234), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_reward(prompts: Sequence[Any], completions: Sequence[Any], answer: Any = None, *,
                   answer_column: str = "answer", **columns: Any) -> list[float]:
    """1.0 when the last number in the completion equals the last number in `answer`.

    Taking the *last* number of the answer too lets GSM8K-style answers ("... #### 72") work
    as they are; taking the last number of the completion accepts "3 + 4 = 7" as well as "7".
    """
    answers = _answers(answer, len(completions), "numeric", answer_column, columns)
    out = []
    for c, a in zip(completions, answers):
        gold = float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else last_number(str(a))
        if gold is None:
            raise ValueError(f"the numeric reward found no number in the answer {a!r}")
        got = last_number(_text(c))
        out.append(1.0 if got is not None and abs(got - gold) <= 1e-6 * max(1.0, abs(gold)) else 0.0)
    return out


class _DropTimeoutWarning(logging.Filter):
    """math-verify warns "Timeout is disabled..." once per process; every forked reward worker is
    a new process, so a run printed it once per call. We disable its timeouts on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


def _quiet_math_verify() -> None:
    for name in ("math_verify.parser", "math_verify.grader"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTimeoutWarning) for f in log.filters):
            log.addFilter(_DropTimeoutWarning())


def math_reward(prompts: Sequence[Any], completions: Sequence[Any], answer: Any = None, *,
                answer_column: str = "answer", **columns: Any) -> list[float]:
    """1.0 when math-verify finds the completion's answer (\\boxed{} first) equal to the answer column."""
    _quiet_math_verify()
    from math_verify import parse, verify

    answers = _answers(answer, len(completions), "math", answer_column, columns)
    out = []
    for c, a in zip(completions, answers):
        # math-verify's own time limits use signal.alarm, which fails off the main thread; the
        # per-call limit of score_completions (a worker process) bounds these calls instead.
        gold = parse(str(a), parsing_timeout=None)  # type: ignore[arg-type]
        if not gold:
            gold = parse(f"${a}$", parsing_timeout=None)  # type: ignore[arg-type]
        pred = parse(_text(c), parsing_timeout=None)  # type: ignore[arg-type]
        out.append(1.0 if gold and pred and verify(gold, pred, timeout_seconds=None) else 0.0)
    return out


# Built-in rewards that read the `answer` column; checked against the data when a task is built.
NEEDS_ANSWER = ("exact_match", "numeric", "math")

BUILTIN_REWARDS: dict[str, RewardFn] = {"digit": digit_reward, "exact_match": exact_match_reward,
                                        "numeric": numeric_reward, "math": math_reward}


# --- loading reward functions -------------------------------------------------------------------

def reward_name(fn: Any) -> str:
    """A reward function's metric name: its __name__ (a functools.partial: the wrapped function's,
    a bound method: the method's), else its class name (a callable object)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


@dataclass(init=False)
class RewardFunction:
    """A named, weighted reward function: any callable following TRL's convention.

        RewardFunction(fn)                        # name from fn, weight 1.0
        RewardFunction(fn, name="fmt", weight=0.5)
        RewardFunction("fmt", fn, 0.5)            # the older positional form still works
    """

    name: str
    fn: RewardFn
    weight: float = 1.0

    def __init__(self, name_or_fn: str | RewardFn, fn: RewardFn | None = None, weight: float = 1.0, *,
                 name: str | None = None) -> None:
        if isinstance(name_or_fn, str):
            if fn is None:
                raise TypeError(f"RewardFunction({name_or_fn!r}) needs the function too")
            name = name if name is not None else name_or_fn
        else:
            if fn is not None:
                raise TypeError("RewardFunction(fn, ...): give the name as name=...")
            fn = name_or_fn
        if not callable(fn):
            raise RewardError(f"reward function {name or fn!r} is not callable (got {type(fn).__name__})")
        self.fn = fn
        self.name = name if name is not None else reward_name(fn)
        self.weight = float(weight)


def as_reward_functions(fns: Sequence[RewardFunction | RewardFn | str] | RewardFunction | RewardFn,
                        weights: Sequence[float] | None = None, *,
                        answer_column: str = "answer") -> list[RewardFunction]:
    """Normalise what `dapo.train(reward_fns=...)` accepts into RewardFunctions.

    Items are RewardFunctions (kept as they are, unless `weights` is given), plain callables
    (lambdas, closures, bound methods, functools.partial, callable objects: named after the
    function) or spec strings as --reward takes them ('numeric', 'file.py:function'). One
    callable alone is a list of one. Names are made unique ('_2', '_3', ...) like --reward's.
    Raises RewardError for an empty list, a non-callable item or a weight count that differs.
    """
    if callable(fns) or isinstance(fns, (str, RewardFunction)):
        fns = [fns]  # type: ignore[list-item]
    items = list(fns)  # type: ignore[arg-type]
    if not items:
        raise RewardError("reward_fns is empty: give at least one reward function")
    if weights is not None and len(weights) and len(weights) != len(items):
        raise RewardError(f"{len(weights)} reward weights for {len(items)} reward functions")
    out: list[RewardFunction] = []
    for i, item in enumerate(items):
        if isinstance(item, RewardFunction):
            rf = RewardFunction(item.fn, name=item.name, weight=item.weight)
        elif isinstance(item, str):
            name, fn = load_reward_function(item, answer_column=answer_column)
            rf = RewardFunction(fn, name=name)
        elif callable(item):
            rf = RewardFunction(item)
        else:
            raise RewardError(f"reward_fns[{i}] is {item!r:.60}, not a function, a RewardFunction or a "
                              f"'module:function' spec")
        if weights is not None and len(weights):
            rf.weight = float(weights[i])
        taken = {r.name for r in out}
        unique, n = rf.name, 2
        while unique in taken:
            unique, n = f"{rf.name}_{n}", n + 1
        rf.name = unique
        out.append(rf)
    return out


def load_reward_function(spec: str, answer_column: str = "answer") -> tuple[str, RewardFn]:
    """Resolve a built-in name, 'package.module:function' or 'path/to/file.py:function'.

    Returns (metric name, function); the name is the built-in name or the function's name.
    Built-ins that read the answer read `answer_column` (a functools.partial when not 'answer').
    """
    if spec in BUILTIN_REWARDS:
        fn = BUILTIN_REWARDS[spec]
        if spec in NEEDS_ANSWER and answer_column != "answer":
            fn = functools.partial(fn, answer_column=answer_column)
        return spec, fn
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise RewardError(f"reward {spec!r} is not a built-in ({', '.join(BUILTIN_REWARDS)}) nor of the form "
                          f"'module:function' or 'path/file.py:function'")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise RewardError(f"reward {spec!r}: file {target!r} does not exist")
        module_name = f"dapo_user_rewards_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise RewardError(f"reward {spec!r}: cannot import {target!r} as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # lets pickling and dataclasses inside the file work
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise RewardError(f"reward {spec!r}: importing {target!r} raised {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise RewardError(f"reward {spec!r}: cannot import module {target!r} ({type(e).__name__}: {e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {target!r} has no function {attr!r}")
    return attr, fn


def build_reward_functions(specs: Sequence[str], weights: Sequence[float] = (),
                           answer_column: str = "answer") -> list[RewardFunction]:
    """Load every spec; names are made unique (a repeated name gets '_2', '_3', ...)."""
    return as_reward_functions(list(specs), list(weights) or None, answer_column=answer_column)


# --- calling reward functions -------------------------------------------------------------------

@dataclass
class TrainerState:
    """What TRL's `trainer_state` argument offers reward functions that shape rewards by progress.

    global_step: train steps completed (0 before training and in `dapo eval`); max_steps: the
    run's train_steps (0 in `dapo eval`); epoch: passes over the training prompts so far.
    """

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


def _ignore_log(*args: Any, **kwargs: Any) -> None:
    """Default for TRL's log_extra / log_metric hooks: accepted, recorded nowhere."""


# Arguments TRL's GRPOTrainer passes every reward function besides prompts, completions and columns.
TRL_EXTRA_ARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric")


def call_reward(fn: RewardFn, prompts: Sequence[Any], completions: Sequence[Any],
                columns: dict[str, Sequence[Any]], *, completion_ids: Sequence[Sequence[int]] | None = None,
                trainer_state: TrainerState | None = None, log_extra: Callable[..., Any] | None = None,
                log_metric: Callable[..., Any] | None = None) -> Any:
    """Call `fn` the TRL way: fn(prompts=, completions=, completion_ids=, trainer_state=,
    log_extra=, log_metric=, **columns).

    Columns and TRL arguments a function neither names nor takes through **kwargs are left out,
    so `def f(completions, **kwargs)` and `def f(prompts, completions, answer)` both work. A
    column named like a TRL argument loses to the TRL argument, as in TRL. Missing
    completion_ids/trainer_state are passed as an empty list per completion / TrainerState();
    log_extra/log_metric default to a hook that records nothing (the scorer may pass collectors).
    Returns what fn returns, unchecked (see check_reward_values).
    """
    n = len(completions)
    extra = {
        "completion_ids": [list(ids) for ids in completion_ids] if completion_ids is not None else [[] for _ in range(n)],
        "trainer_state": trainer_state if trainer_state is not None else TrainerState(),
        "log_extra": log_extra or _ignore_log,
        "log_metric": log_metric or _ignore_log,
    }
    kwargs: dict[str, Any] = {**{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in columns.items()},
                              **extra}
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params):
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        kwargs = {k: v for k, v in kwargs.items() if k in names}
        call = {k: v for k, v in (("prompts", list(prompts)), ("completions", list(completions))) if k in names}
        return fn(**call, **kwargs)
    return fn(prompts=list(prompts), completions=list(completions), **kwargs)


def as_completions(prompt: Any, texts: Sequence[str]) -> list[Any]:
    """TRL's convention: completions are strings for a string prompt and a one-message
    assistant conversation for a chat prompt."""
    if isinstance(prompt, list):
        return [[{"role": "assistant", "content": t}] for t in texts]
    return list(texts)


def check_reward_values(name: str, values: Any, n: int,
                        completions: Sequence[Any] | None = None) -> tuple[list[float], list[tuple[int | None, str]]]:
    """Check what one reward function returned for n completions (pure: no I/O, no raising).

    Accepted: a sequence (list, tuple, NumPy array, tensor) of n values, each a finite number
    (bool excluded) or None. None means "this function does not apply to this completion"
    (TRL's multi-task convention) and becomes NaN; `combine` leaves NaN out of the sum.

    Returns:
        (floats, problems): `floats` has n entries: the value, NaN for None, 0.0 for a bad value
        (or all 0.0 when the whole return value is unusable). `problems` lists (index, message):
        index is the completion for a bad value, or None when the whole call is unusable (count
        it as n errors); each message reads after "reward function '<name>' ". An empty list
        means everything was fine.
    """
    if values is None or isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        return [0.0] * n, [(None, f"returned {values!r:.60} instead of a list of {n} floats (or None per "
                                  f"completion it does not apply to)")]
    values = list(values)
    if len(values) != n:
        return [0.0] * n, [(None, f"returned {len(values)} values for {n} completions")]
    out: list[float] = []
    problems: list[tuple[int | None, str]] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        fv = _finite(v)
        if fv is None:
            shown = f" ({_text(completions[i])[:60]!r})" if completions is not None and i < len(completions) else ""
            problems.append((i, f"returned {v!r} for completion {i}{shown}; rewards must be finite numbers, or "
                                f"None where the function does not apply"))
            out.append(0.0)
            continue
        out.append(fv)
    return out, problems


def all_none_warning(scores: torch.Tensor, prompts: Sequence[Any] | None = None,
                     completions: Sequence[Any] | None = None) -> str | None:
    """TRL's warning when every reward function returned None for a completion (its reward is then 0).

    `scores` is [N, F] with NaN for None. Returns the message for the first such completion, or None.
    """
    if scores.numel() == 0 or scores.shape[1] == 0:
        return None
    rows = torch.isnan(scores).all(dim=1).nonzero(as_tuple=True)[0]
    if len(rows) == 0:
        return None
    i = int(rows[0])
    where = ""
    if prompts is not None and i < len(prompts):
        where += f" prompt {_text(prompts[i])[:80]!r}"
    if completions is not None and i < len(completions):
        where += f" completion {_text(completions[i])[:60]!r}"
    return (f"every reward function returned None for {len(rows)} completion(s) (first:{where}); their task reward "
            f"is 0. Make sure at least one reward function applies to each record (shown once)")


def _finite(v: Any) -> float | None:
    """float(v) when v is a finite number (bools, None, strings and NaN/inf are not)."""
    if v is None or isinstance(v, (bool, str, bytes)):
        return None
    try:
        fv = float(v)
    except (TypeError, ValueError):
        return None
    return fv if math.isfinite(fv) else None


def combine(scores: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum over reward functions, TRL-style: [N, F] -> [N].

    NaN scores (a function returned None: it does not apply) are left out of the sum
    (torch.nansum of the weighted scores); a completion no function applies to gets 0.
    """
    w = torch.tensor(list(weights), dtype=scores.dtype)
    return torch.nansum(scores * w, dim=1)
