"""The op-level sweep: the combine step, every implementation side by side, one shape at a time.

For each shape (M tokens, top-k, hidden size K, dtype) one run times, on the same data:

    eager          the seed line, plain PyTorch:
                   (c2[c_map].view(m, topk, k) * w.view(m, topk, 1).to(c2.dtype)).sum(dim=1)
    inductor       torch.compile of the seed line with our pass disabled (Inductor's own kernel)
    inductor+pass  torch.compile of the seed line with our pass (rewritten into moe.shuffle_mul_sum,
                   or left alone where the pass's policy says Inductor is faster)
    op             torch.ops.moe.shuffle_mul_sum with the C++ CPU kernel       (CPU)
    cuda           torch.ops.moe.shuffle_mul_sum with the C++ CUDA kernel      (CUDA, when built)
    triton         fused_moe_ops.triton_kernel.shuffle_mul_sum_triton          (CUDA)
    copy           dst.copy_(src) moving the same number of bytes: the bandwidth ceiling, measured
                   on the spot

Bytes of a call = input rows read (M*topk*K) + output written (M*K), times the element size; the
copy moves half that many bytes each way, so its read+write total is the same.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Sequence

import torch

from fused_moe_ops import _registry
from fused_moe_ops.reference import shuffle_mul_sum_reference

from .timing import (capture_cuda_graph, rotating_set_count, sync, time_cpu_interleaved, time_cuda_events,
                     time_graph_replays)
from .variants import compile_fresh, fusion_api_reason, fusion_rewrites, pass_disabled

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "f16": torch.float16, "float16": torch.float16,
          "fp16": torch.float16, "f32": torch.float32, "float32": torch.float32}

CPU_DEFAULT_M = [1, 8, 64, 512, 1024]
GPU_DEFAULT_M = [1, 8, 64, 512, 4096, 16384]
DEFAULT_K = [4096, 7168]
QUICK_M = {"cpu": [1, 1024], "cuda": [1, 64, 4096]}
QUICK_K = {"cpu": [4096, 7168], "cuda": [7168]}

ALL_IMPLS = ("eager", "inductor", "inductor+pass", "op", "cuda", "triton", "copy")

# Named grids: the shapes (and the implementations, timing budget, graph limit) a question needs.
# "pass-vs-inductor": is the compiled combine with the pass ever slower than without it? Every M a
# serving engine captures a graph for and the large prefill sizes, both DeepSeek-like hidden sizes,
# top-2 and top-8, bf16, all as CUDA-graph replays (so launch overhead counts as it does in
# serving). Timing budget sized for about 2 minutes of measuring on an H100/H200 (scripts/gpu_check.sh
# runs it); the compiles come on top: static (the default) compiles both inductor rows per shape,
# 88 compiles, which is what a per-M policy sees; --compile dynamic needs 16.
GRIDS: Dict[str, Dict[str, object]] = {
    "pass-vs-inductor": {
        "m": [1, 2, 4, 8, 16, 32, 64, 128, 512, 4096, 16384],
        "k": [7168, 4096],
        "topk": [8, 2],
        "dtype": "bf16",
        "impls": ["inductor", "inductor+pass", "op", "cuda", "copy"],
        "budget": 0.03,
        "graph_max_m": 16384,
        "replays": 15,
        "compile": "static",
    },
}


# ------------------------------------------------------------------------------------------------
# The seed spelling (what models write; what the pass rewrites)
# ------------------------------------------------------------------------------------------------
def seed_combine(c2: torch.Tensor, c_map: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    m, topk = topk_weights.shape
    k = c2.shape[1]
    return (c2[c_map].view(m, topk, k) * topk_weights.view(m, topk, 1).to(c2.dtype)).sum(dim=1)


def make_sets(device, dtype, m, topk, k, n_sets, seed=0):
    """n_sets independent (expert rows, permutation, router weights) input sets of one shape."""
    g = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        r = m * topk
        c2 = torch.randn(r, k, generator=g, device=device, dtype=torch.float32).to(dtype)
        c_map = torch.randperm(r, generator=g, device=device)  # int64, as models index with
        w = torch.rand(m, topk, generator=g, device=device, dtype=torch.float32)
        sets.append((c2, c_map, w / w.sum(-1, keepdim=True)))
    return sets


def outputs_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    """got matches ref within the dtype's rounding, relative to ref's largest magnitude."""
    if got.shape != ref.shape:
        return False
    if ref.numel() == 0:
        return True
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    err = (got.float() - ref.float()).abs().max().item()
    return math.isfinite(err) and err <= tol * (ref.float().abs().max().item() + 1e-6)


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def bench_shape(device: str, dtype: torch.dtype, m: int, topk: int, k: int, impls: Sequence[str],
                args, compiled: Optional[Dict[tuple, object]] = None) -> List[Dict[str, object]]:
    """Rows (one per implementation) for one shape: time, GB/s and the ratios against eager,
    inductor and copy measured in this same call. args: budget, rotate_mb, max_sets,
    graph_max_m, min_rounds, stat, and optionally replays.

    compiled None: the compiled variants are compiled for this shape alone (static shapes, what
    the pass's per-size policy sees). A dict: the token count is dynamic, and the compiled
    functions are kept in it across shapes per (variant, topk, K), as a serving engine compiles
    once for all batch sizes (1 token still gets its own compile: Dynamo specialises on 1)."""
    esize = torch.tensor([], dtype=dtype).element_size()
    nbytes = (m * topk * k + m * k) * esize  # bytes a call moves: input rows read + output written
    n_sets = rotating_set_count(nbytes, args.rotate_mb, args.max_sets)
    if compiled is None:
        torch._dynamo.reset()  # once per shape, never between variants (their entries must survive)
    sets = make_sets(device, dtype, m, topk, k, n_sets)
    if compiled is not None and m > 1:
        for c2, c_map, w in sets[:1]:  # the set of the first (compiling) call
            torch._dynamo.mark_dynamic(c2, 0)
            torch._dynamo.mark_dynamic(c_map, 0)
            torch._dynamo.mark_dynamic(w, 0)

    def compiled_variant(with_pass: bool):
        if compiled is None:
            return compile_fresh(seed_combine, with_pass=with_pass)
        key = ("inductor+pass" if with_pass else "inductor", topk, k)
        if key not in compiled:
            compiled[key] = compile_fresh(seed_combine, with_pass=with_pass, dynamic=None)
        return compiled[key]
    ref = shuffle_mul_sum_reference(*sets[0])  # float32 accumulation, on the device
    rows: List[Dict[str, object]] = []
    entries = []  # (row, call(i), ctx) of the implementations that ran once correctly

    def base_row(name, note=""):
        return {"impl": name, "M": m, "K": k, "topk": topk, "dtype": str(dtype).replace("torch.", ""),
                "device": device, "bytes": nbytes, "note": note}

    def skip(name, why):
        row = base_row(name, "skipped")
        row["skipped"] = why
        rows.append(row)

    def prepare(name, fn, note="", ctx=contextlib.nullcontext, bufs=None, check=True):
        """First call (compiles, autotunes), output check; queue it for timing."""
        row = base_row(name, note)
        rows.append(row)
        data = bufs if bufs is not None else sets
        try:
            with ctx():
                out = fn(*data[0])
                sync(device)
            if check and not outputs_close(out, ref, dtype):
                row["note"] = (note + " MISMATCH vs reference").strip()
                row["mismatch"] = True

            def call(i, _fn=fn, _data=data):
                return _fn(*_data[i % len(_data)])

            call.n_data = len(data)
            entries.append((row, call, ctx))
        except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
            row["error"] = _error_text(e)
            row["note"] = (note + " ERROR").strip()
        return row

    for name in impls:
        if name == "eager":
            prepare("eager", seed_combine)
        elif name == "inductor":
            before = fusion_rewrites()
            fn = compiled_variant(with_pass=False)
            row = prepare("inductor", fn, ctx=pass_disabled)  # compiles on its first call, inside the context
            after = fusion_rewrites()
            if before is not None and after is not None:
                row["rewrites"] = after - before
                if after != before:
                    row["note"] = (row["note"] + " pass rewrote despite disable_fusion()").strip()
        elif name == "inductor+pass":
            why = fusion_api_reason()
            if why:
                skip(name, why)
                continue
            before, graphs = fusion_rewrites(), _compiled_graphs()
            fn = compiled_variant(with_pass=True)
            row = prepare("inductor+pass", fn)
            after = fusion_rewrites()
            if compiled is not None and _compiled_graphs() == graphs:
                # dynamic token count: this shape ran an earlier compile, the pass did not run again
                row["note"] = (row["note"] + " compile reused").strip()
            elif before is not None and after is not None:
                row["rewrites"] = after - before
                row["note"] = (row["note"] + f" rewrites={after - before}").strip()
        elif name == "op" and device == "cpu":
            note = "" if _registry.ACTIVE.get("cpu") == "cpp" else f"backend={_registry.ACTIVE.get('cpu')}"
            op = torch.ops.moe.shuffle_mul_sum.default
            prepare("op", lambda a, b, c: op(a, b, c, None), note=note)
        elif name == "cuda" and device == "cuda":
            if _registry.ACTIVE.get("cuda") != "cuda":
                skip("cuda", f"op's CUDA backend is {_registry.ACTIVE.get('cuda')}: "
                             f"{_registry.FALLBACK_REASONS.get('cuda', '')}"[:300])
                continue
            op = torch.ops.moe.shuffle_mul_sum.default
            prepare("cuda", lambda a, b, c: op(a, b, c, None))
        elif name == "triton" and device == "cuda":
            from fused_moe_ops import triton_kernel

            why = triton_kernel.unavailable_reason()
            if why:
                skip("triton", why)
                continue
            prepare("triton", triton_kernel.shuffle_mul_sum_triton)
        elif name == "copy":
            # half the bytes each way, so read + written = the op's bytes; its own rotating buffers
            half = max(1, nbytes // 2 // esize)
            n_copy = rotating_set_count(2 * half * esize, args.rotate_mb, args.max_sets)
            bufs = []
            for _ in range(n_copy):
                src = torch.randn(half, dtype=torch.float32, device=device).to(dtype)
                bufs.append((src, torch.empty_like(src)))
            row = prepare("copy", lambda src, dst: dst.copy_(src), note="bandwidth ceiling", bufs=bufs, check=False)
            row["bytes"] = 2 * half * esize

    if device == "cpu":
        time_cpu_interleaved(entries, args.budget, min_rounds=args.min_rounds, stat=args.stat)
    elif m <= args.graph_max_m:
        _time_cuda_graphs_interleaved(entries, args)
    else:
        for row, call, ctx in entries:
            try:
                with ctx():
                    row["time_s"], row["timing"] = time_cuda_events(call, args.budget), "events"
            except Exception as e:  # noqa: BLE001
                row["error"] = _error_text(e)
    for row, _, _ in entries:
        if "time_s" in row:
            row["gbps"] = row["bytes"] / row["time_s"] / 1e9
    # release the input sets now (GBs at large M on CUDA), before the next shape allocates its own
    sets.clear()
    entries.clear()
    if device == "cuda":
        torch.cuda.empty_cache()
    add_ratios(rows)
    return rows


def _compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process (to tell a fresh compile from a reused one)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        return -1


def _time_cuda_graphs_interleaved(entries, args) -> None:
    """One CUDA graph per implementation (each touching every buffer set once, so replays do not
    hit in L2), then their replays alternate: the with-pass / without-pass ratio is not skewed by
    clock drift between two separate timing loops. An implementation whose capture fails falls
    back to per-call events and says so."""
    graphs, counts, timed = [], [], []
    for row, call, ctx in entries:
        per_graph = int(min(1024, max(20, getattr(call, "n_data", 20))))
        try:
            with ctx():
                graphs.append(capture_cuda_graph(call, per_graph))
            counts.append(per_graph)
            timed.append(row)
            row["timing"] = f"graph x{per_graph}"
        except Exception as e:  # noqa: BLE001 - fall back to per-call events
            torch.cuda.synchronize()
            try:
                with ctx():
                    row["time_s"] = time_cuda_events(call, args.budget)
                row["timing"] = f"events (graph capture failed: {type(e).__name__})"
            except Exception as e2:  # noqa: BLE001
                row["error"] = _error_text(e2)
    if graphs:
        times = time_graph_replays(graphs, counts, replays=getattr(args, "replays", 30) or 30)
        for row, t in zip(timed, times):
            row["time_s"] = t
    del graphs


def add_ratios(rows: List[Dict[str, object]]) -> None:
    """x_eager / x_inductor (that time over this row's time, higher is better) and pct_copy, within
    one shape's rows."""
    by = {r["impl"]: r for r in rows if "time_s" in r}
    for r in rows:
        if "time_s" not in r:
            continue
        if "copy" in by:
            r["pct_copy"] = 100.0 * r["gbps"] / by["copy"]["gbps"]
        if "eager" in by:
            r["x_eager"] = by["eager"]["time_s"] / r["time_s"]
        if "inductor" in by:
            r["x_inductor"] = by["inductor"]["time_s"] / r["time_s"]


def shape_summaries(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """One record per shape with the raw times of every implementation side by side (the material
    for a measured profitability rule: where is inductor+pass faster than inductor?)."""
    shapes: Dict[tuple, Dict[str, object]] = {}
    for r in rows:
        key = (r["topk"], r["K"], r["M"])
        s = shapes.setdefault(key, {"M": r["M"], "K": r["K"], "topk": r["topk"], "dtype": r["dtype"],
                                    "bytes": r["bytes"], "times_s": {}, "timing": {}})
        if "time_s" in r:
            s["times_s"][r["impl"]] = r["time_s"]
            s["timing"][r["impl"]] = r.get("timing", "")
            if "pct_copy" in r and r["impl"] != "copy":
                s[f"pct_copy_{r['impl']}"] = r["pct_copy"]
        if r["impl"] == "inductor+pass" and "rewrites" in r:
            s["pass_rewrites"] = r["rewrites"]
    out = []
    for key in sorted(shapes):
        s = shapes[key]
        t = s["times_s"]
        op = t.get("cuda", t.get("op"))
        if "inductor" in t and "inductor+pass" in t:
            s["with_over_without_speed"] = t["inductor"] / t["inductor+pass"]
        if "inductor" in t and op is not None:
            s["op_over_inductor_speed"] = t["inductor"] / op
        out.append(s)
    return out
