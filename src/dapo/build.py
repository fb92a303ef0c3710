"""Assembly: the parts a config describes, built in one place for `Trainer` and `dapo eval`.

`build(config, ...)` returns `Parts`: the task and its reward functions, the tokenizer, the policy
model (LoRA adapters injected; sharded by the Actor with several ranks), the KL reference, the
rollout engine (engines.py's registry), the reward scorer, the batch collector, the Actor and the
held-out Evaluator. Every part a keyword names is used as given instead of being built; the
order is fixed so that a bad data file or reward spec fails before the model loads.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dapo import distributed
from dapo.actor import Actor
from dapo.collector import BatchCollector
from dapo.config import DAPOConfig
from dapo.data import PromptSampler, encode_prompt
from dapo.engines import RolloutEngine, make_engine
from dapo.errors import ConfigError, DataError
from dapo.evaluate import Evaluator
from dapo.generator import AsyncGenerator, split_threads
from dapo.lora import apply_lora
from dapo.models import load_model, load_tokenizer, pick_device, stop_token_ids
from dapo.reporting import Reporter
from dapo.rewards import RewardFunction
from dapo.scorer import RewardScorer
from dapo.tasks import Task, build_task, reward_functions, use_reward_fns

RewardFns = Sequence[RewardFunction | Callable[..., Any] | str]
REMOVED_ENV = "DAPO_FSDP_MIXED_PRECISION"  # read until 2026-12-05; now config.fsdp_mixed_precision


@dataclass
class Parts:
    config: DAPOConfig
    task: Task
    reward_fns: list[RewardFunction]
    tokenizer: Any
    model: torch.nn.Module              # the policy being trained (sharded by the Actor with several ranks)
    gen_model: torch.nn.Module          # what the engine samples from: the model, or an unsharded copy per rank
    peft: Any                           # the peft model wrapper when training LoRA adapters, else None
    prompt_ids: list[list[int]]         # every training prompt, templated and checked against max_prompt_len
    stop_ids: list[int]
    engine: RolloutEngine
    owns_engine: bool                   # built here (so closed here), not passed in
    scorer: RewardScorer
    collector: BatchCollector
    actor: Actor
    evaluator: Evaluator | None         # None: the task has no held-out set or no accuracy function

    def sync_engine(self, version: int) -> None:
        """The rollout engine samples from the new weights, policy `version` (train steps done); with
        several ranks they are gathered from the shards into every rank's unsharded copy first. An
        asynchronous generator (max_staleness >= 1) gets them through its mailbox."""
        if distributed.world_size() > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
            with torch.no_grad():
                self.gen_model.load_state_dict(full)
            del full
        self.engine.sync_weights(self.gen_model)
        if self.collector.generator is not None:
            self.collector.generator.publish(self.gen_model, version)

    def close(self) -> None:
        """Reward workers end; an engine built here (vLLM holds its KV cache) and the generator
        process are closed."""
        if self.collector.generator is not None:
            self.collector.generator.close()
        self.scorer.close()
        if self.owns_engine:
            self.engine.close()


def build(config: DAPOConfig, reporter: Reporter, *, task: Task | None = None, reward_fns: RewardFns | None = None,
          model: torch.nn.Module | None = None, tokenizer: Any = None, engine: RolloutEngine | None = None) -> Parts:
    """Everything a training run needs, from `config` except what the keywords pass in.

    model, tokenizer: replace loading `config.model` (with config.lora_rank > 0 the model passed in
    gets its adapters injected in place, as peft does; with kl_coef > 0 the KL reference is a
    frozen copy of it as it is now). reward_fns: callables (TRL convention), RewardFunctions or
    --reward specs replacing the task's. engine: the rollout engine (default: config.rollout_engine).
    """
    c = config
    if os.environ.get(REMOVED_ENV):
        raise ConfigError(f"{REMOVED_ENV} is no longer read: set fsdp_mixed_precision: bf16 in the config "
                          "(--fsdp-mixed-precision bf16), which is saved with the run and checked on resume")
    seed_everything(c.seed)
    # Data and reward functions first: a bad file or reward spec fails before the model loads.
    task = task if task is not None else build_task(c, rewards_given=reward_fns is not None)
    fns = (use_reward_fns(task, reward_fns, c) if reward_fns is not None else reward_functions(task, c.reward_weights))
    threads = c.threads or os.cpu_count() or 1
    trainer_threads, generator_threads = split_threads(threads, c.generator_threads) if c.max_staleness else (threads, 0)
    torch.set_num_threads(trainer_threads)
    device = pick_device(c.device)
    distributed.init(device)  # under torchrun: the process group (gloo on CPU, NCCL on CUDA)
    world = distributed.world_size()
    if c.max_staleness and device.type != "cpu":
        raise ConfigError("max_staleness >= 1 (asynchronous rollouts) runs on CPU only so far: on GPUs the generator "
                          "needs devices of its own and a weight transport between them (docs/async.md has the "
                          "design); use max_staleness 0")
    if c.max_staleness and world > 1:
        raise ConfigError("max_staleness >= 1 (asynchronous rollouts) with several ranks is not supported yet: each "
                          "rank would need its own generator fed with the gathered weights (docs/async.md); use "
                          "max_staleness 0 with --nproc, or one process")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(c.model)
    model = (model if model is not None else load_model(c.model, c.dtype, device)).to(device)
    model.train()
    # The KL reference is the policy as it starts: a frozen copy of this model (passed in or
    # loaded). LoRA: the model itself with its adapters off (the Actor), no second copy.
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if c.kl_coef > 0 and not c.lora_rank else None
    peft = None
    if c.lora_rank:
        if world > 1:
            raise ConfigError("lora_rank with several ranks (FSDP2) is not supported yet; train LoRA in one "
                              "process, or full weights with --nproc")
        peft = apply_lora(model, c.lora_rank, c.lora_alpha, c.lora_target_modules)
        ref_model = model if c.kl_coef > 0 else None
    # Every prompt is templated now: one over max_prompt_len fails here, not hours into the run.
    template_warning = reporter.once("system_prompt")
    prompt_ids = [encode_prompt(tokenizer, r["prompt"], c.system_prompt, c.max_prompt_len, template_warning)
                  for r in task.train]
    stop_ids = sorted(stop_token_ids(model, tokenizer))
    # With several ranks the Actor shards the training model (FSDP2); sampling, evaluation and the
    # Hugging Face export use an unsharded copy on each rank, refreshed after every train step
    # (Parts.sync_engine): no collective runs inside generation, whose length differs by rank.
    gen_model = copy.deepcopy(model).requires_grad_(False) if world > 1 else model
    owns_engine = engine is None
    engine = engine if engine is not None else make_engine(c, gen_model, tokenizer.pad_token_id)
    actor = Actor(model, c, tokenizer.pad_token_id, ref_model, warn=reporter.warning)
    scorer = RewardScorer(fns, task.accuracy, accuracy_name=task.accuracy_name, timeout=c.reward_timeout,
                          on_error=c.reward_errors, warn=reporter.warning)
    collector = BatchCollector(c, engine, scorer, PromptSampler(task.train, seed=c.seed), prompt_ids, tokenizer,
                               [rf.weight for rf in fns], stop_ids, reporter)
    if c.max_staleness:
        collector.generator = start_generator(c, gen_model, tokenizer.pad_token_id, trainer_threads, generator_threads)
    # Several ranks: rank 0 evaluates alone, on its unsharded copy.
    evaluator = (Evaluator(c, engine, tokenizer, task.eval, scorer, stop_ids, template_warning)
                 if task.accuracy is not None and task.eval and distributed.rank() == 0 else None)
    return Parts(c, task, fns, tokenizer, model, gen_model, peft, prompt_ids, stop_ids, engine, owns_engine, scorer,
                 collector, actor, evaluator)


def start_generator(c: DAPOConfig, model: torch.nn.Module, pad_id: int, trainer_threads: int,
                    generator_threads: int) -> AsyncGenerator:
    """The generator process of asynchronous rollouts, with the current weights as version 0. With
    as many threads as cores, each side is pinned to its own cores."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pinned = len(cores) == trainer_threads + generator_threads and model.device.type == "cpu"
    generator = AsyncGenerator(c, model, pad_id, generator_threads, c.seed,  # the first round: as in lock-step
                               cores[trainer_threads:] if pinned else None)
    if pinned:
        os.sched_setaffinity(0, cores[:trainer_threads])
        generator.restore_affinity = cores  # Parts.close: this process gets all its cores back
    generator.publish(model, 0)
    on = lambda some: f" on cores {','.join(map(str, some))}" if pinned else ""  # noqa: E731
    generator.description = (f"-- Asynchronous rollouts (max_staleness {c.max_staleness}): generator process "
                             f"{generator.pid} with {generator_threads} thread(s){on(cores[trainer_threads:])}, "
                             f"trainer with {trainer_threads}{on(cores[:trainer_threads])}")
    return generator


