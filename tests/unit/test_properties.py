"""Property-based tests of the pure functions: for random shapes, masks and finite inputs the
loss and advantages are finite, masked positions never matter, and splitting a mini-batch into
micro-batches (passing the whole batch's denominators) never changes the gradient."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo import aggregate_loss, group_advantages, policy_loss

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
GARBAGE = [math.nan, math.inf, -math.inf, 1e30, -1e30]
settings.register_profile("dapo", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("dapo")


@st.composite
def batches(draw):
    """A [B, L] batch: log-probs in a softmax's range, old log-probs up to 100 nats away (float32
    exp() overflows past 88),
    per-response advantages, a right-padded mask (a response may be empty) and the loss options."""
    B, L = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    log_prob = -torch.rand(B, L, generator=g) * draw(st.sampled_from([0.1, 5.0, 60.0]))
    old = log_prob + (torch.rand(B, L, generator=g) * 2 - 1) * draw(st.sampled_from([0.0, 0.3, 20.0, 100.0]))
    adv = torch.randn(B, generator=g) * draw(st.sampled_from([0.0, 1.0, 1e3]))
    lengths = [draw(st.integers(0, L)) for _ in range(B)]
    mask = torch.tensor([[1] * n + [0] * (L - n) for n in lengths])
    options = dict(agg=draw(st.sampled_from(AGGS)), clip_ratio_c=draw(st.sampled_from([None, 3.0])),
                   eps_low=draw(st.sampled_from([0.2, 0.0])), eps_high=draw(st.sampled_from([0.28, 5.0])))
    return log_prob, old, adv, mask, options


def loss_and_grad(log_prob, old, adv, mask, **options):
    lp = log_prob.clone().requires_grad_(True)
    loss, metrics = policy_loss(lp, old, adv, mask, **options)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss, grad, metrics


@given(batches())
def test_finite_inputs_give_finite_loss_gradient_and_metrics(batch):
    log_prob, old, adv, mask, options = batch
    loss, grad, metrics = loss_and_grad(log_prob, old, adv, mask, **options)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


@given(batches(), st.sampled_from(GARBAGE), st.integers(0, 2**31 - 1))
def test_masked_positions_never_matter(batch, garbage, seed):
    log_prob, old, adv, mask, options = batch
    loss, grad, _ = loss_and_grad(log_prob, old, adv, mask, **options)
    hidden = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    poison = (mask == 0) & hidden
    lp2 = torch.where(poison, torch.full_like(log_prob, garbage), log_prob)
    old2 = torch.where(poison, torch.full_like(old, -garbage), old)
    loss2, grad2, _ = loss_and_grad(lp2, old2, adv, mask, **options)
    assert torch.equal(loss, loss2)
    assert torch.equal(grad, grad2)
    assert (grad2[mask == 0] == 0).all()


@given(batches(), st.data())
def test_micro_batch_split_never_changes_the_gradient(batch, data):
    log_prob, old, adv, mask, options = batch
    B = mask.shape[0]
    # the trainer passes the whole mini-batch's denominators and a constant norm_len to every micro-batch
    norm_len = mask.shape[1]
    loss, grad, _ = loss_and_grad(log_prob, old, adv, mask, **options, norm_len=norm_len)
    cuts = sorted(data.draw(st.sets(st.integers(1, B - 1), max_size=B - 1))) if B > 1 else []
    whole = dict(num_tokens=int(mask.sum()), num_seqs=int(mask.any(-1).sum()), norm_len=norm_len)
    lp = log_prob.clone().requires_grad_(True)
    total = torch.zeros(())
    for lo, hi in zip([0, *cuts], [*cuts, B]):
        width = max(int(mask[lo:hi].sum(-1).max()), 1)  # each micro-batch trimmed to its longest response
        part, _ = policy_loss(lp[lo:hi, :width], old[lo:hi, :width], adv[lo:hi], mask[lo:hi, :width],
                              **options, **whole)
        total = total + part
    (split_grad,) = torch.autograd.grad(total, lp)
    scale = max(1.0, float(loss.detach().abs()), float(grad.abs().max()))
    assert abs(float(total.detach()) - float(loss.detach())) <= 1e-5 * scale
    torch.testing.assert_close(split_grad, grad, atol=1e-5 * scale, rtol=1e-5)


@given(st.integers(1, 5), st.integers(1, 8), st.sampled_from(AGGS), st.integers(0, 2**31 - 1))
def test_aggregate_loss_of_finite_tokens_is_finite_and_ignores_masked(B, L, agg, seed):
    g = torch.Generator().manual_seed(seed)
    token_loss = torch.randn(B, L, generator=g) * 100
    mask = torch.rand(B, L, generator=g) < 0.6
    out = aggregate_loss(token_loss, mask, agg)
    assert torch.isfinite(out)
    assert torch.equal(out, aggregate_loss(token_loss.masked_fill(~mask, math.nan), mask, agg))


@given(st.integers(1, 5), st.integers(2, 16), st.sampled_from([1e-3, 1.0, 1e6]), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_group_advantages_are_finite_and_centred(groups, G, scale, normalize_std, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(groups, G, generator=g) * scale
    rewards[0] = rewards[0, 0]  # a group of equal rewards gets exactly zero advantage
    adv = group_advantages(rewards, normalize_std=normalize_std)
    assert adv.shape == rewards.shape and torch.isfinite(adv).all()
    assert torch.equal(adv[0], torch.zeros(G))
    assert torch.allclose(adv.mean(dim=1), torch.zeros(groups), atol=1e-4 * (1 if normalize_std else scale))
    # groups are independent: permuting one group permutes its advantages and leaves the others alone
    perm = torch.randperm(G, generator=g)
    shuffled = rewards.clone()
    shuffled[-1] = rewards[-1, perm]
    adv2 = group_advantages(shuffled, normalize_std=normalize_std)
    torch.testing.assert_close(adv2[-1], adv[-1, perm], atol=1e-5 * (1 if normalize_std else scale), rtol=1e-5)
    assert torch.equal(adv2[:-1], adv[:-1])
