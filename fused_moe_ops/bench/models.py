"""Model-level benchmark: a whole MoE model compiled without and with the fusion pass, timed side by side.

Models ("cases"): ``tiny`` (TinyMoE below: a router, per-expert MLPs and the seed-spelling
combine) and, when transformers imports, ``qwen3_moe``, ``qwen2_moe``, ``mixtral`` and ``deepseek_v3``
(hf_models.py: 2 decoder layers built from transformers' own classes).

Fairness. Both variants are compiled from one model (same weights, same inputs) with separate
code objects (variants.compile_fresh), so neither runs the other's code. On CPU the two are timed
in alternating rounds (timing.time_cpu_interleaved, median over rounds): load from other processes
hits both alike. On CUDA each variant's calls are captured in a CUDA graph and the two graphs'
replays alternate (timing.time_graph_replays); above --graph-max-m per-call CUDA events.

Compilation: once per variant with the token count dynamic (as serving engines compile; a
dynamic compile traced at 1 token would specialise on 1, so the largest count goes first and 1
gets its own compile), or, with static=True, once per token count.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .sweep import outputs_close
from .timing import capture_cuda_graph, sync, time_cpu_interleaved, time_cuda_events, time_graph_replays
from .variants import compile_fresh, fusion_api_reason, fusion_rewrites, fusion_rewrites_by_pattern, pass_disabled

MODEL_SET_ALL = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "tiny")  # the HF models first: a run cut short still has them
CPU_DEFAULT_MODEL_M = [1, 16, 256, 1024, 4096]
GPU_DEFAULT_MODEL_M = [1, 8, 64, 512, 4096]


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


def build_tiny(device: str, dtype: torch.dtype, hidden: int, inter: int, experts: int, topk: int):
    """(forward, make_input(m, seed), token_dim, description) of TinyMoE, like hf_models.build_hf_model."""
    torch.manual_seed(0)
    model = TinyMoE(hidden, inter, experts, topk).to(device=device, dtype=dtype).eval()

    def make_input(m: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(m, hidden, generator=g, device=device, dtype=torch.float32).to(dtype)

    desc = {"class": "TinyMoE", "hidden": hidden, "inter": inter, "experts": experts, "topk": topk}
    return model, make_input, 0, desc


def count_launches(codes: Sequence[str]) -> Optional[Dict[str, int]]:
    """Kernel launches in Inductor's generated code (the body of call()): "generated" (Inductor's
    own C++/Triton kernels) and "extern" (aten / extern / custom-op calls such as
    moe.shuffle_mul_sum). None when nothing was compiled (the call reused an earlier compile)."""
    if not codes:
        return None
    generated = extern = 0
    pattern = re.compile(r"^\s+(?:\w+ = )?(cpp_fused_\w+|triton_\w+|extern_kernels\.\w+|torch\.ops\.\w+\.\w+\.\w+)"
                         r"(?:\.run)?\(", re.M)
    for code in codes:
        body = code[code.find("def call("):] if "def call(" in code else code
        for name in pattern.findall(body):
            if name.startswith(("cpp_fused", "triton_")):
                generated += 1
            else:
                extern += 1
    return {"generated": generated, "extern": extern}


def _first_call(fn, x):
    """fn(x), with the code Inductor generates for it if this call compiles (an empty list when it
    reuses an earlier compile). Not torch._inductor.utils.run_and_get_code: that one calls
    torch._dynamo.reset() first, which would throw away the other variant's compiled code (it
    would then recompile, static, inside the timing loop)."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    from torch._inductor.virtualized import V

    codes: List[str] = []

    def save(code: str) -> None:
        # Not the modules Inductor compiles to benchmark a custom op's choices (fusion/autotune.py):
        # those never run in the model.
        if not str(getattr(V.graph, "name", None) or "").startswith("benchmark_"):
            codes.append(code)

    with mock.patch.object(GraphLowering, "save_output_code", save):
        out = fn(x)
    return out, codes


