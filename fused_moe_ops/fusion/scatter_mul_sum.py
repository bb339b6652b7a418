"""Fusion 6: the scatter-add combine with a token index nothing proves: the scatter form of the op.

Eager spellings (``tok`` (n,) any token index: a graph input after a graph break, a sort's indices not
divided by topk, an index from a routing map, with duplicates, uneven counts, tokens without rows)::

    dest.scatter_add(0, tok.unsqueeze(1).expand(-1, k), y * w[:, None])   # Megatron-LM's unpermute
    dest.index_add(0, tok, y * w[:, None], alpha=a)                      # JetMoE (after its graph break)
    dest.index_put_((tok,), y * w[:, None], accumulate=True)
    (dest zeros or any (m, k) tensor of the result's dtype; rows weighted per row or not at all)

Post-grad ATen (Inductor usually decomposes ``index_add`` into ``index_put(..., accumulate=True)`` of
``src * alpha``; then compiled ``index_add`` wraps negative entries as ``index_put`` does, with or
without this pass, where eager refuses them; an ``index_add`` left as it is keeps refusing them)::

    scatter_add.default(DEST, 0, [convert to int64](expand(unsqueeze|view|reshape(TOK), [n, k])), SRC)
    index_put.default(DEST, [TOK], SRC, True)
    index_add.default(DEST, 0, TOK, SRC[, alpha])      (where it survives decomposition)
    SRC  = [mul.Tensor(S, alpha)]  S = [downcast] mul.Tensor(Y, W) in either order | Y
    Y (n, k) float rows, W (n, 1) float weights, DEST (m, k) of the result's dtype

Replacement (one call of ``moe._scatter_mul_sum_fused``)::

    moe._scatter_mul_sum_fused(Y, TOK, W.reshape(n) or None, m, out_dtype,
                               negative_index, factor_round, alpha, None if DEST is zeros else DEST)

Why this is eager's result for every input eager accepts: token t of eager's result is
``dest[t] + sum of the rows r with tok[r] == t`` (each times its weight and alpha), which is the op's
``scale * sum + addend`` up to rounding: the op multiplies and accumulates in float32 and rounds once
(eager rounds each product and, in a 16-bit destination, each add), and it applies ``alpha`` to the
float32 sum where eager scales each row (they differ only where a float32 sum overflows, so a
non-finite or zero alpha is left alone). Negative entries: ``scatter_add`` refuses them
(``negative_index=2``), ``index_put`` wraps them (``1``: -m <= t < 0 is token t + m); an entry the
spelling refuses raises in the op too (an IndexError where eager's ``scatter_add`` raises a
RuntimeError: the same entries refused). Out-of-range entries are never silently dropped.

Left alone: a scatter over another dimension; a 2-D index that is not an (n, 1) column expanded to
the rows' (n, k) (any other index scatters elements, not rows); an index narrower than the rows or the
destination; ``index_put`` without accumulate (the last duplicate wins), with a bool mask or with more
than one index; rows that broadcast to the index (``src`` (n, 1) or (k,)); rows or destination of
another dtype than the result (eager refuses them); a non-finite or zero alpha. Where the index IS
``P // topk`` for a sort's indices P, fusion 5 (scatter_add_combine.py, registered first) emits the
cheaper gather form instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch._inductor.pattern_matcher import CallFunction, Ignored, KeywordArg, Match
from torch.fx import Node

from . import _state
from ..ops import FACTOR_ROUND, NEGATIVE_IS_ERROR, WRAP_NEGATIVE
from ._common import Plan, register
from ._match import (CONVERT, FLOAT_DTYPES, INDEX_DTYPES, NoMatch, aten, erase_dead, log, peel_factors, require,
                     same, same_shape, shape_str, single_user, split_weighted_rows, tensor_val, val)

NAME = "scatter_mul_sum"

PATTERNS = [
    CallFunction(aten.scatter_add.default, KeywordArg("dest"), Ignored(), KeywordArg("index"), KeywordArg("src")),
    CallFunction(aten.index_add.default, KeywordArg("dest"), Ignored(), KeywordArg("index"), KeywordArg("src")),
    CallFunction(aten.index_add.default, KeywordArg("dest"), Ignored(), KeywordArg("index"), KeywordArg("src"),
                 KeywordArg("alpha")),
    CallFunction(aten.index_put.default, KeywordArg("dest"), KeywordArg("indices"), KeywordArg("src"), True),
]

_OP = torch.ops.moe._scatter_mul_sum_fused.default
_COLUMN_VIEWS = (aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default)


@dataclass
class ScatterPlan(Plan):
    """A Plan (rows, index, m, k, out_dtype, walked) plus what the scatter form needs."""

    dest: Optional[Node] = None        # the addend (a destination that is not zeros), or None
    num_tokens: Any = None             # m as a graph node (a symbolic size) or an int
    scale: float = 1.0                 # index_add's alpha
    negative_index: int = NEGATIVE_IS_ERROR


def _is_zeros(node: Any) -> bool:
    return (isinstance(node, Node) and node.op == "call_function" and node.target is aten.full.default
            and node.args[1] == 0 and not isinstance(node.args[1], bool))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _column_index(index2d: Node, n: Any, k: Any, walked: List[Node]) -> Node:
    """index2d (n, k) is a 1-D index of n entries viewed as an (n, 1) column and expanded along the
    rows (index2d[r, c] == tok[r] for every c), possibly widened to int64: return tok."""
    node = index2d
    if isinstance(node, Node) and node.op == "call_function" and node.target is CONVERT:
        src = tensor_val(node.args[0])
        # scatter_add takes int64 only: the convert widens an int32 column (value-preserving) or is a no-op
        require(src.dtype in INDEX_DTYPES and node.args[1] == torch.int64, f"index converted from {src.dtype}")
        walked.append(node)
        node = node.args[0]
    require(isinstance(node, Node) and node.op == "call_function" and node.target is aten.expand.default,
            "the 2-D index is not an expanded column")
    require(same_shape(tensor_val(node).shape, (n, k)), "the index does not cover the rows")
    walked.append(node)
    col = node.args[0]
    require(isinstance(col, Node) and col.op == "call_function" and col.target in _COLUMN_VIEWS
            and same_shape(tensor_val(col).shape, (n, 1)), "the expanded index is not an (n, 1) column")
    walked.append(col)
    tok = col.args[0]
    tv = tensor_val(tok)
    require(tv.dim() == 1 and same(tv.shape[0], n), "the column is not a view of a 1-D index of one entry per row")
    return tok


def _split_src(src: Node, n: Any, k: Any, walked: List[Node]):
    """SRC -> (rows (n, k), weights (n, 1) or None, alpha)."""
    scale = 1.0
    if src.op == "call_function" and src.target is aten.mul.Tensor and single_user(src) \
            and any(_is_number(a) for a in src.args) and isinstance(val(src), torch.Tensor):
        a, b = src.args
        number, tensor = (a, b) if _is_number(a) else (b, a)
        if isinstance(tensor, Node) and same_shape(tensor_val(tensor).shape, (n, k)):
            scale = float(number)
            walked.append(src)
            src = tensor
    require(math.isfinite(scale) and scale != 0.0, f"alpha {scale} (scaling the float32 sum is not scaling each row)")
    product = src
    downcast: List[Node] = []
    if product.op == "call_function" and product.target is CONVERT and single_user(product):
        inner = val(product.args[0])
        if isinstance(inner, torch.Tensor) and inner.dtype == torch.float32 and product.args[1] in FLOAT_DTYPES:
            downcast, product = [product], product.args[0]
    if product.op == "call_function" and product.target is aten.mul.Tensor and single_user(product):
        try:
            y, w, upcasts = split_weighted_rows(product, n, k)
        except NoMatch:
            pass
        else:
            walked += downcast + [product] + upcasts
            return y, w, scale
    # unweighted rows: what is scattered is the rows themselves (a convert or product as it is)
    sv = tensor_val(src)
    require(sv.dtype in FLOAT_DTYPES and same_shape(sv.shape, (n, k)), "the rows broadcast to the index")
    return src, None, scale


def analyze(match: Match) -> ScatterPlan:
    anchor = match.output_node()
    out = tensor_val(anchor)
    require(out.dtype in FLOAT_DTYPES and out.dim() == 2, f"result {out.dtype} {out.dim()}-D")
    m, k = out.shape
    dest = anchor.args[0]
    walked: List[Node] = []
    if anchor.target is aten.scatter_add.default:
        dim, index2d, src = anchor.args[1], anchor.args[2], anchor.args[3]
        require(dim in (0, -2), f"scatter over dim {dim}")
        n = tensor_val(src).shape[0]
        require(same_shape(tensor_val(src).shape, (n, k)), "the rows are not as wide as the destination")
        require(isinstance(index2d, Node), "index is not a tensor")
        index = _column_index(index2d, n, k, walked)
        negative_index = NEGATIVE_IS_ERROR
    elif anchor.target is aten.index_add.default:
        dim, index, src = anchor.args[1], anchor.args[2], anchor.args[3]
        require(dim in (0, -2), f"index_add over dim {dim}")
        alpha = anchor.args[4] if len(anchor.args) > 4 else anchor.kwargs.get("alpha", 1)
        require(_is_number(alpha), f"alpha {alpha!r}")
        negative_index = NEGATIVE_IS_ERROR
    else:
        indices, src = anchor.args[1], anchor.args[2]
        require(len(indices) == 1 and indices[0] is not None, "index_put with more than one index")
        index = indices[0]
        negative_index = WRAP_NEGATIVE
    require(isinstance(src, Node) and isinstance(index, Node), "the rows or the index are not tensors")
    iv, sv = tensor_val(index), tensor_val(src)
    require(iv.dtype in INDEX_DTYPES, f"index dtype {iv.dtype}")
    require(iv.dim() == 1, f"{iv.dim()}-D index")
    n = iv.shape[0]
    require(sv.dtype == out.dtype, f"rows {sv.dtype} into a {out.dtype} destination")
    require(same_shape(sv.shape, (n, k)), "the rows are not one (k,) row per index entry")
    rows, weights, scale = _split_src(src, n, k, walked)
    if anchor.target is aten.index_add.default:  # (left undecomposed, e.g. in bfloat16)
        scale *= float(alpha)
        require(math.isfinite(scale) and scale != 0.0, f"alpha {alpha}")
    if _is_zeros(dest):
        sizes = dest.args[0]
        num_tokens, addend = sizes[0], None
        walked.append(dest)
    else:
        dv = tensor_val(dest)
        require(dv.dtype in FLOAT_DTYPES and same_shape(dv.shape, (m, k)), "the destination is not (m, k) float")
        num_tokens, addend = m, dest
    return ScatterPlan(rows=rows, index=index, weights=weights, m=m, topk=None, k=k, out_dtype=out.dtype,
                       walked=walked, wraps=negative_index == WRAP_NEGATIVE, dest=addend, num_tokens=num_tokens,
                       scale=scale, negative_index=negative_index)


def rewrite(match: Match, plan: ScatterPlan) -> None:
    anchor = match.output_node()
    graph = anchor.graph
    n = tensor_val(plan.index).shape[0]
    od = None if plan.out_dtype == plan.rows_dtype else plan.out_dtype
    chain: List[Node] = []
    rounding = None
    nodes = {"rows": plan.rows, "index": plan.index, "factors": None, "addend": plan.dest, "num_tokens": None}
    dims = None
    if plan.weights is not None:
        nodes["factors"], rounding, dims, chain = peel_factors(plan.weights, (n,))
    if plan.dest is None and isinstance(plan.num_tokens, Node):
        nodes["num_tokens"] = plan.num_tokens  # a symbolic token count: read from its node when traced
    present = [key for key, node in nodes.items() if node is not None]
    negative_index, scale, static_m = plan.negative_index, plan.scale, plan.num_tokens

    def replacement(*values):
        t = dict.fromkeys(nodes)
        t.update(zip(present, values))
        factors = t["factors"]
        if factors is not None:
            factors = factors.reshape(-1)  # the peeled source holds the (n,) factors in order
        if t["addend"] is not None:
            m = t["addend"].shape[0]
        elif t["num_tokens"] is not None:
            m = t["num_tokens"]
        else:
            m = static_m
        return _OP(t["rows"], t["index"], factors, m, od, negative_index, FACTOR_ROUND[rounding], scale, t["addend"])

    match.replace_by_example(replacement, [nodes[key] for key in present])
    erase_dead(graph, plan.walked + chain)
    _state.count(NAME)
    log.info(
        "fused_moe_ops: rewrote %s (%s) into moe._scatter_mul_sum_fused: input %s, index %s, m=%s k=%s, "
        "factors %s, negative_index %d, scale %s, addend %s, out %s",
        NAME, anchor.name, shape_str(plan.rows), shape_str(plan.index), plan.m, plan.k,
        "None" if nodes["factors"] is None else shape_str(nodes["factors"]), negative_index, scale,
        "None" if plan.dest is None else shape_str(plan.dest), str(plan.out_dtype).replace("torch.", ""),
    )


register(PATTERNS, analyze, rewrite)
