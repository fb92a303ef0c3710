"""Helpers shared by the benchmark scripts: machine facts, the measured float32 matmul rate, and
synthetic rollout batches."""

from __future__ import annotations

import os
import platform
import time
from datetime import date

import torch


def machine_line() -> str:
    return (f"{date.today()} | {platform.processor() or platform.machine()} | {os.cpu_count()} cores | "
            f"torch {torch.__version__} | {torch.get_num_threads()} threads")


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Measured float32 matmul rate (GFLOP/s) on this machine with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def default_model(lora_rank: int = 0):
    """The default model (SmolLM2-135M-Instruct), with rank-`lora_rank` LoRA adapters on every
    linear layer (alpha 32, the config's default) when asked."""
    from dapo.models import load_model

    model = load_model("default")
    if lora_rank:
        from dapo.lora import apply_lora

        apply_lora(model, lora_rank, 32.0, ["all-linear"])
    return model


def synthetic_batch(num_groups: int, group_size: int, prompt_len: int, response_len: int | list[int],
                    seed: int = 0):
    """A TrainBatch of random prompts and responses with random advantages; `response_len` is one
    length for all, or one per response of a group."""
    from dapo.batch import TrainBatch

    g = torch.Generator().manual_seed(seed)
    rows = num_groups * group_size
    lens = [response_len] * group_size if isinstance(response_len, int) else list(response_len)
    prompts = [torch.randint(100, 40000, (prompt_len,), generator=g).tolist() for _ in range(num_groups)]
    group = torch.arange(num_groups).repeat_interleave(group_size)
    return TrainBatch(
        group=group, prompt_index=group.clone(), prompt_ids=[prompts[r // group_size] for r in range(rows)],
        response_ids=[torch.randint(100, 40000, (lens[r % group_size],), generator=g).tolist() for r in range(rows)],
        truncated=torch.zeros(rows, dtype=torch.bool), completions=[""] * rows, scores=torch.zeros(rows, 1),
        task_rewards=torch.zeros(rows), rewards=torch.zeros(rows), advantages=torch.randn(rows, generator=g))
