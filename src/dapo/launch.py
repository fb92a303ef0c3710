"""`dapo train --nproc N`: N data-parallel ranks on this machine that end together.

Why not torchrun (which `--nproc` used to exec): when one rank dies (SIGKILL, the OOM killer, a
segfault), the others wait in a collective that can never complete; torchrun then sends them
SIGTERM, which dapo takes as "stop after this step" (a step that cannot finish), so they end
only when torchrun escalates to SIGKILL, and the console ends with its ChildFailedError report.
This launcher starts each rank in its own session (its process group holds the rank's reward
workers too), and when one rank fails it gives the others GRACE_S to end on their own, then
kills their process groups and prints one line: which rank died and how, the last intact
checkpoint and the resume command. Killing is safe: a checkpoint is renamed into place only
once complete, and the run-directory lock (an flock) is released by the kernel.

Each rank runs `rank_main`, which keeps a rank that lost its peer quiet: the gloo/NCCL error
("Connection reset by peer") raised in the survivors would otherwise print a traceback before
the launcher has noticed which rank died. Several machines: use torchrun (docs/distributed.md).
"""

from __future__ import annotations

import os
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

# A rank that fails with an ordinary error raises it on every rank (the trainer gathers errors),
# so the others end within moments; a rank that waits on a dead peer never ends by itself.
GRACE_S = 3.0
POLL_S = 0.1
# The file (in a temporary directory of the launcher) where rank 0 records the run directory it
# chose: without --output-dir / --resume only rank 0 knows it (runs/<task>-<timestamp>).
INFO_ENV = "DAPO_LAUNCH_INFO"
# How long a rank that lost its peer waits to be killed by the launcher before it prints its
# error after all (the launcher kills it after GRACE_S; this only guards against a dead launcher).
LOST_PEER_WAIT_S = 30.0


def launch(nproc: int, argv: list[str], run_dir: str | None = None, command: list[str] | None = None) -> int:
    """Run `command + argv` (default: dapo's CLI under `rank_main`) as ranks 0..nproc-1 of one
    torch.distributed world on this machine; return 0 when all succeed, else the exit status of the first
    rank to fail (128 + N for signal N). `run_dir` names the run for the message (from --resume
    or --output-dir) when rank 0 did not record it (`record_run_dir`)."""
    command = rank_command() if command is None else command
    info_dir = Path(tempfile.mkdtemp(prefix="dapo-launch-"))
    info = info_dir / "run_dir"
    port = free_port()
    procs: dict[int, subprocess.Popen] = {}
    ended: dict[int, int] = {}  # rank -> Popen returncode (-N: killed by signal N)
    first: int | None = None    # the first rank to fail
    stopped: list[int] = []     # ranks this launcher killed
    deadline = float("inf")

    def forward(signum: int, frame: FrameType | None) -> None:
        # The user's Ctrl-C / SIGTERM: each rank's own handler stops all ranks after the current step.
        for r, p in procs.items():
            if r not in ended:
                _signal(p.pid, signum)

    handlers = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        for r in range(nproc):
            procs[r] = subprocess.Popen([*command, *argv], env=rank_env(r, nproc, port, info),
                                        start_new_session=True)  # own process group: the rank's whole tree
        while len(ended) < nproc:
            new = [r for r in procs if r not in ended and _has_ended(procs[r].pid)]
            for r in new:
                _kill_group(procs[r].pid)  # what the rank left behind (reward workers)
                ended[r] = procs[r].wait()
            failed = [r for r in new if ended[r] != 0]
            if failed and first is None:
                first = min(failed, key=lambda r: (ended[r] > 0, r))  # a death by signal explains the others
                deadline = time.monotonic() + GRACE_S
            if time.monotonic() >= deadline:
                for r in procs:
                    if r not in ended:
                        _kill_group(procs[r].pid)
                        ended[r] = procs[r].wait()
                        stopped.append(r)
            elif len(ended) < nproc:
                time.sleep(POLL_S)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        for r, p in procs.items():  # only when starting or waiting raised: leave no rank behind
            if r not in ended:
                _kill_group(p.pid)
                p.wait()
        recorded = info.read_text().strip() if info.is_file() else ""
        shutil.rmtree(info_dir, ignore_errors=True)
    if first is None:
        return 0
    if stopped or ended[first] < 0:  # otherwise every rank ended by itself and said why
        from dapo.checkpoint import intact_checkpoint

        run_dir = recorded or run_dir
        checkpoint = intact_checkpoint(Path(run_dir)) if run_dir else None
        print(failure_line(first, ended[first], nproc, len(stopped), run_dir, checkpoint), file=sys.stderr,
              flush=True)
    return exit_status(ended[first])


