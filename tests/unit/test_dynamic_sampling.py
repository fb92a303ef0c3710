"""Dynamic sampling without waste: refill arithmetic, skip probabilities, the confidence bound of
the "solved" stop, the words of the "too hard" stop, and exact resume of the refill state."""

from __future__ import annotations

import math

import pytest
import torch

from dapo import DAPOConfig
from dapo.errors import DynamicSamplingExhausted
from dapo.sampling import accuracy_lower_bound, binomial_tail, refill_size, skip_probability
from dapo.trainer import Trainer, train
from test_collector import ALL_MAX, ALL_MIN, MIXED_A, G, make_run
from toy_run import TOY_OPTIONS, toy_task


# --- pure functions, numbers by hand -----------------------------------------------------------------
def test_refill_size_by_hand():
    # rate = (kept + 1) / (seen + 2); draw ceil(needed / rate), at most ceil(max_oversample * needed)
    assert refill_size(8, kept=0, seen=0, max_oversample=8) == 16       # 8 / (1/2)
    assert refill_size(8, kept=30, seen=38, max_oversample=8) == 11     # 8 / (31/40) = 10.3
    assert refill_size(3, kept=9, seen=10, max_oversample=8) == 4       # 3 / (10/12) = 3.6
    assert refill_size(1, kept=0, seen=30, max_oversample=8) == 8       # 1 / (1/32) = 32, capped at 8
    assert refill_size(2, kept=0, seen=30, max_oversample=1.5) == 3     # cap ceil(1.5 * 2)
    assert refill_size(0, kept=5, seen=5, max_oversample=8) == 0


def test_skip_probability_by_hand():
    assert [skip_probability(k, 0.05) for k in range(5)] == [0.0, 0.5, 0.75, 0.875, 0.9375]
    assert skip_probability(5, 0.05) == pytest.approx(0.95)  # 1 - 1/32 = 0.969 is capped: drawn >= 5%
    assert skip_probability(50, 0.2) == pytest.approx(0.8)


def test_accuracy_lower_bound_by_hand():
    assert accuracy_lower_bound(320, 320) == pytest.approx(0.05 ** (1 / 320))     # 0.99068
    assert accuracy_lower_bound(299, 299) >= 0.99 > accuracy_lower_bound(298, 298)  # n >= ln 0.05 / ln 0.99
    assert accuracy_lower_bound(95, 100) == pytest.approx(0.8977466, abs=1e-6)     # Beta(95, 6) 5% quantile
    assert binomial_tail(95, 100, accuracy_lower_bound(95, 100)) == pytest.approx(0.05, abs=1e-6)
    assert accuracy_lower_bound(0, 10) == 0.0 and accuracy_lower_bound(0, 0) == 0.0
    assert binomial_tail(1, 3, 0.5) == pytest.approx(7 / 8)


# --- the collector -----------------------------------------------------------------------------------
def test_stream_refill_sizes_rounds_by_the_keep_rate(tokenizer, tiny, tmp_path):
    run, calls = make_run(tokenizer, tiny, tmp_path, [ALL_MAX, MIXED_A], train_batch_size=1, refill="stream")
    batch, stats = run.collect_batch()
    # need 1, nothing seen (rate 1/2): one round of 2 prompts (the sampler's first epoch: both)
    assert (stats["gen_rounds"], stats["prompts_generated"], stats["groups_kept"]) == (1, 2, 1)
    assert stats["keep_rate"] == 0.5 and run.trainer.collector.seen_recent == 2


