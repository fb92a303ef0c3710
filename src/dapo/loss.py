"""Stage: loss. The DAPO policy-gradient objective (paper Eq. 8) and the losses that came after it
(GSPO, CISPO, SAPO, Clip-Cov, KL-Cov, GMPO), as pure tensor functions.

All tensors are [batch, response_len] with an explicit `response_mask` (1 for a token that
counts, 0 for padding or a filtered response). Masked positions may hold any finite or
non-finite value: they are zeroed with `torch.where` before any reduction, never multiplied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from dapo.config import LossAgg, PolicyLoss

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
    loss: PolicyLoss = "vanilla",
    loss_options: Mapping[str, float] | None = None,
    ref_log_prob: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    norm_len: int | None = None,
    is_weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy-gradient loss (to minimise) of one (micro-)batch; by default DAPO's, Eq. 8.

    `loss` names the per-token loss (verl's names; each is a pure function below, citing its
    paper): "vanilla" (PPO/DAPO clip with decoupled eps_low/eps_high and optional dual clip),
    "gspo", "cispo", "sapo", "clip_cov", "kl_cov", "geo_mean". eps_low/eps_high are the clip
    range of whichever loss clips (geo_mean: in log space); `loss_options` hold the rest (sapo:
    tau_pos, tau_neg; clip_cov: clip_cov_ratio, clip_cov_lb, clip_cov_ub; kl_cov: kl_cov_ratio,
    kl_cov_coef). Then, per token: times `is_weights` (rollout correction; geo_mean takes their
    geometric mean per response), plus kl_coef * k3 KL to `ref_log_prob`, aggregated by `agg`
    (geo_mean is a per-response loss: always "seq-mean-token-mean") with the mini-batch's global
    denominators (`aggregate_loss`), so micro-batching never changes the gradient (clip_cov and
    kl_cov choose their tokens within the batch they are given, as verl does).

    Args:
        log_prob, old_log_prob, response_mask: [B, L]
        advantages: [B, L] per token, or [B] per response (broadcast over tokens).
        is_weights: [B, L] detached per-token importance weights pi_old / pi_rollout (truncated
            importance sampling, `rollout_is_weights`).
        generator: clip_cov's random choice among its candidate tokens (default: torch's global RNG).
    Returns:
        (loss, metrics). `metrics` holds detached token means: clip_frac_low / clip_frac_high
        (share of valid tokens whose ratio was clipped below / above, where the loss clips),
        approx_kl (k3 estimate of KL(old || new)), cov_selected (clip_cov, kl_cov: share of tokens
        chosen by covariance) and, when used, kl_ref.
    """
    mask = response_mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(log_prob)
    # Masked positions may hold garbage (inf, nan): every loss reads them only through these
    # zeroed copies, so no NaN can leak into the gradient through 0 * inf.
    log_prob, old_log_prob, advantages = (_masked(log_prob, mask), _masked(old_log_prob, mask),
                                          _masked(advantages, mask))
    if loss not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {loss!r}; use one of {', '.join(POLICY_LOSSES)}")
    # Each loss takes what it uses: its options, the clip range if it clips, the dual clip
    # (vanilla) and the random choice (clip_cov).
    options = dict(loss_options or {})
    if loss in CLIPPING_LOSSES:
        options.update(eps_low=eps_low, eps_high=eps_high)
    if loss == "vanilla":
        options["clip_ratio_c"] = clip_ratio_c
    if loss == "clip_cov":
        options["generator"] = generator
    token_loss, metrics = POLICY_LOSSES[loss](log_prob, old_log_prob, advantages, mask, **options)
    if is_weights is not None:  # rollout correction: the samples came from the engine's policy, not pi_old
        weights = _masked(is_weights.detach(), mask)
        if loss == "geo_mean":  # a per-response loss: the geometric mean of its tokens' weights
            weights = torch.exp(_seq_mean(torch.log(weights + 1e-10), mask))[:, None]
        token_loss = token_loss * weights
    kl_ref = None
    if ref_log_prob is not None and kl_coef > 0:
        kl_ref = kl_k3(log_prob, _masked(ref_log_prob, mask))
        token_loss = token_loss + kl_coef * kl_ref
    out = aggregate_loss(token_loss, mask, "seq-mean-token-mean" if loss == "geo_mean" else agg,
                         num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)
    with torch.no_grad():
        n = torch.clamp(mask.sum(), min=1)
        log_ratio = torch.clamp(log_prob - old_log_prob, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        # log_ratio is log pi - log pi_old, so this is k3 of KL(old || new), 0 where masked
        metrics = {k: v.sum() / n for k, v in metrics.items()}
        metrics["approx_kl"] = kl_k3(log_ratio, torch.zeros_like(log_ratio)).sum() / n
        if kl_ref is not None:
            metrics["kl_ref"] = kl_ref.sum() / n
    return out, metrics


# --- the per-token losses --------------------------------------------------------------------------
# Each takes log_prob, old_log_prob, advantages, mask [B, L] (masked positions already zeroed) and
# returns (token_loss [B, L] to be aggregated, {metric: [B, L] 0/1 indicator of valid tokens}).


def _ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log r, r) with log r clamped as in verl: a finite log-ratio beyond ~88 overflows exp() in
    float32, and inf * A turns loss or gradient into inf/NaN; a token whose probability moved by
    more than e^20 is clipped anyway."""
    log_ratio = torch.clamp(log_prob - old_log_prob, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return log_ratio, torch.exp(log_ratio)


def _seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B]: the mean over each response's valid tokens (0 for an empty one)."""
    return _masked(x, mask).sum(-1) / torch.clamp(mask.sum(-1), min=1)