def _inductor_cache(fresh: bool):
    """An empty Inductor cache for the compile inside (a user's first compile), or the one in use."""
    if not fresh:
        return contextlib.nullcontext()
    from torch._inductor import utils as inductor_utils

    return (getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache)()


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def bench_model_case(name: str, forward: Callable, make_input: Callable[[int, int], torch.Tensor], token_dim: int,
                     desc: Dict[str, object], device: str, dtype: torch.dtype, ms: Sequence[int],
                     args, on_row: Optional[Callable[[Dict[str, object]], None]] = None) -> List[Dict[str, object]]:
    """One row per token count: the model compiled without and with the pass, timed side by side.

    args: budget, min_rounds, stat (CPU); graph_max_m (CUDA); model_static; model_fullgraph.
    on_row(row) is called as each row is complete (progress, partial JSON)."""
    variants: List[Tuple[str, Callable]] = [("without_pass", pass_disabled)]
    if fusion_api_reason() is None:
        variants.append(("with_pass", contextlib.nullcontext))
    static = bool(getattr(args, "model_static", False))
    fresh_cache = bool(getattr(args, "model_fresh_cache", False))
    fullgraph = bool(getattr(args, "model_fullgraph", True))
    torch._dynamo.reset()
    fns: Dict[str, Optional[Callable]] = {v: None for v, _ in variants}
    n_inputs = 2 if device == "cpu" else 3
    rows = []
    for m in sorted(ms, reverse=True):  # the largest first: a dynamic compile traced at 1 would specialise on 1
        r: Dict[str, object] = {"mode": "model", "model": name, "M": m, "dtype": str(dtype).replace("torch.", ""),
                                "device": device, "compile": "static" if static else "dynamic tokens",
                                "inductor_cache": "empty per compile" if fresh_cache else "shared", **desc}
        if fusion_api_reason():
            r["with_pass_skipped"] = fusion_api_reason()
        rows.append(r)
        xs = [make_input(m, i) for i in range(n_inputs)]
        if not static and m > 1:
            torch._dynamo.mark_dynamic(xs[0], token_dim)
        entries, outs = [], {}
        if static:
            # Each token count's two compiles in a fresh Dynamo cache, as a program that compiles its
            # model once: the compiles of the earlier token counts (and what they keep alive) shifted
            # the 1-token ratio by up to 4% from run to run (docs/BENCHMARKS.md, 2026-12-03).
            torch._dynamo.reset()
        with torch.no_grad():
            for v, ctx in variants:
                try:
                    with ctx():
                        before, before_by = fusion_rewrites(), fusion_rewrites_by_pattern()
                        if fns[v] is None or static:
                            fns[v] = compile_fresh(forward, with_pass=v == "with_pass", fullgraph=fullgraph,
                                                   dynamic=False if static else None)
                        with _inductor_cache(fresh_cache):
                            t0 = time.perf_counter()
                            out, codes = _first_call(fns[v], xs[0])
                            sync(device)
                            r[f"{v}_first_call_s"] = time.perf_counter() - t0
                        outs[v] = out.float()
                        after, after_by = fusion_rewrites(), fusion_rewrites_by_pattern()
                    r[f"{v}_compiled_here"] = bool(codes)
                    launches = count_launches(codes)
                    if launches is not None:
                        r[f"{v}_launches"] = launches["generated"] + launches["extern"]
                        r[f"{v}_launches_detail"] = launches
                    if before is not None and after is not None:
                        # rewrites made by compiles during this M (none when it reused an earlier compile)
                        r[f"{v}_rewrites"] = after - before
                        r[f"{v}_rewrites_by_pattern"] = {k: n - before_by.get(k, 0) for k, n in after_by.items()
                                                         if n != before_by.get(k, 0)}

                    def call(i, _fn=fns[v], _xs=xs):
                        return _fn(_xs[i % len(_xs)])

                    entries.append((v, call, ctx))
                except Exception as e:  # noqa: BLE001 - one failing variant must not end the run
                    r[f"{v}_error"] = _error_text(e)
            times = {v: {} for v, _, _ in entries}
            if device == "cpu":
                time_cpu_interleaved([(times[v], c, x) for v, c, x in entries], args.budget,
                                     min_rounds=args.min_rounds, stat=args.stat)
                r["timing"] = "wall, interleaved rounds"
            else:
                _time_cuda(entries, times, m, r, args)
            for v in times:
                if "time_s" in times[v]:
                    r[f"{v}_s"] = times[v]["time_s"]
                    for key in ("time_median_s", "time_min_s", "rounds"):
                        if key in times[v]:
                            r[f"{v}_{key}"] = times[v][key]
        if "with_pass_s" in r and "without_pass_s" in r:
            r["ratio_without_over_with"] = r["without_pass_s"] / r["with_pass_s"]
        if "without_pass" in outs and "with_pass" in outs:
            a, b = outs["without_pass"], outs["with_pass"]
            r["max_abs_diff"] = (a - b).abs().max().item()
            r["outputs_close"] = outputs_close(b, a, dtype)
        del xs, entries, outs
        if device == "cuda":
            torch.cuda.empty_cache()
        if on_row is not None:
            on_row(r)
    rows.sort(key=lambda row: list(ms).index(row["M"]))
    return rows


