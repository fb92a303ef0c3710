"""Stage: rollouts. Sample G responses per prompt from the current policy.

With `shared_prompt=True` each distinct prompt is prefilled once and its G continuations are
sampled from copies of that single KV cache, so a prompt of P tokens costs P, not G * P, tokens
of prefill. The sampling loop is ours (not `model.generate`) so that it is the same on every
model: temperature and top-p always applied, sampling always on (SmolLM2's generation config
turns it off), EOS handled per row.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class Group:
    """One prompt and its G sampled responses, filled in stage by stage."""

    record: dict[str, Any]                 # dataset row: prompt (text or messages) and other columns
    prompt_ids: list[int]
    response_ids: list[list[int]]          # each ends with EOS unless truncated
    truncated: list[bool]
    completions: list[str] = field(default_factory=list)
    scores: torch.Tensor | None = None     # [G, num_reward_fns] raw reward-function outputs
    task_reward: torch.Tensor | None = None  # [G] weighted task reward (what dynamic sampling filters on)
    reward: torch.Tensor | None = None     # [G] task reward + overlong penalty (what advantages use)
    advantages: torch.Tensor | None = None  # [G]

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.response_ids])


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Samples:
    """The n responses to one prompt."""
    response_ids: list[list[int]]            # each ends with its stop token unless truncated
    truncated: list[bool]                    # True when max_new_tokens was reached without a stop token
    logprobs: list[list[float]] | None = None  # the sampler's log-prob of each response token under the distribution it sampled from (after temperature and top-p); None if unavailable


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Samples]: ...
    def sync_weights(self, model: torch.nn.Module) -> None: ...


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample one token per row from logits [N, V] with temperature and nucleus (top-p) filtering.

    temperature == 0 means greedy decoding.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
) -> list[tuple[list[list[int]], list[bool]]]:
    """Sample `group_size` responses for each prompt.

    Returns one (responses, truncated) pair per prompt; a response keeps its EOS token, and
    `truncated` is True when it reached max_new_tokens without EOS.
    """
    out: list[tuple[list[list[int]], list[bool]]] = []
    per_chunk = max(1, max_rows // group_size)
    for start in range(0, len(prompts), per_chunk):
        out.extend(_generate_chunk(model, prompts[start:start + per_chunk], group_size, max_new_tokens, eos_ids,
                                   pad_id, temperature, top_p, shared_prompt, generator))
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
    done = torch.zeros(n, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), device=device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
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
    eos_list = eos.cpu().tolist()
    for g in range(len(prompts)):
        responses, truncated = [], []
        for row in tokens[g * group_size:(g + 1) * group_size]:
            cut = next((i for i, t in enumerate(row) if t in eos_list), None)
            responses.append(row[:cut + 1] if cut is not None else row)
            truncated.append(cut is None)
        out.append((responses, truncated))
    return out
