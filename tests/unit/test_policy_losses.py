"""The policy losses after DAPO (GSPO, CISPO, SAPO, Clip-Cov, KL-Cov, GMPO) and the sequence-level
rollout corrections: equal to verl 0.9.1's `core_algos` on ragged random inputs (fixtures written
from the unmodified wheel by tests/fixtures/verl/make_verl_fixtures.py), values worked by hand on
2x3 examples, and the gradients of the losses that detach part of their ratio."""

from __future__ import annotations

import math

import pytest
import torch

from dapo.loss import POLICY_LOSSES, correction_stats, policy_loss, rollout_is_weights
from toy_run import TESTS

VERL = torch.load(TESTS / "fixtures" / "verl" / "verl_losses.pt", weights_only=True)
INPUTS = VERL["inputs"]
MASK = INPUTS["response_mask"]
L = MASK.shape[-1]
# dapo's aggregations and verl's names for them; verl's seq-mean-token-sum-norm divides by the
# tensor's width unless given a constant, dapo by norm_len (max_new_tokens): the width here.
AGGS = {"token-mean": "token-mean", "seq-mean-token-mean": "seq-mean-token-mean",
        "seq-mean-token-sum-norm": "seq-mean-token-sum-norm"}


def verl_cases():
    for entry in VERL["policy_losses"]:
        if entry["loss_mode"] in POLICY_LOSSES:
            yield pytest.param(entry, id=f"{entry['loss_mode']}-{entry['config_name']}-{entry['adv_kind']}"
                                          f"{'-tis' if entry['is_weights'] else ''}")


def dapo_arguments(entry: dict) -> dict:
    """verl's config as dapo's policy_loss arguments."""
    c, p = entry["config"], entry["config"]["policy_loss"]
    lo = c["clip_ratio_low"] if c["clip_ratio_low"] is not None else c["clip_ratio"]
    hi = c["clip_ratio_high"] if c["clip_ratio_high"] is not None else c["clip_ratio"]
    options = {"sapo": {"tau_pos": c["tau_pos"], "tau_neg": c["tau_neg"]},
               "clip_cov": {"clip_cov_ratio": p["clip_cov_ratio"], "clip_cov_lb": p["clip_cov_lb"],
                            "clip_cov_ub": p["clip_cov_ub"]},
               "kl_cov": {"kl_cov_ratio": p["kl_cov_ratio"], "kl_cov_coef": p["ppo_kl_coef"]}}
    return {"eps_low": lo, "eps_high": hi, "loss": entry["loss_mode"], "loss_options": options.get(entry["loss_mode"]),
            # verl's vanilla always has the dual clip (clip_ratio_c, default 3)
            "clip_ratio_c": c["clip_ratio_c"] if entry["loss_mode"] == "vanilla" else None}


