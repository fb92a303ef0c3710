"""The dynamic-sampling buffer (Algorithm 1) through the BatchCollector, with a fake engine.

Each record carries a `script`: the G completions the fake engine returns for its prompt. The reward is the
completion read as a number, so a script of all "1" is an all-correct group (dropped, counted as
all-max), all "0" an all-wrong group (dropped, all-min), and a mix is informative (kept).
"""

import pytest

from dapo import DAPOConfig
from dapo.errors import DynamicSamplingExhausted
from dapo.rollout import Samples, SamplingParams
from dapo.sampling import DynamicSamplingBuffer
from dapo.tasks import Task
from dapo.trainer import Trainer

G = 4
ALL_MAX = {"prompt": "all max", "script": ["1"] * G}
ALL_MIN = {"prompt": "all min", "script": ["0"] * G}
MIXED_A = {"prompt": "mixed a", "script": ["1", "0", "0", "0"]}
MIXED_B = {"prompt": "mixed b", "script": ["1", "1", "0", "0"]}


def as_number(prompts, completions, **_):
    return [float(c) for c in completions]


class ScriptedEngine:
    """A RolloutEngine that answers each prompt with its record's script (as token ids)."""

    def __init__(self, tokenizer, records):
        self.tokenizer, self.records, self.calls = tokenizer, records, []

    def generate(self, prompt_ids, n, sampling: SamplingParams):
        out = []
        for ids in prompt_ids:
            text = self.tokenizer.decode(ids)
            record = next(r for r in self.records if r["prompt"] in text)
            self.calls.append(record["prompt"])
            responses = [self.tokenizer.encode(t, add_special_tokens=False) for t in record["script"]]
            out.append(Samples(responses, [False] * n, [[0.0] * len(r) for r in responses]))
        return out

    def sync_weights(self, model):
        pass


class Run:
    """The trainer's collector with the scripted engine in place of sampling."""

    def __init__(self, trainer: Trainer, engine: ScriptedEngine):
        self.trainer, self.engine = trainer, engine
        self.buffer = trainer.collector.buffer
        self.step = 0

    def collect_batch(self):
        self.step += 1
        return self.trainer.collector.collect(self.step)


def make_run(tokenizer, tiny, tmp_path, records, **overrides):
    task = Task("scripted", records, [], {"number": as_number}, as_number)  # correct: a 1
    # Algorithm 1 as written (fixed rounds, no prompt skipping), unless a test says otherwise.
    options = {"refill": "rounds", "prompt_skip": False, **overrides}
    config = DAPOConfig(group_size=G, gen_batch_size=len(records), verbose=False, output_dir=str(tmp_path),
                        threads=1, **options)
    engine = ScriptedEngine(tokenizer, records)
    trainer = Trainer(config, task=task, model=tiny, tokenizer=tokenizer, engine=engine)
    return Run(trainer, engine), engine.calls


def group_prompts(run: Run, batch) -> list[str]:
    """The prompt of each group of a TrainBatch."""
    records = run.trainer.task.train
    return [records[int(batch.prompt_index[batch.group == g][0])]["prompt"] for g in range(batch.num_groups)]


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
    assert sorted(group_prompts(run, batch)) == ["mixed a", "mixed b"]
    assert (stats["gen_rounds"], stats["groups_kept"]) == (1, 2)
    assert (stats["groups_dropped_all_max"], stats["groups_dropped_all_min"], stats["groups_dropped_all_same"]) == (1, 1, 2)
    assert (stats["prompts_consumed"], stats["data_epoch"], stats["groups_carried_over"]) == (4, 0, 0)
    # every completion generated this round counts: (4 + 0 + 1 + 2) / 16
    assert stats["reward/number"] == pytest.approx(7 / 16)
    assert stats["reward_mean"] == pytest.approx(7 / 16)
    assert stats["reward_errors"] == 0


def test_surplus_groups_are_trained_in_the_step_that_sampled_them(tokenizer, tiny, tmp_path):
    run, calls = make_run(tokenizer, tiny, tmp_path, [ALL_MAX, MIXED_A, MIXED_B], train_batch_size=1, surplus="train")
    first, s1 = run.collect_batch()
    assert (s1["gen_rounds"], s1["groups_kept"], s1["groups_surplus"], s1["groups_trained"]) == (1, 2, 1, 2)
    assert first.num_groups == 2 and len(run.buffer.groups) == 0
    assert first.version.tolist() == [0] * 8 and first.staleness.tolist() == [0] * 8
    assert (s1["staleness_mean"], s1["staleness_max"]) == (0.0, 0)
    second, s2 = run.collect_batch()  # nothing carried: a new round, sampled by version 1
    assert (s2["gen_rounds"], s2["groups_carried_over"], len(calls)) == (1, 0, 6)
    assert second.version.tolist() == [1] * 8 and not second.staleness.any()


