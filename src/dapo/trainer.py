"""The DAPO training recipe, top to bottom (paper Algorithm 1):

    for each train step:
        repeat (at most max_num_gen_batches rounds):             # dynamic sampling
            draw gen_batch_size prompts, sample G responses each  # rollout.py
            score them; add the overlong penalty                  # rewards.py
            keep the groups whose task rewards differ             # sampling.py
        until train_batch_size groups are ready
        compute group-relative advantages                         # advantages.py
        for mu passes, for each mini-batch: one optimizer step    # loss.py, logprobs.py
        log metrics, save checkpoints                             # metrics.py, checkpoint.py
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from dapo.advantages import group_advantages
from dapo.checkpoint import (check_run_dir, checkpoint_dir, checkpoint_step, estimate_checkpoint_bytes,
                             latest_checkpoint, load_trainer_state, remove_stale_tmp, save_checkpoint)
from dapo.config import DAPOConfig
from dapo.data import PromptSampler, Record, encode_prompt
from dapo.errors import DapoError, DynamicSamplingExhausted, ResumeError, TrainingDiverged, TrainingInterrupted
from dapo.evaluate import evaluate
from dapo.logprobs import (pack, pad_stack, plan_micro_batches, set_gradient_checkpointing, split_by_response,
                           token_logprobs, wants_checkpointing)
from dapo.loss import policy_loss
from dapo.metrics import MetricsLogger, sample_rows
from dapo.models import load_model, load_tokenizer, pick_device, stop_token_ids
from dapo.progress import NullProgress, Progress, make_progress
from dapo.resume import (capture_rng, check_resumable, group_from_state, group_to_state, restore_rng,
                         truncate_jsonl)
from dapo.rewards import RewardFunction, combine, overlong_penalty, score_group
from dapo.rollout import Group, generate
from dapo.sampling import DynamicSamplingBuffer, informative_groups
from dapo.tasks import Task, build_task, reward_functions
from dapo.trackers import make_trackers


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    metrics: list[dict[str, Any]]
    seconds: float


class Run:
    """Everything a training run holds: model, data, rewards, optimiser, counters."""

    def __init__(self, config: DAPOConfig, task: Task | None = None, reward_fns: list[RewardFunction] | None = None,
                 model: torch.nn.Module | None = None, tokenizer: Any = None) -> None:
        self.config = c = config
        seed_everything(c.seed)
        # Data and reward functions first: a bad file or reward spec fails before the model loads.
        self.task = task if task is not None else build_task(c)
        self.reward_fns = reward_fns if reward_fns is not None else reward_functions(self.task, c.reward_weights)
        torch.set_num_threads(c.threads or os.cpu_count() or 1)
        self.device = pick_device(c.device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(c.model)
        self.model = (model if model is not None else load_model(c.model, c.dtype, self.device)).to(self.device)
        self.model.train()
        self.ref_model = None
        if c.kl_coef > 0:
            self.ref_model = load_model(c.model, c.dtype, self.device).eval().requires_grad_(False)
        self.sampler = PromptSampler(self.task.train, seed=c.seed)
        self.buffer: DynamicSamplingBuffer[Group] = DynamicSamplingBuffer(c.train_batch_size)
        self.eos_ids = stop_token_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        # fused AdamW is 4x faster than the per-tensor loop on CPU (0.08 s vs 0.36 s a step for 135M).
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr, betas=tuple(c.adam_betas),
                                           weight_decay=c.weight_decay, fused=True)
        total = c.train_steps * c.grad_steps_per_train_step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=lr_lambda(c, total))
        self.step = 0
        self.optimizer_steps = 0
        self.skipped_steps = 0          # optimizer steps skipped for a non-finite loss or grad norm
        self.bad_steps_in_row = 0
        self.resumed_from: Path | None = None
        self.stop_signal: int | None = None  # set by the first SIGINT/SIGTERM
        self.run_dir = Path(c.output_dir or f"runs/{c.task if c.data is None else 'data'}-"
                            f"{datetime.now():%Y%m%d-%H%M%S}")
        self._prompt_cache: dict[int, list[int]] = {}
        for record in self.task.train:  # a prompt over max_prompt_len fails now, not hours into the run
            self.prompt_ids(record)
        self.progress: Progress = NullProgress()  # train() swaps in the display for --no-verbose

    def say(self, line: str) -> None:
        if self.config.verbose:
            print(line, flush=True)

    # --- rollouts, rewards, dynamic sampling --------------------------------------------------
    def prompt_ids(self, record: Record) -> list[int]:
        key = id(record)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = encode_prompt(self.tokenizer, record["prompt"], self.config.system_prompt,
                                                    self.config.max_prompt_len)
        return self._prompt_cache[key]

    def rollout(self, records: list[Record]) -> list[Group]:
        c = self.config
        prompts = [self.prompt_ids(r) for r in records]
        self.model.eval()
        outs = generate(self.model, prompts, c.group_size, c.max_new_tokens, self.eos_ids, self.pad_id,
                        c.temperature, c.top_p, shared_prompt=c.shared_prompt)
        self.model.train()
        groups = []
        for record, ids, (responses, truncated) in zip(records, prompts, outs):
            g = Group(record, ids, responses, truncated)
            g.completions = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            groups.append(g)
        return groups

    def score(self, groups: list[Group]) -> int:
        """Task reward from the reward functions, plus the overlong penalty (Eq. 13).

        Returns how many reward values were errors scored 0 (reward_errors='zero')."""
        c = self.config
        errors = 0
        for g in groups:
            scored = score_group(self.reward_fns, g.record, g.completions, timeout=c.reward_timeout,
                                 on_error=c.reward_errors)
            if scored.first_error and not errors:
                self.say(f"Reward error scored 0: {scored.first_error}")
            errors += scored.errors
            g.scores = scored.scores
            g.task_reward = combine(g.scores, [rf.weight for rf in self.reward_fns])
            g.reward = g.task_reward + overlong_penalty(g.lengths, c.max_new_tokens, c.overlong_buffer_len,
                                                        c.overlong_penalty_factor)
        return errors

    def group_hits(self, g: Group) -> list[float]:
        """Per completion of a scored group: 1.0 if correct (accuracy score >= 1), else 0.0."""
        if self.reward_fns and self.task.accuracy is self.reward_fns[0].fn:
            return (g.scores[:, 0] >= 1.0).float().tolist()  # already computed: no second call
        c = self.config
        scored = score_group([RewardFunction("accuracy", self.task.accuracy)], g.record, g.completions,
                             timeout=c.reward_timeout, on_error=c.reward_errors)
        return (scored.scores[:, 0] >= 1.0).float().tolist()

    def collect_batch(self) -> tuple[list[Group], dict[str, float]]:
        """Algorithm 1's inner loop: generate until train_batch_size informative groups are ready."""
        c = self.config
        stats = {"gen_rounds": 0, "groups_kept": 0, "groups_dropped_all_same": 0, "groups_dropped_all_max": 0,
                 "groups_dropped_all_min": 0, "groups_carried_over": len(self.buffer.groups), "gen_tokens": 0}
        reward_sum, correct, count, lengths, truncated = 0.0, 0.0, 0, [], 0
        all_correct = self.task.accuracy is not None
        gen_seconds = 0.0
        score_sums = torch.zeros(len(self.reward_fns))
        reward_errors = 0
        while not self.buffer.full:
            if c.max_num_gen_batches and stats["gen_rounds"] >= c.max_num_gen_batches:
                if all_correct:
                    raise DynamicSamplingExhausted(
                        f"all {count} responses of the last {stats['gen_rounds']} generation rounds were correct "
                        f"and got equal rewards: the policy solves the training prompts", solved=True)
                raise DynamicSamplingExhausted(
                    f"dynamic sampling found only {len(self.buffer.groups)} of {c.train_batch_size} groups with "
                    f"differing rewards in max_num_gen_batches={c.max_num_gen_batches} generation rounds at train "
                    f"step {self.step + 1} ({stats['groups_dropped_all_max']} groups all at their best reward, "
                    f"{stats['groups_dropped_all_min']} all at zero or less). Raise max_num_gen_batches or "
                    f"group_size, or use prompts the model sometimes solves.")
            stats["gen_rounds"] += 1
            self.say("-- Generating rollouts")
            t0 = time.perf_counter()
            groups = self.rollout(self.sampler.next(c.gen_batch_size))
            gen_seconds += time.perf_counter() - t0
            reward_errors += self.score(groups)
            task_rewards = torch.stack([g.task_reward for g in groups])
            keep = informative_groups(task_rewards) if c.dynamic_sampling else torch.ones(len(groups), dtype=torch.bool)
            for g, k in zip(groups, keep.tolist()):
                for text, r in zip(g.completions, g.reward.tolist()):
                    self.say(f"Reward: {r:.3f}; Response: {_one_line(text)}")
                reward_sum += float(g.reward.sum())
                count += len(g.completions)
                lengths.extend(g.lengths.tolist())
                truncated += sum(g.truncated)
                stats["gen_tokens"] += int(g.lengths.sum())
                score_sums += g.scores.sum(dim=0)
                if self.task.accuracy is not None:
                    hits = self.group_hits(g)
                    correct += sum(hits)
                    all_correct = all_correct and all(h >= 1.0 for h in hits)
                if k:
                    stats["groups_kept"] += 1
                    self.buffer.add([g])
                else:
                    stats["groups_dropped_all_same"] += 1
                    hi = float(g.task_reward.max())
                    stats["groups_dropped_all_max" if hi > 0 else "groups_dropped_all_min"] += 1
                    self.say("Sampled group would give no learning signal; resampling...")
            self.progress.generation_round(self.step + 1, stats["gen_rounds"], len(self.buffer.groups),
                                           float(torch.cat([g.reward for g in groups]).mean()))
        batch = self.buffer.take()
        for g in batch:
            g.advantages = group_advantages(g.reward[None], normalize_std=c.normalize_std)[0]
        stats.update({
            "reward_mean": reward_sum / max(count, 1),
            "batch_reward_mean": float(torch.cat([g.reward for g in batch]).mean()),
            "response_length_mean": float(np.mean(lengths)) if lengths else 0.0,
            "response_length_max": float(max(lengths)) if lengths else 0.0,
            "truncated_share": truncated / max(count, 1),
            "prompts_consumed": self.sampler.prompts_consumed,
            "data_epoch": self.sampler.epoch,
            "gen_seconds": gen_seconds,
            "gen_tokens_per_second": stats["gen_tokens"] / max(gen_seconds, 1e-9),
        })
        if self.task.accuracy is not None:
            stats["accuracy"] = correct / max(count, 1)
        # Each reward function's own mean over every completion generated this step.
        stats.update({f"reward/{rf.name}": float(s) / max(count, 1) for rf, s in zip(self.reward_fns, score_sums)})
        stats["reward_errors"] = reward_errors
        return batch, stats

    # --- policy update --------------------------------------------------------------------
    def micro_batches(self, groups: list[Group], group_ids: list[int]) -> list[Any]:
        c = self.config
        return [pack(mb, self.pad_id) for mb in
                plan_micro_batches(groups, c.max_tokens_per_micro_batch, c.shared_prompt, group_ids,
                                   skip=self._filtered(groups), layout=c.attention_layout)]

    def _filtered(self, groups: list[Group]) -> set[tuple[int, int]]:
        """Responses masked out of the loss by overlong filtering."""
        if not self.config.overlong_filter:
            return set()
        return {(gi, ri) for gi, g in enumerate(groups) for ri, t in enumerate(g.truncated) if t}

    @torch.no_grad()
    def _logprobs_no_grad(self, model: torch.nn.Module, micro_batches: list[Any]) -> dict[tuple[int, int], torch.Tensor]:
        out = {}
        for packed in micro_batches:
            lp, _ = token_logprobs(model, packed, self.config.temperature)
            for (gi, ri, _), t in zip(packed.owner, split_by_response(lp, packed.owner)):
                out[(gi, ri)] = t
        return out

    def update(self, groups: list[Group]) -> dict[str, float]:
        """mu passes over the batch; one optimizer step per mini-batch (paper Algorithm 1, lines 9-11)."""
        c = self.config
        mb = c.groups_per_mini_batch
        mini_batches = [list(range(i, min(i + mb, len(groups)))) for i in range(0, len(groups), mb)]
        plans = [self.micro_batches(groups, ids) for ids in mini_batches]  # packed once, used every pass
        # Old-policy log-probs, needed from the second optimizer step on. The first mini-batch of
        # the first pass runs before any update, so its own forward gives them exactly (ratio 1).
        old, ref = {}, {}
        for plan in plans[1:]:
            old.update(self._logprobs_no_grad(self.model, plan))
        if self.ref_model is not None:
            for plan in plans:
                ref.update(self._logprobs_no_grad(self.ref_model, plan))
        filtered = self._filtered(groups)
        sums: dict[str, float] = {}
        tokens_trained = 0
        skipped = 0
        for epoch in range(c.mu):
            for mbi, ids in enumerate(mini_batches):
                first = epoch == 0 and mbi == 0
                kept = [(gi, ri) for gi in ids for ri in range(len(groups[gi].response_ids))
                        if (gi, ri) not in filtered and groups[gi].response_ids[ri]]
                num_tokens = sum(len(groups[gi].response_ids[ri]) for gi, ri in kept)
                objective, entropy_sum, metric_sums = 0.0, 0.0, {}
                for packed in plans[mbi]:
                    set_gradient_checkpointing(self.model, wants_checkpointing(
                        c.gradient_checkpointing, packed, c.max_tokens_per_micro_batch))
                    lp, ent = token_logprobs(self.model, packed, c.temperature, with_entropy=epoch == 0)
                    per_resp = split_by_response(lp, packed.owner)
                    if first:
                        for (gi, ri, _), t in zip(packed.owner, per_resp):
                            old[(gi, ri)] = t.detach()
                    keys = [(gi, ri) for gi, ri, _ in packed.owner]
                    loss, m = policy_loss(
                        pad_stack(per_resp),
                        pad_stack([old[k] for k in keys]),
                        torch.stack([groups[gi].advantages[ri] for gi, ri in keys]).to(lp.device),
                        pad_stack([torch.ones_like(t) for t in per_resp]),
                        c.eps_low, c.eps_high, c.clip_ratio_c, c.loss_agg,
                        ref_log_prob=pad_stack([ref[k] for k in keys]) if ref else None,
                        kl_coef=c.kl_coef, num_tokens=num_tokens, num_seqs=len(kept), norm_len=c.max_new_tokens)
                    loss.backward()
                    objective -= float(loss.detach())
                    n_tok = len(lp)
                    tokens_trained += int(packed.input_ids.numel())
                    for k, v in m.items():
                        metric_sums[k] = metric_sums.get(k, 0.0) + float(v) * n_tok
                    if ent is not None:
                        entropy_sum += float(ent.sum())
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm or math.inf)
                grad_step = epoch * len(mini_batches) + mbi + 1
                if not (math.isfinite(objective) and math.isfinite(float(grad_norm))):
                    # One bad batch must not poison the weights or Adam's moments: drop its gradient.
                    self.optimizer.zero_grad(set_to_none=True)
                    self._skip_bad_step(grad_step, objective, float(grad_norm))
                    skipped += 1
                    continue
                self.bad_steps_in_row = 0
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.optimizer_steps += 1
                for k, v in metric_sums.items():
                    sums[k] = sums.get(k, 0.0) + v / max(num_tokens, 1)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
                sums["objective"] = sums.get("objective", 0.0) + objective
                if epoch == 0:
                    sums["entropy"] = sums.get("entropy", 0.0) + entropy_sum
                    sums["_entropy_tokens"] = sums.get("_entropy_tokens", 0.0) + num_tokens
                self.say(f"Grad step {grad_step}/{c.grad_steps_per_train_step} in train step "
                         f"{self.step + 1}/{c.train_steps} completed. Objective: {objective:.6f}")
                self.progress.grad_step(self.step + 1, grad_step, objective)
        steps = max(c.grad_steps_per_train_step - skipped, 1)  # averages over the steps taken
        out = {k: v / steps for k, v in sums.items() if not k.startswith("_") and k != "entropy"}
        out["entropy"] = sums.get("entropy", 0.0) / max(sums.get("_entropy_tokens", 1.0), 1.0)
        # A batch whose responses were all filtered out runs no loss; keep the keys (metrics.jsonl
        # promises every key on every step) with the value "nothing moved".
        for key in ("clip_frac_low", "clip_frac_high", "approx_kl") + (("kl_ref",) if self.ref_model else ()):
            out.setdefault(key, 0.0)
        out["lr"] = self.scheduler.get_last_lr()[0]
        out["train_tokens"] = tokens_trained
        out["skipped_steps"] = skipped
        return out

    def _skip_bad_step(self, grad_step: int, objective: float, grad_norm: float) -> None:
        self.skipped_steps += 1
        self.bad_steps_in_row += 1
        c = self.config
        print(f"dapo: warning: non-finite objective ({objective}) or gradient norm ({grad_norm}) at grad step "
              f"{grad_step} of train step {self.step + 1}; optimizer step skipped "
              f"({self.bad_steps_in_row} in a row, the run stops at {c.max_bad_steps})", file=sys.stderr, flush=True)
        if self.bad_steps_in_row >= c.max_bad_steps:
            last = latest_checkpoint(self.run_dir)
            raise TrainingDiverged(
                f"{self.bad_steps_in_row} optimizer steps in a row had a non-finite loss or gradient norm (train "
                f"step {self.step + 1}); stopping. "
                + (f"The last good checkpoint is {last}." if last else "No checkpoint was written yet.")
                + " Lower lr, or check the model dtype and the rewards.")

    # --- evaluation and the loop ----------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        c = self.config
        if self.task.accuracy is None or not self.task.eval:
            return {}
        records = self.task.eval[: c.max_eval_prompts or None]
        # Evaluate on a copy of the RNG state: how often and how much we evaluate must not change
        # the training samples (so eval settings are safe to change on resume).
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return evaluate(self.model, self.tokenizer, records, self.task.accuracy, k=c.eval_samples,
                            temperature=c.eval_temperature, top_p=c.eval_top_p, max_new_tokens=c.max_new_tokens,
                            max_prompt_len=c.max_prompt_len, system_prompt=c.system_prompt,
                            reward_timeout=c.reward_timeout, reward_errors=c.reward_errors)

    def train(self) -> TrainResult:
        """Train to `train_steps`, from step 0 or from the checkpoint `restore` loaded.

        Raises TrainingInterrupted after writing a checkpoint when SIGINT/SIGTERM arrived.
        """
        with self._stop_on_signal():
            return self._train()

    def _train(self) -> TrainResult:
        c = self.config
        start = time.perf_counter()
        check_run_dir(self.run_dir, estimate_checkpoint_bytes(self.model))
        c.to_yaml(self.run_dir / "config.yaml")
        resumed = self.resumed_from is not None
        logger = MetricsLogger(self.run_dir, resume=resumed)
        trackers = make_trackers(c.trackers, self.run_dir, c.to_dict())
        self.progress = progress = make_progress(c.verbose)
        try:
            # A resumed run restored the RNG state after step k; evaluating "before" again would
            # only repeat work.
            before: dict[str, float] = {}
            if not resumed:
                progress.phase("Evaluating before training")
                before = self._evaluate_and_log(logger, trackers, "before training")
            progress.start(c.train_steps, c.grad_steps_per_train_step, c.train_batch_size)
            history = []
            while self.step < c.train_steps:
                t0 = time.perf_counter()
                try:
                    batch, stats = self.collect_batch()
                except DynamicSamplingExhausted as e:
                    if not e.solved:
                        raise
                    print(f"-- Stopping early at train step {self.step + 1}: {e}", flush=True)
                    break
                self.say("-- Training")
                t1 = time.perf_counter()
                stats.update(self.update(batch))
                stats["train_seconds"] = time.perf_counter() - t1
                stats["train_tokens_per_second"] = stats.pop("train_tokens") / max(stats["train_seconds"], 1e-9)
                stats["step_seconds"] = time.perf_counter() - t0
                stats["optimizer_steps"] = self.optimizer_steps
                self.step += 1
                logger.log(self.step, stats)
                trackers.log(self.step, stats)
                if c.log_samples_every and (self.step == 1 or self.step % c.log_samples_every == 0):
                    logger.log_samples(self.step, sample_rows(batch))
                history.append({"step": self.step, **stats})
                progress.step_done(self.step, stats)
                if c.eval_every and self.step % c.eval_every == 0 and self.step < c.train_steps:
                    progress.phase(f"Evaluating at step {self.step}")
                    self._evaluate_and_log(logger, trackers, f"at step {self.step}")
                if c.save_every and self.step % c.save_every == 0 and self.step < c.train_steps:
                    self.save()
                if self.stop_signal is not None and self.step < c.train_steps:
                    if latest_checkpoint(self.run_dir) != checkpoint_dir(self.run_dir, self.step):
                        self.save()
                    raise TrainingInterrupted(f"Interrupted at step {self.step}; resume with: dapo train --resume "
                                              f"{self.run_dir}", self.stop_signal)
            progress.close()
            progress.phase("Evaluating after training")
            after = self._evaluate_and_log(logger, trackers, "after training")
            ckpt = self.save()
        except DapoError as e:
            # Nothing trained is lost: a run stopped by bad input (a reward function that raises,
            # dynamic sampling exhausted...) keeps its last completed step. A diverged run keeps
            # pointing at its last good checkpoint instead.
            if (self.step and not isinstance(e, (TrainingDiverged, TrainingInterrupted))
                    and latest_checkpoint(self.run_dir) != checkpoint_dir(self.run_dir, self.step)):
                self.save()
            raise
        finally:
            progress.close()
            trackers.close()
            self.progress = NullProgress()
        seconds = time.perf_counter() - start
        return TrainResult(self.run_dir, ckpt, before, after, history, seconds)

    def _evaluate_and_log(self, logger: MetricsLogger, trackers: Any, label: str) -> dict[str, float]:
        """Evaluate now; the scores go to eval.jsonl and the trackers under eval/ at the current step."""
        scores = self.evaluate()
        if scores:
            logger.log_eval(self.step, scores)
            trackers.log(self.step, {f"eval/{k}": v for k, v in scores.items()})
            self.progress.evaluated(label, scores)
        return scores

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.model, self.tokenizer, self.config,
                               trainer_state=self.state_dict(), keep_last=self.config.keep_last)

    @contextmanager
    def _stop_on_signal(self) -> Iterator[None]:
        """The first SIGINT/SIGTERM asks the loop to stop after the current train step and write a
        checkpoint. The handlers then revert to the defaults, so a second signal exits at once;
        that is safe because a checkpoint is only ever renamed into place complete."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def request_stop(signum: int, frame: Any) -> None:
            self.stop_signal = signum
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            print(f"\ndapo: {signal.Signals(signum).name} received; stopping after train step {self.step + 1} "
                  "and writing a checkpoint (press Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

        for s in previous:
            signal.signal(s, request_stop)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # --- resuming -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that decides the rest of the run, as plain containers
        and tensors (readable with torch.load(weights_only=True))."""
        index = {id(r): i for i, r in enumerate(self.sampler.records)}
        return {
            "version": 1,
            "step": self.step,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "bad_steps_in_row": self.bad_steps_in_row,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng(),
            "sampler": self.sampler.state_dict(),
            "buffer": [group_to_state(g, index[id(g.record)]) for g in self.buffer.groups],
        }

    def restore(self, checkpoint: Path) -> None:
        """Load weights and trainer state from `checkpoint`, so that `train` continues the run
        exactly as if it had never stopped."""
        checkpoint = Path(checkpoint)
        saved = DAPOConfig.from_yaml(checkpoint / "dapo_config.yaml")
        check_resumable(saved, self.config)
        state = load_trainer_state(checkpoint)
        if state["step"] >= self.config.train_steps:
            raise ResumeError(f"the run in {self.run_dir} already reached step {state['step']} (train_steps="
                              f"{self.config.train_steps}); pass --train-steps N with N > {state['step']} to "
                              "train further")
        if self.config.train_steps != saved.train_steps and self.config.lr_schedule != "constant":
            print(f"dapo: warning: train_steps changed from {saved.train_steps} to {self.config.train_steps}; the "
                  f"{self.config.lr_schedule} learning-rate schedule is stretched to the new length from here on",
                  file=sys.stderr)
        weights = load_model(str(checkpoint), self.config.dtype, "cpu")  # no second copy on the GPU
        with torch.no_grad():
            self.model.load_state_dict(weights.state_dict())  # in place: the optimizer keeps its parameters
        del weights
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.buffer.groups = [group_from_state(g, self.sampler.records) for g in state["buffer"]]
        self.step, self.optimizer_steps = state["step"], state["optimizer_steps"]
        self.skipped_steps, self.bad_steps_in_row = state["skipped_steps"], state["bad_steps_in_row"]
        restore_rng(state["rng"])
        remove_stale_tmp(self.run_dir)
        for log in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
            truncate_jsonl(self.run_dir / log, self.step)
        self.resumed_from = checkpoint
        self.say(f"-- Resuming {self.run_dir} from {checkpoint.name} (step {checkpoint_step(checkpoint)})")


def train(config: DAPOConfig, resume: str | Path | None = None, **kwargs: Any) -> TrainResult:
    """Train with `config`; keyword arguments (task, reward_fns, model, tokenizer) override the
    parts the config would build. With `resume` (a run directory) continue that run from its
    newest complete checkpoint; `config` must then differ from the run's only in harmless fields."""
    from dapo.resume import find_checkpoint

    run = Run(config, **kwargs)
    if resume is not None:
        run.run_dir = Path(resume)
        run.restore(find_checkpoint(run.run_dir))
    return run.train()


def lr_lambda(c: DAPOConfig, total_steps: int):
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _one_line(text: str) -> str:
    return text.replace("\n", "\\n")
