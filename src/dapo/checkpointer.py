"""Stage: checkpoints of a run. The `Checkpointer` decides what a checkpoint holds and restores
all of it, so that a resumed run continues exactly as if it had never stopped; checkpoint.py is
the on-disk format (atomic, checksummed directories), resume.py the RNG and log helpers.

trainer_state.pt (version 3) nests each part's state under its name, and each part checks its
own keys when it loads them:

    {"version": 3, "step": N, "world_size": W, "rng": {...},
     "actor": {optimizer, scheduler, counters}, "collector": {prompts, buffer, refill},
     "engine": {...}}      # e.g. vLLM's request counter; {} for the hf engine

A version-2 state (flat keys, written before 2026-12-05) is upgraded on load.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from dapo import distributed
from dapo.build import Parts
from dapo.checkpoint import (RNG_DIR, SHARDED_DIR, checkpoint_dir, latest_checkpoint, load_sharded_state,
                             load_trainer_state, quiet_progress_bars, remove_stale_tmp, save_checkpoint,
                             save_sharded_checkpoint)
from dapo.config import DAPOConfig
from dapo.errors import CheckpointError, ResumeError
from dapo.lora import ADAPTER_DIR, load_adapter
from dapo.models import load_model
from dapo.reporting import Reporter
from dapo.resume import capture_rng, check_resumable, restore_rng, truncate_jsonl

STATE_VERSION = 3


class Checkpointer:
    def __init__(self, run_dir: Path, parts: Parts, reporter: Reporter) -> None:
        self.run_dir, self.parts, self.reporter = Path(run_dir), parts, reporter
        self.world, self.rank = distributed.world_size(), distributed.rank()

    # --- saving ---------------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        """Everything besides the weights that decides the rest of the run, as plain containers
        and tensors (readable with torch.load(weights_only=True))."""
        p = self.parts
        actor = p.actor.state_dict()
        if self.world > 1:  # the optimizer's shards go to dcp/ (save_sharded_checkpoint)
            actor["optimizer"] = f"sharded: {SHARDED_DIR}/"
        return {"version": STATE_VERSION, "step": step, "world_size": self.world, "rng": capture_rng(),
                "actor": actor, "collector": p.collector.state_dict(), "engine": p.engine.state_dict()}

    def save(self, step: int) -> Path:
        p, c = self.parts, self.parts.config
        if self.world > 1:  # every rank: sharded model/optimizer (DCP) and its RNG; rank 0 the rest
            return save_sharded_checkpoint(self.run_dir, step, p.model, p.actor.optimizer, p.gen_model, p.tokenizer,
                                           c, self.state_dict(step), capture_rng(), keep_last=c.keep_last)
        return save_checkpoint(self.run_dir, step, p.model, p.tokenizer, c, trainer_state=self.state_dict(step),
                               keep_last=c.keep_last, adapter=p.peft)

    def save_if_new(self, step: int) -> None:
        """Save `step` unless it is already the newest checkpoint (every rank calls this)."""
        latest = latest_checkpoint(self.run_dir) if self.rank == 0 else None
        if distributed.broadcast_object(latest) != checkpoint_dir(self.run_dir, step):
            self.save(step)

    # --- resuming -------------------------------------------------------------------------------
    def restore(self, checkpoint: Path, check: bool = True) -> int:
        """Load weights and trainer state from `checkpoint` into the parts; returns its step.
        `check`: refuse a config that changes the run (False: the caller already did)."""
        checkpoint = Path(checkpoint)
        p, c = self.parts, self.parts.config
        saved = DAPOConfig.from_saved(checkpoint / "dapo_config.yaml")
        if check:
            check_resumable(saved, c)
        state = upgrade(load_trainer_state(checkpoint))
        if state["step"] >= c.train_steps:
            raise ResumeError(f"the run in {self.run_dir} already reached step {state['step']} (train_steps="
                              f"{c.train_steps}); pass --train-steps N with N > {state['step']} to train further")
        if c.train_steps != saved.train_steps and c.lr_schedule != "constant":
            self.reporter.warning(f"dapo: warning: train_steps changed from {saved.train_steps} to {c.train_steps}; "
                                  f"the {c.lr_schedule} learning-rate schedule is stretched to the new length from "
                                  "here on")
        self._load_weights(checkpoint, state["actor"])
        p.sync_engine(int(state["step"]))
        p.collector.load_state_dict(state["collector"])
        p.engine.load_state_dict(state["engine"])
        saved_world = int(state["world_size"])
        self._restore_rng(checkpoint, state, saved_world)
        if self.rank == 0:
            remove_stale_tmp(self.run_dir)
            for log in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
                truncate_jsonl(self.run_dir / log, state["step"])
        distributed.barrier()
        if saved_world != self.world:
            self.reporter.warning(
                f"dapo: resuming a checkpoint of {saved_world} rank{'s' if saved_world > 1 else ''} with {self.world}: "
                "model and optimizer resharded; each rank's RNG reseeded from rank 0's saved state, so the samples "
                f"differ from a run that kept {saved_world} rank{'s' if saved_world > 1 else ''}")
        return state["step"]

    def _load_weights(self, checkpoint: Path, actor_state: dict[str, Any]) -> None:
        """The weights and optimizer state, from whichever form the checkpoint holds them in."""
        p = self.parts
        if (checkpoint / SHARDED_DIR).is_dir():  # written by several ranks: resharded to this world size
            load_sharded_state(checkpoint, p.model, p.actor.optimizer)
            p.actor.load_state_dict(actor_state, optimizer=False)
            return
        if p.peft is not None:  # the base weights are the config's model; the adapter is the run's
            load_adapter(p.peft, checkpoint / ADAPTER_DIR)
            p.actor.load_state_dict(actor_state)
            return
        with quiet_progress_bars():
            weights = load_model(str(checkpoint), p.config.dtype, "cpu")  # no second copy on the GPU
        if self.world > 1:
            self._load_single_process_state(weights.state_dict(), actor_state["optimizer"])
            p.actor.load_state_dict(actor_state, optimizer=False)
        else:
            with torch.no_grad():
                p.model.load_state_dict(weights.state_dict())  # in place: the optimizer keeps its parameters
            p.actor.load_state_dict(actor_state)

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

        p = self.parts
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(p.model, weights, options=full)
        # The unsharded copy has the same parameters in the same order: read the optimizer state
        # there, keyed by parameter name, then shard it.
        plain = torch.optim.AdamW(p.gen_model.parameters(), lr=p.config.lr)
        plain.load_state_dict(optimizer)
        set_optimizer_state_dict(p.model, p.actor.optimizer, get_optimizer_state_dict(p.gen_model, plain), options=full)


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A trainer state of any version this dapo reads, as version 3."""
    if state.get("version") == STATE_VERSION:
        return state
    if state.get("version") != 2:
        raise CheckpointError(f"trainer state version {state.get('version')!r} is not one this dapo reads")
    renamed = {"sampler_logprobs": "engine_logprobs"}  # the engine's log-probs were called the sampler's
    return {
        "version": STATE_VERSION, "step": state["step"], "world_size": int(state.get("world_size", 1)),
        "rng": state["rng"],
        "actor": {k: state[k] for k in ("optimizer", "scheduler", "optimizer_steps", "skipped_steps",
                                        "bad_steps_in_row")},
        "collector": {"prompts": state["sampler"], "refill": state["refill"],
                      "buffer": [{renamed.get(k, k): v for k, v in g.items()} for g in state["buffer"]]},
        "engine": {"calls": int(state["engine_calls"])} if state.get("engine_calls") else {},
    }


def generation_seed(seed: int, rank: int) -> int:
    """Rank `rank`'s torch seed in a run of several ranks (rank 0 keeps `seed`)."""
    return seed + 1_000_003 * rank
