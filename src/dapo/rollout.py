"""Stage: rollouts. Sample G responses per prompt from the current policy.

A `RolloutEngine` (engines.py: the base class and the registry) turns prompt token ids into
sampled responses; the trainer, the batch collector and `dapo eval` see only that base class, so
another sampler (vLLM) plugs in without a branch in the loop. `HFEngine` is ours: it samples from
the training model itself.

With `shared_prompt=True` each distinct prompt is prefilled once and its G continuations are
sampled from copies of that single KV cache, so a prompt of P tokens costs P, not G * P, tokens
of prefill. The sampling loop is ours (not `model.generate`) so that it is the same on every
model: temperature and top-p always applied, sampling always on (SmolLM2's generation config
turns it off), EOS handled per row. For the Llama family it runs decode.py's forward over a static
KV cache, and a row leaves the batch when it samples a stop token; other models (and FSDP-sharded
ones) take the generic loop over transformers' DynamicCache, where every row runs to the end.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

import torch

from dapo.decode import Decoder, StaticKVCache, unsupported_reason
from dapo.engines import RolloutEngine, Samples, SamplingParams

if TYPE_CHECKING:
    from dapo.config import DAPOConfig

# Decode steps after which a call packs the weights for MKL (decode.Decoder.pack): packing costs
# about as much as 15 steps save, so short answers (a digit, a number) never pay for it.
PACK_AFTER_STEPS = 16

__all__ = ["HFEngine", "RolloutEngine", "Samples", "SamplingParams", "generate", "sample_next"]


class HFEngine(RolloutEngine):
    """Samples from the training model itself: colocated, the same weights, so syncing is free."""

    def __init__(self, model: torch.nn.Module, pad_id: int, shared_prompt: bool = True, max_rows: int = 256) -> None:
        self.model, self.pad_id, self.shared_prompt, self.max_rows = model, pad_id, shared_prompt, max_rows
        self.decoder = Decoder(model)  # keeps packed weights between calls while the weights stay the same

    @classmethod
    def from_config(cls, config: DAPOConfig, model: torch.nn.Module, pad_id: int) -> HFEngine:
        return cls(model, pad_id, config.shared_prompt)

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Samples]:
        return generate(self.model, prompt_ids, n, sampling.max_new_tokens, set(sampling.stop_token_ids), self.pad_id,
                        sampling.temperature, sampling.top_p, shared_prompt=self.shared_prompt, max_rows=self.max_rows,
                        decoder=self.decoder)

    def sync_weights(self, model: torch.nn.Module) -> None:
        if model is not self.model:
            self.model, self.decoder = model, Decoder(model)

    def close(self) -> None:
        self.decoder = Decoder(self.model)  # drops the packed weights


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
    if top_p >= 1.0:
        tokens = _draw(probs, generator)
        chosen = probs.gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, torch.log(chosen / probs.sum(-1))
    top, index = _nucleus(probs, top_p)
    pick = _draw(top, generator)
    chosen = top.gather(-1, pick[:, None]).squeeze(-1)
    return index.gather(-1, pick[:, None]).squeeze(-1), torch.log(chosen / top.sum(-1))


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest prefix of each row's tokens, by falling probability, whose mass reaches top_p
    (the first token always stays): (probs [N, k] with the tokens past it zeroed, their token ids).
    Why topk rather than a sort: a nucleus is a few hundred tokens, and sorting 49k per row per step
    cost more than the model's forward; k grows until every row's nucleus fits."""
    k = min(probs.shape[-1], 256)
    while True:
        top, index = probs.topk(k, dim=-1)
        if k == probs.shape[-1] or bool((top.sum(-1) >= top_p).all()):
            break
        k = min(probs.shape[-1], k * 8)
    return top.masked_fill(top.cumsum(dim=-1) - top >= top_p, 0.0), index


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of probs [N, K] (non-negative, not necessarily normalised), by inverse CDF:
    one uniform per row. Why not torch.multinomial: it draws K exponentials per row, which at a
    49k vocabulary cost half as much as the model's forward at 32 rows (the sampler before 2026-12
    used it, so the same seed now gives other, equally distributed, samples)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype) * total
    index = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    # u rounds up to the total once in ~1e7 draws: take the last token with mass, not one past the end.
    return torch.minimum(index, (cdf < total).sum(-1))


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
    static_cache: bool | None = None,
    decoder: Decoder | None = None,
) -> list[Samples]:
    """Sample `group_size` responses for each prompt.

    Returns one `Samples` per prompt; a response keeps its EOS token, and `truncated` is True
    when it reached max_new_tokens without EOS. At most `max_rows` rows are sampled at once.
    `static_cache`: None uses decode.py's static-cache loop where it covers the model (the Llama
    family), True insists on it, False takes the generic DynamicCache loop (the sampler before
    2026-12; kept for other models and as the benchmark's baseline). `decoder`: the static-cache
    forward to use (an engine keeps one, so its packed weights outlive the call).
    """
    out: list[Samples] = []
    per_chunk = max(1, max_rows // group_size)
    reason = unsupported_reason(model) if static_cache is not False else "static_cache=False"
    if static_cache and reason:
        raise ValueError(f"the static-cache sampler cannot run this model: {reason}")
    if reason:
        chunk = _generate_chunk_dynamic
    else:
        decoder = Decoder(model) if decoder is None or decoder.model is not model else decoder
        decoder.drop_stale()
        chunk = functools.partial(_generate_chunk, decoder=decoder)
    # Sampling runs in eval mode: before transformers 5.24 a model in train mode with gradient
    # checkpointing on returns no KV cache (even under no_grad), and dropout must be off anyway.
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), per_chunk):
            out.extend(chunk(model, prompts[start:start + per_chunk], group_size, max_new_tokens, eos_ids,
                             pad_id, temperature, top_p, shared_prompt, generator))
    finally:
        model.train(was_training)
    return out


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and mask [len(rows), longest]: left padding puts every row's last prompt token in the
    same column, so one forward samples every row's first token."""
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _to_samples(tokens: list[list[int]], logps: list[list[float]], n_prompts: int, group_size: int,
                eos: set[int]) -> list[Samples]:
    out = []
    for g in range(n_prompts):
        samples = Samples([], [], [])
        for i in range(g * group_size, (g + 1) * group_size):
            row = tokens[i]
            cut = next((j for j, t in enumerate(row) if t in eos), None)
            end = cut + 1 if cut is not None else len(row)
            samples.response_ids.append(row[:end])
            samples.logprobs.append(logps[i][:end])
            samples.truncated.append(cut is None)
        out.append(samples)
    return out


