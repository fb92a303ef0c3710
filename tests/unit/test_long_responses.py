"""Long responses in bounded memory: the chunked LM head, the rows layout, the layout
choice and gradient checkpointing all leave log-probs and gradients unchanged."""

import pytest
import torch

from dapo.batch import TrainBatch
from dapo.logprobs import (CHECKPOINT_AUTO_TOKENS, choose_layout, chunked_logprobs, gradient_checkpointing_is_on,
                           layout_costs, pack, pack_rows, set_gradient_checkpointing, split_by_response, token_logprobs,
                           wants_checkpointing)
from dapo.logprobs import (plan_micro_batches as plan_batch)
from dapo.rollout import generate
from toy_run import tiny_model


class Group:
    """One prompt and its responses, the way these tests write a batch."""

    def __init__(self, record, prompt_ids, response_ids, truncated):
        self.prompt_ids, self.response_ids = prompt_ids, response_ids


def plan_micro_batches(groups, max_tokens, shared_prompt=True, layout=None):
    """plan_micro_batches on the TrainBatch of `groups`, with segments naming responses by their
    index in their group (as (group, response) keys below do), not by batch row."""
    sizes = [len(g.response_ids) for g in groups]
    n = sum(sizes)
    batch = TrainBatch(group=torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(sizes)),
                       prompt_index=torch.zeros(n, dtype=torch.long),
                       prompt_ids=[g.prompt_ids for g in groups for _ in g.response_ids],
                       response_ids=[r for g in groups for r in g.response_ids],
                       truncated=torch.zeros(n, dtype=torch.bool), completions=[""] * n, scores=torch.zeros(n, 1),
                       task_rewards=torch.zeros(n), rewards=torch.zeros(n))
    first = [sum(sizes[:k]) for k in range(len(sizes))]
    batches = plan_batch(batch, max_tokens, shared_prompt, layout=layout)
    for mb in batches:
        for seg in mb:
            seg.responses = [r - first[seg.group] for r in seg.responses]
    return batches


