"""pi_old from the rollout engine's own log-probs (old_logprobs 'engine'): the same update as the
recomputing forward when the two agree, no forward for fresh rows, a forward for stale rows (surplus
groups sampled before the last update), the ratio against the sampler's numbers worked by hand, and
the config's resolution and refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dapo import DAPOConfig
from dapo.actor import Actor
from dapo.batch import TrainBatch
from dapo.errors import ConfigError
from test_logprobs import make_batch


def two_mini_batch_update(tiny, tokenizer, mode: str, shift: float = 0.0, stale_group: int | None = None,
                          lr: float = 1e-3, **config) -> tuple[dict[int, float], int, dict[str, float], torch.nn.Module,
                                                     TrainBatch]:
    """Actor.update on test_logprobs.make_batch (group 0: 4 responses, group 1: 3) with one group per
    mini-batch, mu 1. The sampler log-probs are the trainer's own (computed before the update) minus
    `shift`; `stale_group` is marked as carried over. Returns (objective by grad step, no-grad
    forwards run, metrics, model, batch)."""
    batch = make_batch(tokenizer)
    if stale_group is not None:
        batch.staleness = (batch.group == stale_group).long()
    model = copy.deepcopy(tiny)
    config = DAPOConfig(old_logprobs=mode, mu=1, train_batch_size=2, mini_batch_size=1, lr=lr, threads=2, **config)
    actor = Actor(model, config, pad_id=2)
    own = actor.logprobs(actor.pack(batch, list(range(len(batch))), batch.loss_mask(False)))
    batch.engine_logprobs = [own[r] - shift for r in range(len(batch))]
    forwards = []
    real = actor.logprobs
    actor.logprobs = lambda plan, model=None: forwards.extend(p for p in plan if p.owner) or real(plan, model)
    objectives = {}
    metrics = actor.update(batch, on_grad_step=lambda step, obj: objectives.__setitem__(step, obj))
    return objectives, len(forwards), metrics, model, batch


def token_mean_advantage(batch: TrainBatch, group: int, ratio: float = 1.0) -> float:
    """The token-mean objective sum_t r * A_i / N of one group's mini-batch when every ratio is `ratio`."""
    rows = [r for r in range(len(batch)) if int(batch.group[r]) == group]
    return ratio * sum(float(batch.advantages[r]) * len(batch.response_ids[r]) for r in rows) / sum(
        len(batch.response_ids[r]) for r in rows)


