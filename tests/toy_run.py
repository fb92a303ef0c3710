"""A toy task for resume tests: several prompts and a reward that a tiny random model gets with
varying scores, so dynamic sampling keeps groups and every optimizer step moves the weights.

Run as a script it is `dapo` with this task in place of the built-in one (this branch's CLI has
no way to name a reward function), and with one fault to inject:
    TOY_SIGNAL_AT_CALLS=N[,M]  the process sends itself TOY_SIGNAL (default SIGTERM) when the
                               reward function scores the N-th (and M-th) group, i.e. in the
                               middle of a train step.
    TOY_SIGNAL_RANK=R          under torchrun, only rank R injects that signal.
    TOY_ENGINE=fixed           responses are a fixed function of the prompt (FixedEngine), so runs
                               with different numbers of ranks train on identical batches.
    TOY_KILL_WRITING_CHECKPOINT=N  SIGKILL while checkpoint N is half written.
    TOY_EVAL_RAISES_AT=N       the task has held-out prompts, and its accuracy function raises on
                               them from train step N on (an error in rank 0's evaluation).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dapo.engines import RolloutEngine, Samples
from dapo.tasks import Task

TESTS = Path(__file__).resolve().parent  # tests/: unit/ and e2e/ below it, this kit and fixtures/ in it
REPO = TESTS.parent

PROMPTS = [{"prompt": f"Say a word that starts with letter {c}."} for c in "abcde"]


def toy_task(name: str = "toy") -> Task:
    # Reward functions run in a forked worker process (for their time limit): count the groups
    # scored in shared memory and signal the trainer's process, not the worker.
    scored = mp.get_context("fork").Value("i", 0)
    trainer_pid = os.getpid()

    def length_reward(prompts, completions, **_):
        """Characters mod 3: differs within almost every group of a random model's answers."""
        groups = sum(1 for i in range(len(prompts)) if i == 0 or prompts[i] != prompts[i - 1])
        with scored.get_lock():
            first, scored.value = scored.value + 1, scored.value + groups
        targets = os.environ.get("TOY_SIGNAL_AT_CALLS", "").split(",")
        if os.environ.get("TOY_SIGNAL_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
            targets = []
        for n in range(first, first + groups):
            if str(n) in targets:
                os.kill(trainer_pid, signal.Signals[os.environ.get("TOY_SIGNAL", "SIGTERM")])
                time.sleep(0.5)  # two signals sent at once would merge into one
        return [float(len(c) % 3) for c in completions]

    if not os.environ.get("TOY_EVAL_RAISES_AT"):
        return Task("toy", PROMPTS, [], {"length": length_reward})

    def judge(prompts, completions, trainer_state, **_):
        """Correct at 2 characters mod 3 on training prompts; raises on held-out ones once the run
        has trained TOY_EVAL_RAISES_AT steps."""
        if trainer_state.global_step >= int(os.environ["TOY_EVAL_RAISES_AT"]) and any("digit" in p for p in prompts):
            raise ValueError("the held-out judge broke")
        return [float(len(c) % 3 == 2) for c in completions]

    held_out = [{"prompt": f"Say a word that starts with digit {d}."} for d in "12"]
    return Task("toy", PROMPTS, held_out, {"length": length_reward, "judge": judge}, judge, "judge")


# Options shared by every resume test: fixed rounds of gen_batch_size > train_batch_size with surplus
# 'carry' leave groups in the dynamic-sampling buffer across steps (tests/unit/test_dynamic_sampling.py resumes the
# default streaming refill); two mini-batches, mu 2, warm-up and a cosine schedule
# exercise the optimizer and scheduler state.
TOY_OPTIONS = dict(group_size=4, max_new_tokens=3, train_batch_size=2, gen_batch_size=3, mini_batch_size=1, mu=2,
                   lr=1e-3, warmup_steps=2, lr_schedule="cosine", train_steps=4, threads=1, verbose=False,
                   eval_samples=2, refill="rounds", surplus="carry")


class FixedEngine(RolloutEngine):
    """A rollout engine whose G responses depend only on the prompt: 1 to 3 tokens then a stop
    token, so the toy reward (characters mod 3) differs within a group."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def generate(self, prompt_ids, n, sampling):
        out = []
        for p in prompt_ids:
            base = sum(p) * 7
            responses = [[200 + (base + 13 * j + 5 * k) % 300 for k in range(1 + j % 3)] + [sampling.stop_token_ids[0]]
                         for j in range(n)]
            out.append(Samples(responses, [False] * n))
        return out

    def sync_weights(self, model) -> None:
        pass


def tiny_model(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64) -> torch.nn.Module:
    """A randomly initialised Llama with the given vocabulary, for fast tests and examples."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg)


def save_tiny_model(path: Path, tokenizer: Any) -> Path:
    """The tiny random Llama (real tokenizer) as a Hugging Face directory, for `--model DIR`."""
    tiny_model(len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    """`dapo train` argv on the tiny model: the digit task, one short step."""
    return ["train", "--model", str(tiny_dir), "--output-dir", str(out), "--threads", "1", "--no-verbose",
            "--group-size", "2", "--max-new-tokens", "2", "--mu", "1", "--train-steps", "1", "--eval-samples", "1",
            "--no-dynamic-sampling", *extra]


def fails_with(argv: list[str], capsys: Any, message: str) -> str:
    """`dapo ARGV` exits 2 with one `dapo: error:` line holding `message` and no traceback."""
    from dapo.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    # (transformers' own progress bars may share stderr; ours is the one "dapo: error" line)
    assert "Traceback" not in err and len([line for line in err.splitlines() if "dapo: error" in line]) == 1, err
    return err


def toy_argv() -> list[str]:
    out = []
    for k, v in TOY_OPTIONS.items():
        flag = "--" + k.replace("_", "-")
        out += ([flag] if v is True else [f"--no-{flag[2:]}"] if v is False else [flag, str(v)])
    return out


def kill_while_writing_checkpoint(step: int) -> None:
    """SIGKILL this process while it writes checkpoint `step`: after its weights and tokenizer,
    before its config, trainer state and COMPLETE marker (the fault the resume tests survive)."""
    from dapo.config import DAPOConfig

    real = DAPOConfig.to_yaml

    def to_yaml(self, path):
        if Path(path).parent.name.startswith(f".tmp-step-{step:06d}-"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, path)

    DAPOConfig.to_yaml = to_yaml


if __name__ == "__main__":
    import dapo.build
    from dapo.cli import main

    dapo.build.build_task = lambda config, **_: toy_task(config.task)
    if os.environ.get("TOY_ENGINE") == "fixed":
        dapo.build.make_engine = lambda config, model, pad_id: FixedEngine()
    if os.environ.get("TOY_KILL_WRITING_CHECKPOINT"):
        kill_while_writing_checkpoint(int(os.environ["TOY_KILL_WRITING_CHECKPOINT"]))
    sys.exit(main(sys.argv[1:]))
