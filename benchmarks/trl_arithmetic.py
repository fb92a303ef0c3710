"""Reference benchmark: TRL's GRPOTrainer configured as DAPO (without dynamic sampling) on the arithmetic task.

The counterpart of benchmarks/trl_digit.py for the built-in "arithmetic" task: how much training
time (evaluation excluded) TRL needs, on CPU with one thread, until the held-out avg@8 (8 samples
per held-out sum at temperature 1, correct = dapo's numeric reward scores it >= 1) reaches 0.8.
A callback evaluates before training and every --eval-every optimizer steps, stops as soon as
avg@8 >= 0.8 or once --max-seconds of training time have passed, and writes a JSON result: reached,
training seconds at the first evaluation that reached the bar, steps, and the avg@8 curve.

Everything that must be the same as on the dapo side comes from a task file that dapo writes
(`python benchmarks/arithmetic_time_to_learn.py --export-task task.json`, run with dapo's venv):
the train and held-out records as dapo builds them (`dapo.tasks.build_task` on
configs/arithmetic.yaml), their chat messages and dapo's prompt token ids (checked here against
this tokenizer's), dapo's stop tokens, dapo's numeric-reward scores on probe completions (checked
against dapo.rewards imported from src/ here), and the resolved dapo config, from which the TRL settings are derived:

    dapo (configs/arithmetic.yaml)                 TRL GRPOConfig
    group_size 8                                   num_generations 8
    train_batch_size 8 groups per train step       generation_batch_size 64 = 8 prompts x 8 per generation
    mini_batch_size 4 groups (2 optimizer steps)   per_device_train_batch_size 32, steps_per_generation 2,
                                                   gradient_accumulation_steps 1 (one optimizer step per 32)
    mu 1                                           num_iterations 1
    eps_low 0.2 / eps_high 0.28, kl_coef 0         epsilon 0.2 / epsilon_high 0.28, beta 0
    loss_agg token-mean, normalize_std             loss_type "dapo", scale_rewards "group"
    lr 2e-5, warmup 4 optimizer steps, constant    the same AdamW and schedule, passed in (see make_optimizer)
    max_new_tokens 12, temperature 1, top_p 1      max_completion_length 12, temperature 1, top_p 1, top_k 0

Run it inside the TRL virtualenv, which does not have dapo (torch first, from the local CPU wheel):

    python3 -m venv .bench-venv-trl && .bench-venv-trl/bin/pip install torch==2.13.0 \\
        && .bench-venv-trl/bin/pip install -r benchmarks/trl_requirements.txt
    .venv/bin/python benchmarks/arithmetic_time_to_learn.py --export-task task.json   # dapo's side
    .bench-venv-trl/bin/python benchmarks/trl_arithmetic.py --task-file task.json \\
        --model ~/.cache/dapo/SmolLM2-135M-Instruct --seed 0 --out trl.json

(`benchmarks/arithmetic_time_to_learn.py --compare trl` writes the task file and runs this next to
dapo.) For a smoke test: --max-eval-prompts 4 --max-steps 2 --eval-every 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel,
                          PreTrainedTokenizerBase, TrainerCallback, TrainerControl, TrainerState, TrainingArguments,
                          set_seed)
from trl import GRPOConfig, GRPOTrainer

BAR = 0.8


# --- the reward: dapo's own numeric reward ------------------------------------------------------------
# The arithmetic task's reward and accuracy function (src/dapo/tasks.py: arithmetic_task). The TRL
# virtualenv does not install dapo, but dapo.rewards needs nothing it lacks, so it is imported from
# this checkout's src/; its signature is TRL's (prompts, completions, **columns). `check_reward`
# still compares it with the scores dapo's venv wrote into the task file.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from dapo.rewards import numeric_reward  # noqa: E402


def check_reward(probes: list[dict[str, Any]]) -> None:
    """Here numeric_reward must score the probe completions exactly as in dapo's venv."""
    got = numeric_reward([""] * len(probes), [p["completion"] for p in probes], answer=[p["answer"] for p in probes])
    bad = [(p, g) for p, g in zip(probes, got) if g != p["score"]]
    if bad:
        raise SystemExit(f"numeric_reward here disagrees with dapo's on {len(bad)} probes, e.g. {bad[0]}")


