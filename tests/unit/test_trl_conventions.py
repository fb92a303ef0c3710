"""A TRL user moves over unchanged. Reward functions as TRL passes and combines them,
the Python API with plain callables, answer columns, save_to_disk datasets, quiet logs."""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import dapo
from dapo import DAPOConfig, RewardFunction
from dapo.errors import DataError, RewardError
from dapo.metrics import read_evals, read_metrics
from dapo.rewards import TrainerState, all_none_warning, as_reward_functions, call_reward, check_reward_values, combine
from dapo.scorer import RewardScorer, score_completions, score_group
from dapo.tasks import build_task

# --- a reward file written exactly as in TRL's documentation (GRPOTrainer, "Using a custom reward function")

TRL_DOC_REWARDS = '''import re


def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completion_ids, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of token count)."""
    return [float(len(ids)) for ids in completion_ids]


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]
'''

SMALL = dict(group_size=4, gen_batch_size=2, train_batch_size=2, max_new_tokens=4, train_steps=1, mu=1,
             eval_samples=2, dynamic_sampling=False, verbose=False, threads=1)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_trl_documentation_reward_file_runs_unchanged(tokenizer, tiny, tmp_path):
    """Conversational prompts; TRL's format reward reads completion[0]["content"], its length reward
    reads completion_ids: both run as written, and the ids are the generated tokens."""
    (tmp_path / "trl_rewards.py").write_text(TRL_DOC_REWARDS)
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}], "solution": str(a + 1)} for a in range(4)]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    rewards = [f"{tmp_path}/trl_rewards.py:format_reward_func", f"{tmp_path}/trl_rewards.py:reward_func"]
    config = DAPOConfig(data=str(data), eval_data=str(data), reward=rewards, output_dir=str(tmp_path / "run"),
                        **SMALL)
    from dapo.trainer import Trainer

    Trainer(config, model=tiny, tokenizer=tokenizer).fit()
    row = read_metrics(tmp_path / "run")[-1]
    assert row["reward/format_reward_func"] == 0.0  # a random tiny model never writes <think>...</answer>
    # the mean of len(completion_ids) is the mean generated length: real token ids arrived
    assert row["reward/reward_func"] == pytest.approx(row["response_length_mean"])
    assert row["accuracy"] == 0.0  # the first function drives accuracy

    # and the string-completion length reward of TRL's quickstart, on a string prompt
    import importlib.util

    spec = importlib.util.spec_from_file_location("trl_rewards_again", tmp_path / "trl_rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scored = score_group([RewardFunction(module.reward_len)], {"prompt": "Say hi"}, ["hi", "x" * 20], timeout=5.0)
    assert scored.scores[:, 0].tolist() == [-18.0, 0.0]


# --- 1. the Python API -------------------------------------------------------------------------

class _Scorer:
    def __init__(self, target: str) -> None:
        self.target = target

    def method(self, prompts, completions, **kwargs):
        return [float(self.target in c) for c in completions]

    def __call__(self, prompts, completions, **kwargs):
        return [1.0] * len(completions)


def _match(prompts, completions, word="x", **kwargs):
    return [float(word in c) for c in completions]


def test_any_callable_is_a_reward_function():
    def closure_factory(word):
        def contains(completions, **kwargs):
            return [float(word in c) for c in completions]
        return contains

    fns = as_reward_functions([lambda completions, **kw: [0.0] * len(completions), closure_factory("a"),
                               _Scorer("b").method, functools.partial(_match, word="c"), _Scorer("d"),
                               RewardFunction(_match, name="mine", weight=0.5), "numeric"])
    assert [f.name for f in fns] == ["<lambda>", "contains", "method", "_match", "_Scorer", "mine", "numeric"]
    assert [f.weight for f in fns] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0]
    scored = score_completions(fns[:5], ["p"] * 2, ["abc", "zzz"], {}, timeout=5.0)
    assert scored.scores.tolist() == [[0, 1, 1, 1, 1], [0, 0, 0, 0, 1]]
    # names are made unique, weights given apart, one callable alone is a list of one
    twice = as_reward_functions([_match, _match], [2.0, 3.0])
    assert [(f.name, f.weight) for f in twice] == [("_match", 2.0), ("_match_2", 3.0)]
    assert [f.name for f in as_reward_functions(_match)] == ["_match"]
    assert RewardFunction("legacy", _match, 2.0).name == "legacy"  # the older positional form
    with pytest.raises(RewardError, match="not a function"):
        as_reward_functions([42])
    with pytest.raises(RewardError, match="2 reward weights for 1"):
        as_reward_functions([_match], [1.0, 2.0])
    with pytest.raises(RewardError, match="empty"):
        as_reward_functions([])


