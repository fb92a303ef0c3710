"""policy_loss and aggregate_loss against values worked out by hand from DAPO Eq. 8."""

import math

import pytest
import torch

from dapo import aggregate_loss, policy_loss

# Two responses, L = 3. Row 0: A = +1, ratios (1.0, 1.5, 0.5). Row 1: A = -2, ratios (0.5, 2.0), third
# token masked. With eps_low 0.2 and eps_high 0.28 the per-token objectives min(rA, clip(r)A) are
#   row 0: (1.0, 1.28 [clipped high], 0.5)      row 1: (-1.6 [clipped low], -4.0)
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [0.5, 2.0, 1.0]])
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def inputs(garbage: float = 0.0):
    log_prob = torch.log(RATIOS).clone()
    log_prob[1, 2] = garbage
    log_prob.requires_grad_(True)
    old = torch.zeros(2, 3)
    old[1, 2] = -garbage if math.isfinite(garbage) else garbage
    return log_prob, old


@pytest.mark.parametrize("agg, expected", [
    ("token-mean", -(1.0 + 1.28 + 0.5 - 1.6 - 4.0) / 5),                 # 0.564
    ("seq-mean-token-mean", -((2.78 / 3) + (-5.6 / 2)) / 2),             # 0.936667
    ("seq-mean-token-sum-norm", -((2.78 / 3) + (-5.6 / 3)) / 2),         # 0.47
])
def test_aggregations_by_hand(agg, expected):
    log_prob, old = inputs()
    loss, _ = policy_loss(log_prob, old, ADV, MASK, 0.2, 0.28, agg=agg)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_token_mean_gradient_by_hand():
    # d(-r A / N)/d logp = -r A / N for unclipped tokens, 0 for clipped ones, N = 5.
    log_prob, old = inputs()
    loss, _ = policy_loss(log_prob, old, ADV, MASK)
    loss.backward()
    expected = torch.tensor([[-0.2, 0.0, -0.1], [0.0, 0.8, 0.0]])
    torch.testing.assert_close(log_prob.grad, expected)


def test_clip_fractions_by_hand():
    log_prob, old = inputs()
    _, m = policy_loss(log_prob, old, ADV, MASK)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 5)   # row 1 token 0: r 0.5 < 0.8 with A < 0
    assert m["clip_frac_high"].item() == pytest.approx(1 / 5)  # row 0 token 1: r 1.5 > 1.28 with A > 0


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_masked_positions_do_not_matter(garbage):
    log_prob, old = inputs(garbage)
    loss, m = policy_loss(log_prob, old, ADV, MASK)
    loss.backward()
    assert loss.item() == pytest.approx(0.564, abs=1e-6)
    assert torch.isfinite(log_prob.grad).all() and log_prob.grad[1, 2] == 0
    assert all(torch.isfinite(v) for v in m.values())


def test_dual_clip_bounds_negative_advantages():
    log_prob, old = inputs()
    # c = 1.5: floor 1.5 * -2 = -3 lifts row 1 token 1 from -4 to -3; c = 3 (floor -6) changes nothing.
    loss, _ = policy_loss(log_prob, old, ADV, MASK, clip_ratio_c=1.5)
    assert loss.item() == pytest.approx(-(1.0 + 1.28 + 0.5 - 1.6 - 3.0) / 5, abs=1e-6)
    loss, _ = policy_loss(log_prob, old, ADV, MASK, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(0.564, abs=1e-6)


def test_one_token_response_at_ratio_one():
    loss, m = policy_loss(torch.tensor([[-0.7]]), torch.tensor([[-0.7]]), torch.tensor([0.5]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(-0.5)
    assert m["approx_kl"].item() == pytest.approx(0.0)


def test_per_token_advantages_accepted():
    log_prob, old = inputs()
    per_token = ADV[:, None].expand(2, 3)
    a, _ = policy_loss(log_prob, old, ADV, MASK)
    b, _ = policy_loss(log_prob, old, per_token, MASK)
    assert a.item() == pytest.approx(b.item())


def test_kl_penalty_k3_by_hand():
    # logp = 0, ref = log 2: k3 = exp(log 2) - log 2 - 1 = 1 - log 2 per token; A = 0 so only KL remains.
    lp = torch.zeros(1, 2)
    ref = torch.full((1, 2), math.log(2.0))
    loss, m = policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 2), ref_log_prob=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2.0)), abs=1e-6)
    assert m["kl_ref"].item() == pytest.approx(1 - math.log(2.0), abs=1e-6)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_split_gives_same_gradient(agg):
    torch.manual_seed(0)
    B, L = 6, 5
    lp = torch.randn(B, L, requires_grad=True)
    old = lp.detach() + 0.3 * torch.randn(B, L)
    adv = torch.randn(B)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, n in enumerate([1, 5, 3, 2, 4, 5]):
        mask[i, :n] = 1
    whole, _ = policy_loss(lp, old, adv, mask, agg=agg, norm_len=7)
    (g_whole,) = torch.autograd.grad(whole, lp)
    total_tokens, total_seqs = int(mask.sum()), B
    parts = 0.0
    for idx in ([0, 1], [2], [3, 4, 5]):
        # each micro-batch is trimmed to its own longest response, as the trainer does
        width = int(mask[idx].sum(-1).max())
        part, _ = policy_loss(lp[idx, :width], old[idx, :width], adv[idx], mask[idx, :width], agg=agg,
                              num_tokens=total_tokens, num_seqs=total_seqs, norm_len=7)
        parts = parts + part
    (g_parts,) = torch.autograd.grad(parts, lp)
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)
    torch.testing.assert_close(g_parts, g_whole)


def test_unknown_aggregation():
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "sum")  # type: ignore[arg-type]
