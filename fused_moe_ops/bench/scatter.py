"""The scatter form of the combine, side by side: ``moe::scatter_mul_sum`` against eager's spelling and
Inductor's kernel for it.

Per shape (M tokens, top-k, hidden size K, dtype), R = M * topk expert-output rows ``y`` sorted by expert
(as a grouped GEMM leaves them), ``idx`` the token of each row (a sort's indices by expert id, // topk:
every token gets topk rows, in no order), ``w`` the router weight of each row:

    op        torch.ops.moe.scatter_mul_sum(y, idx, w, M)        (the C++ CPU kernel)
    eager     torch.zeros(M, K, dtype).index_add_(0, idx, y * w[:, None])
    inductor  torch.compile of that eager line with the fusion pass off (Inductor's own kernel)

timed on the same data in interleaved rounds (timing.py), inputs rotated through >= --rotate-mb MiB.
Ratios: eager time / op time and inductor time / op time (> 1: the op is faster). Each
implementation's result is compared once with the float64 reference: "max err" is the largest
|result - reference| over the largest |reference|; eager and Inductor add in the input dtype in
bfloat16 (one rounding per add) where the op adds in float32, so theirs is the larger error there.

    python -m fused_moe_ops.bench --scatter --dtype f32
    python -m fused_moe_ops.bench --scatter --dtype bf16 --m 1,16 --k 4096
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from fused_moe_ops.reference import scatter_mul_sum_reference

from .timing import rotating_set_count, time_cpu_interleaved
from .variants import compile_fresh, pass_disabled

# (M, topk, K): decode (M = 1 and 16 at K 4096) and prefill (M = 512 and 4096, K 2048 and 4096), top-8.
DEFAULT_SHAPES: Tuple[Tuple[int, int, int], ...] = (
    (1, 8, 4096), (16, 8, 4096), (512, 8, 2048), (512, 8, 4096), (4096, 8, 2048), (4096, 8, 4096))
IMPLS = ("op", "eager", "inductor")
HEADER = (f"{'M':>5} {'topk':>4} {'K':>5} {'dtype':>8}  {'op':>11} {'eager':>11} {'inductor':>11}  "
          f"{'eager/op':>8} {'ind/op':>7}  {'max err op / eager / ind':>26}  {'rounds':>6}")


def eager_scatter(y: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, m: int) -> torch.Tensor:
    """Eager's scatter-add combine (JetMoE's spelling), in the input dtype."""
    return torch.zeros(m, y.shape[1], dtype=y.dtype, device=y.device).index_add_(0, idx, y * w[:, None])


def make_inputs(m: int, topk: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    rows = m * topk
    experts = torch.randint(0, 64, (rows,), generator=g)
    idx = torch.sort(experts, stable=True).indices // topk  # row r holds token idx[r]'s output of one expert
    y = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.rand(rows, generator=g).to(dtype)
    return y, idx, w


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def bench_shape(m: int, topk: int, k: int, dtype: torch.dtype, budget_s: float, min_rounds: int,
                rotate_mb: float, max_sets: int) -> Dict[str, object]:
    item = torch.tensor([], dtype=dtype).element_size()
    per_set = m * topk * k * item
    # Sets larger than the rotation on their own are past every cache: one is enough (and memory is finite).
    n_sets = 1 if per_set >= rotate_mb * 2 ** 20 else rotating_set_count(per_set, rotate_mb, max_sets)
    sets = [make_inputs(m, topk, k, dtype, seed) for seed in range(n_sets)]
    with pass_disabled():
        compiled = compile_fresh(eager_scatter, with_pass=False)
        compiled(*sets[0], m)  # compile outside the timing
    calls = {
        "op": lambda i: torch.ops.moe.scatter_mul_sum(*sets[i % n_sets], m),
        "eager": lambda i: eager_scatter(*sets[i % n_sets], m),
        "inductor": lambda i: compiled(*sets[i % n_sets], m),
    }
    ref = scatter_mul_sum_reference(*sets[0], m, acc_dtype=torch.float64)
    scale = ref.abs().max().clamp_min(1e-30)
    row: Dict[str, object] = {"M": m, "topk": topk, "K": k, "dtype": str(dtype).replace("torch.", ""),
                              "sets": n_sets}
    for impl in IMPLS:
        with pass_disabled():
            out = calls[impl](0)
        row[f"max_err_{impl}"] = ((out.double() - ref).abs().max() / scale).item() if out.numel() else 0.0
    entries = []
    for impl in IMPLS:
        entries.append(({"impl": impl}, calls[impl], pass_disabled))
    time_cpu_interleaved(entries, budget_s, min_rounds=min_rounds)
    for timed, _, _ in entries:
        row[f"{timed['impl']}_s"] = timed["time_s"]
        row["rounds"] = timed["rounds"]
    row["eager_over_op"] = row["eager_s"] / row["op_s"]
    row["inductor_over_op"] = row["inductor_s"] / row["op_s"]
    return row


def format_row(r: Dict[str, object]) -> str:
    errs = f"{r['max_err_op']:.1e} / {r['max_err_eager']:.1e} / {r['max_err_inductor']:.1e}"
    return (f"{r['M']:>5} {r['topk']:>4} {r['K']:>5} {r['dtype']:>8}  {_fmt(r['op_s']):>11} {_fmt(r['eager_s']):>11} "
            f"{_fmt(r['inductor_s']):>11}  {r['eager_over_op']:>7.2f}x {r['inductor_over_op']:>6.2f}x  "
            f"{errs:>26}  {r['rounds']:>6}")


def bench(shapes: Sequence[Tuple[int, int, int]], dtype: torch.dtype, budget_s: float, min_rounds: int,
          rotate_mb: float, max_sets: int) -> List[Dict[str, object]]:
    rows = []
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    for m, topk, k in shapes:
        row = bench_shape(m, topk, k, dtype, budget_s, min_rounds, rotate_mb, max_sets)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def markdown(rows: List[Dict[str, object]], label: str) -> str:
    lines = [f"moe::scatter_mul_sum vs eager index_add_ vs Inductor ({label})", "",
             "| M | topk | K | dtype | op | eager | inductor | eager/op | inductor/op |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['M']} | {r['topk']} | {r['K']} | {r['dtype']} | {_fmt(r['op_s'])} | {_fmt(r['eager_s'])} | "
              f"{_fmt(r['inductor_s'])} | {r['eager_over_op']:.2f}x | {r['inductor_over_op']:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"
