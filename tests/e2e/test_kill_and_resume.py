"""Kill-and-resume: a run stopped by SIGTERM, or killed by SIGKILL while writing a checkpoint,
and then resumed ends with exactly the weights of a run that was never stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dapo import DAPOConfig
from dapo.checkpoint import list_checkpoints
from dapo.errors import TrainingInterrupted
from dapo.resume import find_checkpoint
from dapo.trainer import Trainer
from toy_run import TOY_OPTIONS, toy_argv, toy_task

TESTS = Path(__file__).resolve().parents[1]  # tests/: toy_run.py


def toy_run(model_dir: Path, out: Path, **changes) -> Trainer:
    config = DAPOConfig(**{**TOY_OPTIONS, "model": str(model_dir), "output_dir": str(out), **changes})
    return Trainer(config, task=toy_task())


def params(run: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() <= b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Weights after an uninterrupted toy run."""
    run = toy_run(tiny_dir, tmp_path_factory.mktemp("reference"))
    before = params(run)
    run.fit()
    after = params(run)
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    return after


def test_sigterm_then_resume_equals_uninterrupted_run(tiny_dir, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("TOY_SIGNAL_AT_CALLS", "4")  # step 1 scores 3 groups: this lands in step 2
    interrupted = toy_run(tiny_dir, tmp_path)
    with pytest.raises(TrainingInterrupted, match="Interrupted at step 2; resume with: dapo train --resume") as e:
        interrupted.fit()
    assert e.value.exit_code == 143
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]
    assert len(interrupted.collector.buffer.groups) == 2  # carried-over groups travel in the checkpoint

    monkeypatch.delenv("TOY_SIGNAL_AT_CALLS")
    resumed = toy_run(tiny_dir, tmp_path)
    resumed.restore(find_checkpoint(tmp_path))
    resumed.fit()
    assert_same_tensors(params(resumed), reference)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert resumed.actor.optimizer_steps == 4 * 2 * 2


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TESTS / "toy_run.py"), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_cli_sigkill_during_checkpoint_then_sigterm_then_resume(tiny_dir, reference, tmp_path):
    run = tmp_path / "run"
    # SIGKILL once the weights of checkpoint 2 are written, before the rest: checkpoint 1 stays the newest.
    killed = cli("train", "--model", str(tiny_dir), *toy_argv(), "--output-dir", str(run), "--save-every", "1",
                 env={"TOY_KILL_WRITING_CHECKPOINT": "2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in list_checkpoints(run)] == ["step-000001"]
    assert list((run / "checkpoints").glob(".tmp-step-000002-*/model.safetensors"))  # the half-written one
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-000001")  # still loadable

    # Resume, and SIGTERM mid-step 2 (its generation round): the step finishes, a checkpoint is
    # written, exit 143 with the line that says how to resume.
    stopped = cli("train", "--resume", str(run), env={"TOY_SIGNAL_AT_CALLS": "2"})
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert f"Interrupted at step 2; resume with: dapo train --resume {run}" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert not list((run / "checkpoints").glob(".tmp-*"))

    resumed = cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_tensors(load_file(list_checkpoints(run)[-1] / "model.safetensors"), reference)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
