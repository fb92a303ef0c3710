"""Per-token log-probabilities of responses under a model: the forward pass of the loss.

Shared-prompt packing ("Prefix Grouper", arXiv 2506.05433): a row holds one prompt followed by
several of its responses, [p_1..p_P, r1_1..r1_n, r2_1..r2_m, ...]. A 4D attention mask lets
every response token see the prompt and the earlier tokens of its own response only, and
position ids restart at P for every response, so each response is computed exactly as if it
followed its own copy of the prompt, while the prompt is computed (and back-propagated) once.
With `shared_prompt=False` every response gets its own row with its own prompt copy: the plain
path, kept for comparison and as a reference in tests.

Only positions that predict a response token go through the LM head, which on a small-vocab
model such as SmolLM2 (49k x 576 head) is a large share of the FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dapo.batch import TrainBatch


@dataclass
class Segment:
    """One packed row: a prompt and some responses of one group."""

    group: int                       # the batch's group index
    prompt_ids: list[int]
    responses: list[int]             # the batch's row indices of these responses
    response_ids: list[list[int]]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + sum(len(r) for r in self.response_ids)


def plan_micro_batches(batch: TrainBatch, max_tokens: int, shared_prompt: bool = True,
                       rows: Sequence[int] | None = None, keep: torch.Tensor | None = None) -> list[list[Segment]]:
    """Split the batch's responses (`rows`, default all) into segments and the segments into
    micro-batches of at most `max_tokens` tokens (rows x longest row, i.e. padding included).

    A group larger than the budget is split into several segments, each with its own prompt
    copy; a single response that does not fit is still given a row of its own (the budget is
    then exceeded by that one row rather than the response being dropped). Empty responses and
    those with `keep[i]` False (overlong filtering: they carry no loss) are left out.
    """
    rows = range(len(batch)) if rows is None else rows
    segments: list[Segment] = []
    current: Segment | None = None
    for i in rows:
        resp = batch.response_ids[i]
        if not resp or (keep is not None and not bool(keep[i])):
            continue
        g = int(batch.group[i])
        fits = current is not None and current.group == g and current.num_tokens + len(resp) <= max_tokens
        if shared_prompt and fits:
            current.responses.append(i)
            current.response_ids.append(resp)
        else:
            current = Segment(g, batch.prompt_ids[i], [i], [resp])
            segments.append(current)
    # Longest first, then greedy fill: rows of similar length share a micro-batch, so padding
    # stays small.
    segments.sort(key=lambda s: -s.num_tokens)
    batches: list[list[Segment]] = []
    for seg in segments:
        if batches and (len(batches[-1]) + 1) * batches[-1][0].num_tokens <= max_tokens:
            batches[-1].append(seg)
        else:
            batches.append([seg])
    return batches


@dataclass
class PackedRows:
    input_ids: torch.Tensor        # [R, T]
    position_ids: torch.Tensor     # [R, T]
    attention_mask: torch.Tensor   # [R, 1, T, T] bool, True = may attend
    predict_at: torch.Tensor       # [N] flat index (row * T + col) of the hidden state that predicts each target
    targets: torch.Tensor          # [N] response token ids
    owner: list[tuple[int, int, int]]  # per response: (group, batch row, number of its tokens)


def pack(segments: list[Segment], pad_id: int) -> PackedRows:
    width = max(s.num_tokens for s in segments)
    rows = len(segments)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    pos = torch.zeros((rows, width), dtype=torch.long)
    # seq_id: 0 = prompt, k = k-th response in the row, -1 = padding
    seq_id = torch.full((rows, width), -1, dtype=torch.long)
    predict_at: list[int] = []
    targets: list[int] = []
    owner: list[tuple[int, int, int]] = []
    for r, seg in enumerate(segments):
        p = len(seg.prompt_ids)
        ids[r, :p] = torch.tensor(seg.prompt_ids)
        pos[r, :p] = torch.arange(p)
        seq_id[r, :p] = 0
        col = p
        for k, (ri, resp) in enumerate(zip(seg.responses, seg.response_ids), start=1):
            n = len(resp)
            ids[r, col:col + n] = torch.tensor(resp)
            pos[r, col:col + n] = torch.arange(p, p + n)
            seq_id[r, col:col + n] = k
            # token j of the response is predicted by the previous token of the same sequence:
            # the last prompt token for j = 0, else response token j - 1.
            predict_at.extend([r * width + p - 1] + [r * width + c for c in range(col, col + n - 1)])
            targets.extend(resp)
            owner.append((seg.group, ri, n))
            col += n
    q, k = seq_id[:, :, None], seq_id[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_or_prompt = ((k == q) | (k == 0)) & (q >= 0) & (k >= 0)
    allow = same_or_prompt & causal
    # Padding rows attend to themselves so that no softmax row is empty (which would give NaN).
    allow |= torch.eye(width, dtype=torch.bool) & (seq_id[:, :, None] < 0)
    return PackedRows(ids, pos, allow[:, None], torch.tensor(predict_at), torch.tensor(targets), owner)


PACKED_FORWARD = "dapo_packed_logits"


def packed_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor, predict_at: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] at the flat positions `predict_at` of the packed rows: the decoder on every
    token, the LM head only where a response token is predicted."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    return head(hidden.reshape(-1, hidden.shape[-1])[predict_at])


def token_logprobs(
    model: torch.nn.Module,
    packed: PackedRows,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | x, y_<t) for every target token, with logits divided by `temperature`
    exactly as in sampling. Returns flat [N] log-probs (and entropies if asked, no grad)."""
    device = next(model.parameters()).device
    # A model sharded by the Actor (FSDP2) carries `dapo_packed_logits`, the same function
    # registered as an FSDP forward method, so that its root parameters (embeddings, final norm,
    # tied head) are gathered around the whole computation and their gradients reduced.
    forward = getattr(model, PACKED_FORWARD, None)
    args = (packed.input_ids.to(device), packed.attention_mask.to(device), packed.position_ids.to(device),
            packed.predict_at.to(device))
    logits = (forward(*args) if forward is not None else packed_logits(model, *args)).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, packed.targets.to(device)[:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def split_by_response(flat: torch.Tensor, owner: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    return list(torch.split(flat, [n for _, _, n in owner]))


def pad_stack(seqs: list[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    """[len_i] tensors -> [B, max len] (right-padded; keeps autograd)."""
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)
