"""Stage: prompts. Records (a prompt plus any other columns), chat formatting, and the sampler
that hands out `gen_batch_size` records per generation round, epoch after epoch."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from dapo.errors import DataError, PromptTooLongError

Record = dict[str, Any]


def to_messages(prompt: Any, system_prompt: str | None = None) -> list[dict[str, str]]:
    """A prompt string becomes one user message; chat messages pass through."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        messages = [dict(role=m["role"], content=m["content"]) for m in prompt]
    else:
        raise DataError(f"a prompt must be a string or a list of {{role, content}} messages, got {prompt!r:.80}")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def encode_prompt(tokenizer: Any, prompt: Any, system_prompt: str | None, max_prompt_len: int) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant turn's opening."""
    out = tokenizer.apply_chat_template(to_messages(prompt, system_prompt), add_generation_prompt=True, tokenize=True)
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    if len(ids) > max_prompt_len:
        raise PromptTooLongError(f"prompt is {len(ids)} tokens with the chat template, longer than "
                                 f"max_prompt_len={max_prompt_len}: {str(prompt)[:80]!r}")
    return ids


@dataclass
class PromptSampler:
    """Draws records without replacement in a seeded shuffled order, reshuffling every epoch.

    Its whole state is (epoch, position, seed), so a resumed run draws the same prompts.
    """

    records: list[Record]
    seed: int = 0
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.records:
            raise DataError("the training dataset is empty")
        self._order = self._shuffled(self.epoch)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[Record]:
        out = []
        for _ in range(n):
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch)
            out.append(self.records[self._order[self.position]])
            self.position += 1
        return out

    @property
    def prompts_consumed(self) -> int:
        return self.epoch * len(self.records) + self.position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)
