"""LoRA (Hu et al. 2021) through `peft`: train low-rank adapters, keep the base weights frozen.

With `lora_rank > 0` the trainer wraps its model with `peft.get_peft_model`; peft injects the
adapter layers into the Hugging Face model *in place*, so the training model stays the same
object (the Actor, the rollout engines and the packed forward need no branch) and only the
adapter parameters require gradients. The pieces the rest of dapo needs:

- `merged_state_dict`: the weights with every adapter folded in (W + B A * alpha / r), under the
  plain Hugging Face names, computed without touching the model (peft's in-place merge and
  unmerge round the base weights, which would break exact resume). Checkpoints export it as the
  model directory that `from_pretrained`, `dapo eval` and vLLM load; vLLM's weight sync sends it.
- `save_adapter` / `load_adapter`: RUN_DIR/checkpoints/step-N/adapter/ in PEFT's own format
  (`PeftModel.from_pretrained(base, ".../adapter")` loads it); resume reads the adapter back
  into the live parameters, in place, so the optimizer keeps them.
- `adapters_disabled`: the base model, for the KL reference: no second copy of the weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dapo.errors import CheckpointError, ConfigError

ADAPTER_DIR = "adapter"            # inside a checkpoint
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER = "default"               # peft's name of the one adapter we train


def apply_lora(model: torch.nn.Module, rank: int, alpha: float, target_modules: list[str]) -> Any:
    """Inject LoRA adapters into `model` (in place) and freeze everything else; returns the
    `peft.PeftModel` around it (kept for saving the adapter in PEFT's format).

    Dropout is 0: the ratio pi_theta / pi_old of the first optimizer step must be exactly 1, and
    sampling (eval mode) and training (train mode) must see the same function.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("lora_rank > 0 needs peft: pip install 'dapo-rl[lora]'") from None
    if "lm_head" in target_modules and getattr(model.config, "tie_word_embeddings", False):
        # the merged head would differ from the embedding it is tied to, and the export would lose it
        raise ConfigError("lora_target_modules: lm_head is tied to the input embeddings in this model; leave it out")
    targets: str | list[str] = target_modules[0] if target_modules == ["all-linear"] else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as e:  # peft's message names the target modules it could not find
        raise ConfigError(f"lora_target_modules {target_modules}: {str(e).splitlines()[0]}") from None
    assert peft_model.base_model.model is model  # injected in place: callers keep using `model`
    return peft_model


def lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    """(module name, peft LoRA layer) for every adapted layer of `model`."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def has_lora(model: torch.nn.Module) -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return next(lora_layers(model), None) is not None


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model: every LoRA layer computes its frozen base layer alone inside the block."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights under plain Hugging Face names with the adapters folded in:
    W' = W + (alpha / r) B A for every adapted layer (peft's `get_delta_weight`), every other
    tensor as it is. The model is not modified."""
    state = model.state_dict()
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        merged[name.replace(".base_layer.", ".")] = tensor.detach()
    for name, layer in lora_layers(model):
        if _ADAPTER not in getattr(layer, "lora_A", {}):
            continue
        key = f"{name}.weight"
        base = state[f"{name}.base_layer.weight"]
        merged[key] = base + layer.get_delta_weight(_ADAPTER).to(base.dtype)
    return merged


def save_merged(model: torch.nn.Module, directory: Path) -> None:
    """A Hugging Face model directory of the merged weights (loadable without peft)."""
    model.save_pretrained(directory, state_dict=merged_state_dict(model), safe_serialization=True)


def save_adapter(peft_model: Any, directory: Path) -> None:
    """adapter_config.json and adapter_model.safetensors (PEFT's format)."""
    peft_model.save_pretrained(directory, safe_serialization=True)


def load_adapter(peft_model: Any, directory: Path) -> None:
    """Copy the adapter saved in `directory` into `peft_model`'s live parameters (in place)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this checkpoint holds no LoRA adapter to resume from")
    weights = load_file(str(path))
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    loaded = {k for k in peft_model.state_dict() if ".lora_" in k}
    missing = [k for k in getattr(result, "missing_keys", []) or [] if k in loaded]
    if unexpected or missing:
        raise CheckpointError(f"the adapter in {directory} does not fit this model (rank, alpha or target modules "
                              f"differ): {len(missing)} adapter tensors missing, {len(unexpected)} unexpected")
