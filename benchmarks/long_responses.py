"""Benchmark 4: long responses (issue 14). Two parts:

- memory: peak resident memory and tokens/s of one training step (forward+backward of
  token_logprobs plus the loss) for one group of 4 responses after a 64-token prompt, T response
  tokens in all (1k to 8k), in each attention layout with and without gradient checkpointing,
  plus today's path before this change (shared-prompt mask, dense LM head, no checkpointing).
  Every configuration runs in a fresh subprocess (peak RSS only grows within a process), in one
  micro-batch (no token budget), so the figure is what one forward+backward of that size costs.
  A configuration whose extrapolated peak exceeds --max-gib is skipped.
- layout: forward+backward time of one group in the "shared" layout (one prompt copy, 4D mask)
  over the "rows" layout (one causal row per response, no mask) across prompt lengths, group
  sizes and response lengths, next to what `choose_layout`'s cost model predicts. This is what
  the rule in `dapo.logprobs.choose_layout` was fitted on.

    python benchmarks/long_responses.py                  # both parts
    python benchmarks/long_responses.py --part layout
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from common import default_model, machine_line, synthetic_batch

PROMPT = 64
G = 4


def make_group(prompt_len: int, response_lens: list[int]):
    """One group of len(response_lens) responses (common.synthetic_batch)."""
    return synthetic_batch(1, len(response_lens), prompt_len, response_lens)


def train_step(model, batch, layout: str, chunk_size: int) -> int:
    """Forward+backward of token_logprobs and the loss over every micro-batch; returns tokens."""
    from dapo.logprobs import pack, pad_stack, plan_micro_batches, split_by_response, token_logprobs
    from dapo.loss import policy_loss

    n_tok = sum(len(r) for r in batch.response_ids)
    for segs in plan_micro_batches(batch, 1 << 30, True, layout=layout):
        packed = pack(segs, 2)
        lp, _ = token_logprobs(model, packed, 1.0, with_entropy=True, chunk_size=chunk_size)
        per = split_by_response(lp, packed.owner)
        adv = batch.advantages[[row for _, row, _ in packed.owner]]
        lp_pad = pad_stack(per)
        loss, _ = policy_loss(lp_pad, lp_pad.detach() + 0.05, adv, pad_stack([torch.ones_like(t) for t in per]),
                              num_tokens=n_tok)
        loss.backward()
    return n_tok


def child(total: int, layout: str, checkpointing: bool, chunk_size: int, malloc: bool, lora_rank: int = 0) -> None:
    from dapo.logprobs import release_freed_memory_eagerly, set_gradient_checkpointing

    if malloc:
        release_freed_memory_eagerly()
    model = default_model(lora_rank)  # LoRA: no weight gradients for the frozen base
    model.train()
    set_gradient_checkpointing(model, checkpointing)
    groups = make_group(PROMPT, [total // G] * G)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu = time.perf_counter(), time.process_time()
    tokens = train_step(model, groups, layout, chunk_size)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak / 1024, "model_mib": baseline / 1024, "tok_s": tokens / seconds,
                      "tok_cpu_s": tokens / cpu}))


CONFIGS = [  # (label, layout, checkpointing, chunk_size, release_freed_memory_eagerly, LoRA rank)
    ("today: shared mask, dense head", "shared", False, 0, False, 0),
    ("shared, chunked head", "shared", False, 1024, False, 0),
    ("shared, chunked, checkpointing", "shared", True, 1024, False, 0),
    ("rows, chunked head", "rows", False, 1024, False, 0),
    ("rows, chunked, checkpointing", "rows", True, 1024, False, 0),
    ("rows, chunked, checkpointing, mmap threshold 1 MB", "rows", True, 1024, True, 0),
    ("shared, chunked, checkpointing, mmap threshold 1 MB", "shared", True, 1024, True, 0),
    ("rows, chunked, checkpointing, LoRA r16", "rows", True, 1024, False, 16),
    ("rows, chunked, checkpointing, LoRA r16, mmap threshold 1 MB", "rows", True, 1024, True, 16),
]


def memory_part(args) -> None:
    totals = args.totals
    print(f"one group: prompt {PROMPT} tokens, {G} responses of T/{G} tokens; one forward+backward "
          f"(token_logprobs with entropy + policy_loss), one micro-batch\n")
    print("| configuration | " + " | ".join(f"T = {t}" for t in totals) + " |")
    print("|---|" + "---|" * len(totals))
    for i, (label, layout, ckpt, chunk, malloc, lora) in enumerate(CONFIGS):
        if args.configs and i not in args.configs:
            continue
        cells, seen = [], []  # seen: (T, peak MiB, model MiB)
        for total in totals:
            if len(seen) >= 2:  # linear extrapolation from the last two sizes
                (t1, p1, _), (t0, p0, _) = seen[-2:]
                expected = p0 + max((p0 - p1) / (t0 - t1), 0.0) * (total - t0)
                if expected > args.max_gib * 1024:
                    cells.append(f"skipped (~{expected / 1024:.0f} GiB expected)")
                    continue
            cmd = [sys.executable, __file__, "--child", str(total), layout, str(int(ckpt)), str(chunk),
                   str(int(malloc)), str(lora)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                cells.append("killed (out of memory)" if proc.returncode == -9 else f"failed ({proc.returncode})")
                print(proc.stderr[-2000:], file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            seen.append((total, r["peak_mib"], r["model_mib"]))
            cells.append(f"{r['peak_mib'] / 1024:.2f} GiB, {r['tok_cpu_s']:.0f} tok/CPU-s")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print("(GiB: peak RSS of the process, the model's 0.5 GiB of weights and its gradients included; "
          "tok/CPU-s: response tokens per CPU-second of the forward+backward, all threads summed; less "
          "sensitive than wall time to other jobs on the machine)")


LAYOUT_SHAPES = [  # (prompt, G, response length)
    (54, 32, 4), (256, 16, 32), (1024, 16, 32), (64, 4, 64), (64, 4, 256), (64, 4, 1024),
    (512, 8, 128), (512, 4, 512), (1024, 4, 256), (1024, 8, 512),
]


def layout_part(args) -> None:
    from dapo.logprobs import choose_layout, layout_costs
    from dapo.models import load_model

    model = load_model("default")
    model.train()
    print("(CPU seconds of one forward+backward, the better of two; interleaved)")
    print("| prompt | G | response | shared s | rows s | shared / rows measured | modelled | choose_layout |")
    print("|---|---|---|---|---|---|---|---|")
    for prompt, g, resp in LAYOUT_SHAPES:
        groups = make_group(prompt, [resp] * g)
        times = {}
        for layout in ("shared", "rows", "shared", "rows"):  # interleaved; the better of two
            start = time.process_time()
            train_step(model, groups, layout, 1024)
            model.zero_grad(set_to_none=True)
            times[layout] = min(times.get(layout, float("inf")), time.process_time() - start)
        cost = layout_costs(prompt, [resp] * g)
        print(f"| {prompt} | {g} | {resp} | {times['shared']:.2f} | {times['rows']:.2f} | "
              f"{times['shared'] / times['rows']:.2f} | {cost['shared'] / cost['rows']:.2f} | "
              f"{choose_layout(prompt, [resp] * g)} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["memory", "layout", "both"], default="both")
    p.add_argument("--totals", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--configs", type=int, nargs="*", help="indices into CONFIGS (default: all)")
    p.add_argument("--max-gib", type=float, default=10.0, help="skip configurations expected above this")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        total, layout, ckpt, chunk, malloc, lora = args.child
        child(int(total), layout, bool(int(ckpt)), int(chunk), bool(int(malloc)), int(lora))
        return
    print(machine_line() + "\n")
    if args.part in ("memory", "both"):
        memory_part(args)
    if args.part in ("layout", "both"):
        print()
        layout_part(args)


if __name__ == "__main__":
    main()
