"""``python -m fused_moe_ops.benchmark``: the MoE combine step, every implementation side by side.

For each shape (M tokens, top-k, hidden size K, dtype) one run times, on the same data:

    eager          the seed line, plain PyTorch:
                   (c2[c_map].view(m, topk, k) * w.view(m, topk, 1).to(c2.dtype)).sum(dim=1)
    inductor       torch.compile of the seed line with our pass disabled (Inductor's own kernel)
    inductor+pass  torch.compile of the seed line with our pass (rewritten into moe.shuffle_mul_sum)
    op             torch.ops.moe.shuffle_mul_sum with the C++ CPU kernel       (CPU)
    cuda           torch.ops.moe.shuffle_mul_sum with the C++ CUDA kernel      (CUDA, when built)
    triton         fused_moe_ops.triton_kernel.shuffle_mul_sum_triton          (CUDA)
    copy           dst.copy_(src) moving the same number of bytes: the bandwidth ceiling, measured
                   on the spot

Bytes of a call = input rows read (M*topk*K) + output written (M*K), times the element size; the
copy moves half that many bytes each way, so its read+write total is the same. GB/s = bytes /
time (1 GB = 1e9 B); "%copy" = GB/s / copy's GB/s in the same run; "x eager" / "x ind" = the
eager / inductor time over this row's time (higher is better).

Timing. CPU: wall clock (time.perf_counter) of batches of calls, median over batches. CUDA: CUDA
events, median over calls; for M <= --graph-max-m the calls are captured in a CUDA graph (20 per
graph, each on a different buffer set) and the replay time / 20 is what is reported, which is
what a graph-replayed serving step pays. Inputs rotate through enough buffer sets to exceed
--rotate-mb (default 4x the L2 on CUDA, 4x the L3 on CPU), so the cache is not what is measured.
Every implementation's output is checked against the float32 reference once per shape
(a mismatch is flagged in the "note" column and in the JSON).

    python -m fused_moe_ops.benchmark                       # default shapes for the device
    python -m fused_moe_ops.benchmark --quick               # two shapes, short
    python -m fused_moe_ops.benchmark --device cuda --k 7168 --m 1,64,4096 --json out.json --plot bw.png
    python -m fused_moe_ops.benchmark --model               # compiled MoE block, with vs without the pass

The fusion pass API (fused_moe_ops.disable_fusion / fusion_stats) is optional: without it the
"inductor+pass" rows are skipped and said so.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from typing import Callable, Dict, List, Optional, Sequence

import torch

import fused_moe_ops
from fused_moe_ops import _registry
from fused_moe_ops.reference import shuffle_mul_sum_reference

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "f16": torch.float16, "float16": torch.float16,
          "fp16": torch.float16, "f32": torch.float32, "float32": torch.float32}

CPU_DEFAULT_M = [1, 8, 64, 512, 1024]
GPU_DEFAULT_M = [1, 8, 64, 512, 4096, 16384]
DEFAULT_K = [4096, 7168]
QUICK_M = {"cpu": [1, 1024], "cuda": [1, 64, 4096]}
QUICK_K = {"cpu": [4096, 7168], "cuda": [7168]}

ALL_IMPLS = ("eager", "inductor", "inductor+pass", "op", "cuda", "triton", "copy")


# ------------------------------------------------------------------------------------------------
# The seed spelling (what models write; what the pass rewrites)
# ------------------------------------------------------------------------------------------------
def seed_combine(c2: torch.Tensor, c_map: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    m, topk = topk_weights.shape
    k = c2.shape[1]
    return (c2[c_map].view(m, topk, k) * topk_weights.view(m, topk, 1).to(c2.dtype)).sum(dim=1)


# ------------------------------------------------------------------------------------------------
# Fusion pass API (owned by fused_moe_ops.fusion; may be absent)
# ------------------------------------------------------------------------------------------------
def fusion_api_reason() -> Optional[str]:
    if not callable(getattr(fused_moe_ops, "disable_fusion", None)):
        return "fusion pass API absent (fused_moe_ops.disable_fusion not found)"
    return None


def fusion_rewrites() -> Optional[int]:
    stats = getattr(fused_moe_ops, "fusion_stats", None)
    if not callable(stats):
        return None
    try:
        return int(stats().get("rewrites", 0))
    except Exception:  # noqa: BLE001
        return None


@contextlib.contextmanager
def pass_disabled():
    reason = fusion_api_reason()
    if reason is not None:
        yield
        return
    with fused_moe_ops.disable_fusion():
        yield


def _fresh_copy(fn: Callable) -> Callable:
    """fn with a code object of its own. Dynamo keeps compiled code per code object, so two
    torch.compile wrappers of one function share (and overwrite) one cache: the "without pass"
    wrapper would end up running the "with pass" code. A copy per variant keeps them apart."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def compile_fresh(fn: Callable, with_pass: bool):
    """torch.compile of fn that shares no compiled code with any other variant (its own code
    object; the FX graph cache is off for the whole run, see main), so the pass really runs, or
    really does not, on its first call. with_pass only documents the intent: the caller compiles
    inside `with fused_moe_ops.disable_fusion():` for the variant without it."""
    if isinstance(fn, torch.nn.Module):
        module = fn

        def fn(x):
            return module(x)

    return torch.compile(_fresh_copy(fn), dynamic=False)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_cpu_interleaved(entries, budget_s: float, min_rounds: int = 5, max_rounds: int = 400,
                         stat: str = "median") -> None:
    """CPU wall-clock timing, interleaved: each round runs one short batch of every implementation
    in turn, so load from other processes on a shared machine hits them all alike. Sets
    row["time_s"] (median over rounds of the per-call time in a batch) and row["time_min_s"]."""
    est = []
    for row, call, ctx in entries:
        with ctx():
            call(1)
            t0 = time.perf_counter()
            call(2)
            est.append(max(time.perf_counter() - t0, 1e-7))
    if not entries:
        return
    inner = [max(1, int(50e-6 / e)) for e in est]  # batches of >= 50 us: timer resolution, not preemption
    per_round = sum(e * n for e, n in zip(est, inner))
    rounds = int(min(max_rounds, max(min_rounds, budget_s * len(entries) / per_round)))
    times = [[] for _ in entries]
    c = 3
    for _ in range(rounds):
        for idx, (row, call, ctx) in enumerate(entries):
            n = inner[idx]
            with ctx():
                t0 = time.perf_counter()
                for _ in range(n):
                    call(c)
                    c += 1
                times[idx].append((time.perf_counter() - t0) / n)
    for (row, _, _), ts, n in zip(entries, times, inner):
        row["time_median_s"] = statistics.median(ts)
        row["time_min_s"] = min(ts)
        row["time_s"] = row["time_min_s"] if stat == "min" else row["time_median_s"]
        row["stat"] = stat
        row["timing"] = "wall"
        row["rounds"] = len(ts)
        row["calls_per_batch"] = n


