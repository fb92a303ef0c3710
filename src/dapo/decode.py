"""Stage: rollouts, the inner loop. A decoder forward over a static (pre-allocated) KV cache, for
the sampler in rollout.py.

Why not `model(..., cache=DynamicCache)` step by step: measured on the default model at 32 rows x
256 new tokens (benchmarks/sampler.py, benchmarks/README.md section 14), that loop spent most of
its time outside the matrix products. The dynamic cache concatenates every layer's keys and values
at every step (O(T^2) bytes copied over an answer), the attention mask grows by concatenation, rows
that have finished keep being computed to the end, and `x @ W^T` at a few dozen rows runs at a
third of the machine's matmul rate on a CPU. Here:

- the cache is allocated once per chunk, [rows, kv_heads, prompt + max_new_tokens, head_dim] per
  layer, and written in place; attention reads only the filled columns;
- `StaticKVCache.select_rows` compacts the cache to the rows still sampling, so a finished answer
  costs nothing more;
- on a CPU a linear layer is computed as `(W @ x^T)^T` (faster than `x @ W^T` at few rows, the same
  sums), and `Decoder.pack` turns the products into MKL-packed GEMMs (bit-identical results).

The forward is the model's own: its embedding, norm weights, rotary embedding, MLP activation and
projection modules are used (a LoRA-wrapped projection goes through its own forward), so only the
attention plumbing is ours. It covers the Llama family (Llama, SmolLM, Qwen2, Qwen3, Mistral
without a sliding window); `unsupported_reason` says why any other model takes the generic loop in
rollout.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

__all__ = ["Decoder", "StaticKVCache", "forward_cached", "unsupported_reason"]

_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The *ForCausalLM module under a PEFT wrapper."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """None when `forward_cached` computes this model's forward; otherwise why not."""
    base = _base(model)
    config = getattr(base, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in _FAMILIES:
        return f"model type {kind!r} is not one of {', '.join(_FAMILIES)}"
    try:
        from torch.distributed.fsdp import FSDPModule
        if any(isinstance(m, FSDPModule) for m in base.modules()):
            return "FSDP-sharded weights are gathered by each module's own forward"
    except ImportError:  # why: a torch build without distributed has no FSDP to detect
        pass
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", kind == "mistral"):
        return "sliding-window attention"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "layers other than full attention"
    inner = getattr(base, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) or \
            not hasattr(base, "lm_head"):
        return "not the Llama module layout (model.embed_tokens/layers/norm/rotary_emb, lm_head)"
    if not hasattr(inner.norm, "variance_epsilon"):
        return "its RMSNorm is not Llama's (weight * x / rms(x))"
    return None


class StaticKVCache:
    """Keys and values of every layer, [rows, kv_heads, capacity, head_dim] each, filled left to
    right; `length` columns are written. `valid` [rows, capacity] marks the columns a row may
    attend to (False at its left padding)."""

    def __init__(self, layers: int, rows: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (rows, kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.valid = torch.zeros((rows, capacity), dtype=torch.bool, device=device)
        self.capacity, self.length = capacity, 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, rows: int, capacity: int) -> StaticKVCache:
        base = _base(model)
        config, attn = base.config, base.model.layers[0].self_attn
        weight = attn.k_proj.weight
        return cls(config.num_hidden_layers, rows, config.num_key_value_heads, capacity, attn.head_dim,
                   weight.dtype, weight.device)

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values) + self.valid.numel()

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` (in that order; a row may repeat): drops finished rows, and copies a
        prefilled prompt to its G samples. Only the written columns are copied."""
        n = self.length

        def take(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty((len(index), *t.shape[1:]))
            out[:, :, :n] = t[index, :, :n]
            return out

        self.keys = [take(t) for t in self.keys]
        self.values = [take(t) for t in self.values]
        valid = self.valid.new_zeros((len(index), self.capacity))
        valid[:, :n] = self.valid[index, :n]
        self.valid = valid


def _linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(module) is not torch.nn.Linear or x.device.type != "cpu":
        return module(x)  # LoRA and other wrappers run their own forward; GPUs need no trick
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(module.weight, flat.T).T  # why: see the module docstring (MKL at few rows)
    if module.bias is not None:
        out = out + module.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


# MKL's packed GEMM exists in x86 builds of torch with MKL (not, e.g., in ARM builds).
MKL_PACKED_GEMM = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _can_pack(model: torch.nn.Module) -> bool:
    weight = _base(model).lm_head.weight
    return MKL_PACKED_GEMM and weight.device.type == "cpu" and weight.dtype == torch.float32


class _Packed:
    """Linear layers that read the same input (q, k and v; gate and up), as one MKL-packed product.

    MKL's packed GEMM (the op torch.compile uses for frozen CPU linears) skips re-packing the weight
    at every call: at 32 rows it ran the default model's products 1.35x faster than torch.mm, with
    bit-identical results. The packed copy follows the weights' versions (`stale`), so an optimizer
    step or a loaded checkpoint is seen at the next call.
    """

    _HINT = 32  # the row count MKL tunes the packing for; any row count computes correctly (tested)

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.sources = [t for m in modules for t in (m.weight, m.bias) if t is not None]
        self.sizes = [m.out_features for m in modules]
        self.weight = torch.cat([m.weight for m in modules]) if len(modules) > 1 else modules[0].weight
        biases = [m.bias for m in modules]
        self.bias = None if biases[0] is None else torch.cat(biases)
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, self._HINT)
        self.versions = [(t.data_ptr(), t._version) for t in self.sources]

    def stale(self) -> bool:
        return self.versions != [(t.data_ptr(), t._version) for t in self.sources]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = torch.ops.mkl._mkl_linear(x.reshape(-1, x.shape[-1]), self.packed, self.weight, self.bias, self._HINT)
        return out.reshape(*x.shape[:-1], -1).split(self.sizes, dim=-1)


class Decoder:
    """The forward over a StaticKVCache for one model, with its packed weights once `pack` is called.

    Packing the default model takes ~0.3 s, as long as ~15 decode steps save, so the sampler packs
    only once an answer has run that long (`rollout.PACK_AFTER_STEPS`); the packed weights are
    reused by later calls until the weights change.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.packed: list[dict[str, _Packed]] | None = None

    def pack(self) -> None:
        """Pack the plain-Linear projections (LoRA-wrapped ones stay as they are) if this machine can."""
        if self.packed is not None and not self._stale() or not _can_pack(self.model):
            return
        self.packed = None  # why: free the stale copy before building the new one
        base = _base(self.model)
        plain = (lambda *ms: all(type(m) is torch.nn.Linear for m in ms))  # noqa: E731
        packed = []
        for layer in base.model.layers:
            attn, mlp, entry = layer.self_attn, layer.mlp, {}
            for name, modules in (("qkv", [attn.q_proj, attn.k_proj, attn.v_proj]), ("o", [attn.o_proj]),
                                  ("gate_up", [mlp.gate_proj, mlp.up_proj]), ("down", [mlp.down_proj])):
                if plain(*modules):
                    entry[name] = _Packed(modules)
            packed.append(entry)
        packed.append({"head": _Packed([base.lm_head])} if plain(base.lm_head) else {})
        self.packed = packed

    def _stale(self) -> bool:
        return any(p.stale() for entry in self.packed or () for p in entry.values())

    def drop_stale(self) -> None:
        """Forget packed weights the model's weights have moved away from (an optimizer step, a
        loaded checkpoint). Weights do not change within a generate call, so once per call."""
        if self.packed is not None and self._stale():
            self.packed = None

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                cache: StaticKVCache) -> torch.Tensor:
        return forward_cached(self.model, ids, positions, valid, cache, self.packed)


def _rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as one fused op (the module's own forward is six)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [rows, S, heads, head_dim] with cos, sin [rows, S, 1, head_dim]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _attention(attn: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: StaticKVCache,
               layer: int, mask: torch.Tensor | None, packed: dict[str, _Packed]) -> torch.Tensor:
    """Self-attention of h [rows, S, D] at cache columns [length, length + S), which it writes.
    mask [rows, 1, S, end] or None when every row may see every written column."""
    rows, s, _ = h.shape
    head_dim = attn.head_dim
    if "qkv" in packed:
        q, k, v = packed["qkv"](h)
    else:
        q, k, v = _linear(attn.q_proj, h), _linear(attn.k_proj, h), _linear(attn.v_proj, h)
    q, k, v = (t.reshape(rows, s, -1, head_dim) for t in (q, k, v))
    if getattr(attn, "q_norm", None) is not None:  # Qwen3 normalises queries and keys per head
        q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
    heads, kv_heads = q.shape[2], k.shape[2]
    # One rotary pass over queries and keys together; the softmax scale folded into the queries.
    qk = _rope(torch.cat((q * attn.scaling, k), dim=2), cos, sin)
    q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
    start, end = cache.length, cache.length + s
    cache.keys[layer][:, :, start:end] = k
    cache.values[layer][:, :, start:end] = v.transpose(1, 2)
    # Grouped-query attention without repeating keys and values: the query heads that share a
    # key head become extra query rows of it. [rows, kv, groups * S, end] scores.
    scores = torch.matmul(q.reshape(rows, kv_heads, -1, head_dim), cache.keys[layer][:, :, :end].transpose(-1, -2))
    if mask is not None:
        scores = scores.view(rows, kv_heads, -1, s, end).masked_fill_(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores.view(rows, kv_heads, -1, end), dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, cache.values[layer][:, :, :end]).view(rows, heads, s, head_dim)
    out = out.transpose(1, 2).reshape(rows, s, -1)
    return packed["o"](out)[0] if "o" in packed else _linear(attn.o_proj, out)


def forward_cached(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                   cache: StaticKVCache, packed: list[dict[str, _Packed]] | None = None) -> torch.Tensor:
    """Logits [rows, V] of the last of S new tokens per row.

    ids, positions: [rows, S], the tokens written at cache columns [length, length + S) and their
    rotary positions; valid [rows, S]: False for left padding. Advances `cache.length` by S.
    packed: per layer (and a last entry for the LM head), the projections Decoder.pack made.
    """
    base = _base(model)
    inner = base.model
    rows, s = ids.shape
    start, end = cache.length, cache.length + s
    if end > cache.capacity:
        raise ValueError(f"the KV cache holds {cache.capacity} positions; writing {s} at {start} overflows it")
    cache.valid[:, start:end] = valid
    mask = None  # decoding after prompts without left padding needs none
    if s > 1 or not bool(cache.valid[:, :end].all()):
        # [rows, 1, S, end]: a token sees the valid columns up to itself. It always sees itself, so a
        # padding position never has an all-masked row (whose NaN would reach the cache's values).
        cols, here = torch.arange(end, device=ids.device), torch.arange(start, end, device=ids.device)
        mask = ((cache.valid[:, None, :end] & (cols[None, :] <= here[:, None])[None])
                | (cols[None, :] == here[:, None])[None])[:, None]
    h = inner.embed_tokens(ids)
    cos, sin = (t.unsqueeze(2) for t in inner.rotary_emb(h, positions))
    packed = packed or [{} for _ in range(len(inner.layers) + 1)]
    for i, layer in enumerate(inner.layers):
        h = h + _attention(layer.self_attn, _rms_norm(layer.input_layernorm, h), cos, sin, cache, i, mask, packed[i])
        x, mlp, p = _rms_norm(layer.post_attention_layernorm, h), layer.mlp, packed[i]
        gate, up = p["gate_up"](x) if "gate_up" in p else (_linear(mlp.gate_proj, x), _linear(mlp.up_proj, x))
        x = mlp.act_fn(gate) * up
        h = h + (p["down"](x)[0] if "down" in p else _linear(mlp.down_proj, x))
    cache.length = end
    last = _rms_norm(inner.norm, h[:, -1])
    return packed[-1]["head"](last)[0] if "head" in packed[-1] else _linear(base.lm_head, last)
