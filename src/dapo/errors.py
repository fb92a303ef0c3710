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