# --- TRL settings from dapo's config ----------------------------------------------------------------

def grpo_settings(c: dict[str, Any]) -> dict[str, Any]:
    """GRPOConfig keywords equivalent to dapo's resolved config `c`; refuses what TRL cannot mirror."""
    unsupported = {
        "loss_agg": (c["loss_agg"], "token-mean"),      # TRL's "dapo" loss is the token-level mean
        "clip_ratio_c": (c["clip_ratio_c"], None),      # no dual clip in TRL's "dapo" loss
        "overlong_buffer_len": (c["overlong_buffer_len"], 0),
        "lr_schedule": (c["lr_schedule"], "constant"),  # make_optimizer implements warm-up + constant only
        "dtype": (c["dtype"], "float32"),
    }
    for name, (value, needed) in unsupported.items():
        if value != needed:
            raise SystemExit(f"trl_arithmetic.py mirrors only {name}={needed!r}; the task file has {value!r}")
    groups_per_step = c["train_batch_size"]
    groups_per_opt_step = c["mini_batch_size"] or groups_per_step
    if groups_per_step % groups_per_opt_step:
        raise SystemExit("train_batch_size must be a multiple of mini_batch_size to map onto TRL's batches")
    return dict(
        num_generations=c["group_size"],
        # One optimizer step per dapo mini-batch (mini_batch_size groups), several per generation of
        # train_batch_size prompts: TRL generates per_device_train_batch_size * steps_per_generation
        # completions at once and takes one optimizer step per slice (gradient_accumulation_steps 1).
        per_device_train_batch_size=groups_per_opt_step * c["group_size"],
        steps_per_generation=groups_per_step // groups_per_opt_step,
        gradient_accumulation_steps=1,
        num_iterations=c["mu"],
        loss_type="dapo", epsilon=c["eps_low"], epsilon_high=c["eps_high"], beta=c["kl_coef"],
        scale_rewards="group" if c["normalize_std"] else "none",
        mask_truncated_completions=c["overlong_filter"],
        max_grad_norm=c["max_grad_norm"],
        max_completion_length=c["max_new_tokens"],
        temperature=c["temperature"], top_p=c["top_p"], top_k=0,  # top_k 0: no top-k cut, as dapo's sampler
        learning_rate=c["lr"], weight_decay=c["weight_decay"],
        adam_beta1=c["adam_betas"][0], adam_beta2=c["adam_betas"][1],
    )


def make_optimizer(model: torch.nn.Module, c: dict[str, Any]) -> tuple[torch.optim.Optimizer,
                                                                        torch.optim.lr_scheduler.LambdaLR]:
    """The AdamW TRL would build (fused, as transformers' default optim on torch >= 2.8), with dapo's schedule.

    Passed to GRPOTrainer because transformers' constant_with_warmup gives the first optimizer step
    lr 0 (step / warmup), while dapo's warm-up gives step s (from 0) lr * (s + 1) / warmup_steps
    (src/dapo/actor.py: lr_lambda); with 4 warm-up steps TRL would otherwise lag one step behind.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=c["lr"], betas=tuple(c["adam_betas"]),
                                  weight_decay=c["weight_decay"], fused=True)
    warmup = c["warmup_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warmup if warmup and step < warmup else 1.0)
    return optimizer, scheduler


# --- evaluation -------------------------------------------------------------------------------------

class HeldOut:
    """avg@k and pass@k on the held-out prompts, as dapo's evaluate() computes them.

    k samples per prompt at the eval temperature / top_p, at most max_new_tokens each, stopping at
    dapo's stop tokens; a sample is correct when numeric_reward scores it >= 1.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]], c: dict[str, Any],
                 stop_ids: list[int], rows_per_call: int = 64) -> None:
        self.tokenizer, self.records, self.stop_ids = tokenizer, records, stop_ids
        self.k = 1 if c["eval_temperature"] == 0 else c["eval_samples"]
        self.rows_per_call = max(rows_per_call // self.k, 1)  # prompts per generate call
        self.generation = GenerationConfig(
            do_sample=c["eval_temperature"] > 0, temperature=c["eval_temperature"] or 1.0, top_p=c["eval_top_p"],
            top_k=0, max_new_tokens=c["max_new_tokens"], eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)

    @torch.no_grad()
    def __call__(self, model: PreTrainedModel) -> dict[str, float]:
        was_training = model.training
        model.eval()
        correct: list[int] = []
        lengths: list[int] = []
        # Like dapo's evaluate (trainer.py forks the RNG around it): evaluating must not change the
        # samples training draws next.
        with torch.random.fork_rng(devices=[]):
            for start in range(0, len(self.records), self.rows_per_call):
                chunk = self.records[start:start + self.rows_per_call]
                ids = [r["prompt_ids"] for r in chunk for _ in range(self.k)]
                width = max(map(len, ids))
                pad = self.tokenizer.pad_token_id
                input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left padding
                mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
                out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=self.generation)
                texts = []
                for row in out[:, width:].tolist():
                    stop = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
                    row = row if stop is None else row[:stop + 1]  # the stop token counts in the length
                    lengths.append(len(row))
                    texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
                answers = [r["answer"] for r in chunk for _ in range(self.k)]
                hits = [s >= 1.0 for s in numeric_reward([""] * len(texts), texts, answer=answers)]
                correct += [sum(hits[i:i + self.k]) for i in range(0, len(hits), self.k)]
        model.train(was_training)
        n = self.k
        out = {f"avg@{n}": sum(correct) / (len(correct) * n),
               # unbiased pass@k with k = n (dapo.evaluate.pass_at_k): 1 if any sample is correct
               f"pass@{n}": sum(c > 0 for c in correct) / len(correct),
               "response_length": sum(lengths) / len(lengths)}
        for level in sorted({r["level"] for r in self.records}):
            hit = [c for c, r in zip(correct, self.records) if r["level"] == level]
            out[f"{level}/avg@{n}"] = sum(hit) / (len(hit) * n)
        return out


