"""Fusion 5: the combine written as "scatter each weighted row to its token" (scatter_add / index_add /
index_put with accumulate), where the graph itself shows that every token receives exactly topk rows.

Eager spellings (``perm`` sorts the m * topk (token, slot) pairs by expert; row r of ``y`` is the
expert output of pair ``perm[r]``, i.e. of token ``perm[r] // topk``)::

    perm = expert_indices.view(-1).argsort(stable=True)          # or .sort(0)[1]
    tok = perm // topk      # perm.div(topk, rounding_mode="trunc" | "floor"), perm.div(topk).floor().long()
    torch.zeros(m, k).scatter_add(0, tok.unsqueeze(-1).expand(-1, k), y * w_sorted[:, None])  # torchao
    torch.zeros(m, k).index_add(0, tok, y * w_sorted[:, None])                               # JetMoE
    torch.zeros(m, k).index_put_((tok,), y * w_sorted[:, None], accumulate=True)

Post-grad ATen::

    scatter_add.default(ZEROS, 0, expand(unsqueeze|view(TOK), [n, k]), SRC)
    index_add.default(ZEROS, 0, TOK, SRC)                 (alpha 1)
    index_put.default(ZEROS, [TOK], SRC, True)
    ZEROS = full([m, k], 0)  with m * topk == n
    TOK   = int converts of  div.Tensor_mode(P, topk, 'trunc' | 'floor')
                           | convert(floor(div.Tensor(P, topk)), int)     (float division: see below)
    P     = getitem(sort(V), 1) | getitem(sort.stable(V), 1),  V 1-D with n entries: a permutation of [0, n)
    SRC   = [downcast] mul.Tensor(Y, W) in either order, Y (n, k) float rows, W (n, 1) float weights

Why this is the combine for every input: a sort's indices are a permutation of [0, n), so ``P // topk``
takes every token number in [0, m) exactly topk times, whatever the sorted values are (ties, dropped
experts marked -1, uneven expert loads): token t receives the rows ``inv[t*topk + j]``, j < topk,
where ``inv`` is the inverse permutation. No index of this form is out of range, and none is left for
the op to refuse.

Replacement (the inverse permutation: one small scatter of n integers; then the per-row-factor form of
the op, deterministic, accumulating in float32 like every other rewrite)::

    inv = zeros_like(P).scatter(0, P, arange(n))
    moe._shuffle_mul_sum_fused(Y, inv.view(m, topk), W.reshape(n), out_dtype, ...)

Left alone: a token index of any other origin (a graph input: the routing ran in another graph, e.g.
after a graph break), a destination that is not zeros, a scatter over another dimension or with an
index narrower than the rows, and, for the float division ``P.div(topk).floor()``, a row count that is
not known to be at most 2**24 (float32; 2**53 for float64): beyond it the division rounds and eager's
token numbers are not ``P // topk`` any more (so under a dynamic token count this spelling stays
Inductor's).
"""
from __future__ import annotations

import operator
from typing import Any, List, Optional, Tuple

import torch
from torch._inductor.pattern_matcher import CallFunction, Ignored, KeywordArg, Match
from torch.fx import Node

from ._common import FUSED_COMBINE, Plan, negative_index_of, register, replace_with_op
from ._match import (
    CONVERT,
    FLOAT_DTYPES,
    INDEX_DTYPES,
    NoMatch,
    aten,
    peel_factors,
    require,
    reshape_like,
    same,
    same_shape,
    single_user,
    split_weighted_rows,
    static_int,
    tensor_val,
    val,
)

NAME = "scatter_add_combine"

PATTERNS = [
    CallFunction(aten.scatter_add.default, KeywordArg("dest"), Ignored(), KeywordArg("index"), KeywordArg("src")),
    CallFunction(aten.index_add.default, KeywordArg("dest"), Ignored(), KeywordArg("index"), KeywordArg("src")),
    CallFunction(aten.index_put.default, KeywordArg("dest"), KeywordArg("indices"), KeywordArg("src"), True),
]

