"""The pattern registry all fusions register into, and the one place that performs a rewrite."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch._inductor.pattern_matcher import CallFunction, Ignored, Match, PatternMatcherPass
from torch.fx import Node

from . import _state
from .autotune import inlines_its_own_code
from ..ops import FACTOR_ROUND, NEGATIVE_IS_ERROR, WRAP_NEGATIVE
from ._match import (CONVERT, NoMatch, aten, erase_dead, fused_into_consumer_by_inductor, log, peel_factors,
                     peel_row_mask, reshape_like, shape_str, static_int, tensor_val)

PASS_NAME = "fused_moe_ops_shuffle_mul_sum"

# Filled lazily by fusion/_pass.py (importing the fusion modules registers their patterns).
PATTERNS = PatternMatcherPass(pass_name=PASS_NAME)

_OP = torch.ops.moe._shuffle_mul_sum_fused.default

# AOTInductor before torch 2.12 reads a custom op's ScalarType argument wrongly (float32 arrives as
# float64, pytorch/pytorch#169157, fixed by #173562): the loaded package's call fails. So the
# replacement passes out_dtype=None whenever it means "input's dtype", and an AOT compile on such a
# torch leaves a mixed-dtype combine (e.g. bf16 rows -> float32 result) to Inductor (see register()).
# (The factors' rounding is an int argument for the same reason.)
AOTI_MISREADS_DTYPE_ARGS = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 12)


def FUSED_COMBINE(
    x: torch.Tensor,
    permutation: Optional[torch.Tensor],
    factors: torch.Tensor,
    out_dtype: torch.dtype,
    negative_index: int,
    rounding: Optional[torch.dtype] = None,
    row_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The op call every replacement emits (``moe._shuffle_mul_sum_fused``); epilogue.py later folds
    a consumer into its scale and addend."""
    od = None if out_dtype == x.dtype else out_dtype
    if x.dim() != 2:  # rows found in another shape (check_flat_rows): the op reads them as (R, k)
        x = x.reshape(-1, x.shape[-1])
    if row_mask is None:
        return _OP(x, permutation, factors, od, negative_index, FACTOR_ROUND[rounding])
    return _OP(x, permutation, factors, od, negative_index, FACTOR_ROUND[rounding], 1.0, None, row_mask.reshape(-1))


def negative_index_of(wraps: bool) -> int:
    """x[idx] wraps negative entries; x.index_select(0, idx) refuses them."""
    return WRAP_NEGATIVE if wraps else NEGATIVE_IS_ERROR


def _aot_compiling() -> bool:
    from torch._inductor.virtualized import V

    return bool(V.aot_compilation)

SUM_OPS = aten.sum.dim_IntList
RESHAPES = [aten.view.default, aten.reshape.default, aten._unsafe_view.default]


@dataclass
class Plan:
    """What an analysis found: the op's arguments (as graph nodes) and what the rewrite removes."""

    rows: Node                   # the op's input (R, k)
    index: Optional[Node]        # the permutation (N,), None for the identity
    weights: Node                # the node the factors are derived from
    m: Any
    topk: Any
    k: Any
    out_dtype: torch.dtype
    walked: List[Node] = field(default_factory=list)  # nodes outside the pattern the rewrite may leave dead
    wraps: bool = True           # negative index entries count from the end (x[idx]), not an error

    @property
    def device_type(self) -> str:
        return tensor_val(self.rows).device.type

    @property
    def rows_dtype(self) -> torch.dtype:
        return tensor_val(self.rows).dtype


def sum_dim1(inner) -> List[Any]:
    """``inner.sum(dims)`` with and without an explicit keepdim argument, and each of those followed by
    ``.to(dtype)`` (the upcast spelling: the convert is folded into out_dtype). Converts first: the
    matcher visits nodes from the output up, and the outer form must win."""
    sums = [CallFunction(SUM_OPS, inner, Ignored()), CallFunction(SUM_OPS, inner, Ignored(), Ignored())]
    return [CallFunction(CONVERT, s, Ignored()) for s in sums] + sums


