"""dapo: fine-tune language models with DAPO (Yu et al. 2025, arXiv 2503.14476)."""

from dapo.advantages import group_advantages
from dapo.config import DAPOConfig
from dapo.errors import DapoError
from dapo.loss import aggregate_loss, kl_k3, policy_loss
from dapo.rewards import RewardFunction, TrainerState, overlong_penalty
from dapo.sampling import informative_groups

__all__ = ["DAPOConfig", "DapoError", "RewardFunction", "TrainerState", "aggregate_loss", "group_advantages", "informative_groups", "kl_k3",
           "overlong_penalty", "policy_loss", "train"]
__version__ = "0.1.0"


def train(config: DAPOConfig | None = None, **kwargs):  # noqa: ANN001, ANN201 - lazy import keeps `import dapo` light
    """Run DAPO training and return a `dapo.trainer.TrainResult`.

    Keyword arguments (all optional): reward_fns (callables following TRL's convention,
    RewardFunctions or --reward specs; replace the config's rewards, the first drives accuracy
    unless config.accuracy_reward names another), task (a dapo.tasks.Task), model, tokenizer,
    resume (a run directory to continue). See `dapo.trainer.train` and the README.
    """
    from dapo.trainer import train as _train

    return _train(config or DAPOConfig(), **kwargs)