class EvalAndStop(TrainerCallback):
    """Evaluates before training and every `eval_every` optimizer steps; keeps the training clock.

    The clock runs from on_train_begin and leaves out every evaluation. Training stops at the first
    evaluation with avg@k >= BAR, or at the first step end past `max_seconds` of training (then,
    like dapo's evaluation after training, the last step is evaluated too).
    """

    def __init__(self, held_out: HeldOut, eval_every: int, max_seconds: float, steps_per_generation: int) -> None:
        self.held_out, self.eval_every, self.max_seconds = held_out, eval_every, max_seconds
        self.steps_per_generation = steps_per_generation  # optimizer steps per generation of train_batch_size groups
        self.key = f"avg@{held_out.k}"
        self.start = 0.0
        self.eval_seconds = 0.0
        self.step_times: list[float] = []  # training seconds at the end of each optimizer step
        self.curve: list[dict[str, Any]] = []
        self.first_reach: dict[str, Any] | None = None

    def train_seconds(self) -> float:
        return time.perf_counter() - self.start - self.eval_seconds

    def evaluate(self, model: PreTrainedModel, step: int) -> float:
        train_s = self.train_seconds() if step else 0.0
        eval_start = time.perf_counter()
        scores = self.held_out(model)
        self.eval_seconds += time.perf_counter() - eval_start
        point = {"optimizer_step": step, "generations": math.ceil(step / self.steps_per_generation),
                 "train_seconds": round(train_s, 3), **{k: round(v, 4) for k, v in scores.items()},
                 "eval_seconds": round(time.perf_counter() - eval_start, 3)}
        self.curve.append(point)
        print(f"eval step {step} train_s {train_s:.1f} {self.key} {scores[self.key]:.4f} "
              f"({point['eval_seconds']:.1f} s)", flush=True)
        if step and scores[self.key] >= BAR and self.first_reach is None:
            self.first_reach = point
        return scores[self.key]

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: PreTrainedModel | None = None, **kwargs: Any) -> None:
        assert model is not None
        print(f"torch threads {torch.get_num_threads()}", flush=True)
        self.start = time.perf_counter()
        self.evaluate(model, 0)  # "before training", as dapo's first eval.jsonl row

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: PreTrainedModel | None = None, **kwargs: Any) -> None:
        assert model is not None
        train_s = self.train_seconds()
        self.step_times.append(train_s)
        print(f"step {state.global_step} train_s {train_s:.1f}", flush=True)
        over = train_s > self.max_seconds or state.global_step >= args.max_steps
        if state.global_step % self.eval_every == 0 or over:
            if self.evaluate(model, state.global_step) >= BAR:
                control.should_training_stop = True
        if over:
            control.should_training_stop = True