# Integers a float type holds exactly (every p < 2**mantissa+1): where ``p / topk`` floors to p // topk.
_EXACT_INTS = {torch.float32: 2**24, torch.float64: 2**53}
_INT_MAX = {torch.int32: 2**31 - 1, torch.int64: 2**63 - 1}
_SORTS = tuple(op for op in (aten.sort.default, getattr(aten.sort, "stable", None)) if op is not None)


def _is_zeros(node: Any, shape) -> bool:
    v = val(node)
    return (isinstance(node, Node) and node.op == "call_function" and node.target is aten.full.default
            and node.args[1] == 0 and isinstance(v, torch.Tensor) and same_shape(v.shape, shape))


def _at_most(size: Any, bound: int) -> bool:
    n = static_int(size)
    return n is not None and n <= bound


def _peel_int_converts(node: Node, n: Any, walked: List[Node]) -> Node:
    """Walk up integer -> integer converts that keep every value below n (token numbers < n)."""
    while isinstance(node, Node) and node.op == "call_function" and node.target is CONVERT:
        dst, src = node.args[1], val(node.args[0])
        require(isinstance(src, torch.Tensor), "no metadata on the index")
        if src.dtype.is_floating_point:
            break  # the floored float division's convert: token_index checks it
        require(src.dtype in INDEX_DTYPES and dst in INDEX_DTYPES, "index convert is not between int32/int64")
        require(dst == torch.int64 or _at_most(n, _INT_MAX[dst]), f"index convert to {dst} may wrap")
        walked.append(node)
        node = node.args[0]
    return node


def _sort_indices(node: Node, n: Any) -> Node:
    """node is the indices output of a sort of a 1-D tensor of n entries: a permutation of [0, n)."""
    require(isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem
            and node.args[1] == 1, "token index is not derived from a sort's indices")
    sort = node.args[0]
    require(isinstance(sort, Node) and sort.op == "call_function" and sort.target in _SORTS, "not a sort")
    v = val(sort.args[0])
    require(isinstance(v, torch.Tensor) and v.dim() == 1 and same(v.shape[0], n),
            "the sort is not over a 1-D tensor of one entry per row")
    return node


def token_index(index: Node, n: Any, topk_hint: Optional[int] = None) -> Tuple[Node, int, List[Node]]:
    """index (n,) is ``P // topk`` for a permutation P of [0, n): return (P, topk, walked)."""
    walked: List[Node] = []
    node = _peel_int_converts(index, n, walked)
    require(isinstance(node, Node) and node.op == "call_function", "token index is a graph input")
    if node.target is CONVERT and tensor_val(node.args[0]).dtype.is_floating_point:  # floor(...).long()
        dst = node.args[1]
        require(dst == torch.int64 or (dst in INDEX_DTYPES and _at_most(n, _INT_MAX[dst])),
                f"token numbers converted to {dst}")
        walked.append(node)
        node = node.args[0]
        require(node.op == "call_function" and node.target is aten.floor.default, "a float token index not floored")
    if node.target is aten.div.Tensor_mode:
        mode = node.kwargs.get("rounding_mode", node.args[2] if len(node.args) > 2 else None)
        require(mode in ("trunc", "floor"), f"rounding_mode {mode!r}")  # the same for P >= 0
        p, topk = node.args[0], node.args[1]
        walked.append(node)
    elif node.target is aten.floor.default:
        div = node.args[0]
        require(isinstance(div, Node) and div.op == "call_function" and div.target is aten.div.Tensor,
                "floor of something other than a division")
        dt = tensor_val(div).dtype
        require(dt in _EXACT_INTS and _at_most(n, _EXACT_INTS[dt]),
                f"{dt} division of {n} row numbers may round (the token numbers would not be P // topk)")
        p, topk = div.args[0], div.args[1]
        walked += [node, div]
    else:
        raise NoMatch("token index is not a sort's indices divided by topk")
    require(isinstance(topk, int) and not isinstance(topk, bool) and topk > 0, f"divisor {topk!r}")
    pv = val(p)
    require(isinstance(pv, torch.Tensor) and pv.dtype in INDEX_DTYPES, "the divided index is not an integer tensor")
    return _sort_indices(p, n), topk, walked


