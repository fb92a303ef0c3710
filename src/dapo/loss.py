"""Stage: loss. The DAPO policy-gradient objective as pure tensor functions (paper Eq. 8).

All tensors are [batch, response_len] with an explicit `response_mask` (1 for a token that
counts, 0 for padding or a filtered response). Masked positions may hold any finite or
non-finite value: they are zeroed with `torch.where` before any reduction, never multiplied.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from dapo.config import LossAgg

LOG_RATIO_LIMIT = 20.0


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def aggregate_loss(
    token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    agg: LossAgg = "token-mean",
    *,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    norm_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, L] to a scalar.

    - "token-mean" (DAPO Eq. 8 token-level loss): sum of all valid token losses divided by the
      number of valid tokens in the mini-batch, so long responses weigh in proportion to length.
    - "seq-mean-token-mean" (GRPO): mean over tokens within each response, then mean over
      responses that have at least one valid token.
    - "seq-mean-token-sum-norm" (Dr. GRPO): per-response token sum divided by a constant length
      `norm_len` (default L, the tensor's response length), then mean over responses.

    `num_tokens` / `num_seqs` are the denominators of the whole mini-batch. Pass them when this
    call sees only a micro-batch (or one data-parallel shard): the micro-batch losses then sum
    exactly to the mini-batch loss, so the gradient does not depend on how the batch was split.
    When omitted they are counted from this call's mask.
    """
    mask = response_mask.bool()
    loss = _masked(token_loss, mask)
    if agg == "token-mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return loss.sum() / torch.clamp(torch.as_tensor(denom, dtype=loss.dtype), min=1.0)
    valid_seq = mask.any(dim=-1)
    seqs = valid_seq.sum() if num_seqs is None else num_seqs
    seqs = torch.clamp(torch.as_tensor(seqs, dtype=loss.dtype), min=1.0)
    if agg == "seq-mean-token-mean":
        per_seq = loss.sum(dim=-1) / torch.clamp(mask.sum(dim=-1), min=1)
        return per_seq.sum() / seqs
    if agg == "seq-mean-token-sum-norm":
        length = token_loss.shape[-1] if norm_len is None else norm_len
        return loss.sum() / length / seqs
    raise ValueError(f"unknown loss aggregation {agg!r}; use token-mean, seq-mean-token-mean or seq-mean-token-sum-norm")


