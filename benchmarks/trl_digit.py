"""Reference benchmark: TRL's GRPOTrainer configured as DAPO on the "think of a digit" task.

Measures how much training wall time (evaluation excluded) TRL needs to teach
SmolLM2-135M-Instruct, on CPU, to answer "5" to a single fixed prompt. After every
optimizer step a callback samples 32 answers at temperature 1 and stops training as
soon as at least 80% of them are exactly "5", or once --max-seconds of training time
have passed. Run it inside the TRL virtualenv (see benchmarks/trl_requirements.txt):

    python benchmarks/trl_digit.py --model ~/.cache/dapo/SmolLM2-135M-Instruct --seed 0 --out trl.json

(benchmarks/digit_time_to_learn.py runs it for you, next to dapo.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase,
                          TrainerCallback, TrainerControl, TrainerState, TrainingArguments, set_seed)
from trl import GRPOConfig, GRPOTrainer

PROMPT = "What number between 0 and 9 am I thinking of right now? You MUST ONLY answer with a single integer."
MESSAGES = [{"role": "user", "content": PROMPT}]
TARGET, EVAL_SAMPLES, STOP_SHARE = "5", 32, 0.8


def digit_reward(completions: list[list[dict[str, str]]], **_: Any) -> list[float]:
    """1 - |digit - 5| / 9 when the stripped answer is exactly one digit, else 0."""
    rewards = []
    for completion in completions:
        text = completion[0]["content"].strip()
        rewards.append(1.0 - abs(int(text) - 5) / 9.0 if len(text) == 1 and text.isdigit() else 0.0)
    return rewards


class StopAtShare(TrainerCallback):
    """Samples the current policy after every optimizer step; stops at the target share or the time limit."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_seconds: float) -> None:
        self.tokenizer, self.max_seconds = tokenizer, max_seconds
        self.prompt_ids = tokenizer.apply_chat_template(
            MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        self.start = 0.0
        self.eval_seconds = 0.0
        self.step_times: list[float] = []  # training seconds at the end of each step
        self.reached = False

    def train_seconds(self) -> float:
        return time.perf_counter() - self.start - self.eval_seconds

    def share(self, model: PreTrainedModel) -> float:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model.generate(
                self.prompt_ids.repeat(EVAL_SAMPLES, 1), attention_mask=torch.ones_like(
                    self.prompt_ids.repeat(EVAL_SAMPLES, 1)), do_sample=True, temperature=1.0, top_p=1.0,
                top_k=0, max_new_tokens=4, pad_token_id=self.tokenizer.pad_token_id)
        model.train(was_training)
        texts = self.tokenizer.batch_decode(out[:, self.prompt_ids.shape[1]:], skip_special_tokens=True)
        return sum(t.strip() == TARGET for t in texts) / len(texts)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.start = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: PreTrainedModel | None = None, **kwargs: Any) -> None:
        train_s = self.train_seconds()
        self.step_times.append(train_s)
        eval_start = time.perf_counter()
        share = self.share(model)
        self.eval_seconds += time.perf_counter() - eval_start
        print(f"step {state.global_step} train_s {train_s:.3f} share {share:.4f}", flush=True)
        if share >= STOP_SHARE:
            self.reached = True
            control.should_training_stop = True
        elif train_s > self.max_seconds:
            control.should_training_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local HF-format model directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--out", default=None, help="where to write the result JSON")
    args = parser.parse_args()

    torch.set_num_threads(2)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = Dataset.from_dict({"prompt": [MESSAGES] * 10_000})
    config = GRPOConfig(
        output_dir="/tmp/trl_digit_out",
        loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0,
        num_generations=8, per_device_train_batch_size=8, steps_per_generation=1,  # one group of 8 per step
        gradient_accumulation_steps=1, num_iterations=1,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
        max_completion_length=4, temperature=1.0, top_p=1.0, top_k=0,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
        seed=args.seed, data_seed=args.seed, num_train_epochs=1,
    )
    callback = StopAtShare(tokenizer, args.max_seconds)
    trainer = GRPOTrainer(model=model, reward_funcs=digit_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[callback])
    trainer.train()

    times = callback.step_times
    durations = [b - a for a, b in zip([0.0] + times[:-1], times)]
    result = {
        "seed": args.seed,
        "reached": callback.reached,
        "steps": len(times),
        "train_seconds": round(times[-1], 3) if times else 0.0,
        "median_step_seconds": round(statistics.median(durations), 3) if durations else 0.0,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
