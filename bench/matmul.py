"""Low-precision matmul and attention on this CPU: torch's bf16 kernels vs. widening to fp32.

    python bench/matmul.py

Shapes are those of the embedded model's MLP (2048 tokens x 576 -> 1536) and of its attention in
a 2 x 512 training step (9 query heads, 3 KV heads, head dim 64). Prints GFLOP/s or seconds per
call and whether this CPU reports native bf16 (avx512_bf16 / amx_bf16).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from clara.kernels.matmul import cpu_has_native_bf16  # noqa: E402


def seconds(fn, repeats=5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}")
    m, k, n = 2048, 576, 1536
    flops = 2 * m * k * n
    x32, w32 = torch.randn(m, k), torch.randn(n, k)
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    rows = [
        ("linear fp32", seconds(lambda: F.linear(x32, w32))),
        ("linear bf16 (torch kernel)", seconds(lambda: F.linear(x16, w16))),
        ("linear bf16 widened to fp32", seconds(lambda: F.linear(x16.float(), w16.float()).bfloat16())),
    ]
    for name, s in rows:
        print(f"{name:32} {flops / s / 1e9:8.1f} GFLOP/s")

    def sdpa_step(dtype, widen=False):
        q = torch.randn(2, 9, 512, 64, dtype=dtype, requires_grad=True)
        kk = torch.randn(2, 3, 512, 64, dtype=dtype, requires_grad=True)
        v = torch.randn(2, 3, 512, 64, dtype=dtype, requires_grad=True)

        def run():
            a, b, c = (t.float() for t in (q, kk, v)) if widen else (q, kk, v)
            F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True).to(dtype).sum().backward()
        return run

    for name, fn in (("sdpa fwd+bwd fp32", sdpa_step(torch.float32)),
                     ("sdpa fwd+bwd bf16 (torch kernel)", sdpa_step(torch.bfloat16)),
                     ("sdpa fwd+bwd bf16 widened", sdpa_step(torch.bfloat16, widen=True))):
        print(f"{name:32} {seconds(fn) * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
