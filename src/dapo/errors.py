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

    def __init__(self, message: str, solved: bool = False) -> None:
        super().__init__(message)
        self.solved = solved


class PromptTooLongError(DapoError):
    """A prompt is longer than max_prompt_len tokens."""


class RunDirError(DapoError):
    """The run directory cannot be created or written, or lacks the space for a checkpoint."""


class CheckpointError(DapoError):
    """A checkpoint cannot be written, or cannot be read back to resume from."""


class ResumeError(DapoError):
    """`--resume` cannot continue this run: no checkpoint, a finished run, or a config change that
    would change the run."""


class TrainingDiverged(DapoError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class TrainingInterrupted(DapoError):
    """SIGINT or SIGTERM stopped the run after a checkpoint was written; exit with 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
