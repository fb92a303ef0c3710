"""Stage: rewards. Task rewards from reward functions, then overlong reward shaping (Eq. 13).

Reward functions follow TRL's convention: f(prompts, completions, **columns) -> list[float],
one float per completion; `columns` are the dataset's other columns, one value per completion.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
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


def _answers(answer: Any, n: int, name: str) -> list[Any]:
    if answer is None:
        raise ValueError(f"the {name} reward needs an 'answer' column in the data")
    return list(answer) if isinstance(answer, (list, tuple)) else [answer] * n


def exact_match_reward(prompts: Sequence[Any], completions: Sequence[Any], answer: Any = None,
                       **_: Any) -> list[float]:
    """1.0 when the stripped completion equals the stripped `answer` column, else 0.0."""
    answers = _answers(answer, len(completions), "exact_match")
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


def numeric_reward(prompts: Sequence[Any], completions: Sequence[Any], answer: Any = None,
                   **_: Any) -> list[float]:
    """1.0 when the last number in the completion equals the last number in `answer`.

    Taking the *last* number of the answer too lets GSM8K-style answers ("... #### 72") work
    as they are; taking the last number of the completion accepts "3 + 4 = 7" as well as "7".
    """
    answers = _answers(answer, len(completions), "numeric")
    out = []
    for c, a in zip(completions, answers):
        gold = float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else last_number(str(a))
        if gold is None:
            raise ValueError(f"the numeric reward found no number in the answer {a!r}")
        got = last_number(_text(c))
        out.append(1.0 if got is not None and abs(got - gold) <= 1e-6 * max(1.0, abs(gold)) else 0.0)
    return out


def math_reward(prompts: Sequence[Any], completions: Sequence[Any], answer: Any = None,
                **_: Any) -> list[float]:
    """1.0 when math-verify finds the completion's answer (\\boxed{} first) equal to `answer`."""
    from math_verify import parse, verify

    answers = _answers(answer, len(completions), "math")
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

@dataclass
class RewardFunction:
    """A named, weighted reward function."""

    name: str
    fn: RewardFn
    weight: float = 1.0


def load_reward_function(spec: str) -> tuple[str, RewardFn]:
    """Resolve a built-in name, 'package.module:function' or 'path/to/file.py:function'.

    Returns (metric name, function); the name is the built-in name or the function's name.
    """
    if spec in BUILTIN_REWARDS:
        return spec, BUILTIN_REWARDS[spec]
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
        except Exception as e:  # noqa: BLE001
            raise RewardError(f"reward {spec!r}: importing {target!r} raised {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:  # noqa: BLE001
            raise RewardError(f"reward {spec!r}: cannot import module {target!r} ({type(e).__name__}: {e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {target!r} has no function {attr!r}")
    return attr, fn


def build_reward_functions(specs: Sequence[str], weights: Sequence[float] = ()) -> list[RewardFunction]:
    """Load every spec; names are made unique (a repeated name gets '_2', '_3', ...)."""
    if weights and len(weights) != len(specs):
        raise RewardError(f"{len(weights)} reward weights for {len(specs)} reward functions")
    out: list[RewardFunction] = []
    for i, spec in enumerate(specs):
        name, fn = load_reward_function(spec)
        taken = {rf.name for rf in out}
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name}_{n}", n + 1
        out.append(RewardFunction(unique, fn, float(weights[i]) if weights else 1.0))
    return out


# --- calling reward functions -------------------------------------------------------------------

def call_reward(fn: RewardFn, prompts: Sequence[Any], completions: Sequence[Any],
                columns: dict[str, Sequence[Any]]) -> Any:
    """Call `fn` the TRL way; columns a function does not accept (and has no **kwargs for) are left out."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params):
        names = {p.name for p in params}
        columns = {k: v for k, v in columns.items() if k in names}
    return fn(prompts=list(prompts), completions=list(completions), **columns)


def as_completions(prompt: Any, texts: Sequence[str]) -> list[Any]:
    """TRL's convention: completions are strings for a string prompt and a one-message
    assistant conversation for a chat prompt."""
    if isinstance(prompt, list):
        return [[{"role": "assistant", "content": t}] for t in texts]
    return list(texts)


def combine(scores: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum over reward functions: [N, F] -> [N]."""
    return scores @ torch.tensor(list(weights), dtype=scores.dtype)