def build_evaluation(config: DAPOConfig, reporter: Reporter | None = None) -> Evaluator:
    """`dapo eval`: the config's model (loaded for inference) behind its engine, and the held-out
    set of its task. The caller closes the evaluator's engine and scorer."""
    c, reporter = config, reporter or Reporter()
    torch.manual_seed(c.seed)
    torch.set_num_threads(c.threads or os.cpu_count() or 1)
    task = build_task(c, eval_only=True)
    if task.accuracy is None or not task.eval:
        raise DataError("nothing to evaluate: give --data test.jsonl (with --reward) or a built-in --task")
    tokenizer = load_tokenizer(c.model)
    model = load_model(c.model, c.dtype, pick_device(c.device))
    engine = make_engine(c, model, tokenizer.pad_token_id)  # --rollout-engine vllm evaluates with vLLM
    scorer = RewardScorer([], task.accuracy, accuracy_name=task.accuracy_name, timeout=c.reward_timeout,
                          on_error=c.reward_errors, warn=reporter.warning)
    return Evaluator(c, engine, tokenizer, task.eval, scorer, stop_token_ids(model, tokenizer),
                     reporter.once("system_prompt"))


def evaluate_config(config: DAPOConfig) -> dict[str, float]:
    """`dapo eval`: load the config's model and evaluate it on its task's held-out records."""
    evaluator = build_evaluation(config)
    try:
        return evaluator()
    finally:
        # Closed here, not left to vLLM's finalizer at interpreter exit: by then the CLI's exit path
        # may have torn down the process group vLLM created in this process, and its shutdown raises.
        evaluator.scorer.close()
        evaluator.engine.close()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
