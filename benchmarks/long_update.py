"""Peak memory of one whole training update on long responses, full weights and LoRA, with and
without the scoped mmap threshold (`logprobs.eager_memory_release`), and the sampler's speed
right after it.

One `Actor.update` (the default config: rows layout and activation checkpointing chosen
automatically, chunked head, AdamW step included) on 1 group of 4 responses of T/4 tokens behind
a 64-token prompt, on the default model; then 16 x 256 new tokens sampled from the same process,
to show that the heap is back to its fast state for generation. Each variant in a fresh
subprocess (peak RSS only grows within a process).

    python benchmarks/long_update.py [--total 8192]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from common import default_model, machine_line, synthetic_batch


def child(total: int, lora: bool, eager: bool) -> None:
    import torch

    import dapo.actor
    from dapo.actor import Actor
    from dapo.config import DAPOConfig
    from dapo.rollout import generate

    # Force the choice either way (dapo's default: on for micro-batches of >= EAGER_RELEASE_TOKENS).
    dapo.actor.EAGER_RELEASE_TOKENS = 0 if eager else 1 << 40
    config = DAPOConfig(group_size=4, max_new_tokens=total // 4 + 1, mu=1, max_prompt_len=128,
                        **({"lora_rank": 16, "lr": 3e-4} if lora else {}))
    model = default_model(16 if lora else 0)
    actor = Actor(model, config, pad_id=2)
    start = time.perf_counter()
    actor.update(synthetic_batch(1, 4, 64, total // 4))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    model.eval()
    prompt = torch.randint(100, 40000, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    generate(model, [prompt], 16, 8, set(), 2)  # warm-up
    best = min(_timed(lambda: generate(model, [prompt], 16, 256, set(), 2)) for _ in range(2))
    print(json.dumps({"peak_gib": peak, "update_s": seconds, "gen_tok_s": 16 * 256 / best}))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total", type=int, default=8192, help="response tokens in the group")
    p.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], bool(args.child[1]), bool(args.child[2]))
        return
    print(machine_line())
    print(f"one Actor.update: 1 group, prompt 64, 4 responses of {args.total // 4} tokens; then sampling 16 x 256\n")
    print("(dapo's default: the 1 MB threshold for micro-batches of >= 2048 tokens, off below)\n")
    print("| weights | mmap threshold in the update | peak RSS | update | sampling after |")
    print("|---|---|---|---|---|")
    for lora in (0, 1):
        for eager in (0, 1):
            out = subprocess.run([sys.executable, __file__, "--child", str(args.total), str(lora), str(eager)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {'LoRA r16' if lora else 'full'} | {'1 MB' if eager else 'off'} | failed "
                      f"({out.returncode}) | | |", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {'LoRA r16' if lora else 'full'} | {'1 MB' if eager else 'off (heap)'} | "
                  f"{r['peak_gib']:.2f} GiB | {r['update_s']:.1f} s | {r['gen_tok_s']:.0f} tok/s |", flush=True)


if __name__ == "__main__":
    main()
