"""Tasks: training prompts, held-out prompts, reward functions and an accuracy function.

`build_task(config)` is the one place that turns a config into a Task: a built-in task
(generated in code, no download) or records from --data / --eval-data, with reward functions
from --reward or the task's own.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from dapo.data import Record, load_records
from dapo.errors import DataError
from dapo.rewards import (NEEDS_ANSWER, RewardFn, RewardFunction, as_reward_functions, build_reward_functions,
                          digit_accuracy, digit_reward, numeric_reward)

if TYPE_CHECKING:
    from dapo.config import DAPOConfig

DIGIT_PROMPT = ("What number between 0 and 9 am I thinking of right now? "
                "You MUST ONLY answer with a single integer.")
ARITHMETIC_PROMPT = "What is {a} + {b}? Answer with the number only."


@dataclass
class Task:
    name: str
    train: list[Record]
    eval: list[Record]
    rewards: dict[str, RewardFn]       # name -> TRL-style reward function (weights come from the config)
    accuracy: RewardFn | None = None   # 1.0 for a correct completion; drives accuracy metrics and eval
    accuracy_name: str = "accuracy"    # how messages name the accuracy function


def digit_task() -> Task:
    """The seed example: one prompt; reward 1 - |d - 5| / 9 for a bare digit d; correct means "5"."""
    record = {"prompt": DIGIT_PROMPT}
    return Task("digit", [record], [record], {"digit": digit_reward}, digit_accuracy)


# Difficulty levels for SmolLM2-135M-Instruct at temperature 1 with the numeric reward (last
# number in the answer), measured on 128 samples each: "easy" (one operand 0 or 1) ~23%,
# "medium" (both operands 2..9) ~14%, "hard" (two-digit operands) ~0%. The model solves
# nothing reliably, so "easy" is what it solves most often; "hard" groups are almost always
# all-wrong and show dynamic sampling dropping them.
ARITHMETIC_LEVELS: dict[str, list[tuple[int, int]]] = {
    "easy": sorted({(a, b) for a in range(10) for b in (0, 1)} | {(a, b) for a in (0, 1) for b in range(10)}),
    "medium": [(a, b) for a in range(2, 10) for b in range(2, 10)],
    "hard": [(a, b) for a in range(10, 100) for b in range(10, 100)],
}


def arithmetic_records(seed: int = 1234, eval_per_level: int = 16,
                       train_per_level: int = 48) -> tuple[list[Record], list[Record]]:
    """Sums a + b at three levels, split into disjoint train and held-out pairs.

    The split is fixed by `seed` (not the run's seed), so every run is judged on the same
    held-out prompts. Small levels contribute all their remaining pairs to training.
    Returns (train, eval); each record has prompt, answer (a string) and level.
    """
    rng = random.Random(seed)
    train: list[Record] = []
    held_out: list[Record] = []
    for level, pairs in ARITHMETIC_LEVELS.items():
        pairs = list(pairs)
        rng.shuffle(pairs)
        for split, chosen in ((held_out, pairs[:eval_per_level]),
                              (train, pairs[eval_per_level:eval_per_level + train_per_level])):
            split.extend({"prompt": ARITHMETIC_PROMPT.format(a=a, b=b), "answer": str(a + b), "level": level}
                         for a, b in chosen)
    return train, held_out


def arithmetic_task() -> Task:
    """Generated sums with a held-out split; reward and accuracy: the numeric reward."""
    train, held_out = arithmetic_records()
    return Task("arithmetic", train, held_out, {"numeric": numeric_reward}, numeric_reward)


# The long-answer task: the same sums, asked with a reasoning format, so answers run to a hundred
# tokens and more. Measured on the untrained default model (benchmarks/long_task_candidates.py, 16
# prompts x 4 samples, 256 new tokens): accuracy 0.19, 20% truncated, mean length 117; sums of
# three digits (0.06), two-digit + one-digit (0.05) and a two-step apples word problem (0.05, 33%
# truncated) start lower. At max_new_tokens 160 about a third of the answers are truncated.
LONG_ARITHMETIC_PROMPT = ("What is {a} + {b}? Think step by step, then give the final answer on the last line as "
                          "'Answer: <number>'.")


def long_arithmetic_records(seed: int = 1234, eval_count: int = 16) -> tuple[list[Record], list[Record]]:
    """Sums a + b of digits 2..9 (64 pairs) with the reasoning prompt: `eval_count` held out, the
    rest to train on (a split fixed by `seed`, not the run's seed)."""
    pairs = [(a, b) for a in range(2, 10) for b in range(2, 10)]
    random.Random(seed).shuffle(pairs)
    records = [{"prompt": LONG_ARITHMETIC_PROMPT.format(a=a, b=b), "answer": str(a + b)} for a, b in pairs]
    return records[eval_count:], records[:eval_count]


def long_arithmetic_task() -> Task:
    """Sums answered after step-by-step reasoning; reward and accuracy: the numeric reward (the
    last number of the answer), so an answer cut off at max_new_tokens rarely scores."""
    train, held_out = long_arithmetic_records()
    return Task("long_arithmetic", train, held_out, {"numeric": numeric_reward}, numeric_reward)


BUILTIN_TASKS = {"digit": digit_task, "arithmetic": arithmetic_task, "long_arithmetic": long_arithmetic_task}


# Task families named by a prefix, as import strings of their factory (name -> Task): the module
# (and its optional dependency) is imported only when a config names the family.
TASK_FAMILIES = {"reasoning_gym:": "dapo.rgym:reasoning_gym_task"}


def get_task(name: str) -> Task:
    for prefix, target in TASK_FAMILIES.items():
        if name.startswith(prefix):
            module, _, attr = target.partition(":")
            return getattr(importlib.import_module(module), attr)(name)
    if name not in BUILTIN_TASKS:
        raise DataError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name]()


def build_task(config: "DAPOConfig", eval_only: bool = False, rewards_given: bool = False) -> Task:
    """The task a config describes.

    - Records: --data (train) and --eval-data (held-out) when given, else the built-in task's.
    - Reward functions: --reward when given, else the built-in task's own (data needs --reward,
      unless `rewards_given`: dapo.train(reward_fns=...) supplies them, see use_reward_fns).
    - Accuracy: with --reward, the reward function named by accuracy_reward (default: the
      first; a score >= 1 counts as correct); otherwise the built-in task's accuracy function.
    With `eval_only` the training records are left out (`dapo eval` needs only held-out ones).
    """
    c = config
    load = dict(prompt_column=c.prompt_column, prompt_template=c.prompt_template)
    base = get_task(c.task) if c.data is None else None
    if c.data is not None:
        if not c.reward and not rewards_given:
            raise DataError(f"--data {c.data!r} needs reward functions: --reward exact_match, numeric, math, "
                            f"'module:function' or 'file.py:function' (or dapo.train(..., reward_fns=[f]))")
        task = Task("data", load_records(c.data, c.data_split, **load), [], {}, None)
    else:
        assert base is not None
        task = replace(base)
    if c.eval_data is not None:
        task.eval = load_records(c.eval_data, c.eval_split, **load)
    if eval_only:
        task.train = []
    if c.reward and not rewards_given:
        fns = build_reward_functions(c.reward, answer_column=c.answer_column)
        task.rewards = {rf.name: rf.fn for rf in fns}
        accuracy = accuracy_function(fns, c.accuracy_reward)
        task.accuracy, task.accuracy_name = accuracy.fn, accuracy.name
    if not rewards_given:  # a task's own built-in rewards read 'answer'; --reward's read answer_column
        _check_columns(task, c, c.answer_column if c.reward else "answer")
    return task


def accuracy_function(fns: list[RewardFunction], name: str | None) -> RewardFunction:
    """The reward function called `name` (None: the first); its score >= 1 counts as correct."""
    if name is None:
        return fns[0]
    for rf in fns:
        if rf.name == name:
            return rf
    raise DataError(f"accuracy_reward {name!r} names none of the reward functions ({', '.join(rf.name for rf in fns)})")


def use_reward_fns(task: Task, reward_fns: Any, config: "DAPOConfig") -> list[RewardFunction]:
    """dapo.train(reward_fns=...): they replace the task's rewards, and one of them its accuracy.

    `reward_fns` is anything as_reward_functions takes (callables, RewardFunctions, specs);
    config.reward_weights, when given, sets their weights (TRL's reward_weights). Accuracy is
    config.accuracy_reward or else the first function. The task is changed in place.
    """
    fns = as_reward_functions(reward_fns, config.reward_weights or None, answer_column=config.answer_column)
    task.rewards = {rf.name: rf.fn for rf in fns}
    accuracy = accuracy_function(fns, config.accuracy_reward)
    task.accuracy, task.accuracy_name = accuracy.fn, accuracy.name
    _check_columns(task, config, config.answer_column)
    return fns


def reward_functions(task: Task, weights: list[float]) -> list[RewardFunction]:
    """The task's reward functions with their config weights (empty: all 1.0)."""
    if weights and len(weights) != len(task.rewards):
        raise DataError(f"{len(weights)} reward_weights for {len(task.rewards)} reward functions "
                        f"({', '.join(task.rewards)})")
    return [RewardFunction(name, fn, weights[i] if weights else 1.0)
            for i, (name, fn) in enumerate(task.rewards.items())]


def data_columns(record: Record, config: "DAPOConfig | None" = None) -> list[str]:
    """The columns of a loaded record as the data file has them: 'prompt' is left out when it was
    built by the loader (--prompt-column other than 'prompt', or --prompt-template)."""
    derived = config is not None and (config.prompt_template is not None or config.prompt_column != "prompt")
    return [k for k in record if not (k == "prompt" and derived)]


def _check_columns(task: Task, config: "DAPOConfig | None" = None, column: str = "answer") -> None:
    """Fail before any generation when a built-in reward needs an answer column the data lacks."""
    needing = [name for name in task.rewards if _base_name(name) in NEEDS_ANSWER]
    for split, records in (("training", task.train), ("evaluation", task.eval)):
        if needing and records and column not in records[0]:
            hint = "" if column != "answer" else "; name the column that holds the answer with --answer-column"
            raise DataError(f"reward {needing[0]!r} compares completions with an {column!r} column, which the "
                            f"{split} data lacks (columns: {', '.join(data_columns(records[0], config))}){hint}")


def _base_name(name: str) -> str:
    """'numeric_2' (a repeated built-in) -> 'numeric'."""
    head, _, tail = name.rpartition("_")
    return head if head and tail.isdigit() else name
