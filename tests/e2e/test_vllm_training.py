"""Training with --rollout-engine vllm (CPU, fp32): two steps on the default model, the engine's
weights synced after each step, and the train-inference mismatch of fp32 below 1e-3; and `dapo eval
--rollout-engine vllm` end to end. Runs in the vLLM virtualenv (.ci/vllm.sh); skipped where vLLM
is not installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

from dapo import DAPOConfig
from dapo.engines import SamplingParams, make_engine
from dapo.models import load_model, load_tokenizer
from dapo.trainer import Trainer


def length_reward(prompts, completions, **_):
    return [float(len(c)) / 20.0 for c in completions]


def sampled_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


@pytest.mark.parametrize("lora_rank", [0, 8], ids=["full", "lora"])
def test_two_vllm_steps_sync_weights_and_match_the_trainer(tmp_path, lora_rank):
    """With LoRA the engine gets the merged weights (W + B A * alpha / r) after every step."""
    torch.set_num_threads(1)
    config = DAPOConfig(rollout_engine="vllm", vllm_kv_cache_gb=1.0, train_steps=2, group_size=8, mu=1,
                        max_new_tokens=8, lr=5e-3 if lora_rank else 5e-4, lora_rank=lora_rank,
                        dynamic_sampling=False, threads=1, eval_samples=2,
                        verbose=False, output_dir=str(tmp_path / "run"))
    tokenizer = load_tokenizer("default")
    model = load_model("default")
    base = load_model("default").eval()
    engine = make_engine(config, model, tokenizer.pad_token_id)
    try:
        trainer = Trainer(config, reward_fns=[length_reward], model=model, tokenizer=tokenizer, engine=engine)
        result = trainer.fit()
        assert result.steps == 2 and config.correction == "tis"
        for row in result.metrics:  # fp32 on CPU: the engine's log-probs are the trainer's
            assert row["mismatch_kl"] < 1e-3 and row["mismatch_max_abs"] < 1e-2, row
        # After the last update, the engine samples from the trained weights, not the base ones.
        prompt = trainer.parts.prompt_ids[0]
        samples = engine.generate([prompt], 4, SamplingParams(8, 1.0, 1.0, tuple(trainer.parts.stop_ids)))[0]
        model.eval()
        moved = 0.0
        for response, engine_lp in zip(samples.response_ids, samples.logprobs):
            trained = sampled_logprobs(model, prompt, response)
            torch.testing.assert_close(torch.tensor(engine_lp), trained, atol=1e-3, rtol=0)
            moved = max(moved, float((trained - sampled_logprobs(base, prompt, response)).abs().max()))
        assert moved > 1e-2  # the update moved these log-probs far more than the engine's tolerance
    finally:
        engine.close()


def test_eval_cli_closes_the_engine_and_keeps_vllm_logs_off_the_console():
    """`dapo eval --rollout-engine vllm` closes its engine before exit: left to vLLM's finalizer at
    interpreter exit, its shutdown raised "Invalid process group specified" (a traceback after the
    results, exit code 0). vLLM's start-up INFO/WARNING records stay off stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOGGING")}  # the CLI's own defaults
    run = subprocess.run([sys.executable, "-m", "dapo.cli", "eval", "--rollout-engine", "vllm", "--eval-samples", "2",
                          "--max-eval-prompts", "2", "--vllm-kv-cache-gb", "0.25"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^all\s+\d+\s", run.stdout, re.M), run.stdout  # the results table
    assert not re.search(r"Traceback|Error", run.stderr), run.stderr[-3000:]
    assert not re.search(r"\b(INFO|WARNING)\b", run.stdout), run.stdout


def test_vllm_in_the_generator_process_of_asynchronous_rollouts(tmp_path):
    """max_staleness 1 with --rollout-engine vllm: the generator process builds its own vLLM engine
    and loads the published weights into it; the second step trains on a round sampled one version
    back, corrected by the sampler's log-probs."""
    config = DAPOConfig(rollout_engine="vllm", vllm_kv_cache_gb=1.0, train_steps=3, group_size=8, mu=1,
                        max_new_tokens=8, lr=5e-4, dynamic_sampling=False, max_staleness=1, threads=2,
                        eval_before=False, eval_samples=2, save_every=0, verbose=False,
                        output_dir=str(tmp_path / "run"))
    result = Trainer(config, reward_fns=[length_reward]).fit()
    assert result.steps == 3
    assert [row["staleness_max"] for row in result.metrics] == [0, 1, 1]
    assert result.metrics[-1]["weight_load_seconds"] > 0  # version 1 reached the generator's vLLM engine
    assert all(row["stale_kl"] >= 0 and 0 < row["rollout_is_weight"] <= config.rollout_is_cap for row in result.metrics)