def _clip_indicators(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, eps_low: float,
                     eps_high: float) -> dict[str, torch.Tensor]:
    """Tokens whose clipped ratio zeroed the gradient: below 1 - eps_low with A < 0, above 1 + eps_high with A > 0."""
    return {"clip_frac_low": ((ratio < 1.0 - eps_low) & (advantages < 0) & mask).float(),
            "clip_frac_high": ((ratio > 1.0 + eps_high) & (advantages > 0) & mask).float()}


def vanilla_token_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.28,
                       clip_ratio_c: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO Eq. 8 (clip-higher): per token, r = pi / pi_old and the objective
    min(r A, clip(r, 1 - eps_low, 1 + eps_high) A). With `clip_ratio_c` (dual clip, Ye et al.
    2020) a negative-advantage token's objective is also floored at clip_ratio_c * A, bounding
    the update from a very large ratio. verl: "vanilla" (whose dual clip is always on, c = 3)."""
    _, ratio = _ratio(log_prob, old_log_prob)
    objective = torch.minimum(ratio * advantages, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages)
    if clip_ratio_c is not None:
        objective = torch.where(advantages < 0, torch.maximum(objective, clip_ratio_c * advantages), objective)
    return -objective, _clip_indicators(ratio, advantages, mask, eps_low, eps_high)


def gspo_token_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, eps_low: float = 3e-4, eps_high: float = 4e-4
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071), GSPO-token, Eq. 13-14: the sequence ratio
    s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|) = exp(mean_t log r_t) clipped to [1 - eps_low, 1 + eps_high]
    (the paper: 3e-4 and 4e-4, ranges ~1e3 times smaller than PPO's token ranges), written per
    token as s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]: the value s_i on every token, the
    gradient s_i * A_i * grad log pi(y_t) (the paper's Eq. 11 with token-level advantages).
    The paper averages per response ("seq-mean-token-mean"). log s_{i,t} is capped at 10, as in verl."""
    seq_log_ratio = _seq_mean(log_prob - old_log_prob, mask)
    log_s = torch.clamp(log_prob - log_prob.detach() + seq_log_ratio.detach()[:, None], max=10.0)
    s = torch.exp(log_s)
    objective = torch.minimum(s * advantages, torch.clamp(s, 1.0 - eps_low, 1.0 + eps_high) * advantages)
    return -objective, _clip_indicators(s.detach(), advantages, mask, eps_low, eps_high)


def cispo_token_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, eps_low: float = 10.0, eps_high: float = 0.2
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585, Eq. 4-5): clip the importance weight, not the update:
    per token sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi, so every token keeps its gradient
    (clipped ones are only down-weighted). The paper sets no lower bound (eps_low large: 10 as in
    verl's example) and tunes eps_high. The loss value is in units of log pi, not of the ratio."""
    _, ratio = _ratio(log_prob, old_log_prob)
    weight = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high).detach()
    clipped = {"clip_frac_low": ((ratio < 1.0 - eps_low) & mask).float(),
               "clip_frac_high": ((ratio > 1.0 + eps_high) & mask).float()}
    return -weight * advantages * log_prob, clipped


