"""Stage: rewards. Task rewards from reward functions, then overlong reward shaping (Eq. 13).

Reward functions follow TRL's convention: f(prompts, completions, **columns) -> list[float],
one float per completion; `columns` are the dataset's other columns, one value per completion.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass
class RewardFunction:
    """A named, weighted reward function."""

    name: str
    fn: RewardFn
    weight: float = 1.0


def score_completions(
    reward_fns: Sequence[RewardFunction],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: dict[str, Sequence[Any]],
) -> torch.Tensor:
    """Call every reward function once on the whole batch and check what comes back.

    Returns:
        [N, num_fns] float tensor of unweighted scores.
    Raises:
        RewardError naming the function, the first offending completion and the problem.
    """
    n = len(completions)
    scores = torch.zeros(n, len(reward_fns))
    for j, rf in enumerate(reward_fns):
        try:
            values = rf.fn(prompts=list(prompts), completions=list(completions), **columns)
        except Exception as e:  # noqa: BLE001 - any user error becomes one clear message
            raise RewardError(f"reward function {rf.name!r} raised {type(e).__name__}: {e}") from e
        values = list(values) if values is not None else None
        if values is None or len(values) != n:
            got = "None" if values is None else f"{len(values)} values"
            raise RewardError(f"reward function {rf.name!r} returned {got} for {n} completions")
        for i, v in enumerate(values):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) or hasattr(v, "__float__")
            fv = float(v) if ok and v is not None else math.nan
            if not math.isfinite(fv):
                raise RewardError(
                    f"reward function {rf.name!r} returned {v!r} for completion {i} "
                    f"({_text(completions[i])[:60]!r}); rewards must be finite numbers")
            scores[i, j] = fv
    return scores


def combine(scores: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum over reward functions: [N, F] -> [N]."""
    return scores @ torch.tensor(list(weights), dtype=scores.dtype)


BUILTIN_REWARDS: dict[str, RewardFn] = {"digit": digit_reward}
