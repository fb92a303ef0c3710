"""Helpers shared by the benchmark scripts: machine facts and the measured float32 matmul rate."""

from __future__ import annotations

import os
import platform
import time
from datetime import date

import torch


def machine_line() -> str:
    return (f"{date.today()} | {platform.processor() or platform.machine()} | {os.cpu_count()} cores | "
            f"torch {torch.__version__} | {torch.get_num_threads()} threads")


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Measured float32 matmul rate (GFLOP/s) on this machine with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9