def time_cuda_events(call: Callable[[int], object], budget_s: float) -> float:
    call(0)
    call(1)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    call(2)
    e.record()
    e.synchronize()
    est = max(s.elapsed_time(e) / 1e3, 1e-6)
    reps = int(min(200, max(10, budget_s / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        starts[r].record()
        call(3 + r)
        ends[r].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends)) / 1e3


def time_cuda_graph(call: Callable[[int], object], per_graph: int = 20, replays: int = 30) -> float:
    """Capture per_graph calls (each on another buffer set) in one CUDA graph; median replay / per_graph."""
    for i in range(3):  # warm up (autotuning, lazy init) before capture, on a side stream as torch advises
        call(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(0)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for i in range(per_graph):
            call(i)
    g.replay()
    torch.cuda.synchronize()
    s = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    e = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for r in range(replays):
        s[r].record()
        g.replay()
        e[r].record()
    torch.cuda.synchronize()
    t = statistics.median(a.elapsed_time(b) for a, b in zip(s, e)) / 1e3 / per_graph
    del g
    return t


# ------------------------------------------------------------------------------------------------
# Machine description
# ------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    isa = ""
    try:
        from fused_moe_ops._build import cpu_isa

        isa = cpu_isa()
    except Exception:  # noqa: BLE001
        pass
    return f"{name}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads" + (
        f", {isa.upper()}" if isa and isa != "default" else "")


def machine(device: str) -> Dict[str, object]:
    info: Dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "backends": dict(_registry.ACTIVE),
        "fallback_reasons": dict(_registry.FALLBACK_REASONS),
        "fusion_api": fusion_api_reason() or "present",
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
        info["gpu_l2_mb"] = getattr(p, "L2_cache_size", 0) / 2**20
    return info


def machine_label(info: Dict[str, object], device: str) -> str:
    if device == "cuda":
        return str(info.get("gpu", "GPU")).split(",")[0]
    return str(info["cpu"]).split(",")[0] + f" ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})"


# ------------------------------------------------------------------------------------------------
# One shape
# ------------------------------------------------------------------------------------------------
def _make_sets(device, dtype, m, topk, k, n_sets, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        r = m * topk
        c2 = torch.randn(r, k, generator=g, device=device, dtype=torch.float32).to(dtype)
        c_map = torch.randperm(r, generator=g, device=device)  # int64, as models index with
        w = torch.rand(m, topk, generator=g, device=device, dtype=torch.float32)
        sets.append((c2, c_map, w / w.sum(-1, keepdim=True)))
    return sets


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    if got.shape != ref.shape:
        return False
    if ref.numel() == 0:
        return True
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    err = (got.float() - ref.float()).abs().max().item()
    return math.isfinite(err) and err <= tol * (ref.float().abs().max().item() + 1e-6)


def bench_shape(device: str, dtype: torch.dtype, m: int, topk: int, k: int, impls: Sequence[str],
                args) -> List[Dict[str, object]]:
    esize = torch.tensor([], dtype=dtype).element_size()
    nbytes = (m * topk * k + m * k) * esize  # bytes a call moves: input rows read + output written
    n_sets = int(min(args.max_sets, max(2, math.ceil(args.rotate_mb * 2**20 / max(nbytes, 1)))))
    torch._dynamo.reset()  # once per shape, never between variants (their entries must survive)
    sets = _make_sets(device, dtype, m, topk, k, n_sets)
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
                _sync(device)
            if check and not _close(out, ref, dtype):
                row["note"] = (note + " MISMATCH vs reference").strip()
                row["mismatch"] = True

            def call(i, _fn=fn, _data=data):
                return _fn(*_data[i % len(_data)])

            call.n_data = len(data)
            entries.append((row, call, ctx))
        except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            row["note"] = (note + " ERROR").strip()
        return row

    for name in impls:
        if name == "eager":
            prepare("eager", seed_combine)
        elif name == "inductor":
            before = fusion_rewrites()
            fn = compile_fresh(seed_combine, with_pass=False)
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
            before = fusion_rewrites()
            fn = compile_fresh(seed_combine, with_pass=True)
            row = prepare("inductor+pass", fn)
            after = fusion_rewrites()
            if before is not None and after is not None:
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
            n_copy = int(min(args.max_sets, max(2, math.ceil(args.rotate_mb * 2**20 / max(2 * half * esize, 1)))))
            bufs = []
            for _ in range(n_copy):
                src = torch.randn(half, dtype=torch.float32, device=device).to(dtype)
                bufs.append((src, torch.empty_like(src)))
            row = prepare("copy", lambda src, dst: dst.copy_(src), note="bandwidth ceiling", bufs=bufs, check=False)
            row["bytes"] = 2 * half * esize

    # timing
    if device == "cpu":
        time_cpu_interleaved(entries, args.budget, min_rounds=args.min_rounds, stat=args.stat)
    else:
        use_graph = m <= args.graph_max_m
        for row, call, ctx in entries:
            try:
                with ctx():
                    if use_graph:
                        try:
                            # one graph touches every buffer set once, so replays do not hit in L2
                            per_graph = int(min(1024, max(20, getattr(call, "n_data", 20))))
                            row["time_s"] = time_cuda_graph(call, per_graph=per_graph)
                            row["timing"] = f"graph x{per_graph}"
                        except Exception as e:  # noqa: BLE001 - fall back to per-call events
                            torch.cuda.synchronize()
                            row["time_s"] = time_cuda_events(call, args.budget)
                            row["timing"] = f"events (graph capture failed: {type(e).__name__})"
                    else:
                        row["time_s"], row["timing"] = time_cuda_events(call, args.budget), "events"
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    for row, _, _ in entries:
        if "time_s" in row:
            row["gbps"] = row["bytes"] / row["time_s"] / 1e9
    del sets, entries
    if device == "cuda":
        torch.cuda.empty_cache()
    # ratios
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
    return rows


# ------------------------------------------------------------------------------------------------
# Compiled model comparison
# ------------------------------------------------------------------------------------------------
class TinyMoE(torch.nn.Module):
    """Router linear + softmax + top-k + per-expert MLPs + the seed-spelling combine.

    Every expert runs on every (sorted) slot and a mask keeps its rows (static shapes, no graph
    break); the combine at the end is the seed line, which the pass should rewrite.
    """

    def __init__(self, hidden: int, inter: int, experts: int, topk: int):
        super().__init__()
        self.topk, self.experts = topk, experts
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(experts, hidden, inter) / math.sqrt(hidden))
        self.w2 = torch.nn.Parameter(torch.randn(experts, inter, hidden) / math.sqrt(inter))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, hidden = x.shape
        probs = torch.softmax(self.router(x), dim=-1, dtype=torch.float32)
        topk_weights, topk_ids = torch.topk(probs, self.topk, dim=-1)
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)          # sorted row -> slot
        xs = x[order // self.topk]
        expert_of_row = flat[order]
        c2 = torch.zeros_like(xs)
        for e in range(self.experts):
            h = torch.nn.functional.silu(xs @ self.w1[e]) @ self.w2[e]
            c2 = torch.where((expert_of_row == e).unsqueeze(-1), h, c2)
        c_map = torch.argsort(order)                      # slot -> sorted row
        return (c2[c_map].view(m, self.topk, hidden) * topk_weights.view(m, self.topk, 1).to(c2.dtype)).sum(dim=1)


def _compiled_frames() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["stats"].values()))
    except Exception:  # noqa: BLE001
        return -1


