"""Stage: rollouts that overlap training (config.max_staleness >= 1).

A generator process holds its own copy of the policy and its own rollout engine, and samples
rounds of prompts that the trainer (the batch collector) submits ahead of need, while the trainer
trains. The trainer scores, filters and trains on what comes back; only token ids and log-probs
cross the process boundary, so reward functions stay in the trainer's process.

    trainer                                   generator process
    submit(prompts, min_version) ──requests──▶ wait until the published version >= min_version
                                               load newer weights from the mailbox (if any)
                                               engine.generate(...)
    result() ◀──────────────────────results── (samples, version that sampled them, timings)
    publish(model, version) ──▶ mailbox (shared memory, one lock, a version counter)

Pacing (the staleness bound): a round submitted for train step t carries min_version = t - 1 - k.
The generator samples it with weights of at least that version, and step t trains the policy of
version t - 1, so no group is more than k versions behind when it is trained (Trainer/collector:
a surplus group that would exceed the bound by waiting is trained in the step it arrived in).

Weight transport on CPU: the trainer copies its parameters into a shared-memory copy of the model
(the mailbox) after every train step and bumps the version; the generator copies the mailbox into
its own model before its next round when the version moved. Both copies are timed (metrics
weight_publish_seconds, weight_load_seconds). On GPUs the same protocol would carry an NCCL
broadcast from the trainer's rank to the generator's devices instead (docs/async.md).

Faults: the generator dies with its parent (PR_SET_PDEATHSIG, and a parent check while idle), ignores
SIGINT (the trainer stops it: Ctrl-C reaches the whole process group), reports its own errors as
a message, and a generator that dies is noticed within a second by the trainer, which stops with one
line naming its exit code.
"""

from __future__ import annotations

import copy
import ctypes
import os
import queue
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from dapo.config import DAPOConfig
from dapo.engines import Samples, SamplingParams
from dapo.errors import DapoError

POLL_SECONDS = 0.5  # how often a waiting side checks that the other is alive


class GeneratorDied(DapoError):
    """The generator process ended or failed; the run stops (its last checkpoint is intact)."""


@dataclass
class Round:
    """What the generator sampled for one request."""

    ticket: int
    samples: list[Samples]
    version: int                 # the policy version (train steps) of the weights that sampled it
    gen_seconds: float           # sampling
    weight_wait_seconds: float   # waiting for the weights the request's min_version asks for (pacing)
    weight_load_seconds: float   # copying newer weights from the mailbox
    idle_seconds: float          # waiting for this request to arrive

    def timings(self) -> dict[str, float]:
        """The step metrics these seconds add to (collector.ASYNC_TIMINGS, less the trainer's wait)."""
        return {"generator_seconds": self.gen_seconds, "generator_weight_wait_seconds": self.weight_wait_seconds,
                "weight_load_seconds": self.weight_load_seconds, "generator_idle_seconds": self.idle_seconds}


def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """dst's parameters and buffers := src's, in place (the same architecture)."""
    with torch.no_grad():
        for d, s in zip(dst.state_dict().values(), src.state_dict().values()):
            d.copy_(s)


def split_threads(total: int, generator: int) -> tuple[int, int]:
    """(trainer threads, generator threads) out of `total`: the generator takes `generator`, or half
    when 0 (at least 1 each; a single thread is shared).

    >>> split_threads(2, 0)
    (1, 1)
    >>> split_threads(8, 0)
    (4, 4)
    >>> split_threads(8, 2)
    (6, 2)
    """
    if total <= 1:
        return 1, 1
    gen = generator or total // 2
    gen = min(max(gen, 1), total - 1)
    return total - gen, gen


