"""Ownership of a run directory: one process at a time, and no silent mixing of two runs.

- `acquire_run_lock(run_dir)`: an exclusive `fcntl.flock` on RUN_DIR/.lock, held for the whole
  run (context manager; also released by the kernel on any exit, SIGKILL included, so a lock
  left by a dead process is never "stale": the next run simply takes it). The holder's pid, host
  and start time are written inside for the refusal message. Re-entrant within one process (the
  CLI holds it across resume + train, and `dapo.trainer.train` takes it again). Under torchrun only rank 0
  takes it (the other ranks get a lock that holds nothing).
- `prepare_run_dir(run_dir, config, resuming)`: a new run refuses a directory that already holds
  a run unless `config.overwrite`, which first deletes that run's files and checkpoints; then
  config.yaml is written (with absolute paths, `run_dir_config`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from dapo.errors import ConfigError, RunDirError

LOCK_FILE = ".lock"
# What `overwrite` removes: everything a run writes into its directory (and nothing else: an
# --output-dir may hold the user's own files).
RUN_FILES = ("config.yaml", "metrics.jsonl", "eval.jsonl", "samples.jsonl", "dashboard.png")
RUN_DIRS = ("checkpoints", "tensorboard", "wandb")

_held: dict[str, "RunLock"] = {}  # realpath -> lock held by this process (for re-entrance)


class RunLock:
    """An exclusive lock on one run directory. Use as a context manager or call `release()`."""

    def __init__(self, run_dir: Path, fd: int, key: str) -> None:
        self.run_dir, self._fd, self._key, self._count = run_dir, fd, key, 1

    def release(self) -> None:
        self._count -= 1
        if self._count > 0 or self._fd < 0:
            return
        import fcntl

        _held.pop(self._key, None)
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def acquire_run_lock(run_dir: str | Path) -> RunLock:
    """Lock `run_dir` (created if missing) for this process, or raise RunDirError naming the
    process that holds it."""
    import fcntl

    from dapo import distributed

    run_dir = Path(run_dir)
    if distributed.rank() != 0:  # torchrun: rank 0 holds the lock for the whole group
        return RunLock(run_dir, -1, "")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create run directory {run_dir}: {_reason(e)}") from e
    key = os.path.realpath(run_dir)
    if key in _held and _held[key].held:
        _held[key]._count += 1
        return _held[key]
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise RunDirError(f"run directory {run_dir} is not writable: {_reason(e)}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_holder(fd)
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirError(f"cannot lock run directory {run_dir} ({_reason(e)})") from e
        raise RunDirError(f"run directory {run_dir} is in use by another dapo process ({holder}{_gone(holder)}); "
                          "wait for it to finish or stop it, or pick another --output-dir") from None
    stale = _read_holder(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    lock = RunLock(run_dir, fd, key)
    lock.stale_holder = stale if stale != "holder unknown" else None  # type: ignore[attr-defined]
    _held[key] = lock
    return lock


def _gone(holder: str) -> str:
    """A note when the named holder is a process of this host that no longer exists: a child it
    forked (e.g. a reward worker still running a slow function) keeps the lock until it ends."""
    parts = holder.split()
    if len(parts) >= 5 and parts[0] == "pid" and parts[1].isdigit() and parts[4] == socket.gethostname():
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            return "; it has exited, but a process it started still holds the lock"
        except OSError:
            pass
    return ""


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def holds_run(run_dir: str | Path) -> list[str]:
    """The names of the run files and checkpoints `run_dir` holds (empty: no run there)."""
    run_dir = Path(run_dir)
    found = [name for name in RUN_FILES if (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0]
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        found.append("checkpoints/")
    return found


def clear_run(run_dir: str | Path) -> None:
    """Delete the files and directories a run writes into `run_dir` (not the lock, not other files)."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        if (run_dir / name).exists():
            doomed = run_dir / f".deleting-{name}-{os.getpid()}"
            os.replace(run_dir / name, doomed)  # gone from view at once, even if rmtree is cut short
            shutil.rmtree(doomed, ignore_errors=True)


def claim_run_dir(run_dir: str | Path, overwrite: bool, resuming: bool, clear: bool = True) -> None:
    """A new run (not `resuming`) in a directory that already holds a run is refused with one
    line, unless `overwrite`: then the old run's files and checkpoints are deleted first (with
    `clear`; clear=False only checks, so a run that fails to start deletes nothing).
    Call it while holding the run lock."""
    run_dir = Path(run_dir)
    if resuming and overwrite:
        raise ConfigError("--overwrite cannot be combined with --resume: resuming continues the run in place")
    if resuming:
        return
    found = holds_run(run_dir)
    if found and not overwrite:
        raise RunDirError(f"run directory {run_dir} already holds a run ({', '.join(found)}); resume it with "
                          f"`dapo train --resume {run_dir}`, pick another --output-dir, or pass --overwrite to "
                          "delete that run first")
    if found and clear:
        clear_run(run_dir)


def prepare_run_dir(run_dir: str | Path, config: Any, resuming: bool) -> None:
    """`claim_run_dir` for the run about to start, then write its config.yaml (`run_dir_config`).
    Call it while holding the run lock."""
    claim_run_dir(run_dir, getattr(config, "overwrite", False), resuming)
    run_dir_config(config).to_yaml(Path(run_dir) / "config.yaml")


# --- the config as stored in a run directory ------------------------------------------------------
def absolute_path(value: str | None) -> str | None:
    """An existing local path made absolute; anything else (hub ids, None) as it is."""
    if not value:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def absolute_reward_spec(spec: str) -> str:
    """'file.py:function' with an existing file gets an absolute path; built-in names and
    'module:function' stay as they are."""
    target, sep, attr = spec.rpartition(":")
    if sep and target and (target.endswith(".py") or "/" in target or os.sep in target):
        path = Path(target).expanduser()
        if path.is_file():
            return f"{path.resolve()}:{attr}"
    return spec


def run_dir_config(config: Any) -> Any:
    """The config as saved into a run directory (config.yaml, each checkpoint's dapo_config.yaml):
    local paths made absolute, so `dapo eval --model RUN_DIR` and `--resume RUN_DIR` work from any
    directory, and `overwrite` off, so reusing the saved file never deletes a run."""
    changes: dict[str, Any] = {"data": absolute_path(config.data), "eval_data": absolute_path(config.eval_data),
                               "reward": [absolute_reward_spec(s) for s in config.reward],
                               "output_dir": absolute_path(config.output_dir)}
    if config.model != "default":
        changes["model"] = absolute_path(config.model)
    if hasattr(config, "overwrite"):
        changes["overwrite"] = False
    return config.replace(**changes)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror if e.filename is None else f"{e.strerror} ({e.filename})"
    return str(e) or type(e).__name__