def bench_model(device: str, dtype: torch.dtype, ms: Sequence[int], args) -> List[Dict[str, object]]:
    """TinyMoE compiled without and with the pass, timed side by side (interleaved on CPU). One
    compile per variant with the token dimension dynamic (as serving engines compile), unless
    --model-static (one compile per M)."""
    hidden, inter, experts, topk = args.model_hidden, args.model_inter, args.model_experts, args.model_topk
    torch.manual_seed(0)
    model = TinyMoE(hidden, inter, experts, topk).to(device=device, dtype=dtype).eval()
    inputs = {m: [torch.randn(m, hidden, device=device, dtype=dtype) for _ in range(4)] for m in ms}
    variants = [("without_pass", pass_disabled)]
    if fusion_api_reason() is None:
        variants.append(("with_pass", contextlib.nullcontext))
    torch._dynamo.reset()
    fns = {name: None for name, _ in variants}
    rows = []
    # the largest M first: a dynamic compile traced at M=1 would specialise on 1
    for m in sorted(ms, reverse=True):
        r: Dict[str, object] = {"mode": "model", "M": m, "hidden": hidden, "inter": inter, "experts": experts,
                                "topk": topk, "dtype": str(dtype).replace("torch.", ""), "device": device,
                                "compile": "static" if args.model_static else "dynamic M"}
        if fusion_api_reason():
            r["with_pass_skipped"] = fusion_api_reason()
        rows.append(r)
        entries, outs = [], {}
        with torch.no_grad():
            for name, ctx in variants:
                try:
                    with ctx():
                        before, frames = fusion_rewrites(), _compiled_frames()
                        if fns[name] is None or args.model_static:
                            fns[name] = compile_fresh(model, with_pass=name == "with_pass")
                        x0 = inputs[m][0]
                        if not args.model_static and m > 1:
                            torch._dynamo.mark_dynamic(x0, 0)
                        t0 = time.perf_counter()
                        outs[name] = fns[name](x0).float()
                        _sync(device)
                        r[f"{name}_first_call_s"] = time.perf_counter() - t0
                        after = fusion_rewrites()
                    r[f"{name}_compiled_here"] = _compiled_frames() != frames
                    if before is not None and after is not None:
                        # rewrites made by compiles during this M (none when it reused an earlier compile)
                        r[f"{name}_rewrites"] = after - before

                    def call(i, _fn=fns[name], _xs=inputs[m]):
                        return _fn(_xs[i % len(_xs)])

                    entries.append((name, call, ctx))
                except Exception as e:  # noqa: BLE001
                    r[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            tmp = {name: {} for name, _, _ in entries}
            if device == "cpu":
                time_cpu_interleaved([(tmp[n], c, x) for n, c, x in entries], args.budget,
                                     min_rounds=args.min_rounds, stat=args.stat)
            else:
                for n, c, x in entries:
                    try:
                        with x():
                            tmp[n]["time_s"] = time_cuda_graph(c, per_graph=5, replays=20) \
                                if m <= args.graph_max_m else time_cuda_events(c, args.budget)
                    except Exception as e:  # noqa: BLE001
                        r[f"{n}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            for n in tmp:
                if "time_s" in tmp[n]:
                    r[f"{n}_s"] = tmp[n]["time_s"]
        if "with_pass_s" in r and "without_pass_s" in r:
            r["ratio_without_over_with"] = r["without_pass_s"] / r["with_pass_s"]
        if "without_pass" in outs and "with_pass" in outs:
            a, b = outs["without_pass"], outs["with_pass"]
            r["max_abs_diff"] = (a - b).abs().max().item()
            r["outputs_close"] = _close(b, a, dtype)
    rows.sort(key=lambda r: ms.index(r["M"]))
    return rows


# ------------------------------------------------------------------------------------------------
# Targets of issue 4 (items 3 and 5), evaluated on this run's rows
# ------------------------------------------------------------------------------------------------
def evaluate_targets(rows, device: str, model_rows=()) -> List[Dict[str, object]]:
    out = []
    if not rows:
        return _model_targets(out, device, model_rows)

    def get(impl, m, k):
        for r in rows:
            if r["impl"] == impl and r["M"] == m and r["K"] == k and "time_s" in r:
                return r
        return None

    def add(name, ok, detail):
        out.append({"target": name, "status": "N/A" if ok is None else ("PASS" if ok else "FAIL"), "detail": detail})

    if device == "cpu":
        r = get("op", 1024, 4096)
        if r and "x_eager" in r and "x_inductor" in r and "pct_copy" in r:
            add("CPU M1024 K4096: op >= 5x eager", r["x_eager"] >= 5, f"{r['x_eager']:.1f}x")
            add("CPU M1024 K4096: op >= 5x inductor", r["x_inductor"] >= 5, f"{r['x_inductor']:.1f}x")
            add("CPU M1024 K4096: op >= 40% of copy BW", r["pct_copy"] >= 40, f"{r['pct_copy']:.0f}%")
        else:
            add("CPU M1024 K4096 targets", None, "shape/impls not in this run")
        r = get("op", 1, 7168)
        add("CPU M1 K7168: op call < 20 us", None if r is None else r["time_s"] < 20e-6,
            "shape not in this run" if r is None else f"{r['time_s'] * 1e6:.1f} us")
    else:
        big = [r for r in rows if r["impl"] == "cuda" and r["M"] >= 4096 and "pct_copy" in r]
        add("CUDA M>=4096: cuda >= 85% of copy BW", (min(r["pct_copy"] for r in big) >= 85) if big else None,
            ", ".join(f"M{r['M']} K{r['K']}: {r['pct_copy']:.0f}%" for r in big) or "no rows")
        small = [r for r in rows if r["impl"] == "cuda" and r["M"] <= 64 and "time_s" in r]
        add("CUDA M<=64: cuda call (graph) <= 5 us",
            (max(r["time_s"] for r in small) <= 5e-6) if small else None,
            ", ".join(f"M{r['M']} K{r['K']}: {r['time_s'] * 1e6:.2f} us" for r in small) or "no rows")
        pairs = [(get("cuda", r["M"], r["K"]), r) for r in rows if r["impl"] == "triton" and "time_s" in r]
        pairs = [(c, t) for c, t in pairs if c is not None]
        add("CUDA: cuda <= triton at every shape",
            all(c["time_s"] <= t["time_s"] for c, t in pairs) if pairs else None,
            ", ".join(f"M{c['M']} K{c['K']}: {t['time_s'] / c['time_s']:.2f}x" for c, t in pairs) or "no rows")
    passes = [r for r in rows if r["impl"] == "inductor+pass" and "x_inductor" in r]
    add(f"{device.upper()}: compiled-with-pass >= 0.98x compiled-without at every shape",
        (min(r["x_inductor"] for r in passes) >= 0.98) if passes else None,
        ", ".join(f"M{r['M']} K{r['K']}: {r['x_inductor']:.2f}" for r in passes) or "no rows")
    return _model_targets(out, device, model_rows)


def _model_targets(out, device, model_rows):
    mr = [r for r in model_rows if "ratio_without_over_with" in r]
    if model_rows:
        ok = (min(r["ratio_without_over_with"] for r in mr) >= 0.98) if mr else None
        out.append({"target": f"{device.upper()} model: with-pass >= 0.98x without at every M",
                    "status": "N/A" if ok is None else ("PASS" if ok else "FAIL"),
                    "detail": ", ".join(f"M{r['M']}: {r['ratio_without_over_with']:.2f}" for r in mr) or "no rows"})
    return out


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def _fmt_time(t: float) -> str:
    if t < 1e-3:
        return f"{t * 1e6:.2f} us"
    if t < 1:
        return f"{t * 1e3:.3f} ms"
    return f"{t:.2f} s"


def print_table(rows, file=sys.stdout) -> None:
    hdr = f"{'impl':<14}{'M':>7}{'K':>6}{'time':>12}{'GB/s':>9}{'%copy':>7}{'x eager':>9}{'x ind':>8}  note"
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    last = None
    for r in rows:
        if last is not None and (r["M"], r["K"]) != last:
            print(file=file)
        last = (r["M"], r["K"])
        if "time_s" not in r:
            why = r.get("skipped") or r.get("error") or ""
            print(f"{r['impl']:<14}{r['M']:>7}{r['K']:>6}{'-':>12}{'-':>9}{'-':>7}{'-':>9}{'-':>8}  {why[:90]}",
                  file=file)
            continue
        f = lambda key, spec: format(r[key], spec) if key in r else "-"  # noqa: E731
        note = r.get("note", "")
        if r.get("timing") and r["timing"] != "wall":
            note = (r["timing"] + " " + note).strip()
        print(f"{r['impl']:<14}{r['M']:>7}{r['K']:>6}{_fmt_time(r['time_s']):>12}{f('gbps', '.1f'):>9}"
              f"{f('pct_copy', '.0f'):>7}{f('x_eager', '.2f'):>9}{f('x_inductor', '.2f'):>8}  {note}", file=file)


def print_model(rows, file=sys.stdout) -> None:
    print(f"{'M':>7}{'without pass':>15}{'with pass':>15}{'ratio':>8}  rewrites  outputs", file=file)
    for r in rows:
        a = _fmt_time(r["without_pass_s"]) if "without_pass_s" in r else r.get("without_pass_error", "-")[:14]
        b = _fmt_time(r["with_pass_s"]) if "with_pass_s" in r else (
            r.get("with_pass_error") or r.get("with_pass_skipped") or "-")[:14]
        ratio = f"{r['ratio_without_over_with']:.2f}" if "ratio_without_over_with" in r else "-"
        rw = r.get("with_pass_rewrites", "-") if r.get("with_pass_compiled_here", True) else "reused"
        print(f"{r['M']:>7}{a:>15}{b:>15}{ratio:>8}  {str(rw):>8}  "
              f"{'close' if r.get('outputs_close') else ('DIFFER' if 'outputs_close' in r else '-')}", file=file)


def markdown_table(rows, machine_name: str) -> str:
    """The sweep as a Markdown table (docs/BENCHMARKS.md, the README performance section)."""
    out = ["| machine | impl | M | K | time | GB/s | % of copy | x eager | x inductor |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "time_s" not in r:
            continue
        f = lambda key, spec: format(r[key], spec) if key in r else "-"  # noqa: E731
        out.append(f"| {machine_name} | {r['impl']} | {r['M']} | {r['K']} | {_fmt_time(r['time_s'])} | "
                   f"{f('gbps', '.1f')} | {f('pct_copy', '.0f')}% | {f('x_eager', '.1f')} | {f('x_inductor', '.1f')} |")
    return "\n".join(out) + "\n"


def plot(rows, path: str, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: {e}"
    ks = sorted({r["K"] for r in rows})
    fig, axes = plt.subplots(1, len(ks), figsize=(6 * len(ks), 4.5), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for impl in ALL_IMPLS:
            pts = sorted((r["M"], r["gbps"]) for r in rows if r["K"] == k and r["impl"] == impl and "gbps" in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="--" if impl == "copy" else "-", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens M")
        ax.set_ylabel("effective GB/s (input rows read + output written)")
        ax.set_title(f"K={k}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


# ------------------------------------------------------------------------------------------------
def _write_json(path: str, result) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


def _ints(s: str) -> List[int]:
    return [int(x) for x in s.replace(" ", "").split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fused_moe_ops.benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="bf16", help="bf16 | f16 | f32 (default bf16)")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--k", type=_ints, default=None, help="comma list of hidden sizes (default 4096,7168)")
    p.add_argument("--m", type=_ints, default=None,
                   help="comma list of token counts (default CPU 1,8,64,512,1024; GPU 1,8,64,512,4096,16384)")
    p.add_argument("--impls", default=None, help=f"comma subset of {','.join(ALL_IMPLS)} (default: all for the device)")
    p.add_argument("--quick", action="store_true", help="few shapes, short timing budget")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per implementation and shape")
    p.add_argument("--rotate-mb", type=float, default=None,
                   help="rotate inputs over at least this many MiB (default 4x L2 on CUDA, 128 on CPU)")
    p.add_argument("--max-sets", type=int, default=1024, help="at most this many rotating buffer sets")
    p.add_argument("--graph-max-m", type=int, default=512, help="CUDA: replay a CUDA graph for M <= this")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="CPU: statistic over the interleaved rounds used for time / GB/s / ratios (both are in the "
                        "JSON); 'min' is the least-disturbed round on a shared machine")
    p.add_argument("--min-rounds", type=int, default=5, help="CPU: at least this many interleaved rounds")
    p.add_argument("--json", dest="json_path", default=None, help="write all rows + machine info here")
    p.add_argument("--plot", dest="plot_path", default=None, help="PNG of GB/s against M")
    p.add_argument("--markdown", dest="md_path", default=None, help="also write the sweep as a Markdown table here")
    p.add_argument("--model", action="store_true", help="compiled MoE block with vs without the pass (instead of the sweep)")
    p.add_argument("--model-m", type=_ints, default=None, help="token counts for --model")
    p.add_argument("--model-hidden", type=int, default=None)
    p.add_argument("--model-inter", type=int, default=None)
    p.add_argument("--model-experts", type=int, default=8)
    p.add_argument("--model-topk", type=int, default=2)
    p.add_argument("--model-static", action="store_true", help="--model: compile per M instead of once with M dynamic")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("benchmark: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype.lower()]
    # The pass must really run (or really not) on every compile: no FX graph cache hits across
    # the with / without variants. Generated kernels are still cached on disk by source.
    torch._inductor.config.fx_graph_cache = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if args.budget is None:
        args.budget = (0.15 if args.quick else 0.4) if device == "cpu" else (0.05 if args.quick else 0.15)
    if args.rotate_mb is None:
        if device == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) / 2**20
            args.rotate_mb = 4 * max(l2, 50)
        else:
            args.rotate_mb = 128.0
    info = machine(device)
    label = machine_label(info, device)
    print(f"# fused_moe_ops benchmark, {info['date_utc']}")
    print(f"# machine: {info.get('gpu') or ''}{' / ' if device == 'cuda' else ''}{info['cpu']}")
    print(f"# torch {info['torch']}, triton {info['triton']}, python {info['python']}, backends {info['backends']}, "
          f"fusion pass: {info['fusion_api']}")
    result = {"machine": info, "device": device, "dtype": str(dtype).replace("torch.", ""), "args": vars(args)}

    if args.model:
        if args.model_hidden is None:
            args.model_hidden = 2048 if device == "cuda" else 512
        if args.model_inter is None:
            args.model_inter = 1024 if device == "cuda" else 256
        ms = args.model_m or ([1, 64, 1024, 4096] if device == "cuda" else [1, 64, 256])
        print(f"# compiled model comparison: TinyMoE(hidden={args.model_hidden}, inter={args.model_inter}, "
              f"experts={args.model_experts}, topk={args.model_topk}), {result['dtype']}, on {label}")
        model_rows = bench_model(device, dtype, ms, args)
        print_model(model_rows)
        result["model_rows"] = model_rows
        result["targets"] = evaluate_targets([], device, model_rows)
    else:
        ks = args.k or (QUICK_K[device] if args.quick else DEFAULT_K)
        ms = args.m or (QUICK_M[device] if args.quick else (GPU_DEFAULT_M if device == "cuda" else CPU_DEFAULT_M))
        wanted = args.impls.split(",") if args.impls else list(ALL_IMPLS)
        impls = [i for i in wanted if i in ALL_IMPLS and
                 not (device == "cpu" and i in ("cuda", "triton")) and not (device == "cuda" and i == "op")]
        print(f"# sweep: {result['dtype']}, topk {args.topk}, K {ks}, M {ms}, on {label}; "
              f"timing budget {args.budget}s/impl/shape, rotating >= {args.rotate_mb:.0f} MiB"
          + (f", CPU statistic: {args.stat} over >= {args.min_rounds} interleaved rounds" if device == "cpu" else ""))
        rows = []
        t0 = time.time()
        for k in ks:
            for m in ms:
                shape_rows = bench_shape(device, dtype, m, args.topk, k, impls, args)
                rows.extend(shape_rows)
                print_table(shape_rows)
                print(flush=True)
                if args.json_path:  # partial results survive a timeout
                    _write_json(args.json_path, dict(result, rows=rows, partial=True))
        print(f"# sweep took {time.time() - t0:.0f} s\n# all shapes:")
        print_table(rows)
        result["rows"] = rows
        result["targets"] = evaluate_targets(rows, device)
        if args.md_path:
            with open(args.md_path, "w") as f:
                f.write(markdown_table(rows, label))
            print(f"# markdown: {args.md_path}")
        if args.plot_path:
            msg = plot(rows, args.plot_path, f"moe.shuffle_mul_sum, {result['dtype']}, topk {args.topk}, {label}, "
                                              f"torch {info['torch']}, {info['date_utc']}")
            print(f"# plot: {msg or args.plot_path}")
    if hasattr(os, "getloadavg"):
        info["loadavg_at_end"] = os.getloadavg()
        print(f"# load average at start {info['loadavg_at_start'][0]:.2f}, at end {info['loadavg_at_end'][0]:.2f} "
              f"({os.cpu_count()} cores; above that, other processes shared the CPUs with this run)")
    print("\n# targets (issue 4), this run:")
    for t in result["targets"]:
        print(f"  {t['status']:<5} {t['target']}: {t['detail']}")
    if args.json_path:
        _write_json(args.json_path, result)
        print(f"# json: {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
