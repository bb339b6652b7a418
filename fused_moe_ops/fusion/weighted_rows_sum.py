"""Fusion 3: weights applied per row *before* the gather (or with no gather at all), then the sum.

Eager spellings (``w_sorted`` is per row of ``y``, i.e. already in permuted order)::

    (y * w_sorted.unsqueeze(-1))[idx].view(m, topk, k).sum(dim=1)
    (y * w.reshape(-1).unsqueeze(-1)).view(m, topk, k).sum(dim=1)     # no gather: R == m * topk

Post-grad ATen::

    sum.dim_IntList(reshape(ROWS, [m, topk, k]), [1])   [-> convert_element_type(out_dtype)]
    ROWS    = views / fp32 upcasts of  index.Tensor(P, [idx]) | index_select(P, 0, idx) | P
    P       = mul.Tensor(Y, W) in either order, Y (R, k) float rows, W (R, 1) float weights

Replacement (one kernel: the weights follow the rows through the same, wrapped, permutation inside it)::

    moe._shuffle_mul_sum_fused(Y, idx.view(m, topk), W.reshape(R), out_dtype, negative_index=wrap|error,
                               factor_round=r)                     # per-row factors
    moe._shuffle_mul_sum_fused(Y, None, W.reshape(m, topk), out_dtype, ...)       # no gather
    W, r = the weights before their views and their float convert

``topk`` must be a static size here (the graph has no (m, topk) tensor to read it from).
"""
from __future__ import annotations

from torch._inductor.pattern_matcher import CallFunction, Ignored, KeywordArg, Match

from ._common import FUSED_COMBINE, RESHAPES, Plan, negative_index_of, register, replace_with_op, sum_dim1
from ._match import (
    CONVERT,
    FLOAT_DTYPES,
    absorbable_downcast,
    aten,
    as_gather,
    check_index,
    check_reduce_dim1,
    out_dtype_of,
    peel_factors,
    peel_rows,
    require,
    reshape_like,
    same,
    single_user,
    split_weighted_rows,
    static_int,
    tensor_val,
)

NAME = "weighted_rows_sum"

PATTERNS = sum_dim1(CallFunction(RESHAPES, KeywordArg("rows"), Ignored()))


def analyze(match: Match) -> Plan:
    anchor = match.output_node()
    if anchor.target is CONVERT:
        require(absorbable_downcast(anchor), "outer convert is not a float32 -> float downcast")
        total, out_dtype = anchor.args[0], anchor.args[1]
    else:
        total, out_dtype = anchor, out_dtype_of(anchor)
    check_reduce_dim1(total)
    view = total.args[0]
    m, topk, k = tensor_val(view).shape
    if static_int(topk) is None:
        # view(-1, topk, k) under dynamic shapes: the meta holds N // (N // topk); the argument is exact
        shape_arg = view.args[1]
        require(isinstance(shape_arg, (list, tuple)) and len(shape_arg) == 3 and isinstance(shape_arg[1], int)
                and shape_arg[1] > 0, f"symbolic topk {topk}")
        topk = shape_arg[1]
    base, walked = peel_rows(total.args[0].args[0])
    require(all(single_user(n) for n in walked), "an intermediate has another user")
    gather = as_gather(base)
    index, wraps = None, True
    if gather is not None:
        require(single_user(base), "the gathered rows have another user")
        walked.append(base)
        product, index, wraps = gather
        check_index(index, m * topk, k)
    else:
        product = base
    require(product.op == "call_function" and product.target is aten.mul.Tensor, "no weighting multiply")
    require(single_user(product), "the product has another user")
    walked.append(product)
    pv = tensor_val(product)
    require(pv.dtype in FLOAT_DTYPES and pv.dim() == 2, "product is not 2-D float")
    rows_count = pv.shape[0]
    if index is None:
        require(same(rows_count, m * topk), "rows != m * topk")
    x, w, upcasts = split_weighted_rows(product, rows_count, k)
    return Plan(rows=x, index=index, weights=w, m=m, topk=topk, k=k, out_dtype=out_dtype,
                walked=walked + upcasts, wraps=wraps)


def rewrite(match: Match, plan: Plan) -> None:
    out_dtype, topk, negative_index = plan.out_dtype, static_int(plan.topk), negative_index_of(plan.wraps)
    per_row = (tensor_val(plan.rows).shape[0],)
    src, rounding, dims, chain = peel_factors(plan.weights, per_row)

    def build(y, idx, w, row_mask):
        factors = reshape_like(w, per_row, dims)
        if idx is None:  # no gather: a row's factor is its slot's
            return FUSED_COMBINE(y, None, factors.reshape(-1, topk), out_dtype, negative_index, rounding, row_mask)
        # per-row factors, read by the kernel through the (wrapped) permutation, given as (m, topk)
        return FUSED_COMBINE(y, idx.view(-1, topk), factors, out_dtype, negative_index, rounding, row_mask)

    replace_with_op(match, NAME, plan, build, src, plan.walked + chain)


register(PATTERNS, analyze, rewrite)
