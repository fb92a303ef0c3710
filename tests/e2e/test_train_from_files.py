"""End to end on a tiny model: train from a JSONL file with a reward file, then `dapo eval` on the run."""

import json

from dapo import DAPOConfig
from dapo.cli import main
from dapo.metrics import read_evals, read_metrics
from dapo.trainer import Trainer

REWARDS = '''
def short(prompts, completions, answer, **kw):
    """Rewards answers of at most 8 characters: a tiny random model sometimes writes one."""
    return [1.0 if len(c) <= 8 else 0.0 for c in completions]
'''


def test_train_on_file_then_eval_run_dir(tokenizer, tiny, tmp_path, capsys):
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(3) for b in range(3)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[6:]))
    (tmp_path / "rewards.py").write_text(REWARDS)
    reward = f"{tmp_path}/rewards.py:short"
    config = DAPOConfig(data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "test.jsonl"),
                        prompt_column="question", reward=[reward, "numeric"], reward_weights=[1.0, 1.0],
                        group_size=4, gen_batch_size=2, train_batch_size=2, max_new_tokens=3, train_steps=2, mu=1,
                        eval_samples=2, eval_every=1, dynamic_sampling=False, verbose=False, threads=1,
                        output_dir=str(tmp_path / "run"))
    result = Trainer(config, model=tiny, tokenizer=tokenizer).fit()
    rows_logged = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows_logged] == [1, 2]
    for key in ("reward/short", "reward/numeric", "reward_errors", "gen_rounds", "groups_kept", "prompts_consumed",
                "data_epoch"):
        assert key in rows_logged[-1], key
    assert rows_logged[-1]["prompts_consumed"] == 4
    evals = read_evals(tmp_path / "run")
    assert [r["step"] for r in evals] == [0, 1, 2]  # step 0: the untrained model; eval_every 1; after training
    assert evals[0]["avg@2"] == result.eval_before["avg@2"]
    assert evals[-1]["avg@2"] == result.eval_after["avg@2"]
    assert {"avg@2", "pass@2", "response_length"} <= set(evals[-1])

    code = main(["eval", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "test.jsonl"),
                 "--eval-samples", "3", "--threads", "1", "--trust-run-rewards"])  # the run's rewards.py is code
    out = capsys.readouterr().out
    assert code == 0, out
    assert "step-000002" in out and "avg@3" in out and "pass@3" in out
    assert out.splitlines()[-1].split()[:2] == ["all", "3"]


def test_eval_errors_are_one_line(tmp_path, capsys):
    code = main(["eval", "--data", str(tmp_path / "missing.jsonl"), "--reward", "numeric"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"dapo: error: data file '{tmp_path}/missing.jsonl' does not exist"
