"""Stage: checkpoints. RUN_DIR/checkpoints/step-NNNNNN/ holds a Hugging Face model directory
(`from_pretrained` loads it), the tokenizer, the run's config (dapo_config.yaml) and, for
resuming, trainer_state.pt. A checkpoint is written to a temporary directory and renamed into
place, so it is either complete or absent.

A run of several ranks (torchrun, docs/distributed.md) adds, written by every rank:
`dcp/` the model and optimizer state as a `torch.distributed.checkpoint` (sharded; loadable with
any number of ranks) and `rng/rank-NNNNN.pt` each rank's RNG state; trainer_state.pt (rank 0's)
then says `world_size` and holds no optimizer (its "optimizer" entry names the dcp/ directory)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dapo.config import DAPOConfig
from dapo.errors import CheckpointError, RunDirError
from dapo.lora import ADAPTER_DIR, ADAPTER_WEIGHTS, save_adapter, save_merged
from dapo.progress import stderr_warning

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.pt"
MANIFEST = "MANIFEST.json"   # sha256 and size of every other file, written just before COMPLETE
WEIGHTS = "model.safetensors"
CONFIG_FILE = "dapo_config.yaml"
SHARDED_DIR = "dcp"          # torch.distributed.checkpoint of {"model", "optim"}, runs of several ranks
RNG_DIR = "rng"              # rank-NNNNN.pt: capture_rng() of each rank
# Top-level keys trainer_state.pt must hold for a resume, by its "version" (checkpointer.py):
# 3 nests each part's state under its name; 2 (before 2026-12-05) was flat.
STATE_KEYS = {3: ("step", "world_size", "rng", "actor", "collector", "engine"),
              2: ("step", "optimizer_steps", "skipped_steps", "bad_steps_in_row", "optimizer", "scheduler", "rng",
                  "sampler", "buffer", "refill")}
_NAME = re.compile(r"^step-(\d{6,})$")  # anything else in checkpoints/ (step-000001.bak, notes) is ignored


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir() and (p / "COMPLETE").exists()]
    return sorted(done, key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    match = _NAME.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path} is not a checkpoint directory (step-NNNNNN)")
    return int(match.group(1))


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any, config: DAPOConfig,
                    trainer_state: dict[str, Any] | None = None, keep_last: int = 2, tmp: Path | None = None,
                    adapter: Any = None) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep_last`.

    `adapter`: the run's `peft.PeftModel` when it trains LoRA adapters (lora.py): the model
    directory then holds the merged weights, and adapter/ the adapter in PEFT's format (what a
    resume reads).

    `tmp`: a temporary directory (`tmp_checkpoint_dir`) already holding other files of this
    checkpoint (the ranks' sharded state); by default a fresh one.
    Raises CheckpointError (leaving no temporary files and every older checkpoint intact) when
    the disk is full or the directory unwritable.
    """
    final = checkpoint_dir(run_dir, step)
    given = tmp is not None
    tmp = tmp if given else tmp_checkpoint_dir(run_dir, step, os.getpid())
    try:
        if not given:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        with quiet_progress_bars():  # transformers' "Writing model shards" bar would cut into the console
            if adapter is not None:
                save_merged(model, tmp)
                save_adapter(adapter, tmp / ADAPTER_DIR)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        from dapo.rundir import run_dir_config

        run_dir_config(config).to_yaml(tmp / CONFIG_FILE)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE_FILE)
        write_manifest(tmp)
        (tmp / "COMPLETE").write_text(f"{step}\n")
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)  # free the space a partial write took
        previous = latest_checkpoint(run_dir)
        reason = _disk_full(e, final.parent, estimate_checkpoint_bytes(model)) or _reason(e)
        raise CheckpointError(f"could not write checkpoint {final}: {reason}. "
                              + (f"The previous checkpoint {previous} is intact." if previous else
                                 "No earlier checkpoint exists.")) from e
    # Keep the newest keep_last up to this step. Checkpoints of later steps belong to a timeline
    # abandoned when a resume fell back past a damaged checkpoint: they go too.
    existing = list_checkpoints(run_dir)
    older = [p for p in existing if checkpoint_step(p) <= step]
    for old in older[:-keep_last] + [p for p in existing if checkpoint_step(p) > step]:
        # Rename first: a kill during rmtree must not leave a half-deleted directory marked COMPLETE.
        doomed = old.parent / f"{TMP_PREFIX}{old.name}-pruned"
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def tmp_checkpoint_dir(run_dir: Path, step: int, pid: int) -> Path:
    final = checkpoint_dir(run_dir, step)
    return final.parent / f"{TMP_PREFIX}{final.name}-{pid}"