def _weighted_rows(src: Node, n: Any, k: Any) -> Tuple[Node, Node, List[Node]]:
    """src is (Y * W) (n, k), W (n, 1), possibly rounded once to the destination's dtype: (Y, W, walked)."""
    walked: List[Node] = []
    product = src
    if product.op == "call_function" and product.target is CONVERT:
        inner = val(product.args[0])
        require(isinstance(inner, torch.Tensor) and inner.dtype == torch.float32 and single_user(product),
                "convert of the rows is not a float32 -> float downcast")
        walked.append(product)
        product = product.args[0]
    require(product.op == "call_function" and product.target is aten.mul.Tensor, "no weighting multiply")
    require(single_user(product), "the product has another user")
    walked.append(product)
    x, w, upcasts = split_weighted_rows(product, n, k)
    return x, w, walked + upcasts


def analyze(match: Match) -> Plan:
    anchor = match.output_node()
    out = tensor_val(anchor)
    require(out.dtype in FLOAT_DTYPES and out.dim() == 2, f"result {out.dtype} {out.dim()}-D")
    m, k = out.shape
    dest = anchor.args[0]
    require(_is_zeros(dest, (m, k)), "the destination is not zeros")
    walked: List[Node] = []
    if anchor.target is aten.scatter_add.default:
        dim, index2d, src = anchor.args[1], anchor.args[2], anchor.args[3]
        require(dim in (0, -2), f"scatter over dim {dim}")
        n = tensor_val(src).shape[0]
        # index[r, c] = tok[r] for every column c, and as wide as the rows
        require(isinstance(index2d, Node), "index is not a tensor")
        node = _peel_int_converts(index2d, n, walked)
        require(isinstance(node, Node) and node.op == "call_function" and node.target is aten.expand.default, "the index is not an expanded column")
        require(same_shape(tensor_val(node).shape, (n, k)), "the index does not cover the rows")
        walked.append(node)
        col = node.args[0]
        require(col.op == "call_function" and col.target in (aten.unsqueeze.default, aten.view.default,
                                                              aten.reshape.default)
                and same_shape(tensor_val(col).shape, (n, 1)), "the expanded index is not an (n, 1) column")
        walked.append(col)
        index = col.args[0]
    elif anchor.target is aten.index_add.default:
        dim, index, src = anchor.args[1], anchor.args[2], anchor.args[3]
        alpha = anchor.args[4] if len(anchor.args) > 4 else anchor.kwargs.get("alpha", 1)
        require(dim in (0, -2) and alpha == 1, f"index_add over dim {dim}, alpha {alpha}")
        n = tensor_val(src).shape[0]
    else:
        indices, src = anchor.args[1], anchor.args[2]
        require(len(indices) == 1 and indices[0] is not None, "index_put with more than one index")
        index = indices[0]
        n = tensor_val(src).shape[0]
    require(isinstance(src, Node) and tensor_val(src).dtype == out.dtype, "rows of another dtype")
    require(isinstance(index, Node) and tensor_val(index).dim() == 1 and same(tensor_val(index).shape[0], n),
            "the token index is not one entry per row")
    perm, topk, chain = token_index(index, n)
    require(same(m * topk, n), f"{n} rows are not {m} tokens x {topk}")
    x, w, rows_walked = _weighted_rows(src, n, k)
    return Plan(rows=x, index=perm, weights=w, m=m, topk=topk, k=k, out_dtype=out.dtype,
                walked=rows_walked + walked + chain + [dest], wraps=True)


def rewrite(match: Match, plan: Plan) -> None:
    out_dtype, topk = plan.out_dtype, plan.topk
    per_row = (tensor_val(plan.rows).shape[0],)
    src, rounding, dims, chain = peel_factors(plan.weights, per_row)

    def build(y, perm, w, row_mask):
        n = perm.shape[0]
        inverse = torch.zeros_like(perm).scatter(0, perm, torch.arange(n, device=perm.device, dtype=perm.dtype))
        factors = reshape_like(w, per_row, dims)
        return FUSED_COMBINE(y, inverse.view(-1, topk), factors, out_dtype, negative_index_of(True), rounding,
                             row_mask)

    replace_with_op(match, NAME, plan, build, src, plan.walked + chain)


register(PATTERNS, analyze, rewrite)
