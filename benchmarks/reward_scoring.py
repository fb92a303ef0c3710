"""Reward-scoring overhead per generation round: 64 groups x 8 completions, the numeric reward.

before: what dapo did until the RewardScorer (one forked worker process per group and reward
        function, for the time limit), re-created here as it was;
after:  the RewardScorer: one call per function for the whole round, in a persistent worker.
The reward itself costs microseconds, so the figures are the overhead of calling it safely.

    python benchmarks/reward_scoring.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch

from dapo.rewards import RewardFunction, call_reward, numeric_reward
from dapo.scorer import RewardScorer, _trl_arguments


def forked_call(fn, kwargs):  # the old call_with_timeout, minus its error handling
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def work(conn):
        torch.set_num_threads(1)
        conn.send(list(call_reward(fn, **kwargs)))

    proc = ctx.Process(target=work, args=(child,), daemon=True)
    proc.start()
    child.close()
    if not parent.poll(30):
        raise TimeoutError
    out = parent.recv()
    proc.join()
    return out


def before(records, texts, groups, g):
    for i in range(groups):
        rows = slice(i * g, (i + 1) * g)
        prompts, completions, columns = _trl_arguments(records[rows], texts[rows])
        forked_call(numeric_reward, {"prompts": prompts, "completions": completions, "columns": columns})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    a = torch.randn(1000, 1000)
    a @ a  # a trainer's OpenMP pool is up when it scores
    groups, g = args.groups, args.group_size
    records = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(groups) for _ in range(g)]
    texts = [str(i + 1 if j % 2 else i) for i in range(groups) for j in range(g)]
    timings: dict[str, list[float]] = {"before": [], "after": []}
    with RewardScorer([RewardFunction("numeric", numeric_reward)], timeout=30.0) as scorer:
        scorer.score(records[:g], texts[:g])  # the worker starts once per run, not per round
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            before(records, texts, groups, g)
            timings["before"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            scorer.score(records, texts)
            timings["after"].append(time.perf_counter() - t0)
    b, a_ = statistics.median(timings["before"]), statistics.median(timings["after"])
    print(f"reward scoring, {groups} groups x {g} completions, median of {args.rounds} rounds:")
    print(f"  before (a forked process per group and function): {b * 1000:8.1f} ms/round "
          f"({b * 1000 / groups:.1f} ms per group)")
    print(f"  after  (RewardScorer, one call per function):     {a_ * 1000:8.1f} ms/round")
    print(f"  {b / a_:.0f}x less overhead")


if __name__ == "__main__":
    main()
