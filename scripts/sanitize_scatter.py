"""The scatter form's CUDA kernels (moe::scatter_mul_sum / _scatter_mul_sum_fused: keys, CUB's sort,
segment sum) over their code paths, each result checked bit for bit against the float32 reference:
what scripts/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck, synccheck), as
scripts/sanitize_kernels.py for the gather form.

    python scripts/sanitize_scatter.py                # on CUDA (the CUDA library must serve it)
    python scripts/sanitize_scatter.py --device cpu   # dry run: whatever serves CPU
    compute-sanitizer --tool racecheck --error-exitcode 86 python scripts/sanitize_scatter.py

The cases cover: the 16-byte vector path and the scalar path (odd K, odd row stride, an unaligned
view), one chunk and many (a token taking every row), empty tokens, M = 1 (column-split grid), R = 0,
M = 0, K = 0, negative entries skipped and wrapped, no factors, rounded factors, scale and addend,
int32 / int64 and strided indices, every input / output dtype.

Exit status: 0 every case matched; 1 a case failed; 2 the CUDA library does not serve the scatter form.
The last line is the summary gpu_check parses: "sanitize_kernels: N/N cases ok (...)".
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import NamedTuple, Optional

import torch


class Case(NamedTuple):
    name: str
    rows: int
    m: int
    k: int
    dtype: torch.dtype = torch.bfloat16
    out: Optional[torch.dtype] = None
    mode: int = 0                  # negative_index
    factors: Optional[torch.dtype] = torch.float32
    factor_round: int = 0
    scale: float = 1.0
    addend: bool = False
    layout: str = "dense"          # dense | odd-stride | offset
    index: torch.dtype = torch.int64
    index_step: int = 1
    all_to: Optional[int] = None


CASES = [
    Case("vector-bf16", 512, 64, 1024),
    Case("vector-f32-out-bf16", 512, 64, 512, torch.float32, torch.bfloat16),
    Case("vector-f16-out-f32-addend-scale", 300, 40, 256, torch.float16, torch.float32, addend=True, scale=-0.5),
    Case("scalar-odd-K", 300, 40, 1031),
    Case("scalar-odd-stride", 300, 40, 256, layout="odd-stride"),
    Case("scalar-unaligned-view", 300, 40, 255, layout="offset"),
    Case("one-token-every-row-many-chunks", 3000, 4, 128, all_to=2),
    Case("decode-M1-column-slices", 8, 1, 7168),
    Case("mostly-empty-tokens", 20, 5000, 64),
    Case("wrap-mode-int32", 400, 50, 128, mode=1, index=torch.int32),
    Case("error-mode-strided-index", 400, 50, 128, mode=2, index_step=2),
    Case("no-factors", 200, 30, 128, factors=None),
    Case("rounded-f16-factors", 200, 30, 128, factors=torch.float16, factor_round=2),
    Case("R0-addend", 0, 7, 64, addend=True),
    Case("M0-skipped-rows", 9, 0, 64),
    Case("K0", 9, 3, 0),
]


def make(case: Case, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    pad = {"dense": 0, "odd-stride": 1, "offset": 1}[case.layout]
    base = torch.randn(case.rows, case.k + pad, generator=g).to(case.dtype)
    x = base[:, 1:] if case.layout == "offset" else base[:, :case.k]
    n = case.rows * case.index_step
    if case.all_to is not None:
        index = torch.full((n,), case.all_to)
    elif case.m == 0:
        index = torch.full((n,), -1)
    else:
        index = torch.randint(0, case.m, (n,), generator=g)
        if case.mode == 0:
            index = torch.where(torch.rand(n, generator=g) < 0.2, torch.full_like(index, -1), index)
        elif case.mode == 1:
            index = torch.where(torch.rand(n, generator=g) < 0.5, index - case.m, index)
    index = index.to(case.index)[::case.index_step]
    f = None if case.factors is None else torch.rand(case.rows, generator=g).to(case.factors)
    a = torch.randn(case.m, case.k, generator=g).to(case.dtype) if case.addend else None
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return x, index, f, a, (move(x), move(index), move(f), move(a))


def run_case(case: Case, device: str, seed: int) -> None:
    from fused_moe_ops.reference import scatter_mul_sum_fused_reference

    x, index, f, a, (dx, di, df, da) = make(case, device, seed)
    args = (case.m, case.out, case.mode, case.factor_round, case.scale)
    got = torch.ops.moe._scatter_mul_sum_fused(dx, di, df, *args, da)
    want = scatter_mul_sum_fused_reference(x, index, f, *args, a)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    import fused_moe_ops  # noqa: F401  (defines and registers the op)
    from fused_moe_ops import _registry

    served = _registry.SCATTER_ACTIVE.get(device)
    print(f"sanitize_scatter: device {device}, scatter form served by {served}, torch {torch.__version__}", flush=True)
    if device == "cuda" and served != "cuda":
        print("sanitize_kernels: 0/0 cases ok (the CUDA library does not serve the scatter form)")
        return 2
    t0, ok, failed = time.time(), 0, []
    for i, case in enumerate(CASES):
        try:
            run_case(case, device, args.seed * 1000 + i)
        except Exception as e:  # noqa: BLE001 - a failed case is reported and the run goes on
            failed.append(case.name)
            msg = "".join(traceback.format_exception_only(type(e), e)).strip()
            print(f"FAIL {case.name:<40} {msg[:600]}", flush=True)
            if device == "cuda" and ("device-side assert" in msg or "illegal" in msg):  # the context is dead
                break
            continue
        ok += 1
        print(f"ok   {case.name}", flush=True)
    summary = f"sanitize_kernels: {ok}/{len(CASES)} cases ok (scatter {ok}/{len(CASES)}) in {time.time() - t0:.1f}s"
    if failed:
        summary += "; FAILED: " + ", ".join(failed)
    print(summary, flush=True)
    return 0 if ok == len(CASES) else 1


if __name__ == "__main__":
    sys.exit(main())
