"""A Mixture-of-Experts block written as model code is written, compiled with and without the fusion.

    python examples/moe_block.py                          # CPU (or CUDA when present), fp32, small sizes
    python examples/moe_block.py --device cuda --dtype bfloat16 --tokens 4096 --hidden 4096 --ffn 1408
    python examples/moe_block.py --plot timings.png

The block: a router linear, softmax, top-k, renormalised weights; the experts as stacked weight
tensors (E, hidden, 2*ffn) and (E, ffn, hidden), each run (SwiGLU) on its slice of the
expert-sorted tokens; then the combine in the spelling serving engines use (sglang's
cutlass MoE, the seed of this project)::

    (c2[c_map].view(m, topk, k) * topk_weights.view(m, topk, 1).to(x.dtype)).sum(dim=1)

Nothing in the model mentions fused_moe_ops: ``import fused_moe_ops`` installs an Inductor pass
that rewrites that line into one ``moe::shuffle_mul_sum`` call under ``torch.compile``; Inductor then
times our kernel against its own code for the combine and keeps the faster. The script prints whether
the pass fired (and how often), which of the two Inductor chose, the largest difference between the
eager and the compiled outputs, and a timing table: eager, compiled with the pass off, compiled with
it on.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import fused_moe_ops
from fused_moe_ops import _registry

# Relative tolerance (max |diff| / max |eager|) for eager vs compiled. The compiled graph may
# reassociate the matmuls and keep intermediates in fp32, so low precision gets a few ulps.
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}


class MoEBlock(nn.Module):
    """Top-k routed SwiGLU experts; the combine in the seed's spelling.

    ``explicit_op=True`` spells the combine as the op call instead (what a model written against
    fused_moe_ops does, and what `torch.export` then keeps as one node).
    """

    def __init__(self, hidden: int, ffn: int, experts: int, topk: int, explicit_op: bool = False):
        super().__init__()
        self.num_experts, self.topk, self.explicit_op = experts, topk, explicit_op
        self.router = nn.Linear(hidden, experts, bias=False)
        self.w_up = nn.Parameter(torch.randn(experts, hidden, 2 * ffn) / hidden ** 0.5)   # gate | up
        self.w_down = nn.Parameter(torch.randn(experts, ffn, hidden) / ffn ** 0.5)

    def route(self, x: torch.Tensor):
        """Router softmax, top-k, renormalised weights; the (token, choice) pairs sorted by expert.

        Returns (topk_weights (m, topk), flat_ids (m*topk,), order, c_map, a): row r of the expert
        input ``a`` is pair ``order[r]``, and pair p's output lands in row ``c_map[p]``."""
        probs = self.router(x).softmax(dim=-1, dtype=torch.float32)
        topk_weights, topk_ids = probs.topk(self.topk, dim=-1)
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        flat_ids = topk_ids.view(-1)
        order = flat_ids.argsort(stable=True)
        c_map = order.argsort()                       # pair -> its row in the expert-sorted output
        return topk_weights, flat_ids, order, c_map, x[order // self.topk]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, k = x.shape
        topk = self.topk
        topk_weights, flat_ids, order, c_map, a = self.route(x)
        counts = (flat_ids.unsqueeze(1) == torch.arange(self.num_experts, device=x.device)).sum(0).tolist()
        # Experts, each on its contiguous slice of the sorted rows.
        outs = []
        start = 0
        for e, n in enumerate(counts):
            torch._check(n >= 0)
            torch._check(n <= a.shape[0])
            gate, up = (a[start:start + n] @ self.w_up[e]).chunk(2, dim=-1)
            outs.append((F.silu(gate) * up) @ self.w_down[e])
            start = start + n
        c2 = torch.cat(outs)
        # The combine: gather each token's expert rows, weight them, sum over the top-k.
        if self.explicit_op:
            # out_dtype left at None (= c2.dtype = x.dtype): torch < 2.12's AOTInductor passes
            # dtype arguments of custom ops wrongly (pytorch/pytorch#169157).
            return torch.ops.moe.shuffle_mul_sum(c2, c_map, topk_weights)
        return (c2[c_map].view(m, topk, k) * topk_weights.view(m, topk, 1).to(x.dtype)).sum(dim=1)


def make_block(hidden: int, ffn: int, experts: int, topk: int, dtype, device, seed: int = 0,
               explicit_op: bool = False) -> MoEBlock:
    torch.manual_seed(seed)
    return MoEBlock(hidden, ffn, experts, topk, explicit_op).to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------

def fusion_available() -> bool:
    return all(hasattr(fused_moe_ops, n) for n in ("fusion_stats", "reset_fusion_stats", "disable_fusion"))


def fusion_rewrites() -> Optional[Dict]:
    return fused_moe_ops.fusion_stats() if fusion_available() else None


def bench(fns: Dict[str, Callable], x: torch.Tensor, iters: int, warmup: int = 2) -> Dict[str, float]:
    """Median milliseconds per call of each fn, calls interleaved round-robin (so that load from
    other processes hits every variant alike)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    sync()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


# Two entry points with their own code objects, hence their own Dynamo caches: both compiled
# variants stay alive side by side (the block itself is inlined into each graph).
def _forward_unfused(block, x):
    return block(x)


def _forward_fused(block, x):
    return block(x)


def compile_block(block: nn.Module, x: torch.Tensor, *, fusion: bool):
    """torch.compile the block as one graph, run it once; return (callable, output, generated code)."""
    from torch._inductor.utils import run_and_get_code

    if fusion_available():
        fused_moe_ops.reset_fusion_stats()
    compiled = torch.compile(_forward_fused if fusion else _forward_unfused, dynamic=False, fullgraph=True)
    if fusion or not fusion_available():
        out, code = run_and_get_code(compiled, block, x)
    else:
        # The pass runs at compile time, i.e. inside the first call: disable it around that call.
        with fused_moe_ops.disable_fusion():
            out, code = run_and_get_code(compiled, block, x)
    return (lambda inp: compiled(block, inp)), out, "\n".join(code)


def plot(path: str, rows: List[tuple], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r[0] for r in rows]
    ms = [r[1] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3))
    bars = ax.barh(names[::-1], ms[::-1], color=["#4c72b0", "#dd8452", "#55a868"][: len(rows)][::-1])
    ax.bar_label(bars, labels=[f"{v:.2f} ms" for v in ms[::-1]], padding=3)
    ax.set_xlabel("median time per forward (ms)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(ms) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=512, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per variant")
    p.add_argument("--plot", metavar="PATH", default=None, help="write a PNG of the timings to PATH")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (torch.set_num_threads); on a busy machine 1 gives steadier timings")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install -e '.[plot]' (or pip install matplotlib)")
    if not 1 <= args.topk <= args.experts:
        p.error("--topk must be between 1 and --experts")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    # The experts' row counts are data (`.tolist()` of a tensor): let Dynamo trace through them
    # (unbacked sizes) instead of breaking the graph there.
    torch._dynamo.config.capture_scalar_outputs = True
    # Fresh compiles, not Inductor's on-disk graph cache, so the pass really runs (and is counted).
    torch._inductor.config.fx_graph_cache = False

    block = make_block(args.hidden, args.ffn, args.experts, args.topk, dtype, device, args.seed)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    kernel = _registry.ACTIVE.get(torch.device(device).type, "?")
    print(f"MoE block: tokens={args.tokens} hidden={args.hidden} ffn={args.ffn} experts={args.experts} "
          f"topk={args.topk} dtype={args.dtype} device={device} (moe::shuffle_mul_sum kernel: {kernel})")

    with torch.inference_mode():
        eager_out = block(x)
        torch._dynamo.reset()
        off, off_out, off_code = compile_block(block, x, fusion=False)
        off_stats = fusion_rewrites()
        on, on_out, on_code = compile_block(block, x, fusion=True)
        on_stats = fusion_rewrites()
        ms = bench({"eager": block, "compiled, fusion off": off, "compiled, fusion on": on}, x, args.iters)
    off_calls = off_code.count("shuffle_mul_sum")
    on_calls = on_code.count("shuffle_mul_sum")

    # --- report ---
    if on_stats is None:
        print("fusion pass: NOT INSTALLED (fused_moe_ops.fusion is missing); both compiled variants are unfused")
    else:
        fired = on_stats["rewrites"]
        print(f"fusion pass: {'fired' if fired else 'did NOT fire'} {fired} time(s) "
              f"{on_stats.get('by_pattern', {})}; with the pass disabled: {off_stats['rewrites']} rewrite(s)")
    print(f"generated code calls our op (moe._shuffle_mul_sum_fused): fusion on: {'yes' if on_calls else 'no'}, "
          f"fusion off: {'yes' if off_calls else 'no'}")
    if on_stats is not None and on_stats.get("lowered"):
        # Inductor benchmarked our kernel against its own code for the combine and kept the faster:
        # where its own code won, the combine is in its kernels (fused with the neighbours), not a call.
        chosen = ", ".join(f"{'our op' if c == 'op' else 'its own code (' + c + ' decomposition)'}: {n}"
                           for c, n in sorted(on_stats["lowered"].items()))
        print(f"Inductor's choice for the rewritten combine: {chosen}")
    scale = eager_out.abs().max().item() or 1.0
    ok = True
    for name, out in (("compiled, fusion off", off_out), ("compiled, fusion on", on_out)):
        err = (out.float() - eager_out.float()).abs().max().item()
        good = err <= REL_TOL[dtype] * scale
        ok &= good
        print(f"max |eager - {name}| = {err:.3e}  (max |eager| = {scale:.3g}, tolerance {REL_TOL[dtype]:g} relative)"
              f"  {'ok' if good else 'MISMATCH'}")
    print()
    rows = list(ms.items())
    t_eager = ms["eager"]
    print(f"{'variant':24s} {'median ms':>10s} {'vs eager':>9s}")
    for name, t in rows:
        print(f"{name:24s} {t:10.3f} {t_eager / t:8.2f}x")
    print(f"({args.iters} timed calls each, interleaved, after 2 warm-up calls; device {device}, "
          f"{torch.get_num_threads()} CPU threads)")
    if args.plot:
        plot(args.plot, rows, f"MoE block, {args.tokens} tokens, hidden {args.hidden}, {args.experts} experts "
                              f"top-{args.topk}, {args.dtype}, {device}")
        print(f"wrote {args.plot}")
    if not ok:
        print("ERROR: compiled output differs from eager beyond the tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
