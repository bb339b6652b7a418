"""The CPU kernel side by side with a baseline build of an earlier revision's kernel, in one run.

    python -m fused_moe_ops.bench.abi_compare [--baseline-rev ac2f0a7] [--grid full|quick] [--json F]

The baseline is that revision's csrc/ (``git show REV:csrc/...``, so it needs this checkout's git
history), JIT-built with that revision's flags for this host's ISA and
cached beside the JIT builds, registered under its own namespace (``moe_baseline``), so both kernels are called the same way,
through the dispatcher, from the same process. ac2f0a7 is the last kernel written on ATen's
unstable C++ API (at::vec); the current one is on the stable ABI.

Method: one thread (torch.set_num_threads(1): the development machine's cores are shared), under
torch.inference_mode() (how a serving loop calls it; ``--grad-mode no_grad`` or ``enabled`` adds the
Autograd key, which the current build serves from Python), rounds interleaved (each round times a
batch of the baseline and of the current kernel, in alternating order), median over rounds. Two
ratios, each current / baseline speed (baseline time / current time; >= 1: the current kernel is at
least as fast):

* kernel: the out= form, both kernels writing the same output buffers (one per input set), so they
  meet the same memory, outputs included: the kernels' own speed.
* functional: the functional call, a fresh output each call. Where the allocator places that output
  is not the same for both: glibc hands an aligned request of a size just freed either the freed
  block again or another one, depending on the small allocations around it, which differ between
  the two builds; an output that lands on one address call after call stays in cache. So a single
  shape's functional ratio can move by 10-15% between processes while its kernel ratio does not.

Bandwidth: bytes the kernel must move (the live input rows read once, the output written once) over
the current kernel's out= time, against a single-thread tensor copy into an existing tensor measured
in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BASELINE_NS = "moe_baseline"
BASELINE_FILES = ("csrc/shuffle_mul_sum.h", "csrc/shuffle_mul_sum_cpu.cpp")
# What ac2f0a7's JIT build passed for an AVX2 / AVX-512 host (its fused_moe_ops/_kernel_spec.py).
BASELINE_FLAGS = {
    "DEFAULT": ["-O3", "-fopenmp", "-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "AVX2": ["-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-mf16c", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}
GRIDS = {
    "full": dict(dtypes=(torch.bfloat16, torch.float16, torch.float32), ms=(1, 4, 16, 64, 256, 1024, 4096),
                 ks=(4096, 7168), topks=(2, 8)),
    "quick": dict(dtypes=(torch.bfloat16, torch.float32), ms=(1, 64, 1024), ks=(4096,), topks=(2, 8)),
}


def build_baseline(rev: str, isa: str, repo: Path, work: Path) -> None:
    """Compile REV's CPU kernel into work/, registered as moe_baseline::shuffle_mul_sum."""
    from fused_moe_ops import build as native_build
    from fused_moe_ops import ops

    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    for path in BASELINE_FILES:
        text = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{path}"], check=True, capture_output=True,
                              text=True).stdout
        text = text.replace("TORCH_LIBRARY_IMPL(moe,", f"TORCH_LIBRARY_IMPL({BASELINE_NS},")
        text = text.replace('extern "C" C10_EXPORT const char* fused_moe_ops_cpu_isa',
                            'extern "C" C10_EXPORT const char* fused_moe_ops_baseline_cpu_isa')
        dest = src / Path(path).name
        if not dest.is_file() or dest.read_text() != text:  # unchanged: ninja finds the build up to date
            dest.write_text(text)
    lib = torch.library.Library(BASELINE_NS, "DEF")
    lib.define(ops.FUNCTIONAL_SCHEMA)
    lib.define(ops.OUT_SCHEMA)
    lib.define(ops.FUSED_SCHEMA)
    build_baseline.lib = lib  # keep the definitions alive
    native_build._cpp_extension().load(
        name=f"fused_moe_ops_baseline_{rev}", sources=[str(src / "shuffle_mul_sum_cpu.cpp")],
        extra_cflags=BASELINE_FLAGS[isa], extra_include_paths=[str(src)], build_directory=str(work),
        is_python_module=False, verbose=False)


