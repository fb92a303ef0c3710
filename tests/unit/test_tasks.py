"""Built-in tasks and build_task: config -> records, reward functions, accuracy."""

import json

import pytest

from dapo import DAPOConfig
from dapo.errors import DataError
from dapo.rewards import numeric_reward
from dapo.tasks import arithmetic_records, build_task, reward_functions


def test_arithmetic_is_fixed_disjoint_and_levelled():
    train, held_out = arithmetic_records()
    assert (train, held_out) == arithmetic_records()  # fixed seed: same prompts every run
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert [sum(r["level"] == lv for r in held_out) for lv in ("easy", "medium", "hard")] == [16, 16, 16]
    assert [sum(r["level"] == lv for r in train) for lv in ("easy", "medium", "hard")] == [20, 48, 48]
    r = held_out[0]
    a, b = (int(x) for x in r["prompt"][len("What is "):].split("?")[0].split(" + "))
    assert r["answer"] == str(a + b) and r["prompt"].endswith("Answer with the number only.")


def test_build_task_builtin_and_overrides(tmp_path):
    task = build_task(DAPOConfig(task="arithmetic"))
    assert list(task.rewards) == ["numeric"] and task.accuracy is numeric_reward and len(task.eval) == 48
    (tmp_path / "r.py").write_text("def fmt(prompts, completions, **kw):\n    return [0.5] * len(completions)\n")
    task = build_task(DAPOConfig(task="arithmetic", reward=[f"{tmp_path}/r.py:fmt", "numeric"], reward_weights=[0.1, 1]))
    assert list(task.rewards) == ["fmt", "numeric"] and task.accuracy is task.rewards["fmt"]
    assert [(rf.name, rf.weight) for rf in reward_functions(task, [0.1, 1.0])] == [("fmt", 0.1), ("numeric", 1.0)]


def test_build_task_from_files(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.csv").write_text("question,answer\nWhat is 9 + 1?,10\n")
    c = DAPOConfig(data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "test.csv"),
                   prompt_template="Q: {question}", reward=["numeric"])
    task = build_task(c)
    assert [r["prompt"] for r in task.train][0] == "Q: What is 0 + 1?"
    assert task.eval[0]["prompt"] == "Q: What is 9 + 1?" and task.accuracy is numeric_reward
    with pytest.raises(DataError, match="needs reward functions"):
        build_task(c.replace(reward=[]))
    with pytest.raises(DataError, match="reward 'exact_match' compares completions with an 'answer' column"):
        (tmp_path / "noanswer.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
        build_task(DAPOConfig(data=str(tmp_path / "noanswer.jsonl"), reward=["exact_match"]))
