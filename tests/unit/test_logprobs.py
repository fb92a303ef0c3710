"""The shared-prompt (Prefix Grouper) forward equals one full forward per response."""

import pytest
import torch

from dapo.batch import TrainBatch
from dapo.logprobs import pack, pad_stack, plan_micro_batches, split_by_response, token_logprobs
from dapo.loss import policy_loss


def batch_of(prompts: list[list[int]], responses: list[list[list[int]]], advantages: torch.Tensor) -> TrainBatch:
    """A TrainBatch of the given groups (prompt, responses); rewards are not needed here."""
    sizes = [len(r) for r in responses]
    n = sum(sizes)
    return TrainBatch(group=torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)),
                      prompt_index=torch.zeros(n, dtype=torch.long),
                      prompt_ids=[p for p, rs in zip(prompts, responses) for _ in rs],
                      response_ids=[r for rs in responses for r in rs], truncated=torch.zeros(n, dtype=torch.bool),
                      completions=[""] * n, scores=torch.zeros(n, 1), task_rewards=torch.zeros(n),
                      rewards=torch.zeros(n), advantages=advantages)


def make_batch(tokenizer) -> TrainBatch:
    torch.manual_seed(1)
    prompts, responses = [], []
    for prompt_len, lengths in [(11, [1, 4, 3, 7]), (6, [2, 5, 1])]:
        prompts.append(torch.randint(10, 5000, (prompt_len,)).tolist())
        responses.append([torch.randint(10, 5000, (n,)).tolist() for n in lengths])
    return batch_of(prompts, responses, torch.randn(7))


def plain_logprobs(model, batch: TrainBatch, row: int, temperature: float) -> torch.Tensor:
    prompt, resp = batch.prompt_ids[row], batch.response_ids[row]
    ids = torch.tensor([prompt + resp])
    logits = model(ids).logits[0, len(prompt) - 1:-1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]


def loss_and_grads(model, batch, shared, budget, temperature=0.7):
    model.zero_grad()
    n_tok = int(batch.lengths.sum())
    n_seq = len(batch)
    total = 0.0
    logps = {}
    for mb in plan_micro_batches(batch, budget, shared):
        packed = pack(mb, pad_id=2)
        lp, _ = token_logprobs(model, packed, temperature)
        per = split_by_response(lp, packed.owner)
        rows = [row for _, row, _ in packed.owner]
        for row, t in zip(rows, per):
            logps[row] = t.detach()
        lp_pad = pad_stack(per)
        loss, _ = policy_loss(lp_pad, lp_pad.detach() - 0.1, batch.advantages[rows],
                              pad_stack([torch.ones_like(t) for t in per]), num_tokens=n_tok, num_seqs=n_seq)
        loss.backward()
        total += loss.item()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return total, grads, logps


def test_packed_logprobs_equal_plain_forward(tokenizer, tiny):
    batch = make_batch(tokenizer)
    for shared in (True, False):
        for budget in (4096, 16):  # one micro-batch, and one row per micro-batch
            _, _, logps = loss_and_grads(tiny, batch, shared, budget)
            for row in range(len(batch)):
                ref = plain_logprobs(tiny, batch, row, 0.7)
                torch.testing.assert_close(logps[row], ref.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget", [4096, 30, 16])
def test_shared_prompt_loss_and_gradient_equal_plain_path(tokenizer, tiny, budget):
    batch = make_batch(tokenizer)
    loss_ref, grad_ref, _ = loss_and_grads(tiny, batch, shared=False, budget=10_000)
    loss, grad, _ = loss_and_grads(tiny, batch, shared=True, budget=budget)
    assert loss == pytest.approx(loss_ref, abs=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)


def test_micro_batches_respect_the_token_budget(tokenizer):
    batch = make_batch(tokenizer)
    for budget in (16, 20, 30, 64):
        batches = plan_micro_batches(batch, budget, shared_prompt=True)
        seen = sorted((s.group, r) for mb in batches for s in mb for r in s.responses)
        assert seen == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 4), (1, 5), (1, 6)]  # each response exactly once
        for mb in batches:
            padded = len(mb) * max(s.num_tokens for s in mb)
            assert padded <= budget or len(mb) == 1


def test_shared_prompt_packs_prompt_once(tokenizer):
    batch = make_batch(tokenizer)
    shared = sum(p.input_ids.numel() for p in map(lambda mb: pack(mb, 2), plan_micro_batches(batch, 4096, True)))
    # one row per group: (11 + 15) and (6 + 8) tokens, padded to 26 -> 2 * 26
    assert shared == 2 * 26
