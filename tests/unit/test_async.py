"""Asynchronous rollouts (max_staleness >= 1, generator.py) on the tiny model and the toy task:
lock-step through the generator process equals the synchronous run, staleness is bounded and
measured, a resumed run samples its in-flight rounds again, and a dead generator or a killed
trainer leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dapo import DAPOConfig
from dapo.checkpoint import latest_checkpoint, load_trainer_state
from dapo.errors import TrainingInterrupted
from dapo.generator import AsyncGenerator, GeneratorDied
from dapo.trainer import Trainer, train
from toy_run import TOY_OPTIONS, toy_argv, toy_task

TESTS = Path(__file__).resolve().parents[1]


def toy(model_dir: Path, out: Path, **changes) -> Trainer:
    config = DAPOConfig(**{**TOY_OPTIONS, "model": str(model_dir), "output_dir": str(out), "threads": 2, **changes})
    return Trainer(config, task=toy_task())


def weights(run: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def test_lock_step_through_the_generator_process_equals_the_synchronous_run(tiny_dir, tmp_path):
    """The generator process with a staleness bound of 0 (each round waits for the weights of the
    step before) samples with the trainer's seed and thread count: the same samples, the same
    weights, bit for bit, as sampling in the trainer's process."""
    sync = toy(tiny_dir, tmp_path / "sync", threads=1, train_steps=3, surplus="train")
    sync_rows = sync.fit().metrics
    lock = toy(tiny_dir, tmp_path / "lock", threads=1, train_steps=3, surplus="train")
    generator = AsyncGenerator(lock.config, lock.parts.gen_model, lock.tokenizer.pad_token_id, threads=1,
                               seed=lock.config.seed)
    generator.publish(lock.parts.gen_model, 0)
    lock.collector.generator = generator
    lock_rows = lock.fit().metrics
    assert not generator.process.is_alive()
    for a, b in zip(sync_rows, lock_rows):
        assert (a["batch_reward_mean"], a["gen_tokens"], a["objective"]) == (b["batch_reward_mean"], b["gen_tokens"],
                                                                            b["objective"])
        assert a["staleness_max"] == b["staleness_max"] == 0 and b["wait_seconds"] > 0
    a, b = weights(sync), weights(lock)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("k", [1, 2])
def test_staleness_is_bounded_and_measured(tiny_dir, tmp_path, k):
    """Rounds for the next k steps are sampled while a step trains: from step 2 on a batch holds
    groups up to k versions old (never more), corrected (rollout_is_weight) and measured (stale_kl)."""
    cores = os.sched_getaffinity(0)
    run = toy(tiny_dir, tmp_path, max_staleness=k, train_steps=5)
    rows = run.fit().metrics
    assert rows[0]["staleness_max"] == 0  # the first round waits for nothing: version 0 trains at step 1
    assert all(r["staleness_max"] <= k for r in rows)
    assert max(r["staleness_max"] for r in rows[1:]) == k  # the bound is reached, not only kept
    assert all("rollout_is_weight" in r and "stale_kl" in r and "weight_publish_seconds" in r for r in rows)
    assert sum(r["generator_seconds"] for r in rows) > 0
    assert not run.collector.generator.process.is_alive()
    assert os.sched_getaffinity(0) == cores  # the trainer's cores are given back


def test_resume_samples_the_in_flight_rounds_again(tiny_dir, tmp_path, monkeypatch):
    """SIGTERM in step 3: the checkpoint keeps the round submitted for step 4 (its prompts); the
    resumed run submits those prompts first, and ends at step 4 within the staleness bound."""
    monkeypatch.setenv("TOY_SIGNAL_AT_CALLS", "7")
    first = toy(tiny_dir, tmp_path, max_staleness=1)
    with pytest.raises(TrainingInterrupted) as e:
        first.fit()
    step = first.step
    assert 2 <= step < 4 and f"Interrupted at step {step}" in str(e.value)
    state = load_trainer_state(latest_checkpoint(tmp_path))
    ahead = state["collector"]["ahead"]
    assert [r["for_step"] for r in ahead] == [step + 1] and ahead[0]["indices"]
    monkeypatch.delenv("TOY_SIGNAL_AT_CALLS")
    submitted = []
    real = AsyncGenerator.submit
    monkeypatch.setattr(AsyncGenerator, "submit", lambda self, prompts, *a, **kw: submitted.append(prompts)
                        or real(self, prompts, *a, **kw))
    config = DAPOConfig(**{**TOY_OPTIONS, "model": str(tiny_dir), "output_dir": str(tmp_path), "threads": 2,
                           "max_staleness": 1})
    result = train(config, resume=tmp_path, task=toy_task())
    assert result.steps == 4
    resumed = first.collector.prompt_ids
    assert submitted[0] == [resumed[i] for i in ahead[0]["indices"]]
    assert all(r["staleness_max"] <= 1 for r in result.metrics)


def test_a_dead_generator_stops_the_run_with_one_line_and_its_last_checkpoint(tiny_dir, tmp_path, monkeypatch):
    cores = os.sched_getaffinity(0)
    run = toy(tiny_dir, tmp_path, max_staleness=1, train_steps=6)
    calls = []
    real = AsyncGenerator.submit

    def submit(self, *a, **kw):
        ticket = real(self, *a, **kw)
        calls.append(ticket)
        if len(calls) == 3:
            os.kill(self.pid, signal.SIGKILL)
        return ticket

    monkeypatch.setattr(AsyncGenerator, "submit", submit)
    with pytest.raises(GeneratorDied, match=r"the generator process \(pid \d+\) died \(killed by signal 9\); the run "
                                            r"stops here, its last checkpoint is intact") as e:
        run.fit()
    assert "\n" not in str(e.value)
    assert 1 <= run.step < 6
    assert latest_checkpoint(tmp_path).name == f"step-{run.step:06d}"  # every completed step kept
    assert os.sched_getaffinity(0) == cores  # closing a dead generator still gives the cores back


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
@pytest.mark.slow
def test_signals_stop_both_sides_and_sigkill_leaves_no_orphan(tiny_dir, tmp_path):
    """The CLI: Ctrl-C (SIGINT to the whole process group, the generator included) and SIGTERM end
    the run at the step's end with its checkpoint (exit 130 / 143) and the generator with it;
    SIGKILL of the trainer takes the generator down too (PR_SET_PDEATHSIG)."""
    argv = [sys.executable, str(TESTS / "toy_run.py"), "train", "--model", str(tiny_dir), *toy_argv(),
            "--max-staleness", "1", "--threads", "2", "--train-steps", "400", "--save-every", "0"]
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -signal.SIGKILL)):
        out = tmp_path / sig.name
        proc = subprocess.Popen([*argv, "--output-dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        assert wait_for(lambda: children(proc.pid) and (out / "metrics.jsonl").is_file(), 120), proc.stderr.read()
        kids = children(proc.pid)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # what Ctrl-C in a terminal does
        else:
            proc.send_signal(sig)
        proc.wait(timeout=120)
        assert proc.returncode == code, proc.stderr.read()
        if sig != signal.SIGKILL:
            assert "Interrupted at step" in proc.stderr.read()
            assert latest_checkpoint(out) is not None
        assert wait_for(lambda: not any(alive(k) for k in kids), 10), [k for k in kids if alive(k)]
