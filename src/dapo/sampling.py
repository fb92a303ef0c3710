"""Stage: dynamic sampling (DAPO paper Sec. 3.2 and Algorithm 1).

A group whose task rewards are all equal has zero advantage for every response, so it adds
nothing to the gradient but still dilutes the token-mean denominator. Dynamic sampling drops
such groups and keeps generating until the batch holds `train_batch_size` informative groups.

`informative_groups` is the pure filter; `DynamicSamplingBuffer` is Algorithm 1's buffer. The
rest makes dynamic sampling cheap, as pure functions the collector (collector.py) calls:

- `refill_size`: streaming refill. A round draws as many prompts as the observed share of
  informative groups says are still needed, instead of fixed rounds of gen_batch_size.
- `skip_probability`: prompt skipping (GRESO, arXiv 2506.02177). A prompt whose last k groups
  were all-equal is skipped with probability 1 - 2^-k, never more than 1 - min_draw_prob.
- `accuracy_lower_bound`: the "solved" stop. When the batch cannot be filled because nearly
  every answer is correct, the run ends once a one-sided Clopper-Pearson bound on the accuracy
  of this step's answers reaches `solved_accuracy`, not after max_num_gen_batches rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


def informative_groups(rewards: torch.Tensor, atol: float = 1e-8) -> torch.Tensor:
    """Which groups satisfy Eq. 11's constraint 0 < |{o_i : is_equivalent(a, o_i)}| < G.

    Generalised to real-valued rewards: a group is informative when its rewards are not all equal.
    Args:
        rewards: [num_groups, G] task rewards (before overlong shaping, which only depends on
            length and must not make an otherwise uniform group look informative).
    Returns:
        [num_groups] bool.
    """
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values
    return spread > atol


@dataclass
class DynamicSamplingBuffer(Generic[T]):
    """Algorithm 1's buffer: accepts informative groups until `target` are ready.

    Surplus groups from the round that filled the buffer are taken with the batch (`take_all`), or
    stay in it and open the next step's batch (`take`); either way each is used once, never duplicated.
    """

    target: int
    groups: list[T] = field(default_factory=list)

    def add(self, groups: list[T]) -> None:
        self.groups.extend(groups)

    @property
    def full(self) -> bool:
        return len(self.groups) >= self.target

    def take_all(self) -> list[T]:
        """Pop every group (the surplus trained in the same step)."""
        batch, self.groups = self.groups, []
        return batch

    def take(self) -> list[T]:
        """Pop the `target` oldest groups (first in, first out)."""
        batch, self.groups = self.groups[: self.target], self.groups[self.target :]
        return batch


def refill_size(needed: int, kept: float, seen: float, max_oversample: float) -> int:
    """Prompts to draw for `needed` more informative groups, given `kept` of `seen` recent groups
    were informative: ceil(needed / rate) with rate = (kept + 1) / (seen + 2) (Laplace's rule:
    1/2 before anything is seen), at most ceil(max_oversample * needed), at least 1.

    >>> refill_size(8, kept=0, seen=0, max_oversample=8)    # nothing seen: rate 1/2
    16
    >>> refill_size(8, kept=30, seen=38, max_oversample=8)  # rate 31/40
    11
    >>> refill_size(1, kept=0, seen=30, max_oversample=8)   # rate 1/32, capped at 8x
    8
    """
    if needed <= 0:
        return 0
    rate = (kept + 1.0) / (seen + 2.0)
    return max(1, min(math.ceil(needed / rate - 1e-9), math.ceil(max_oversample * needed)))


def skip_probability(streak: int, min_draw_prob: float) -> float:
    """Probability of skipping a prompt whose last `streak` groups were all-equal (no learning
    signal): 1 - 2^-streak, capped at 1 - min_draw_prob so that no prompt is excluded for good.

    >>> [skip_probability(k, 0.05) for k in (0, 1, 2, 3)]
    [0.0, 0.5, 0.75, 0.875]
    >>> skip_probability(10, 0.05)
    0.95
    """
    return min(1.0 - 0.5 ** streak, 1.0 - min_draw_prob)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def accuracy_lower_bound(correct: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower bound on a success probability after `correct` successes
    in `n` trials: the p at which P(X >= correct) = 1 - confidence. All correct gives the closed
    form (1 - confidence)^(1/n); no trials give 0.

    >>> round(accuracy_lower_bound(320, 320), 4)   # 0.05 ** (1 / 320)
    0.9907
    >>> round(accuracy_lower_bound(95, 100), 4)    # Beta(95, 6) quantile 0.05: 0.89775
    0.8977
    """
    if n <= 0 or correct <= 0:
        return 0.0
    alpha = 1.0 - confidence
    if correct >= n:
        return alpha ** (1.0 / n)
    lo, hi = 0.0, correct / n
    for _ in range(60):  # bisection: binomial_tail increases with p
        mid = (lo + hi) / 2
        if binomial_tail(correct, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo
