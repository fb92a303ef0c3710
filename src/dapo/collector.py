"""Stage: dynamic sampling, the loop (paper Algorithm 1, lines 3-8). The filter itself is the pure
`informative_groups` (sampling.py); this module runs the generation rounds around it:

    repeat:
        draw prompts (refill, skipping), sample G responses each   (RolloutEngine)
        score the round, add the overlong penalty                 (RewardScorer, Eq. 13)
        keep the groups whose task rewards differ                 (Eq. 11's constraint)
    until train_batch_size groups are in the buffer

The round that fills the buffer can bring more informative groups than the step needs: the
surplus is trained in this step (surplus 'train'), opens the next step's batch ('carry', one
policy version stale) or is dropped ('drop'). Every row records the policy version that sampled it
(`TrainBatch.version`); the batch's `staleness` is how many versions that is behind the policy
the step updates.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from dapo import distributed
from dapo.batch import TrainBatch
from dapo.config import DAPOConfig
from dapo.data import PromptSampler
from dapo.engines import RolloutEngine, Samples, SamplingParams
from dapo.errors import DynamicSamplingExhausted, check_state_keys, oom_guard
from dapo.generator import AsyncGenerator
from dapo.progress import Progress
from dapo.reporting import Reporter
from dapo.rewards import TrainerState, combine, overlong_penalty
from dapo.sampling import DynamicSamplingBuffer, accuracy_lower_bound, informative_groups, refill_size, skip_probability
from dapo.scorer import RewardScorer

# Metrics of a step with asynchronous rollouts (seconds): the trainer waiting for rounds, the generator
# sampling, waiting for recent enough weights (pacing), loading them, and waiting for requests.
ASYNC_TIMINGS = ("wait_seconds", "generator_seconds", "generator_weight_wait_seconds", "weight_load_seconds",
                 "generator_idle_seconds")


class Pending(NamedTuple):
    """A round submitted to the generator and not yet received."""

    indices: list[int]   # its prompts
    skipped: int         # prompts skipped while drawing them
    ticket: int
    for_step: int        # the train step it was submitted for (its staleness bound)
# The round sampled ahead aims at this many times the groups a batch needs: a step that must wait for
# a second round loses the overlap (on arithmetic, a round sized for one batch fell short in ~half
# the steps), while extra informative groups are trained (surplus 'train') or carried, not wasted.
AHEAD_MARGIN = 1.5
RECENT_DECAY = 0.8  # per round: the keep rate drifts as the policy learns, so old rounds count less


class BatchCollector:
    """Generation rounds -> a `TrainBatch` of `train_batch_size` informative groups + rollout stats."""

    def __init__(self, config: DAPOConfig, engine: RolloutEngine, scorer: RewardScorer, sampler: PromptSampler,
                 prompt_ids: Sequence[list[int]], tokenizer: Any, weights: Sequence[float],
                 stop_token_ids: Sequence[int], reporter: Reporter | None = None) -> None:
        self.config, self.engine, self.scorer, self.sampler = config, engine, scorer, sampler
        self.prompt_ids, self.tokenizer, self.weights = prompt_ids, tokenizer, list(weights)
        self.sampling = SamplingParams(config.max_new_tokens, config.temperature, config.top_p,
                                       tuple(sorted(stop_token_ids)))
        self.buffer: DynamicSamplingBuffer[TrainBatch] = DynamicSamplingBuffer(config.train_batch_size)
        self.reporter = reporter or Reporter()
        self.step = 0  # train steps completed
        self.kept_recent, self.seen_recent = 0.0, 0.0  # informative / all groups, recent rounds weigh more
        self.streaks: dict[int, int] = {}  # prompt index -> groups in a row without a learning signal
        self.skip_rng = random.Random(config.seed * 7919 + 17)
        self.reward_errors = 0  # values scored 0 for an error in the current step (reward_errors="zero")
        self.samples_generated = 0  # responses sampled by this rank over the run (config.max_samples)
        # Asynchronous rollouts (max_staleness >= 1): the generator process, and the rounds submitted
        # to it and not yet received, oldest first.
        self.generator: AsyncGenerator | None = None
        self.ahead: deque[Pending] = deque()

    @property
    def progress(self) -> Progress:
        """The console display of the run (the reporter opens it when the run starts)."""
        return self.reporter.display

    # --- one round -------------------------------------------------------------------------------
    def rollout(self, indices: list[int]) -> TrainBatch:
        """Sample G responses for each training record in `indices` and score them.

        With several ranks each generates and scores its contiguous share of `indices`, then the
        shares are all-gathered in rank order: every rank returns the same whole round, so what
        follows (filter, buffer, stats) is identical on all ranks. An error on one rank (a reward
        function that raises, out of memory) is raised on every rank, so none waits forever."""
        if distributed.world_size() == 1:
            return self._rollout(indices)
        part, error, before = None, None, self.reward_errors
        mine = distributed.share(indices)
        try:
            part = self._rollout(mine) if mine else None
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
        gathered = distributed.all_gather_object((part, self.reward_errors - before, distributed.picklable(error)))
        failed = [e for _, _, e in gathered if e is not None]
        if error is not None:
            raise error
        if failed:
            raise failed[0]
        self.reward_errors = before + sum(n for _, n, _ in gathered)  # all ranks' errors this step
        return TrainBatch.cat([p for p, _, _ in gathered if p is not None])

    def _rollout(self, indices: list[int]) -> TrainBatch:
        prompts = [self.prompt_ids[i] for i in indices]
        with oom_guard("generation", self.config):
            samples = self.engine.generate(prompts, self.config.group_size, self.sampling)
        return self._score(indices, samples, self.step)

    def _score(self, indices: list[int], samples: list[Samples], version: int) -> TrainBatch:
        """The round's TrainBatch: `samples` (G per prompt of `indices`, sampled by policy `version`) scored."""
        c, records = self.config, self.sampler.records
        prompts = [self.prompt_ids[i] for i in indices]
        rows = [(i, p, s, j) for i, p, s in zip(indices, prompts, samples) for j in range(len(s.response_ids))]
        response_ids = [s.response_ids[j] for _, _, s, j in rows]
        texts = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        scored = self.scorer.score([records[i] for i, _, _, _ in rows], texts, completion_ids=response_ids,
                                   trainer_state=self.trainer_state(self.step))
        if scored.first_error:
            self.progress.note(f"Reward error scored 0: {scored.first_error}")
        self.reward_errors += scored.errors
        lengths = torch.tensor([len(r) for r in response_ids], dtype=torch.long)
        task_rewards = combine(scored.scores, self.weights)
        has_logprobs = all(s.logprobs is not None for s in samples)
        return TrainBatch(
            group=torch.repeat_interleave(torch.arange(len(indices)), c.group_size),
            prompt_index=torch.tensor([i for i, _, _, _ in rows], dtype=torch.long),
            prompt_ids=[p for _, p, _, _ in rows],
            response_ids=response_ids,
            truncated=torch.tensor([s.truncated[j] for _, _, s, j in rows], dtype=torch.bool),
            completions=list(texts),
            scores=scored.scores,
            task_rewards=task_rewards,
            rewards=task_rewards + overlong_penalty(lengths, c.max_new_tokens, c.overlong_buffer_len,
                                                    c.overlong_penalty_factor),
            correct=scored.correct,
            engine_logprobs=[torch.tensor(s.logprobs[j]) for _, _, s, j in rows] if has_logprobs else None,
            version=torch.full((len(rows),), version, dtype=torch.long),
        )

    # --- Algorithm 1's inner loop ----------------------------------------------------------------
    def collect(self, step: int) -> tuple[TrainBatch, dict[str, float]]:
        """Generate until `train_batch_size` informative groups are ready; `step` is the 1-based train step.

        Raises DynamicSamplingExhausted: solved=True when this step's answers are correct with
        95% confidence of accuracy >= solved_accuracy (or every answer of max_num_gen_batches
        rounds was), else when max_num_gen_batches rounds did not fill the batch.
        """
        c = self.config
        self.step = step - 1  # the policy version that samples: the weights after step - 1 updates
        for group in self.buffer.groups:
            if group.version is None:  # carried over in a checkpoint of before 2026-12-06: one step stale
                group.version = torch.full((len(group),), step - 2, dtype=torch.long)
        stats: dict[str, float] = {"gen_rounds": 0, "groups_kept": 0, "groups_dropped_all_same": 0,
                                   "groups_dropped_all_max": 0, "groups_dropped_all_min": 0,
                                   "groups_dropped_partial": 0, "groups_carried_over": len(self.buffer.groups),
                                   "gen_tokens": 0, "prompts_generated": 0, "prompts_skipped": 0}
        rounds: list[TrainBatch] = []
        correct, answered = 0, 0
        gen_seconds = 0.0
        self.reward_errors = 0
        timing = dict.fromkeys(ASYNC_TIMINGS, 0.0)
        # A round submitted for this step is received even when carried groups already fill the batch:
        # waiting longer would take it past the staleness bound its pacing was set for.
        while not self.buffer.full or (self.ahead and self.ahead[0].for_step <= step):
            if c.max_num_gen_batches and stats["gen_rounds"] >= c.max_num_gen_batches and not self.buffer.full:
                self._exhausted(step, stats, correct, answered, rounds)
            stats["gen_rounds"] += 1
            self.progress.generating(step)
            t0 = time.perf_counter()
            if self.generator is None:
                indices, skipped = self._draw(self._round_size())
                self._count_round(stats, indices, skipped)
                self.samples_generated += len(indices) * c.group_size
                round_ = self.rollout(indices)
            else:
                if not self.ahead:
                    self._submit(*self._draw(self._round_size()), step)
                round_ = self._receive(stats, timing)
            gen_seconds += time.perf_counter() - t0
            rounds.append(round_)
            keep = (informative_groups(round_.grouped(round_.task_rewards)) if c.dynamic_sampling
                    else torch.ones(round_.num_groups, dtype=torch.bool))
            self._remember(round_, keep)
            for g, k in enumerate(keep.tolist()):
                rows = round_.group == g
                self.progress.group_scored([t for t, r in zip(round_.completions, rows.tolist()) if r],
                                           round_.rewards[rows].tolist(), k)
                if k:
                    stats["groups_kept"] += 1
                    self.buffer.add([round_.select_groups([g])])
                else:
                    stats["groups_dropped_all_same"] += 1
                    stats[f"groups_dropped_{self._kind(round_, rows)}"] += 1
            self.progress.generation_round(step, int(stats["gen_rounds"]), len(self.buffer.groups),
                                           float(round_.rewards.mean()))
            if round_.correct is not None:
                correct, answered = correct + int(round_.correct.sum()), answered + len(round_)
                bound = accuracy_lower_bound(correct, answered)
                if not self.buffer.full and bound >= c.solved_accuracy:
                    raise DynamicSamplingExhausted(
                        f"{correct} of {answered} answers this step were correct (accuracy >= {bound:.4f} with 95% "
                        f"confidence, solved_accuracy={c.solved_accuracy:g}): the policy solves the training prompts",
                        solved=True, sampled=self._sampled_stats(rounds))
        surplus = len(self.buffer.groups) - c.train_batch_size
        groups = self.buffer.take_all() if c.surplus == "train" else self.buffer.take()
        if c.surplus == "drop":
            self.buffer.groups = []
        elif c.max_staleness:  # pacing: a group that would be over the bound next step is trained now
            late = [self.step + 1 - int(g.version.min()) > c.max_staleness for g in self.buffer.groups]
            groups += [g for g, over in zip(self.buffer.groups, late) if over]
            self.buffer.groups = [g for g, over in zip(self.buffer.groups, late) if not over]
        batch = TrainBatch.cat(groups)
        if self.generator is not None:  # keep the generator busy while this batch trains
            self._submit_ahead(step)
            stats.update(timing, weight_publish_seconds=self.generator.publish_seconds)
        stats.update(self._sampled_stats(rounds))
        stats.update({"groups_surplus": surplus, "groups_trained": batch.num_groups})
        if batch.version is not None:
            batch.staleness = self.step - batch.version
            stats.update(staleness_mean=float(batch.staleness.float().mean()), staleness_max=int(batch.staleness.max()))
        stats.update({
            "batch_reward_mean": float(batch.rewards.mean()),
            "batch_accuracy": float(batch.correct.mean()) if batch.correct is not None else None,
            "prompts_consumed": self.sampler.prompts_consumed,
            "data_epoch": self.sampler.epoch,
            "gen_seconds": gen_seconds,
            "gen_tokens_per_second": stats["gen_tokens"] / max(gen_seconds, 1e-9),
            "keep_rate": stats["groups_kept"] / max(stats["prompts_generated"], 1),
        })
        stats["reward_errors"] = self.reward_errors
        return batch, stats

    def _count_round(self, stats: dict[str, float], indices: list[int], skipped: int) -> None:
        stats["prompts_skipped"] += skipped
        stats["prompts_generated"] += len(indices)

    # --- asynchronous rounds (generator.py) -------------------------------------------------------
    def _submit(self, indices: list[int], skipped: int, for_step: int) -> None:
        """Queue a round for train step `for_step`: sampled by weights at most max_staleness versions
        older than those that step trains (version for_step - 1)."""
        assert self.generator is not None
        c = self.config
        ticket = self.generator.submit([self.prompt_ids[i] for i in indices], c.group_size, self.sampling,
                                       min_version=for_step - 1 - c.max_staleness)
        self.samples_generated += len(indices) * c.group_size
        self.ahead.append(Pending(indices, skipped, ticket, for_step))

    def _receive(self, stats: dict[str, float], timing: dict[str, float]) -> TrainBatch:
        """The oldest submitted round, scored; counted in `stats`, its waits added to `timing`."""
        assert self.generator is not None
        pending = self.ahead.popleft()
        self._count_round(stats, pending.indices, pending.skipped)
        round_, waited = self.generator.result(pending.ticket)
        for name, seconds in {"wait_seconds": waited, **round_.timings()}.items():
            timing[name] += seconds
        return self._score(pending.indices, round_.samples, round_.version)

    def _submit_ahead(self, step: int) -> None:
        """After step `step`'s batch is full: one round for each of the next max_staleness steps that
        has none yet, as many prompts as the recent keep rate says AHEAD_MARGIN batches need (the
        step that receives it counts it)."""
        c = self.config
        planned = {p.for_step for p in self.ahead}
        needed = max(c.train_batch_size - len(self.buffer.groups), 1)  # a full buffer still gets a round: no idling
        size = (refill_size(math.ceil(AHEAD_MARGIN * needed), self.kept_recent, self.seen_recent, c.max_oversample)
                if c.dynamic_sampling and c.refill == "stream" else self._round_size() or 1)
        for for_step in range(step + 1, min(step + c.max_staleness, c.train_steps) + 1):
            if for_step not in planned:
                self._submit(*self._draw(size), for_step)

    # --- refill and prompt skipping ---------------------------------------------------------------
    def _round_size(self) -> int:
        """Prompts for the next round: gen_batch_size ('rounds'), or what the recent keep rate says
        the buffer still needs ('stream'; all of them when dynamic sampling is off)."""
        c = self.config
        needed = c.train_batch_size - len(self.buffer.groups)
        if c.refill == "rounds":
            return c.gen_batch_size
        if not c.dynamic_sampling:
            return needed
        return refill_size(needed, self.kept_recent, self.seen_recent, c.max_oversample)

    @property
    def skipping(self) -> bool:
        c = self.config
        return c.prompt_skip and c.dynamic_sampling and len(self.sampler.records) > 1

    def _draw(self, n: int) -> tuple[list[int], int]:
        """The next n prompts of the sampler, each skipped by its skip probability; returns (indices, skipped)."""
        out: list[int] = []
        skipped = 0
        while len(out) < n:
            i = self.sampler.next_indices(1)[0]
            if self.skipping and self.skip_rng.random() < skip_probability(self.streaks.get(i, 0),
                                                                           self.config.min_draw_prob):
                skipped += 1
                continue
            out.append(i)
        return out, skipped

    def _remember(self, round_: TrainBatch, keep: torch.Tensor) -> None:
        """Update the keep-rate estimate (recent rounds weigh more) and each prompt's streak of
        groups without a learning signal."""
        self.kept_recent = RECENT_DECAY * self.kept_recent + float(keep.sum())
        self.seen_recent = RECENT_DECAY * self.seen_recent + len(keep)
        for g, k in enumerate(keep.tolist()):
            i = int(round_.prompt_index[round_.group == g][0])
            self.streaks[i] = 0 if k else self.streaks.get(i, 0) + 1

    @staticmethod
    def _kind(round_: TrainBatch, rows: torch.Tensor) -> str:
        """How an all-equal group failed to teach: all answers correct ('all_max'), all wrong with
        no reward ('all_min'), or all given the same partial reward ('partial')."""
        rewards = round_.task_rewards[rows]
        if round_.correct is not None and bool((round_.correct[rows] >= 1).all()):
            return "all_max"
        if float(rewards.max()) <= 0 and (round_.correct is None or not bool(round_.correct[rows].any())):
            return "all_min"
        return "partial"

    def _sampled_stats(self, rounds: list[TrainBatch]) -> dict[str, float | None]:
        """Means over every completion generated this step. A step filled by the buffer alone
        (surplus groups of the last step) sampled nothing: its sampled statistics are None (null
        in metrics.jsonl, a gap in the curves), never the carried groups' (batch_reward_mean and
        batch_accuracy describe what was trained on, groups_carried_over what filled it)."""
        names = [rf.name for rf in self.scorer.reward_fns]
        keys = ["reward_mean", "response_length_mean", "response_length_max", "truncated_share",
                *(["accuracy"] if self.scorer.has_accuracy else []), *(f"reward/{n}" for n in names)]
        if not rounds:
            return {"gen_tokens": 0, **dict.fromkeys(keys)}
        generated = TrainBatch.cat(rounds)
        lengths = generated.lengths.float()
        out: dict[str, float | None] = {
            "gen_tokens": int(lengths.sum()), "reward_mean": float(generated.rewards.mean()),
            "response_length_mean": float(lengths.mean()), "response_length_max": float(lengths.max()),
            "truncated_share": float(generated.truncated.float().mean())}
        if generated.correct is not None:
            out["accuracy"] = float(generated.correct.mean())
        # Each reward function's own mean.
        out.update({f"reward/{name}": float(s) / len(generated)  # None (NaN): the function did not apply, counts 0
                    for name, s in zip(names, generated.scores.nansum(0))})
        return out

    def _exhausted(self, step: int, stats: dict[str, float], correct: int, answered: int,
                   rounds: list[TrainBatch]) -> None:
        c = self.config
        if answered and correct == answered:
            raise DynamicSamplingExhausted(
                f"all {answered} answers of the last {stats['gen_rounds']} generation rounds were correct "
                f"and got equal rewards: the policy solves the training prompts", solved=True,
                sampled=self._sampled_stats(rounds))
        raise DynamicSamplingExhausted(
            f"dynamic sampling found only {len(self.buffer.groups)} of {c.train_batch_size} groups with "
            f"differing rewards in max_num_gen_batches={c.max_num_gen_batches} generation rounds at train "
            f"step {step}: of the groups dropped, {stats['groups_dropped_all_max']} had every answer correct, "
            f"{stats['groups_dropped_all_min']} every answer wrong (no reward) and "
            f"{stats['groups_dropped_partial']} the same partial reward for every answer ({correct} of {answered} "
            f"answers correct). Raise max_num_gen_batches or group_size, or use prompts the model sometimes "
            f"solves and sometimes not.")

    def trainer_state(self, step: int) -> TrainerState:
        """TRL's `trainer_state` argument of reward functions: steps done, the run's length, data epochs."""
        return TrainerState(global_step=step, max_steps=self.config.train_steps,
                            epoch=self.sampler.prompts_consumed / max(len(self.sampler.records), 1))

    # --- resume ----------------------------------------------------------------------------------
    STATE_KEYS = ("prompts", "buffer", "refill")

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.skip_rng.getstate()
        return {"prompts": self.sampler.state_dict(), "buffer": [g.state_dict() for g in self.buffer.groups],
                "samples_generated": self.samples_generated,
                # asynchronous rollouts: rounds submitted and not yet received, regenerated on resume
                "ahead": [{"indices": p.indices, "skipped": p.skipped, "for_step": p.for_step} for p in self.ahead],
                "refill": {"kept_recent": self.kept_recent, "seen_recent": self.seen_recent,
                           "streak_prompts": list(self.streaks), "streak_lengths": list(self.streaks.values()),
                           "skip_rng": [version, list(internal), gauss]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys("collector", state, self.STATE_KEYS)
        self.sampler.load_state_dict(state["prompts"])
        self.buffer.groups = [TrainBatch.from_state_dict(g) for g in state["buffer"]]
        self.ahead.clear()
        for r in state.get("ahead", []):  # sampled again, from the checkpoint's weights (docs/async.md)
            self._submit(r["indices"], r["skipped"], r["for_step"])
        self.samples_generated = state.get("samples_generated", 0)  # not kept before 2026-12: a budget restarts
        refill = state["refill"]
        self.kept_recent, self.seen_recent = refill["kept_recent"], refill["seen_recent"]
        self.streaks = dict(zip(refill["streak_prompts"], refill["streak_lengths"]))
        version, internal, gauss = refill["skip_rng"]
        self.skip_rng.setstate((version, tuple(internal), gauss))