def _always_one(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def test_train_takes_plain_callables_and_the_first_drives_accuracy(tokenizer, tiny, tmp_path):
    """The issue's case: a built-in reward in the config (once needed to pass the check) no longer
    takes over accuracy and evaluation from reward_fns[0]."""
    rows = [{"question": f"What is {a} + 2?", "answer": str(a + 2)} for a in range(4)]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    config = DAPOConfig(data=str(data), eval_data=str(data), prompt_column="question", reward=["numeric"],
                        output_dir=str(tmp_path / "run"), **SMALL)
    result = dapo.train(config, reward_fns=[_always_one, lambda completions, **kw: [0.5] * len(completions)],
                        model=tiny, tokenizer=tokenizer)
    assert isinstance(result, dapo.trainer.TrainResult)
    row = read_metrics(tmp_path / "run")[-1]
    assert row["accuracy"] == 1.0 and row["reward/_always_one"] == 1.0 and row["reward/<lambda>"] == 0.5
    assert "reward/numeric" not in row
    assert result.eval_before["avg@2"] == 1.0 and result.eval_after["avg@2"] == 1.0
    assert [r["step"] for r in read_evals(tmp_path / "run")] == [0, 1]


def test_accuracy_reward_names_another_function_and_data_needs_no_config_reward(tokenizer, tiny, tmp_path):
    rows = [{"prompt": f"Say {w}", "answer": w} for w in ("a", "b", "c")]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    config = DAPOConfig(data=str(data), eval_data=str(data), accuracy_reward="second", reward_weights=[1.0, 0.0],
                        output_dir=str(tmp_path / "run"), **SMALL)
    zero = RewardFunction(lambda completions, **kw: [0.0] * len(completions), name="first")
    result = dapo.train(config, reward_fns=[zero, RewardFunction(_always_one, name="second")], model=tiny,
                        tokenizer=tokenizer)
    assert result.eval_after["avg@2"] == 1.0
    row = read_metrics(tmp_path / "run")[-1]
    assert row["accuracy"] == 1.0 and row["reward_mean"] == 0.0  # weight 0 on "second"
    with pytest.raises(DataError, match="accuracy_reward 'nope' names none of the reward functions"):
        dapo.train(config.replace(accuracy_reward="nope", reward_weights=[], output_dir=str(tmp_path / "run2")),
                   reward_fns=[zero], model=tiny, tokenizer=tokenizer)


def test_readme_documents_train_arguments_and_train_result():
    from dapo.trainer import TrainResult

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Python API"):readme.index("## Configuration")]
    for name in ("reward_fns", "task", "model", "tokenizer", "resume", "config.accuracy_reward"):
        assert f"`{name}`" in section, name
    assert "`dapo.RewardFunction(" in section
    for f in fields(TrainResult):
        assert f"`{f.name}`" in section, f.name
    assert "dapo.RewardFunction" in readme and "RewardFunction" in dapo.__all__


# --- 2. TRL's reward-call arguments and None ------------------------------------------------------

def test_call_reward_passes_trl_arguments():
    seen = {}

    def wants_all(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, answer):
        seen.update(ids=completion_ids, step=trainer_state.global_step, answer=answer)
        log_metric("my_metric", 1.0)  # TRL's logging hooks: callable, recorded nowhere yet
        log_extra("my_column", ["x", "y"])
        return [float(len(ids)) for ids in completion_ids]

    out = call_reward(wants_all, ["p", "p"], ["a", "b"], {"answer": ["1", "1"], "level": ["e", "e"]},
                      completion_ids=[[5, 6, 2], [7, 2]], trainer_state=TrainerState(global_step=3, max_steps=9))
    assert out == [3.0, 2.0]
    assert seen == {"ids": [[5, 6, 2], [7, 2]], "step": 3, "answer": ["1", "1"]}

    def only_ids(completion_ids):  # no prompts/completions, no **kwargs: still called
        return [0.0] * len(completion_ids)

    assert call_reward(only_ids, ["p"], ["a"], {}) == [0.0]
    # the old TypeError: a function naming completion_ids through the trainer's path
    scored = score_group([RewardFunction(lambda completions, completion_ids, **kw: [len(i) for i in completion_ids])],
                         {"prompt": "p"}, ["a", "bc"], completion_ids=[[1], [1, 2]], timeout=5.0)
    assert scored.scores[:, 0].tolist() == [1.0, 2.0]


def _math_only(prompts, completions, task, **kwargs):
    """TRL's multi-task example: None for the records this function does not apply to."""
    return [1.0 if t == "math" else None for t in task]


def _code_only(prompts, completions, task, **kwargs):
    return [0.5 if t == "code" else None for t in task]


def test_none_means_does_not_apply_and_combines_like_trl(capsys):
    values, problems = check_reward_values("f", [1.0, None, 2], 3)
    assert math.isnan(values[1]) and values[0] == 1.0 and values[2] == 2.0 and problems == []
    values, problems = check_reward_values("f", [1.0, float("nan"), "x"], 3, ["a", "b", "c"])
    assert values == [1.0, 0.0, 0.0] and [i for i, _ in problems] == [1, 2]
    assert check_reward_values("f", None, 2)[1] == [(None, "returned None instead of a list of 2 floats (or None per "
                                                          "completion it does not apply to)")]
    assert check_reward_values("f", [1.0], 2)[1] == [(None, "returned 1 values for 2 completions")]
    scores = torch.tensor([[1.0, math.nan], [math.nan, 0.5], [math.nan, math.nan]])
    torch.testing.assert_close(combine(scores, [2.0, 4.0]), torch.tensor([2.0, 2.0, 0.0]))
    assert "every reward function returned None for 1 completion" in all_none_warning(scores, ["p"] * 3, ["a"] * 3)
    assert all_none_warning(scores[:2]) is None

    fns = [RewardFunction(_math_only), RewardFunction(_code_only)]
    scored = score_completions(fns, ["p"] * 3, ["a", "b", "c"], {"task": ["math", "code", "poetry"]}, timeout=5.0)
    torch.testing.assert_close(combine(scored.scores, [1.0, 1.0]), torch.tensor([1.0, 0.5, 0.0]))
    assert scored.errors == 0
    with RewardScorer(fns, timeout=5.0) as scorer:  # a run's scorer warns once, as TRL does
        for _ in range(2):
            scorer.score([{"prompt": "p", "task": "poetry"}], ["c"])
    err = capsys.readouterr().err
    assert err.count("every reward function returned None") == 1


# --- 3. answer columns -----------------------------------------------------------------------------

def test_answer_column_and_the_columns_listed(tmp_path):
    rows = [{"question": "What is 2 + 2?", "solution": "4"}, {"question": "What is 1 + 2?", "solution": "3"}]
    data = str(_write_jsonl(tmp_path / "gsm.jsonl", rows))
    with pytest.raises(DataError) as e:
        build_task(DAPOConfig(data=data, prompt_column="question", reward=["numeric"]))
    assert str(e.value) == ("reward 'numeric' compares completions with an 'answer' column, which the training data "
                            "lacks (columns: question, solution); name the column that holds the answer with "
                            "--answer-column")
    task = build_task(DAPOConfig(data=data, prompt_column="question", reward=["numeric", "exact_match", "math"],
                                 answer_column="solution"))
    record = task.train[0]
    fns = as_reward_functions(list(task.rewards.values()))
    scored = score_group(fns, record, ["so it is 4", "4", "\\boxed{4}"], timeout=5.0)
    assert scored.scores.tolist() == [[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
    # reward_fns given as specs read the same column
    from dapo.tasks import use_reward_fns

    fns = use_reward_fns(task, ["numeric"], DAPOConfig(data=data, answer_column="solution"))
    assert score_group(fns, record, ["4"]).scores.tolist() == [[1.0]]


# --- 4. datasets saved with save_to_disk -------------------------------------------------------------

def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "What is 2 + 2?", "answer": "4"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(str(tmp_path / "dict"))
    from dapo.data import load_records

    assert [r["answer"] for r in load_records(str(tmp_path / "single"))] == ["2", "4"]
    assert [r["answer"] for r in load_records(str(tmp_path / "dict"), "test")] == ["4"]
    task = build_task(DAPOConfig(data=str(tmp_path / "single"), eval_data=str(tmp_path / "dict"),
                                 reward=["numeric"]))
    assert len(task.train) == 2 and [r["answer"] for r in task.eval] == ["4"]
    with pytest.raises(DataError, match="has no split 'validation'"):
        load_records(str(tmp_path / "dict"), "validation")


# --- 5. noise and silent choices ---------------------------------------------------------------

def test_math_reward_prints_no_timeout_warning_in_workers(capfd):
    fns = as_reward_functions(["math"])
    for _ in range(3):  # each call is a fresh forked worker
        score_completions(fns, ["p"], ["\\boxed{2}"], {"answer": ["2"]}, timeout=10.0)
    out, err = capfd.readouterr()
    assert "Timeout is disabled" not in out + err


def test_system_prompt_with_a_system_message_warns_once_per_run(capsys):
    """The run's Reporter says it once however many prompts have their own system message, and a
    second run in the same process is told again (the once-per-run state is the run's, not global)."""
    from dapo import data
    from dapo.reporting import Reporter

    chat = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    for _ in range(2):  # two runs in one process
        warn = Reporter().once("system_prompt")
        assert data.to_messages(chat, "Be kind.", warn)[0]["content"] == "Be terse."  # the data's own wins
        assert data.to_messages(chat, "Be kind.", warn)[0]["content"] == "Be terse."
        assert data.to_messages("hi", "Be kind.", warn)[0] == {"role": "system", "content": "Be kind."}
    err = capsys.readouterr().err
    assert err.count("--system-prompt is not used") == 2 and "'Be terse.'" in err


def test_an_error_in_evaluation_names_the_users_function(tokenizer, tiny):
    from dapo.evaluate import evaluate

    def is_correct(prompts, completions, **kwargs):
        raise ValueError("bad gold answer")

    with pytest.raises(RewardError, match=r"reward function 'is_correct' raised ValueError: bad gold answer"):
        evaluate(tiny, tokenizer, [{"prompt": "hi"}], is_correct, k=2, max_new_tokens=2)
    with pytest.raises(RewardError, match=r"reward function 'judge' raised"):
        evaluate(tiny, tokenizer, [{"prompt": "hi"}], RewardFunction(is_correct, name="judge"), k=2, max_new_tokens=2)


def test_docs_have_a_coming_from_trl_section():
    text = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text()
    section = text[text.index("## Coming from TRL"):]
    for needle in ("completion_ids", "trainer_state", "log_extra", "log_metric", "None", "reward_weights",
                   "answer_column", "accuracy_reward", "save_to_disk", "NaN", "system"):
        assert needle in section, needle
    assert re.search(r"[Dd]ifferen", section)
