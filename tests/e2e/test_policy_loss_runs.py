"""Every policy loss and rollout correction trains end to end on the arithmetic task (tiny model):
two train steps through the Trainer, the loss's own metrics in metrics.jsonl, the weights moved."""

from __future__ import annotations

import math

import pytest
import torch

from dapo import DAPOConfig
from dapo.loss import POLICY_LOSSES
from dapo.rewards import numeric_reward
from dapo.trainer import Trainer

PRESETS = {"gspo": {"eps_low": 3e-4, "eps_high": 4e-4, "loss_agg": "seq-mean-token-mean"},
           "cispo": {"eps_low": 10.0, "eps_high": 0.2}, "geo_mean": {"eps_low": 0.4, "eps_high": 0.4},
           "clip_cov": {"clip_cov_ratio": 0.1, "clip_cov_lb": 0.0}, "kl_cov": {"kl_cov_ratio": 0.1}}


def length_mod_3(completions, **_):
    """A random tiny model never adds numbers correctly: this gives its groups a learning signal."""
    return [float(len(c if isinstance(c, str) else c[0]["content"]) % 3) for c in completions]


def run(tmp_path, tiny, tokenizer, **changes):
    config = DAPOConfig(task="arithmetic", group_size=4, max_new_tokens=4, train_batch_size=2, gen_batch_size=2,
                        mini_batch_size=1, mu=2, lr=1e-3, train_steps=2, dynamic_sampling=False, threads=1,
                        verbose=False, eval_samples=2, max_eval_prompts=2, output_dir=str(tmp_path), **changes)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    result = Trainer(config, model=tiny, tokenizer=tokenizer, reward_fns=[numeric_reward, length_mod_3]).fit()
    moved = any(not torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    return result, moved


@pytest.mark.parametrize("loss", sorted(POLICY_LOSSES))
def test_each_policy_loss_trains_on_the_arithmetic_task(loss, tmp_path, tiny, tokenizer):
    result, moved = run(tmp_path, tiny, tokenizer, policy_loss=loss, **PRESETS.get(loss, {}))
    assert moved and [row["step"] for row in result.metrics] == [1, 2]
    for row in result.metrics:
        assert math.isfinite(row["objective"]) and math.isfinite(row["grad_norm"])
        assert ("cov_selected" in row) == (loss in ("clip_cov", "kl_cov"))
    if loss in ("clip_cov", "kl_cov"):
        assert all(row["cov_selected"] > 0 for row in result.metrics)


@pytest.mark.parametrize("correction", ["tis", "seq_tis", "mask", "seq_mis"])
def test_each_rollout_correction_trains_and_reports(correction, tmp_path, tiny, tokenizer):
    """With the hf engine the engine's and the trainer's log-probs agree to ~1e-6: nothing is
    capped or masked, and the weights are ~1."""
    result, moved = run(tmp_path, tiny, tokenizer, rollout_correction=correction, old_logprobs="recompute")
    assert moved
    for row in result.metrics:
        assert row["rollout_masked"] == 0.0 and row["rollout_is_capped"] == 0.0
        assert row["rollout_is_weight"] == pytest.approx(1.0, abs=1e-3)
