"""The benchmark scripts still run against today's API: their training passes on the tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import long_responses
import throughput
from common import synthetic_batch


def test_synthetic_batch_shapes():
    batch = synthetic_batch(3, 4, 10, [1, 2, 3, 4])
    assert (len(batch), batch.num_groups) == (12, 3)
    assert [len(r) for r in batch.response_ids[:5]] == [1, 2, 3, 4, 1]
    assert batch.prompt_ids[0] is batch.prompt_ids[3] and batch.prompt_ids[4] != batch.prompt_ids[0]


def test_benchmark_training_passes_run_and_give_gradients(tiny):
    tiny.train()
    batch = throughput.make_groups(12, 4, 3, num_groups=2)
    throughput.train_pass(tiny, batch, shared=True, budget=64)
    assert tiny.model.embed_tokens.weight.grad is not None
    assert throughput.model_flops(tiny, batch, True) > 0
    tiny.zero_grad()
    assert long_responses.train_step(tiny, long_responses.make_group(8, [5, 6]), "rows", 4) == 11
    assert float(tiny.model.embed_tokens.weight.grad.abs().sum()) > 0
