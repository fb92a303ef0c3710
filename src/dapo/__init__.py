"""dapo: fine-tune language models with DAPO (Yu et al. 2025, arXiv 2503.14476).

The public names are imported on first use (PEP 562), so `import dapo.config` or `dapo --help`
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dapo.advantages import group_advantages
    from dapo.config import DAPOConfig
    from dapo.errors import DapoError
    from dapo.loss import aggregate_loss, kl_k3, policy_loss
    from dapo.rewards import RewardFunction, TrainerState, overlong_penalty
    from dapo.sampling import informative_groups
    from dapo.trainer import TrainResult

# public name -> module that defines it
_EXPORTS = {
    "DAPOConfig": "dapo.config", "DapoError": "dapo.errors", "RewardFunction": "dapo.rewards",
    "TrainerState": "dapo.rewards", "aggregate_loss": "dapo.loss", "group_advantages": "dapo.advantages",
    "informative_groups": "dapo.sampling", "kl_k3": "dapo.loss", "overlong_penalty": "dapo.rewards",
    "policy_loss": "dapo.loss",
}
__all__ = ["DAPOConfig", "DapoError", "RewardFunction", "TrainerState", "aggregate_loss", "group_advantages",
           "informative_groups", "kl_k3", "overlong_penalty", "policy_loss", "train"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'dapo' has no attribute {name!r}")


def train(config: DAPOConfig | None = None, **kwargs: Any) -> TrainResult:
    """Run DAPO training and return a `dapo.trainer.TrainResult`.

    Keyword arguments (all optional): reward_fns (callables following TRL's convention,
    RewardFunctions or --reward specs; replace the config's rewards, the first drives accuracy
    unless config.accuracy_reward names another), task (a dapo.tasks.Task), model, tokenizer,
    engine, resume (a run directory to continue). See `dapo.trainer.train` and the README.
    """
    from dapo.config import DAPOConfig
    from dapo.trainer import train as _train

    return _train(config or DAPOConfig(), **kwargs)
