"""Built-in tasks: prompts, reward functions and an accuracy function, with no download."""

from __future__ import annotations

from dataclasses import dataclass

from dapo.data import Record
from dapo.rewards import RewardFn, digit_accuracy, digit_reward

DIGIT_PROMPT = ("What number between 0 and 9 am I thinking of right now? "
                "You MUST ONLY answer with a single integer.")


@dataclass
class Task:
    name: str
    train: list[Record]
    eval: list[Record]
    rewards: dict[str, RewardFn]       # name -> TRL-style reward function (weights come from the config)
    accuracy: RewardFn | None = None   # 1.0 for a correct completion; drives accuracy metrics and eval


def digit_task() -> Task:
    """The seed example: one prompt; reward 1 - |d - 5| / 9 for a bare digit d; correct means "5"."""
    record = {"prompt": DIGIT_PROMPT}
    return Task("digit", [record], [record], {"digit": digit_reward}, digit_accuracy)


def get_task(name: str) -> Task:
    builders = {"digit": digit_task}
    return builders[name]()
