"""Stage: advantages. Group-relative advantages (DAPO paper Eq. 9)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantage of every response, DAPO Eq. 9.

    A_i = (R_i - mean({R_j})) / (std({R_j}) + eps), computed within each group of G responses
    to the same prompt; `std` is the unbiased sample standard deviation (as in the GRPO/DAPO
    reference code). With `normalize_std=False` this is Dr. GRPO's A_i = R_i - mean({R_j}).

    Args:
        rewards: [num_groups, G] float rewards.
    Returns:
        [num_groups, G] advantages; a group whose rewards are all equal gets all zeros.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must have shape [num_groups, G>=2], got {tuple(rewards.shape)}")
    rewards = rewards.float()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    # The mean of equal floats can miss them by one rounding step, and dividing that by std + eps
    # (std 0) would blow it up to advantages of ~0.05 (e.g. G = 8 rewards of 0.7): pin equal groups to 0.
    equal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    centered = centered.masked_fill(equal, 0.0)
    if not normalize_std:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)