def _generate_chunk(model, prompts, group_size, max_new_tokens, eos_ids, pad_id, temperature, top_p,
                    shared_prompt, generator, decoder):
    """The static-cache loop (decode.py): one cache allocated for the chunk, written in place;
    a row leaves the batch when it samples a stop token."""
    device = next(model.parameters()).device
    rows = prompts if shared_prompt else [p for p in prompts for _ in range(group_size)]
    ids, mask = (t.to(device) for t in _left_pad(rows, pad_id))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = StaticKVCache.for_model(model, len(rows), ids.shape[1] + max_new_tokens)
    logits = decoder.forward(ids, positions, mask.bool(), cache)
    next_pos = positions[:, -1] + 1
    if shared_prompt:  # the prompt's cache, copied to its G samples
        expand = torch.arange(len(rows), device=device).repeat_interleave(group_size)
        cache.select_rows(expand)
        logits, next_pos = logits[expand], next_pos[expand]
    n = logits.shape[0]
    tokens = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)
    active = torch.arange(n, device=device)  # original row of each row still sampling
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        nxt, lp = sample_next(logits, temperature, top_p, generator)
        tokens[active, step], logps[active, step] = nxt, lp.float()
        if step == max_new_tokens - 1:
            break
        going = ~torch.isin(nxt, eos)
        if not bool(going.all()):
            if not bool(going.any()):
                break
            keep = going.nonzero().squeeze(-1)
            cache.select_rows(keep)
            active, nxt, next_pos = active[keep], nxt[keep], next_pos[keep]
        if step + 1 == PACK_AFTER_STEPS:
            decoder.pack()
        logits = decoder.forward(nxt[:, None], next_pos[:, None], torch.ones_like(nxt[:, None], dtype=torch.bool), cache)
        next_pos = next_pos + 1
    return _to_samples(tokens.cpu().tolist(), logps.cpu().tolist(), len(prompts), group_size, eos_ids)


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers 5.x renamed `past_key_values` to `cache`; accept both generations.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(result: Any) -> Any:
    cache = getattr(result, "cache", None)
    return cache if cache is not None else result.past_key_values


def _generate_chunk_dynamic(model, prompts, group_size, max_new_tokens, eos_ids, pad_id, temperature, top_p,
                            shared_prompt, generator):
    """The generic loop, for models decode.py does not cover: the model's own forward with a
    transformers DynamicCache, every row computed to the end."""
    device = next(model.parameters()).device
    rows = prompts if shared_prompt else [p for p in prompts for _ in range(group_size)]
    ids, mask = (t.to(device) for t in _left_pad(rows, pad_id))
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
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
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
    return _to_samples(tokens.cpu().tolist(), logps.cpu().tolist(), len(prompts), group_size, eos_ids)
