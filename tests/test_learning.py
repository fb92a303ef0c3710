"""A fast learning test: a tiny random model (real tokenizer) learns to start its answer with a vowel."""

import torch

from dapo import DAPOConfig
from dapo.data import encode_prompt
from dapo.tasks import Task
from dapo.trainer import Run


def vowel_reward(prompts, completions, **_):
    return [1.0 if c.strip()[:1].lower() in ("a", "e", "i", "o", "u") and c.strip() else 0.0 for c in completions]


def vowel_mass(model, tokenizer, prompt_ids) -> float:
    """Exact probability that the first sampled token decodes to text starting with a vowel."""
    vocab = [tokenizer.decode([i]).strip()[:1].lower() for i in range(len(tokenizer))]
    good = torch.tensor([v in ("a", "e", "i", "o", "u") for v in vocab])
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1]
    return float(torch.softmax(logits, -1)[good].sum())


def test_tiny_model_learns_rewarded_answer(tokenizer, tiny, tmp_path):
    task = Task("vowel", [{"prompt": "Say a word."}], [], {"vowel": vowel_reward})
    config = DAPOConfig(group_size=16, max_new_tokens=1, train_steps=8, mu=2, lr=3e-3, verbose=False,
                        output_dir=str(tmp_path), threads=2)
    run = Run(config, task=task, model=tiny, tokenizer=tokenizer)
    prompt_ids = encode_prompt(tokenizer, "Say a word.", None, 1024)
    before = vowel_mass(tiny, tokenizer, prompt_ids)
    result = run.train()
    after = vowel_mass(tiny, tokenizer, prompt_ids)
    assert after > before + 0.3, (before, after)
    rewards = [m["batch_reward_mean"] for m in result.metrics]
    assert rewards[-1] > rewards[0]
    # every step logged the metrics the issue lists
    for key in ("reward_mean", "response_length_mean", "truncated_share", "groups_kept", "gen_rounds",
                "clip_frac_low", "clip_frac_high", "approx_kl", "entropy", "grad_norm", "lr",
                "gen_seconds", "train_seconds", "gen_tokens_per_second", "train_tokens_per_second"):
        assert key in result.metrics[-1], key
    # the checkpoint is a Hugging Face model directory
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert abs(vowel_mass(reloaded, tokenizer, prompt_ids) - after) < 1e-5
    assert (result.checkpoint / "dapo_config.yaml").is_file()


def test_first_grad_step_sees_ratio_one(tokenizer, tiny, tmp_path):
    """Old log-probs are computed the way the loss computes them: no clipping, zero KL at step 1."""
    task = Task("vowel", [{"prompt": "Say a word."}], [], {"vowel": vowel_reward})
    config = DAPOConfig(group_size=8, max_new_tokens=3, train_steps=1, mu=1, temperature=0.7, verbose=False,
                        output_dir=str(tmp_path), dynamic_sampling=False, threads=2)
    result = Run(config, task=task, model=tiny, tokenizer=tokenizer).train()
    m = result.metrics[0]
    assert m["approx_kl"] == 0.0 and m["clip_frac_low"] == 0.0 and m["clip_frac_high"] == 0.0
