"""Fusion 6: the one-token combine, a weighted sum of the token's ``topk`` expert rows over dim 0.

Eager spellings (``outs`` the token's ``topk`` expert outputs, one row each, ``scores`` its ``topk``
router weights; torchao's MoE quantization modules write it on their single-token path)::

    (outs * scores.view(-1, 1)).sum(dim=0)                  # -> (k,)
    (scores.view(-1, 1) * x[idx]).sum(0, keepdim=True)      # gathered rows; -> (1, k)
    (outs.float() * scores.view(-1, 1)).sum(0).to(outs.dtype)

Post-grad ATen::

    sum.dim_IntList(mul.Tensor(ROWS, WEIGHTS), [0] | [-2] [, keepdim])   [-> convert_element_type(out_dtype)]
    ROWS    = order-preserving views / lossless fp32 upcasts of  index.Tensor(x, [idx])
              | index_select(x, 0, idx) | y                     with shape (topk, k)
    WEIGHTS = any float tensor of shape (topk, 1)  (one weight per row: no broadcast over the rows or k)

It is the gather form with one token (M = 1)::

    moe._shuffle_mul_sum_fused(x, idx | None, W.reshape(1, topk), out_dtype, ...)
        .view(k)                                                  # keepdim=False

The op accumulates in float32 and rounds once, as for every other rewrite; NaN/inf follow eager (a
NaN weight or row shows in the sum). Inductor then chooses between the op and its own code for it
(fusion/autotune.py): at decode on CPU its own code, so the graph launches what it launched before.
"""
from __future__ import annotations

from typing import Any

from torch._inductor.pattern_matcher import CallFunction, Ignored, KeywordArg, Match

from ._common import FUSED_COMBINE, SUM_OPS, Plan, negative_index_of, register, replace_with_op
from ._match import (
    CONVERT,
    FLOAT_DTYPES,
    NoMatch,
    absorbable_downcast,
    aten,
    as_gather,
    check_float_rows,
    check_index,
    out_dtype_of,
    peel_factors,
    peel_rows,
    peel_upcast,
    require,
    reshape_like,
    same_shape,
    single_user,
    tensor_val,
)
from .gather_mul_sum import check_weights

NAME = "one_token_sum"

_PRODUCT = CallFunction(aten.mul.Tensor, KeywordArg("lhs"), KeywordArg("rhs"))
_SUMS = [CallFunction(SUM_OPS, _PRODUCT, Ignored()), CallFunction(SUM_OPS, _PRODUCT, Ignored(), Ignored())]
# the outer convert first: the matcher visits nodes from the output up, and the outer form must win
PATTERNS = [CallFunction(CONVERT, s, Ignored()) for s in _SUMS] + _SUMS


def _keepdim(total) -> bool:
    return bool(total.args[2] if len(total.args) > 2 else total.kwargs.get("keepdim", False))


def _check_reduce_dim0(total) -> None:
    """``total`` sums a 2-D tensor over dim 0 (keepdim either way), and the model wrote that sum:
    Inductor decomposes a one-row matmul (``linear`` / ``addmm`` at one token) into exactly this
    product and sum (``mat1.T * mat2`` summed over dim 0), which is a layer's matrix-vector
    product, not a combine; the node's ``original_aten`` says which op it came from."""
    origin = total.meta.get("original_aten")
    require(origin is None or getattr(origin, "overloadpacket", None) is aten.sum,
            f"the sum is Inductor's decomposition of {origin}")
    src = tensor_val(total.args[0])
    require(src.dim() == 2, "sum of a non-2-D tensor")
    dims = total.args[1] if len(total.args) > 1 else total.kwargs.get("dim")
    require(dims is not None and len(dims) == 1 and dims[0] in (0, -2), f"sum over dims {dims}")


def _analyze_rows(node, topk: Any, k: Any):
    """node is (topk, k) rows in slot order: (x, idx or None, walked nodes, wraps)."""
    require(same_shape(tensor_val(node).shape, (topk, k)), "rows are not (topk, k)")
    base, walked = peel_rows(node)
    require(all(single_user(n) for n in walked), "an intermediate has another user")
    gather = as_gather(base)
    if gather is None:
        check_float_rows(base, topk, k)
        return base, None, walked, True
    require(single_user(base), "the gathered rows have another user")
    src, index, wraps = gather
    x, upcasts = peel_upcast(src)
    check_float_rows(x, None, k)
    check_index(index, topk, k)
    return x, index, walked + [base] + [n for n in upcasts if single_user(n)], wraps


def analyze(match: Match) -> Plan:
    anchor = match.output_node()
    if anchor.target is CONVERT:
        require(absorbable_downcast(anchor), "outer convert is not a float32 -> float downcast")
        total, out_dtype = anchor.args[0], anchor.args[1]
    else:
        total, out_dtype = anchor, out_dtype_of(anchor)
    _check_reduce_dim0(total)
    product = total.args[0]
    require(single_user(product), "the product has another user")
    pv = tensor_val(product)
    require(pv.dtype in FLOAT_DTYPES, f"product dtype {pv.dtype}")
    topk, k = pv.shape
    why = "no operand is (topk, k) rows"
    for rows, weights in ((product.args[0], product.args[1]), (product.args[1], product.args[0])):
        try:
            check_weights(weights, (topk, 1))
            x, index, walked, wraps = _analyze_rows(rows, topk, k)
        except NoMatch as e:
            why = str(e)
            continue
        return Plan(rows=x, index=index, weights=weights, m=1, topk=topk, k=k, out_dtype=out_dtype,
                    walked=walked, wraps=wraps)
    raise NoMatch(why)


def rewrite(match: Match, plan: Plan) -> None:
    anchor = match.output_node()
    total = anchor.args[0] if anchor.target is CONVERT else anchor
    keepdim = _keepdim(total)
    layout = (1, plan.topk)
    src, rounding, dims, chain = peel_factors(plan.weights, layout)
    out_dtype, negative_index = plan.out_dtype, negative_index_of(plan.wraps)

    def build(x, idx, w, row_mask):
        out = FUSED_COMBINE(x, idx, reshape_like(w, layout, dims), out_dtype,
                            negative_index, rounding, row_mask)
        return out if keepdim else out.view(-1)

    replace_with_op(match, NAME, plan, build, src, plan.walked + chain)


register(PATTERNS, analyze, rewrite)
