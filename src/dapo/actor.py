"""Stage: update. The Actor owns the policy model, its optimizer and learning-rate schedule, and
the training forward (shared-prompt packing, logprobs.py; the loss, loss.py).

Data-parallel (torchrun, docs/distributed.md): with several ranks the model is sharded with
FSDP2 (`fully_shard` per decoder layer, then the root) and every rank holds the whole rollout
batch; each trains on its contiguous share of every mini-batch's groups, with the mini-batch's
global denominators (all-reduced) and its loss multiplied by the world size (FSDP averages the
gradients over ranks), so the gradient is the single-process one. Every rank runs the same
number of forwards and backwards (empty shares run zero-loss dummies): collectives must match.

`update(batch)` is paper Algorithm 1, lines 9-11: mu passes over the rollout batch, one optimizer
step (`train_step`) per mini-batch. `train_step` takes the mini-batch's *global* loss
denominators (valid tokens and responses of the whole mini-batch), so splitting it into
micro-batches, or later into data-parallel shards, never changes the gradient. Metrics stay on
the device as tensors and are read back once per optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dapo import distributed
from dapo.batch import TrainBatch
from dapo.config import DAPOConfig
from dapo.errors import TrainingDiverged
from dapo.logprobs import (EAGER_RELEASE_TOKENS, PACKED_FORWARD, PackedRows, eager_memory_release, pack,
                           packed_logits, pad_stack, plan_micro_batches, set_gradient_checkpointing,
                           split_by_response, token_logprobs, wants_checkpointing)
from dapo.lora import adapters_disabled
from dapo.loss import mismatch_stats, policy_loss, rollout_is_weights


@dataclass
class StepResult:
    objective: float                 # -loss of the mini-batch (its gradient was applied unless skipped)
    grad_norm: float
    skipped: bool                    # non-finite objective or gradient norm: no optimizer step
    metrics: dict[str, float]        # token-weighted means: clip_frac_low, clip_frac_high, approx_kl[, kl_ref]
    entropy_sum: float               # sum of token entropies (when asked), for a token mean across steps
    tokens: int                      # packed tokens (padding included) that went through the model


class Actor:
    def __init__(self, model: torch.nn.Module, config: DAPOConfig, pad_id: int,
                 ref_model: torch.nn.Module | None = None, warn: Callable[[str], None] = print) -> None:
        c = self.config = config
        self.model, self.ref_model, self.pad_id, self.warn = model, ref_model, pad_id, warn
        self.world = distributed.world_size()
        if self.world > 1:
            shard_model(model, c)  # before the optimizer: it must hold the sharded parameters
        # pi_old of the later mini-batches from the sampler (config.old_logprobs_from_sampler), except
        # that 'auto' recomputes under FSDP bf16 mixed precision: the sampler decodes in fp32 there
        self.old_from_sampler = c.old_logprobs_from_sampler and not (c.old_logprobs == "auto" and mixed_precision())
        # fused AdamW is 4x faster than the per-tensor loop on CPU (0.08 s vs 0.36 s a step for 135M).
        # Only trainable parameters (LoRA freezes the base weights): no optimizer state for the rest.
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=c.lr,
                                           betas=tuple(c.adam_betas), weight_decay=c.weight_decay, fused=True)
        total = c.train_steps * c.grad_steps_per_train_step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=lr_lambda(c, total))
        self.optimizer_steps = 0
        self.skipped_steps = 0          # optimizer steps skipped for a non-finite loss or grad norm
        self.bad_steps_in_row = 0

    # --- forward ---------------------------------------------------------------------------------
    def pack(self, batch: TrainBatch, rows: list[int], keep: torch.Tensor) -> list[PackedRows]:
        c = self.config
        return [pack(mb, self.pad_id)
                for mb in plan_micro_batches(batch, c.max_tokens_per_micro_batch, c.shared_prompt, rows, keep,
                                             layout=c.attention_layout)]

    def dummy(self) -> PackedRows:
        """One pad token predicting itself, owned by no response: the zero-loss micro-batch a rank
        runs when it has fewer micro-batches than another (FSDP's collectives must match)."""
        one = torch.tensor([[self.pad_id]])
        return PackedRows(one, torch.zeros_like(one), torch.ones(1, 1, 1, 1, dtype=torch.bool), torch.tensor([0]),
                          torch.tensor([self.pad_id]), [])

    @torch.no_grad()
    def logprobs(self, plan: list[PackedRows], model: torch.nn.Module | None = None) -> dict[int, torch.Tensor]:
        """Per-token log-probs of every packed response, by batch row (no gradient)."""
        out = {}
        for packed in plan:
            lp, _ = token_logprobs(model or self.model, packed, self.config.temperature)
            if not packed.owner:  # a dummy
                continue
            for (_, row, _), t in zip(packed.owner, split_by_response(lp, packed.owner)):
                out[row] = t
        return out

    # --- one optimizer step ----------------------------------------------------------------------
    def train_step(self, plan: list[PackedRows], advantages: torch.Tensor, old: dict[int, torch.Tensor],
                   ref: dict[int, torch.Tensor], *, num_tokens: int, num_seqs: int, with_entropy: bool = False,
                   record_old: bool = False, sampler: list[torch.Tensor] | None = None) -> StepResult:
        """Forward/backward every micro-batch of one mini-batch, then one optimizer step.

        `num_tokens` / `num_seqs` are the mini-batch's loss denominators. With `record_old` the
        forward's own log-probs become the old policy's (exact before the first step: ratio 1).
        `sampler`: the rollout engine's log-probs by row, for config.rollout_correction.
        """
        c = self.config
        device = next(self.model.parameters()).device
        objective = torch.zeros((), device=device)
        entropy_sum = torch.zeros((), device=device)
        metric_sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for packed in plan:
            self._checkpointing(packed)
            lp, ent = token_logprobs(self.model, packed, c.temperature, with_entropy=with_entropy)
            if not packed.owner:  # a dummy: gathers and reduces like the others, contributes zero
                (lp.sum() * 0.0).backward()
                continue
            per_resp = split_by_response(lp, packed.owner)
            rows = [row for _, row, _ in packed.owner]
            if record_old:
                for row, t in zip(rows, per_resp):
                    old[row] = t.detach()
            old_lp = pad_stack([old[r] for r in rows])
            mask = pad_stack([torch.ones_like(t) for t in per_resp])
            is_weights = None
            if sampler is not None and c.correction != "none":
                is_weights, mask = rollout_is_weights(old_lp, pad_stack([sampler[r] for r in rows]).to(lp.device),
                                                      mask, c.correction, c.rollout_is_cap, c.rollout_mask_ratio)
            loss, m = policy_loss(
                pad_stack(per_resp), old_lp, advantages[rows].to(lp.device), mask,
                c.eps_low, c.eps_high, c.clip_ratio_c, c.loss_agg,
                ref_log_prob=pad_stack([ref[r] for r in rows]) if ref else None,
                kl_coef=c.kl_coef, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=c.max_new_tokens,
                is_weights=is_weights)
            # FSDP averages gradients over ranks; the loss holds this rank's share of the global sum.
            (loss * self.world if self.world > 1 else loss).backward()
            objective = objective - loss.detach()
            tokens += int(packed.input_ids.numel())
            for k, v in m.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v * len(lp)
            if ent is not None:
                entropy_sum = entropy_sum + ent.sum()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor (FSDP): already the global norm
            grad_norm = grad_norm.full_tensor()
        # One host sync for the whole step (and, with several ranks, one all-reduce of the sums).
        names = list(metric_sums) if self.world == 1 else self.metric_names()
        sums = torch.stack([objective, entropy_sum, torch.tensor(float(tokens), device=device)] +
                           [torch.as_tensor(metric_sums.get(k, 0.0), device=device).float() for k in names])
        values = distributed.all_reduce(sums.double()).tolist()
        obj, ent_sum, tokens = values[0], values[1], int(values[2])
        norm = float(grad_norm)
        metrics = {k: v / max(num_tokens, 1) for k, v in zip(names, values[3:])}
        skipped = not (math.isfinite(obj) and math.isfinite(norm))
        if skipped:
            # One bad batch must not poison the weights or Adam's moments: drop its gradient.
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.bad_steps_in_row += 1
        else:
            self.bad_steps_in_row = 0
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_steps += 1
        return StepResult(obj, norm, skipped, metrics, ent_sum, tokens)

    def metric_names(self) -> list[str]:
        """policy_loss's metrics, the same on every rank (a rank with only dummies has none)."""
        return ["clip_frac_low", "clip_frac_high", "approx_kl"] + (["kl_ref"] if self.ref_model is not None else [])

    def _checkpointing(self, packed: PackedRows) -> None:
        """Activation checkpointing for this micro-batch ("auto": only one over the token budget,
        i.e. a response too long to split); switched only when the answer changes."""
        c = self.config
        want = wants_checkpointing(c.gradient_checkpointing, packed, c.max_tokens_per_micro_batch)
        if want != getattr(self, "_checkpointing_on", False):
            set_gradient_checkpointing(self.model, want)
            self._checkpointing_on = want

    # --- mu passes over a rollout batch ----------------------------------------------------------
    def update(self, batch: TrainBatch, train_step: int = 0,
               on_grad_step: Callable[[int, float], None] | None = None) -> dict[str, float]:
        """mu passes over the batch; one optimizer step per mini-batch (paper Algorithm 1, lines 9-11).

        Fills `batch.old_logprobs`. Raises TrainingDiverged after max_bad_steps non-finite steps in a row.
        """
        c = self.config
        mb = c.groups_per_mini_batch
        mini_batches = [list(range(i, min(i + mb, batch.num_groups))) for i in range(0, batch.num_groups, mb)]
        # This rank's contiguous share of each mini-batch's groups (all of them on one rank).
        mine = [set(distributed.share(ids, distributed.rank(), self.world)) for ids in mini_batches]
        rows_of = [[r for r in range(len(batch)) if int(batch.group[r]) in ids] for ids in mine]
        keep = batch.loss_mask(c.overlong_filter)
        plans = [self.pack(batch, rows, keep) for rows in rows_of]  # packed once, used every pass
        # The loss denominators of each whole mini-batch: the shares' counts, summed over ranks.
        kept_of = [[r for r in rows if bool(keep[r])] for rows in rows_of]
        counts = distributed.all_reduce_floats([float(n) for kept in kept_of for n in
                                                (sum(len(batch.response_ids[r]) for r in kept), len(kept))])
        denominators = [(int(counts[2 * i]), int(counts[2 * i + 1])) for i in range(len(kept_of))]
        if self.world > 1:  # equal numbers of micro-batches on every rank
            most = distributed.all_reduce_floats([float(len(p)) for p in plans], "max")
            plans = [p + [self.dummy()] * (int(n) - len(p)) for p, n in zip(plans, most)]
        # Long micro-batches: freed activations go back to the OS instead of fragmenting the heap
        # (logprobs.eager_memory_release); sampling afterwards keeps the heap's speed.
        long = any(p.input_ids.numel() >= EAGER_RELEASE_TOKENS for plan in plans for p in plan)
        with eager_memory_release(long):
            # Old-policy log-probs, needed from the second optimizer step on. The first mini-batch of
            # the first pass runs before any update, so its own forward gives them exactly (ratio 1).
            # The others' come from a no-grad forward, or (self.old_from_sampler: the hf
            # engine samples from these very weights, in the same precision) from the sampler's own
            # log-probs, which equal it up to float rounding: no forward, except for stale rows (a
            # surplus group sampled before the last update), recomputed either way.
            old: dict[int, torch.Tensor] = {}
            ref: dict[int, torch.Tensor] = {}
            if self.old_from_sampler and batch.sampler_logprobs is not None:
                device = next(self.model.parameters()).device
                later = [r for rows in rows_of[1:] for r in rows]
                old = {r: batch.sampler_logprobs[r].to(device) for r in later if not batch.is_stale(r)}
                stale = [r for r in later if batch.is_stale(r)]
                plan = self.pack(batch, stale, keep) if stale else []
                if self.world > 1:  # every rank runs the same number of forwards (FSDP collectives)
                    most = int(distributed.all_reduce_floats([float(len(plan))], "max")[0])
                    plan = plan + [self.dummy()] * (most - len(plan))
                old.update(self.logprobs(plan))
                measured = set(rows_of[0])  # the fresh rows whose pi_old is the trainer's own forward
            else:
                for plan in plans[1:]:
                    old.update(self.logprobs(plan))
                measured = None
            if self.ref_model is not None:
                # LoRA: the reference is this model with its adapters off (trainer.py)
                with adapters_disabled(self.model) if self.ref_model is self.model else contextlib.nullcontext():
                    for plan in plans:
                        ref.update(self.logprobs(plan, self.ref_model))
            assert batch.advantages is not None, "compute advantages before the update"
            sums: dict[str, float] = {}
            tokens_trained, skipped = 0, 0
            entropy_sum, entropy_tokens = 0.0, 0
            for epoch in range(c.mu):
                for mbi in range(len(rows_of)):
                    num_tokens, num_seqs = denominators[mbi]
                    result = self.train_step(plans[mbi], batch.advantages, old, ref, num_tokens=num_tokens,
                                             num_seqs=num_seqs, with_entropy=epoch == 0,
                                             record_old=epoch == 0 and mbi == 0, sampler=batch.sampler_logprobs)
                    tokens_trained += result.tokens
                    grad_step = epoch * len(rows_of) + mbi + 1
                    if result.skipped:
                        skipped += 1
                        self._report_bad_step(grad_step, train_step, result)
                        continue
                    for k, v in result.metrics.items():
                        sums[k] = sums.get(k, 0.0) + v
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + result.grad_norm
                    sums["objective"] = sums.get("objective", 0.0) + result.objective
                    if epoch == 0:
                        entropy_sum += result.entropy_sum
                        entropy_tokens += num_tokens
                    if on_grad_step is not None:
                        on_grad_step(grad_step, result.objective)
            batch.old_logprobs = [old.get(r, torch.zeros(0)) for r in range(len(batch))]  # this rank's share
            # Fresh rows only: a stale row's gap to its sampler is the policy's change, not a mismatch.
            mismatch = self._mismatch(batch, {r: t for r, t in old.items() if (measured is None or r in measured)
                                              and not batch.is_stale(r)})
            steps = max(c.grad_steps_per_train_step - skipped, 1)  # averages over the steps taken
            out = {k: v / steps for k, v in sums.items()}
            out["entropy"] = entropy_sum / max(entropy_tokens, 1)
            # A batch whose responses were all filtered out runs no loss; keep the keys (metrics.jsonl
            # promises every key on every step) with the value "nothing moved".
            for key in ("clip_frac_low", "clip_frac_high", "approx_kl") + (("kl_ref",) if self.ref_model else ()):
                out.setdefault(key, 0.0)
            out["lr"] = self.scheduler.get_last_lr()[0]
            out["train_tokens"] = tokens_trained
            out["skipped_steps"] = skipped
            out.update(mismatch)
            return out

    def _mismatch(self, batch: TrainBatch, old: dict[int, torch.Tensor]) -> dict[str, float]:
        """Train-inference mismatch between the engine's and the trainer's log-probs of the sampled
        tokens (before any update), over every rank's responses; {} when the engine gives none."""
        if batch.sampler_logprobs is None:
            return {}
        rows = [r for r in sorted(old) if len(old[r]) == len(batch.sampler_logprobs[r])]
        n, kl_sum, worst = 0.0, 0.0, 0.0
        if rows:
            trainer = pad_stack([old[r] for r in rows])
            stats = mismatch_stats(trainer, pad_stack([batch.sampler_logprobs[r] for r in rows]).to(trainer.device),
                                   pad_stack([torch.ones_like(old[r]) for r in rows]))
            n = float(sum(len(old[r]) for r in rows))
            kl_sum, worst = float(stats["mismatch_kl"]) * n, float(stats["mismatch_max_abs"])
        n, kl_sum = distributed.all_reduce_floats([n, kl_sum])
        worst = distributed.all_reduce_floats([worst], "max")[0]
        return {"mismatch_kl": kl_sum / max(n, 1.0), "mismatch_max_abs": worst}

    def _report_bad_step(self, grad_step: int, train_step: int, result: StepResult) -> None:
        c = self.config
        self.warn(f"dapo: warning: non-finite objective ({result.objective}) or gradient norm ({result.grad_norm}) "
                  f"at grad step {grad_step} of train step {train_step}; optimizer step skipped "
                  f"({self.bad_steps_in_row} in a row, the run stops at {c.max_bad_steps})")
        if self.bad_steps_in_row >= c.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_steps_in_row} optimizer steps in a row had a non-finite loss or gradient norm (train "
                f"step {train_step}); stopping.")

    # --- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Optimizer, schedule and counters (the weights are saved as a Hugging Face directory)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "optimizer_steps": self.optimizer_steps, "skipped_steps": self.skipped_steps,
                "bad_steps_in_row": self.bad_steps_in_row}

    def load_state_dict(self, state: dict[str, Any], optimizer: bool = True) -> None:
        """`optimizer=False`: the optimizer state was loaded elsewhere (sharded checkpoints)."""
        if optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer_steps, self.skipped_steps = state["optimizer_steps"], state["skipped_steps"]
        self.bad_steps_in_row = state["bad_steps_in_row"]


def lr_lambda(c: DAPOConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over warmup_steps optimizer steps, then constant, linear or cosine decay."""
    def f(step: int) -> float:
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.lr_schedule == "constant":
            return 1.0
        progress = (step - c.warmup_steps) / max(total_steps - c.warmup_steps, 1)
        progress = min(max(progress, 0.0), 1.0)
        if c.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


MIXED_PRECISION_ENV = "DAPO_FSDP_MIXED_PRECISION"


def mixed_precision() -> bool:
    """True when FSDP2 runs forward/backward in bf16 over fp32 parameters (docs/distributed.md)."""
    return os.environ.get(MIXED_PRECISION_ENV) == "bf16"


def shard_model(model: torch.nn.Module, config: DAPOConfig) -> None:
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, final norm, head), in
    place; the packed training forward is registered as an FSDP forward method (logprobs.py)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kwargs = {}
    if mixed_precision():
        # fp32 parameters and optimizer state, bf16 forward/backward, fp32 gradient reduction: the
        # GPU recipe of docs/distributed.md (untested here: no GPU was available)
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.get_decoder().layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    setattr(model, PACKED_FORWARD, types.MethodType(packed_logits, model))
    register_fsdp_forward_method(model, PACKED_FORWARD)
