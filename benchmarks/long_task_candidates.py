"""Benchmark 15: candidates for the long-answer task, on the untrained default model.

For each candidate prompt family: accuracy (the last number of the answer is the result, as the
numeric reward scores it), share of answers truncated at max_new_tokens, mean and median length,
and the share that states the answer in the asked format ("Answer: N"), over --prompts prompts x
--samples samples at temperature 1. The task that learns most clearly became `long_arithmetic`
(tasks.py); the figures are in benchmarks/README.md section 15.

    .venv/bin/python benchmarks/long_task_candidates.py
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time

import torch

from common import machine_line
from dapo.data import encode_prompt
from dapo.models import load_model, load_tokenizer
from dapo.rewards import numeric_reward
from dapo.rollout import generate

ASK = " Think step by step, then give the final answer on the last line as 'Answer: <number>'."


def candidates(rng: random.Random, n: int) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {"sum of two digits": [], "sum of three digits": [],
                                             "two-digit + one-digit": [], "apples (two steps)": []}
    for _ in range(n):
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
        out["sum of two digits"].append((f"What is {a} + {b}?", a + b))
        out["sum of three digits"].append((f"What is {a} + {b} + {c}?", a + b + c))
        x = rng.randint(11, 49)
        out["two-digit + one-digit"].append((f"What is {x} + {a}?", x + a))
        out["apples (two steps)"].append((f"Sam has {a + c} apples. He buys {b} more and then eats {c}. "
                                          f"How many apples does Sam have now?", a + b))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    args = p.parse_args()
    print(machine_line())
    tok, model = load_tokenizer("default"), load_model("default").eval()
    torch.manual_seed(0)
    print("| candidate | accuracy | truncated | mean / median length | says 'Answer:' | seconds |\n|---|---|---|---|---|---|")
    for name, items in candidates(random.Random(0), args.prompts).items():
        ids = [encode_prompt(tok, q + ASK, None, 512) for q, _ in items]
        t = time.perf_counter()
        out = generate(model, ids, args.samples, args.max_new_tokens, {tok.eos_token_id}, tok.pad_token_id)
        seconds = time.perf_counter() - t
        texts, answers, lengths, truncated = [], [], [], []
        for (_, answer), s in zip(items, out):
            texts += [tok.decode(r, skip_special_tokens=True) for r in s.response_ids]
            answers += [str(answer)] * len(s.response_ids)
            lengths += [len(r) for r in s.response_ids]
            truncated += s.truncated
        acc = numeric_reward([None] * len(texts), texts, answer=answers)
        says = sum(bool(re.search(r"Answer:\s*-?\d", t)) for t in texts) / len(texts)
        print(f"| {name} | {sum(acc) / len(acc):.3f} | {sum(truncated) / len(truncated):.2f} | "
              f"{statistics.mean(lengths):.0f} / {statistics.median(lengths):.0f} | {says:.2f} | {seconds:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