def save_sharded_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            export_model: torch.nn.Module, tokenizer: Any, config: DAPOConfig,
                            trainer_state: dict[str, Any], rng_state: dict[str, Any], keep_last: int = 2) -> Path:
    """The checkpoint of a run of several ranks; every rank calls it (collectives inside).

    Every rank writes its shards of the model and optimizer (DCP, dcp/) and its RNG state
    (rng/rank-NNNNN.pt) into one temporary directory; rank 0 then gathers the full weights into
    `export_model` (an unsharded copy of the model), writes the Hugging Face directory, the
    tokenizer, config and `trainer_state` there, and renames it into place (save_checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from dapo import distributed

    rank = distributed.rank()
    tmp = tmp_checkpoint_dir(run_dir, step, distributed.broadcast_object(os.getpid()))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    problem = None
    if rank == 0:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / RNG_DIR).mkdir(parents=True)
        except OSError as e:
            problem = _reason(e)
    problem = distributed.broadcast_object(problem)  # the directory exists for every rank, or none writes
    if problem is None:
        try:  # DCP raises on every rank when one fails
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                     checkpoint_id=tmp / SHARDED_DIR)
            torch.save(rng_state, tmp / RNG_DIR / f"rank-{rank:05d}.pt")
        except (OSError, RuntimeError) as e:
            problem = _reason(e)
    problems = [p for p in distributed.all_gather_object(problem) if p]
    final = checkpoint_dir(run_dir, step)
    if problems:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        raise CheckpointError(f"could not write checkpoint {final}: {problems[0]}. "
                              + (f"The previous checkpoint {previous} is intact." if previous else
                                 "No earlier checkpoint exists."))
    if rank == 0:
        try:
            with torch.no_grad():
                export_model.load_state_dict(full)
            save_checkpoint(run_dir, step, export_model, tokenizer, config, trainer_state, keep_last, tmp=tmp)
        except CheckpointError as e:
            problem = str(e)
    problem = distributed.broadcast_object(problem)
    if problem:
        raise CheckpointError(problem)
    return final


def load_sharded_state(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load dcp/ into `model` and `optimizer`, resharded to however many ranks run now (one
    process without a process group included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    try:
        dcp.load(state, checkpoint_id=Path(checkpoint) / SHARDED_DIR)
    except Exception as e:  # a damaged file becomes one clear message
        raise CheckpointError(f"could not read {Path(checkpoint) / SHARDED_DIR}: {_reason(e)}") from e
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """MANIFEST.json: {"files": {name: {"sha256": ..., "bytes": ...}}} for every file in `directory`."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in (MANIFEST, "COMPLETE")}
    (Path(directory) / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1) + "\n")