def record_run_dir(run_dir: str | Path) -> None:
    """Tell the launcher of `--nproc` (if any) the run directory, for its message should a rank
    die. Rank 0 calls it once the directory is chosen; a no-op outside the launcher."""
    path = os.environ.get(INFO_ENV)
    if path:
        tmp = f"{path}.{os.getpid()}.tmp"
        Path(tmp).write_text(f"{run_dir}\n")
        os.replace(tmp, path)  # the launcher never reads half a path


def rank_command(script: str | None = None) -> list[str]:
    """The command of each rank (dapo's arguments follow): `rank_main`, running dapo's CLI or
    `script` (a file that runs it, e.g. tests/toy_run.py)."""
    return [sys.executable, "-c", f"import dapo.launch; dapo.launch.rank_main({script!r})"]


def rank_env(rank: int, nproc: int, port: int, info: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """What torchrun --standalone would set for this rank (torch.distributed reads it), plus INFO_ENV."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("TORCHELASTIC_")}
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{INFO_ENV: str(info)})
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several processes
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(rank: int, returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"rank {rank} was killed by signal {-returncode}"
        return f"rank {rank} was killed by {name} (signal {-returncode})"
    return f"rank {rank} exited with code {returncode}"


def exit_status(returncode: int) -> int:
    """A shell's exit status for a Popen returncode: 128 + N for a death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def failure_line(rank: int, returncode: int, nproc: int, stopped: int, run_dir: str | None,
                 checkpoint: Path | None) -> str:
    """The launcher's one line after rank `rank` failed and `stopped` others were killed."""
    line = f"dapo: error: {describe(rank, returncode)}"
    if stopped:
        who = ("the other" if stopped == 1 else f"the other {stopped}") if stopped == nproc - 1 else f"{stopped} other"
        line += f"; {who} {'rank was' if stopped == 1 else 'ranks were'} stopped"
    if checkpoint is not None:
        return (f"{line}. Last intact checkpoint: {checkpoint}. Resume with: "
                f"dapo train --resume {shlex.quote(str(run_dir))} --nproc {nproc}")
    if run_dir:
        return f"{line}. {run_dir} holds no intact checkpoint: start the run again."
    return (f"{line}. Its run directory is unknown: if it wrote a checkpoint, resume with: dapo train --resume "
            f"RUN_DIR --nproc {nproc}; else start the run again.")


def rank_main(script: str | None = None) -> None:
    """One rank under `launch`: dapo's CLI (or `script`) with sys.argv[1:]. A rank whose
    collective failed because another rank died waits to be killed instead of printing a
    traceback: the launcher names the rank that died."""
    args = sys.argv[1:]
    try:
        if script is None:  # as `python -m dapo.cli ARGS` would run it
            sys.argv = ["dapo", *args]
            runpy.run_module("dapo.cli", run_name="__main__", alter_sys=True)
            code = 0
        else:  # as `python script ARGS` would run it
            sys.argv = [script, *args]
            sys.path.insert(0, str(Path(script).resolve().parent))
            runpy.run_path(script, run_name="__main__")
            code = 0
    except Exception as e:
        if lost_peer(e):
            time.sleep(LOST_PEER_WAIT_S)
        raise
    sys.exit(code)


def lost_peer(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) came out of a torch.distributed
    collective: under the launcher, before the collectives' timeout, that means a rank has gone."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if (isinstance(exc, RuntimeError) and tb is not None
                and f"torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _has_ended(pid: int) -> bool:
    # WNOWAIT: the rank stays a zombie, so its pid (= its process group id) cannot be reused
    # before _kill_group has cleaned its group.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already empty


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