def copy_bandwidth(nbytes: int = 256 * 2**20, rounds: int = 9) -> float:
    """Single-thread bytes moved (read + write) per second by a tensor copy of nbytes."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def time_pair(calls, budget_s: float, min_rounds: int, max_rounds: int):
    """Median seconds per call of each of calls (interleaved rounds, alternating order)."""
    for c in calls:  # warm-up, and the batch size: about 2 ms a batch
        c()
    t = time.perf_counter()
    calls[0]()
    once = max(time.perf_counter() - t, 1e-7)
    batch = max(1, min(2000, int(2e-3 / once)))
    samples = [[] for _ in calls]
    start = time.perf_counter()
    r = 0
    while r < min_rounds or (r < max_rounds and time.perf_counter() - start < budget_s):
        order = range(len(calls)) if r % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            t = time.perf_counter()
            for _ in range(batch):
                calls[i]()
            samples[i].append((time.perf_counter() - t) / batch)
        r += 1
    return [statistics.median(s) for s in samples], r


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_moe_ops.bench.abi_compare", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-rev", default="ac2f0a7")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--grad-mode", choices=("inference", "no_grad", "enabled"), default="inference")
    parser.add_argument("--ms", type=str, default=None, help="comma-separated M values (overrides the grid's)")
    parser.add_argument("--budget", type=float, default=1.5, help="seconds per shape (at least --min-rounds rounds)")
    parser.add_argument("--min-rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import fused_moe_ops
    from fused_moe_ops import build as native_build

    torch.set_num_threads(1)
    current = native_build.RESULTS["cpu"]
    if not current.ok:
        print(f"the current CPU kernel is not built: {current.error or current.skipped}", file=sys.stderr)
        return 1
    isa = current.isa or "DEFAULT"
    repo = Path(fused_moe_ops.__file__).resolve().parent.parent
    work = native_build.cache_root() / f"baseline_{args.baseline_rev}_{isa.lower()}"  # ninja skips a finished build
    print(f"current kernel: the {isa} copy, row prefetch {'on' if current.row_prefetch else 'off'}", file=sys.stderr)
    print(f"building (or finding) the baseline ({args.baseline_rev}, {isa}) in {work} ...", file=sys.stderr, flush=True)
    build_baseline(args.baseline_rev, isa, repo, work)
    ops_by_name = {"baseline": getattr(torch.ops, BASELINE_NS).shuffle_mul_sum.default,
                   "current": torch.ops.moe.shuffle_mul_sum.default}
    out_ops = [getattr(torch.ops, BASELINE_NS).shuffle_mul_sum.out, torch.ops.moe.shuffle_mul_sum.out]
    grid = dict(GRIDS[args.grid])
    if args.ms:
        grid["ms"] = tuple(int(m) for m in args.ms.split(","))
    mode = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "enabled": torch.enable_grad}[args.grad_mode]

    load_before = os.getloadavg()
    copy_bw = copy_bandwidth()
    rows = []
    g = torch.Generator().manual_seed(0)
    with mode():
        for dtype in grid["dtypes"]:
            for k in grid["ks"]:
                for topk in grid["topks"]:
                    for m in grid["ms"]:
                        r = m * topk
                        # Small shapes: three input sets, rotated call by call, so that where the
                        # allocator happens to place one set (4 KiB aliasing of rows and output, L1
                        # set conflicts of rows 16 KiB apart) weighs on both kernels alike.
                        n_sets = 3 if r * k * 4 <= 64 * 2**20 else 1
                        sets = []
                        for _ in range(n_sets):
                            x = torch.randn(r, k, generator=g).to(dtype)
                            sets.append((x, torch.randperm(r, generator=g), torch.rand(m, topk, generator=g).to(dtype)))
                        for x, perm, w in sets:
                            torch.testing.assert_close(ops_by_name["current"](x, perm, w),
                                                       ops_by_name["baseline"](x, perm, w), rtol=0, atol=0)
                        outs = [torch.empty(m, k, dtype=dtype) for _ in range(n_sets)]
                        counter = [0]

                        def make_call(op):
                            def call():
                                counter[0] += 1
                                return op(*sets[counter[0] % n_sets])
                            return call

                        def make_out_call(op):
                            def call():
                                counter[0] += 1
                                i = counter[0] % n_sets
                                return op(*sets[i], out=outs[i])
                            return call

                        (k_base, k_cur), k_rounds = time_pair([make_out_call(op) for op in out_ops], args.budget,
                                                             args.min_rounds, 200)
                        (t_base, t_cur), rounds = time_pair([make_call(op) for op in ops_by_name.values()],
                                                            args.budget, args.min_rounds, 200)
                        nbytes = (m * topk * k + m * k) * x.element_size()
                        rows.append(dict(dtype=str(dtype).replace("torch.", ""), m=m, k=k, topk=topk,
                                         kernel_baseline_us=k_base * 1e6, kernel_current_us=k_cur * 1e6,
                                         kernel_ratio=k_base / k_cur,
                                         baseline_us=t_base * 1e6, current_us=t_cur * 1e6, ratio=t_base / t_cur,
                                         current_bw_frac=nbytes / k_cur / copy_bw, rounds=min(rounds, k_rounds)))
                        row = rows[-1]
                        print(f"{row['dtype']:>8} M={m:5d} K={k} topk={topk}: out= {row['kernel_baseline_us']:9.1f} vs "
                              f"{row['kernel_current_us']:9.1f} us, kernel ratio {row['kernel_ratio']:.3f};  functional "
                              f"{row['baseline_us']:9.1f} vs {row['current_us']:9.1f} us, ratio {row['ratio']:.3f};  "
                              f"{100 * row['current_bw_frac']:5.1f}% of copy bw  ({row['rounds']} rounds)", flush=True)
                        del outs, sets, x
    load_after = os.getloadavg()
    ratios = [r["ratio"] for r in rows]
    kernel_ratios = [r["kernel_ratio"] for r in rows]
    summary = dict(
        machine=native_build.cpu_isa(), isa=isa, row_prefetch=current.row_prefetch, torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        baseline_rev=args.baseline_rev, grad_mode=args.grad_mode, threads=1, copy_bw_gbs=copy_bw / 1e9,
        load_before=load_before, load_after=load_after,
        min_kernel_ratio=min(kernel_ratios), median_kernel_ratio=statistics.median(kernel_ratios),
        kernel_ratios_below_0_95=sum(r < 0.95 for r in kernel_ratios),
        min_ratio=min(ratios), median_ratio=statistics.median(ratios), ratios_below_0_95=sum(r < 0.95 for r in ratios),
        shapes=len(rows))
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(dict(summary=summary, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