# --- main -------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task-file", required=True, help="JSON written by arithmetic_time_to_learn.py --export-task")
    parser.add_argument("--model", required=True, help="local HF-format model directory (dapo's default model)")
    parser.add_argument("--seed", type=int, default=None, help="default: the task file's (dapo config's) seed")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="training seconds before giving up")
    parser.add_argument("--max-steps", type=int, default=10_000, help="cap on TRL optimizer steps")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="optimizer steps between evaluations; default: the config's eval_every train steps "
                             "x optimizer steps per train step (2 x 2 = 4)")
    parser.add_argument("--max-eval-prompts", type=int, default=None,
                        help="evaluate on the first N held-out prompts (default: the config's max_eval_prompts, 0 = all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="where to write the result JSON")
    args = parser.parse_args()

    task = json.loads(Path(args.task_file).read_text())
    c = task["config"]
    seed = c["seed"] if args.seed is None else args.seed
    check_reward(task["reward_probes"])
    settings = grpo_settings(c)
    spg = settings["steps_per_generation"] * c["mu"]  # optimizer steps per generation = per dapo train step
    eval_every = args.eval_every or max(c["eval_every"], 1) * spg
    max_eval = c["max_eval_prompts"] if args.max_eval_prompts is None else args.max_eval_prompts
    eval_records = task["eval"][: max_eval or None]  # dapo: task.eval[: max_eval_prompts or None]

    torch.set_num_threads(args.threads)
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    # Same prompts, token for token: TRL templates the messages itself (apply_chat_template with
    # add_generation_prompt), so check that this gives dapo's prompt ids.
    for r in task["train"] + eval_records:
        ids = tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True, return_dict=True)
        if list(ids["input_ids"]) != r["prompt_ids"]:
            raise SystemExit(f"prompt tokens differ from dapo's for {r['messages']!r}")
    eos = model.generation_config.eos_token_id
    trl_stops = {eos} if isinstance(eos, int) else set(eos or [])
    if trl_stops != set(task["stop_ids"]):  # TRL stops training samples at the generation config's EOS
        raise SystemExit(f"TRL would stop generation at {sorted(trl_stops)}, dapo at {task['stop_ids']}")

    dataset = Dataset.from_dict({"prompt": [r["messages"] for r in task["train"]],
                                 "answer": [r["answer"] for r in task["train"]],
                                 "level": [r["level"] for r in task["train"]]})
    config = GRPOConfig(
        output_dir="/tmp/trl_arithmetic_out",
        **settings,
        max_steps=args.max_steps,
        # TRL turns activation (gradient) checkpointing on by default; dapo's 'auto' leaves it off at these sizes.
        use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False,
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
        seed=seed, data_seed=seed,
    )
    callback = EvalAndStop(HeldOut(tokenizer, eval_records, c, task["stop_ids"]), eval_every, args.max_seconds, spg)
    trainer = GRPOTrainer(model=model, reward_funcs=numeric_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[callback], optimizers=make_optimizer(model, c))
    trainer.train()

    times = callback.step_times
    reach = callback.first_reach
    last = callback.curve[-1]
    key = callback.key
    result = {
        "seed": seed,
        "reached": reach is not None,
        "train_seconds_to_bar": reach["train_seconds"] if reach else None,
        "optimizer_steps_to_bar": reach["optimizer_step"] if reach else None,
        "generations_to_bar": reach["generations"] if reach else None,
        "groups_to_bar": reach["generations"] * c["train_batch_size"] if reach else None,
        "optimizer_steps": len(times),
        "generations": math.ceil(len(times) / spg),
        "groups_generated": math.ceil(len(times) / spg) * c["train_batch_size"],
        "train_seconds": round(times[-1], 3) if times else 0.0,
        "final": {"optimizer_step": last["optimizer_step"], key: last[key]},
        "eval_prompts": len(eval_records),
        "eval_every": eval_every,
        "curve": callback.curve,
        "grpo_config": settings | {"generation_batch_size": config.generation_batch_size},
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)


if __name__ == "__main__":
    main()
