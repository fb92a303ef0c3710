"""The shared-prompt (Prefix Grouper) forward equals one full forward per response."""

import pytest
import torch

from dapo.logprobs import pack, pad_stack, plan_micro_batches, split_by_response, token_logprobs
from dapo.loss import policy_loss
from dapo.rollout import Group


def make_groups(tokenizer):
    torch.manual_seed(1)
    groups = []
    for prompt_len, lengths in [(11, [1, 4, 3, 7]), (6, [2, 5, 1])]:
        prompt = torch.randint(10, 5000, (prompt_len,)).tolist()
        responses = [torch.randint(10, 5000, (n,)).tolist() for n in lengths]
        g = Group({"prompt": "x"}, prompt, responses, [False] * len(lengths))
        g.advantages = torch.randn(len(lengths))
        groups.append(g)
    return groups


def plain_logprobs(model, g: Group, temperature: float) -> list[torch.Tensor]:
    out = []
    for resp in g.response_ids:
        ids = torch.tensor([g.prompt_ids + resp])
        logits = model(ids).logits[0, len(g.prompt_ids) - 1:-1] / temperature
        out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(resp)[:, None])[:, 0])
    return out


def loss_and_grads(model, groups, shared, budget, temperature=0.7):
    model.zero_grad()
    n_tok = sum(len(r) for g in groups for r in g.response_ids)
    n_seq = sum(len(g.response_ids) for g in groups)
    total = 0.0
    logps = {}
    for mb in plan_micro_batches(groups, budget, shared):
        packed = pack(mb, pad_id=2)
        lp, _ = token_logprobs(model, packed, temperature)
        per = split_by_response(lp, packed.owner)
        keys = [(gi, ri) for gi, ri, _ in packed.owner]
        for k, t in zip(keys, per):
            logps[k] = t.detach()
        adv = torch.stack([groups[gi].advantages[ri] for gi, ri in keys])
        lp_pad = pad_stack(per)
        loss, _ = policy_loss(lp_pad, lp_pad.detach() - 0.1, adv, pad_stack([torch.ones_like(t) for t in per]),
                              num_tokens=n_tok, num_seqs=n_seq)
        loss.backward()
        total += loss.item()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return total, grads, logps


def test_packed_logprobs_equal_plain_forward(tokenizer, tiny):
    groups = make_groups(tokenizer)
    for shared in (True, False):
        for budget in (4096, 16):  # one micro-batch, and one row per micro-batch
            _, _, logps = loss_and_grads(tiny, groups, shared, budget)
            for gi, g in enumerate(groups):
                for ri, ref in enumerate(plain_logprobs(tiny, g, 0.7)):
                    torch.testing.assert_close(logps[(gi, ri)], ref.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget", [4096, 30, 16])
def test_shared_prompt_loss_and_gradient_equal_plain_path(tokenizer, tiny, budget):
    groups = make_groups(tokenizer)
    loss_ref, grad_ref, _ = loss_and_grads(tiny, groups, shared=False, budget=10_000)
    loss, grad, _ = loss_and_grads(tiny, groups, shared=True, budget=budget)
    assert loss == pytest.approx(loss_ref, abs=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)


def test_micro_batches_respect_the_token_budget(tokenizer):
    groups = make_groups(tokenizer)
    for budget in (16, 20, 30, 64):
        batches = plan_micro_batches(groups, budget, shared_prompt=True)
        seen = sorted((s.group, r) for mb in batches for s in mb for r in s.responses)
        assert seen == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]  # each response exactly once
        for mb in batches:
            padded = len(mb) * max(s.num_tokens for s in mb)
            assert padded <= budget or len(mb) == 1


def test_shared_prompt_packs_prompt_once(tokenizer):
    groups = make_groups(tokenizer)
    shared = sum(p.input_ids.numel() for p in map(lambda mb: pack(mb, 2), plan_micro_batches(groups, 4096, True)))
    # one row per group: (11 + 15) and (6 + 8) tokens, padded to 26 -> 2 * 26
    assert shared == 2 * 26
