import torch

from dapo import group_advantages


def test_one_success_in_four_by_hand():
    # mean 0.25; unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / (0.5 + 1e-6)
    torch.testing.assert_close(adv, expected)


def test_dr_grpo_skips_std():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.2, 0.4, 0.6, 0.8]]), normalize_std=False)
    torch.testing.assert_close(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25], [-0.3, -0.1, 0.1, 0.3]]))


def test_groups_are_independent_and_all_equal_gives_zero():
    adv = group_advantages(torch.tensor([[0.444, 0.444, 0.444], [0.0, 1.0, 0.5]]))
    torch.testing.assert_close(adv[0], torch.zeros(3))
    # mean 0.5, unbiased std 0.5 -> (-1, 1, 0)
    torch.testing.assert_close(adv[1], torch.tensor([-0.5, 0.5, 0.0]) / (0.5 + 1e-6))


def test_bad_shape_is_rejected():
    import pytest

    with pytest.raises(ValueError, match="num_groups, G>=2"):
        group_advantages(torch.tensor([1.0, 2.0]))


def test_equal_rewards_give_exactly_zero():
    # mean(8 x 0.7) is off by one rounding step; unguarded, dividing by std + eps made that 0.056.
    adv = group_advantages(torch.full((1, 8), 0.7))
    assert torch.equal(adv, torch.zeros(1, 8))
