"""The DAPO training recipe (paper Algorithm 1). `Trainer.fit` is the loop, top to bottom:

    for each train step:
        batch = collector.collect()        # rollouts, rewards, dynamic sampling    collector.py
        batch.advantages = ...             # group-relative advantages (Eq. 9)      advantages.py
        actor.update(batch)                # mu passes, one optimizer step per mini-batch   actor.py
        parts.sync_engine()                # the engine samples from the new policy    engines.py
        report, evaluate, save             # reporting.py, evaluate.py, checkpointer.py

The parts are built by build.py, checkpoints are the Checkpointer's, everything shown or
written about the run is the Reporter's; this module is the run's life cycle: the loop, signals
and errors. Under torchrun every rank runs this same loop on the same batch (docs/distributed.md);
rank 0 alone evaluates and reports, and what it finds (scores or an error) reaches every rank.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dapo import distributed, launch
from dapo.advantages import group_advantages
from dapo.build import build
from dapo.checkpoint import estimate_checkpoint_bytes, latest_checkpoint
from dapo.checkpointer import Checkpointer, generation_seed
from dapo.config import DAPOConfig
from dapo.errors import (DapoError, DynamicSamplingExhausted, OutOfMemory, ResumeError, TrainingDiverged,
                         TrainingInterrupted, oom_guard)
from dapo.metrics import sample_rows
from dapo.reporting import Reporter, make_reporter
from dapo.rundir import acquire_run_lock, claim_run_dir
from dapo.signals import GracefulStop


@dataclass
class TrainResult:
    run_dir: Path                    # the run directory (config, metrics, checkpoints)
    checkpoint: Path                 # the final checkpoint: a Hugging Face model directory
    eval_before: dict[str, float]    # held-out scores before training ({} when resumed or no eval set)
    eval_after: dict[str, float]     # held-out scores after training
    metrics: list[dict[str, Any]]    # one dict per train step of this call (metrics.jsonl's rows)
    seconds: float                   # wall time of `fit`
    steps: int = 0                   # train steps completed (the run's total, resumed steps included)
    stopped_sampling: dict[str, Any] | None = None  # what the step that stopped the run as solved sampled


class Trainer:
    """Builds the parts a config describes (build.py; each can be passed in instead) and trains."""

    def __init__(self, config: DAPOConfig, reporter: Reporter | None = None, **parts: Any) -> None:
        self.config = c = config
        self.reporter = reporter or make_reporter(distributed.rank(), c.verbose, c.trackers)
        self.parts = p = build(c, self.reporter, **parts)
        self.task, self.model, self.tokenizer, self.engine = p.task, p.model, p.tokenizer, p.engine
        self.actor, self.collector = p.actor, p.collector
        self.step, self.resumed_from = 0, None
        self.stop = GracefulStop(lambda: (self.step, c.train_steps), self.reporter.warning)
        self.run_dir = Path(c.output_dir or f"runs/{c.task if c.data is None else 'data'}-{datetime.now():%Y%m%d-%H%M%S}")
        if distributed.world_size() > 1:  # one run directory (rank 0's clock); each rank its own samples
            self.run_dir = Path(distributed.broadcast_object(str(self.run_dir)))
            torch.manual_seed(generation_seed(c.seed, distributed.rank()))
        if distributed.rank() == 0:
            launch.record_run_dir(self.run_dir)  # `dapo train --nproc` names it should a rank die
        self.checkpointer = Checkpointer(self.run_dir, p, self.reporter)

    def fit(self) -> TrainResult:
        """Train to `train_steps`, from step 0 or from the checkpoint `restore` loaded.

        Raises TrainingInterrupted after writing a checkpoint when SIGINT/SIGTERM arrived."""
        c, start, solved, stop = self.config, time.perf_counter(), None, self.stop
        with stop, acquire_run_lock(self.run_dir), self._reporting():
            display = self.reporter.display
            try:
                before = {} if self.resumed_from or not c.eval_before else self._evaluate("before training")
                display.start(c.train_steps, c.grad_steps_per_train_step, c.train_batch_size)
                history = []
                while self.step < c.train_steps:
                    t0 = time.perf_counter()
                    try:
                        batch, stats = self.collector.collect(self.step + 1)
                    except DynamicSamplingExhausted as e:
                        if not e.solved:
                            raise
                        display.message(f"-- Stopping early at train step {self.step + 1}: {e}")
                        solved = {"step": self.step + 1, **e.sampled}
                        break
                    batch.advantages = group_advantages(batch.grouped(batch.rewards), normalize_std=c.normalize_std).flatten()
                    display.training(self.step + 1)
                    t1 = time.perf_counter()
                    with oom_guard("training", c):
                        stats.update(self.actor.update(batch, self.step + 1, on_grad_step=self._grad_step_done))
                    self.parts.sync_engine(self.step + 1)
                    train_seconds = time.perf_counter() - t1
                    stats.update(train_seconds=train_seconds, step_seconds=time.perf_counter() - t0,
                                 train_tokens_per_second=stats.pop("train_tokens") / max(train_seconds, 1e-9),
                                 optimizer_steps=self.actor.optimizer_steps)
                    self.step += 1
                    history.append({"step": self.step, **stats})
                    log_samples = c.log_samples_every and (self.step == 1 or self.step % c.log_samples_every == 0)
                    rows = sample_rows(batch, self.task.train) if log_samples else None
                    distributed.on_rank0(partial(self.reporter.step, self.step, stats, rows))
                    spent = bool(c.max_samples) and distributed.any_rank(self.collector.samples_generated >= c.max_samples)
                    last = spent or self.step >= c.train_steps  # the final save and evaluation follow
                    if c.eval_every and self.step % c.eval_every == 0 and not last:
                        self._evaluate(f"at step {self.step}")
                    if c.save_every and self.step % c.save_every == 0 and not last:
                        self.checkpointer.save(self.step)
                    if distributed.any_rank(stop.signum is not None):
                        stop.signum = stop.signum or signal.SIGTERM  # all ranks stop together
                    if spent:
                        display.message(f"-- Stopping at train step {self.step}: {self.collector.samples_generated} "
                                        f"responses sampled, the budget (max_samples) is {c.max_samples}")
                        break
                    if stop.signum is not None and self.step < c.train_steps:
                        self.checkpointer.save_if_new(self.step)
                        raise TrainingInterrupted(f"Interrupted at step {self.step}; resume with: dapo train --resume "
                                                  f"{self.run_dir}{nproc_option()}", stop.signum)
                display.close()
                checkpoint = self.save()  # before the final evaluation: a kill during it loses nothing trained
                if stop.signum is not None:
                    raise TrainingInterrupted(f"Interrupted at the end of training: all {self.step} train steps are "
                                              f"saved in {checkpoint}; the final evaluation was skipped (dapo eval "
                                              f"--model {self.run_dir} runs it)", stop.signum)
                stop.final_checkpoint = checkpoint  # from here on a signal stops the final evaluation at once
                after = self._evaluate("after training")
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
                    self.checkpointer.save_if_new(self.step)
                raise
        return TrainResult(self.run_dir, checkpoint, before, after, history, time.perf_counter() - start, self.step,
                           solved)

    def save(self) -> Path:
        return self.checkpointer.save(self.step)

    def restore(self, checkpoint: Path, check: bool = True) -> None:
        """Continue from `checkpoint` (its weights and trainer state): `fit` then goes on exactly as
        if the run had never stopped. `check=False`: the config was already checked against it."""
        self.step = self.checkpointer.restore(Path(checkpoint), check=check)
        self.resumed_from = Path(checkpoint)

    def evaluate(self) -> dict[str, float]:
        """Held-out avg@k / pass@k of the current policy ({} without an evaluation set); rank 0
        evaluates, and its scores (or its error) reach every rank."""
        evaluator = self.parts.evaluator
        state = self.collector.trainer_state(self.step)
        return distributed.on_rank0(lambda: evaluator(state) if evaluator is not None else {})

    def _evaluate(self, label: str) -> dict[str, float]:
        self.reporter.display.phase(f"Evaluating {label}")
        scores = self.evaluate()
        distributed.on_rank0(lambda: self.reporter.evaluated(self.step, label, scores))
        return scores

    def _grad_step_done(self, grad_step: int, objective: float) -> None:
        self.reporter.display.grad_step(self.step + 1, grad_step, objective)

    @contextmanager
    def _reporting(self) -> Iterator[None]:
        """The run directory's files, trackers and console for the run (rank 0); the parts' workers
        and engine are released when it ends, however it ends."""
        try:
            distributed.on_rank0(lambda: self.reporter.open(self.run_dir, self.config, self.resumed_from is not None,
                                                            estimate_checkpoint_bytes(self.model)))
            generator = self.collector.generator
            if generator is not None and distributed.rank() == 0:
                self.reporter.display.note(generator.description)
            if self.resumed_from is not None:
                self.reporter.display.note(f"-- Resuming {self.run_dir} from {self.resumed_from.name} (step {self.step})")
            yield
        finally:
            self.reporter.close()
            self.parts.close()


def nproc_option() -> str:
    """' --nproc N' for a resume command when this run has N > 1 ranks."""
    world = distributed.world_size()
    return f" --nproc {world}" if world > 1 else ""


def train(config: DAPOConfig, resume: str | Path | None = None, checkpoint: Path | None = None,
          **parts: Any) -> TrainResult:
    """Train with `config`; keyword arguments (task, reward_fns, model, tokenizer, engine) replace
    the parts the config would build. With `resume` (a run directory) continue that run from
    `checkpoint`, by default its newest intact one; `config` must then differ from the run's only in
    harmless fields (a `checkpoint` given is taken as already checked against `config`)."""
    from dapo.resume import find_checkpoint

    if resume is not None:
        if not Path(resume).is_dir():
            raise ResumeError(f"cannot resume: run directory {resume} does not exist")
        with acquire_run_lock(resume):  # held from choosing the checkpoint to the end of the run
            trainer = Trainer(config.replace(output_dir=str(resume)), **parts)
            trainer.restore(checkpoint or find_checkpoint(Path(resume), warn=trainer.reporter.warning),
                            check=checkpoint is None)
            return trainer.fit()
    if config.output_dir is not None:  # refuse (or clear) another run's directory before loading anything
        with acquire_run_lock(config.output_dir):
            if distributed.rank() == 0:  # the others would see rank 0's files as another run
                claim_run_dir(config.output_dir, config.overwrite, resuming=False, clear=False)
            return Trainer(config, **parts).fit()
    return Trainer(config, **parts).fit()
