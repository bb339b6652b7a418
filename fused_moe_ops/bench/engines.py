"""What the engines' call signatures cost over calling the op directly, per call, at small shapes.

    python -m fused_moe_ops.bench.engines [--budget 1.0] [--grad-mode inference|no_grad] [--json F]

Each row times ``fused_moe_ops.apply_shuffle_mul_sum`` / ``fused_moe_ops.moe_sum`` against
``torch.ops.moe.shuffle_mul_sum.out`` on the operands the wrapper hands it, made once outside the
timed loop (the (M, topk) factors view, a row view of the input, the permutation): the difference is
the wrapper's own work per call (its checks, the views, and where there are skipped slots or a
layout that needs one, building the permutation). The shapes are small (M 1 to 16, K 256) so that
this overhead is not hidden under the kernel's time.

Method: CPU, one thread, under torch.inference_mode() by default (how a serving loop calls it;
``--grad-mode no_grad`` adds the op's no-backward guard, one Python frame, to both sides alike),
each pair timed in interleaved rounds (fused_moe_ops.bench.timing), median over rounds (``--stat min``:
the least-disturbed round, for a shared machine).
"""
from __future__ import annotations

import argparse
import contextlib
import json
from typing import Callable, Dict, List, Tuple

import torch

import fused_moe_ops
from fused_moe_ops.bench.machine import machine
from fused_moe_ops.bench.timing import time_cpu_interleaved
from fused_moe_ops.integrations import engines

op_out = torch.ops.moe.shuffle_mul_sum.out


def _cases(m: int, topk: int, k: int) -> List[Tuple[str, Callable[[], None], Callable[[], None]]]:
    """(name, wrapper call, direct op call on the operands the wrapper would pass)."""
    g = torch.Generator().manual_seed(m * 1000 + topk)
    x2 = torch.randn(m * topk, k, generator=g, dtype=torch.bfloat16)
    perm = torch.randperm(m * topk, generator=g).to(torch.int32)
    flat = torch.rand(m * topk, generator=g)
    out = torch.empty(m, k, dtype=torch.bfloat16)
    ones = engines._unit_factors(m, topk, x2)
    x3 = torch.randn(m, topk, k, generator=g, dtype=torch.bfloat16)
    x3_t = torch.randn(topk, m, k, generator=g, dtype=torch.bfloat16).transpose(0, 1)
    ids = torch.randint(0, 64, (m, topk), generator=g, dtype=torch.int32)
    ids[:, -1] = -1
    expert_map = torch.arange(64, dtype=torch.int32)
    expert_map[32:] = -1
    live = (ids >= 0) & (expert_map[ids.clamp(min=0).long()] >= 0)
    masked_perm = torch.where(live.reshape(-1), torch.arange(m * topk), -1)
    rows_t, slots_t = engines._slot_rows(x3_t)
    rows3 = x3.view(m * topk, k)
    return [
        ("sglang factors (m*topk,)", lambda: fused_moe_ops.apply_shuffle_mul_sum(x2, out, perm, flat),
         lambda: op_out(x2, perm, flat.view(m, topk), out=out)),
        ("sglang factors None", lambda: fused_moe_ops.apply_shuffle_mul_sum(x2, out, perm),
         lambda: op_out(x2, perm, ones, out=out)),
        ("vllm contiguous", lambda: fused_moe_ops.moe_sum(x3, out),
         lambda: op_out(rows3, None, ones, out=out)),
        ("vllm transposed", lambda: fused_moe_ops.moe_sum(x3_t, out),
         lambda: op_out(rows_t, slots_t, ones, out=out)),
        ("vllm topk_ids + expert_map", lambda: fused_moe_ops.moe_sum(x3, out, ids, expert_map),
         lambda: op_out(rows3, masked_perm, ones, out=out)),
    ]


def run(budget_s: float, grad_mode: str, shapes, stat: str = "median") -> List[Dict[str, object]]:
    torch.set_num_threads(1)
    mode = torch.inference_mode if grad_mode == "inference" else torch.no_grad
    rows = []
    for m, topk, k in shapes:
        for name, wrapper, direct in _cases(m, topk, k):
            pair = []
            for side, fn in (("wrapper", wrapper), ("op", direct)):
                row = {"case": name, "m": m, "topk": topk, "k": k, "side": side}
                pair.append((row, (lambda f: lambda i: f())(fn), lambda: contextlib.nullcontext()))
            with mode():
                time_cpu_interleaved(pair, budget_s, stat=stat)
            w, d = pair[0][0], pair[1][0]
            rows.append({"case": name, "m": m, "topk": topk, "k": k, "wrapper_us": w["time_s"] * 1e6,
                         "op_us": d["time_s"] * 1e6, "overhead_us": (w["time_s"] - d["time_s"]) * 1e6})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_moe_ops.bench.engines", description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per pair (default 1.0)")
    parser.add_argument("--grad-mode", choices=("inference", "no_grad"), default="inference")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="per-call time over rounds: median, or min (the least-disturbed round: a shared machine)")
    parser.add_argument("--json", help="also write the rows and the machine to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = machine("cpu")
    result = {"machine": info, "grad_mode": args.grad_mode, "threads": 1,
              "stat": args.stat, "rows": run(args.budget, args.grad_mode, [(1, 8, 256), (16, 8, 256)], args.stat)}
    print(f"# {info['cpu']}, torch {info['torch']}, {info['date_utc']}, 1 thread, {args.grad_mode}, {args.stat}, "
          f"load average at start {info['loadavg_at_start']}")
    print(f"{'case':<28} {'M':>3} {'topk':>4} {'K':>4} {'wrapper us':>11} {'op us':>8} {'overhead us':>12}")
    for r in result["rows"]:
        print(f"{r['case']:<28} {r['m']:>3} {r['topk']:>4} {r['k']:>4} {r['wrapper_us']:>11.2f} {r['op_us']:>8.2f} "
              f"{r['overhead_us']:>12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
