"""Assembly (build.py): the parts a config describes, and the parts passed in instead."""

from __future__ import annotations

import torch

from dapo import DAPOConfig
from dapo.build import build
from dapo.reporting import Reporter
from toy_run import tiny_model, toy_task


def test_kl_reference_is_a_frozen_copy_of_the_model_passed_in(tiny_dir, tokenizer):
    """With kl_coef > 0 and dapo.train(model=...), the reference is the model passed in as it was
    at the start, not the weights of config.model (which may be another model altogether)."""
    mine = tiny_model(len(tokenizer), seed=1)  # config.model (tiny_dir) holds the seed-0 weights
    start = {k: v.clone() for k, v in mine.state_dict().items()}
    config = DAPOConfig(model=str(tiny_dir), kl_coef=0.1, group_size=2, threads=1, max_new_tokens=2)
    parts = build(config, Reporter(), task=toy_task(), model=mine, tokenizer=tokenizer)
    ref = parts.actor.ref_model
    assert ref is not None and ref is not mine and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    ref_state = ref.state_dict()
    assert all(torch.equal(ref_state[k], v) for k, v in start.items())
    with torch.no_grad():  # training the policy leaves the reference where it was
        next(mine.parameters()).add_(1.0)
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in start.items())
    parts.close()


def test_no_reference_without_kl(tiny, tokenizer):
    parts = build(DAPOConfig(group_size=2, threads=1), Reporter(), task=toy_task(), model=tiny, tokenizer=tokenizer)
    assert parts.actor.ref_model is None and parts.owns_engine and parts.evaluator is None  # the toy task has no eval set
    parts.close()
