"""LoRA (--lora-rank): the merged export and the adapter-off reference by hand, only adapters
train, checkpoints load with from_pretrained and with peft, resume is exact, and (slow) a LoRA
run learns the digit task on the real model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dapo import DAPOConfig
from dapo.checkpoint import list_checkpoints, verify_checkpoint
from dapo.errors import ConfigError, TrainingInterrupted
from dapo.lora import ADAPTER_DIR, adapters_disabled, apply_lora, lora_layers, merged_state_dict
from dapo.resume import find_checkpoint
from dapo.trainer import Trainer
from toy_run import TOY_OPTIONS, tiny_model, toy_task

LORA = dict(lora_rank=4, lora_alpha=8.0, lr=1e-2)


def lora_run(model_dir: Path, out: Path, **changes) -> Trainer:
    config = DAPOConfig(**{**TOY_OPTIONS, **LORA, "model": str(model_dir), "output_dir": str(out), **changes})
    return Trainer(config, task=toy_task())


def params(run: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def test_merged_weights_are_w_plus_scaled_ba_and_disabled_adapters_give_the_base(tokenizer):
    model = tiny_model(len(tokenizer), seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=2, alpha=6.0, target_modules=["q_proj", "down_proj"])
    names = [n for n, _ in lora_layers(model)]
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    torch.manual_seed(1)
    for _, layer in lora_layers(model):  # B starts at zero (the adapter is the identity); move it
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    merged = merged_state_dict(model)
    assert merged.keys() == base.keys()  # plain Hugging Face names, nothing added or lost
    layer = dict(lora_layers(model))["model.layers.1.mlp.down_proj"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = base["model.layers.1.mlp.down_proj.weight"] + (6.0 / 2) * b @ a  # W + alpha / r * B A
    torch.testing.assert_close(merged["model.layers.1.mlp.down_proj.weight"], expected, rtol=0, atol=1e-6)
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])

    ids = torch.randint(0, len(tokenizer), (2, 9))
    plain = tiny_model(len(tokenizer), seed=0)
    with torch.no_grad():
        with adapters_disabled(model):
            assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
        adapted = model(input_ids=ids).logits
        plain.load_state_dict(merged)
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted, rtol=0, atol=1e-5)


def test_lora_trains_only_adapters_and_checkpoints_load_merged_and_as_peft(tiny_dir, tmp_path):
    from peft import PeftModel

    run = lora_run(tiny_dir, tmp_path, train_steps=2)
    before = params(run)
    run.fit()
    after = params(run)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".lora_B." in k or ".lora_A." in k for k in moved)  # the base stayed bit-identical
    assert len(run.actor.optimizer.param_groups[0]["params"]) == 2 * 7 * 2  # A and B of 7 linears x 2 layers

    ckpt = list_checkpoints(tmp_path)[-1]
    assert verify_checkpoint(ckpt) is None
    assert (ckpt / ADAPTER_DIR / "adapter_config.json").is_file()
    ids = torch.tensor([[1, 500, 900, 17, 3]])
    with torch.no_grad():
        live = run.model(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(ckpt)  # no peft needed to load the export
        torch.testing.assert_close(merged(input_ids=ids).logits, live, rtol=0, atol=1e-5)
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), ckpt / ADAPTER_DIR)
        torch.testing.assert_close(adapter(input_ids=ids).logits, live, rtol=0, atol=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_lora_sigterm_then_resume_equals_uninterrupted_run(tiny_dir, tmp_path, monkeypatch):
    reference = lora_run(tiny_dir, tmp_path / "reference")
    reference.fit()
    monkeypatch.setenv("TOY_SIGNAL_AT_CALLS", "4")  # lands in step 2
    interrupted = lora_run(tiny_dir, tmp_path / "run")
    with pytest.raises(TrainingInterrupted, match="Interrupted at step 2"):
        interrupted.fit()
    monkeypatch.delenv("TOY_SIGNAL_AT_CALLS")
    resumed = lora_run(tiny_dir, tmp_path / "run")
    resumed.restore(find_checkpoint(tmp_path / "run"))
    resumed.fit()
    want, got = params(reference), params(resumed)
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert resumed.actor.optimizer_steps == reference.actor.optimizer_steps == 4 * 2 * 2


def test_lora_kl_reference_is_the_model_with_adapters_off(tiny_dir, tmp_path):
    run = lora_run(tiny_dir, tmp_path, train_steps=2, kl_coef=0.1, mu=1, mini_batch_size=2)
    assert run.actor.ref_model is run.model  # no second copy of the weights
    run.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # B starts at zero, so step 1's only optimizer step sees policy == base: KL exactly 0. After
    # it the adapter has moved away from the base.
    assert rows[0]["kl_ref"] == 0.0
    assert rows[1]["kl_ref"] > 1e-6


def test_lora_config_is_checked(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="lora_rank must be >= 0"):
        DAPOConfig(lora_rank=-1)
    with pytest.raises(ConfigError, match="lora_alpha must be > 0"):
        DAPOConfig(lora_rank=4, lora_alpha=0)
    with pytest.raises(ConfigError, match="lora_target_modules"):
        lora_run(tiny_dir, tmp_path, lora_target_modules=["no_such_proj"])
    with pytest.raises(ConfigError, match="lm_head is tied"):
        lora_run(tiny_dir, tmp_path / "tied", lora_target_modules=["q_proj", "lm_head"])


@pytest.mark.slow
def test_lora_learns_the_digit_task(tmp_path):
    """The seed example with rank-16 adapters instead of full fine-tuning, as the README runs it."""
    out = subprocess.run([sys.executable, "-m", "dapo", "train", "--lora-rank", "16", "--lr", "3e-4",
                          "--output-dir", str(tmp_path / "run"), "--no-verbose"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.search(r'exactly "5" ([\d.]+) before training, ([\d.]+) after', out.stdout)
    assert match, out.stdout[-2000:]
    assert float(match.group(1)) < 0.2 and float(match.group(2)) >= 0.8, out.stdout[-2000:]
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    assert (ckpt / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert (ckpt / ADAPTER_DIR / "adapter_model.safetensors").stat().st_size < 20e6  # adapters, not the model
