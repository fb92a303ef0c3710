"""The dynamic-sampling buffer (Algorithm 1) through Run.collect_batch, with scripted rollouts.

Each record carries a `script`: the G completions its fake rollout returns. The reward is the
completion read as a number, so a script of all "1" is an all-correct group (dropped, counted as
all-max), all "0" an all-wrong group (dropped, all-min), and a mix is informative (kept).
"""

import pytest

from dapo import DAPOConfig
from dapo.errors import DynamicSamplingExhausted
from dapo.rollout import Group
from dapo.sampling import DynamicSamplingBuffer
from dapo.tasks import Task
from dapo.trainer import Run

G = 4
ALL_MAX = {"prompt": "all max", "script": ["1"] * G}
ALL_MIN = {"prompt": "all min", "script": ["0"] * G}
MIXED_A = {"prompt": "mixed a", "script": ["1", "0", "0", "0"]}
MIXED_B = {"prompt": "mixed b", "script": ["1", "1", "0", "0"]}


def as_number(prompts, completions, **_):
    return [float(c) for c in completions]


def make_run(tokenizer, tiny, tmp_path, records, **overrides):
    task = Task("scripted", records, [], {"number": as_number})
    config = DAPOConfig(group_size=G, gen_batch_size=len(records), verbose=False, output_dir=str(tmp_path),
                        threads=1, **overrides)
    run = Run(config, task=task, model=tiny, tokenizer=tokenizer)
    calls = []

    def fake_rollout(records):
        calls.append([r["prompt"] for r in records])
        return [Group(r, [1, 2], [[5]] * G, [False] * G, completions=list(r["script"])) for r in records]

    run.rollout = fake_rollout
    return run, calls


def test_buffer_is_fifo_and_keeps_surplus():
    buffer = DynamicSamplingBuffer[str](target=2)
    buffer.add(["a"])
    assert not buffer.full
    buffer.add(["b", "c"])
    assert buffer.full and buffer.take() == ["a", "b"]
    assert buffer.groups == ["c"] and not buffer.full


def test_round_keeps_informative_groups_and_counts_the_dropped(tokenizer, tiny, tmp_path):
    run, calls = make_run(tokenizer, tiny, tmp_path, [ALL_MAX, ALL_MIN, MIXED_A, MIXED_B], train_batch_size=2)
    batch, stats = run.collect_batch()
    assert sorted(g.record["prompt"] for g in batch) == ["mixed a", "mixed b"]
    assert (stats["gen_rounds"], stats["groups_kept"]) == (1, 2)
    assert (stats["groups_dropped_all_max"], stats["groups_dropped_all_min"], stats["groups_dropped_all_same"]) == (1, 1, 2)
    assert (stats["prompts_consumed"], stats["data_epoch"], stats["groups_carried_over"]) == (4, 0, 0)
    # every completion generated this round counts: (4 + 0 + 1 + 2) / 16
    assert stats["reward/number"] == pytest.approx(7 / 16)
    assert stats["reward_mean"] == pytest.approx(7 / 16)
    assert stats["reward_errors"] == 0


def test_surplus_groups_open_the_next_step_exactly_once(tokenizer, tiny, tmp_path):
    run, calls = make_run(tokenizer, tiny, tmp_path, [ALL_MAX, MIXED_A, MIXED_B], train_batch_size=1)
    first, s1 = run.collect_batch()
    assert (s1["gen_rounds"], s1["groups_kept"], len(run.buffer.groups)) == (1, 2, 1)
    second, s2 = run.collect_batch()  # the surplus group fills this step: no generation at all
    assert (s2["gen_rounds"], s2["groups_carried_over"], len(calls)) == (0, 1, 1)
    assert {first[0].record["prompt"], second[0].record["prompt"]} == {"mixed a", "mixed b"}
    third, s3 = run.collect_batch()  # buffer empty again: a new round (second epoch of the data)
    assert (s3["gen_rounds"], s3["groups_carried_over"], s3["prompts_consumed"], s3["data_epoch"]) == (1, 0, 6, 1)
    assert len(run.buffer.groups) == 1


def test_cap_on_generation_rounds_stops_with_a_message(tokenizer, tiny, tmp_path):
    run, calls = make_run(tokenizer, tiny, tmp_path, [ALL_MAX, ALL_MIN], train_batch_size=1, max_num_gen_batches=3)
    with pytest.raises(DynamicSamplingExhausted, match=r"found only 0 of 1 groups .* max_num_gen_batches=3 "):
        run.collect_batch()
    assert len(calls) == 3


def test_dynamic_sampling_off_keeps_every_group(tokenizer, tiny, tmp_path):
    run, _ = make_run(tokenizer, tiny, tmp_path, [ALL_MAX, ALL_MIN], train_batch_size=2, dynamic_sampling=False)
    batch, stats = run.collect_batch()
    assert (len(batch), stats["groups_kept"], stats["groups_dropped_all_same"]) == (2, 2, 0)


def test_reward_errors_zero_is_counted_in_metrics(tokenizer, tiny, tmp_path):
    bad = {"prompt": "bad", "script": ["1", "x", "0", "0"]}  # float("x") raises: the whole call scores 0
    run, _ = make_run(tokenizer, tiny, tmp_path, [bad, MIXED_A], train_batch_size=1, reward_errors="zero")
    batch, stats = run.collect_batch()
    assert stats["reward_errors"] == G
    assert [g.record["prompt"] for g in batch] == ["mixed a"]
