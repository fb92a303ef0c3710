"""Benchmark 2: generation and training throughput, model FLOPs utilisation, and where one step's
time goes, on the default model.

For prompt lengths 45, 256 and 1024 and group sizes 8 and 16 (responses of --response-len tokens,
EOS ignored so every response has that length) it measures:
- generation tokens/s (new tokens per second, shared-prompt prefill + sampling),
- training tokens/s: response tokens per second of forward+backward, shared-prompt vs plain path,
- MFU: model FLOPs of the shared-prompt forward+backward (6 * params * tokens, LM head only where
  it is applied) over the float32 matmul rate measured here, in this process.

    python benchmarks/throughput.py
"""

from __future__ import annotations

import argparse
import time

import torch

from common import machine_line, matmul_gflops, synthetic_batch
from dapo.logprobs import pack, pad_stack, plan_micro_batches, split_by_response, token_logprobs
from dapo.loss import policy_loss
from dapo.models import load_model
from dapo.rollout import generate


def make_groups(prompt_len: int, group_size: int, response_len: int, num_groups: int = 1):
    """A synthetic rollout batch (common.synthetic_batch)."""
    return synthetic_batch(num_groups, group_size, prompt_len, response_len)


def train_pass(model, batch, shared: bool, budget: int, backward: bool = True) -> None:
    n_tok = sum(len(r) for r in batch.response_ids)
    for segs in plan_micro_batches(batch, budget, shared):
        packed = pack(segs, 2)
        with torch.set_grad_enabled(backward):
            lp, _ = token_logprobs(model, packed)
            per = split_by_response(lp, packed.owner)
            adv = batch.advantages[[row for _, row, _ in packed.owner]]
            lp_pad = pad_stack(per)
            loss, _ = policy_loss(lp_pad, lp_pad.detach(), adv, torch.ones_like(lp_pad), num_tokens=n_tok)
        if backward:
            loss.backward()


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def model_flops(model, groups, shared: bool) -> float:
    cfg = model.config
    head = cfg.vocab_size * cfg.hidden_size
    body = sum(p.numel() for p in model.parameters()) - head  # tied embedding counted once, as the head
    tokens = sum(pack(s, 2).input_ids.numel() for s in plan_micro_batches(groups, 1 << 30, shared))
    predicted = sum(len(r) for r in groups.response_ids)
    return 6 * (body * tokens + head * predicted)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[45, 256, 1024])
    p.add_argument("--group-sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--budget", type=int, default=4096, help="max_tokens_per_micro_batch")
    args = p.parse_args()
    print(machine_line())
    peak = matmul_gflops()
    print(f"measured float32 matmul rate: {peak:.0f} GFLOP/s\n")
    model = load_model("default")
    model.train()
    print("| prompt | G | gen tok/s | train tok/s shared | train tok/s plain | speed-up | MFU shared |")
    print("|---|---|---|---|---|---|---|")
    for prompt_len in args.prompt_lens:
        for G in args.group_sizes:
            groups = make_groups(prompt_len, G, args.response_len)
            gen = timed(lambda: generate(model, [groups.prompt_ids[0]], G, args.response_len, set(), 2), repeats=1)
            shared = timed(lambda: (train_pass(model, groups, True, args.budget), model.zero_grad()), repeats=2)
            plain = timed(lambda: (train_pass(model, groups, False, args.budget), model.zero_grad()), repeats=1)
            tokens = G * args.response_len
            mfu = model_flops(model, groups, True) / shared / 1e9 / peak
            print(f"| {prompt_len} | {G} | {tokens / gen:.0f} | {tokens / shared:.0f} | {tokens / plain:.0f} | "
                  f"{plain / shared:.1f}x | {mfu:.0%} |", flush=True)

    print("\nWhere one train step's time goes (digit task shape: prompt 54, G 32, responses 4; and prompt 256, "
          "G 16, responses 32; mu = 5 gradient steps):")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    print("| shape | generation | old log-probs | fwd+bwd x5 | optimizer x5 | total |")
    print("|---|---|---|---|---|---|")
    for prompt_len, G, resp in [(54, 32, 4), (256, 16, 32)]:
        groups = make_groups(prompt_len, G, resp)
        gen = timed(lambda: generate(model, [groups.prompt_ids[0]], G, resp, set(), 2), repeats=1)
        old = timed(lambda: train_pass(model, groups, True, args.budget, backward=False), repeats=2)
        fb = timed(lambda: (train_pass(model, groups, True, args.budget), None), repeats=2)
        opt = timed(optimizer.step, repeats=2)
        optimizer.zero_grad()
        total = gen + old + 5 * (fb + opt)
        print(f"| {prompt_len}/{G}/{resp} | {gen:.2f} s | {old:.2f} s | {5 * fb:.2f} s | {5 * opt:.2f} s | "
              f"{total:.2f} s |")
    print("(dapo skips the old log-probs pass when the rollout batch is one mini-batch: the first gradient "
          "step's forward provides them.)")


if __name__ == "__main__":
    main()
