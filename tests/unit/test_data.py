"""Loaders: each file format through `datasets`, prompt normalisation, and bad input."""

import json

import pytest

from dapo.data import PromptSampler, load_records, normalize_records
from dapo.errors import DataError

ROWS = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 2 + 3?", "answer": "5"}]


def _write(tmp_path, fmt: str):
    import pandas as pd

    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "csv":
        pd.DataFrame(ROWS).to_csv(path, index=False)
    else:
        pd.DataFrame(ROWS).to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_each_format_loads_with_prompt_column(tmp_path, fmt):
    records = load_records(str(_write(tmp_path, fmt)), prompt_column="question")
    assert [r["prompt"] for r in records] == ["What is 1 + 1?", "What is 2 + 3?"]
    assert [str(r["answer"]) for r in records] == ["2", "5"]  # other columns are kept for rewards
    assert records[0]["question"] == "What is 1 + 1?"


def test_template_builds_the_prompt(tmp_path):
    records = load_records(str(_write(tmp_path, "jsonl")), prompt_template="Solve: {question} ({answer}?)")
    assert records[1]["prompt"] == "Solve: What is 2 + 3? (5?)"


def test_chat_messages_and_directory_with_splits(tmp_path):
    chat = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "answer": "x"}]
    (tmp_path / "train.jsonl").write_text(json.dumps(chat[0]) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "Bye"}], "answer": "y"}) + "\n")
    train = load_records(str(tmp_path), "train")
    assert train[0]["prompt"][1] == {"role": "user", "content": "Hi"}
    assert load_records(str(tmp_path), "test")[0]["prompt"] == [{"role": "user", "content": "Bye"}]
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: "):
        load_records(str(tmp_path), "validation")


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_records(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="the dataset is empty"):
        normalize_records([], source="x")


def test_missing_prompt_column_names_the_columns(tmp_path):
    with pytest.raises(DataError, match=r"has no column 'prompt' \(columns: question, answer\); name the prompt "
                                        r"column with --prompt-column"):
        load_records(str(_write(tmp_path, "jsonl")))


def test_template_naming_absent_column():
    with pytest.raises(DataError, match=r"prompt_template 'Q: \{problem\}' names column 'problem', which the data "
                                        r"lacks \(columns: question, answer\)"):
        normalize_records(ROWS, prompt_template="Q: {problem}")


def test_bad_prompt_values_name_the_record():
    with pytest.raises(DataError, match="record 1: the prompt is empty"):
        normalize_records([{"prompt": "ok"}, {"prompt": "  "}])
    with pytest.raises(DataError, match="record 0: a prompt must be a string"):
        normalize_records([{"prompt": 3}])


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="data file 'nope.jsonl' does not exist"):
        load_records("nope.jsonl")
    (tmp_path / "data.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_records(str(tmp_path / "data.txt"))


def test_sampler_walks_epochs_without_replacement():
    sampler = PromptSampler([{"prompt": str(i)} for i in range(5)], seed=3)
    first = sampler.next(5)
    assert sorted(r["prompt"] for r in first) == ["0", "1", "2", "3", "4"]
    sampler.next(2)
    assert (sampler.epoch, sampler.prompts_consumed) == (1, 7)
