import math
import re

import pytest
import torch

from dapo import informative_groups, overlong_penalty
from dapo.errors import RewardError
from dapo.rewards import RewardFunction, digit_accuracy, digit_reward
from dapo.scorer import score_completions, score_group


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


# --- built-ins, loading, the TRL adapter, time limits, reward_errors -------------------------------

import threading  # noqa: E402
import time  # noqa: E402

from dapo.rewards import (  # noqa: E402
    as_completions,
    build_reward_functions,
    combine,
    exact_match_reward,
    load_reward_function,
    math_reward,
    numeric_reward,
)


def test_exact_match_and_numeric_by_hand():
    completions = [" 12 ", "12.", "3 + 9 = 12", "1,200", "twelve", "-4"]
    assert exact_match_reward([], completions, answer="12") == [1.0, 0, 0, 0, 0, 0]
    assert numeric_reward([], completions, answer=["12", "12", "12", "1200", "12", "-4"]) == [1, 1, 1, 1, 0, 1]
    # GSM8K-style answers: the last number of the answer is the gold one
    assert numeric_reward([], ["so 72"], answer="48 + 24 = 72\n#### 72") == [1.0]
    with pytest.raises(ValueError, match="needs an 'answer' column"):
        numeric_reward([], ["1"])


def test_math_reward_reads_boxed_answers():
    completions = ["The answer is $\\boxed{\\frac{1}{2}}$.", "\\boxed{0.5}", "\\boxed{2}", "no idea"]
    assert math_reward([], completions, answer="\\frac{1}{2}") == [1.0, 1.0, 0.0, 0.0]


def test_chat_completions_follow_trl():
    chat = [{"role": "user", "content": "hi"}]
    assert as_completions(chat, ["7"]) == [[{"role": "assistant", "content": "7"}]]
    assert as_completions("hi", ["7"]) == ["7"]
    scored = score_group([RewardFunction("numeric", numeric_reward)], {"prompt": chat, "answer": "7"}, ["7", "8"])
    assert scored.scores[:, 0].tolist() == [1.0, 0.0]


def test_columns_reach_trl_functions_and_extra_columns_are_dropped_for_narrow_ones():
    seen = {}

    def wide(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [1.0] * len(completions)

    def narrow(prompts, completions, answer):  # no **kwargs: gets only the columns it names
        return [float(c == a) for c, a in zip(completions, answer)]

    record = {"prompt": "p", "answer": "b", "level": "easy"}
    scored = score_group([RewardFunction("wide", wide), RewardFunction("narrow", narrow, 2.0)], record, ["a", "b"])
    # the columns, and (as in TRL) completion_ids, trainer_state, log_extra and log_metric
    assert {k: seen[k] for k in ("answer", "level")} == {"answer": ["b", "b"], "level": ["easy", "easy"]}
    assert set(seen) == {"answer", "level", "completion_ids", "trainer_state", "log_extra", "log_metric"}
    assert scored.scores.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    torch.testing.assert_close(combine(scored.scores, [1.0, 2.0]), torch.tensor([1.0, 3.0]))


def test_load_reward_from_file_module_and_builtin(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def correct(prompts, completions, answer, **kw):\n"
                                            "    return [float(c.strip() == a) for c, a in zip(completions, answer)]\n")
    name, fn = load_reward_function(f"{tmp_path}/my_rewards.py:correct")
    assert name == "correct" and fn([], ["4"], answer=["4"]) == [1.0]
    assert load_reward_function("dapo.rewards:digit_reward")[0] == "digit_reward"
    fns = build_reward_functions(["numeric", "numeric", f"{tmp_path}/my_rewards.py:correct"], [1.0, 0.5, 2.0])
    assert [(f.name, f.weight) for f in fns] == [("numeric", 1.0), ("numeric_2", 0.5), ("correct", 2.0)]
    with pytest.raises(RewardError, match="has no function 'nope'"):
        load_reward_function(f"{tmp_path}/my_rewards.py:nope")
    with pytest.raises(RewardError, match="file 'missing.py' does not exist"):
        load_reward_function("missing.py:f")
    with pytest.raises(RewardError, match="cannot import module 'no_such_module_xyz'"):
        load_reward_function("no_such_module_xyz:f")
    with pytest.raises(RewardError, match="is not a built-in"):
        load_reward_function("accuracy")


def _sleepy(prompts, completions, **kw):
    time.sleep(30)
    return [1.0] * len(completions)


def test_time_limit_holds_off_the_main_thread():
    """signal.alarm would silently do nothing here; the worker process is killed on time."""
    out = {}

    def work():
        t0 = time.perf_counter()
        try:
            score_completions([RewardFunction("sleepy", _sleepy)], ["What is 1 + 1?"], ["2"], {}, timeout=0.5)
        except RewardError as e:
            out["error"], out["seconds"] = str(e), time.perf_counter() - t0

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(20)
    assert out["seconds"] < 5
    assert out["error"] == ("reward function 'sleepy' took longer than reward_timeout=0.5 s "
                            "(record: prompt 'What is 1 + 1?')")


def test_worker_returns_values_and_errors():
    # A lambda reaches the (forked) worker as it is: no pickling of the function.
    twice = RewardFunction("twice", lambda prompts, completions, **kw: [2.0 * len(c) for c in completions])
    assert score_completions([twice], ["p", "p"], ["a", "bb"], {}, timeout=5.0).scores[:, 0].tolist() == [2.0, 4.0]

    def boom(prompts, completions, **kw):
        raise ZeroDivisionError("division by zero")

    with pytest.raises(RewardError, match=r"'boom' raised ZeroDivisionError: division by zero \(record: prompt 'p'\)"):
        score_completions([RewardFunction("boom", boom)], ["p"], ["a"], {}, timeout=5.0)


@pytest.mark.parametrize("returned, problem", [
    (None, "returned None instead of a list of 2 floats"),
    ([float("inf"), 1.0], "returned inf for completion 0"),
    ([1.0, 2.0, 3.0], "returned 3 values for 2 completions"),
    ("11", "returned '11' instead of a list"),
])
def test_bad_return_values_are_named(returned, problem):
    rf = RewardFunction("bad", lambda prompts, completions, **kw: returned)
    with pytest.raises(RewardError, match=re.escape(f"reward function 'bad' {problem}")):
        score_completions([rf], ["p", "p"], ["a", "b"], {}, timeout=5.0)


def test_reward_errors_zero_counts_them():
    good = RewardFunction("good", lambda prompts, completions, **kw: [1.0, 1.0, 1.0])
    nan_one = RewardFunction("nan_one", lambda prompts, completions, **kw: [0.5, math.nan, None])

    def boom(prompts, completions, **kw):
        raise RuntimeError("no")

    scored = score_completions([good, nan_one, RewardFunction("boom", boom)], ["p"] * 3, ["a", "b", "c"], {},
                               on_error="zero")
    # None is TRL's "does not apply" (NaN, left out of the sum), not an error
    assert torch.equal(scored.scores.isnan(), torch.tensor([[False, False, False], [False, False, False],
                                                            [False, True, False]]))
    assert scored.scores.nan_to_num(-1).tolist() == [[1.0, 0.5, 0.0], [1.0, 0.0, 0.0], [1.0, -1.0, 0.0]]
    assert scored.errors == 1 + 3  # one bad value, then a whole call of three
    assert "'nan_one' returned nan for completion 1" in scored.first_error
