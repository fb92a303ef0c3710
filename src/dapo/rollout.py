"""Stage: rollouts. Sample G responses per prompt from the current policy.

A `RolloutEngine` (engines.py: the base class and the registry) turns prompt token ids into
sampled responses; the trainer, the batch collector and `dapo eval` see only that base class, so
another sampler (vLLM) plugs in without a branch in the loop. `HFEngine` is ours: it samples from
the training model itself.

With `shared_prompt=True` each distinct prompt is prefilled once and its G continuations are
sampled from copies of that single KV cache, so a prompt of P tokens costs P, not G * P, tokens
of prefill. The sampling loop is ours (not `model.generate`) so that it is the same on every
model: temperature and top-p always applied, sampling always on (SmolLM2's generation config
turns it off), EOS handled per row.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from dapo.engines import RolloutEngine, Samples, SamplingParams

if TYPE_CHECKING:
    from dapo.config import DAPOConfig

__all__ = ["HFEngine", "RolloutEngine", "Samples", "SamplingParams", "generate", "sample_next"]


class HFEngine(RolloutEngine):
    """Samples from the training model itself: colocated, the same weights, so syncing is free."""

    def __init__(self, model: torch.nn.Module, pad_id: int, shared_prompt: bool = True, max_rows: int = 256) -> None:
        self.model, self.pad_id, self.shared_prompt, self.max_rows = model, pad_id, shared_prompt, max_rows

    @classmethod
    def from_config(cls, config: DAPOConfig, model: torch.nn.Module, pad_id: int) -> HFEngine:
        return cls(model, pad_id, config.shared_prompt)

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Samples]:
        return generate(self.model, prompt_ids, n, sampling.max_new_tokens, set(sampling.stop_token_ids), self.pad_id,
                        sampling.temperature, sampling.top_p, shared_prompt=self.shared_prompt, max_rows=self.max_rows)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from logits [N, V] with temperature and nucleus (top-p) filtering.

    Returns (tokens [N], their log-probs [N] under the distribution sampled from, i.e. after
    temperature and top-p renormalisation). temperature == 0 means greedy decoding (log-prob 0).
    """
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    chosen = probs.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, torch.log(chosen / probs.sum(-1))


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    group_size: int,
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    shared_prompt: bool = True,
    max_rows: int = 256,
    generator: torch.Generator | None = None,
) -> list[Samples]:
    """Sample `group_size` responses for each prompt.

    Returns one `Samples` per prompt; a response keeps its EOS token, and `truncated` is True
    when it reached max_new_tokens without EOS.
    """
    out: list[Samples] = []
    per_chunk = max(1, max_rows // group_size)
    # Sampling runs in eval mode: before transformers 5.24 a model in train mode with gradient
    # checkpointing on returns no KV cache (even under no_grad), and dropout must be off anyway.
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), per_chunk):
            out.extend(_generate_chunk(model, prompts[start:start + per_chunk], group_size, max_new_tokens, eos_ids,
                                       pad_id, temperature, top_p, shared_prompt, generator))
    finally:
        model.train(was_training)
    return out


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers 5.x renamed `past_key_values` to `cache`; accept both generations.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(result: Any) -> Any:
    cache = getattr(result, "cache", None)
    return cache if cache is not None else result.past_key_values


def _generate_chunk(model, prompts, group_size, max_new_tokens, eos_ids, pad_id, temperature, top_p,
                    shared_prompt, generator):
    device = next(model.parameters()).device
    rows = prompts if shared_prompt else [p for p in prompts for _ in range(group_size)]
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(rows):  # left padding: every row's last prompt token sits at the same column
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, logits = _cache_of(result), result.logits[:, -1]
    if shared_prompt:
        cache.batch_repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)
        mask = mask.repeat_interleave(group_size, dim=0)
        positions = positions.repeat_interleave(group_size, dim=0)
    n = logits.shape[0]
    next_pos = positions[:, -1:] + 1
    tokens = torch.empty((n, 0), dtype=torch.long, device=device)
    logps = torch.empty((n, 0), dtype=torch.float32, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), device=device)
    for step in range(max_new_tokens):
        nxt, lp = sample_next(logits, temperature, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        logps = torch.cat([logps, lp.float()[:, None]], dim=1)
        done = done | torch.isin(nxt, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        result = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos,
                       use_cache=True, **{_cache_kwarg(model): cache})
        cache, logits = _cache_of(result), result.logits[:, -1]
        next_pos = next_pos + 1

    out = []
    tokens = tokens.cpu().tolist()
    logps = logps.cpu().tolist()
    eos_list = eos.cpu().tolist()
    for g in range(len(prompts)):
        rows = range(g * group_size, (g + 1) * group_size)
        samples = Samples([], [], [])
        for row, lp in zip((tokens[i] for i in rows), (logps[i] for i in rows)):
            cut = next((i for i, t in enumerate(row) if t in eos_list), None)
            end = cut + 1 if cut is not None else len(row)
            samples.response_ids.append(row[:end])
            samples.logprobs.append(lp[:end])
            samples.truncated.append(cut is None)
        out.append(samples)
    return out
