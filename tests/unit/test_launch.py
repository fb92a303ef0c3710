"""`dapo train --nproc N` (dapo.launch): when one rank dies the others stop within seconds, and
the console ends with one line naming the rank, how it died, the last intact checkpoint and the
resume command (no torchrun ChildFailedError report, no traceback of the survivors)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dapo import launch
from toy_run import toy_argv

TESTS = Path(__file__).resolve().parents[1]  # tests/: toy_run.py
SRC = TESTS.parent / "src"


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "TOY_SIGNAL_AT_CALLS")}
    return {**out, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def gone(pgid: int, within: float = 5.0) -> bool:
    """Whether process group `pgid` is empty (its killed members may take a moment to be reaped)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


# --- the pure parts -----------------------------------------------------------------------------
def test_describe_and_exit_status():
    assert launch.describe(1, -9) == "rank 1 was killed by SIGKILL (signal 9)"
    assert launch.describe(0, 2) == "rank 0 exited with code 2"
    assert launch.exit_status(-9) == 137 and launch.exit_status(-15) == 143 and launch.exit_status(2) == 2


def test_failure_line(tmp_path):
    ckpt = tmp_path / "run dir" / "checkpoints" / "step-000003"
    line = launch.failure_line(1, -9, 2, 1, str(tmp_path / "run dir"), ckpt)
    assert line == (f"dapo: error: rank 1 was killed by SIGKILL (signal 9); the other rank was stopped. Last intact "
                    f"checkpoint: {ckpt}. Resume with: dapo train --resume '{tmp_path / 'run dir'}' --nproc 2")
    assert launch.failure_line(0, 1, 4, 3, "runs/x", None) == ("dapo: error: rank 0 exited with code 1; the other "
                                                                "3 ranks were stopped. runs/x holds no intact "
                                                                "checkpoint: start the run again.")
    assert "; 1 other rank was stopped. Its run directory is unknown" in launch.failure_line(2, -11, 4, 1, None, None)
    assert "stopped" not in launch.failure_line(0, -9, 2, 0, None, None)  # the others had already finished


def test_rank_env():
    env_ = launch.rank_env(1, 2, 29511, Path("/x/info"), {"TORCHELASTIC_RUN_ID": "a", "PATH": "/bin"})
    assert {k: env_[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                 "MASTER_PORT", launch.INFO_ENV, "PATH")} == {
        "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511", launch.INFO_ENV: "/x/info", "PATH": "/bin"}
    assert "TORCHELASTIC_RUN_ID" not in env_


def test_record_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(launch.INFO_ENV, raising=False)
    launch.record_run_dir("runs/a")  # outside the launcher: nothing to do
    monkeypatch.setenv(launch.INFO_ENV, str(tmp_path / "info"))
    launch.record_run_dir("runs/digit-20260101-000000")
    assert (tmp_path / "info").read_text().strip() == "runs/digit-20260101-000000"
    assert [p.name for p in tmp_path.iterdir()] == ["info"]


def test_lost_peer():
    """An error out of a torch.distributed collective (gloo's 'Connection reset by peer') is a
    lost peer; an error of dapo's own code is not."""
    def raises_in(filename: str) -> BaseException:
        try:
            exec(compile("raise RuntimeError('Connection reset by peer')", filename, "exec"))
        except RuntimeError as e:
            return e
        raise AssertionError

    in_torch = raises_in(os.path.join("site-packages", "torch", "distributed", "distributed_c10d.py"))
    assert launch.lost_peer(in_torch)
    assert not launch.lost_peer(raises_in(os.path.join("src", "dapo", "trainer.py")))
    try:
        raise ValueError("wrapped") from in_torch
    except ValueError as e:
        assert launch.lost_peer(e)


def test_nproc_runs_the_launcher(monkeypatch):
    """`dapo train --nproc 2 ...` runs the same arguments, --nproc left out, on 2 ranks."""
    import dapo.cli

    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch, "launch", lambda *args: calls.append(args) or 3)
    assert dapo.cli.main(["train", "--nproc", "2", "--lr", "1e-5", "--output-dir", "out"]) == 3
    assert dapo.cli.main(["train", "--resume", "runs/a", "--nproc=2"]) == 3
    assert calls == [(2, ["train", "--lr", "1e-5", "--output-dir", "out"], "out"), (2, ["train", "--resume", "runs/a"],
                                                                                   "runs/a")]


