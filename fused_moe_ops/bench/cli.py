"""``python -m fused_moe_ops.bench``: the MoE combine step, every implementation side by side.

Two modes (the measuring code is in the other modules of fused_moe_ops/bench/, one per concern):

The sweep (default). For each shape (M tokens, top-k, hidden size K, dtype) one run times, on the
same data: eager (the seed line in plain PyTorch), inductor (torch.compile of it, pass off),
inductor+pass (pass on), op / cuda (torch.ops.moe.shuffle_mul_sum on the C++ CPU / CUDA kernel),
triton, and copy (dst.copy_(src) of the same bytes: the bandwidth ceiling, measured on the spot).
Bytes of a call = input rows read (M*topk*K) + output written (M*K), times the element size.
GB/s = bytes / time (1 GB = 1e9 B); "%copy" = GB/s / copy's GB/s in the same run; "x eager" /
"x ind" = the eager / inductor time over this row's time (higher is better). With more than one
implementation compiled, a per-shape "pass vs no pass" table follows (with/without = inductor time
/ inductor+pass time: > 1 means the pass made it faster), and the JSON has the raw per-shape times
("shapes") for a measured profitability rule.

The model mode (--model). Whole MoE models compiled without and with the pass, timed side by
side: TinyMoE and, when transformers imports, Qwen3-MoE and Qwen2-MoE (2 decoder layers of
transformers' own classes, random weights; full widths on CUDA, tiny widths on CPU; see
fused_moe_ops/bench/hf_models.py). Table: tokens, without pass, with pass, with/without speed,
rewrites, kernel launches.

The scatter mode (--scatter). The scatter form moe::scatter_mul_sum on the CPU kernel against
eager's ``zeros.index_add_(0, idx, y * w[:, None])`` and Inductor's kernel for that line (pass off),
at decode and prefill shapes (fused_moe_ops/bench/scatter.py).

The eager HF mode (--hf-eager). A Qwen3-MoE-shaped HF model run eagerly with transformers'
experts_implementation "grouped_mm" and "fused_moe_ops" (fused_moe_ops/bench/hf_eager.py).

Timing. CPU: wall clock (time.perf_counter) of batches of calls, in rounds that alternate between
the implementations (so load from other processes hits them alike), median over rounds. CUDA:
for M <= --graph-max-m each implementation's calls are captured in a CUDA graph (each call on a
different buffer set) and the graphs' replays alternate; the replay time per call is what a
graph-replayed serving step pays. Above it, CUDA events per call. Inputs rotate through enough
buffer sets to exceed --rotate-mb (default 4x the L2 on CUDA, 128 MiB on CPU), so the cache is not
what is measured. Every implementation's output is checked against the float32 reference once
per shape (a mismatch is flagged in the "note" column and in the JSON).

    python -m fused_moe_ops.bench                       # default shapes for the device
    python -m fused_moe_ops.bench --quick               # few shapes, short
    python -m fused_moe_ops.bench --device cuda --k 7168 --m 1,64,4096 --json out.json --plot bw.png
    python -m fused_moe_ops.bench --device cuda --grid pass-vs-inductor --json pvi.json   # pass vs no pass, ~2 min
    python -m fused_moe_ops.bench --model               # compiled models, with vs without the pass
    python -m fused_moe_ops.bench --model --model-set qwen3_moe --model-m 1,64,4096
    python -m fused_moe_ops.bench --hf-eager --threads 2    # eager HF model: grouped_mm vs fused_moe_ops
    python -m fused_moe_ops.bench --scatter --dtype f32     # scatter form: op vs eager index_add_ vs Inductor

The fusion pass API (fused_moe_ops.disable_fusion / fusion_stats) is optional: without it the
"inductor+pass" rows and the "with pass" model columns are skipped and said so.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List

import torch

from fused_moe_ops.bench import report
from fused_moe_ops.bench.hf_models import EXPERTS_IMPLEMENTATIONS
from fused_moe_ops.bench.machine import machine, machine_label
from fused_moe_ops.bench.models import (CPU_DEFAULT_MODEL_M, GPU_DEFAULT_MODEL_M, MODEL_SET_ALL, TinyMoE,  # noqa: F401
                                        available_model_set, bench_models)
from fused_moe_ops.bench.sweep import (ALL_IMPLS, CPU_DEFAULT_M, DEFAULT_K, DTYPES, GPU_DEFAULT_M, GRIDS, QUICK_K,
                                       QUICK_M, bench_shape, seed_combine, shape_summaries)  # noqa: F401
from fused_moe_ops.bench.targets import evaluate_targets


def _ints(s: str) -> List[int]:
    return [int(x) for x in s.replace(" ", "").split(",") if x]


def _names(s: str) -> List[str]:
    return [x for x in s.replace(" ", "").split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fused_moe_ops.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="bf16 | f16 | f32 (default bf16)")
    p.add_argument("--grid", choices=sorted(GRIDS), default=None,
                   help="a named set of shapes, implementations and timing settings; flags given explicitly win. "
                        "pass-vs-inductor: M 1..16384 (11 sizes), K 4096/7168, topk 2/8, bf16, inductor / inductor+pass / op "
                        "/ copy, all as CUDA-graph replays, about 2 minutes of timing on an H100/H200 (estimated)")
    p.add_argument("--topk", type=_ints, default=None, help="comma list of top-k values (default 8)")
    p.add_argument("--k", type=_ints, default=None, help="comma list of hidden sizes (default 4096,7168)")
    p.add_argument("--m", type=_ints, default=None,
                   help="comma list of token counts (default CPU 1,8,64,512,1024; GPU 1,8,64,512,4096,16384)")
    p.add_argument("--impls", default=None, help=f"comma subset of {','.join(ALL_IMPLS)} (default: all for the device)")
    p.add_argument("--quick", action="store_true", help="few shapes, short timing budget")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per implementation and shape")
    p.add_argument("--rotate-mb", type=float, default=None,
                   help="rotate inputs over at least this many MiB (default 4x L2 on CUDA, 128 on CPU)")
    p.add_argument("--max-sets", type=int, default=1024, help="at most this many rotating buffer sets")
    p.add_argument("--graph-max-m", type=int, default=None,
                   help="CUDA: replay a CUDA graph for M <= this (default: sweep 512, --grid pass-vs-inductor and --model all)")
    p.add_argument("--compile", dest="sweep_compile", choices=("static", "dynamic"), default=None,
                   help="sweep: compile the inductor rows per shape (static, default) or once per (topk, K) with the "
                        "token count dynamic (as serving engines compile; fewer compiles)")
    p.add_argument("--replays", type=int, default=None, help="CUDA: graph replays per implementation (default 30)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="CPU: statistic over the interleaved rounds used for time / GB/s / ratios (both are in the "
                        "JSON); 'min' is the least-disturbed round on a shared machine")
    p.add_argument("--min-rounds", type=int, default=None,
                   help="CPU: at least this many interleaved rounds (default 5 in the sweep, 9 in --model)")
    p.add_argument("--json", dest="json_path", default=None, help="write all rows + machine info here")
    p.add_argument("--plot", dest="plot_path", default=None, help="PNG of GB/s against M")
    p.add_argument("--markdown", dest="md_path", default=None, help="also write the result as a Markdown table here")
    g = p.add_argument_group("model mode")
    g.add_argument("--model", action="store_true", help="compiled models with vs without the pass (instead of the sweep)")
    g.add_argument("--model-set", type=_names, default=None,
                   help=f"comma subset of {','.join(MODEL_SET_ALL)} (default: all; the HF ones need transformers)")
    g.add_argument("--model-m", type=_ints, default=None,
                   help=f"token counts (default CPU {','.join(map(str, CPU_DEFAULT_MODEL_M))}; "
                        f"GPU {','.join(map(str, GPU_DEFAULT_MODEL_M))})")
    g.add_argument("--model-hidden", type=int, default=None, help="TinyMoE hidden size (default CUDA 2048, CPU 512)")
    g.add_argument("--model-inter", type=int, default=None, help="TinyMoE expert width (default CUDA 1024, CPU 256)")
    g.add_argument("--model-experts", type=int, default=8, help="TinyMoE experts")
    g.add_argument("--model-topk", type=int, default=2, help="TinyMoE top-k")
    g.add_argument("--model-static", action="store_true", help="compile per token count instead of once with it dynamic")
    g.add_argument("--model-fresh-cache", action="store_true",
                   help="compile each variant in an empty Inductor cache, as a user's first compile (nothing "
                        "from an earlier compile: kernels, autotuning choices); slower to compile")
    g.add_argument("--model-layout", choices=("sequence", "batch"), default="sequence",
                   help="HF models: 'sequence' = one sequence of M tokens (a prefill), 'batch' = M sequences of one "
                        "token (attention trivial)")
    g.add_argument("--hf-experts", choices=EXPERTS_IMPLEMENTATIONS, default="grouped_mm",
                   help="HF models: transformers' experts_implementation (default grouped_mm, transformers' default)")
    g.add_argument("--hf-sentinel-mask", action="store_true",
                   help="HF models: take transformers' expert-parallel path, whose masked_fill of the expert rows "
                        "sits right before the combine (transformers <= 5.17 always runs it)")
    g = p.add_argument_group("scatter mode")
    g.add_argument("--scatter", action="store_true",
                   help="the scatter form on CPU: moe::scatter_mul_sum vs eager index_add_ vs Inductor (pass off); "
                        "shapes from --m / --k / --topk, else decode (M 1, 16; K 4096) and prefill (M 512, 4096; "
                        "K 2048, 4096), top-8")
    g = p.add_argument_group("eager HF mode")
    g.add_argument("--hf-eager", action="store_true",
                   help="eager HF Qwen3-MoE-shaped model (2 layers, hidden 1024, 64 experts, top-8): "
                        "experts_implementation grouped_mm vs fused_moe_ops, interleaved rounds (bench/hf_eager.py)")
    g.add_argument("--hf-eager-tokens", type=_ints, default=None, help="token counts (default 1,16,256,1024,4096)")
    return p.parse_args(argv)


def apply_defaults(args, device: str) -> None:
    """Fill what the user left unset: from --grid first, then from the device."""
    grid = GRIDS.get(args.grid or "", {})
    for key in ("m", "k", "topk", "budget", "graph_max_m", "replays"):
        if getattr(args, key) is None and key in grid:
            setattr(args, key, grid[key])
    if args.dtype is None:
        args.dtype = grid.get("dtype", "bf16")
    if args.sweep_compile is None:
        args.sweep_compile = grid.get("compile", "static")
    if args.impls is None and "impls" in grid:
        args.impls = ",".join(grid["impls"])
    if args.topk is None:
        args.topk = [8]
    if args.graph_max_m is None:
        # model mode: every token count as graph replays (as a serving engine replays its decode graphs);
        # sweep: the decode sizes, where launch overhead is what a graph saves
        args.graph_max_m = 1 << 20 if args.model else 512
    if args.min_rounds is None:
        args.min_rounds = 9 if args.model else 5
    if args.budget is None:
        if args.hf_eager:
            args.budget = 1.0
        elif args.model:
            args.budget = 1.0 if device == "cpu" else 0.05
        else:
            args.budget = (0.15 if args.quick else 0.4) if device == "cpu" else (0.05 if args.quick else 0.15)
    if args.rotate_mb is None:
        if device == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) / 2**20
            args.rotate_mb = 4 * max(l2, 50)
        else:
            args.rotate_mb = 128.0


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.scatter else "cpu")
    if args.scatter and device != "cpu":
        print("benchmark: --scatter measures the CPU kernel; pass --device cpu", file=sys.stderr)
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print("benchmark: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_defaults(args, device)
    if args.dtype.lower() not in DTYPES:
        print(f"benchmark: --dtype must be one of {', '.join(sorted(DTYPES))}, got {args.dtype!r}", file=sys.stderr)
        return 2
    for flag, values in (("--topk", args.topk), ("--k", args.k), ("--m", args.m), ("--model-m", args.model_m)):
        if values is not None and (not values or min(values) < 1):
            print(f"benchmark: {flag} must be a comma list of integers >= 1, got {values}", file=sys.stderr)
            return 2
    dtype = DTYPES[args.dtype.lower()]
    model_names, models_skipped = [], {}
    if args.model:
        try:
            model_names, models_skipped = available_model_set(args.model_set)
        except ValueError as e:
            print(f"benchmark: {e}", file=sys.stderr)
            return 2
    # The pass must really run (or really not) on every compile: no FX graph cache hits across
    # the with / without variants. Generated kernels are still cached on disk by source.
    torch._inductor.config.fx_graph_cache = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    info = machine(device)
    label = machine_label(info, device)
    print(f"# fused_moe_ops benchmark, {info['date_utc']}")
    print(f"# machine: {info.get('gpu') or ''}{' / ' if device == 'cuda' else ''}{info['cpu']}")
    print(f"# torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}, "
          f"python {info['python']}, backends {info['backends']}, fusion pass: {info['fusion_api']}")
    result = {"machine": info, "device": device, "dtype": str(dtype).replace("torch.", ""), "args": vars(args)}

    if args.hf_eager:
        run_hf_eager(args, device, dtype, label, result)
        return 0
    if args.scatter:
        run_scatter(args, dtype, label, result)
        return 0
    if args.model:
        run_models(args, device, dtype, label, result, model_names, models_skipped)
    else:
        run_sweep(args, device, dtype, label, info, result)
    if hasattr(os, "getloadavg"):
        info["loadavg_at_end"] = os.getloadavg()
        print(f"# load average at start {info['loadavg_at_start'][0]:.2f}, at end {info['loadavg_at_end'][0]:.2f} "
              f"({os.cpu_count()} cores; above that, other processes shared the CPUs with this run)")
    print("\n# performance targets, this run:")
    report.print_targets(result["targets"])
    if args.json_path:
        report.write_json(args.json_path, result)
        print(f"# json: {args.json_path}")
    return 0


def run_hf_eager(args, device, dtype, label, result) -> None:
    from fused_moe_ops.bench import hf_eager

    tokens = args.hf_eager_tokens or list(hf_eager.DEFAULT_TOKENS)
    print(f"# eager HF Qwen3-MoE-shaped model on {label}, {result['dtype']}: {hf_eager.WIDTHS}, 2 layers; "
          f"tokens {tokens}; inference_mode; interleaved rounds (>= {args.min_rounds}), {args.stat}; "
          "speed = grouped_mm time / fused_moe_ops time")
    rows = hf_eager.bench(device, dtype, tokens, args.budget, args.min_rounds)
    result["hf_eager_rows"] = rows
    if hasattr(os, "getloadavg"):
        print(f"# load average at end {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    if args.md_path:
        with open(args.md_path, "w") as f:
            f.write(hf_eager.markdown(rows, label))
        print(f"# markdown: {args.md_path}")
    if args.json_path:
        report.write_json(args.json_path, result)
        print(f"# json: {args.json_path}")


def run_scatter(args, dtype, label, result) -> None:
    from fused_moe_ops.bench import scatter

    if args.m or args.k or args.topk != [8]:
        shapes = [(m, t, k) for t in args.topk for k in (args.k or [4096]) for m in (args.m or [1, 16, 512, 4096])]
    else:
        shapes = list(scatter.DEFAULT_SHAPES)
    print(f"# scatter form on {label}, {result['dtype']}: shapes (M, topk, K) {shapes}; interleaved rounds "
          f"(>= {args.min_rounds}), {args.stat}, rotating >= {args.rotate_mb:.0f} MiB; eager/op and ind/op = that "
          "time / the op's time (> 1: the op is faster); inductor = torch.compile of the eager line, pass off")
    rows = scatter.bench(shapes, dtype, args.budget, args.min_rounds, args.rotate_mb, args.max_sets)
    result["scatter_rows"] = rows
    if hasattr(os, "getloadavg"):
        print(f"# load average at end {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    if args.md_path:
        with open(args.md_path, "w") as f:
            f.write(scatter.markdown(rows, label))
        print(f"# markdown: {args.md_path}")
    if args.json_path:
        report.write_json(args.json_path, result)
        print(f"# json: {args.json_path}")


def run_models(args, device, dtype, label, result, names, skipped) -> None:
    if args.model_hidden is None:
        args.model_hidden = 2048 if device == "cuda" else 512
    if args.model_inter is None:
        args.model_inter = 1024 if device == "cuda" else 256
    ms = args.model_m or (GPU_DEFAULT_MODEL_M if device == "cuda" else CPU_DEFAULT_MODEL_M)
    for n, why in skipped.items():
        print(f"# model {n}: skipped ({why})")
    print(f"# compiled model comparison on {label}, {result['dtype']}: {', '.join(names)}; tokens {ms}; "
          f"TinyMoE(hidden={args.model_hidden}, inter={args.model_inter}, experts={args.model_experts}, "
          f"topk={args.model_topk}); HF: 2 layers, {args.hf_experts}"
          f"{' with the sentinel mask' if args.hf_sentinel_mask else ''}, layout {args.model_layout}, "
          f"{'full widths' if device == 'cuda' else 'tiny widths'}; "
          + ("CPU: interleaved rounds, median" if device == "cpu" else
             f"CUDA graphs (interleaved replays) for tokens <= {args.graph_max_m}"))
    print(report.MODEL_HEADER + "\n" + "-" * len(report.MODEL_HEADER), flush=True)
    done = []

    def on_row(row):  # progress, and partial results that survive a timeout
        done.append(row)
        report.print_model([row], header=False)
        sys.stdout.flush()
        if args.json_path:
            report.write_json(args.json_path, dict(result, model_rows=done, partial=True))

    rows = bench_models(device, dtype, ms, names, args, on_row=on_row)
    print("# all rows:")
    report.print_model(rows)
    result["model_rows"] = rows
    result["models_skipped"] = skipped
    result["targets"] = evaluate_targets([], device, rows)
    if args.md_path:
        with open(args.md_path, "w") as f:
            f.write(report.markdown_model_table(rows, label))
        print(f"# markdown: {args.md_path}")


def run_sweep(args, device, dtype, label, info, result) -> None:
    ks = args.k or (QUICK_K[device] if args.quick else DEFAULT_K)
    ms = args.m or (QUICK_M[device] if args.quick else (GPU_DEFAULT_M if device == "cuda" else CPU_DEFAULT_M))
    wanted = args.impls.split(",") if args.impls else list(ALL_IMPLS)
    impls = [i for i in wanted if i in ALL_IMPLS and
             not (device == "cpu" and i in ("cuda", "triton")) and not (device == "cuda" and i == "op")]
    print(f"# sweep{' ' + args.grid if args.grid else ''}: {result['dtype']}, topk {args.topk}, K {ks}, M {ms}, "
          f"{args.sweep_compile} compiles, "
          f"on {label}; impls {impls}; timing budget {args.budget}s/impl/shape, rotating >= {args.rotate_mb:.0f} MiB"
          + (f", CPU statistic: {args.stat} over >= {args.min_rounds} interleaved rounds" if device == "cpu" else
             f", CUDA graphs for M <= {args.graph_max_m}"))
    rows = []
    t0 = time.time()
    compiled = {} if args.sweep_compile == "dynamic" else None
    if compiled is not None:
        torch._dynamo.reset()
    for topk in args.topk:
        for k in ks:
            for m in ms:
                shape_rows = bench_shape(device, dtype, m, topk, k, impls, args, compiled=compiled)
                for r in shape_rows:
                    r["compile"] = args.sweep_compile
                rows.extend(shape_rows)
                report.print_table(shape_rows)
                print(flush=True)
                if args.json_path:  # partial results survive a timeout
                    report.write_json(args.json_path, dict(result, rows=rows, shapes=shape_summaries(rows),
                                                           partial=True))
    print(f"# sweep took {time.time() - t0:.0f} s\n# all shapes:")
    report.print_table(rows)
    result["rows"] = rows
    result["shapes"] = shape_summaries(rows)
    if {"inductor", "inductor+pass"} <= set(impls) or ("inductor" in impls and ({"op", "cuda"} & set(impls))):
        print("\n# pass vs no pass (with/without = inductor time / inductor+pass time; op/ind = inductor time / "
              "op time; %copy = share of copy bandwidth):")
        report.print_pass_table(result["shapes"])
    result["targets"] = evaluate_targets(rows, device)
    if args.md_path:
        with open(args.md_path, "w") as f:
            f.write(report.markdown_table(rows, label))
        print(f"# markdown: {args.md_path}")
    if args.plot_path:
        msg = report.plot(rows, args.plot_path, f"moe.shuffle_mul_sum, {result['dtype']}, topk {args.topk}, {label}, "
                                                f"torch {info['torch']}, {info['date_utc']}")
        print(f"# plot: {msg or args.plot_path}")


if __name__ == "__main__":
    sys.exit(main())
