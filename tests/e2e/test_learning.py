"""A fast learning test: a tiny random model (real tokenizer) learns to start its answer with a vowel."""

import torch

from dapo import DAPOConfig, group_advantages
from dapo.tasks import Task
from dapo.trainer import Trainer


def vowel_reward(prompts, completions, **_):
    return [1.0 if c.strip()[:1].lower() in ("a", "e", "i", "o", "u") and c.strip() else 0.0 for c in completions]


def sequence_logprobs(run: Trainer, batch) -> dict:
    lps = run.actor.logprobs(run.actor.pack(batch, list(range(len(batch))), batch.loss_mask(False)))
    return {row: float(v.sum()) for row, v in lps.items()}


def test_rewarded_answers_become_more_likely(tokenizer, tiny, tmp_path):
    """One DAPO update raises log pi of every response with positive advantage and lowers it for every
    response with negative advantage (a random 49k-token policy cannot move much mass in a few steps,
    so we test the sampled answers themselves)."""
    task = Task("vowel", [{"prompt": "Say a word."}], [], {"vowel": vowel_reward})
    config = DAPOConfig(group_size=16, max_new_tokens=2, train_steps=1, mu=4, lr=1e-3, verbose=False,
                        output_dir=str(tmp_path), threads=2)
    run = Trainer(config, task=task, model=tiny, tokenizer=tokenizer)
    batch, _ = run.collector.collect(1)
    batch.advantages = group_advantages(batch.grouped(batch.rewards)).flatten()
    before = sequence_logprobs(run, batch)
    run.actor.update(batch)
    after = sequence_logprobs(run, batch)
    adv = batch.advantages
    assert (adv > 0).any() and (adv < 0).any()
    for ri, a in enumerate(adv.tolist()):
        change = after[ri] - before[ri]
        assert change > 0 if a > 0 else change < 0, (ri, a, change)


def test_training_run_improves_reward_and_writes_a_checkpoint(tokenizer, tiny, tmp_path):
    task = Task("vowel", [{"prompt": "Say a word."}], [], {"vowel": vowel_reward})
    config = DAPOConfig(group_size=16, max_new_tokens=1, train_steps=6, mu=2, lr=1e-3, verbose=False,
                        output_dir=str(tmp_path), threads=2)
    result = Trainer(config, task=task, model=tiny, tokenizer=tokenizer).fit()
    assert len(result.metrics) == 6
    # every step logged the metrics the issue lists
    for key in ("reward_mean", "response_length_mean", "truncated_share", "groups_kept", "gen_rounds",
                "clip_frac_low", "clip_frac_high", "approx_kl", "entropy", "grad_norm", "lr",
                "gen_seconds", "train_seconds", "gen_tokens_per_second", "train_tokens_per_second"):
        assert key in result.metrics[-1], key
    # the checkpoint is a Hugging Face model directory holding the trained weights
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    for (name, p), q in zip(tiny.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(p, q), name
    assert (result.checkpoint / "dapo_config.yaml").is_file()


def test_first_grad_step_sees_ratio_one(tokenizer, tiny, tmp_path):
    """Old log-probs are computed the way the loss computes them: no clipping, zero KL at step 1."""
    task = Task("vowel", [{"prompt": "Say a word."}], [], {"vowel": vowel_reward})
    config = DAPOConfig(group_size=8, max_new_tokens=3, train_steps=1, mu=1, temperature=0.7, verbose=False,
                        output_dir=str(tmp_path), dynamic_sampling=False, threads=2)
    result = Trainer(config, task=task, model=tiny, tokenizer=tokenizer).fit()
    m = result.metrics[0]
    assert m["approx_kl"] == 0.0 and m["clip_frac_low"] == 0.0 and m["clip_frac_high"] == 0.0
