"""Every bad input and fault this branch handles ends in one readable message (exit 2, no
traceback unless --debug) or, for non-finite steps and signals, in the documented behaviour."""

from __future__ import annotations

import errno
import json
import math
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import dapo.actor
import dapo.build
import dapo.checkpoint
import dapo.metrics
import dapo.trainer
from dapo import DAPOConfig
from dapo.checkpoint import list_checkpoints
from dapo.cli import main
from dapo.errors import PromptTooLongError, RewardError, TrainingDiverged
from dapo.tasks import Task
from dapo.trainer import Trainer
from toy_run import TOY_OPTIONS, fails_with, toy_task, train


def use_toy_task(monkeypatch) -> None:
    monkeypatch.setattr(dapo.build, "build_task", lambda config, **_: toy_task(config.task))


# --- bad inputs -----------------------------------------------------------------------------
def test_prompt_longer_than_max_prompt_len(tiny_dir, tmp_path, capsys):
    fails_with(train(tiny_dir, tmp_path, "--max-prompt-len", "5"), capsys, "longer than max_prompt_len=5")


def test_debug_shows_the_traceback(tiny_dir, tmp_path):
    with pytest.raises(PromptTooLongError):
        main(train(tiny_dir, tmp_path, "--max-prompt-len", "5", "--debug"))


def test_dynamic_sampling_exhausted(tiny_dir, tmp_path, capsys):
    # a random model never answers with a bare digit: every group scores all zeros
    fails_with(train(tiny_dir, tmp_path, "--dynamic-sampling", "--max-num-gen-batches", "2"), capsys,
               "dynamic sampling found only 0 of 1 groups with differing rewards in max_num_gen_batches=2")


def test_nan_reward(tiny_dir, tmp_path, capsys, monkeypatch):
    nan_task = Task("nan", [{"prompt": "Hi"}], [], {"broken": lambda prompts, completions, **_: [math.nan] * 2})
    monkeypatch.setattr(dapo.build, "build_task", lambda config, **_: nan_task)
    fails_with(train(tiny_dir, tmp_path), capsys, "reward function 'broken' returned nan for completion 0")


def test_model_directory_without_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails_with(train(tmp_path / "empty", tmp_path / "run"), capsys, f"could not load model '{tmp_path / 'empty'}'")


