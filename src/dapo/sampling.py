"""Stage: dynamic sampling (DAPO paper Sec. 3.2 and Algorithm 1).

A group whose task rewards are all equal has zero advantage for every response, so it adds
nothing to the gradient but still dilutes the token-mean denominator. Dynamic sampling drops
such groups and keeps generating until the batch holds `train_batch_size` informative groups.

`informative_groups` is the pure filter; `DynamicSamplingBuffer` is Algorithm 1's buffer.
"""

from __future__ import annotations

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

    Surplus groups from the round that filled the buffer stay in it and open the next step's
    batch (they are used exactly once, never dropped unreported and never duplicated).
    """

    target: int
    groups: list[T] = field(default_factory=list)

    def add(self, groups: list[T]) -> None:
        self.groups.extend(groups)

    @property
    def full(self) -> bool:
        return len(self.groups) >= self.target

    def take(self) -> list[T]:
        """Pop the `target` oldest groups (first in, first out)."""
        batch, self.groups = self.groups[: self.target], self.groups[self.target :]
        return batch