def _time_cuda(entries, times, m, r, args) -> None:
    if m <= args.graph_max_m:
        graphs, names, per_graph = [], [], 3
        for v, c, x in entries:
            try:
                with x():
                    graphs.append(capture_cuda_graph(c, per_graph))
                names.append(v)
            except Exception as e:  # noqa: BLE001
                torch.cuda.synchronize()
                r[f"{v}_graph_error"] = _error_text(e)
        if graphs and len(names) == len(entries):
            for v, t in zip(names, time_graph_replays(graphs, per_graph, replays=getattr(args, "replays", 20) or 20)):
                times[v]["time_s"] = t
            r["timing"] = f"CUDA graph x{per_graph}, interleaved replays"
            return
        del graphs
        # a variant that cannot be captured: both are timed with events, so the ratio compares like with like
        r["timing"] = "CUDA events (a graph capture failed)"
    for v, c, x in entries:  # above graph_max_m, or where capture failed
        try:
            with x():
                times[v]["time_s"] = time_cuda_events(c, args.budget)
            r.setdefault("timing", "CUDA events")
        except Exception as e:  # noqa: BLE001
            r[f"{v}_error"] = _error_text(e)


def available_model_set(requested: Optional[Sequence[str]]) -> Tuple[List[str], Dict[str, str]]:
    """The models to run and, for each requested one that cannot run, why."""
    from .hf_models import transformers_unavailable_reason

    skipped: Dict[str, str] = {}
    names = list(requested) if requested else list(MODEL_SET_ALL)
    for n in names:
        if n not in MODEL_SET_ALL:
            raise ValueError(f"--model-set: each name must be one of {','.join(MODEL_SET_ALL)}, got {n!r}")
    why = transformers_unavailable_reason()
    if why:
        for n in names:
            if n != "tiny":
                skipped[n] = why
        names = [n for n in names if n == "tiny"]
    return names, skipped


def bench_models(device: str, dtype: torch.dtype, ms: Sequence[int], names: Sequence[str],
                 args, on_row: Optional[Callable[[Dict[str, object]], None]] = None) -> List[Dict[str, object]]:
    """Every requested model at every token count; a model that fails to build gets an error row."""
    from .hf_models import build_hf_model

    rows: List[Dict[str, object]] = []
    for name in names:
        try:
            if name == "tiny":
                built = build_tiny(device, dtype, args.model_hidden, args.model_inter, args.model_experts,
                                   args.model_topk)
            else:
                built = build_hf_model(name, device, dtype, experts_implementation=args.hf_experts,
                                       layout=args.model_layout,
                                       sentinel_mask=bool(getattr(args, "hf_sentinel_mask", False)))
        except Exception as e:  # noqa: BLE001
            rows.append({"mode": "model", "model": name, "M": "-", "build_error": _error_text(e)})
            if on_row is not None:
                on_row(rows[-1])
            continue
        rows.extend(bench_model_case(name, *built, device=device, dtype=dtype, ms=ms, args=args, on_row=on_row))
        del built
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows
