"""Times moe::scatter_mul_sum on a GPU against eager PyTorch's spelling of the same combine
(``zeros(M, K).index_add_(0, index, input * factors[:, None])``, atomics on CUDA), for decode and
prefill shapes of a top-8 router; prints one line per shape (scripts/gpu_check.sh's `scatter` step).

    python scripts/scatter_timing.py [--iters 50]
"""
from __future__ import annotations

import argparse
import statistics

import torch

import fused_moe_ops  # noqa: F401  (registers the op)
from fused_moe_ops import _registry

SHAPES = [  # (tokens M, topk, hidden K): R = M * topk rows in expert order
    (1, 8, 7168), (8, 8, 7168), (64, 8, 7168), (512, 8, 4096), (4096, 8, 7168), (16384, 8, 2048),
]


def _time(fn, iters: int) -> float:
    """Median microseconds of one call (CUDA events around each)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    print(f"scatter form on CUDA served by: {_registry.SCATTER_ACTIVE.get('cuda')}; "
          f"{torch.cuda.get_device_name()}, bf16 input, fp32 factors, bf16 output")
    print(f"{'M':>6} {'topk':>4} {'K':>5}  {'scatter_mul_sum us':>18}  {'eager index_add_ us':>19}  {'ratio':>6}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, topk, k in SHAPES:
        rows = m * topk
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g)
        f = torch.rand(rows, device="cuda", generator=g)
        # Expert order: rows sorted by a random expert, each token's topk rows scattered.
        index = torch.arange(m, device="cuda").repeat_interleave(topk)[torch.randperm(rows, device="cuda", generator=g)]

        def ours():
            return torch.ops.moe.scatter_mul_sum(x, index, f, m, None)

        def eager():
            return torch.zeros(m, k, device="cuda", dtype=torch.float32).index_add_(
                0, index, x.float() * f[:, None]).to(torch.bfloat16)

        torch.testing.assert_close(ours().float(), eager().float(), rtol=2e-2, atol=2e-2)
        t_ours, t_eager = _time(ours, args.iters), _time(eager, args.iters)
        print(f"{m:>6} {topk:>4} {k:>5}  {t_ours:>18.1f}  {t_eager:>19.1f}  {t_eager / t_ours:>5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
