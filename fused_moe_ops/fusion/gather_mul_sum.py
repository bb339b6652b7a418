"""Fusion 1: gather, then weight, then sum over the top-k slots.

Eager spellings (all dtypes; view or reshape; either operand order; with or without ``.to``)::

    (x[idx].view(m, topk, k) * w.view(m, topk, 1).to(x.dtype)).sum(dim=1)        # the seed line
    (w[..., None] * x.index_select(0, idx).reshape(m, topk, k)).sum(1)
    (x[idx].view(m, topk, k).float() * w.unsqueeze(-1)).sum(1).to(x.dtype)      # upcast form
    (y.view(m, topk, k) * w.unsqueeze(-1)).sum(1)                                # no gather (R == m*topk)

Post-grad ATen (what the pattern below matches; views are aten.reshape by then)::

    sum.dim_IntList(mul.Tensor(ROWS, WEIGHTS), [1])   [-> convert_element_type(out_dtype)]
    ROWS    = order-preserving views / lossless fp32 upcasts of  index.Tensor(x, [idx])
              | index_select(x, 0, idx) | y          with shape (m, topk, k)
    WEIGHTS = any float tensor of shape (m, topk, 1)  (so: no broadcast over slots or over k)

Replacement (one kernel: the wrap and the weights' rounding happen inside it)::

    moe._shuffle_mul_sum_fused(x, idx, W.reshape(m, topk), out_dtype,
                               negative_index=wrap (x[idx]) | error (index_select), factor_round=r)
    W, r = the weights before their views and their float convert (``w.view(m, topk, 1).to(bf16)``:
           W = w, r = bfloat16)
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg, Match
from torch.fx import Node

from ._common import Plan, register, rewrite_per_slot, sum_dim1
from ._match import (
    CONVERT,
    FLOAT_DTYPES,
    NoMatch,
    absorbable_downcast,
    aten,
    as_gather,
    check_flat_rows,
    check_float_rows,
    check_index,
    check_reduce_dim1,
    out_dtype_of,
    peel_rows,
    peel_upcast,
    require,
    same_shape,
    single_user,
    tensor_val,
)

NAME = "gather_mul_sum"

PATTERNS = sum_dim1(CallFunction(aten.mul.Tensor, KeywordArg("lhs"), KeywordArg("rhs")))


def analyze_rows(node: Node, m: Any, topk: Any, k: Any) -> Tuple[Node, Optional[Node], List[Node], bool]:
    """node is (m, topk, k) rows in slot order: return (x, idx or None, walked nodes, wraps).

    Shared with the bmm/einsum fusion. Every walked node between ``node`` and the gather must be
    used only on this path: if the gathered tensor has another user, fusing would not save its work.
    """
    require(same_shape(tensor_val(node).shape, (m, topk, k)), "rows are not (m, topk, k)")
    base, walked = peel_rows(node)
    require(all(single_user(n) for n in walked), "an intermediate has another user")
    gather = as_gather(base)
    if gather is None:
        check_flat_rows(base, m * topk, k)  # e.g. a bmm's (m*topk, 1, k) result: read as (m*topk, k)
        return base, None, walked, True
    require(single_user(base), "the gathered rows have another user")
    src, index, wraps = gather
    x, upcasts = peel_upcast(src)
    check_float_rows(x, None, k)
    check_index(index, m * topk, k)
    return x, index, walked + [base] + [n for n in upcasts if single_user(n)], wraps


def check_weights(node: Node, expected) -> torch.dtype:
    v = tensor_val(node)
    require(same_shape(v.shape, expected), f"weights of shape {tuple(v.shape)} broadcast")
    require(v.dtype in FLOAT_DTYPES, f"weights dtype {v.dtype}")
    return v.dtype


def analyze(match: Match) -> Plan:
    anchor = match.output_node()
    if anchor.target is CONVERT:
        require(absorbable_downcast(anchor), "outer convert is not a float32 -> float downcast")
        total, out_dtype = anchor.args[0], anchor.args[1]
    else:
        total, out_dtype = anchor, out_dtype_of(anchor)
    check_reduce_dim1(total)
    product = total.args[0]
    pv = tensor_val(product)
    require(pv.dtype in FLOAT_DTYPES, f"product dtype {pv.dtype}")
    m, topk, k = pv.shape
    why = "no operand is gathered rows"
    for rows, weights in ((product.args[0], product.args[1]), (product.args[1], product.args[0])):
        try:
            check_weights(weights, (m, topk, 1))
            x, index, walked, wraps = analyze_rows(rows, m, topk, k)
        except NoMatch as e:
            why = str(e)
            continue
        return Plan(rows=x, index=index, weights=weights, m=m, topk=topk, k=k, out_dtype=out_dtype,
                    walked=walked, wraps=wraps)
    raise NoMatch(why)


def rewrite(match: Match, plan: Plan) -> None:
    rewrite_per_slot(match, plan, NAME)


register(PATTERNS, analyze, rewrite)
