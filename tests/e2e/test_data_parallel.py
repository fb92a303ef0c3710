"""Data-parallel training under torchrun (FSDP2 over gloo on CPU, 2 ranks): the same weights as
one process, exact resume at equal world size, and resume with another world size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dapo.checkpoint import RNG_DIR, SHARDED_DIR, latest_checkpoint, list_checkpoints, verify_checkpoint
from toy_run import toy_argv

TESTS = Path(__file__).resolve().parents[1]  # tests/: toy_run.py
SRC = TESTS.parent / "src"


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TOY_SIGNAL_AT_CALLS"):
        if k not in extra:
            out.pop(k, None)
    return out


def run(nproc: int, *args: str, **extra: str) -> subprocess.CompletedProcess:
    """tests/toy_run.py (dapo with the toy task) on `nproc` ranks (torchrun) or one plain process."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc > 1 else [sys.executable])
    return subprocess.run([*launcher, str(TESTS / "toy_run.py"), "train", *args], capture_output=True, text=True,
                          timeout=300, env=env(**extra))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow  # 30-50 s: each torchrun start costs several seconds; CI runs them
def test_two_ranks_equal_one_process(tiny_dir, tmp_path):
    """2 train steps on identical batches (fixed responses): ranks split every mini-batch of 3
    groups 2 + 1, and the small token budget gives them unequal numbers of micro-batches."""
    options = ["--model", str(tiny_dir), *toy_argv(), "--train-steps", "2", "--train-batch-size", "3",
               "--gen-batch-size", "4", "--mini-batch-size", "3", "--max-tokens-per-micro-batch", "48",
               "--threads", "1"]
    one = run(1, *options, "--output-dir", str(tmp_path / "one"), TOY_ENGINE="fixed")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(2, *options, "--output-dir", str(tmp_path / "two"), TOY_ENGINE="fixed")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    initial = load_file(str(tiny_dir / "model.safetensors"))
    assert max_difference(a, initial) > 1e-3  # training moved the weights
    print("max |w1 - w2| =", max_difference(a, b))
    assert max_difference(a, b) < 1e-5
    # One metrics file, rank 0's, with one row per step.
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2
    ckpt = latest_checkpoint(tmp_path / "two")
    assert (ckpt / SHARDED_DIR).is_dir() and (ckpt / RNG_DIR / "rank-00001.pt").is_file()
    assert verify_checkpoint(ckpt) is None


@pytest.mark.slow  # 80 s: five launches
def test_two_ranks_resume_exact_and_with_one_rank(tiny_dir, tmp_path):
    """Interrupted after step 1 (SIGTERM on rank 0 during step 1: both ranks stop after it),
    resumed with 2 ranks: the uninterrupted 2-rank run's weights. Resumed with 1 rank: it finishes
    and says that the world size changed."""
    options = ["--model", str(tiny_dir), *toy_argv(), "--train-steps", "2", "--threads", "1"]
    full = run(2, *options, "--output-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]

    stopped = run(2, *options, "--output-dir", str(tmp_path / "cut"), TOY_SIGNAL_AT_CALLS="1", TOY_SIGNAL_RANK="0")
    assert stopped.returncode != 0
    assert "Interrupted at step 1" in stopped.stderr, stopped.stderr[-3000:]
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-000001"]
    import shutil

    shutil.copytree(tmp_path / "cut", tmp_path / "cut1", ignore=shutil.ignore_patterns(".lock"))

    resumed = run(2, "--resume", str(tmp_path / "cut"), "--threads", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_difference(weights(tmp_path / "cut"), weights(tmp_path / "full")) == 0.0

    one = run(1, "--resume", str(tmp_path / "cut1"), "--threads", "1")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resuming a checkpoint of 2 ranks with 1" in one.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "cut1")][-1] == "step-000002"


@pytest.mark.slow  # 20 s
def test_an_error_in_rank_0s_evaluation_ends_every_rank_with_it(tiny_dir, tmp_path):
    """Rank 0 evaluates alone. When that raises (a reward function that fails on held-out prompts,
    at the evaluation after step 1), every rank ends with the same one-line error and step 1 is
    saved; before, rank 0 went to a checkpoint broadcast while the other rank waited in the next
    step's collective, until torchrun killed it."""
    options = ["--model", str(tiny_dir), *toy_argv(), "--train-steps", "3", "--eval-every", "1", "--threads", "1",
               "--output-dir", str(tmp_path / "run")]
    failed = run(2, *options, TOY_EVAL_RAISES_AT="1")
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("dapo: error:")]
    assert len(errors) == 2 and errors[0] == errors[1], failed.stderr[-3000:]
    assert "the held-out judge broke" in errors[0] and "judge" in errors[0]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000001"]  # nothing trained is lost


def test_nproc_runs_the_launcher(monkeypatch):
    """`dapo train --nproc 2 ...` runs dapo.launch with the same arguments, --nproc left out."""
    import dapo.cli
    import dapo.launch

    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dapo.launch, "launch", lambda *args: calls.append(args) or 0)
    assert dapo.cli.main(["train", "--nproc", "2", "--lr", "1e-5", "--train-steps", "2"]) == 0
    assert calls == [(2, ["train", "--lr", "1e-5", "--train-steps", "2"], None)]
    assert dapo.cli.without_nproc(["train", "--nproc=2", "--lr", "1"]) == ["train", "--lr", "1"]


def test_share_matches_trainbatch_shard():
    from dapo.distributed import share

    items = list(range(7))
    assert [share(items, r, 3) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [share([0], r, 2) for r in range(2)] == [[0], []]