# --- the run directory and the disk ------------------------------------------------------------
def test_run_dir_under_a_file(tiny_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    fails_with(train(tiny_dir, tmp_path / "file" / "run"), capsys, "cannot create run directory")


def test_unwritable_run_dir(tiny_dir, tmp_path, capsys):
    # chmod cannot stop root (our CI), so make the probe write itself fail: a directory stands
    # where the probe file goes, and open() raises IsADirectoryError, an OSError like EACCES.
    (tmp_path / ".dapo-write-test").mkdir()
    fails_with(train(tiny_dir, tmp_path), capsys, "is not writable")


def test_too_little_free_space_fails_before_training(tiny_dir, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(dapo.checkpoint.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    fails_with(train(tiny_dir, tmp_path), capsys, "only 1 MiB free")
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing ran


def test_disk_full_while_writing_a_checkpoint(tiny_dir, tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def save(obj, path, *a, **k):
        if "step-000002" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: file write failed")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(dapo.checkpoint.torch, "save", save)
    err = fails_with(train(tiny_dir, tmp_path, "--train-steps", "2", "--save-every", "1"), capsys,
                     "could not write checkpoint")
    assert "step-000002" in err and f"The previous checkpoint {tmp_path}/checkpoints/step-000001 is intact" in err
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the partial write is gone


def test_os_error_becomes_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    def full(self, step, metrics):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(dapo.metrics.MetricsLogger, "log", full)
    fails_with(train(tiny_dir, tmp_path), capsys, f"No space left on device ({tmp_path / 'metrics.jsonl'})")


# --- resuming ---------------------------------------------------------------------------------
def test_resume_checks(tiny_dir, tmp_path, capsys):
    fails_with(["train", "--resume", str(tmp_path / "nope")], capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    fails_with(["train", "--resume", str(tmp_path / "empty")], capsys, "holds no complete checkpoint")

    run = tmp_path / "run"
    assert main(train(tiny_dir, run)) == 0
    capsys.readouterr()
    fails_with(["train", "--resume", str(run), "--group-size", "4", "--lr", "0.1", "--no-verbose"], capsys,
               f"these fields differ from the checkpoint: group_size: 2 -> 4; lr: {DAPOConfig().lr!r} -> 0.1.")
    fails_with(["train", "--resume", str(run)], capsys, "already reached step 1 (train_steps=1)")
    fails_with(["train", "--resume", str(run), "--output-dir", str(tmp_path / "other")], capsys,
               "--output-dir cannot be combined with --resume")
    # logging, evaluation and a longer run are fine
    assert main(["train", "--resume", str(run), "--train-steps", "2", "--verbose", "--eval-samples", "3"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


# --- signals ----------------------------------------------------------------------------------
def test_second_ctrl_c_exits_at_once(tiny_dir, tmp_path, capsys, monkeypatch):
    use_toy_task(monkeypatch)
    monkeypatch.setenv("TOY_SIGNAL", "SIGINT")
    monkeypatch.setenv("TOY_SIGNAL_AT_CALLS", "1,2")  # two groups of train step 1's one generation round
    assert main(train(tiny_dir, tmp_path, "--gen-batch-size", "2", "--refill", "rounds", "--save-every", "1",
                      "--train-steps", "3")) == 130
    err = capsys.readouterr().err
    assert "SIGINT received; stopping after train step 1" in err and "dapo: interrupted" in err
    assert list_checkpoints(tmp_path) == [] and not list((tmp_path / "checkpoints").glob(".tmp-*"))


# --- non-finite loss --------------------------------------------------------------------------
def nan_on_calls(monkeypatch, bad) -> None:
    """Make policy_loss return NaN on the optimizer steps (calls, counted from 1) in `bad`."""
    real, calls = dapo.actor.policy_loss, [0]

    def policy_loss(*args, **kwargs):
        calls[0] += 1
        loss, metrics = real(*args, **kwargs)
        return (loss * math.nan if bad(calls[0]) else loss), metrics

    monkeypatch.setattr(dapo.actor, "policy_loss", policy_loss)


def toy_run(tmp_path: Path, **changes) -> Trainer:
    return Trainer(DAPOConfig(**{**TOY_OPTIONS, "output_dir": str(tmp_path), **changes}), task=toy_task())


def test_one_non_finite_step_is_skipped_and_counted(tiny_dir, tmp_path, capsys, monkeypatch):
    nan_on_calls(monkeypatch, lambda call: call == 2)
    run = toy_run(tmp_path, model=str(tiny_dir), train_steps=2)
    result = run.fit()
    assert [m["skipped_steps"] for m in result.metrics] == [1, 0]
    assert run.actor.optimizer_steps == 2 * 4 - 1 and run.actor.skipped_steps == 1
    assert "optimizer step skipped (1 in a row, the run stops at 3)" in capsys.readouterr().err
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_non_finite_steps_in_a_row_stop_the_run(tiny_dir, tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, lambda call: call > 4)  # train step 1 (4 optimizer steps) is fine
    run = toy_run(tmp_path, model=str(tiny_dir), save_every=1)
    with pytest.raises(TrainingDiverged, match=f"3 optimizer steps in a row had a non-finite loss.*train step 2.*"
                                               f"last good checkpoint is {tmp_path}/checkpoints/step-000001"):
        run.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "step-000001")


def test_reward_error_mid_run_keeps_the_trained_steps(tmp_path, tiny, tokenizer):
    """A reward function that breaks at train step 2 stops the run; step 1's training is saved."""
    calls = [0]

    def breaks_later(prompts, completions, **_):
        calls[0] += 1
        if calls[0] > 1:  # one call scores train step 1's one round of 3 prompts; step 2's round fails
            raise ValueError("database went away")
        return [float(len(c) % 3) for c in completions]

    task = Task("late", toy_task().train, [], {"breaks_later": breaks_later})
    run = Trainer(DAPOConfig(**{**TOY_OPTIONS, "output_dir": str(tmp_path), "reward_timeout": 0.0}), task=task,
              model=tiny, tokenizer=tokenizer)
    with pytest.raises(RewardError, match="'breaks_later' raised ValueError: database went away"):
        run.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