def sapo_token_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, tau_pos: float = 1.0, tau_neg: float = 1.05
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAPO (Gao et al. 2025, arXiv 2511.20347, Eq. 5-6): a soft gate instead of a hard clip:
    per token f(r) A with f(r) = sigmoid(tau (r - 1)) * 4 / tau, tau = tau_pos for A > 0 and
    tau_neg for A <= 0 (the paper: 1.0 and 1.05). f(1) = 2 / tau and f'(1) = 1, so near the old
    policy it is PPO's objective; far from it the gradient fades smoothly. verl always averages
    it per response ("seq-mean-token-mean")."""
    _, ratio = _ratio(log_prob, old_log_prob)
    tau = torch.where(advantages > 0, torch.as_tensor(tau_pos, dtype=ratio.dtype),
                      torch.as_tensor(tau_neg, dtype=ratio.dtype))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
    zero = torch.zeros_like(ratio)
    return -gate * advantages, {"clip_frac_low": zero, "clip_frac_high": zero}


def clip_cov_token_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.28, *,
                        clip_cov_ratio: float = 2e-4, clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clip-Cov (Cui et al. 2025, arXiv 2505.22617, Eq. 11-12): the tokens with a large covariance
    Cov = (log pi - mean log pi)(A - mean A) drive entropy collapse; among the tokens not already
    clipped whose Cov lies in (clip_cov_lb, clip_cov_ub), a random clip_cov_ratio share (at least
    one) is taken out of the gradient. The rest is the clipped objective without dual clip."""
    _, ratio = _ratio(log_prob, old_log_prob)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clipped = (loss2 > loss1) & mask
    n = torch.clamp(mask.sum(), min=1)
    lp = log_prob.detach()
    cov = (advantages - _masked(advantages, mask).sum() / n) * (lp - _masked(lp, mask).sum() / n)
    cov = torch.where(mask & ~clipped, cov, torch.full_like(cov, -math.inf))
    candidates = torch.nonzero((cov > clip_cov_lb) & (cov < clip_cov_ub) & mask)
    k = max(int(clip_cov_ratio * int(mask.sum())), 1)
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:min(k, len(candidates))]]
    selected = torch.zeros_like(mask)
    selected[chosen[:, 0], chosen[:, 1]] = True
    token_loss = torch.where(selected, torch.zeros_like(loss1), torch.maximum(loss1, loss2))
    metrics = _clip_indicators(ratio, advantages, mask, eps_low, eps_high)
    return token_loss, {**metrics, "cov_selected": selected.float()}


def kl_cov_token_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, kl_cov_ratio: float = 2e-3, kl_cov_coef: float = 1.0
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL-Cov (Cui et al. 2025, arXiv 2505.22617, Eq. 13): no clipping; the kl_cov_ratio share (at
    least one) of valid tokens with the largest covariance (log pi - mean)(A - mean) gets a KL
    penalty kl_cov_coef * |log pi - log pi_old| on top of -r A (the paper: ratio 2e-3, coef 1)."""
    log_ratio, ratio = _ratio(log_prob, old_log_prob)
    token_loss = -advantages * ratio
    valid = torch.nonzero(mask)
    a, p = advantages[mask], log_prob.detach()[mask]
    selected = torch.zeros_like(mask)
    if len(a):
        cov = (a - a.mean()) * (p - p.mean())
        top = torch.topk(cov, max(1, int(len(a) * kl_cov_ratio))).indices
        selected[valid[top, 0], valid[top, 1]] = True
    token_loss = torch.where(selected, token_loss + kl_cov_coef * log_ratio.abs(), token_loss)
    zero = torch.zeros_like(ratio)
    return token_loss, {"clip_frac_low": zero, "clip_frac_high": zero, "cov_selected": selected.float()}


def geo_mean_token_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, eps_low: float = 0.4, eps_high: float = 0.4
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GMPO (Zhao et al. 2025, arXiv 2507.20673, Eq. 4): the geometric mean of the token ratios
    instead of their arithmetic mean, each clipped in log space to [-eps_low, eps_high] on the
    side the advantage's sign makes pessimistic (the paper: 0.4 both ways):
        loss_i = -mean_t(A) * exp(mean_t sgn(A) * min(sgn(A) log r, sgn(A) clip(log r))).
    A per-response loss: returned on every token of the response (policy_loss averages it per
    response)."""
    log_ratio = log_prob - old_log_prob
    sign = torch.sign(advantages)
    clipped = torch.clamp(log_ratio, -eps_low, eps_high)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * clipped)
    loss = -_seq_mean(advantages, mask) * torch.exp(_seq_mean(pessimistic, mask))
    moved = (log_ratio != clipped) & mask
    return loss[:, None].expand_as(log_prob), {"clip_frac_low": (moved & (advantages < 0)).float(),
                                                "clip_frac_high": (moved & (advantages > 0)).float()}


# name (verl's) -> per-token loss; policy_loss dispatches on it.
POLICY_LOSSES = {"vanilla": vanilla_token_loss, "gspo": gspo_token_loss, "cispo": cispo_token_loss,
                 "sapo": sapo_token_loss, "clip_cov": clip_cov_token_loss, "kl_cov": kl_cov_token_loss,
                 "geo_mean": geo_mean_token_loss}