def register(patterns: Sequence[Any], analyze: Callable[[Match], Any], rewrite: Callable[[Match, Any], None]):
    """Register ``patterns`` with one extra_check (``analyze`` did not raise NoMatch and the size is
    worth it) and one handler (``rewrite``, given the analysis)."""
    from torch._inductor.pattern_matcher import register_graph_pattern

    def extra_check(match: Match) -> bool:
        try:
            plan = analyze(match)
        except NoMatch as e:
            log.debug("fused_moe_ops: %s left alone: %s", match.output_node(), e)
            return False
        rows, _, _ = peel_row_mask(plan.rows)
        if fused_into_consumer_by_inductor(rows) and not inlines_its_own_code(
                plan.device_type, static_int(plan.m), static_int(plan.topk), static_int(plan.k), plan.rows_dtype):
            # Inductor's own kernel reads the pointwise inputs directly; the op would add a write and a
            # read of the whole (R, k) rows. Where the lowering is certain to be Inductor's own code
            # (fusion/autotune.py) the rewrite stands: the inlined code fuses the rows again.
            log.debug("fused_moe_ops: %s left alone: its rows are a pointwise result Inductor fuses into "
                      "its own combine, and the op would stay", match.output_node())
            return False
        if AOTI_MISREADS_DTYPE_ARGS and plan.out_dtype != plan.rows_dtype and _aot_compiling():
            log.debug("fused_moe_ops: %s left alone: AOTInductor on torch %s cannot pass out_dtype=%s "
                      "to a custom op", match.output_node(), torch.__version__, plan.out_dtype)
            return False
        hook = getattr(sys.modules[__package__], "should_rewrite")  # replaceable at runtime
        if not hook(plan.device_type, static_int(plan.m), static_int(plan.topk),
                                     static_int(plan.k), plan.rows_dtype):
            log.debug("fused_moe_ops: %s left alone: should_rewrite said no", match.output_node())
            return False
        return True

    def handler(match: Match, *args: Any, **kwargs: Any) -> None:
        rewrite(match, analyze(match))

    for pattern in patterns:
        register_graph_pattern(pattern, extra_check=extra_check, pass_dict=PATTERNS)(handler)


def replace(
    match: Match,
    name: str,
    replacement: Callable[..., torch.Tensor],
    args: Sequence[Node],
    walked: Sequence[Node],
    *,
    rows: Node,
    index: Optional[Node],
    m: Any,
    topk: Any,
    k: Any,
    out_dtype: torch.dtype,
) -> None:
    """Swap the matched subgraph for ``replacement(*args)`` traced to ATen, erase what became dead,
    count it and log it."""
    anchor = match.output_node()
    graph = anchor.graph
    match.replace_by_example(replacement, list(args))
    erase_dead(graph, walked)
    _state.count(name)
    log.info(
        "fused_moe_ops: rewrote %s (%s) into moe._shuffle_mul_sum_fused: input %s, permutation %s, "
        "m=%s topk=%s k=%s, out %s",
        name, anchor.name, shape_str(rows), shape_str(index) if index is not None else "None (identity)",
        m, topk, k, str(out_dtype).replace("torch.", ""),
    )


def replace_with_op(match: Match, name: str, plan: Plan, build: Callable[..., torch.Tensor], factors: Node,
                    walked: Sequence[Node]) -> None:
    """Trace ``build(x, index, factors, row_mask)`` (index / row_mask None where the plan has none)
    over the plan's nodes and swap the matched subgraph for it. A row mask in front of the rows
    (``where(mask, 0, z)``) becomes the op's row_mask."""
    x, mask, masked = peel_row_mask(plan.rows)
    nodes = {"x": x, "index": plan.index, "factors": factors, "row_mask": mask}
    present = [key for key, node in nodes.items() if node is not None]

    def replacement(*tensors):
        t = dict.fromkeys(nodes)
        t.update(zip(present, tensors))
        return build(t["x"], t["index"], t["factors"], t["row_mask"])

    replace(match, name, replacement, [nodes[key] for key in present], list(walked) + masked, rows=x,
            index=plan.index, m=plan.m, topk=plan.topk, k=plan.k, out_dtype=plan.out_dtype)


def rewrite_per_slot(match: Match, plan: Plan, name: str) -> None:
    """Replace a combine whose weights are per (token, slot), ``(m, topk)`` in some view: the op reads
    the weights' source and rounds as the graph did; negative index entries keep eager's meaning."""
    layout = (plan.m, plan.topk)
    src, rounding, dims, chain = peel_factors(plan.weights, layout)
    out_dtype, negative_index = plan.out_dtype, negative_index_of(plan.wraps)

    def build(x, idx, w, row_mask):
        return FUSED_COMBINE(x, idx, reshape_like(w, layout, dims), out_dtype, negative_index, rounding, row_mask)

    replace_with_op(match, name, plan, build, src, plan.walked + chain)
