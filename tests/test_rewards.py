import math

import pytest
import torch

from dapo import informative_groups, overlong_penalty
from dapo.errors import RewardError
from dapo.rewards import RewardFunction, digit_accuracy, digit_reward, score_completions


def test_overlong_penalty_eq13_by_hand():
    # L_max 20, L_cache 4: no penalty up to 16 tokens, then -1/4 per token, -1 from 20 on.
    lengths = torch.tensor([1, 10, 16, 17, 18, 19, 20, 21])
    expected = torch.tensor([0, 0, 0, -0.25, -0.5, -0.75, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4), expected)
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4, factor=0.5), expected * 0.5)


def test_overlong_penalty_off():
    torch.testing.assert_close(overlong_penalty(torch.tensor([5, 500]), 20, 0), torch.zeros(2))


def test_digit_reward_matches_seed():
    completions = ["5", " 0 ", "2", "9", "The number", "55", "", "5."]
    assert digit_reward([], completions) == pytest.approx([1.0, 1 - 5 / 9, 1 - 3 / 9, 1 - 4 / 9, 0, 0, 0, 0])
    assert digit_accuracy([], completions) == [1.0, 0, 0, 0, 0, 0, 0, 0]
    assert round(digit_reward([], ["0"])[0], 3) == 0.444  # the seed prints "Reward: 0.444; Response: 0"


def test_informative_groups():
    rewards = torch.tensor([[0.0, 0.0, 0.0], [0.444, 0.444, 0.444], [0.0, 0.444, 0.0], [1.0, 1.0, 0.9]])
    assert informative_groups(rewards).tolist() == [False, False, True, True]


def test_reward_nan_is_a_clear_error():
    rf = RewardFunction("my_reward", lambda prompts, completions, **kw: [0.0, math.nan])
    with pytest.raises(RewardError, match=r"'my_reward' returned nan for completion 1"):
        score_completions([rf], ["p", "p"], ["a", "b"], {})


def test_reward_wrong_count_and_raise():
    short = RewardFunction("short", lambda prompts, completions, **kw: [1.0])
    with pytest.raises(RewardError, match="'short' returned 1 values for 2 completions"):
        score_completions([short], ["p", "p"], ["a", "b"], {})

    def boom(prompts, completions, **kw):
        raise KeyError("answer")

    with pytest.raises(RewardError, match="'boom' raised KeyError"):
        score_completions([RewardFunction("boom", boom)], ["p"], ["a"], {})
