"""Benchmark 5: rollout engines, dapo's own sampler (`dapo.rollout.generate`) vs vLLM
(`dapo.vllm_engine.VLLMEngine`, in this process), on the default model in float32.

Generated tokens per second at two shapes, every response forced to its full length (no stop
token: `eos_ids=set()` for dapo's sampler, `stop_token_ids=()` for vLLM, which ignores the model's
EOS by itself), from the chat-templated prompt "Write a long story about a lighthouse keeper.":
  1 prompt x G 32 x 256 tokens, and 8 prompts x G 16 x 256 tokens (8 different prompts).
Also: vLLM engine start-up seconds (import excluded and included), weight-sync seconds, and the
trainer's matmul rate before and after the engine started (threads left to the trainer).
Needs the vLLM virtualenv (`.ci/vllm.sh` builds .venv-vllm):

    .venv-vllm/bin/python benchmarks/rollout_engines.py
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from common import machine_line, matmul_gflops
from dapo.data import encode_prompt
from dapo.models import default_model_dir, load_model, load_tokenizer
from dapo.rollout import SamplingParams, generate

TOPICS = ["a lighthouse keeper", "a lost dog", "a city under the sea", "a clockmaker", "a desert caravan",
          "a robot gardener", "a winter festival", "a mountain village"]


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train_step_seconds(model: torch.nn.Module) -> float:
    """One forward+backward of 4 sequences of 256 tokens (best of 2)."""
    ids = torch.randint(100, 40000, (4, 256), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        best = min(best, time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--kv-cache-gb", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores); on a shared, "
                   "oversubscribed machine 1 is much faster for both engines")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(), "| load average", " ".join(f"{x:.1f}" for x in os.getloadavg()))
    tok = load_tokenizer("default")
    model = load_model("default")
    model.eval()
    prompts = [encode_prompt(tok, f"Write a long story about {t}.", None, 512) for t in TOPICS]
    shapes = [(1, 32), (8, 16)]
    gflops_before, step_before = matmul_gflops(), train_step_seconds(model)

    t0 = time.perf_counter()
    from dapo.vllm_engine import VLLMEngine, import_vllm
    import_vllm()
    t_import = time.perf_counter() - t0
    engine = VLLMEngine(str(default_model_dir()), max_model_len=1024, kv_cache_gb=args.kv_cache_gb, seed=0)
    print(f"vLLM: import {t_import:.1f} s, LLM() {engine.startup_seconds:.1f} s, peak RSS {rss_gb():.1f} GB, "
          f"torch threads {torch.get_num_threads()}")
    gflops_after, step_after = matmul_gflops(), train_step_seconds(model)
    print(f"trainer, before / after the engine started: matmul {gflops_before:.0f} / {gflops_after:.0f} GFLOP/s, "
          f"forward+backward of 4 x 256 tokens {step_before:.2f} / {step_after:.2f} s")

    syncs = []
    for _ in range(3):
        engine.sync_weights(model)
        syncs.append(engine.last_sync_seconds)
    print("weight sync (s):", " ".join(f"{s:.2f}" for s in syncs))

    engine.generate(prompts[:1], 2, SamplingParams(max_new_tokens=8))  # warm-up
    generate(model, prompts[:1], 2, 8, set(), 2)
    print("\n| shape | dapo sampler tok/s | vLLM tok/s | vLLM / dapo |")
    print("|---|---|---|---|")
    for n_prompts, G in shapes:
        batch = prompts[:n_prompts]
        n_tok = n_prompts * G * args.tokens
        hf_t, vl_t = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            t = time.perf_counter()
            out = generate(model, batch, G, args.tokens, set(), 2, temperature=1.0)
            hf_t.append(time.perf_counter() - t)
            assert sum(len(r) for rs, _ in out for r in rs) == n_tok
            t = time.perf_counter()
            res = engine.generate(batch, G, SamplingParams(max_new_tokens=args.tokens))
            vl_t.append(time.perf_counter() - t)
            assert sum(len(r) for s in res for r in s.response_ids) == n_tok
        hf, vl = n_tok / min(hf_t), n_tok / min(vl_t)
        print(f"| {n_prompts} prompt(s) x G {G} x {args.tokens} | {hf:.0f} | {vl:.0f} | {vl / hf:.2f}x |", flush=True)
    print(f"\npeak RSS {rss_gb():.1f} GB; load average at the end",
          " ".join(f"{x:.1f}" for x in os.getloadavg()))
    engine.close()


if __name__ == "__main__":
    main()