# --- the launcher with trivial ranks -------------------------------------------------------------
RANK_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    rank, out = os.environ["RANK"], Path(sys.argv[1])
    if sys.argv[2] == "die":  # rank 0 waits forever with a child of its own (a reward worker); rank 1 dies
        if rank == "0":
            signal.signal(signal.SIGTERM, lambda *_: None)  # as dapo's: "stop after this step", which never comes
            from dapo.launch import record_run_dir
            record_run_dir(out / "run")
            if os.fork() == 0:
                time.sleep(600)
                os._exit(0)
            (out / "pgid-0").write_text(str(os.getpgrp()))
            time.sleep(600)
        while not (out / "pgid-0").exists():
            time.sleep(0.05)
        (out / "death").write_text(str(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    if sys.argv[2] == "sigint":  # each rank ends with 130 when the launcher forwards Ctrl-C
        signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
        (out / f"ready-{rank}").write_text("")
        time.sleep(600)
    sys.exit(int(sys.argv[2]))
""")


def rank_command(tmp_path: Path) -> list[str]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    return [sys.executable, str(script)]


def test_a_dead_rank_stops_the_others(tmp_path, capfd, monkeypatch):
    """Rank 1 SIGKILLs itself while rank 0 sleeps 600 s: the launcher returns 128 + 9 within
    seconds, rank 0's whole process group (its forked child too) is gone, one line says so."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    assert launch.launch(2, [str(tmp_path), "die"], command=rank_command(tmp_path)) == 137
    seconds = time.time() - float((tmp_path / "death").read_text())
    assert seconds < launch.GRACE_S + 5, seconds
    assert gone(int((tmp_path / "pgid-0").read_text()))
    err = capfd.readouterr().err
    assert err == (f"dapo: error: rank 1 was killed by SIGKILL (signal 9); the other rank was stopped. "
                   f"{tmp_path / 'run'} holds no intact checkpoint: start the run again.\n"), err


@pytest.mark.parametrize("codes, expected", [("0", 0), ("2", 2)])
def test_ranks_that_end_by_themselves(tmp_path, capfd, codes, expected):
    """All succeed: 0. All fail with the same dapo error (which they printed): its code, no line."""
    assert launch.launch(2, [str(tmp_path), codes], command=rank_command(tmp_path)) == expected
    assert capfd.readouterr().err == ""


def test_ctrl_c_is_forwarded_to_every_rank(tmp_path):
    """SIGINT to the launcher reaches each rank (in its own session, the terminal's does not)."""
    driver = (f"import sys; from dapo.launch import launch; "
              f"sys.exit(launch(2, [{str(tmp_path)!r}, 'sigint'], command={rank_command(tmp_path)!r}))")
    proc = subprocess.Popen([sys.executable, "-c", driver], env=env(), stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 60
    while not all((tmp_path / f"ready-{r}").exists() for r in range(2)) and time.monotonic() < end:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert proc.stderr.read() == ""


# --- end to end: 2 ranks of dapo train, rank 1 killed ---------------------------------------------
def dapo_nproc(*args: str, **extra: str) -> tuple[subprocess.CompletedProcess, float]:
    """`dapo ARGS` (with --nproc) whose ranks run tests/toy_run.py (dapo with the toy task); the
    time at which it returned (time.time())."""
    driver = ("import sys, dapo.cli, dapo.launch; command = dapo.launch.rank_command(sys.argv[1]); "
              "dapo.launch.rank_command = lambda script=None: command; sys.exit(dapo.cli.main(sys.argv[2:]))")
    proc = subprocess.run([sys.executable, "-c", driver, str(TESTS / "toy_run.py"), *args], capture_output=True,
                          text=True, timeout=300, env=env(**extra))
    return proc, time.time()


@pytest.mark.slow  # 30-40 s: two launches of 2 ranks
def test_killed_rank_stops_the_run_with_one_line_then_resume(tiny_dir, tmp_path):
    run_dir = tmp_path / "run"
    options = ["--model", str(tiny_dir), *toy_argv(), "--train-steps", "4", "--save-every", "1", "--threads", "1"]
    # Rank 1 SIGKILLs itself while scoring its 3rd group: in step 4, after checkpoint 3. The fixed
    # engine makes the groups (and so the count) independent of how the sampler draws.
    cut, end = dapo_nproc("train", "--nproc", "2", *options, "--output-dir", str(run_dir), TOY_ENGINE="fixed",
                          TOY_SIGNAL_AT_CALLS="3", TOY_SIGNAL="SIGKILL", TOY_SIGNAL_RANK="1")
    output = cut.stdout + cut.stderr
    assert cut.returncode == 128 + signal.SIGKILL, output[-3000:]
    last = run_dir / "checkpoints" / "step-000003"
    after_kill = end - last.stat().st_mtime  # the kill came after checkpoint 3 was complete
    print(f"launcher returned {after_kill:.1f} s after checkpoint 3 was written")
    assert after_kill < 30
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]
    line = cut.stderr.strip().splitlines()[-1]
    assert line == (f"dapo: error: rank 1 was killed by SIGKILL (signal 9); the other rank was stopped. Last intact "
                    f"checkpoint: {last}. Resume with: dapo train --resume {run_dir} --nproc 2"), line

    resume = shlex.split(re.search(r"Resume with: dapo (.*)$", line).group(1))
    resumed, _ = dapo_nproc(*resume, "--threads", "1", TOY_ENGINE="fixed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step-000004" / "COMPLETE").is_file()