def test_surplus_groups_join_the_configured_optimizer_steps(tokenizer, tiny, tmp_path):
    """3 informative groups for train_batch_size 2 in mini-batches of 1 group: still 2 optimizer
    steps per pass (mu 2: 4 in all), the first mini-batch taking 2 groups."""
    from dapo.actor import mini_batch_groups
    from dapo.advantages import group_advantages

    run, _ = make_run(tokenizer, tiny, tmp_path, [MIXED_A, MIXED_B, {**MIXED_A, "prompt": "mixed c"}],
                      train_batch_size=2, mini_batch_size=1, mu=2, surplus="train")
    batch, stats = run.collect_batch()
    assert (batch.num_groups, stats["groups_surplus"]) == (3, 1)
    assert mini_batch_groups(batch.num_groups, 2, 1) == [[0, 1], [2]]
    batch.advantages = group_advantages(batch.grouped(batch.rewards)).flatten()
    run.trainer.actor.update(batch)
    assert run.trainer.actor.optimizer_steps == 4


def test_surplus_drop_discards_what_the_batch_does_not_need(tokenizer, tiny, tmp_path):
    run, calls = make_run(tokenizer, tiny, tmp_path, [ALL_MAX, MIXED_A, MIXED_B], train_batch_size=1, surplus="drop")
    first, s1 = run.collect_batch()
    assert (first.num_groups, s1["groups_surplus"], len(run.buffer.groups)) == (1, 1, 0)
    second, s2 = run.collect_batch()
    assert (s2["gen_rounds"], s2["groups_carried_over"], len(calls)) == (1, 0, 6)


def test_surplus_groups_open_the_next_step_exactly_once(tokenizer, tiny, tmp_path):
    run, calls = make_run(tokenizer, tiny, tmp_path, [ALL_MAX, MIXED_A, MIXED_B], train_batch_size=1,
                          surplus="carry")
    first, s1 = run.collect_batch()
    assert (s1["gen_rounds"], s1["groups_kept"], len(run.buffer.groups)) == (1, 2, 1)
    assert not first.staleness.any()
    second, s2 = run.collect_batch()  # the surplus group fills this step: no generation at all
    assert (s2["gen_rounds"], s2["groups_carried_over"], len(calls)) == (0, 1, 3)  # 3 prompts, 1 round
    # sampled by version 0, trained at step 2 (version 1): one behind; the Actor recomputes its pi_old
    assert second.version.tolist() == [0] * 4 and second.staleness.tolist() == [1] * 4
    assert (s2["staleness_mean"], s2["staleness_max"]) == (1.0, 1)
    # a step that sampled nothing has no sampled statistics (null, a gap in the curves: neither a
    # reward of 0 nor the carried group's numbers read as this step's); its batch's are labelled so
    assert (s2["gen_tokens"], s2["reward_mean"], s2["accuracy"], s2["response_length_mean"]) == (0, None, None, None)
    assert s2["batch_reward_mean"] == pytest.approx(float(second.rewards.mean())) and s2["batch_reward_mean"] > 0
    assert s2["batch_accuracy"] == pytest.approx(float(second.correct.mean()))
    assert set(group_prompts(run, first) + group_prompts(run, second)) == {"mixed a", "mixed b"}
    third, s3 = run.collect_batch()  # buffer empty again: a new round (second epoch of the data)
    assert (s3["gen_rounds"], s3["groups_carried_over"], s3["prompts_consumed"], s3["data_epoch"]) == (1, 0, 6, 1)
    assert len(run.buffer.groups) == 1


def test_cap_on_generation_rounds_stops_with_a_message(tokenizer, tiny, tmp_path):
    run, calls = make_run(tokenizer, tiny, tmp_path, [ALL_MAX, ALL_MIN], train_batch_size=1, max_num_gen_batches=3)
    with pytest.raises(DynamicSamplingExhausted, match=r"found only 0 of 1 groups .* max_num_gen_batches=3 "):
        run.collect_batch()
    assert len(calls) == 3 * 2  # three rounds of the two prompts


def test_dynamic_sampling_off_keeps_every_group(tokenizer, tiny, tmp_path):
    run, _ = make_run(tokenizer, tiny, tmp_path, [ALL_MAX, ALL_MIN], train_batch_size=2, dynamic_sampling=False)
    batch, stats = run.collect_batch()
    assert (batch.num_groups, stats["groups_kept"], stats["groups_dropped_all_same"]) == (2, 2, 0)


def test_reward_errors_zero_is_counted_in_metrics(tokenizer, tiny, tmp_path):
    # One call scores the whole round (TRL's convention): a NaN is one bad value, scored 0.
    bad = {"prompt": "bad", "script": ["nan"] * G}
    run, _ = make_run(tokenizer, tiny, tmp_path, [bad, MIXED_A], train_batch_size=1, reward_errors="zero")
    batch, stats = run.collect_batch()
    assert stats["reward_errors"] == G
    assert group_prompts(run, batch) == ["mixed a"]
