"""The Checkpointer: trainer state nested per part, each part checking its own keys; a checkpoint
written by the previous format (version 2, flat) still resumes exactly; a full disk is named as
such; `--resume` verifies the checkpoint once."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

import dapo.checkpoint
from dapo import DAPOConfig
from dapo.checkpoint import write_manifest
from dapo.checkpointer import upgrade
from dapo.config import SAVED_BEFORE_FIELD
from dapo.errors import CheckpointError, ResumeError
from dapo.trainer import Trainer
from toy_run import TESTS, TOY_OPTIONS, fails_with, toy_task, train

FIXTURES = TESTS / "fixtures"


def unpack_v2_run(tmp_path: Path) -> Path:
    """tests/fixtures/v2_run.tar.gz (written by dapo at commit 6d92eb4: make_v2_run.py), moved to
    `tmp_path`: its saved configs name /tmp/v2fix paths, rewritten here (and the manifest with them)."""
    with tarfile.open(FIXTURES / "v2_run.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step-000002"
    for path in (run / "config.yaml", checkpoint / "dapo_config.yaml"):
        values = yaml.safe_load(path.read_text())
        values.update(model=str(checkpoint), output_dir=str(run))  # the checkpoint is a model directory too
        path.write_text(yaml.safe_dump(values, sort_keys=False))
    write_manifest(checkpoint)
    return run


def sampler_of_6d92eb4(monkeypatch) -> None:
    """The fixture's run sampled with the generic DynamicCache loop and torch.multinomial draws;
    replaying it exactly needs that sampler (same distribution, other random draws since 2026-12)."""
    import dapo.rollout as rollout
    monkeypatch.setattr(rollout, "unsupported_reason", lambda model: "the sampler of 6d92eb4")
    monkeypatch.setattr(rollout, "_draw", lambda probs, generator: torch.multinomial(probs, 1, generator=generator)
                        .squeeze(-1))


def test_a_version_2_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    sampler_of_6d92eb4(monkeypatch)
    run = unpack_v2_run(tmp_path)
    checkpoint = run / "checkpoints" / "step-000002"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["version"] == 2 and "sampler" in state and "actor" not in state  # really the old format
    # The run's surplus groups opened the next step's batch, uncorrected (what a saved config without
    # these keys means, SAVED_BEFORE_FIELD); today's defaults would refuse to resume it.
    config = DAPOConfig(**{**TOY_OPTIONS, "model": str(checkpoint), "output_dir": str(run), **SAVED_BEFORE_FIELD})
    with pytest.raises(ResumeError, match="surplus: 'carry' -> 'train'"):
        Trainer(config.replace(surplus="train", stale_correction="tis"), task=toy_task()).restore(checkpoint)
    trainer = Trainer(config, task=toy_task())
    trainer.restore(checkpoint)
    assert trainer.step == 2 and len(trainer.collector.buffer.groups) == 2  # the carried-over groups came along
    trainer.fit()
    expected = json.loads((FIXTURES / "v2_run_expected.json").read_text())
    sums = {k: float(v.double().sum()) for k, v in trainer.model.state_dict().items()}
    assert sums == pytest.approx(expected["weight_sums"], rel=1e-5, abs=1e-6)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for got, want in zip(rows[2:], expected["metrics"][2:]):  # the resumed steps sample what the old run did
        assert got["batch_reward_mean"] == want["batch_reward_mean"] and got["gen_tokens"] == want["gen_tokens"]
        assert got["objective"] == pytest.approx(want["objective"], rel=1e-4, abs=1e-7)


def test_state_is_nested_per_part_and_each_part_checks_its_keys(tiny_dir, tmp_path):
    trainer = Trainer(DAPOConfig(**{**TOY_OPTIONS, "model": str(tiny_dir), "output_dir": str(tmp_path)}),
                      task=toy_task())
    state = trainer.checkpointer.state_dict(0)
    assert set(state) == {"version", "step", "world_size", "rng", "actor", "collector", "engine"}
    assert state["version"] == 3 and state["engine"] == {}
    assert set(state["actor"]) == {"optimizer", "scheduler", "optimizer_steps", "skipped_steps", "bad_steps_in_row"}
    assert set(state["collector"]) == {"prompts", "buffer", "refill", "samples_generated", "ahead"}
    broken = dict(state["collector"])
    del broken["refill"]
    with pytest.raises(CheckpointError, match="collector state lacks refill"):
        trainer.collector.load_state_dict(broken)
    with pytest.raises(CheckpointError, match="actor state lacks optimizer, scheduler"):
        trainer.actor.load_state_dict({"optimizer_steps": 0})
    assert upgrade(state) is state
    with pytest.raises(CheckpointError, match="version 7"):
        upgrade({"version": 7})
    trainer.parts.close()


def test_a_full_disk_is_named_with_free_and_needed_space(tiny_dir, tmp_path, capsys, monkeypatch):
    """torch.save meets a full disk as "[enforce fail at inline_container.cc:672] . unexpected pos";
    the run says the disk is full, how much is free and how much a checkpoint needs."""
    def no_room(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 64)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    real_usage = shutil.disk_usage
    monkeypatch.setattr(dapo.checkpoint.torch, "save", no_room)
    monkeypatch.setattr(dapo.checkpoint.shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=3 * 2**20) if "checkpoints" in str(p) else real_usage(p))
    err = fails_with(train(tiny_dir, tmp_path), capsys, "the disk is full (3 MiB free in")
    assert "a checkpoint needs about" in err and "unexpected pos" not in err and "Writing model shards" not in err
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the partial write is gone


def test_resume_verifies_each_checkpoint_once(tiny_dir, tmp_path, capsys, monkeypatch):
    """`dapo train --resume` chose its checkpoint twice (CLI, then the trainer): every damaged
    checkpoint's warning printed twice and every file was hashed twice."""
    from dapo.cli import main

    assert main(train(tiny_dir, tmp_path, "--train-steps", "2", "--save-every", "1")) == 0
    newest = tmp_path / "checkpoints" / "step-000002"
    (newest / "model.safetensors").write_bytes(b"damaged")
    verified = []
    real = dapo.checkpoint.verify_checkpoint
    monkeypatch.setattr(dapo.checkpoint, "verify_checkpoint", lambda c, **kw: verified.append(Path(c).name) or real(c, **kw))
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path), "--train-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert err.count("step-000002 is damaged") == 1, err
    assert verified == ["step-000002", "step-000001"]