CLIPPING_LOSSES = frozenset({"vanilla", "gspo", "cispo", "clip_cov", "geo_mean"})  # take eps_low / eps_high
# Metrics beyond clip_frac_low / clip_frac_high / approx_kl (the same keys on every rank: Actor.metric_names).
LOSS_METRICS = {"clip_cov": ("cov_selected",), "kl_cov": ("cov_selected",)}
CORRECTION_METRICS = ("rollout_is_weight", "rollout_is_capped", "rollout_masked")  # correction_stats


RolloutCorrection = Literal["none", "tis", "seq_tis", "mask", "seq_mis"]


def rollout_is_weights(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor,
                       mode: RolloutCorrection, cap: float = 2.0, mask_ratio: float = 3.0, geo_ratio: float = 1.01
                       ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Correct for the rollout engine sampling from a slightly different policy than the trainer's
    (a vLLM engine in bf16, other kernels): train-inference mismatch. With log r_t = old_log_prob -
    rollout_log_prob (pi_old / pi_rollout, clamped to +-20):

    - "tis", token truncated importance sampling (Yao et al. 2025; verl's rollout_is "token"):
      w_t = min(r_t, cap), multiplying each token's objective.
    - "seq_tis", sequence TIS (verl's rollout_is "sequence"): w_i = min(prod_t r_t, cap) on every
      token of response i: the exact correction of a sequence's likelihood, truncated.
    - "mask", sequence masking (TRL 1.16's default with vLLM): a response whose prod_t r_t exceeds
      mask_ratio is left out of the loss (its tokens still count in the denominators, like an
      overlong-filtered one).
    - "seq_mis", geometric-mean masking (verl's "geometric" rejection, seq_mean_k1): a response whose
      exp(mean_t log r_t) lies outside [1 / geo_ratio, geo_ratio] is left out, a length-fair
      bound that long responses do not trip just by being long.
    - "none": nothing.
    Args: old_log_prob, rollout_log_prob, response_mask: [B, L].
    Returns: (is_weights [B, L] or None, response_mask [B, L] with masked responses zeroed).
    """
    mask = response_mask.bool()
    if mode == "none":
        return None, response_mask
    log_ratio = torch.clamp(_masked(old_log_prob - rollout_log_prob, mask), -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if mode == "tis":
        return torch.exp(torch.clamp(log_ratio, max=math.log(cap))), response_mask
    if mode == "seq_tis":
        seq = torch.clamp(log_ratio.sum(dim=-1), -LOG_RATIO_LIMIT, math.log(cap))
        return _masked(torch.exp(seq)[:, None].expand_as(log_ratio), mask), response_mask
    if mode == "mask":
        keep = log_ratio.sum(dim=-1) <= math.log(mask_ratio)
    elif mode == "seq_mis":
        keep = _seq_mean(log_ratio, mask).abs() <= math.log(geo_ratio)
    else:
        raise ValueError(f"unknown rollout correction {mode!r}; use none, tis, seq_tis, mask or seq_mis")
    return None, response_mask * keep[:, None].to(response_mask.dtype)


def correction_stats(is_weights: torch.Tensor | None, response_mask: torch.Tensor, corrected_mask: torch.Tensor,
                     cap: float) -> dict[str, torch.Tensor]:
    """What a rollout correction did, as shares of the valid tokens [B, L] before it: the mean
    importance weight (1 where none), the share of tokens whose weight was truncated at `cap`, and
    the share of tokens in responses it masked out."""
    mask = response_mask.bool()
    n = torch.clamp(mask.sum(), min=1)
    weights = torch.ones_like(response_mask, dtype=torch.float32) if is_weights is None else is_weights.detach()
    values = (_masked(weights, mask).sum() / n, ((weights >= cap * (1 - 1e-6)) & mask).sum() / n,
              (mask & ~corrected_mask.bool()).sum() / n)
    return dict(zip(CORRECTION_METRICS, values))


def mismatch_stats(trainer_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor,
                   response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Train-inference mismatch over valid tokens [B, L]: k3 estimate of KL(pi_rollout || pi_trainer)
    (the tokens were drawn from the rollout engine), and the largest |log-prob difference|."""
    mask = response_mask.bool()
    delta = _masked(trainer_log_prob - rollout_log_prob, mask)
    n = torch.clamp(mask.sum(), min=1)
    return {"mismatch_kl": kl_k3(torch.zeros_like(delta), delta).sum() / n, "mismatch_max_abs": delta.abs().max()}