def dense(hidden, weight, targets, temperature, bias=None):
    logits = torch.nn.functional.linear(hidden, weight, bias) / temperature
    logp_all = logits.log_softmax(-1)
    return logp_all.gather(-1, targets[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_dense_values_and_grads(chunk_size, temperature):
    torch.manual_seed(0)
    n, h, v = 23, 16, 301
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    coef = torch.randn(n, dtype=torch.float64)
    grads = []
    for fn in ("chunked", "dense"):
        if fn == "chunked":
            logp, ent = chunked_logprobs(hidden, weight, targets, temperature, chunk_size, True, bias)
            assert not ent.requires_grad
        else:
            logp, ent = dense(hidden, weight, targets, temperature, bias)
        (coef * logp).sum().backward()
        grads.append((logp.detach(), ent.detach(), hidden.grad, weight.grad, bias.grad))
        hidden.grad = weight.grad = bias.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_chunked_logprobs_float32_no_bias_and_no_grad():
    torch.manual_seed(1)
    hidden, weight = torch.randn(40, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (40,))
    logp, ent = chunked_logprobs(hidden, weight, targets, 0.9, chunk_size=16)
    assert ent is None and logp.dtype == torch.float32
    ref, _ = dense(hidden, weight, targets, 0.9)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    logp.sum().backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref.sum().backward()
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        lp, ent = chunked_logprobs(hidden, weight, targets, 0.9, chunk_size=16, with_entropy=True)
    assert not lp.requires_grad and ent.shape == (40,)


# --- layouts on a tiny model -------------------------------------------------------------------
def groups_for_test():
    torch.manual_seed(1)
    groups = []
    for prompt_len, lengths in [(11, [1, 4, 3, 7]), (6, [2, 5, 1])]:
        prompt = torch.randint(10, 5000, (prompt_len,)).tolist()
        responses = [torch.randint(10, 5000, (n,)).tolist() for n in lengths]
        groups.append(Group({"prompt": "x"}, prompt, responses, [False] * len(lengths)))
    return groups


@pytest.fixture()
def tiny64():
    """A tiny random Llama in float64 with a 5000-token vocabulary (the test tokens are < 5000)."""
    torch.set_num_threads(2)
    return tiny_model(5000, seed=0).double().train()


def coefficients(groups):
    g = torch.Generator().manual_seed(3)
    return {(gi, ri): torch.randn(len(r), generator=g, dtype=torch.float64)
            for gi, grp in enumerate(groups) for ri, r in enumerate(grp.response_ids)}


def plain_run(model, groups, temperature):
    """The reference: one full model(...) call per response, logits from the model's own head."""
    model.zero_grad()
    coef, out = coefficients(groups), {}
    for gi, g in enumerate(groups):
        for ri, resp in enumerate(g.response_ids):
            logits = model(torch.tensor([g.prompt_ids + resp])).logits[0, len(g.prompt_ids) - 1:-1] / temperature
            lp = logits.log_softmax(-1).gather(-1, torch.tensor(resp)[:, None])[:, 0]
            (coef[(gi, ri)] * lp).sum().backward()
            out[(gi, ri)] = lp.detach()
    return out, torch.cat([p.grad.flatten() for p in model.parameters()])


def packed_run(model, groups, temperature, layout, budget, shared_prompt=True, chunk_size=1024):
    model.zero_grad()
    coef, out = coefficients(groups), {}
    for mb in plan_micro_batches(groups, budget, shared_prompt, layout=layout):
        packed = pack(mb, pad_id=2)
        lp, _ = token_logprobs(model, packed, temperature, with_entropy=True, chunk_size=chunk_size)
        loss = 0
        for (gi, ri, _), t in zip(packed.owner, split_by_response(lp, packed.owner)):
            out[(gi, ri)] = t.detach()
            loss = loss + (coef[(gi, ri)] * t).sum()
        loss.backward()
    return out, torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("budget", [4096, 16])
def test_rows_equal_shared_equal_plain(tiny64, budget):
    groups = groups_for_test()
    ref_lp, ref_grad = plain_run(tiny64, groups, 0.7)
    runs = {
        "rows": packed_run(tiny64, groups, 0.7, "rows", budget),
        "shared": packed_run(tiny64, groups, 0.7, "shared", budget),
        "auto": packed_run(tiny64, groups, 0.7, "auto", budget),
        "plain path (shared_prompt=False)": packed_run(tiny64, groups, 0.7, None, budget, shared_prompt=False),
        "dense head": packed_run(tiny64, groups, 0.7, "shared", budget, chunk_size=0),
    }
    # float64 model, but Llama's rotary cos/sin are computed in float32, where the same angle can
    # round differently in a vectorised and a scalar tail loop (rows of other lengths): errors
    # of ~1e-7 relative are the floor, far below float32 training noise.
    for name, (lp, grad) in runs.items():
        assert lp.keys() == ref_lp.keys(), name
        for k in ref_lp:
            torch.testing.assert_close(lp[k], ref_lp[k], rtol=1e-7, atol=1e-7, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


def test_rows_pack_has_no_mask_and_the_same_contract():
    groups = groups_for_test()
    rows = [pack(mb, 2) for mb in plan_micro_batches(groups, 4096, layout="rows")]
    shared = [pack(mb, 2) for mb in plan_micro_batches(groups, 4096, layout="shared")]
    assert all(p.attention_mask is None for p in rows) and all(p.attention_mask is not None for p in shared)
    r, s = rows[0], shared[0]
    assert r.input_ids.shape == (7, 11 + 7)  # one row per response, [prompt, response], right padded
    assert torch.equal(r.position_ids, torch.arange(18).expand(7, 18))

    def by_owner(p):
        return {(gi, ri): (t.tolist(), p.input_ids.flatten()[at].tolist())
                for (gi, ri, _), t, at in zip(p.owner, split_by_response(p.targets, p.owner),
                                              split_by_response(p.predict_at, p.owner))}
    rb, sb = by_owner(r), by_owner(s)
    assert rb.keys() == sb.keys()
    for k in rb:  # same targets, predicted from hidden states at the same tokens
        assert rb[k] == sb[k]
        g = groups[k[0]]
        assert rb[k][0] == g.response_ids[k[1]]
        assert rb[k][1] == ([g.prompt_ids[-1]] + g.response_ids[k[1]])[:-1]
    with pytest.raises(ValueError):
        pack_rows(plan_micro_batches(groups, 4096, layout="shared")[0], 2)


def test_micro_batches_never_mix_masked_and_causal_segments():
    # group 0: long prompt, short answers (shared); group 1: short prompt, long answers (rows)
    g0 = Group({}, list(range(10, 410)), [[5] * 4] * 8, [False] * 8)
    g1 = Group({}, list(range(10, 30)), [[6] * 3000] * 4, [False] * 4)
    batches = plan_micro_batches([g0, g1], 1 << 20, layout="auto")
    kinds = [{len(s.responses) > 1 for s in mb} for mb in batches]
    assert all(len(k) == 1 for k in kinds)
    assert [(s.group, len(s.responses)) for mb in batches for s in mb if s.group == 0] == [(0, 8)]
    assert sorted(s.responses[0] for mb in batches for s in mb if s.group == 1) == [0, 1, 2, 3]
    assert all(pack(mb, 2).attention_mask is None for mb in batches if 1 in {s.group for s in mb})


def test_choose_layout_by_hand():
    assert choose_layout(54, [4] * 32) == "shared"          # the digit task
    assert choose_layout(256, [32] * 16) == "shared"        # long prompt, short answers
    assert choose_layout(1024, [32] * 16) == "shared"
    assert choose_layout(64, [1024] * 4) == "rows"          # long answers
    assert choose_layout(64, [2048] * 4) == "rows"
    assert choose_layout(64, [40] * 4) == "shared"          # short everything: sharing saves tokens
    assert choose_layout(100, []) == "shared"
    assert choose_layout(100, [50]) == "rows"               # one response: the same tokens, no mask
    c = layout_costs(64, [2048] * 4)
    assert c["rows"] < c["shared"]


def test_gradient_checkpointing_same_grads_and_generation(tiny64):
    groups = groups_for_test()
    for layout in ("rows", "shared"):
        set_gradient_checkpointing(tiny64, False)
        lp0, g0 = packed_run(tiny64, groups, 1.0, layout, 4096)
        set_gradient_checkpointing(tiny64, True)
        assert gradient_checkpointing_is_on(tiny64)
        lp1, g1 = packed_run(tiny64, groups, 1.0, layout, 4096)
        for k in lp0:
            torch.testing.assert_close(lp1[k], lp0[k], rtol=0, atol=1e-12)
        torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-12)
    # generation with checkpointing on (eval mode and train mode, no_grad + KV cache) is unchanged
    model = tiny64.float()
    out = {}
    for on in (False, True):
        set_gradient_checkpointing(model, on)
        for train in (False, True):
            model.train(train)
            torch.manual_seed(0)
            out[(on, train)] = generate(model, [[5, 6, 7], [8, 9]], 3, 6, set(), 2)
    assert all(v == out[(False, False)] for v in out.values())
    set_gradient_checkpointing(model, False)
    assert not gradient_checkpointing_is_on(model)


def test_wants_checkpointing():
    g = Group({}, [1] * 10, [[2] * 5000], [False])
    long = pack(plan_micro_batches([g], 4096)[0], 2)
    short = pack(plan_micro_batches([Group({}, [1] * 10, [[2] * 5], [False])], 4096)[0], 2)
    assert wants_checkpointing("auto", long) and not wants_checkpointing("auto", short)
    assert wants_checkpointing("on", short) and not wants_checkpointing("off", long)
    assert wants_checkpointing(True, short) and not wants_checkpointing(False, long)
    assert not wants_checkpointing("auto", long, threshold=1 << 20)
    assert CHECKPOINT_AUTO_TOKENS >= 1024


def test_eager_attention_gets_an_additive_mask(tiny64):
    """transformers' eager attention adds a 4D mask to the scores; a bool mask would add 1/0."""
    groups = groups_for_test()
    ref_lp, _ = plain_run(tiny64, groups, 1.0)
    tiny64.config._attn_implementation = "eager"
    lp, _ = packed_run(tiny64, groups, 1.0, "shared", 4096)
    for k in ref_lp:
        torch.testing.assert_close(lp[k], ref_lp[k], rtol=1e-7, atol=1e-7)


def test_release_freed_memory_eagerly_is_harmless():
    import sys

    from dapo.logprobs import release_freed_memory_eagerly

    assert release_freed_memory_eagerly(1 << 20) == sys.platform.startswith("linux")
    torch.ones(1 << 20).sum()  # large allocations still work


def test_rows_layout_reaches_sdpa_as_is_causal_without_a_mask(monkeypatch):
    """transformers 5.x: no mask + plain 0..T-1 positions -> SDPA's causal kernel, no mask tensor."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        mask = kwargs.get("attn_mask")
        seen.append((kwargs.get("is_causal"), None if mask is None else tuple(mask.shape)))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = tiny_model(5000).train()
    g = Group({}, [5] * 7, [[6] * 3, [7] * 9], [False] * 2)
    token_logprobs(model, pack(plan_micro_batches([g], 4096, layout="rows")[0], 2))
    assert set(seen) == {(True, None)}
    seen.clear()
    token_logprobs(model, pack(plan_micro_batches([g], 4096, layout="shared")[0], 2))
    assert set(seen) == {(False, (1, 1, 19, 19))}


def test_eager_memory_release_is_scoped(monkeypatch):
    """1 MB mmap threshold inside the block, glibc's 32 MB steady state after; off: untouched."""
    import dapo.logprobs as lp

    calls = []
    monkeypatch.setattr(lp, "release_freed_memory_eagerly", lambda n=1 << 20: calls.append(n) or True)
    with lp.eager_memory_release(False):
        assert calls == []
    with lp.eager_memory_release(True):
        assert calls == [1 << 20]
    assert calls == [1 << 20, 32 << 20]


def test_update_releases_memory_eagerly_only_for_long_micro_batches(tokenizer, monkeypatch):
    import contextlib
    import sys
    from pathlib import Path

    import dapo.actor
    from dapo.actor import Actor
    from dapo.config import DAPOConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from common import synthetic_batch

    seen = []
    monkeypatch.setattr(dapo.actor, "eager_memory_release", lambda on: seen.append(on) or contextlib.nullcontext())
    model = tiny_model(len(tokenizer), seed=0)
    actor = Actor(model, DAPOConfig(group_size=4, mu=1, max_new_tokens=600, threads=1), pad_id=2)
    actor.update(synthetic_batch(1, 4, 10, 8))      # 10 + 4 x 8 tokens: short
    actor.update(synthetic_batch(1, 4, 10, 520))    # 10 + 4 x 520 = 2090 >= EAGER_RELEASE_TOKENS
    assert seen == [False, True]