def test_solved_stop_from_the_confidence_bound(tokenizer, tiny, tmp_path):
    both_max = dict(ALL_MAX, prompt="all max too")
    run, _ = make_run(tokenizer, tiny, tmp_path, [ALL_MAX, both_max], train_batch_size=1, refill="stream",
                      solved_accuracy=0.9)
    with pytest.raises(DynamicSamplingExhausted) as e:
        run.collect_batch()
    # rounds of 2, 4 and 8 prompts (rate 1/2, 1/4, then 1/7.6 capped at 8x): 8, 24, 56 answers, all
    # correct; bounds 0.05^(1/8) = 0.69, 0.05^(1/24) = 0.88, 0.05^(1/56) = 0.948 >= 0.9: stop.
    assert e.value.solved
    assert "56 of 56 answers this step were correct (accuracy >= 0.9479 with 95% confidence" in str(e.value)


def test_too_hard_stop_names_what_the_groups_were(tokenizer, tiny, tmp_path):
    half = {"prompt": "half", "script": ["0.5"] * G}
    run, _ = make_run(tokenizer, tiny, tmp_path, [ALL_MIN, half], train_batch_size=1, max_num_gen_batches=2)
    with pytest.raises(DynamicSamplingExhausted, match=r"of the groups dropped, 0 had every answer correct, 2 every "
                                                       r"answer wrong \(no reward\) and 2 the same partial reward "
                                                       r"for every answer \(0 of 16 answers correct\)") as e:
        run.collect_batch()
    assert not e.value.solved


def test_skipping_draws_an_all_equal_prompt_at_its_floor_never_zero(tokenizer, tiny, tmp_path):
    run, _ = make_run(tokenizer, tiny, tmp_path, [ALL_MAX, MIXED_A], train_batch_size=1, prompt_skip=True)
    collector = run.trainer.collector
    collector.streaks = {0: 10, 1: 0}  # ALL_MAX: ten all-equal groups in a row; MIXED_A: informative
    drawn, skipped = collector._draw(2000)
    share = drawn.count(0) / drawn.count(1)  # ALL_MAX is kept with probability min_draw_prob = 0.05
    assert 0.035 < share < 0.065 and drawn.count(0) > 0
    assert skipped == pytest.approx(0.95 * (skipped + drawn.count(0)), rel=0.02)


def test_streaks_follow_the_groups(tokenizer, tiny, tmp_path):
    run, _ = make_run(tokenizer, tiny, tmp_path, [ALL_MAX, ALL_MIN, MIXED_A], train_batch_size=1)
    run.collect_batch()
    assert run.trainer.collector.streaks == {0: 1, 1: 1, 2: 0}


def test_default_refill_state_resumes_exactly(tiny, tokenizer, tmp_path):
    """Stream refill and prompt skipping (the defaults) carry their state through a checkpoint."""
    options = {**TOY_OPTIONS, "refill": "stream", "prompt_skip": True, "lr_schedule": "constant", "warmup_steps": 0,
               "save_every": 1}
    full = Trainer(DAPOConfig(**{**options, "output_dir": str(tmp_path / "full")}), task=toy_task(),
                   model=tiny_copy(tiny), tokenizer=tokenizer)
    full.fit()
    first = Trainer(DAPOConfig(**{**options, "train_steps": 2, "output_dir": str(tmp_path / "cut")}), task=toy_task(),
                    model=tiny_copy(tiny), tokenizer=tokenizer)
    first.fit()
    assert first.collector.streaks or first.collector.seen_recent > 0
    resumed = train(DAPOConfig(**{**options, "output_dir": str(tmp_path / "cut")}), resume=tmp_path / "cut",
                    task=toy_task(), model=tiny_copy(tiny), tokenizer=tokenizer)
    assert resumed.steps == 4
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "checkpoints" / "step-000004" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step-000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def tiny_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def test_old_behaviour_stays_reachable():
    c = DAPOConfig(refill="rounds", prompt_skip=False, solved_accuracy=1.0)
    assert (c.refill, c.prompt_skip, c.solved_accuracy) == ("rounds", False, 1.0)
    assert accuracy_lower_bound(10**6, 10**6) < 1.0  # solved_accuracy 1 never triggers the bound
    assert math.isclose(skip_probability(0, 1.0), 0.0)
