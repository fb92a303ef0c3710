"""The DAPO training recipe (paper Algorithm 1). `Trainer.fit` is the loop, top to bottom:

    for each train step:
        batch = collector.collect()        # rollouts, rewards, dynamic sampling    collector.py
        batch.advantages = ...             # group-relative advantages (Eq. 9)      advantages.py
        actor.update(batch)                # mu passes, one optimizer step per mini-batch   actor.py
        engine.sync_weights(model)         # the sampler sees the new policy        rollout.py
        log, evaluate, save                # metrics.py, evaluate.py, checkpoint.py

Everything else here is assembly (building the parts from a config) and the run's life cycle:
signals, checkpoints, resuming.

Under torchrun (several ranks, docs/distributed.md) every rank runs this same loop on the same
batch: the collector gathers each round from all ranks, the Actor trains each rank on its share
of the groups with FSDP2; rank 0 alone evaluates and writes the run directory's files.
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dapo import distributed
from dapo.actor import Actor
from dapo.advantages import group_advantages
from dapo.batch import TrainBatch
from dapo.checkpoint import (RNG_DIR, SHARDED_DIR, check_run_dir, checkpoint_dir, checkpoint_step,
                             estimate_checkpoint_bytes, latest_checkpoint, load_sharded_state, load_trainer_state,
                             remove_stale_tmp, save_checkpoint, save_sharded_checkpoint)
from dapo.collector import BatchCollector
from dapo.config import DAPOConfig
from dapo.data import PromptSampler, encode_prompt
from dapo.errors import (ConfigError, DapoError, DynamicSamplingExhausted, OutOfMemory, ResumeError,
                         TrainingDiverged, TrainingInterrupted, oom_guard)
from dapo.evaluate import evaluate
from dapo.lora import ADAPTER_DIR, apply_lora, load_adapter
from dapo.metrics import MetricsLogger, sample_rows
from dapo.models import load_model, load_tokenizer, pick_device, stop_token_ids
from dapo.progress import NullProgress, Progress, make_progress
from dapo.resume import capture_rng, check_resumable, restore_rng, truncate_jsonl
from dapo.rewards import RewardFunction
from dapo.rollout import RolloutEngine, make_engine
from dapo.rundir import acquire_run_lock, claim_run_dir, prepare_run_dir
from dapo.scorer import RewardScorer
from dapo.tasks import Task, build_task, reward_functions, use_reward_fns
from dapo.trackers import make_trackers


@dataclass
class TrainResult:
    run_dir: Path                    # the run directory (config, metrics, checkpoints)
    checkpoint: Path                 # the final checkpoint: a Hugging Face model directory
    eval_before: dict[str, float]    # held-out scores before training ({} when resumed or no eval set)
    eval_after: dict[str, float]     # held-out scores after training
    metrics: list[dict[str, Any]]    # one dict per train step of this call (metrics.jsonl's rows)
    seconds: float                   # wall time of `fit`
    steps: int = 0                   # train steps completed (the run's total, resumed steps included)


class Trainer:
    """Builds the parts a config describes and runs them; every part can be passed in instead.

    Args:
        task: prompts, held-out prompts, rewards and accuracy (default: from the config).
        reward_fns: replace the task's reward functions: callables (TRL convention), RewardFunctions or
            --reward specs; the first drives accuracy unless config.accuracy_reward names another.
        model, tokenizer: replace loading `config.model` (with config.lora_rank > 0 the model passed
            in gets its adapters injected in place, as peft does).
        engine: the rollout engine (default: HFEngine on the training model).
    """

    def __init__(self, config: DAPOConfig, task: Task | None = None, reward_fns: Sequence[RewardFunction | Callable[..., Any] | str] | None = None,
                 model: torch.nn.Module | None = None, tokenizer: Any = None,
                 engine: RolloutEngine | None = None) -> None:
        self.config = c = config
        seed_everything(c.seed)
        # Data and reward functions first: a bad file or reward spec fails before the model loads.
        self.task = (task if task is not None else build_task(c) if reward_fns is None
                     else build_task(c, rewards_given=True))
        self.reward_fns = (use_reward_fns(self.task, reward_fns, c) if reward_fns is not None
                           else reward_functions(self.task, c.reward_weights))
        torch.set_num_threads(c.threads or os.cpu_count() or 1)
        self.device = pick_device(c.device)
        distributed.init(self.device)  # under torchrun: the process group (gloo on CPU, NCCL on CUDA)
        self.world = distributed.world_size()
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(c.model)
        self.model = (model if model is not None else load_model(c.model, c.dtype, self.device)).to(self.device)
        self.model.train()
        # LoRA: peft injects the adapters into this same model object and freezes the rest; the
        # KL reference is then the model itself with its adapters off (no second copy).
        self.peft: Any = None
        if c.lora_rank:
            if self.world > 1:
                raise ConfigError("lora_rank with several ranks (FSDP2) is not supported yet; train LoRA in one "
                                  "process, or full weights with --nproc")
            self.peft = apply_lora(self.model, c.lora_rank, c.lora_alpha, c.lora_target_modules)
        ref_model = None
        if c.kl_coef > 0:
            ref_model = (self.model if self.peft is not None else
                         load_model(c.model, c.dtype, self.device).eval().requires_grad_(False))
        # Every prompt is templated now: one over max_prompt_len fails here, not hours into the run.
        self.prompt_ids = [encode_prompt(self.tokenizer, r["prompt"], c.system_prompt, c.max_prompt_len)
                           for r in self.task.train]
        self.stop_ids = sorted(stop_token_ids(self.model, self.tokenizer))
        self.rank = distributed.rank()
        self.progress: Progress = NullProgress()  # fit() swaps in the display (rank 0 only)
        # With several ranks the Actor shards the training model (FSDP2); sampling, evaluation and
        # the Hugging Face export use an unsharded copy on each rank, refreshed after every train
        # step (`_sync_engine`): no collective runs inside generation, whose length differs by rank.
        self.gen_model = self.model
        if self.world > 1:
            self.gen_model = copy.deepcopy(self.model).requires_grad_(False)
        self.engine = engine if engine is not None else make_engine(c, self.gen_model, self.tokenizer.pad_token_id)
        self._owns_engine = engine is None
        self.actor = Actor(self.model, c, self.tokenizer.pad_token_id, ref_model, warn=self._warn)
        self.scorer = RewardScorer(self.reward_fns, self.task.accuracy, accuracy_name=self.task.accuracy_name,
                                   timeout=c.reward_timeout, on_error=c.reward_errors)
        self.collector = BatchCollector(c, self.engine, self.scorer, PromptSampler(self.task.train, seed=c.seed),
                                        self.prompt_ids, self.tokenizer, [rf.weight for rf in self.reward_fns],
                                        self.stop_ids)
        self.step = 0
        self.resumed_from: Path | None = None
        self._resume_note = ""
        self.stop_signal: int | None = None  # set by the first SIGINT/SIGTERM
        self.run_dir = Path(c.output_dir or f"runs/{c.task if c.data is None else 'data'}-"
                            f"{datetime.now():%Y%m%d-%H%M%S}")
        if self.world > 1:  # every rank the same directory (rank 0's clock)
            self.run_dir = Path(distributed.broadcast_object(str(self.run_dir)))
            # Each rank samples its own responses: its torch RNG (generation's) is offset by its
            # rank; Python's and NumPy's, and the prompt order (PromptSampler's own seed), are shared.
            torch.manual_seed(generation_seed(c.seed, self.rank))

    # --- the loop -------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to `train_steps`, from step 0 or from the checkpoint `restore` loaded.

        Raises TrainingInterrupted after writing a checkpoint when SIGINT/SIGTERM arrived.
        """
        c = self.config
        start = time.perf_counter()
        self._final_checkpoint: Path | None = None
        with self._stop_on_signal(), acquire_run_lock(self.run_dir), self._outputs() as (logger, trackers, progress):
            if self._resume_note:
                progress.note(self._resume_note)
            try:
                before = {} if self.resumed_from else self._evaluate(logger, trackers, "before training")
                progress.start(c.train_steps, c.grad_steps_per_train_step, c.train_batch_size)
                history = []
                while self.step < c.train_steps:
                    t0 = time.perf_counter()
                    try:
                        batch, stats = self.collector.collect(self.step + 1)
                    except DynamicSamplingExhausted as e:
                        if not e.solved:
                            raise
                        progress.message(f"-- Stopping early at train step {self.step + 1}: {e}")
                        break
                    batch.advantages = group_advantages(batch.grouped(batch.rewards),
                                                        normalize_std=c.normalize_std).flatten()
                    progress.training(self.step + 1)
                    t1 = time.perf_counter()
                    with oom_guard("training", c):
                        stats.update(self.actor.update(batch, self.step + 1, on_grad_step=self._grad_step_done))
                    self._sync_engine()
                    stats.update(self._timings(stats, t0, t1))
                    stats["optimizer_steps"] = self.actor.optimizer_steps
                    self.step += 1
                    history.append({"step": self.step, **stats})
                    self._log_step(logger, trackers, batch, stats)
                    if c.eval_every and self.step % c.eval_every == 0 and self.step < c.train_steps:
                        self._evaluate(logger, trackers, f"at step {self.step}")
                    if c.save_every and self.step % c.save_every == 0 and self.step < c.train_steps:
                        self.save()
                    if self.world > 1 and distributed.any_rank(self.stop_signal is not None):
                        self.stop_signal = self.stop_signal or signal.SIGTERM  # all ranks stop together
                    if self.stop_signal is not None and self.step < c.train_steps:
                        self._save_if_new()
                        raise TrainingInterrupted(f"Interrupted at step {self.step}; resume with: dapo train "
                                                  f"--resume {self.run_dir}", self.stop_signal)
                progress.close()
                checkpoint = self.save()  # before the final evaluation: a kill during it loses nothing trained
                if self.stop_signal is not None:
                    raise TrainingInterrupted(f"Interrupted at the end of training: all {self.step} train steps are "
                                              f"saved in {checkpoint}; the final evaluation was skipped (dapo eval "
                                              f"--model {self.run_dir} runs it)", self.stop_signal)
                self._final_checkpoint = checkpoint  # from here on a signal stops the final evaluation at once
                after = self._evaluate(logger, trackers, "after training")
            except TrainingDiverged as e:
                last = latest_checkpoint(self.run_dir)
                raise TrainingDiverged(f"{e} " + (f"The last good checkpoint is {last}." if last else
                                                  "No checkpoint was written yet.")
                                       + " Lower lr, or check the model dtype and the rewards.") from None
            except DapoError as e:
                # Nothing trained is lost: a run stopped by bad input (a reward function that raises,
                # dynamic sampling exhausted...) keeps its last completed step.
                if (self.step and not isinstance(e, TrainingInterrupted)
                        and not (isinstance(e, OutOfMemory) and e.during_update)):  # a half-updated step
                    self._save_if_new()
                raise
        return TrainResult(self.run_dir, checkpoint, before, after, history, time.perf_counter() - start, self.step)

    # --- pieces of the loop -------------------------------------------------------------------------
    def _sync_engine(self) -> None:
        """The rollout engine samples from the new weights; with several ranks they are gathered
        from the shards into every rank's unsharded copy first."""
        if self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
            with torch.no_grad():
                self.gen_model.load_state_dict(full)
            del full
        self.engine.sync_weights(self.gen_model)

    def _grad_step_done(self, grad_step: int, objective: float) -> None:
        self.progress.grad_step(self.step + 1, grad_step, objective)

    @staticmethod
    def _timings(stats: dict[str, Any], t0: float, t1: float) -> dict[str, float]:
        train_seconds = time.perf_counter() - t1
        return {"train_seconds": train_seconds,
                "train_tokens_per_second": stats.pop("train_tokens") / max(train_seconds, 1e-9),
                "step_seconds": time.perf_counter() - t0}

    def _log_step(self, logger: MetricsLogger | None, trackers: Any, batch: TrainBatch, stats: dict[str, Any]) -> None:
        c = self.config
        if logger is not None:
            logger.log(self.step, stats)
            trackers.log(self.step, stats)
            if c.log_samples_every and (self.step == 1 or self.step % c.log_samples_every == 0):
                logger.log_samples(self.step, sample_rows(batch, self.task.train))
        self.progress.step_done(self.step, stats)

    def evaluate(self) -> dict[str, float]:
        """Held-out avg@k / pass@k of the current policy ({} when the task has no evaluation set)."""
        c = self.config
        if self.task.accuracy is None or not self.task.eval or self.rank != 0:
            return {}  # several ranks: rank 0 evaluates alone, on its unsharded copy
        # Evaluate on a copy of the RNG state: how often and how much we evaluate must not change
        # the training samples (so eval settings are safe to change on resume).
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return evaluate(self.engine, self.tokenizer, self.task.eval[: c.max_eval_prompts or None], self.scorer,
                            k=c.eval_samples, temperature=c.eval_temperature, top_p=c.eval_top_p,
                            max_new_tokens=c.max_new_tokens, max_prompt_len=c.max_prompt_len,
                            system_prompt=c.system_prompt, stop_ids=self.stop_ids,
                            trainer_state=self.collector.trainer_state(self.step))

    def _evaluate(self, logger: MetricsLogger | None, trackers: Any, label: str) -> dict[str, float]:
        """Evaluate now; the scores go to eval.jsonl and the trackers under eval/ at the current step."""
        self.progress.phase(f"Evaluating {label}")
        with oom_guard("evaluation", self.config):
            scores = self.evaluate()
        if scores and logger is not None:
            logger.log_eval(self.step, scores)
            trackers.log(self.step, {f"eval/{k}": v for k, v in scores.items()})
        if scores:
            self.progress.evaluated(label, scores)
        return scores

    @contextmanager
    def _outputs(self) -> Iterator[tuple[MetricsLogger | None, Any, Progress]]:
        """Run directory, metrics files, trackers and the display: rank 0 only."""
        c = self.config
        if self.rank != 0:
            self.progress = NullProgress()
            try:
                yield None, None, self.progress
            finally:
                self._close_parts()
            return
        check_run_dir(self.run_dir, estimate_checkpoint_bytes(self.model))
        prepare_run_dir(self.run_dir, c, resuming=self.resumed_from is not None)  # refuses another run's directory
        logger = MetricsLogger(self.run_dir, resume=self.resumed_from is not None)
        trackers = make_trackers(c.trackers, self.run_dir, c.to_dict())
        self.progress = self.collector.progress = make_progress(c.verbose)
        try:
            yield logger, trackers, self.progress
        finally:
            self.progress.close()
            trackers.close()
            self._close_parts()
            self.progress = self.collector.progress = NullProgress()

    def _close_parts(self) -> None:
        """Reward workers end; an engine built here (vLLM holds its KV cache) is closed."""
        self.scorer.close()
        if self._owns_engine and hasattr(self.engine, "close"):
            self.engine.close()

    def _warn(self, text: str) -> None:
        self.progress.warning(text)

    # --- checkpoints and resuming ---------------------------------------------------------------------
    def save(self) -> Path:
        if self.world > 1:  # every rank: sharded model/optimizer (DCP) and its RNG; rank 0 the rest
            return save_sharded_checkpoint(self.run_dir, self.step, self.model, self.actor.optimizer, self.gen_model,
                                           self.tokenizer, self.config, self.state_dict(), capture_rng(),
                                           keep_last=self.config.keep_last)
        return save_checkpoint(self.run_dir, self.step, self.model, self.tokenizer, self.config,
                               trainer_state=self.state_dict(), keep_last=self.config.keep_last, adapter=self.peft)

    def _save_if_new(self) -> None:
        latest = latest_checkpoint(self.run_dir) if self.rank == 0 else None
        if distributed.broadcast_object(latest) != checkpoint_dir(self.run_dir, self.step):
            self.save()

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that decides the rest of the run, as plain containers
        and tensors (readable with torch.load(weights_only=True))."""
        actor = self.actor.state_dict()
        if self.world > 1:  # the optimizer's shards go to dcp/ (save_sharded_checkpoint)
            actor["optimizer"] = f"sharded: {SHARDED_DIR}/"
        collector = self.collector.state_dict()
        # An engine that seeds its requests by call count (vLLM) resumes with the same count.
        return {"version": 2, "step": self.step, "rng": capture_rng(), "world_size": self.world, **actor,
                **collector, "engine_calls": int(getattr(self.engine, "calls", 0))}

    def restore(self, checkpoint: Path) -> None:
        """Load weights and trainer state from `checkpoint`, so that `fit` continues the run
        exactly as if it had never stopped."""
        checkpoint = Path(checkpoint)
        saved = DAPOConfig.from_yaml(checkpoint / "dapo_config.yaml")
        check_resumable(saved, self.config)
        state = load_trainer_state(checkpoint)
        if state.get("version") != 2:
            raise ResumeError(f"{checkpoint} was written by an older dapo (trainer state version "
                              f"{state.get('version')}); start a new run")
        if state["step"] >= self.config.train_steps:
            raise ResumeError(f"the run in {self.run_dir} already reached step {state['step']} (train_steps="
                              f"{self.config.train_steps}); pass --train-steps N with N > {state['step']} to "
                              "train further")
        if self.config.train_steps != saved.train_steps and self.config.lr_schedule != "constant":
            self._warn(f"dapo: warning: train_steps changed from {saved.train_steps} to {self.config.train_steps}; "
                       f"the {self.config.lr_schedule} learning-rate schedule is stretched to the new length from "
                       "here on")
        saved_world = int(state.get("world_size", 1))
        if (checkpoint / SHARDED_DIR).is_dir():  # written by several ranks: resharded to this world size
            load_sharded_state(checkpoint, self.model, self.actor.optimizer)
            self.actor.load_state_dict(state, optimizer=False)
        elif self.peft is not None:  # the base weights are the config's model; the adapter is the run's
            load_adapter(self.peft, checkpoint / ADAPTER_DIR)
            self.actor.load_state_dict(state)
        else:
            weights = load_model(str(checkpoint), self.config.dtype, "cpu")  # no second copy on the GPU
            if self.world > 1:
                self._load_single_process_state(weights.state_dict(), state["optimizer"])
                self.actor.load_state_dict(state, optimizer=False)
            else:
                with torch.no_grad():
                    self.model.load_state_dict(weights.state_dict())  # in place: the optimizer keeps its parameters
                self.actor.load_state_dict(state)
            del weights
        self._sync_engine()
        self.collector.load_state_dict(state)
        self.step = state["step"]
        if hasattr(self.engine, "calls"):
            self.engine.calls = int(state.get("engine_calls", 0))
        self._restore_rng(checkpoint, state, saved_world)
        if self.rank == 0:
            remove_stale_tmp(self.run_dir)
            for log in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
                truncate_jsonl(self.run_dir / log, self.step)
        distributed.barrier()
        self.resumed_from = checkpoint
        self._resume_note = f"-- Resuming {self.run_dir} from {checkpoint.name} (step {checkpoint_step(checkpoint)})"
        if saved_world != self.world:
            self._warn(f"dapo: resuming a checkpoint of {saved_world} rank{'s' if saved_world > 1 else ''} with "
                       f"{self.world}: model and optimizer resharded; each rank's RNG reseeded from rank 0's saved "
                       f"state, so the samples differ from a run that kept {saved_world} "
                       f"rank{'s' if saved_world > 1 else ''}")

    def _restore_rng(self, checkpoint: Path, state: dict[str, Any], saved_world: int) -> None:
        """Same world size: each rank its own saved RNG (exact resume). Otherwise every rank
        restores rank 0's state, and ranks > 0 then reseed torch from it and their rank."""
        own = checkpoint / RNG_DIR / f"rank-{self.rank:05d}.pt"
        if saved_world == self.world and self.rank > 0 and own.is_file():
            restore_rng(torch.load(own, map_location="cpu", weights_only=True))
            return
        restore_rng(state["rng"])
        if self.rank > 0:
            digest = hashlib.sha256(state["rng"]["torch"].numpy().tobytes()).digest()
            torch.manual_seed(generation_seed(int.from_bytes(digest[:6], "little"), self.rank))

    def _load_single_process_state(self, weights: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> None:
        """A checkpoint of one process resumed by several ranks: its full weights and optimizer
        state (keyed by parameter order) are distributed onto the shards."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, weights, options=full)
        # The unsharded copy has the same parameters in the same order: read the optimizer state
        # there, keyed by parameter name, then shard it.
        plain = torch.optim.AdamW(self.gen_model.parameters(), lr=self.config.lr)
        plain.load_state_dict(optimizer)
        set_optimizer_state_dict(self.model, self.actor.optimizer, get_optimizer_state_dict(self.gen_model, plain),
                                 options=full)

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
            final = getattr(self, "_final_checkpoint", None)
            if final is not None:  # everything is saved: stop the final evaluation now
                raise TrainingInterrupted(f"Stopped during the final evaluation; training finished at step "
                                          f"{self.step}, saved in {final}", signum)
            what = (f"stopping after train step {self.step + 1} and writing a checkpoint"
                    if self.step < self.config.train_steps else
                    f"training is done (step {self.step}); writing its checkpoint and skipping the final evaluation")
            self._warn(f"\ndapo: {signal.Signals(signum).name} received; {what} (press Ctrl-C again to quit at once)")

        for s in previous:
            signal.signal(s, request_stop)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def train(config: DAPOConfig, resume: str | Path | None = None, **parts: Any) -> TrainResult:
    """Train with `config`; keyword arguments (task, reward_fns, model, tokenizer, engine) replace
    the parts the config would build. With `resume` (a run directory) continue that run from its
    newest complete checkpoint; `config` must then differ from the run's only in harmless fields."""
    from dapo.resume import find_checkpoint

    if resume is not None:
        if not Path(resume).is_dir():
            raise ResumeError(f"cannot resume: run directory {resume} does not exist")
        with acquire_run_lock(resume):  # held from choosing the checkpoint to the end of the run
            trainer = Trainer(config, **parts)
            trainer.run_dir = Path(resume)
            trainer.restore(find_checkpoint(trainer.run_dir))
            return trainer.fit()
    if config.output_dir is not None:  # refuse (or clear) another run's directory before loading anything
        with acquire_run_lock(config.output_dir):
            if distributed.rank() == 0:  # the others would see rank 0's files as another run
                claim_run_dir(config.output_dir, config.overwrite, resuming=False, clear=False)
            return Trainer(config, **parts).fit()
    return Trainer(config, **parts).fit()


def generation_seed(seed: int, rank: int) -> int:
    """Rank `rank`'s torch seed in a run of several ranks (rank 0 keeps `seed`)."""
    return seed + 1_000_003 * rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