def verify_checkpoint(checkpoint: Path, need_state: bool = True) -> str | None:
    """None when `checkpoint` is intact, else what is wrong with it (one phrase).

    Checks: COMPLETE present; every file of MANIFEST.json present with its size and sha256 (a
    checkpoint from before manifests existed skips this); the weights, the config and (with
    `need_state`) trainer_state.pt present; dapo_config.yaml parses as a config; the weights are
    all finite; trainer_state.pt loads with the safe loader and holds every key a resume needs.
    Reads only data (safetensors, YAML with the safe loader, torch.load with weights_only=True).
    """
    checkpoint = Path(checkpoint)
    if not (checkpoint / "COMPLETE").is_file():
        return "no COMPLETE marker (it was not fully written)"
    manifest = checkpoint / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
            assert isinstance(files, dict)
        except Exception:  # noqa: BLE001
            return f"{MANIFEST} is damaged"
        for name, meta in files.items():
            f = checkpoint / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != meta.get("bytes"):
                return f"{name} has {f.stat().st_size} bytes, {meta.get('bytes')} when written (truncated?)"
            if _sha256(f) != meta.get("sha256"):
                return f"{name} does not match its sha256 in {MANIFEST} (damaged on disk)"
    required = [WEIGHTS, CONFIG_FILE] + ([STATE_FILE] if need_state else [])
    for name in required:
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    try:
        saved = DAPOConfig.from_yaml(checkpoint / CONFIG_FILE)
    except Exception as e:  # noqa: BLE001
        return f"{CONFIG_FILE} is unreadable ({_reason(e)})"
    if need_state and saved.lora_rank and not (checkpoint / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file():
        return f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS} is missing (a LoRA run resumes from its adapter)"
    try:
        from safetensors import safe_open

        with safe_open(str(checkpoint / WEIGHTS), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return f"{WEIGHTS} holds non-finite values in {key}"
    except Exception as e:  # noqa: BLE001
        return f"{WEIGHTS} is unreadable ({_reason(e)})"
    if need_state:
        try:
            state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            return f"{STATE_FILE} is unreadable ({_reason(e)})"
        missing = missing_state_keys(state)
        if missing:
            return f"{STATE_FILE} lacks {', '.join(missing)}"
        if not isinstance(state["step"], int) or state["step"] != checkpoint_step(checkpoint):
            return f"{STATE_FILE} is for step {state['step']!r}, not {checkpoint_step(checkpoint)}"
    return None


def intact_checkpoint(run_dir: Path, need_state: bool = True, what: str = "resuming",
                      warn: Callable[[str], None] = stderr_warning) -> Path | None:
    """The newest checkpoint of `run_dir` that passes `verify_checkpoint`; each damaged newer one
    is reported through `warn` with its problem."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(ckpt, need_state=need_state)
        if problem is None:
            return ckpt
        warn(f"dapo: warning: checkpoint {ckpt} is damaged ({problem}); {what} from an older one")
    return None


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The optimizer, scheduler, RNG, data and sampling state saved next to the weights."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} has no {STATE_FILE} (it holds weights only), "
                              "so the run cannot be resumed exactly from it")
    try:
        # Plain containers and tensors only (Checkpointer.state_dict), so the safe loader suffices.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file becomes one clear message
        raise CheckpointError(f"could not read {path}: {_reason(e)}") from e
    missing = missing_state_keys(state)
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it cannot be resumed from")
    return state


def missing_state_keys(state: Any) -> list[str]:
    """The top-level keys a trainer state of its version lacks (all of them for an unknown version)."""
    if not isinstance(state, dict):
        return ["everything (not a mapping)"]
    version = state.get("version")
    if version not in STATE_KEYS:
        return [f"a known version (it says {version!r}; this dapo reads {sorted(STATE_KEYS)})"]
    return [k for k in STATE_KEYS[version] if k not in state]


def remove_stale_tmp(run_dir: Path) -> None:
    """Delete temporary directories left by a process killed while writing a checkpoint."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


def check_run_dir(run_dir: Path, checkpoint_bytes: int) -> None:
    """Fail before training, not at the first checkpoint: create the run directory, probe-write
    a file in it, and compare the free space with the size of one checkpoint."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create run directory {run_dir}: {_reason(e)}") from e
    probe = run_dir / ".dapo-write-test"
    try:
        with probe.open("wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):  # the cleanup must not hide the real reason
            probe.unlink(missing_ok=True)
        raise RunDirError(f"run directory {run_dir} is not writable: {_reason(e)}") from e
    free = shutil.disk_usage(run_dir).free
    if free < checkpoint_bytes:
        raise RunDirError(f"only {free / 2**20:.0f} MiB free in {run_dir}; one checkpoint needs about "
                          f"{checkpoint_bytes / 2**20:.0f} MiB. Free some space or pick another --output-dir")


def estimate_checkpoint_bytes(model: torch.nn.Module) -> int:
    """Weights once, AdamW's two moments as large again each, plus room for the tokenizer."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = sum(2 * p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return weights + moments + 32 * 2**20


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror if e.filename is None else f"{e.strerror} ({e.filename})"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _disk_full(e: BaseException, directory: Path, needed: int) -> str | None:
    """'the disk is full (...)' when that is why a write failed, else None. torch.save does not
    say so: a full disk reaches it as "[enforce fail at inline_container.cc] . unexpected pos";
    what is left free (with the partial write removed) against what a checkpoint needs tells."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "unexpected pos" in str(e)
    if not (full or free < needed):
        return None
    return (f"the disk is full ({free / 2**20:.0f} MiB free in {directory}; a checkpoint needs about "
            f"{needed / 2**20:.0f} MiB). Free some space or lower --keep-last (older checkpoints are deleted only "
            "after a new one is complete), then resume the run")


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers' progress bars off inside the block (loading and saving weights mid-run)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            _fsync_tree(p)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
