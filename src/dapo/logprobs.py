"""Per-token log-probabilities of responses under a model: the forward pass of the loss.

Shared-prompt packing ("Prefix Grouper", arXiv 2506.05433): a row holds one prompt followed by
several of its responses, [p_1..p_P, r1_1..r1_n, r2_1..r2_m, ...]. A 4D attention mask lets
every response token see the prompt and the earlier tokens of its own response only, and
position ids restart at P for every response, so each response is computed exactly as if it
followed its own copy of the prompt, while the prompt is computed (and back-propagated) once.
With `shared_prompt=False` every response gets its own row with its own prompt copy: the plain
path (the "rows" layout below).

Only positions that predict a response token go through the LM head, which on a small-vocab
model such as SmolLM2 (49k x 576 head) is a large share of the FLOPs.

Long responses need three more things, all here:
- `chunked_logprobs`: the LM head, log-softmax and entropy over `chunk_size` positions at a time,
  recomputed chunk by chunk in backward, so [N, V] logits never exist for more than a chunk.
- The "rows" layout (`pack(..., layout="rows")`): one row per response, [prompt, response, pad...],
  and no mask tensor at all, so the model takes SDPA's causal kernel (`is_causal=True`). Right
  padding is exact for the valid positions: a causal query only looks left, and padding sits on
  the right. `choose_layout` picks "shared" or "rows" per group from a cost model.
- `set_gradient_checkpointing`: recompute each decoder layer in backward (activations stored per
  layer input only); `wants_checkpointing` is the per-micro-batch rule.
- `release_freed_memory_eagerly`: on Linux/glibc, large freed tensors go back to the OS instead
  of fragmenting the heap (peak RSS at long sequences drops by ~40%); `eager_memory_release` does
  it around the Actor's update of long micro-batches only, so sampling keeps the heap's speed.
benchmarks/README.md (long responses) measures the peak memory of each layout and option.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from dapo.batch import TrainBatch

Layout = Literal["auto", "shared", "rows"]


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
                       rows: Sequence[int] | None = None, keep: torch.Tensor | None = None,
                       layout: Layout | None = None) -> list[list[Segment]]:
    """Split the batch's responses (`rows`, default all) into segments and the segments into
    micro-batches of at most `max_tokens` tokens (rows x longest row, i.e. padding included).

    A group larger than the budget is split into several segments, each with its own prompt
    copy; a single response that does not fit is still given a row of its own (the budget is
    then exceeded by that one row rather than the response being dropped). Empty responses and
    those with `keep[i]` False (overlong filtering: they carry no loss) are left out.

    `layout` ("auto", "shared" or "rows"; None: "shared") decides per group whether its
    responses share a prompt copy ("shared") or each get their own row ("rows"); "auto" asks
    `choose_layout` with the group's prompt and response lengths. `shared_prompt=False` forces
    "rows" (the plain per-response path). A micro-batch never mixes multi-response segments
    with single-response ones, so `pack(mb)` can give every all-single micro-batch the causal
    kernel and no mask.
    """
    rows = range(len(batch)) if rows is None else rows
    layout = layout or "shared"
    by_group: dict[int, list[int]] = {}
    for i in rows:
        if batch.response_ids[i] and (keep is None or bool(keep[i])):
            by_group.setdefault(int(batch.group[i]), []).append(i)
    segments: list[Segment] = []
    for g, members in by_group.items():
        prompt = batch.prompt_ids[members[0]]
        share = shared_prompt and layout != "rows"
        if share and layout == "auto":
            share = choose_layout(len(prompt), [len(batch.response_ids[i]) for i in members]) == "shared"
        current: Segment | None = None
        for i in members:
            resp = batch.response_ids[i]
            fits = current is not None and current.num_tokens + len(resp) <= max_tokens
            if share and fits:
                current.responses.append(i)
                current.response_ids.append(resp)
            else:
                current = Segment(g, prompt, [i], [resp])
                segments.append(current)
    # Longest first, then greedy fill: rows of similar length share a micro-batch, so padding
    # stays small. Multi-response (masked) and single-response (causal) segments stay apart.
    segments.sort(key=lambda s: -s.num_tokens)
    batches: list[list[Segment]] = []
    open_batch: dict[bool, list[Segment]] = {}
    for seg in segments:
        kind = len(seg.responses) > 1
        mb = open_batch.get(kind)
        if mb is not None and (len(mb) + 1) * mb[0].num_tokens <= max_tokens:
            mb.append(seg)
        else:
            open_batch[kind] = [seg]
            batches.append(open_batch[kind])
    return batches


@dataclass
class PackedRows:
    input_ids: torch.Tensor        # [R, T]
    position_ids: torch.Tensor     # [R, T]
    attention_mask: torch.Tensor | None  # [R, 1, T, T] bool, True = may attend; None: causal (rows layout)
    predict_at: torch.Tensor       # [N] flat index (row * T + col) of the hidden state that predicts each target
    targets: torch.Tensor          # [N] response token ids
    owner: list[tuple[int, int, int]]  # per response: (group, batch row, number of its tokens)


def pack(segments: list[Segment], pad_id: int, layout: Literal["shared", "rows"] | None = None) -> PackedRows:
    """Pack segments into rows. "shared": a 4D bool mask lets every response see its prompt and
    itself only. "rows": every segment must hold one response; rows are [prompt, response],
    right padded, with plain positions 0..T-1 and no mask (the causal kernel). None: "rows" when
    every segment holds one response, else "shared". Both give the same `predict_at`, `targets`
    and `owner`, so `split_by_response` works on either."""
    single = all(len(s.responses) == 1 for s in segments)
    if layout is None:
        layout = "rows" if single else "shared"
    if layout == "rows":
        if not single:
            raise ValueError("the rows layout needs one response per segment "
                             "(plan_micro_batches(..., layout='rows'))")
        return _pack_rows(segments, pad_id)
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


def _pack_rows(segments: list[Segment], pad_id: int) -> PackedRows:
    width = max(s.num_tokens for s in segments)
    rows = len(segments)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    predict_at: list[int] = []
    targets: list[int] = []
    owner: list[tuple[int, int, int]] = []
    for r, seg in enumerate(segments):
        p, resp = len(seg.prompt_ids), seg.response_ids[0]
        n = len(resp)
        ids[r, :p] = torch.tensor(seg.prompt_ids)
        ids[r, p:p + n] = torch.tensor(resp)
        predict_at.extend(range(r * width + p - 1, r * width + p + n - 1))
        targets.extend(resp)
        owner.append((seg.group, seg.responses[0], n))
    # Plain 0..T-1 positions in every row (padding included): transformers reads positions that
    # do not increase by one as packed sequences and would build a mask again.
    pos = torch.arange(width).expand(rows, width).contiguous()
    return PackedRows(ids, pos, None, torch.tensor(predict_at), torch.tensor(targets), owner)


def pack_rows(segments: list[Segment], pad_id: int) -> PackedRows:
    """`pack(segments, pad_id, layout="rows")`."""
    return pack(segments, pad_id, layout="rows")


# --- choosing the layout ------------------------------------------------------------------
# Cost model of one group's forward(+backward), in "token units" (the cost of one token through
# the decoder's matmuls):
#   shared: T = P + sum L tokens, plus attention over the whole row under the 4D mask: the CPU
#           flash kernel cannot skip masked blocks and reads a float copy of the mask, so it
#           costs _MASK_FACTOR x the causal cost of a T-token row (T^2 / 2 pairs);
#   rows:   G rows of W = P + max L tokens (padding is computed too), each causal: W^2 / 2 pairs.
#   One token = _PAIRS_PER_TOKEN causal (query, key) pairs.
# Fitted on the default model (SmolLM2-135M, fp32, 1 thread, CPU time of the decoder forward,
# 2026-11-25): P 64, G 4, L 1024: shared 32.4 s, rows 16.0 s (2.03x; model 1.97x); L 256:
# 4.14 s vs 3.66 s (1.13x; model 1.14x). Crossover at P 64, G 4: L ~ 180 (T ~ 800 tokens).
# FLOP count alone gives ~3000 pairs per token; the attention kernels run ~2.5x below the
# matmul rate, hence 1200.
_PAIRS_PER_TOKEN = 1200.0
_MASK_FACTOR = 1.15


def layout_costs(prompt_len: int, response_lens: list[int]) -> dict[str, float]:
    """Modelled forward+backward cost of one group in each layout (token units; see above)."""
    if not response_lens:
        return {"shared": 0.0, "rows": 0.0}
    t = prompt_len + sum(response_lens)
    w = prompt_len + max(response_lens)
    shared = t + _MASK_FACTOR * t * t / 2 / _PAIRS_PER_TOKEN
    rows = len(response_lens) * (w + w * w / 2 / _PAIRS_PER_TOKEN)
    return {"shared": shared, "rows": rows}


def choose_layout(prompt_len: int, response_lens: list[int]) -> Literal["shared", "rows"]:
    """"shared" (one prompt copy, 4D mask) or "rows" (one causal row per response) for a group,
    whichever `layout_costs` models cheaper; ties go to "shared" (exact, today's default).

    The rule, with T = P + sum L and W = P + max L (token units, 1200 causal attention pairs
    per token, measured on SmolLM2-135M):
        rows  iff  G * (W + W^2 / 2400)  <  T + 1.15 * T^2 / 2400.
    Sharing saves (G - 1) prompt copies and the padding of shorter responses, but its masked
    attention grows with the square of the whole group row; rows pay the prompt G times but
    attend within each response only. So: shared for long prompts and short answers (the digit
    task: P 54, G 32, L 4, modelled 9.6x cheaper; P 1024, G 16, L 32: 9.1x), rows once the
    responses are long (P 64, G 4, L 1024: rows 2.0x faster, measured), crossing at about
    T = 800 tokens for P 64, G 4. A single response always takes "rows" (same tokens, no mask)."""
    costs = layout_costs(prompt_len, response_lens)
    return "rows" if costs["rows"] < costs["shared"] else "shared"


# --- the LM head, chunked -------------------------------------------------------------------
def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (exactness tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  temperature: float) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).to(_acc_dtype(hidden))
    if temperature != 1.0:
        logits.div_(temperature)  # called with autograd off: in place, one [chunk, V] buffer
    return logits


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy):
        n, acc = hidden.shape[0], _acc_dtype(hidden)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        entropy = torch.empty(n, dtype=acc, device=hidden.device) if with_entropy else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = _chunk_logits(hidden[s:e], weight, bias, temperature)
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            logp[s:e] = logits.gather(-1, targets[s:e, None])[:, 0] - lse[s:e]
            if with_entropy:  # H = lse - sum_v p_v z_v, with p and z in one [chunk, V] buffer each
                p = (logits - lse[s:e, None]).exp_()
                entropy[s:e] = lse[s:e] - torch.bmm(p[:, None, :], logits[:, :, None])[:, 0, 0]
                del p
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = _acc_dtype(hidden)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b and bias is not None else None
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        n = hidden.shape[0]
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            g = grad_logp[s:e].to(acc)
            # d logp_t / d z = onehot(target) - softmax(z); z = logits / temperature. In place on
            # the recomputed logits: one [chunk, V] buffer.
            d = _chunk_logits(hidden[s:e], weight, bias, temperature)
            d.sub_(lse[s:e, None]).exp_().mul_(-g[:, None])
            d.scatter_add_(-1, targets[s:e, None], g[:, None])
            if temperature != 1.0:
                d.div_(temperature)
            if need_h:
                grad_h[s:e] = d.to(weight.dtype) @ weight
            if need_w:
                grad_w.addmm_(d.t(), hidden[s:e].to(acc))
            if grad_b is not None:
                grad_b += d.sum(0)
            del d
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None, None, None)


def chunked_logprobs(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    head_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax((hidden @ head_weight.T + head_bias) / temperature)[targets] for [N, H] hidden
    states and [V, H] head, in float32 (float64 for float64 inputs), `chunk_size` rows at a time.

    Returns (logp [N], differentiable wrt hidden, head_weight and head_bias; entropy [N] of the
    same tempered distribution, or None, never differentiable). Forward keeps only the [N]
    log-sum-exp; backward recomputes each chunk's logits, so at most [chunk_size, V] logits
    (one buffer, plus the softmax for the entropy in forward) exist at once in either pass.
    Equal to the dense `log_softmax(head(hidden).float() / T).gather(targets)` up to
    floating-point summation order."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    targets = targets.to(device=hidden.device, dtype=torch.long)
    return _ChunkedLogProbs.apply(hidden, head_weight, head_bias, targets, float(temperature), int(chunk_size),
                                  bool(with_entropy))


def _plain_linear_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The LM head if the logits are exactly head(hidden) (no soft-capping or logit scale)."""
    head = model.get_output_embeddings()
    cfg = getattr(model, "config", None)
    odd = any(getattr(cfg, name, None) not in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale"))
    return head if isinstance(head, torch.nn.Linear) and not odd else None


# --- gradient checkpointing -------------------------------------------------------------------
# Without checkpointing the default model keeps its activations for backward: ~0.7-1 MB per
# token of a micro-batch (30 layers; benchmarks/README.md), plus, in the shared layout, a float
# copy of the [T, T] mask per layer (4 T^2 bytes each: 8 GB at T = 8k). With it, each layer keeps
# its input only (576 floats, 69 KB per token for all 30 layers) and is recomputed in backward:
# one more decoder forward, ~+30% time. The token budget `max_tokens_per_micro_batch` already
# bounds activations for anything that can be split, so "auto" leaves today's workloads alone
# and switches checkpointing on only for a micro-batch over the budget: a response (plus its
# prompt) too long to fit, which is exactly where memory otherwise grows without bound.
CHECKPOINT_AUTO_TOKENS = 4096  # the default max_tokens_per_micro_batch


def set_gradient_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Switch activation checkpointing of the Hugging Face model's decoder layers on or off
    (non-reentrant torch.utils.checkpoint).

    The first call to switch it on goes through transformers' own
    `activation_checkpointing_enable` (`gradient_checkpointing_enable` before 5.x) with
    `use_reentrant=False`; after that, on/off only flips each layer's `gradient_checkpointing`
    flag, so it is cheap enough to change per micro-batch. Checkpointing acts only in train mode
    with gradients enabled: generation (eval mode, no_grad, KV cache) and no-grad log-prob passes
    run the layers unchanged either way."""
    if on and not getattr(model, "_dapo_checkpointing_ready", False):
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model._dapo_checkpointing_ready = True
    for module in model.modules():
        if isinstance(getattr(module, "gradient_checkpointing", None), bool):
            module.gradient_checkpointing = bool(on)


def gradient_checkpointing_is_on(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def release_freed_memory_eagerly(threshold_bytes: int = 1 << 20) -> bool:
    """Have glibc serve every allocation of `threshold_bytes` or more with its own mmap, returned
    to the OS when freed (mallopt M_MMAP_THRESHOLD; this also turns off glibc's dynamic
    threshold, which otherwise rises to 32 MB after the first large free).

    Why: a long-sequence forward+backward frees and re-allocates thousands of 1-32 MB tensors;
    from glibc's heap these fragment it and the process's RSS keeps the high-water mark.
    Measured (rows layout, checkpointing, T = 2k): peak RSS 2.60 GB -> 1.51 GB. Linux/glibc
    only; returns False (and does nothing) elsewhere. Process-wide; call once at start-up."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold_bytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


# glibc's largest dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): where its
# dynamic threshold settles once large blocks have been freed, i.e. the heap's usual steady state.
HEAP_MMAP_THRESHOLD = 32 << 20
EAGER_RELEASE_TOKENS = 2048  # a micro-batch this large or larger counts as long


@contextmanager
def eager_memory_release(on: bool, threshold_bytes: int = 1 << 20) -> Iterator[None]:
    """`release_freed_memory_eagerly` inside the block only; afterwards allocations up to 32 MB
    come from the heap again (`HEAP_MMAP_THRESHOLD`).

    Why scoped: the training forward+backward of long micro-batches is where freed 1-32 MB
    tensors fragment the heap (with LoRA, whose peft layers add full-size temporaries, an 8k-token
    step peaked at 8.5 GiB instead of 1.9 GiB), while sampling is where an mmap per growing
    KV-cache tensor costs speed (26-38% slower generation with the threshold left at 1 MB).
    `on=False` does nothing (short micro-batches keep the heap as it is)."""
    if not on or not release_freed_memory_eagerly(threshold_bytes):
        yield
        return
    try:
        yield
    finally:
        release_freed_memory_eagerly(HEAP_MMAP_THRESHOLD)


def wants_checkpointing(mode: Literal["auto", "on", "off"] | bool, packed: PackedRows,
                        threshold: int = CHECKPOINT_AUTO_TOKENS) -> bool:
    """Whether a micro-batch should run with checkpointing: "on"/True, "off"/False, or "auto":
    more than `threshold` padded tokens (pass the run's max_tokens_per_micro_batch)."""
    if isinstance(mode, bool):
        return mode
    if mode == "auto":
        return packed.input_ids.numel() > threshold
    return mode == "on"


PACKED_FORWARD = "dapo_packed_logits"


def packed_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor, predict_at: torch.Tensor) -> torch.Tensor:
    """Final hidden states [N, H] at the flat positions `predict_at` of the packed rows."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[predict_at]


def packed_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor, predict_at: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] at the flat positions `predict_at` of the packed rows: the decoder on every
    token, the LM head only where a response token is predicted."""
    hidden = packed_hidden(model, input_ids, attention_mask, position_ids, predict_at)
    return model.get_output_embeddings()(hidden)


def token_logprobs(
    model: torch.nn.Module,
    packed: PackedRows,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | x, y_<t) for every target token, with logits divided by `temperature`
    exactly as in sampling. Returns flat [N] log-probs (and entropies if asked, no grad).

    Either layout: a 4D mask, or `attention_mask=None` (rows layout: the causal kernel). The LM
    head runs `chunk_size` positions at a time (`chunked_logprobs`); 0 gives the dense head."""
    device = next(model.parameters()).device
    mask = packed.attention_mask
    if mask is not None and getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        # eager attention adds the 4D mask to the scores: it needs 0 / -inf, not True / False
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    args = (packed.input_ids.to(device), mask.to(device) if mask is not None else None,
            packed.position_ids.to(device), packed.predict_at.to(device))
    targets = packed.targets.to(device)
    # A model sharded by the Actor (FSDP2) carries `dapo_packed_logits`, the same function
    # registered as an FSDP forward method, so that its root parameters (embeddings, final norm,
    # tied head) are gathered around the whole computation and their gradients reduced; its head
    # stays dense (a chunked head would need the full head weight outside that forward).
    forward = getattr(model, PACKED_FORWARD, None)
    head = _plain_linear_head(model) if chunk_size and forward is None else None
    if head is not None:
        hidden = packed_hidden(model, *args)
        return chunked_logprobs(hidden, head.weight, targets, temperature, chunk_size, with_entropy, head.bias)
    logits = forward(*args) if forward is not None else packed_logits(model, *args)
    logits = logits.to(_acc_dtype(logits))
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
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
