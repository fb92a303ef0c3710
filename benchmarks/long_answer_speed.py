"""Benchmark 16: where a long-answer train step's time goes, from a run's metrics.jsonl.

For each run directory: generation and training tokens per second (mean over train steps) against
the compute roofline of this machine (float32 matmul rate measured now: generation costs 2 x
parameters FLOP per token, training forward + backward 6 x), and the share of step time each took.

    .venv/bin/python benchmarks/long_answer_speed.py runs/long_arithmetic_full [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import machine_line, matmul_gflops

PARAMS = 134_515_008  # SmolLM2-135M-Instruct (tied embeddings counted once)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+")
    args = p.parse_args()
    print(machine_line())
    gflops = max(matmul_gflops() for _ in range(3))
    gen_roof, train_roof = gflops * 1e9 / (2 * PARAMS), gflops * 1e9 / (6 * PARAMS)
    print(f"float32 matmul {gflops:.0f} GFLOP/s: generation roofline {gen_roof:.0f} tok/s, training (forward + "
          f"backward) {train_roof:.0f} tok/s\n")
    print("| run | steps | mean response length | generation tok/s (roofline) | training tok/s (roofline) | "
          "generation share of step time | training share |\n|---|---|---|---|---|---|---|")
    for d in args.run_dirs:
        rows = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("gen_seconds")]
        gen = sum(r["gen_tokens"] for r in rows) / sum(r["gen_seconds"] for r in rows)
        train = statistics.mean(r["train_tokens_per_second"] for r in rows)
        step = sum(r["step_seconds"] for r in rows)
        lengths = [r["response_length_mean"] for r in rows if r.get("response_length_mean") is not None]
        print(f"| {d} | {len(rows)} | {statistics.mean(lengths):.0f} | {gen:.0f} ({gen / gen_roof:.0%}) | "
              f"{train:.0f} ({train / train_roof:.0%}) | {sum(r['gen_seconds'] for r in rows) / step:.0%} | "
              f"{sum(r['train_seconds'] for r in rows) / step:.0%} |")


if __name__ == "__main__":
    main()
