"""One test per seam of the trainer: TrainBatch, RewardScorer (batching, time limit, torch in the
worker), Actor.optimizer_step (micro-batch invariance), and the Trainer with an injected engine."""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch

from dapo import DAPOConfig
from dapo.actor import Actor
from dapo.batch import TrainBatch
from dapo.errors import RewardError
from dapo.rewards import RewardFunction
from dapo.rollout import HFEngine, Samples, SamplingParams
from dapo.scorer import RewardScorer
from dapo.tasks import Task
from dapo.trainer import Trainer


# --- TrainBatch ------------------------------------------------------------------------------------
def small_batch(groups: int = 3, g: int = 2) -> TrainBatch:
    n = groups * g
    return TrainBatch(group=torch.arange(groups).repeat_interleave(g),
                      prompt_index=torch.arange(groups).repeat_interleave(g) + 10,
                      prompt_ids=[[1, 2, k] for k in range(groups) for _ in range(g)],
                      response_ids=[[5] * (i + 1) for i in range(n)], truncated=torch.zeros(n, dtype=torch.bool),
                      completions=[str(i) for i in range(n)], scores=torch.arange(n, dtype=torch.float)[:, None],
                      task_rewards=torch.arange(n, dtype=torch.float), rewards=torch.arange(n, dtype=torch.float))


def test_train_batch_slices_are_whole_groups():
    b = small_batch(groups=5)
    shards = [b.shard(r, 2) for r in range(2)]
    assert [s.num_groups for s in shards] == [3, 2]
    assert shards[1].prompt_index.tolist() == [13, 13, 14, 14] and shards[1].group.tolist() == [0, 0, 1, 1]
    again = TrainBatch.cat(shards)
    assert again.completions == b.completions and torch.equal(again.group, b.group)
    picked = b.select_groups(torch.tensor([False, True, False, True, False]))
    assert picked.completions == ["2", "3", "6", "7"] and picked.grouped(picked.rewards).tolist() == [[2, 3], [6, 7]]
    b.truncated[1] = True
    assert b.loss_mask(True).tolist() == [True, False] + [True] * 8 and b.loss_mask(False).all()


