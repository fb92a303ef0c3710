"""Stage: update. The Actor owns the policy model, its optimizer and learning-rate schedule, and
the training forward (shared-prompt packing, logprobs.py; the loss, loss.py).

Data-parallel (torchrun, docs/distributed.md): with several ranks the model is sharded with
FSDP2 (`fully_shard` per decoder layer, then the root) and every rank holds the whole rollout
batch; each trains on its contiguous share of every mini-batch's groups, with the mini-batch's
global denominators (all-reduced) and its loss multiplied by the world size (FSDP averages the
gradients over ranks), so the gradient is the single-process one. Every rank runs the same
number of forwards and backwards (empty shares run zero-loss dummies): collectives must match.

`update(batch)` is paper Algorithm 1, lines 9-11: plan the mini-batches (`plan_update`), get
pi_old (`old_logprobs`) and the KL reference (`reference_logprobs`), then mu passes over the
rollout batch, one `optimizer_step` per mini-batch. `optimizer_step` takes the mini-batch's *global* loss
denominators (valid tokens and responses of the whole mini-batch), so splitting it into
micro-batches, or later into data-parallel shards, never changes the gradient. Metrics stay on
the device as tensors and are read back once per optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dapo import distributed
from dapo.batch import TrainBatch
from dapo.config import DAPOConfig
from dapo.errors import TrainingDiverged, check_state_keys
from dapo.logprobs import (EAGER_RELEASE_TOKENS, PACKED_FORWARD, PackedRows, eager_memory_release, pack, packed_logits,
                           pad_stack, plan_micro_batches, set_gradient_checkpointing, split_by_response, token_logprobs,
                           wants_checkpointing)
from dapo.lora import adapters_disabled
from dapo.loss import (CORRECTION_METRICS, LOSS_METRICS, correction_stats, mismatch_stats, policy_loss,
                       rollout_is_weights)


@dataclass
class StepResult:
    objective: float                 # -loss of the mini-batch (its gradient was applied unless skipped)
    grad_norm: float
    skipped: bool                    # non-finite objective or gradient norm: no optimizer step
    metrics: dict[str, float]        # token-weighted means: clip_frac_low, clip_frac_high, approx_kl[, kl_ref]
    entropy_sum: float               # sum of token entropies (when asked), for a token mean across steps
    tokens: int                      # packed tokens (padding included) that went through the model
    num_tokens: int = 0              # the mini-batch's valid response tokens (its loss denominator)


@dataclass
class UpdatePlan:
    """How one rollout batch is cut for the update, the same for all mu passes."""

    rows: list[list[int]]                 # per mini-batch: this rank's rows (its share of the groups)
    packed: list[list[PackedRows]]        # per mini-batch: its micro-batches (zero-loss dummies to even out ranks)
    denominators: list[tuple[int, int]]   # per mini-batch: the loss's global (valid tokens, kept responses)
    keep: torch.Tensor                    # [rows] bool: in the loss (overlong filtering leaves truncated out)
    long: bool                            # a micro-batch is long enough for eager memory release


class Actor:
    def __init__(self, model: torch.nn.Module, config: DAPOConfig, pad_id: int,
                 ref_model: torch.nn.Module | None = None, warn: Callable[[str], None] = print) -> None:
        c = self.config = config
        self.model, self.ref_model, self.pad_id, self.warn = model, ref_model, pad_id, warn
        self.world = distributed.world_size()
        if self.world > 1:
            # before the optimizer: it must hold the sharded parameters
            shard_model(model, c.fsdp_mixed_precision == "bf16")
        self.old_from_engine = c.old_logprobs_from_engine  # pi_old of the later mini-batches (old_logprobs)
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
    def optimizer_step(self, plan: list[PackedRows], advantages: torch.Tensor, old: dict[int, torch.Tensor],
                       ref: dict[int, torch.Tensor], *, num_tokens: int, num_seqs: int, with_entropy: bool = False,
                       record_old: bool = False, engine: list[torch.Tensor] | None = None,
                       stale: torch.Tensor | None = None) -> StepResult:
        """Forward/backward every micro-batch of one mini-batch, then one optimizer step.

        `num_tokens` / `num_seqs` are the mini-batch's loss denominators. With `record_old` the
        forward's own log-probs become the old policy's (exact before the first step: ratio 1).
        `engine`: the rollout engine's log-probs by row, for config.rollout_correction; `stale`: [rows]
        bool, sampled by an earlier policy version (config.stale_correction corrects those rows).
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
            is_weights, corrected = None, {}
            if engine is not None and self.corrects:
                is_weights, new_mask = self._correction(old_lp, pad_stack([engine[r] for r in rows]).to(lp.device),
                                                        mask, None if stale is None else stale[rows].to(lp.device))
                corrected = correction_stats(is_weights, mask, new_mask, c.rollout_is_cap)
                mask = new_mask
            loss, m = policy_loss(
                pad_stack(per_resp), old_lp, advantages[rows].to(lp.device), mask,
                c.eps_low, c.eps_high, c.clip_ratio_c, c.loss_agg, loss=c.policy_loss, loss_options=c.loss_options,
                ref_log_prob=pad_stack([ref[r] for r in rows]) if ref else None,
                kl_coef=c.kl_coef, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=c.max_new_tokens,
                is_weights=is_weights)
            m.update(corrected)
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
        return StepResult(obj, norm, skipped, metrics, ent_sum, tokens, num_tokens)

    @property
    def corrects(self) -> bool:
        """Whether some rows' objective can be corrected (rollout_correction, or stale rows)."""
        c = self.config
        return c.correction != "none" or (c.can_be_stale and c.stale_correction != "none")

    def _correction(self, old_lp: torch.Tensor, engine_lp: torch.Tensor, mask: torch.Tensor,
                    stale: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(importance weights or None, loss mask) of a micro-batch [B, L]: rollout_correction on
        every row, else stale_correction on the stale rows (decoupled PPO's behaviour correction:
        old_lp is the proximal policy, engine_lp the behaviour policy that sampled the row)."""
        c = self.config
        if c.correction != "none":
            return rollout_is_weights(old_lp, engine_lp, mask, c.correction, c.rollout_is_cap, c.rollout_mask_ratio,
                                      c.rollout_geo_ratio)
        if stale is None or not bool(stale.any()) or c.stale_correction == "none":
            return None, mask
        weights, new_mask = rollout_is_weights(old_lp, engine_lp, mask, c.stale_correction, c.rollout_is_cap,
                                               c.rollout_mask_ratio, c.rollout_geo_ratio)
        rows = stale[:, None]
        if weights is not None:
            weights = torch.where(rows, weights, torch.ones_like(weights))
        return weights, torch.where(rows, new_mask, mask)

    def metric_names(self) -> list[str]:
        """policy_loss's metrics, the same on every rank (a rank with only dummies has none)."""
        c = self.config
        return (["clip_frac_low", "clip_frac_high", "approx_kl", *LOSS_METRICS.get(c.policy_loss, ())]
                + (["kl_ref"] if self.ref_model is not None else [])
                + (list(CORRECTION_METRICS) if self.corrects else []))

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
        assert batch.advantages is not None, "compute advantages before the update"
        plan = self.plan_update(batch)
        # Long micro-batches: freed activations go back to the OS instead of fragmenting the heap
        # (logprobs.eager_memory_release); sampling afterwards keeps the heap's speed.
        with eager_memory_release(plan.long):
            old, measured = self.old_logprobs(batch, plan)
            ref = self.reference_logprobs(plan)
            steps = self._passes(batch, plan, old, ref, train_step, on_grad_step)
        batch.old_logprobs = [old.get(r, torch.zeros(0)) for r in range(len(batch))]  # this rank's share
        # Fresh rows only: a stale row's gap to its engine log-probs is the policy's change, not a mismatch;
        # that gap is stale_kl, how far off-policy the stale rows are.
        fresh = {r: t for r, t in old.items() if r in measured and not batch.is_stale(r)}
        mismatch = self._mismatch(batch, fresh)
        if self.config.can_be_stale and batch.engine_logprobs is not None:
            stale = self._mismatch(batch, {r: t for r, t in old.items() if batch.is_stale(r)})  # all recomputed
            mismatch["stale_kl"] = stale["mismatch_kl"]
        out = update_metrics(steps, self.metric_names())
        out["lr"] = self.scheduler.get_last_lr()[0]
        return {**out, **mismatch}

    def plan_update(self, batch: TrainBatch) -> UpdatePlan:
        """Cut the batch into mini-batches of groups_per_mini_batch groups, take this rank's
        contiguous share of each, and pack each share into micro-batches once for all mu passes."""
        c = self.config
        mini_batches = mini_batch_groups(batch.num_groups, c.train_batch_size, c.groups_per_mini_batch)
        mine = [set(distributed.share(ids, distributed.rank(), self.world)) for ids in mini_batches]
        rows = [[r for r in range(len(batch)) if int(batch.group[r]) in ids] for ids in mine]
        keep = batch.loss_mask(c.overlong_filter)
        packed = [self.pack(batch, share, keep) for share in rows]
        # The loss denominators of each whole mini-batch: the shares' counts, summed over ranks.
        kept = [[r for r in share if bool(keep[r])] for share in rows]
        counts = distributed.all_reduce_floats([float(n) for k in kept for n in
                                                (sum(len(batch.response_ids[r]) for r in k), len(k))])
        denominators = [(int(counts[2 * i]), int(counts[2 * i + 1])) for i in range(len(kept))]
        if self.world > 1:  # equal numbers of micro-batches on every rank
            most = distributed.all_reduce_floats([float(len(p)) for p in packed], "max")
            packed = [p + [self.dummy()] * (int(n) - len(p)) for p, n in zip(packed, most)]
        long = any(p.input_ids.numel() >= EAGER_RELEASE_TOKENS for mini in packed for p in mini)
        return UpdatePlan(rows, packed, denominators, keep, long)

    def old_logprobs(self, batch: TrainBatch, plan: UpdatePlan) -> tuple[dict[int, torch.Tensor], set[int]]:
        """pi_old of every row but the first mini-batch's (whose own first forward gives it exactly,
        before any update: ratio 1), and the rows whose pi_old the trainer measured itself.

        From the rollout engine (self.old_from_engine: the hf engine samples from these very
        weights in the same precision, equal up to float rounding): no forward, except for stale
        rows (a surplus group sampled before the last update), which are recomputed. Otherwise a
        no-grad forward over every later mini-batch."""
        later = [r for share in plan.rows[1:] for r in share]
        if not (self.old_from_engine and batch.engine_logprobs is not None):
            old: dict[int, torch.Tensor] = {}
            for mini in plan.packed[1:]:
                old.update(self.logprobs(mini))
            return old, set(plan.rows[0]) | set(later)
        device = next(self.model.parameters()).device
        old = {r: batch.engine_logprobs[r].to(device) for r in later if not batch.is_stale(r)}
        stale = [r for r in later if batch.is_stale(r)]
        packed = self.pack(batch, stale, plan.keep) if stale else []
        if self.world > 1:  # every rank runs the same number of forwards (FSDP collectives)
            most = int(distributed.all_reduce_floats([float(len(packed))], "max")[0])
            packed = packed + [self.dummy()] * (most - len(packed))
        old.update(self.logprobs(packed))
        return old, set(plan.rows[0])

    def reference_logprobs(self, plan: UpdatePlan) -> dict[int, torch.Tensor]:
        """The KL reference's log-probs of every row ({} without kl_coef). LoRA: the reference is
        this model with its adapters off (build.py)."""
        ref: dict[int, torch.Tensor] = {}
        if self.ref_model is None:
            return ref
        with adapters_disabled(self.model) if self.ref_model is self.model else contextlib.nullcontext():
            for mini in plan.packed:
                ref.update(self.logprobs(mini, self.ref_model))
        return ref

    def _passes(self, batch: TrainBatch, plan: UpdatePlan, old: dict[int, torch.Tensor], ref: dict[int, torch.Tensor],
                train_step: int, on_grad_step: Callable[[int, float], None] | None) -> list[tuple[int, StepResult]]:
        """mu passes, one optimizer step per mini-batch; returns (pass, result) of every step."""
        assert batch.advantages is not None
        steps = []
        stale = None if batch.staleness is None else batch.staleness > 0
        for epoch in range(self.config.mu):
            for i, mini in enumerate(plan.packed):
                num_tokens, num_seqs = plan.denominators[i]
                result = self.optimizer_step(mini, batch.advantages, old, ref, num_tokens=num_tokens,
                                             num_seqs=num_seqs, with_entropy=epoch == 0,
                                             record_old=epoch == 0 and i == 0, engine=batch.engine_logprobs,
                                             stale=stale)
                steps.append((epoch, result))
                grad_step = epoch * len(plan.packed) + i + 1
                if result.skipped:
                    self._report_bad_step(grad_step, train_step, result)
                elif on_grad_step is not None:
                    on_grad_step(grad_step, result.objective)
        return steps

    def _mismatch(self, batch: TrainBatch, old: dict[int, torch.Tensor]) -> dict[str, float]:
        """Train-inference mismatch between the engine's and the trainer's log-probs of the sampled
        tokens (before any update), over every rank's responses; {} when the engine gives none."""
        if batch.engine_logprobs is None:
            return {}
        rows = [r for r in sorted(old) if len(old[r]) == len(batch.engine_logprobs[r])]
        n, kl_sum, worst = 0.0, 0.0, 0.0
        if rows:
            trainer = pad_stack([old[r] for r in rows])
            stats = mismatch_stats(trainer, pad_stack([batch.engine_logprobs[r] for r in rows]).to(trainer.device),
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

    STATE_KEYS = ("optimizer", "scheduler", "optimizer_steps", "skipped_steps", "bad_steps_in_row")

    def load_state_dict(self, state: dict[str, Any], optimizer: bool = True) -> None:
        """`optimizer=False`: the optimizer state was loaded elsewhere (sharded checkpoints)."""
        check_state_keys("actor", state, self.STATE_KEYS)
        if optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer_steps, self.skipped_steps = state["optimizer_steps"], state["skipped_steps"]
        self.bad_steps_in_row = state["bad_steps_in_row"]


def mini_batch_groups(num_groups: int, train_batch_size: int, per_mini_batch: int) -> list[list[int]]:
    """The groups of each mini-batch: runs of `per_mini_batch` groups, the last one shorter. A batch
    with surplus groups (more than train_batch_size, config.surplus 'train') keeps the number of
    mini-batches, hence of optimizer steps, the configured batch gives, and spreads the extra
    groups over them one by one, the first mini-batches first.

    >>> mini_batch_groups(4, 4, 2)
    [[0, 1], [2, 3]]
    >>> mini_batch_groups(7, 4, 2)
    [[0, 1, 2, 3], [4, 5, 6]]
    >>> mini_batch_groups(3, 1, 1)
    [[0, 1, 2]]
    """
    base = max(train_batch_size, 1) if num_groups > train_batch_size else num_groups
    sizes = [min(per_mini_batch, base - i) for i in range(0, base, per_mini_batch)]
    for k in range(num_groups - base):
        sizes[k % len(sizes)] += 1
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [list(range(start, start + n)) for start, n in zip(starts, sizes)]


def update_metrics(steps: list[tuple[int, StepResult]], names: list[str]) -> dict[str, float]:
    """The train step's metrics from its optimizer steps (pass, result): loss metrics, grad norm
    and objective averaged over the steps taken (a skipped step counts only as skipped), entropy
    as the token mean of the first pass (the policy that sampled the batch). A batch whose
    responses were all filtered out runs no loss: its keys still appear, with "nothing moved"
    (metrics.jsonl promises every key on every step)."""
    taken = [r for _, r in steps if not r.skipped]
    first = [r for epoch, r in steps if epoch == 0 and not r.skipped]
    out = {k: 0.0 for k in names}
    for r in taken:
        for k, v in r.metrics.items():
            out[k] = out.get(k, 0.0) + v
    out["grad_norm"] = sum(r.grad_norm for r in taken)
    out["objective"] = sum(r.objective for r in taken)
    n = max(len(taken), 1)
    out = {k: v / n for k, v in out.items()}
    out["entropy"] = sum(r.entropy_sum for r in first) / max(sum(r.num_tokens for r in first), 1)
    out["train_tokens"] = sum(r.tokens for _, r in steps)
    out["skipped_steps"] = len(steps) - len(taken)
    return out


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


def shard_model(model: torch.nn.Module, bf16: bool = False) -> None:
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, final norm, head), in
    place; the packed training forward is registered as an FSDP forward method (logprobs.py).
    `bf16`: config.fsdp_mixed_precision "bf16"."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kwargs = {}
    if bf16:
        # fp32 parameters and optimizer state, bf16 forward/backward, fp32 gradient reduction: the
        # GPU recipe of docs/distributed.md
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.get_decoder().layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    setattr(model, PACKED_FORWARD, types.MethodType(packed_logits, model))
    register_fsdp_forward_method(model, PACKED_FORWARD)
