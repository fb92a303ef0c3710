"""Process-group helpers for data-parallel training under `torchrun` (docs/distributed.md).

Every function works without a process group too (one process: rank 0 of a world of 1), so the
rest of the code calls them unconditionally. `init()` starts the group from torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, ...): gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

# Rank 0 alone evaluates and writes checkpoints' HF export; the others wait in the next collective.
# The default 30 min of torch would cut a long evaluation short: 2 h unless DAPO_DIST_TIMEOUT_MIN says.
TIMEOUT_ENV = "DAPO_DIST_TIMEOUT_MIN"
T = TypeVar("T")
_OURS = False  # the process group was started by `init`


def env_world_size() -> int:
    """The world size torchrun asked for (1 outside torchrun), before or after `init`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(device: torch.device | str | None = None) -> bool:
    """Start the process group from torchrun's environment when WORLD_SIZE > 1 (idempotent).

    Returns True when this process is part of a group of several ranks."""
    if is_initialized():
        return dist.get_world_size() > 1
    if env_world_size() <= 1:
        return False
    device = torch.device(device) if device is not None else None
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, "120"))))
    global _OURS
    _OURS = True
    return dist.get_world_size() > 1


def destroy() -> None:
    """End the process group `init` started; one that another library started (vLLM starts a
    one-process group of its own) is that library's to end."""
    global _OURS
    if _OURS and is_initialized():
        dist.destroy_process_group()
    _OURS = False


def rank() -> int:
    """This process's rank; torchrun's RANK before the group is started (for the run-dir lock)."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; CPU tensors inside)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of `tensor` (sum, max or min over ranks), on the tensor's own device."""
    if world_size() == 1:
        return tensor
    work = tensor.detach().to(_reduce_device(), copy=True)
    dist.all_reduce(work, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return work.to(tensor.device)


def all_reduce_floats(values: list[float], op: str = "sum") -> list[float]:
    """Reduce a list of Python numbers over ranks (one collective for the whole list)."""
    if world_size() == 1 or not values:
        return list(values)
    return all_reduce(torch.tensor(values, dtype=torch.float64), op).tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one."""
    return bool(all_reduce_floats([float(flag)], "max")[0]) if world_size() > 1 else flag


def on_rank0(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 alone (evaluation, the run directory's files); its result, or the error it
    raised, on every rank, so that no rank waits in a collective the others never reach and every
    rank ends with the same error."""
    if world_size() == 1:
        return fn()
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - raised below, on every rank
            error = e
    result, shared = broadcast_object((result, picklable(error)))
    if error is not None:
        raise error
    if shared is not None:
        raise shared
    return result


def picklable(error: BaseException | None) -> BaseException | None:
    """`error` itself when it survives pickling (to reach the other ranks), else a RuntimeError
    with its text."""
    import pickle

    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")


def share(items: list[Any], rank_: int | None = None, world: int | None = None) -> list[Any]:
    """Rank `rank_`'s contiguous share of `items`; the first len % world ranks get one more
    (the same split as TrainBatch.shard)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    per, extra = divmod(len(items), world)
    start = rank_ * per + min(rank_, extra)
    return items[start:start + per + (1 if rank_ < extra else 0)]
