"""Built-in tasks from reasoning-gym's seeded generators: `--task reasoning_gym:<name>`.

reasoning-gym (PyPI `reasoning-gym`, the optional extra `dapo-rl[reasoning-gym]`) ships
procedural generators (countdown, basic_arithmetic, chain_sum, gsm_symbolic, ...), each with
its own `score_answer(answer, entry) -> float in [0, 1]`. The task:

- prompts: the generator's questions, generated once with a fixed seed (the same in every run,
  like the arithmetic task), split into disjoint held-out and training sets (no question text in
  both);
- reward and accuracy: the generator's own score_answer on the completion (the text inside the
  last <answer>...</answer> when there is one, else the whole stripped completion); a score
  >= 1 is correct.

`reasoning_gym:<name>[:<train_size>[:<eval_size>]]` sets the sizes (default 500 and 100).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from dapo.errors import DataError
from dapo.tasks import Task

PREFIX = "reasoning_gym:"
INSTALL = 'pip install "dapo-rl[reasoning-gym]"'
SPLIT_SEED = 1234
DEFAULT_TRAIN, DEFAULT_EVAL = 500, 100
_ANSWER = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)


def _import() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise DataError(f"--task reasoning_gym:... needs the reasoning-gym package: {INSTALL}") from None
    return reasoning_gym


def parse_spec(task: str) -> tuple[str, int, int]:
    """'reasoning_gym:countdown[:train[:eval]]' -> (generator name, train size, eval size)."""
    parts = task[len(PREFIX):].split(":")
    name = parts[0]
    try:
        sizes = [int(p) for p in parts[1:]]
    except ValueError:
        raise DataError(f"task {task!r}: sizes must be integers, as in reasoning_gym:{name}:500:100") from None
    if not name or len(sizes) > 2 or any(n < 1 for n in sizes):
        raise DataError(f"task {task!r} is not of the form reasoning_gym:<name>[:<train_size>[:<eval_size>]]")
    train = sizes[0] if sizes else DEFAULT_TRAIN
    held_out = sizes[1] if len(sizes) > 1 else DEFAULT_EVAL
    return name, train, held_out


def completion_answer(completion: Any) -> str:
    """The answer part of a completion: the last <answer>...</answer>, else the stripped text."""
    from dapo.rewards import _text

    text = _text(completion)
    found = _ANSWER.findall(text)
    return (found[-1] if found else text).strip()


class ReasoningGymScore:
    """The generator's score_answer as a TRL-style reward function; picklable (it holds only the
    generator's name and builds the scorer in whichever process calls it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__name__ = f"reasoning_gym_{name}"
        self._score: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"])  # type: ignore[misc]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None,
                 metadata: Sequence[Any] | None = None, question: Sequence[Any] | None = None,
                 **_: Any) -> list[float]:
        if self._score is None:
            self._score = _import().get_score_answer_fn(self.name)
        n = len(completions)
        answers = list(answer) if answer is not None else [None] * n
        metas = list(metadata) if metadata is not None else [{}] * n
        questions = list(question) if question is not None else [str(p) for p in prompts]
        return [float(self._score(answer=completion_answer(c), entry={"question": q, "answer": a, "metadata": m}))
                for c, a, m, q in zip(completions, answers, metas, questions)]


def records(name: str, train_size: int = DEFAULT_TRAIN, eval_size: int = DEFAULT_EVAL,
            seed: int = SPLIT_SEED) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) records from one seeded generator run; no question is in both.

    Each record: prompt (the question), question, answer, metadata (what score_answer reads).
    """
    rg = _import()
    if name not in rg.factory.DATASETS:
        raise DataError(f"reasoning-gym has no generator {name!r} (e.g. {', '.join(sorted(rg.factory.DATASETS)[:8])}, "
                        "...)")
    # Ask for a margin over the sizes: generators can repeat a question (small spaces).
    wanted = train_size + eval_size
    size = wanted + max(wanted // 10, 10)
    data = rg.create_dataset(name, size=size, seed=seed)
    held_out: list[dict[str, Any]] = []
    train: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i in range(size):
        entry = data[i]
        q = entry["question"]
        if q in seen:
            continue
        seen.add(q)
        record = {"prompt": q, "question": q, "answer": entry["answer"], "metadata": entry.get("metadata", {})}
        (held_out if len(held_out) < eval_size else train).append(record)
        if len(train) >= train_size:
            break
    if not train:
        raise DataError(f"reasoning-gym generator {name!r} gave no training questions beyond the {eval_size} held out")
    return train, held_out


def reasoning_gym_task(task: str) -> Task:
    """The Task for 'reasoning_gym:<name>[:train[:eval]]'."""
    name, train_size, eval_size = parse_spec(task)
    train, held_out = records(name, train_size, eval_size)
    score = ReasoningGymScore(name)
    return Task(task, train, held_out, {name: score}, score)
