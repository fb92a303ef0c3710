"""--task reasoning_gym:<name> (the optional extra `dapo-rl[reasoning-gym]`).

Skips when reasoning-gym is not installed, unless DAPO_REQUIRE_REASONING_GYM=1 (CI sets it after
installing the extra, so there a missing package fails instead of skipping)."""

from __future__ import annotations

import os
import sys

import pytest

from dapo import DAPOConfig
from dapo.cli import main
from dapo.errors import DataError


def test_missing_package_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import fails as if not installed
    assert main(["train", "--task", "reasoning_gym:countdown"]) == 2
    assert capsys.readouterr().err.strip() == ('dapo: error: --task reasoning_gym:... needs the reasoning-gym '
                                               'package: pip install "dapo-rl[reasoning-gym]"')


def test_task_spec_is_checked():
    from dapo.rgym import parse_spec

    assert parse_spec("reasoning_gym:chain_sum") == ("chain_sum", 500, 100)
    assert parse_spec("reasoning_gym:chain_sum:40:8") == ("chain_sum", 40, 8)
    with pytest.raises(DataError, match="sizes must be integers"):
        parse_spec("reasoning_gym:chain_sum:many")
    with pytest.raises(Exception, match="reasoning_gym:<name>"):
        DAPOConfig(task="reasoning_gym:")


@pytest.fixture()
def rg():
    if os.environ.get("DAPO_REQUIRE_REASONING_GYM") == "1":
        import reasoning_gym  # CI installed the extra: fail, never skip

        return reasoning_gym
    return pytest.importorskip("reasoning_gym", reason="the optional extra dapo-rl[reasoning-gym] is not installed")


@pytest.mark.parametrize("name", ["basic_arithmetic", "chain_sum"])
def test_records_are_seeded_and_disjoint_and_scored_by_the_generator(rg, name):
    from dapo.rgym import ReasoningGymScore, records

    train, held_out = records(name, 60, 20)
    again_train, again_held_out = records(name, 60, 20)
    assert train == again_train and held_out == again_held_out  # the same prompts every run
    assert len(train) == 60 and len(held_out) == 20
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    score = ReasoningGymScore(name)
    gold = [r["answer"] for r in held_out[:3]]
    columns = {k: [r[k] for r in held_out[:3]] for k in ("answer", "metadata", "question")}
    prompts = [r["prompt"] for r in held_out[:3]]
    assert score(prompts, gold, **columns) == [1.0, 1.0, 1.0]
    assert score(prompts, [f"Thinking...<answer>{a}</answer>" for a in gold], **columns) == [1.0, 1.0, 1.0]
    assert all(s < 1.0 for s in score(prompts, ["no idea"] * 3, **columns))
    import pickle

    assert pickle.loads(pickle.dumps(score))(prompts, gold, **columns) == [1.0, 1.0, 1.0]  # spawn workers


def test_train_a_step_on_a_reasoning_gym_task(rg, tokenizer, tiny, tmp_path):
    from dapo.metrics import read_metrics
    from dapo.trainer import Trainer

    config = DAPOConfig(task="reasoning_gym:basic_arithmetic:16:4", group_size=4, gen_batch_size=2,
                        train_batch_size=2, max_new_tokens=4, train_steps=1, mu=1, eval_samples=2,
                        dynamic_sampling=False, verbose=False, threads=1, output_dir=str(tmp_path / "run"))
    run = Trainer(config, model=tiny, tokenizer=tokenizer)
    assert len(run.task.train) == 16 and len(run.task.eval) == 4
    assert [rf.name for rf in run.parts.reward_fns] == ["basic_arithmetic"]
    result = run.fit()
    row = read_metrics(tmp_path / "run")[-1]
    assert "reward/basic_arithmetic" in row and "accuracy" in row
    assert "avg@2" in result.eval_after and result.eval_after["num_prompts"] == 4
    with pytest.raises(DataError, match="reasoning-gym has no generator 'no_such_generator'"):
        Trainer(config.replace(task="reasoning_gym:no_such_generator"), model=tiny, tokenizer=tokenizer)
