"""Progress display, metrics/eval/samples files, trackers, `dapo plot` and the summary table."""

from __future__ import annotations

import io
import json
import math
import re
import sys

import pytest

from dapo import DAPOConfig
from dapo.cli import main
from dapo.errors import ConfigError
from dapo.metrics import read_evals, read_jsonl, read_metrics
from dapo.plot import PANELS, load_run, points, render
from dapo.progress import (PlainProgress, RichProgress, eta_seconds, format_duration, make_progress, print_summary,
                           step_line, summary_rows)
from dapo.tasks import Task
from dapo.trackers import make_trackers, scalars
from dapo.trainer import Trainer
from toy_run import tiny_model


def vowel_reward(prompts, completions, **_):
    return [1.0 if c.strip()[:1].lower() in ("a", "e", "i", "o", "u") and c.strip() else 0.0 for c in completions]


def vowel_task() -> Task:
    record = {"prompt": "Say a word."}
    return Task("vowel", [record], [record], {"vowel": vowel_reward}, vowel_reward)


def short_config(tmp_path, **kw) -> DAPOConfig:
    values = dict(group_size=4, max_new_tokens=2, train_steps=3, mu=1, lr=1e-3, verbose=False,
                  output_dir=str(tmp_path / "run"), threads=1, eval_samples=4, dynamic_sampling=False,
                  log_samples_every=2, trackers=["tensorboard"])
    values.update(kw)
    return DAPOConfig(**values)


@pytest.fixture(scope="module")
def short_run(tokenizer, tmp_path_factory):
    """One short run on a tiny model, --no-verbose, TensorBoard on; returns (result, stdout)."""
    tmp_path = tmp_path_factory.mktemp("obs")
    run = Trainer(short_config(tmp_path), task=vowel_task(), model=tiny_model(len(tokenizer), seed=0), tokenizer=tokenizer)
    out = io.StringIO()
    old, sys.stdout = sys.stdout, out  # a StringIO is no terminal: the display must fall back to lines
    try:
        result = run.fit()
    finally:
        sys.stdout = old
    return result, out.getvalue()


# --- metrics.jsonl, eval.jsonl, samples.jsonl -------------------------------------------------
def test_metrics_round_trip_every_key_every_step_finite(short_run):
    result, _ = short_run
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    keys = set(rows[0])
    for key in ("reward_mean", "batch_reward_mean", "accuracy", "response_length_mean", "response_length_max",
                "truncated_share", "entropy", "clip_frac_low", "clip_frac_high", "approx_kl", "grad_norm", "lr",
                "objective", "groups_kept", "groups_dropped_all_same", "gen_rounds", "gen_seconds",
                "train_seconds", "step_seconds", "gen_tokens_per_second", "train_tokens_per_second",
                "optimizer_steps"):
        assert key in keys, key
    for r in rows:
        assert set(r) == keys
        for k, v in r.items():
            assert isinstance(v, (int, float)) and not isinstance(v, bool), (k, v)
            assert math.isfinite(v), (k, v)
    # what the file holds is what the trainer returned
    assert rows == json.loads(json.dumps(result.metrics))


def test_evaluations_go_to_eval_jsonl(short_run):
    result, _ = short_run
    evals = read_evals(result.run_dir)
    assert [e["step"] for e in evals] == [0, 3]
    assert evals[0]["avg@4"] == result.eval_before["avg@4"]
    assert evals[-1]["avg@4"] == result.eval_after["avg@4"]


def test_samples_written_every_n_steps(short_run):
    result, _ = short_run
    samples = read_jsonl(result.run_dir / "samples.jsonl")
    assert sorted({s["step"] for s in samples}) == [1, 2]  # step 1 and every 2nd
    assert len(samples) == 2 * 4
    for s in samples:
        assert {"prompt", "completion", "reward", "advantage", "length", "truncated"} <= set(s)
        assert s["prompt"] == "Say a word." and isinstance(s["truncated"], bool)
        assert 0 <= s["length"] <= 2


# --- progress display -------------------------------------------------------------------------
def test_no_verbose_off_terminal_prints_plain_lines(short_run):
    _, out = short_run
    assert "\x1b[" not in out and "\r" not in out  # no colours, no cursor movement
    lines = out.splitlines()
    for step in (1, 2, 3):
        assert any(line.startswith(f"step {step}/3 | reward ") and "s/step" in line and "ETA" in line
                   for line in lines), out
    assert any(line.startswith("eval before training: avg@4 ") for line in lines)
    assert "Grad step" not in out and "Reward: " not in out  # the seed's lines are verbose-only


def test_verbose_keeps_the_seed_lines(tokenizer, tmp_path, capsys):
    config = short_config(tmp_path, verbose=True, train_steps=1, trackers=[])
    Trainer(config, task=vowel_task(), model=tiny_model(len(tokenizer), seed=0), tokenizer=tokenizer).fit()
    out = capsys.readouterr().out
    assert "-- Generating rollouts" in out and "-- Training" in out
    assert "Grad step 1/1 in train step 1/1 completed. Objective: " in out
    assert any(line.startswith("Reward: ") and "; Response: " in line for line in out.splitlines())
    assert "step 1/1 |" not in out  # no progress display on top of the seed's lines


def test_rich_display_on_a_terminal_runs_every_hook():
    from rich.console import Console

    buf = io.StringIO()
    p = RichProgress(Console(file=buf, force_terminal=True, width=120))
    p.phase("Evaluating before training")
    p.start(2, 3, 1)
    for step in (1, 2):
        p.generation_round(step, 1, 0, 0.1)
        p.generation_round(step, 2, 1, 0.5)
        for g in (1, 2, 3):
            p.grad_step(step, g, -0.1)
        p.step_done(step, {"reward_mean": 0.5, "accuracy": 0.25, "step_seconds": 1.5})
    p.close()
    p.evaluated("after training", {"avg@4": 0.5})
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert "train steps" in text and "reward 0.500" in text and "avg@4 0.500" in text