@pytest.mark.parametrize("entry", list(verl_cases()))
def test_equal_to_verl(entry):
    advantages = INPUTS["advantages"][entry["adv_kind"]]
    weights = INPUTS["rollout_is_weights"][entry["is_weights"]] if entry["is_weights"] else None
    modes = VERL["loss_agg_modes"]
    # SAPO is always averaged per response in verl; GMPO is a per-response loss (one value).
    aggs = ["seq-mean-token-mean"] if entry["loss_mode"] in ("sapo", "geo_mean") else list(AGGS)
    for agg in aggs:
        i = modes.index(AGGS[agg])
        log_prob = INPUTS["log_prob"].clone().requires_grad_(True)
        if entry["loss_mode"] == "clip_cov":
            torch.manual_seed(entry["rng_seed"])  # verl draws its random choice from the global RNG
        loss, metrics = policy_loss(log_prob, INPUTS[entry["old_log_prob_key"]], advantages, MASK, agg=agg,
                                    is_weights=weights, norm_len=L, **dapo_arguments(entry))
        loss.backward()
        torch.testing.assert_close(loss.detach(), entry["loss"][i], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(log_prob.grad, entry["grad"][i], rtol=1e-5, atol=1e-8)
    verl = entry["metrics"]
    clipped = float(metrics["clip_frac_low"] + metrics["clip_frac_high"])
    if entry["loss_mode"] in ("vanilla", "gspo", "cispo"):
        assert clipped == pytest.approx(verl["actor/pg_clipfrac"], abs=1e-6)
    if entry["loss_mode"] == "geo_mean":
        assert float(metrics["clip_frac_high"]) == pytest.approx(verl["actor/pg_clipfrac"], abs=1e-6)
        assert float(metrics["clip_frac_low"]) == pytest.approx(verl["actor/pg_clipfrac_lower"], abs=1e-6)
    if entry["loss_mode"] == "clip_cov":
        assert float(metrics["cov_selected"]) == pytest.approx(verl["actor/pg_clipfrac"], abs=1e-6)
        assert round(float(metrics["cov_selected"] * MASK.sum())) == int(entry["selected"].sum())


def test_every_verl_loss_dapo_implements_is_checked():
    checked = {e["loss_mode"] for e in VERL["policy_losses"] if e["loss_mode"] in POLICY_LOSSES}
    assert checked == set(POLICY_LOSSES)


@pytest.mark.parametrize("name, mode, cap, ratio", [("token_tis_2", "tis", 2.0, None), ("seq_tis_2", "seq_tis", 2.0, None),
                                                    ("geo_rs_1.1_upper_only", "seq_mis", 2.0, 1.1)])
def test_rollout_corrections_equal_to_verl(name, mode, cap, ratio):
    entry = next(e for e in VERL["rollout_corr"] if e["name"] == name)
    weights, mask = rollout_is_weights(INPUTS[entry["old_log_prob_key"]], INPUTS[entry["rollout_log_prob_key"]],
                                       MASK, mode, cap=cap, geo_ratio=ratio or 1.01)
    if entry["rollout_is_weights"] is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights * MASK, entry["rollout_is_weights"], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(mask, entry["modified_response_mask"].to(mask.dtype))


# --- by hand: a 2x3 example per loss -------------------------------------------------------------------
# Row 0 has 3 tokens with A = +1, row 1 has 2 tokens with A = -1. log pi_old = 0 (an arbitrary base:
# only differences and, for CISPO, log pi itself enter), so log pi is the log-ratio.
LR = torch.tensor([[0.1, -0.3, 0.5], [0.2, -0.1, 9.9]])   # row 1's last token is padding
M = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
A = torch.tensor([1.0, -1.0])
OLD = torch.zeros(2, 3)


def hand(loss: str, agg: str = "token-mean", **kw) -> tuple[float, torch.Tensor, dict]:
    lp = LR.clone().requires_grad_(True)
    value, metrics = policy_loss(lp, OLD, A, M, agg=agg, loss=loss, **kw)
    value.backward()
    return float(value.detach()), lp.grad, metrics


def test_vanilla_by_hand():
    # ratios e^.1 = 1.105, e^-.3 = .741, e^.5 = 1.649 (A=+1: min(r, clip(r, .8, 1.28)) = 1.105, .741, 1.28);
    # e^.2 = 1.221, e^-.1 = .905 (A=-1: min(-r, -clip) = -1.221, -.905). Token mean of -objective over 5:
    expected = -(math.exp(0.1) + math.exp(-0.3) + 1.28 - math.exp(0.2) - math.exp(-0.1)) / 5
    value, grad, m = hand("vanilla")
    assert value == pytest.approx(expected, rel=1e-6)
    assert grad[0, 2] == 0 and float(m["clip_frac_high"]) == pytest.approx(1 / 5)  # the clipped token


def test_gspo_by_hand_and_its_token_level_gradient():
    # s_0 = exp(mean(.1, -.3, .5)) = e^.1, s_1 = exp(mean(.2, -.1)) = e^.05; paper clip [1 - 3e-4, 1 + 4e-4]:
    # A=+1: min(s, clip) = 1.0004; A=-1: min(-s, -clip) = -e^.05. seq-mean-token-mean:
    value, grad, m = hand("gspo", "seq-mean-token-mean", eps_low=3e-4, eps_high=4e-4)
    assert value == pytest.approx(-(1.0004 - math.exp(0.05)) / 2, rel=1e-6)
    # Row 0 is clipped (no gradient); row 1's tokens each get d/dlp of -(-s_1)/2/2 = s_1 / 4 (the
    # sequence ratio's value times the token's own gradient, averaged over its 2 tokens and 2 rows).
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.0], [math.exp(0.05) / 4] * 2 + [0.0]]))
    assert float(m["clip_frac_high"]) == pytest.approx(3 / 5)


def test_cispo_by_hand_and_its_stop_gradient_weight():
    # weights sg(clip(r, 1 - 10, 1 + .2)): 1.105, .741, 1.2 | 1.2, .905; loss = -sum(w A log pi) / 5
    w = torch.tensor([[math.exp(0.1), math.exp(-0.3), 1.2], [1.2, math.exp(-0.1), 0.0]])
    value, grad, m = hand("cispo", eps_low=10.0, eps_high=0.2)
    expected = -float((w * A[:, None] * LR * M).sum()) / 5
    assert value == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(grad, -(w * A[:, None] * M) / 5)  # d/dlp of -w A lp: the weight is a constant
    assert float(m["clip_frac_high"]) == pytest.approx(2 / 5)  # e^.5 and e^.2 exceed 1.2


def test_sapo_by_hand():
    # f(r) = sigmoid(tau (r - 1)) 4 / tau with tau 1 (A > 0) and 1.05 (A < 0); seq-mean-token-mean of -f A
    def f(r, tau): return 4 / tau / (1 + math.exp(-tau * (r - 1)))
    row0 = sum(f(math.exp(x), 1.0) for x in (0.1, -0.3, 0.5)) / 3
    row1 = -sum(f(math.exp(x), 1.05) for x in (0.2, -0.1)) / 2
    value, _, _ = hand("sapo", "seq-mean-token-mean", loss_options={"tau_pos": 1.0, "tau_neg": 1.05})
    assert value == pytest.approx(-(row0 + row1) / 2, rel=1e-6)


