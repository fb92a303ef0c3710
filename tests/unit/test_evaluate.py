"""Evaluation metrics against hand-computed values, the table, and run-directory resolution."""

import pytest
import torch
from safetensors.torch import save_file

from dapo.evaluate import evaluate, format_table, pass_at_k, resolve_model, summarize


def test_pass_at_k_unbiased_estimator_by_hand():
    # 1 - C(n - c, k) / C(n, k)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)    # C(3,2)=3, C(4,2)=6
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)   # C(3,3)=1, C(5,3)=10
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)         # pass@1 is the success rate
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 3, 2) == 1.0                         # n - c < k: every draw of 2 holds a success
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_summarize_by_hand():
    # three prompts, 4 samples each, with 1, 0 and 4 correct
    out = summarize([1, 0, 4], 4, [2, 2, 2, 2, 1, 1, 1, 1, 3, 3, 3, 3])
    assert out["avg@4"] == pytest.approx(5 / 12)
    assert out["pass@4"] == pytest.approx(2 / 3)
    assert out["response_length"] == pytest.approx(2.0)
    assert out["num_prompts"] == 3
    # pass@2 from 4 samples: (1 - C(3,2)/C(4,2)) + 0 + 1 over 3 prompts = (0.5 + 0 + 1) / 3
    assert summarize([1, 0, 4], 4, [1], k=2)["pass@2"] == pytest.approx(0.5)


def first_n_correct(prompts, completions, n, **_):
    """Marks the first n of each record's 4 samples correct, whatever they say: a deterministic
    judge. One call gets every record's samples, in order (TRL's convention)."""
    k = 4 if len(completions) == 4 * len(set(map(str, prompts))) else 1  # sampled, or greedy
    return [1.0 if i % k < n[i] else 0.0 for i in range(len(completions))]


RECORDS = [{"prompt": "a", "n": 3, "level": "x"}, {"prompt": "b", "n": 0, "level": "x"},
           {"prompt": "c", "n": 4, "level": "y"}]


def test_evaluate_sampled_and_greedy(tokenizer, tiny):
    out = evaluate(tiny, tokenizer, RECORDS, first_n_correct, k=4, max_new_tokens=3)
    assert out["avg@4"] == pytest.approx(7 / 12) and out["pass@4"] == pytest.approx(2 / 3)
    assert out["x/avg@4"] == pytest.approx(3 / 8) and out["x/pass@4"] == pytest.approx(1 / 2)
    assert out["y/avg@4"] == 1.0 and out["y/num_prompts"] == 1
    assert 1 <= out["response_length"] <= 3
    greedy = evaluate(tiny, tokenizer, RECORDS, first_n_correct, k=4, temperature=0.0, max_new_tokens=3)
    assert greedy["avg@1"] == pytest.approx(2 / 3) and greedy["pass@1"] == pytest.approx(2 / 3)
    table = format_table(out, "title")
    assert table.splitlines()[1].split() == ["subset", "prompts", "avg@4", "pass@4", "mean", "length"]
    assert table.splitlines()[3].split()[:4] == ["all", "3", "0.5833", "0.6667"]
    assert [line.split()[0] for line in table.splitlines()[4:]] == ["x", "y"]


def test_resolve_model_picks_the_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, False)):
        d = run / "checkpoints" / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / "dapo_config.yaml").write_text("task: arithmetic\n")
        save_file({"w": torch.zeros(2)}, d / "model.safetensors")  # checkpoints are verified before use
        if complete:
            (d / "COMPLETE").write_text(f"{step}\n")
    path, saved = resolve_model(str(run))
    assert path.endswith("step-000004") and saved.name == "dapo_config.yaml"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    from dapo.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no complete checkpoint"):
        resolve_model(str(tmp_path / "empty"))
