"""Rollout engines: the base class every sampler implements, and the registry that picks one by
name (`config.rollout_engine`).

An engine turns prompt token ids into n sampled responses per prompt, with the log-probs it
sampled them with, and follows the trainer's weights (`sync_weights`, after every train step).
The trainer, the batch collector and `dapo eval` see only `RolloutEngine`; the defaults of
`close`, `state_dict` and `load_state_dict` mean none of them asks what an engine can do.

The registry holds import strings, so an engine's module (and its optional dependency: vLLM)
is imported only when a config names it; a missing dependency stays the engine's own clear error.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dapo.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

    from dapo.config import DAPOConfig

# name -> "module:Class"; each class implements RolloutEngine.from_config.
ENGINES: dict[str, str] = {
    "hf": "dapo.rollout:HFEngine",            # ours: samples from the training model itself
    "vllm": "dapo.vllm_engine:VLLMEngine",    # an in-process vLLM engine, weights synced in place
}


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Samples:
    """The n responses to one prompt."""

    response_ids: list[list[int]]              # each ends with its stop token unless truncated
    truncated: list[bool]                      # True when max_new_tokens was reached without a stop token
    logprobs: list[list[float]] | None = None  # the engine's log-prob of each response token under the
    #                                            distribution it sampled from (after temperature and top-p)


class RolloutEngine:
    """What the trainer needs from a sampler. Subclasses implement `generate` and `sync_weights`,
    and `from_config` when the registry builds them."""

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Samples]:
        raise NotImplementedError

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (called after every train step)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine holds (a KV cache, worker processes); idempotent."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to sample as this one would have (e.g. a request counter)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise CheckpointError(f"the checkpoint holds rollout-engine state {sorted(state)}, which "
                                  f"{type(self).__name__} does not keep")

    @classmethod
    def from_config(cls, config: DAPOConfig, model: torch.nn.Module, pad_id: int) -> RolloutEngine:
        """The engine `config` describes, sampling from `model`'s current weights."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a config; pass it as engine=...")


def engine_class(name: str) -> type[RolloutEngine]:
    """The class registered as `name`, imported now."""
    if name not in ENGINES:
        raise ConfigError(f"unknown rollout engine {name!r}; known: {', '.join(ENGINES)}")
    module, _, attr = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def make_engine(config: DAPOConfig, model: torch.nn.Module, pad_id: int) -> RolloutEngine:
    """The engine `config.rollout_engine` names, sampling from `model`'s current weights."""
    return engine_class(config.rollout_engine).from_config(config, model, pad_id)