def test_sampler_log_probs_equal_to_the_trainer_give_the_recomputed_update(tiny, tokenizer):
    obj_r, fwd_r, m_r, model_r, _ = two_mini_batch_update(tiny, tokenizer, "recompute")
    obj_s, fwd_s, m_s, model_s, _ = two_mini_batch_update(tiny, tokenizer, "engine")
    # recompute: one no-grad forward for the second mini-batch; sampler: none
    assert (fwd_r, fwd_s) == (1, 0)
    assert obj_s[1] == pytest.approx(obj_r[1], abs=1e-6) and obj_s[2] == pytest.approx(obj_r[2], abs=1e-6)
    for (name, a), (_, b) in zip(model_r.named_parameters(), model_s.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    # the mismatch is still measured, on the first mini-batch (its own forward): zero here
    assert m_s["mismatch_max_abs"] < 1e-5 and abs(m_s["mismatch_kl"]) < 1e-9


def test_the_second_mini_batch_ratio_is_taken_against_the_sampler(tiny, tokenizer):
    """lr 1e-30: the weights do not move, so every ratio is exp(trainer - pi_old). Sampler log-probs
    0.1 below the trainer's: the first mini-batch uses its own forward (ratio 1, objective
    sum(A * len) / N of group 0); the second, fresh, takes the sampler's (ratio e^0.1, inside the
    clip range [0.8, 1.28]: objective e^0.1 * sum(A * len) / N of group 1)."""
    obj, forwards, m, _, batch = two_mini_batch_update(tiny, tokenizer, "engine", shift=0.1, lr=1e-30)
    assert forwards == 0
    assert obj[1] == pytest.approx(token_mean_advantage(batch, 0), rel=1e-5)
    assert obj[2] == pytest.approx(token_mean_advantage(batch, 1, math.exp(0.1)), rel=1e-5)
    assert m["mismatch_max_abs"] == pytest.approx(0.1, abs=1e-4)  # measured on group 0 (own forward)
    rows1 = [r for r in range(len(batch)) if int(batch.group[r]) == 1]
    assert batch.old_logprobs[rows1[0]].tolist() == pytest.approx(batch.engine_logprobs[rows1[0]].tolist())


def test_stale_rows_are_recomputed(tiny, tokenizer):
    """Group 1 carried over from an earlier step: its sampler log-probs are another policy's, so the
    trainer recomputes them (one forward of its 3 rows) and the ratio is 1 again; a stale row does
    not count in the mismatch metric."""
    obj, forwards, m, _, batch = two_mini_batch_update(tiny, tokenizer, "engine", shift=0.1, stale_group=1,
                                                       lr=1e-30)
    assert forwards == 1
    assert obj[2] == pytest.approx(token_mean_advantage(batch, 1), rel=1e-5)
    # group 0 stale too: first mini-batch, own forward, and no fresh row is left to measure
    obj, forwards, m, _, batch = two_mini_batch_update(tiny, tokenizer, "engine", shift=0.1, stale_group=0,
                                                       lr=1e-30)
    assert forwards == 0 and obj[1] == pytest.approx(token_mean_advantage(batch, 0), rel=1e-5)
    assert obj[2] == pytest.approx(token_mean_advantage(batch, 1, math.exp(0.1)), rel=1e-5)
    assert m["mismatch_max_abs"] == 0.0 and m["mismatch_kl"] == 0.0


@pytest.mark.parametrize("shift, weight", [(0.1, math.exp(0.1)), (1.0, 2.0)])
def test_stale_rows_are_corrected_by_the_behaviour_policy(tiny, tokenizer, shift, weight):
    """Decoupled PPO on a carried-over group (surplus 'carry', stale_correction 'tis'): the ratio's
    pi_old is the trainer's recomputed log-prob (ratio 1 at lr 1e-30), and each token is weighed by
    min(pi_prox / pi_behaviour, 2) = min(e^shift, 2), the sampler's log-probs being `shift` below.
    Group 0 is fresh: weight 1. The metrics average the two optimizer steps: weight (1 + w) / 2,
    capped share (0 + [w == 2]) / 2; stale_kl is k3 of the stale rows, e^shift - shift - 1."""
    obj, _, m, _, batch = two_mini_batch_update(tiny, tokenizer, "engine", shift=shift, stale_group=1, lr=1e-30,
                                                surplus="carry")
    assert obj[1] == pytest.approx(token_mean_advantage(batch, 0), rel=1e-5)
    assert obj[2] == pytest.approx(weight * token_mean_advantage(batch, 1), rel=1e-5)
    assert m["rollout_is_weight"] == pytest.approx((1 + weight) / 2, rel=1e-5)
    assert m["rollout_is_capped"] == pytest.approx(0.5 if weight == 2.0 else 0.0)
    assert m["stale_kl"] == pytest.approx(math.exp(shift) - shift - 1, rel=1e-4)
    # group 0 (fresh) is shifted too: that is train-inference mismatch, measured apart from staleness
    assert m["mismatch_kl"] == pytest.approx(math.exp(shift) - shift - 1, rel=1e-4)
    # stale_correction none: the stale group trains as a fresh one would
    obj, _, m, _, batch = two_mini_batch_update(tiny, tokenizer, "engine", shift=shift, stale_group=1, lr=1e-30,
                                                surplus="carry", stale_correction="none")
    assert obj[2] == pytest.approx(token_mean_advantage(batch, 1), rel=1e-5) and "rollout_is_weight" not in m


def test_stale_column_through_cat_and_select():
    a = TrainBatch(group=torch.tensor([0, 0]), prompt_index=torch.tensor([0, 0]), prompt_ids=[[1], [1]],
                   response_ids=[[2], [3]], truncated=torch.zeros(2, dtype=torch.bool), completions=["", ""],
                   scores=torch.zeros(2, 1), task_rewards=torch.tensor([0.0, 1.0]), rewards=torch.tensor([0.0, 1.0]))
    b = copy.deepcopy(a)
    b.staleness = torch.tensor([2, 2])
    both = TrainBatch.cat([b, a])
    assert both.staleness.tolist() == [2, 2, 0, 0]
    assert both.select_groups([1]).staleness.tolist() == [0, 0]
    assert TrainBatch.cat([a, a]).staleness is None and not a.is_stale(0) and both.is_stale(1)
    legacy = {**a.state_dict(), "stale": torch.ones(2, dtype=torch.bool)}
    del legacy["version"], legacy["staleness"]
    assert TrainBatch.from_state_dict(legacy).version is None  # a checkpoint of before 2026-12-06


def test_auto_resolution_and_refusals():
    assert DAPOConfig().old_logprobs_from_engine  # hf engine, top_p 1, temperature 1
    assert not DAPOConfig(top_p=0.9).old_logprobs_from_engine  # nucleus-renormalised log-probs
    assert not DAPOConfig(rollout_engine="vllm").old_logprobs_from_engine  # other kernels: recompute + tis
    assert not DAPOConfig(old_logprobs="recompute").old_logprobs_from_engine
    assert not DAPOConfig(dtype="bfloat16").old_logprobs_from_engine  # decode and packed forward round apart
    assert DAPOConfig(dtype="bfloat16", old_logprobs="engine").old_logprobs_from_engine  # asked for: obeyed
    with pytest.raises(ConfigError, match="needs temperature > 0 and top_p 1"):
        DAPOConfig(old_logprobs="engine", top_p=0.9)
    with pytest.raises(ConfigError, match="rollout_correction 'tis'"):
        DAPOConfig(old_logprobs="engine", rollout_engine="vllm")
    assert DAPOConfig(old_logprobs="engine", rollout_engine="vllm", rollout_correction="none").old_logprobs_from_engine


def test_auto_recomputes_under_fsdp_bf16_mixed_precision(tiny, tokenizer):
    """fsdp_mixed_precision bf16 trains in bf16 over fp32 weights, the engine decodes in fp32:
    'auto' then runs the recomputing forward (one, for the second mini-batch); an explicit 'engine'
    still skips it."""
    assert two_mini_batch_update(tiny, tokenizer, "auto")[1] == 0
    assert two_mini_batch_update(tiny, tokenizer, "auto", fsdp_mixed_precision="bf16")[1] == 1
    assert two_mini_batch_update(tiny, tokenizer, "engine", fsdp_mixed_precision="bf16")[1] == 0


def test_the_old_environment_variable_is_refused_not_ignored(monkeypatch):
    """DAPO_FSDP_MIXED_PRECISION changed numerics without being saved with the run; it is now a
    config field, and a run that still sets the variable stops with one message naming the field."""
    from dapo.build import build
    from dapo.errors import ConfigError
    from dapo.reporting import Reporter

    monkeypatch.setenv("DAPO_FSDP_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="fsdp_mixed_precision: bf16"):
        build(DAPOConfig(), Reporter())


def test_mixed_precision_is_saved_and_a_change_refused_on_resume():
    from dapo.config import run_changing_differences

    assert run_changing_differences(DAPOConfig(), DAPOConfig(fsdp_mixed_precision="bf16")) == [
        "fsdp_mixed_precision: 'none' -> 'bf16'"]
    assert DAPOConfig.from_dict(DAPOConfig(fsdp_mixed_precision="bf16").to_dict()).fsdp_mixed_precision == "bf16"