def kl_k3(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    delta = ref_log_prob - log_prob
    return torch.exp(delta) - delta - 1.0


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_ratio_c: float | None = None,
    agg: LossAgg = "token-mean",
    *,
    ref_log_prob: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    norm_len: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss with decoupled clip ranges, DAPO Eq. 8 (negated, to minimise).

    Per token t of response i:  r = exp(log_prob - old_log_prob),
        objective_{i,t} = min(r * A_i, clip(r, 1 - eps_low, 1 + eps_high) * A_i)
    and the loss is -aggregate(objective) (see `aggregate_loss`). With `clip_ratio_c` (dual clip,
    Ye et al. 2020) the objective of a negative-advantage token is additionally floored at
    clip_ratio_c * A_i, bounding the update from a very large ratio. With `kl_coef` > 0 a k3 KL
    penalty to `ref_log_prob` is added per token (the paper uses none).

    Args:
        log_prob, old_log_prob, response_mask: [B, L]
        advantages: [B, L] per token, or [B] per response (broadcast over tokens).
    Returns:
        (loss, metrics). `loss` is a scalar to minimise. `metrics` holds detached scalars:
        clip_frac_low / clip_frac_high (share of valid tokens whose ratio was clipped from below /
        above in a way that zeroed its gradient), approx_kl (k3 estimate of KL(old || new)) and,
        when used, kl_ref.
        is_weights: [B, L] detached per-token importance weights pi_old / pi_rollout (truncated
        importance sampling, `rollout_is_weights`), multiplying each token's objective.
    """
    mask = response_mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(log_prob)
    # Masked positions may hold garbage (inf, nan): neutralise them before exp() so no NaN can leak
    # into the gradient through 0 * inf. Clamped as in verl: a finite log-ratio beyond ~88 overflows
    # exp() in float32, and inf * A (or the 0 * inf of the clipped branch's backward) turns loss or
    # gradient into inf/NaN; a token whose probability moved by more than e^20 is clipped anyway.
    log_ratio = torch.clamp(_masked(log_prob - old_log_prob, mask), -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    advantages = _masked(advantages, mask)
    ratio = torch.exp(log_ratio)
    surr1 = ratio * advantages
    surr2 = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    objective = torch.minimum(surr1, surr2)
    if clip_ratio_c is not None:
        dual = torch.maximum(objective, clip_ratio_c * advantages)
        objective = torch.where(advantages < 0, dual, objective)
    if is_weights is not None:  # rollout correction: the samples came from the engine's policy, not pi_old
        objective = objective * _masked(is_weights.detach(), mask)
    token_loss = -objective
    kl_ref = None
    if ref_log_prob is not None and kl_coef > 0:
        # Masked before exp(), as above: a NaN at a masked position would otherwise reach the
        # gradient as 0 * NaN.
        kl_ref = kl_k3(_masked(log_prob, mask), _masked(ref_log_prob, mask))
        token_loss = token_loss + kl_coef * kl_ref
    loss = aggregate_loss(token_loss, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)

    with torch.no_grad():
        n = torch.clamp(mask.sum(), min=1)
        low = (ratio < 1.0 - eps_low) & (advantages < 0) & mask
        high = (ratio > 1.0 + eps_high) & (advantages > 0) & mask
        metrics = {
            "clip_frac_low": low.sum() / n,
            "clip_frac_high": high.sum() / n,
            # log_ratio is log pi - log pi_old, so this is k3 of KL(old || new), 0 where masked
            "approx_kl": kl_k3(log_ratio, torch.zeros_like(log_ratio)).sum() / n,
        }
        if kl_ref is not None:
            metrics["kl_ref"] = kl_ref.sum() / n
    return loss, metrics


RolloutCorrection = Literal["none", "tis", "mask"]


def rollout_is_weights(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor,
                       mode: RolloutCorrection, cap: float = 2.0, mask_ratio: float = 3.0
                       ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Correct for the rollout engine sampling from a slightly different policy than the trainer's
    (a vLLM engine in bf16, other kernels): train-inference mismatch.

    - "tis", truncated importance sampling (Yao et al. 2025; verl's rollout_is): per token
      w = min(exp(old_log_prob - rollout_log_prob), cap), multiplying the token's objective.
    - "mask", sequence masking (TRL 1.16's default with vLLM): a response whose sequence ratio
      exp(sum_t (old - sampler)) exceeds mask_ratio is left out of the loss (its tokens still count
      in the denominators, like an overlong-filtered one).
    - "none": nothing.
    Args: old_log_prob, rollout_log_prob, response_mask: [B, L].
    Returns: (is_weights [B, L] or None, response_mask [B, L] with masked responses zeroed).
    """
    mask = response_mask.bool()
    if mode == "none":
        return None, response_mask
    log_ratio = _masked(old_log_prob - rollout_log_prob, mask)
    if mode == "tis":
        return torch.exp(torch.clamp(log_ratio, max=math.log(cap))), response_mask
    if mode == "mask":
        keep = log_ratio.sum(dim=-1) <= math.log(mask_ratio)
        return None, response_mask * keep[:, None].to(response_mask.dtype)
    raise ValueError(f"unknown rollout correction {mode!r}; use none, tis or mask")


def mismatch_stats(trainer_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor,
                   response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Train-inference mismatch over valid tokens [B, L]: k3 estimate of KL(pi_rollout || pi_trainer)
    (the tokens were drawn from the rollout engine), and the largest |log-prob difference|."""
    mask = response_mask.bool()
    delta = _masked(trainer_log_prob - rollout_log_prob, mask)
    n = torch.clamp(mask.sum(), min=1)
    return {"mismatch_kl": kl_k3(torch.zeros_like(delta), delta).sum() / n, "mismatch_max_abs": delta.abs().max()}
