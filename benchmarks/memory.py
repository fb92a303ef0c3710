"""Benchmark 3: peak resident memory of one training step (forward+backward+AdamW) as the group
size and batch grow under a fixed token budget, against the plain path with no budget.

Each configuration runs in a fresh subprocess (peak RSS only grows within a process).

    python benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from common import machine_line


def one_step(groups_n: int, G: int, shared: bool, budget: int, prompt_len: int, response_len: int) -> None:
    from dapo.models import load_model
    from throughput import make_groups, train_pass

    model = load_model("default")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    groups = make_groups(prompt_len, G, response_len, groups_n)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_pass(model, groups, shared, budget)
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak / 1024, "model_mib": baseline / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--child", nargs=4, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        groups_n, G, shared, budget = args.child
        one_step(groups_n, G, bool(shared), budget, args.prompt_len, args.response_len)
        return
    print(machine_line())
    print(f"prompt {args.prompt_len} tokens, responses {args.response_len} tokens\n")
    print("| groups x G | shared, budget " + str(args.budget) + " | plain, one micro-batch | tokens in batch (plain) |")
    print("|---|---|---|---|")
    for groups_n, G in [(1, 8), (1, 16), (1, 32), (1, 64), (4, 16)]:
        row = []
        for shared, budget in [(1, args.budget), (0, 1 << 30)]:
            cmd = [sys.executable, __file__, "--prompt-len", str(args.prompt_len), "--response-len",
                   str(args.response_len), "--child", str(groups_n), str(G), str(shared), str(budget)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:  # the kernel's OOM killer: exactly what a token budget prevents
                row.append("killed (out of memory)" if proc.returncode == -9 else f"failed ({proc.returncode})")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            row.append(f"{r['peak_mib']:.0f} MiB (+{r['peak_mib'] - r['model_mib']:.0f})")
        plain_tokens = groups_n * G * (args.prompt_len + args.response_len)
        print(f"| {groups_n} x {G} | {row[0]} | {row[1]} | {plain_tokens} |", flush=True)
    print("(+N: growth over the process's RSS after loading the model, i.e. activations, gradients and "
          "AdamW state.)")


if __name__ == "__main__":
    main()
