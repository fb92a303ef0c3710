"""Runs that survive: run-directory ownership, damaged state, absolute paths,
the final checkpoint, checkpoint verification, untrusted code in run directories, out of memory.

Every CLI failure here is one `dapo: error:` line (exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dapo.actor
import dapo.rollout
import dapo.trainer
from dapo.checkpoint import MANIFEST, list_checkpoints, load_trainer_state, verify_checkpoint, write_manifest
from dapo.cli import main
from dapo.config import DAPOConfig
from dapo.errors import CheckpointError, DapoError, OutOfMemory, oom_guard
from dapo.evaluate import resolve_model
from dapo.resume import find_checkpoint
from dapo.rundir import _held, acquire_run_lock
from toy_run import fails_with, train

SRC = Path(dapo.trainer.__file__).parent.parent


@pytest.fixture(scope="module")
def two_step_run(tiny_dir, tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints step-000001 and step-000002."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert main(train(tiny_dir, run, "--train-steps", "2", "--save-every", "1")) == 0
    assert [p.name for p in list_checkpoints(run)] == ["step-000001", "step-000002"]
    return run


@pytest.fixture()
def run_copy(two_step_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(two_step_run, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- 1. ownership of a run directory ------------------------------------------------------------
def test_a_run_directory_in_use_is_refused(run_copy, tiny_dir, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dapo.rundir import acquire_run_lock; "
         "lock = acquire_run_lock(sys.argv[1]); print('locked', flush=True); time.sleep(120)", str(run_copy)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (run_copy / "metrics.jsonl").read_bytes()
        err = fails_with(["train", "--resume", str(run_copy), "--train-steps", "3"], capsys,
                         f"run directory {run_copy} is in use by another dapo process (pid {holder.pid} on host")
        fails_with(train(tiny_dir, run_copy, "--overwrite"), capsys, "is in use by another dapo process")
        assert (run_copy / "metrics.jsonl").read_bytes() == before  # nothing touched
        assert "Traceback" not in err
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: the lock file still names it, but the lock is free.
    assert str(holder.pid) in (run_copy / ".lock").read_text()
    with acquire_run_lock(run_copy) as lock:
        assert lock.held and f"pid {holder.pid}" in lock.stale_holder
    assert not _held


def test_new_run_refuses_a_directory_holding_a_run_unless_overwrite(run_copy, tiny_dir, capsys):
    before = {p: p.read_bytes() for p in (run_copy / "metrics.jsonl", run_copy / "eval.jsonl")}
    fails_with(train(tiny_dir, run_copy), capsys, f"run directory {run_copy} already holds a run (config.yaml, "
               "metrics.jsonl")
    assert {p: p.read_bytes() for p in before} == before
    assert [p.name for p in list_checkpoints(run_copy)] == ["step-000001", "step-000002"]

    # --overwrite on a run that fails to start (its data is missing) deletes nothing
    fails_with(train(tiny_dir, run_copy, "--overwrite", "--data", str(run_copy / "missing.jsonl"), "--reward",
                     "exact_match"), capsys, "does not exist")
    assert {p: p.read_bytes() for p in before} == before and len(list_checkpoints(run_copy)) == 2
    assert main(train(tiny_dir, run_copy, "--overwrite")) == 0  # a 1-step run replaces the 2-step one
    assert [p.name for p in list_checkpoints(run_copy)] == ["step-000001"]
    assert steps_logged(run_copy) == [1]
    assert [json.loads(line)["step"] for line in (run_copy / "eval.jsonl").read_text().splitlines()] == [0, 1]
    assert "overwrite: false" in (run_copy / "config.yaml").read_text()  # reusing the file never deletes a run
    assert not _held  # released on exit


def test_overwrite_cannot_be_combined_with_resume(run_copy, capsys):
    fails_with(["train", "--resume", str(run_copy), "--overwrite"], capsys,
               "--overwrite cannot be combined with --resume")


def test_lock_is_released_on_errors_and_reentrant():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with acquire_run_lock(d) as outer:
            with acquire_run_lock(d) as inner:
                assert inner is outer
            assert outer.held
        assert not outer.held and not _held


# --- 2. damaged inputs: one line, naming the file and the problem ---------------------------------
def test_config_file_with_non_utf8_bytes(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_bytes(b"group_size: 4\nsystem_prompt: caf\xe9\n")
    fails_with(["train", "--config", str(tmp_path / "bad.yaml")], capsys,
               f"config file '{tmp_path}/bad.yaml' is not UTF-8 text (byte 0xe9 on line 2)")


def test_jsonl_prompt_with_non_utf8_bytes(tiny_dir, tmp_path, capsys):
    (tmp_path / "data.jsonl").write_bytes(b'{"prompt": "ok", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
    fails_with(train(tiny_dir, tmp_path / "run", "--data", str(tmp_path / "data.jsonl"), "--reward", "exact_match"),
               capsys, f"data file '{tmp_path}/data.jsonl', line 2: byte 0xe9 is not UTF-8")


def test_negative_seed(tiny_dir, tmp_path, capsys):
    fails_with(train(tiny_dir, tmp_path / "run", "--seed", "-1"), capsys, "seed must be an integer in [0, 2**32 - 1]")


@pytest.mark.parametrize("template", ["{prompt.x}", "{prompt[0]}", "{0}"])
def test_prompt_template_reaching_into_attributes(tiny_dir, tmp_path, capsys, template):
    (tmp_path / "data.jsonl").write_text('{"prompt": "hi", "answer": "1"}\n')
    fails_with(train(tiny_dir, tmp_path / "run", "--data", str(tmp_path / "data.jsonl"), "--reward", "exact_match",
                     "--prompt-template", template), capsys, "must name a column")


def test_plot_with_a_torn_last_line_and_a_damaged_middle_line(run_copy, tmp_path, capsys):
    metrics = run_copy / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 3, "reward_me')  # a run killed mid-write
    assert main(["plot", str(run_copy), "-o", str(tmp_path / "d.png")]) == 0
    assert "ignoring the torn last line 3" in capsys.readouterr().err and (tmp_path / "d.png").is_file()
    lines = metrics.read_bytes().split(b"\n")
    metrics.write_bytes(b"\n".join([lines[0], b"\xff\xfe garbage", *lines[1:]]))
    fails_with(["plot", str(run_copy)], capsys, f"{metrics}, line 2 is not a JSON object")


def test_resume_with_garbage_run_config_and_damaged_checkpoint_config(run_copy, capsys):
    (run_copy / "config.yaml").write_bytes(b"\x00\xff garbage: [")  # rewritten on resume, never read
    (run_copy / "checkpoints" / "step-000002" / "dapo_config.yaml").write_bytes(b"\xff\xfe{{{")
    assert main(["train", "--resume", str(run_copy)]) == 0
    err = capsys.readouterr().err
    assert "step-000002 is damaged (dapo_config.yaml has 5 bytes" in err
    assert "resuming" in err and "from step-000001, the newest intact checkpoint" in err
    assert steps_logged(run_copy) == [1, 2]
    assert "group_size: 2" in (run_copy / "config.yaml").read_text()


# --- 4. absolute paths; 6. code in a run directory ----------------------------------------------
EVIL = '''
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("the reward file ran")

def judge(prompts, completions, answer, **kw):
    return [1.0 if len(c) <= 8 else 0.0 for c in completions]
'''


@pytest.fixture(scope="module")
def data_run(tiny_dir, tmp_path_factory) -> Path:
    """A run trained from relative paths: data, eval data and a reward file."""
    work = tmp_path_factory.mktemp("work")
    rows = [{"prompt": f"Say {i}", "answer": str(i)} for i in range(4)]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (work / "evil.py").write_text(EVIL)
    old = os.getcwd()
    os.chdir(work)
    try:
        assert main(train(tiny_dir, Path("run"), "--data", "train.jsonl", "--eval-data", "test.jsonl",
                          "--reward", "evil.py:judge", "exact_match", "--reward-weights", "1", "1")) == 0
    finally:
        os.chdir(old)
    return work / "run"


def test_run_dir_stores_absolute_paths(data_run):
    work = data_run.parent
    for saved in (data_run / "config.yaml", list_checkpoints(data_run)[-1] / "dapo_config.yaml"):
        c = DAPOConfig.from_yaml(saved)
        assert c.data == str(work / "train.jsonl") and c.eval_data == str(work / "test.jsonl"), saved
        assert c.reward == [f"{work}/evil.py:judge", "exact_match"] and c.output_dir == str(data_run)


def test_eval_of_a_run_dir_does_not_import_its_reward_files(data_run, tmp_path, monkeypatch, capsys):
    marker = data_run.parent / "IMPORTED"
    marker.unlink(missing_ok=True)
    monkeypatch.chdir(tmp_path)  # another directory: the saved paths are absolute
    fails_with(["eval", "--model", str(data_run), "--eval-samples", "1"], capsys,
               "names reward functions that are code")
    assert not marker.exists()
    # The user names the judge: a built-in one imports nothing from the run directory.
    assert main(["eval", "--model", str(data_run), "--eval-samples", "1", "--reward", "exact_match"]) == 0
    assert not marker.exists()
    # Trusting the run directory imports its reward file (and works from another directory).
    assert main(["eval", "--model", str(data_run), "--eval-samples", "1", "--trust-run-rewards"]) == 0
    assert marker.exists()
    assert "avg@1" in capsys.readouterr().out


def test_resume_from_another_directory(data_run, tmp_path, monkeypatch):
    run = tmp_path / "copy"
    shutil.copytree(data_run, run)
    monkeypatch.chdir(tmp_path)
    # the copy's config names the original's absolute data files: resuming (the owner) works anywhere
    assert main(["train", "--resume", str(run), "--train-steps", "2"]) == 0
    assert steps_logged(run) == [1, 2]


def test_builtin_judge_first_keeps_only_builtin_rewards(tmp_path):
    from dapo.evaluate import eval_config

    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    DAPOConfig(reward=["numeric", "/x/evil.py:f"], reward_weights=[1, 1]).to_yaml(ckpt / "dapo_config.yaml")
    save_file({"w": torch.zeros(2)}, ckpt / "model.safetensors")
    (ckpt / "COMPLETE").write_text("1\n")
    c = eval_config({"model": str(tmp_path / "run")})
    assert c.reward == ["numeric"] and c.reward_weights == []
    assert eval_config({"model": str(tmp_path / "run")}, trust_run_rewards=True).reward == ["numeric", "/x/evil.py:f"]


# --- 5. the end of a run; stray and damaged checkpoints -------------------------------------------
def test_final_checkpoint_is_written_before_the_final_evaluation(tiny_dir, tmp_path, capsys, monkeypatch):
    real, calls = dapo.trainer.Trainer.evaluate, [0]

    def evaluate(self):
        calls[0] += 1
        if calls[0] == 2:  # the final evaluation: everything trained is already on disk
            assert [p.name for p in list_checkpoints(self.run_dir)] == ["step-000001"]
            os.kill(os.getpid(), signal.SIGTERM)  # pre-empted during a long final evaluation
            time.sleep(5)
            raise AssertionError("SIGTERM did not stop the final evaluation")
        return real(self)

    monkeypatch.setattr(dapo.trainer.Trainer, "evaluate", evaluate)
    assert main(train(tiny_dir, tmp_path)) == 143
    err = capsys.readouterr().err
    assert "training is done" not in err  # no step that does not exist is named
    assert f"Stopped during the final evaluation; training finished at step 1, saved in {tmp_path}/checkpoints/" \
           "step-000001" in err
    assert verify_checkpoint(tmp_path / "checkpoints" / "step-000001") is None


def test_stray_directory_in_checkpoints(run_copy):
    stray = run_copy / "checkpoints" / "step-000001.bak"
    shutil.copytree(run_copy / "checkpoints" / "step-000001", stray)
    (run_copy / "checkpoints" / "notes").mkdir()
    assert [p.name for p in list_checkpoints(run_copy)] == ["step-000001", "step-000002"]
    # resume and prune (keep_last 2, saving every step) with the strays in place
    assert main(["train", "--resume", str(run_copy), "--train-steps", "3", "--save-every", "1"]) == 0
    assert [p.name for p in list_checkpoints(run_copy)] == ["step-000002", "step-000003"]
    assert stray.is_dir() and (run_copy / "checkpoints" / "notes").is_dir()


def test_garbage_checkpoint_config_without_a_manifest(two_step_run, tmp_path):
    ckpt = tmp_path / "step-000002"
    shutil.copytree(two_step_run / "checkpoints" / "step-000002", ckpt)
    (ckpt / MANIFEST).unlink()
    (ckpt / "dapo_config.yaml").write_bytes(b"\xff\xfe{{{")
    assert verify_checkpoint(ckpt).startswith("dapo_config.yaml is unreadable (config file")


def _rewrite_state(ckpt: Path, drop: str) -> None:
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    del state[drop]
    torch.save(state, ckpt / "trainer_state.pt")


def _nan_weights(ckpt: Path) -> None:
    weights = load_file(ckpt / "model.safetensors")
    key = next(iter(weights))
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = float("nan")
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})


DAMAGE = {
    "truncated weights": (lambda c: os.truncate(c / "model.safetensors", 1000), "model.safetensors has 1000 bytes"),
    "missing state": (lambda c: (c / "trainer_state.pt").unlink(), "trainer_state.pt is missing"),
    "state missing keys": (lambda c: _rewrite_state(c, "rng"), "trainer_state.pt has "),
    "bit rot in the weights": (_nan_weights, "model.safetensors does not match its sha256"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_is_detected(two_step_run, tmp_path, damage):
    ckpt = tmp_path / "step-000002"
    shutil.copytree(two_step_run / "checkpoints" / "step-000002", ckpt)
    assert verify_checkpoint(ckpt) is None
    apply, problem = DAMAGE[damage]
    apply(ckpt)
    assert problem in verify_checkpoint(ckpt)


def test_damage_is_detected_without_a_manifest_too(two_step_run, tmp_path):
    """Checkpoints written before manifests existed: the content checks still catch it."""
    ckpt = tmp_path / "step-000002"
    shutil.copytree(two_step_run / "checkpoints" / "step-000002", ckpt)
    (ckpt / MANIFEST).unlink()
    assert verify_checkpoint(ckpt) is None
    _nan_weights(ckpt)
    assert "model.safetensors holds non-finite values" in verify_checkpoint(ckpt)
    shutil.copy(two_step_run / "checkpoints" / "step-000002" / "model.safetensors", ckpt)
    _rewrite_state(ckpt, "rng")
    assert verify_checkpoint(ckpt) == "trainer_state.pt lacks rng"
    with pytest.raises(CheckpointError, match="lacks rng"):
        load_trainer_state(ckpt)


def test_manifest_lists_every_file_with_its_sha256(two_step_run):
    ckpt = two_step_run / "checkpoints" / "step-000002"
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert {"model.safetensors", "trainer_state.pt", "dapo_config.yaml", "config.json"} <= set(files)
    assert all(len(meta["sha256"]) == 64 and meta["bytes"] > 0 for meta in files.values())


def test_resume_and_eval_fall_back_to_the_newest_intact_checkpoint(run_copy, capsys):
    os.truncate(run_copy / "checkpoints" / "step-000002" / "model.safetensors", 1000)
    path, _ = resolve_model(str(run_copy))
    assert path.endswith("step-000001")
    assert "step-000002 is damaged (model.safetensors has 1000 bytes" in capsys.readouterr().err
    assert find_checkpoint(run_copy).name == "step-000001"
    assert main(["train", "--resume", str(run_copy), "--save-every", "1"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "from step-000001, the newest intact checkpoint" in err
    assert steps_logged(run_copy) == [1, 2]
    assert verify_checkpoint(run_copy / "checkpoints" / "step-000002") is None  # redone and replaced


def test_every_checkpoint_damaged_is_one_line(run_copy, capsys):
    for ckpt in list_checkpoints(run_copy):
        (ckpt / "trainer_state.pt").unlink()
    fails_with(["train", "--resume", str(run_copy)], capsys, f"cannot resume: every checkpoint of {run_copy} is "
               "damaged (step-000001, step-000002")


# --- what is trusted: a pickle payload in a checkpoint runs nothing ---------------------------------
class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_payload_in_a_checkpoint_cannot_run_code(run_copy, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    ckpt = run_copy / "checkpoints" / "step-000002"
    with (ckpt / "trainer_state.pt").open("wb") as f:
        pickle.dump({"step": 2, "payload": Payload(marker)}, f)
    # The attacker also fixes up the manifest, so the file reaches the loader.
    (ckpt / MANIFEST).unlink()
    write_manifest(ckpt)
    # (pickle.loads would run it: the payload works)
    pickle.loads((ckpt / "trainer_state.pt").read_bytes())
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match="could not read"):
        load_trainer_state(ckpt)
    assert main(["eval", "--model", str(run_copy), "--eval-samples", "1"]) == 0
    assert main(["train", "--resume", str(run_copy), "--train-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "step-000002 is damaged (trainer_state.pt is unreadable" in err
    assert not marker.exists()


# --- 7. out of memory -------------------------------------------------------------------------------
def test_out_of_memory_in_training_names_the_budget(tiny_dir, tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(dapo.actor, "token_logprobs", oom)
    fails_with(train(tiny_dir, tmp_path, "--max-tokens-per-micro-batch", "512"), capsys,
               "out of memory during training (CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB "
               "total)); lower max_tokens_per_micro_batch (now 512)")
    assert list_checkpoints(tmp_path) == []


def test_out_of_memory_in_generation_names_group_size(tiny_dir, tmp_path, capsys, monkeypatch):
    real = dapo.rollout.generate

    def oom(model, prompts, n, *args, **kwargs):
        if n == 1:  # the evaluation before training (eval_samples 1) fits; the rollouts (G 2) do not
            return real(model, prompts, n, *args, **kwargs)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 85899345920 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(dapo.rollout, "generate", oom)
    err = fails_with(train(tiny_dir, tmp_path), capsys, "out of memory during generation ([enforce fail at "
                     "alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory")
    assert "lower group_size (now 2)" in err


def test_oom_guard_lets_other_errors_through():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with oom_guard("training", DAPOConfig()):
            raise RuntimeError("shape mismatch")
    with pytest.raises(OutOfMemory, match="lower group_size \\(now 32\\)") as e:
        with oom_guard("generation", DAPOConfig()):
            raise RuntimeError("MPS backend out of memory")
    assert isinstance(e.value, DapoError) and not e.value.during_update
