"""Launches and time of the layers in compile_tests/reach_models.py compiled with and without the
fusion pass, each compile in a fresh Inductor cache, at decode (1 token) and prefill.

    PYTHONPATH=. python scripts/time_reach.py [--tokens 1 512] [--dtype bfloat16] [--model gpt_oss ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch._inductor.utils import fresh_cache, run_and_get_code

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "compile_tests"))
import fused_moe_ops  # noqa: E402
from fusion_cases import kernel_launches  # noqa: E402
import reach_models as rm  # noqa: E402

H, I, E, TOPK = 256, 256, 8, 4
MODELS = {
    "gpt_oss": lambda: rm.GptOssMLPBlock(H, I // 2, E, TOPK),
    "gpt_oss_bce": lambda: rm.GptOssMLPBlock(H, I // 2, E, TOPK, combine="bce,be->bc"),
    "vllm_iterative": lambda: rm.VllmIterativeMoE(H, I, E, TOPK),
    "torchao_one_token": lambda: rm.TorchaoSingleTokenMoE(H, I, E, TOPK),
}


def _input(name, tokens, dtype):
    shape = (1, tokens, H) if name.startswith("torchao") else (tokens, H)
    return torch.randn(shape).to(dtype)


def _bench(fn, x, reps):
    for _ in range(3):
        fn(x)
    best = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(x)
        best.append((time.perf_counter() - t0) / reps)
    return min(best)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model", nargs="+", default=list(MODELS))
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    for name in args.model:
        model = MODELS[name]().to(dtype).eval()
        for tokens in args.tokens:
            if name.startswith("torchao") and tokens != 1:
                continue
            x = _input(name, tokens, dtype)
            row = {}
            for label, on in (("without", False), ("with", True)):
                torch._dynamo.reset()
                fused_moe_ops.reset_fusion_stats()
                with fresh_cache(), torch.no_grad():
                    if on:
                        fused_moe_ops.enable_fusion()
                    else:
                        fused_moe_ops.disable_fusion()
                    fn = torch.compile(model)
                    _, code = run_and_get_code(fn, x)
                    stats = fused_moe_ops.fusion_stats()
                    reps = 200 if tokens == 1 else 10
                    row[label] = (kernel_launches("\n".join(code)), stats["by_pattern"], stats["lowered"])
                    row[label + "_t"] = fn
            fused_moe_ops.enable_fusion()
            with torch.no_grad():  # timed side by side, alternating, after both compiles
                t = {"without": [], "with": []}
                for _ in range(3):
                    for label in ("without", "with"):
                        t[label].append(_bench(row[label + "_t"], x, reps))
            tw, tp = min(t["without"]), min(t["with"])
            print(f"{name} tokens={tokens} {args.dtype}: without {tw * 1e6:.1f} us {row['without'][0]}; "
                  f"with {tp * 1e6:.1f} us {row['with'][0]} {row['with'][1]} lowered {row['with'][2]}; "
                  f"with/without {tp / tw:.3f}", flush=True)


if __name__ == "__main__":
    main()