def test_kl_cov_by_hand():
    # cov_t = (A_t - mean A)(lp_t - mean lp) over the 5 valid tokens: mean A = 1/5, mean lp = .08;
    # the largest is row 0's third token (.8 * .42); ratio .2 of 5 tokens -> 1 token gets + |log r|.
    value, _, m = hand("kl_cov", loss_options={"kl_cov_ratio": 0.2, "kl_cov_coef": 1.0})
    plain = -(math.exp(0.1) + math.exp(-0.3) + math.exp(0.5) - math.exp(0.2) - math.exp(-0.1))
    assert value == pytest.approx((plain + 0.5) / 5, rel=1e-6)
    assert float(m["cov_selected"]) == pytest.approx(1 / 5)


def test_clip_cov_by_hand():
    # Clip range .2/.28: row 0's third token (r 1.649, A +1) is clipped and never a candidate. cov of the
    # others: (.8)(.1 - .08) = .016, (.8)(-.38) < 0, (-1.2)(.12) < 0, (-1.2)(-.18) = .216. With bounds
    # (0, 1) two candidates; ratio .2 of 5 tokens -> 1 of them loses its loss and gradient.
    value, grad, m = hand("clip_cov", loss_options={"clip_cov_ratio": 0.2, "clip_cov_lb": 0.0, "clip_cov_ub": 1.0})
    assert float(m["cov_selected"]) == pytest.approx(1 / 5)
    dropped = [(0, 0), (1, 1)]
    assert sum(float(grad[r, t]) == 0 for r, t in dropped) == 1
    vanilla, _, _ = hand("vanilla")
    gone = {(0, 0): -math.exp(0.1), (1, 1): math.exp(-0.1)}
    assert any(value == pytest.approx(vanilla - loss / 5, abs=1e-6) for loss in gone.values()), (value, vanilla, grad)


def test_geo_mean_by_hand():
    # Row 0 (A > 0): log r capped at +.4 -> (.1, -.3, .4), geometric mean e^(.2/3); row 1 (A < 0): floored
    # at -.4 (none) -> e^.05. loss = mean over rows of -mean(A) * ratio.
    value, _, m = hand("geo_mean", eps_low=0.4, eps_high=0.4)
    assert value == pytest.approx(-(math.exp(0.2 / 3) - math.exp(0.05)) / 2, rel=1e-6)
    assert float(m["clip_frac_high"]) == pytest.approx(1 / 5)


def test_sequence_corrections_by_hand():
    old = torch.tensor([[0.1, 0.2, 0.0], [0.5, 0.5, 0.0]])   # log r: row 0 (.1, .2), row 1 (.5, .5)
    rollout = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w, _ = rollout_is_weights(old, rollout, mask, "seq_tis", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.3)] * 2 + [0.0], [2.0, 2.0, 0.0]]))  # e^1 capped
    _, kept = rollout_is_weights(old, rollout, mask, "seq_mis", geo_ratio=1.2)  # geo means e^.15, e^.5
    torch.testing.assert_close(kept, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    stats = correction_stats(w, mask, kept, cap=2.0)
    assert float(stats["rollout_is_capped"]) == 0.5 and float(stats["rollout_masked"]) == 0.5


@pytest.mark.parametrize("loss", sorted(POLICY_LOSSES))
def test_micro_batches_give_the_whole_batch_gradient(loss):
    """Split 5 responses 2 + 3 with the whole batch's denominators: the same gradient (clip_cov and
    kl_cov choose tokens within what they are given, so here their ratios choose none / all)."""
    torch.manual_seed(0)
    lp, old = torch.randn(5, 4) * 0.3 - 1, torch.randn(5, 4) * 0.3 - 1
    adv, mask = torch.randn(5), (torch.arange(4)[None] < torch.tensor([4, 2, 3, 1, 4])[:, None]).float()
    options = {"clip_cov": {"clip_cov_ratio": 1e-9, "clip_cov_lb": 100.0, "clip_cov_ub": 200.0},
               "kl_cov": {"kl_cov_ratio": 1.0}}.get(loss)
    for agg in ("token-mean", "seq-mean-token-mean"):
        whole_lp = lp.clone().requires_grad_(True)
        policy_loss(whole_lp, old, adv, mask, agg=agg, loss=loss, loss_options=options)[0].backward()
        part_lp = lp.clone().requires_grad_(True)
        for rows in (slice(0, 2), slice(2, 5)):
            policy_loss(part_lp[rows], old[rows], adv[rows], mask[rows], agg=agg, loss=loss, loss_options=options,
                        num_tokens=mask.sum(), num_seqs=5)[0].backward()
        torch.testing.assert_close(part_lp.grad, whole_lp.grad)
