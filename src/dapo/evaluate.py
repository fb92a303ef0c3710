"""Evaluation: avg@k and pass@k over k sampled answers per held-out prompt."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from dapo.data import Record, encode_prompt
from dapo.rewards import RewardFn
from dapo.rollout import generate


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021): 1 - C(n - c, k) / C(n, k) for n samples of
    which c are correct."""
    if k > n:
        raise ValueError(f"pass@k needs k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Record],
    accuracy: RewardFn,
    *,
    k: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 4,
    max_prompt_len: int = 1024,
    system_prompt: str | None = None,
    prompt_key: str = "prompt",
) -> dict[str, float]:
    """Sample k answers per record and score them with `accuracy` (1.0 = correct).

    Returns avg@k (mean correctness over all samples), pass@k (share of prompts with at least one
    correct sample; with n = k samples the unbiased estimator reduces to that), and the mean
    response length in tokens. Greedy decoding (temperature 0) samples once per prompt.
    """
    was_training = model.training
    model.eval()
    k = 1 if temperature == 0 else k
    eos = {tokenizer.eos_token_id}
    prompts = [encode_prompt(tokenizer, r[prompt_key], system_prompt, max_prompt_len) for r in records]
    outs = generate(model, prompts, k, max_new_tokens, eos, tokenizer.pad_token_id, temperature, top_p)
    correct_per_prompt, lengths = [], []
    for record, (responses, _) in zip(records, outs):
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        columns = {key: [v] * len(texts) for key, v in record.items() if key != prompt_key}
        scores = accuracy(prompts=[record[prompt_key]] * len(texts), completions=texts, **columns)
        correct_per_prompt.append(sum(float(s) >= 1.0 for s in scores))
        lengths.extend(len(r) for r in responses)
    model.train(was_training)
    n = len(records)
    return {
        f"avg@{k}": sum(correct_per_prompt) / (n * k),
        f"pass@{k}": sum(pass_at_k(k, c, k) for c in correct_per_prompt) / n,
        "response_length": sum(lengths) / len(lengths),
        "num_prompts": float(n),
    }