# --- RewardScorer ----------------------------------------------------------------------------------
def test_scorer_makes_one_call_per_function_per_round_and_reuses_accuracy(tmp_path):
    calls = tmp_path / "calls"

    def counted(prompts, completions, answer, **_):
        with open(calls, "a") as f:  # the worker is another process: count through a file
            f.write(f"{len(completions)}\n")
        return [float(c == a) for c, a in zip(completions, answer)]

    records = [{"prompt": f"q{i}", "answer": str(i % 3)} for i in range(64) for _ in range(8)]
    texts = [str(j % 3) for j in range(64 * 8)]
    with RewardScorer([RewardFunction("counted", counted)], counted, timeout=10.0) as scorer:
        out = scorer.score(records, texts)
        out2 = scorer.score(records[:16], texts[:16])
    assert calls.read_text().split() == ["512", "16"]  # one call each round, accuracy reused
    expected = torch.tensor([float(str(j % 3) == str((j // 8) % 3)) for j in range(512)])
    torch.testing.assert_close(out.scores[:, 0], expected)
    torch.testing.assert_close(out.correct, expected)
    assert out2.scores.shape == (16, 1)


def _sleep_once_then_answer(prompts, completions, **_):
    if completions[0] == "slow":
        time.sleep(30)
    return [1.0] * len(completions)


def test_scorer_time_limit_replaces_the_stuck_worker():
    with RewardScorer([RewardFunction("sleepy", _sleep_once_then_answer)], timeout=0.5, on_error="zero") as scorer:
        t0 = time.perf_counter()
        out = scorer.score([{"prompt": "p"}] * 2, ["slow", "x"])
        assert time.perf_counter() - t0 < 5
        assert out.errors == 2 and "took longer than reward_timeout=0.5 s" in out.first_error
        # the killed worker is replaced: the next round is scored normally
        assert scorer.score([{"prompt": "p"}] * 2, ["a", "b"]).scores[:, 0].tolist() == [1.0, 1.0]
    with pytest.raises(RewardError, match="'sleepy' took longer than reward_timeout=0.5 s"):
        with RewardScorer([RewardFunction("sleepy", _sleep_once_then_answer)], timeout=0.5) as scorer:
            scorer.score([{"prompt": "p"}], ["slow"])


def torch_reward(prompts, completions, **_):
    """Parallel torch work in the worker: hangs in a fork of a process whose OpenMP pool ran."""
    a = torch.randn(600, 600)
    return [float((a @ a).abs().sum() > 0) + 0.0 * i for i, _ in enumerate(completions)]


def test_torch_reward_in_a_worker_after_parallel_work_here():
    torch.set_num_threads(2)
    a = torch.randn(1500, 1500)
    for _ in range(3):  # the trainer's OpenMP pool is up
        a @ a
    with RewardScorer([RewardFunction("torchy", torch_reward)], timeout=20.0) as scorer:
        t0 = time.perf_counter()
        assert scorer.score([{"prompt": "p"}] * 3, ["a", "b", "c"]).scores[:, 0].tolist() == [1.0, 1.0, 1.0]
        assert time.perf_counter() - t0 < 15


def test_torch_reward_on_the_default_run_with_two_threads(tokenizer, tiny, tmp_path):
    """The default digit run, with a torch-using reward function and threads > 1 (it deadlocked before)."""
    config = DAPOConfig(threads=2, group_size=4, max_new_tokens=2, train_steps=1, mu=1, dynamic_sampling=False,
                        eval_samples=2, verbose=False, reward_timeout=20.0, output_dir=str(tmp_path))
    result = Trainer(config, reward_fns=[torch_reward], model=tiny, tokenizer=tokenizer).fit()
    assert result.metrics[0]["reward/torch_reward"] == 1.0


# --- Actor -----------------------------------------------------------------------------------------
def test_actor_optimizer_step_does_not_depend_on_the_micro_batch_split(tokenizer, tiny):
    """One optimizer step on one mini-batch, packed as one micro-batch or as many: the same
    objective, metrics and gradient (the global denominators make the micro-batch losses add up)."""
    from test_logprobs import make_batch

    batch = make_batch(tokenizer)
    keep = batch.loss_mask(False)
    rows = list(range(len(batch)))
    results = {}
    for budget in (4096, 16):
        model = copy.deepcopy(tiny)
        config = DAPOConfig(lr=1e-2, max_tokens_per_micro_batch=budget, temperature=0.7, threads=2)
        actor = Actor(model, config, pad_id=2)
        grads = {}
        real_step = actor.optimizer.step

        def step(*args, _real=real_step, _model=model, _grads=grads, **kwargs):
            _grads.update({k: p.grad.detach().clone() for k, p in _model.named_parameters()})
            return _real(*args, **kwargs)

        actor.optimizer.step = step
        plan = actor.pack(batch, rows, keep)
        old = {r: t - 0.05 for r, t in actor.logprobs(plan).items()}
        result = actor.optimizer_step(plan, batch.advantages, old, {}, num_tokens=int(batch.lengths.sum()),
                                  num_seqs=len(batch), with_entropy=True)
        results[budget] = (len(plan), result, grads, actor.optimizer_steps)
    (n1, s1, g1, steps1), (n2, s2, g2, steps2) = results[4096], results[16]
    assert n1 == 1 and n2 > 1 and not s1.skipped and not s2.skipped and steps1 == steps2 == 1
    assert s1.objective == pytest.approx(s2.objective, abs=1e-6) and s1.grad_norm == pytest.approx(s2.grad_norm, rel=1e-4)
    assert s1.metrics["approx_kl"] == pytest.approx(s2.metrics["approx_kl"], rel=1e-5)
    assert s1.entropy_sum == pytest.approx(s2.entropy_sum, rel=1e-5)
    assert g1.keys() == g2.keys() and any(g.abs().sum() > 0 for g in g1.values())
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-6, rtol=1e-4)


# --- engine injection -------------------------------------------------------------------------------
class CountingEngine(HFEngine):
    """The HF engine, counting calls and weight syncs (a stand-in for an engine of another process)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generated, self.synced = 0, 0

    def generate(self, prompt_ids, n, sampling: SamplingParams) -> list[Samples]:
        self.generated += 1
        return super().generate(prompt_ids, n, sampling)

    def sync_weights(self, model):
        self.synced += 1
        super().sync_weights(model)


def test_trainer_uses_the_injected_engine_and_syncs_after_each_step(tokenizer, tiny, tmp_path):
    task = Task("say", [{"prompt": "Say a word."}], [{"prompt": "Say a word."}],
                {"len3": lambda prompts, completions, **_: [float(len(c) % 3) for c in completions]},
                lambda prompts, completions, **_: [float(len(c) % 2) for c in completions])
    engine = CountingEngine(tiny, tokenizer.pad_token_id)
    config = DAPOConfig(group_size=4, max_new_tokens=3, train_steps=2, mu=1, dynamic_sampling=False, threads=1,
                        eval_samples=2, verbose=False, output_dir=str(tmp_path))
    result = Trainer(config, task=task, model=tiny, tokenizer=tokenizer, engine=engine).fit()
    assert engine.synced == 2 and engine.generated == 2 + 2  # 2 rollouts, evaluation before and after
    assert result.steps == 2 and "avg@2" in result.eval_after
    assert os.path.isdir(result.checkpoint)
