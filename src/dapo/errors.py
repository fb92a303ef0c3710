"""Errors a user can act on. The CLI prints their message alone (no traceback unless --debug)."""


class DapoError(Exception):
    """Base class: the message names the problem and, where possible, the fix."""


class ConfigError(DapoError):
    """A config value is unknown, mistyped or out of range."""


class ModelLoadError(DapoError):
    """The model or tokenizer cannot be loaded."""


class DataError(DapoError):
    """A dataset is missing, empty, or lacks a column the config names."""


class RewardError(DapoError):
    """A reward function raised, timed out, or returned something that is not one finite float per completion."""


class DynamicSamplingExhausted(DapoError):
    """max_num_gen_batches generation rounds did not yield enough groups with reward variance.

    `solved` is True when every response of those rounds was correct by the task's accuracy
    function: the policy has converged on the training prompts, which ends the run early as a
    success rather than as an error.
    """

    def __init__(self, message: str, solved: bool = False, sampled: dict | None = None) -> None:
        super().__init__(message)
        self.solved = solved
        self.sampled = sampled or {}  # statistics of what the stopped step sampled (collector._sampled_stats)


class PromptTooLongError(DapoError):
    """A prompt is longer than max_prompt_len tokens."""


class RunDirError(DapoError):
    """The run directory cannot be created or written, or lacks the space for a checkpoint."""


class CheckpointError(DapoError):
    """A checkpoint cannot be written, or cannot be read back to resume from."""


def check_state_keys(part: str, state: object, keys: tuple[str, ...]) -> None:
    """Raise CheckpointError naming the keys a part's saved state lacks."""
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"the checkpoint's {part} state lacks {', '.join(missing)}; it cannot be resumed from")


class ResumeError(DapoError):
    """`--resume` cannot continue this run: no checkpoint, a finished run, or a config change that
    would change the run."""


class TrainingDiverged(DapoError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class TrainingInterrupted(DapoError):
    """SIGINT or SIGTERM stopped the run after a checkpoint was written; exit with 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


class OutOfMemory(DapoError):
    """A batch did not fit in memory (GPU or CPU); the message names the settings that size it.

    `during_update` is True when parameters may have moved in the unfinished train step (an
    out-of-memory error in the forward/backward), so its state must not be checkpointed."""

    def __init__(self, message: str, during_update: bool = False) -> None:
        super().__init__(message)
        self.during_update = during_update


_OOM_MARKERS = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory",
                "failed to allocate")

# What to lower, by stage.
_OOM_HINTS = {
    "training": ("lower max_tokens_per_micro_batch (now {max_tokens_per_micro_batch}); it bounds the tokens of one "
                 "forward/backward without changing the gradient. A single response longer than it still needs "
                 "room for group_size (now {group_size}) x max_new_tokens (now {max_new_tokens}) tokens"),
    "generation": ("lower group_size (now {group_size}), gen_batch_size (now {gen_batch_size}) or max_new_tokens "
                   "(now {max_new_tokens}): generation holds a KV cache for all of them at once"),
    "evaluation": ("lower eval_samples (now {eval_samples}) or max_eval_prompts (now {max_eval_prompts}): "
                   "evaluation samples them all at once"),
}


def is_out_of_memory(e: BaseException) -> bool:
    """torch.OutOfMemoryError, or a RuntimeError from an allocator (CPU: 'DefaultCPUAllocator:
    can't allocate memory', MPS/others: 'not enough memory')."""
    name = type(e).__name__
    if name == "OutOfMemoryError":
        return True
    return isinstance(e, (RuntimeError, MemoryError)) and (
        isinstance(e, MemoryError) or any(m in str(e).lower() for m in _OOM_MARKERS))


class oom_guard:  # noqa: N801 - used as `with oom_guard("training", config):`
    """Turn an out-of-memory error inside the block into OutOfMemory naming what to lower.

    stage: 'training' (forward/backward), 'generation' (rollouts) or 'evaluation'."""

    def __init__(self, stage: str, config: object) -> None:
        self.stage, self.config = stage, config

    def __enter__(self) -> "oom_guard":
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if exc is None or isinstance(exc, DapoError) or not is_out_of_memory(exc):
            return False
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - freeing memory is best effort
            pass
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        hint = _OOM_HINTS[self.stage].format(**{k: getattr(self.config, k, "?") for k in (
            "max_tokens_per_micro_batch", "group_size", "max_new_tokens", "gen_batch_size", "eval_samples",
            "max_eval_prompts")})
        raise OutOfMemory(f"out of memory during {self.stage} ({first}); {hint}, or use a smaller model or "
                          "--dtype bfloat16", during_update=self.stage == "training") from exc