class AsyncGenerator:
    """The trainer's handle on the generator process."""

    def __init__(self, config: DAPOConfig, model: torch.nn.Module, pad_id: int, threads: int, seed: int,
                 cores: Sequence[int] | None = None) -> None:
        ctx = mp.get_context("spawn")  # fork would copy the trainer's threads and locks
        # The mailbox: a shared-memory copy of the weights, written by publish() under the lock.
        self.mailbox = copy.deepcopy(model).requires_grad_(False).share_memory()
        self.version = ctx.Value("q", -1, lock=False)  # -1: nothing published yet
        self.lock = ctx.Lock()
        self.requests: Any = ctx.Queue()
        self.results: Any = ctx.Queue()
        self.next_ticket = 0
        self.publish_seconds = 0.0
        self.process = ctx.Process(
            target=_generator_main, name="dapo-generator", daemon=True,
            args=(config, self.mailbox, self.version, self.lock, self.requests, self.results, pad_id, threads, seed,
                  os.getpid(), list(cores) if cores else None))
        with _main_module_hidden(), _sigint_ignored():
            self.process.start()
        self.closed = False
        self.description = ""                              # the run's first lines say how the machine is split
        self.restore_affinity: list[int] | None = None     # the trainer's cores before it was pinned

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def publish(self, model: torch.nn.Module, version: int) -> float:
        """Copy `model`'s weights into the mailbox as policy `version`; returns the seconds it took."""
        t0 = time.perf_counter()
        with self.lock:
            copy_weights(self.mailbox, model)
            self.version.value = version
        self.publish_seconds = time.perf_counter() - t0
        return self.publish_seconds

    def submit(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, min_version: int) -> int:
        """Queue a round; the generator samples it with weights of version >= min_version."""
        self._check_alive()
        ticket = self.next_ticket
        self.next_ticket += 1
        self.requests.put((ticket, prompt_ids, n, sampling, min_version))
        return ticket

    def result(self, ticket: int) -> tuple[Round, float]:
        """The round of `ticket` (rounds come back in the order submitted) and the seconds waited."""
        t0 = time.perf_counter()
        while True:
            try:
                kind, payload = self.results.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                self._check_alive()
        if kind == "error":
            self.close()
            raise GeneratorDied(f"the generator process failed: {payload}")
        assert payload.ticket == ticket, f"rounds came back out of order: {payload.ticket} for {ticket}"
        return payload, time.perf_counter() - t0

    def _check_alive(self) -> None:
        if not self.process.is_alive():
            code = self.process.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise GeneratorDied(f"the generator process (pid {self.process.pid}) died ({how}); the run stops "
                                "here, its last checkpoint is intact (dapo train --resume continues it)")

    def close(self) -> None:
        """Stop the generator (idempotent): asked first, then terminated, then killed."""
        if self.closed:
            return
        self.closed = True
        if self.process.is_alive():
            try:
                self.requests.put(None)
            except (OSError, ValueError):
                pass
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        for q in (self.requests, self.results):
            q.cancel_join_thread()
            q.close()
        if self.restore_affinity:
            os.sched_setaffinity(0, self.restore_affinity)


@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a spawned process without re-running the parent's __main__ (a user's training script
    without an `if __name__ == "__main__":` guard would train again in the child): the child needs
    only dapo's own modules."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """The child inherits an ignored SIGINT through exec, so Ctrl-C during its imports (seconds)
    cannot kill it either; the parent's own handler is back as soon as the child is started."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not installed from Python, left as it was
            signal.signal(signal.SIGINT, previous)


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this process when its parent dies (no orphan generator)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the idle loop's parent check ends it


def _generator_main(config: DAPOConfig, mailbox: torch.nn.Module, version: Any, lock: Any, requests: Any,
                    results: Any, pad_id: int, threads: int, seed: int, parent: int,
                    cores: list[int] | None) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer decides when the generator stops
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        from dapo.engines import make_engine

        with lock:
            model = copy.deepcopy(mailbox)
            have = version.value
        model.eval()
        engine = make_engine(config, model, pad_id)
        while True:
            t0 = time.perf_counter()
            request = None
            while request is None:
                try:
                    request = requests.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if os.getppid() != parent:
                        return
                    continue
                if request is None:  # the trainer's stop
                    return
            ticket, prompt_ids, n, sampling, min_version = request
            t1 = time.perf_counter()
            while version.value < min_version:  # pacing: wait for recent enough weights
                if os.getppid() != parent:
                    return
                time.sleep(0.002)
            t2 = time.perf_counter()
            if version.value != have:
                with lock:
                    copy_weights(model, mailbox)
                    have = version.value
                engine.sync_weights(model)
            t3 = time.perf_counter()
            samples = engine.generate(prompt_ids, n, sampling)
            results.put(("ok", Round(ticket, samples, have, time.perf_counter() - t3, t2 - t1, t3 - t2, t1 - t0)))
    except Exception as e:  # noqa: BLE001 - reported to the trainer, which stops the run with it
        traceback.print_exc()
        results.put(("error", f"{type(e).__name__}: {e}"))
