"""The static-cache sampler (decode.py and rollout._generate_chunk) on tiny random Llamas."""

from __future__ import annotations

import pytest
import torch

import dapo.rollout as rollout
from dapo.decode import MKL_PACKED_GEMM, Decoder, StaticKVCache, _Packed, _can_pack, unsupported_reason
from dapo.rollout import _nucleus, generate
from toy_run import tiny_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(300, seed=0, layers=2, hidden=64).eval()


def teacher_forced(model: torch.nn.Module, prompt: list[int], response: list[int], temperature: float) -> list[float]:
    """Log-probs of `response` after `prompt` from one full forward: what the trainer computes."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1).tolist()


@pytest.mark.parametrize("shared", [True, False])
def test_logprobs_equal_the_trainers_forward_with_ragged_stops(model, shared):
    # A fifth of the vocabulary stops a row, so rows end at different steps and leave the batch;
    # a row whose cache was mixed up with another's would no longer match its own teacher-forced
    # log-probs.
    stops = set(range(0, 300, 5))
    out = generate(model, PROMPTS, 4, 10, stops, 2, temperature=0.9, shared_prompt=shared,
                   generator=torch.Generator().manual_seed(3))
    lengths = [len(r) for s in out for r in s.response_ids]
    assert len(set(lengths)) > 3 and min(lengths) < 10  # really ragged
    for prompt, samples in zip(PROMPTS, out):
        for response, logps, truncated in zip(samples.response_ids, samples.logprobs, samples.truncated):
            assert truncated == (response[-1] not in stops) and all(t not in stops for t in response[:-1])
            assert logps == pytest.approx(teacher_forced(model, prompt, response, 0.9), abs=2e-5)


def test_finished_rows_leave_the_batch(model, monkeypatch):
    rows_per_call: list[int] = []
    forward = Decoder.forward

    def counting(self, ids, positions, valid, cache):
        rows_per_call.append(ids.shape[0])
        return forward(self, ids, positions, valid, cache)

    monkeypatch.setattr(Decoder, "forward", counting)
    stops = set(range(0, 300, 4))
    out = generate(model, PROMPTS[:1], 8, 6, stops, 2, generator=torch.Generator().manual_seed(1))
    lengths = [len(r) for r in out[0].response_ids]
    # prefill (the one prompt), then decode forward t (feeding token t) computes the rows that
    # had not stopped within their first t tokens: the responses longer than t.
    expected = [1] + [e for e in (sum(n > t for n in lengths) for t in range(1, 6)) if e > 0]
    assert rows_per_call == expected and rows_per_call[-1] < 8


def test_same_seed_same_samples_and_the_old_loop_agrees_without_stops(model):
    def run(static: bool, seed: int, stops: set[int]):
        return generate(model, PROMPTS, 3, 7, stops, 2, generator=torch.Generator().manual_seed(seed),
                        static_cache=static)

    stops = set(range(0, 300, 6))
    assert run(True, 0, stops) == run(True, 0, stops)
    assert run(True, 0, stops) != run(True, 1, stops)
    # No row stops early, so both loops draw from the generator identically.
    new, old = run(True, 0, set()), run(False, 0, set())
    assert [s.response_ids for s in new] == [s.response_ids for s in old]
    for a, b in zip(new, old):
        for x, y in zip(a.logprobs, b.logprobs):
            assert x == pytest.approx(y, abs=1e-5)


def test_static_cache_bounds(model, monkeypatch):
    made: list[StaticKVCache] = []
    for_model = StaticKVCache.for_model

    def recording(m, rows, capacity):
        made.append(for_model(m, rows, capacity))
        return made[-1]

    monkeypatch.setattr(StaticKVCache, "for_model", staticmethod(recording))
    generate(model, PROMPTS, 4, 9, set(), 2, max_rows=8)  # 8 rows: two prompts per chunk, then one
    assert [(c.capacity, c.rows) for c in made] == [(5 + 9, 8), (3 + 9, 4)]
    cache = made[-1]
    assert cache.length == 3 + 8  # the last sampled token is never fed back
    # layers x (keys, values) x rows x kv heads x capacity x head dim x 4 bytes, plus the mask
    assert cache.nbytes() == 2 * 2 * 4 * 2 * 12 * 16 * 4 + 4 * 12
    with pytest.raises(ValueError, match="holds 12 positions; writing 2 at 11 overflows"):
        Decoder(model).forward(torch.ones((4, 2), dtype=torch.long), torch.zeros((4, 2), dtype=torch.long),
                               torch.ones((4, 2), dtype=torch.bool), cache)


@pytest.mark.skipif(not MKL_PACKED_GEMM, reason="this torch build has no MKL packed GEMM (e.g. ARM): nothing is packed")
def test_packed_weights_are_exact_and_follow_the_optimizer(model):
    lin = torch.nn.Linear(64, 48, bias=True)
    packed = _Packed([lin])
    for rows in (1, 3, 32, 33, 100):
        x = torch.randn(rows, 64)
        assert torch.equal(packed(x)[0], torch.nn.functional.linear(x, lin.weight, lin.bias))
    m = tiny_model(300, seed=1, layers=2, hidden=64).eval()
    decoder = Decoder(m)
    decoder.pack()
    first = decoder.packed
    generate(m, PROMPTS, 2, 5, set(), 2, decoder=decoder)
    assert decoder.packed is first  # reused while the weights stay
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.add_(0.5)  # what optimizer.step does: in place
    g = torch.Generator().manual_seed(0)
    after = generate(m, PROMPTS, 2, 5, set(), 2, decoder=decoder, generator=g)
    assert decoder.packed is None  # the stale copy was dropped, not used
    fresh = generate(m, PROMPTS, 2, 5, set(), 2, static_cache=False, generator=torch.Generator().manual_seed(0))
    assert [s.response_ids for s in after] == [s.response_ids for s in fresh]


def test_long_answers_pack_and_match_unpacked(model, monkeypatch):
    monkeypatch.setattr(rollout, "PACK_AFTER_STEPS", 2)
    decoder = Decoder(model)
    packed = generate(model, PROMPTS, 2, 8, set(), 2, decoder=decoder, generator=torch.Generator().manual_seed(0))
    assert decoder.packed is not None or not _can_pack(model)
    plain = generate(model, PROMPTS, 2, 8, set(), 2, static_cache=False, generator=torch.Generator().manual_seed(0))
    for a, b in zip(packed, plain):
        assert a.response_ids == b.response_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x == pytest.approx(y, abs=1e-5)


def test_nucleus_by_hand_and_against_a_full_sort():
    probs = torch.tensor([[0.09, 0.245, 0.665, 0.0]])
    top, index = _nucleus(probs, 0.7)  # 0.665 < 0.7, so 0.245 joins; then the mass reaches it
    kept = {int(i): float(p) for i, p in zip(index[0], top[0]) if p > 0}
    assert kept == {2: pytest.approx(0.665), 1: pytest.approx(0.245)}
    probs = torch.softmax(torch.randn(6, 3000) * 3, dim=-1)
    for top_p in (0.3, 0.9, 0.999):
        top, index = _nucleus(probs, top_p)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        ref = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0.0)
        for r in range(6):
            got = {int(i) for i, p in zip(index[r], top[r]) if p > 0}
            assert got == {int(i) for i, p in zip(order[r], ref[r]) if p > 0}


def test_inverse_cdf_draw_matches_the_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).repeat(40000, 1)
    tokens = rollout._draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert freq.tolist() == pytest.approx([0.1, 0.0, 0.6, 0.3], abs=0.01)
    # u rounding up to the total must not pick the zero-mass token past the end
    edge = torch.tensor([[0.5, 0.5, 0.0]])
    assert rollout._draw(edge, None).item() in (0, 1)


def test_models_outside_the_llama_family_take_the_generic_loop():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2)).eval()
    assert "gpt2" in unsupported_reason(gpt2)
    out = generate(gpt2, PROMPTS, 2, 4, set(), 2)
    assert [len(r) for s in out for r in s.response_ids] == [4] * 6
    with pytest.raises(ValueError, match="cannot run this model: model type 'gpt2'"):
        generate(gpt2, PROMPTS, 2, 4, set(), 2, static_cache=True)