def test_make_progress_picks_by_mode_and_terminal():
    assert type(make_progress(True)).__name__ == "VerboseProgress"  # the seed example's lines
    assert isinstance(make_progress(False, io.StringIO()), PlainProgress)


def test_formatting_helpers():
    assert eta_seconds(10.0, 0, 5) is None
    assert eta_seconds(10.0, 2, 6) == 20.0
    assert format_duration(None) == "?" and format_duration(65) == "1:05" and format_duration(3725) == "1:02:05"
    line = step_line(2, 6, {"reward_mean": 0.25, "step_seconds": 3.0, "groups_kept": 1}, 12.0)
    assert line.startswith("step 2/6 | reward 0.250 |") and "3.0 s/step" in line and "ETA 0:12" in line


def test_summary_table_off_terminal(tmp_path):
    rows = summary_rows(6, 42.0, [{"step": 6, "reward_mean": 0.9, "accuracy": 0.8}], {"avg@32": 0.1}, {"avg@32": 0.9},
                        tmp_path / "checkpoints" / "step-000006", tmp_path)
    buf = io.StringIO()
    print_summary(rows, buf)
    text = buf.getvalue()
    assert "\x1b[" not in text
    for needle in ("train steps", "0:42", "0.900", "0.100 before -> 0.900 after", "step-000006", f"dapo plot {tmp_path}"):
        assert needle in text, needle


def test_summary_reports_what_the_last_sampling_step_sampled(tmp_path):
    """The default run stops as solved at step 10 after 320 of 320 correct answers, and its step 9
    trained on a group carried over from step 8 (sampling nothing): the summary's final accuracy is
    step 10's 1.000, not the carried group's 0.125."""
    metrics = [{"step": 8, "reward_mean": 0.78, "accuracy": 0.5},
               {"step": 9, "reward_mean": None, "accuracy": None, "batch_reward_mean": 0.9, "batch_accuracy": 0.125}]
    rows = dict(summary_rows(9, 30.0, metrics, {}, {}, "ckpt", tmp_path,
                             stopped={"step": 10, "reward_mean": 1.0, "accuracy": 1.0}))
    assert rows["final train accuracy (sampled at step 10, stopped as solved)"] == "1.000"
    assert rows["final reward (mean, sampled at step 10, stopped as solved)"] == "1.000"
    rows = dict(summary_rows(9, 30.0, metrics, {}, {}, "ckpt", tmp_path))  # ran out of steps: the last that sampled
    assert rows["final train accuracy (sampled at step 8)"] == "0.500"
    line = step_line(9, 12, metrics[1], None)
    assert "carried over: batch reward 0.900" in line and "acc" not in line


# --- trackers ---------------------------------------------------------------------------------
def test_tensorboard_event_files_written(short_run):
    result, _ = short_run
    events = list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(result.run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "reward_mean" in tags and "eval/avg@4" in tags
    assert [e.step for e in acc.Scalars("reward_mean")] == [1, 2, 3]


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ConfigError, match="pip install wandb"):
        make_trackers(["wandb"], tmp_path, {})


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="trackers must be among"):
        DAPOConfig(trackers=["mlflow"])


def test_scalars_keeps_finite_numbers_only():
    assert scalars({"a": 1, "b": 2.5, "c": None, "d": float("nan"), "e": True, "f": "x"}) == {"a": 1.0, "b": 2.5}


# --- dapo plot --------------------------------------------------------------------------------
def write_synthetic_run(path, steps=40, scale=1.0, with_eval=True):
    path.mkdir(parents=True)
    with (path / "metrics.jsonl").open("w") as f:
        for s in range(1, steps + 1):
            x = s / steps
            f.write(json.dumps({
                "step": s, "reward_mean": scale * x, "batch_reward_mean": scale * x + 0.05, "accuracy": x * 0.9,
                "response_length_mean": 100 + 50 * x, "response_length_max": 200 + 80 * x, "entropy": 1.0 - 0.5 * x,
                "clip_frac_low": 0.001 * x, "clip_frac_high": 0.01 * x, "approx_kl": 0.002 * x, "groups_kept": 8,
                "groups_dropped_all_same": int(10 * x), "gen_seconds": 20.0, "train_seconds": 10.0,
                "truncated_share": 0.1 * x}) + "\n")
    if with_eval:
        with (path / "eval.jsonl").open("w") as f:
            for s in (0, steps // 2, steps):
                f.write(json.dumps({"step": s, "avg@32": s / steps, "pass@32": min(1.0, 2 * s / steps)}) + "\n")
    return path


def test_plot_points_read_eval_wildcards(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "a", steps=10))
    assert points(run, "eval:avg@*") == ([0, 5, 10], [0.0, 0.5, 1.0])
    assert points(run, "missing") == ([], [])
    assert all(isinstance(p.title, str) for p in PANELS)


def test_plot_one_and_two_synthetic_runs(tmp_path):
    a = write_synthetic_run(tmp_path / "run-a")
    b = write_synthetic_run(tmp_path / "run-b", scale=0.5, with_eval=False)
    assert main(["plot", str(a)]) == 0
    assert (a / "dashboard.png").stat().st_size > 10_000
    out = tmp_path / "compare.png"
    assert main(["plot", str(a), str(b), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_a_real_short_run(short_run, tmp_path):
    result, _ = short_run
    out = render([load_run(result.run_dir)], tmp_path / "short.png")
    assert out.stat().st_size > 10_000


def test_plot_rejects_a_directory_without_metrics(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
