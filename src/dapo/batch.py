"""The typed batch that flows from rollouts to the update: one row per response, flat columns.

Responses of one group (one prompt's G samples) are contiguous and share a group index; the
prompt is named by its stable index in the training records (never by object identity), so the
dynamic-sampling buffer survives a resume and a data-parallel shard is a plain slice of groups.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch


@dataclass
class TrainBatch:
    group: torch.Tensor                 # [B] long, group index in this batch: 0, 0, ..., 1, 1, ... (contiguous)
    prompt_index: torch.Tensor          # [B] long, the prompt's index in the training records
    prompt_ids: list[list[int]]         # [B] the chat-templated prompt (one list shared by a group's rows)
    response_ids: list[list[int]]       # [B] sampled tokens, ending with a stop token unless truncated
    truncated: torch.Tensor             # [B] bool, max_new_tokens reached without a stop token
    completions: list[str]              # [B] decoded responses (what reward functions saw)
    scores: torch.Tensor                # [B, F] raw reward-function outputs
    task_rewards: torch.Tensor          # [B] weighted task reward (what dynamic sampling filters on)
    rewards: torch.Tensor               # [B] task reward + overlong penalty (what advantages use)
    correct: torch.Tensor | None = None  # [B] float 1/0 by the accuracy function, when the task has one
    advantages: torch.Tensor | None = None        # [B]
    engine_logprobs: list[torch.Tensor] | None = None  # [B] x [len_i], the rollout engine's own
    old_logprobs: list[torch.Tensor] | None = None      # [B] x [len_i], the trainer's, before the update
    # [B] long: the policy version (train steps completed by the weights) that sampled each row
    version: torch.Tensor | None = None
    # [B] long: versions between the sampling policy and the one this step updates (a surplus group
    # carried over, an asynchronous generator's rounds); set when the batch is formed. None: all 0
    staleness: torch.Tensor | None = None

    # --- shape -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def num_groups(self) -> int:
        return int(self.group[-1]) + 1 if len(self) else 0

    @property
    def lengths(self) -> torch.Tensor:
        """[B] response lengths in tokens (the EOS token included)."""
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.long)

    def grouped(self, column: torch.Tensor) -> torch.Tensor:
        """[B] -> [num_groups, G]; every group of a batch has the same size G."""
        return column.view(self.num_groups, -1)

    def is_stale(self, row: int) -> bool:
        return self.staleness is not None and bool(self.staleness[row] > 0)

    def loss_mask(self, overlong_filter: bool) -> torch.Tensor:
        """[B] bool: responses that carry loss. Empty responses never do; with overlong filtering
        (paper Sec. 3.4) truncated ones do not either."""
        mask = self.lengths > 0
        return mask & ~self.truncated if overlong_filter else mask

    # --- slicing ------------------------------------------------------------------------------
    def select_groups(self, groups: list[int] | torch.Tensor) -> "TrainBatch":
        """The rows of the listed groups (or of a [num_groups] bool mask), renumbered 0..k-1 in order."""
        if isinstance(groups, torch.Tensor) and groups.dtype == torch.bool:
            groups = groups.nonzero().flatten().tolist()
        groups = [int(g) for g in groups]
        rows = [i for g in groups for i in (self.group == g).nonzero().flatten().tolist()]
        out = self.select_rows(rows)
        sizes = [int((self.group == g).sum()) for g in groups]
        out.group = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(sizes, dtype=torch.long))
        return out

    def select_rows(self, rows: list[int]) -> "TrainBatch":
        index = torch.tensor(rows, dtype=torch.long)
        values: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                values[f.name] = None
            elif isinstance(v, torch.Tensor):
                values[f.name] = v[index]
            else:
                values[f.name] = [v[i] for i in rows]
        return TrainBatch(**values)

    def shard(self, rank: int, world: int) -> "TrainBatch":
        """Rank `rank`'s contiguous share of the groups (whole groups, so a rank packs each of its
        prompts once); the first `num_groups % world` ranks get one group more."""
        per, extra = divmod(self.num_groups, world)
        start = rank * per + min(rank, extra)
        return self.select_groups(list(range(start, start + per + (1 if rank < extra else 0))))

    @staticmethod
    def cat(batches: list["TrainBatch"]) -> "TrainBatch":
        """Concatenate batches, renumbering their groups one after another."""
        if not batches:
            raise ValueError("TrainBatch.cat needs at least one batch")
        values: dict[str, Any] = {}
        offset, groups = 0, []
        for b in batches:
            groups.append(b.group + offset)
            offset += b.num_groups
        for f in fields(TrainBatch):
            parts = [getattr(b, f.name) for b in batches]
            if f.name == "group":
                values[f.name] = torch.cat(groups)
            elif f.name == "staleness" and any(p is not None for p in parts):  # None: all fresh
                values[f.name] = torch.cat([p if p is not None else torch.zeros(len(b), dtype=torch.long)
                                            for p, b in zip(parts, batches)])
            elif any(p is None for p in parts):
                values[f.name] = None
            elif isinstance(parts[0], torch.Tensor):
                values[f.name] = torch.cat(parts)
            else:
                values[f.name] = [x for p in parts for x in p]
        return TrainBatch(**values)

    def to(self, device: torch.device | str) -> "TrainBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[name] = v.to(device)
            elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                moved[name] = [t.to(device) for t in v]
        return replace(self, **moved)

    # --- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain containers and tensors (torch.load(weights_only=True) reads them back)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def from_state_dict(state: dict[str, Any]) -> "TrainBatch":
        state = dict(state)
        state.pop("stale", None)  # before 2026-12-06 a bool column, set again when the batch is formed
        return TrainBatch(**state)
