"""Train-inference mismatch: the correction weights and masks by hand, and the HF engine's own
log-probs matching the trainer's (mismatch ~0), logged every step."""

from __future__ import annotations

import math

import pytest
import torch

from dapo import DAPOConfig
from dapo.loss import mismatch_stats, policy_loss, rollout_is_weights
from dapo.tasks import Task
from dapo.trainer import Trainer


def test_truncated_importance_weights_by_hand():
    old = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, 9.0]])
    sampler = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -3.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the last column is padding
    w, m = rollout_is_weights(old, sampler, mask, "tis", cap=2.0)
    # exp(old - sampler): e^0.5 = 1.649, e^-1 = 0.368, padding 1; e^0 = 1, e^2.5 capped at 2
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0], [1.0, 2.0, 1.0]]))
    assert torch.equal(m, mask)
    # the weights multiply each token's objective: with ratio 1 and A = 1 the loss is -mean(w)
    loss, _ = policy_loss(old, old, torch.ones(2), mask, is_weights=w)
    assert float(loss) == pytest.approx(-(math.exp(0.5) + math.exp(-1.0) + 1.0 + 2.0) / 4)


def test_sequence_masking_by_hand():
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    sampler = torch.tensor([[-1.5, -1.5], [-1.0, -1.2]])  # sequence ratios e^1.0 = 2.72 and e^0.2 = 1.22
    mask = torch.ones(2, 2)
    w, m = rollout_is_weights(old, sampler, mask, "mask", mask_ratio=2.5)
    assert w is None and m.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert rollout_is_weights(old, sampler, mask, "none") == (None, mask)


def test_mismatch_stats_by_hand():
    trainer = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    sampler = torch.tensor([[-1.0, -1.5], [-0.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    out = mismatch_stats(trainer, sampler, mask)
    d = -0.5  # the one token that differs: k3 = e^d - d - 1
    assert float(out["mismatch_kl"]) == pytest.approx((math.exp(d) - d - 1) / 3)
    assert float(out["mismatch_max_abs"]) == pytest.approx(0.5)


def test_hf_engine_mismatch_is_float_noise_and_logged(tokenizer, tiny, tmp_path):
    task = Task("say", [{"prompt": "Say a word."}], [],
                {"len3": lambda prompts, completions, **_: [float(len(c) % 3) for c in completions]})
    config = DAPOConfig(group_size=8, max_new_tokens=4, train_steps=1, mu=1, dynamic_sampling=False, threads=1,
                        temperature=0.7, top_p=0.9, verbose=False, output_dir=str(tmp_path))
    row = Trainer(config, task=task, model=tiny, tokenizer=tokenizer).fit().metrics[0]
    assert config.correction == "none" and DAPOConfig(rollout_engine="vllm").correction == "tis"
    # top-p renormalisation happens in the sampler only, so only tokens kept by it are compared:
    # the sampler's log-prob is >= the trainer's (same logits, mass renormalised over the nucleus)
    assert 0.0 <= row["mismatch_kl"] < 0.05 and row["mismatch_max_abs"] < math.log(1 / 0.9) + 1e-4
    config = config.replace(top_p=1.0, output_dir=str(tmp_path / "p1"))
    row = Trainer(config, task=task, model=tiny, tokenizer=tokenizer).fit().metrics[0]
    assert row["mismatch_kl"] < 1e-9 and row["mismatch_max_abs"] < 1e-4  # same distribution, other kernels
