"""Fusion 2: the weighted sum written as a batched matmul (bmm / einsum / matmul).

Eager spellings::

    torch.bmm(w.unsqueeze(1), x[idx].view(m, topk, k)).squeeze(1)        # (m,1,topk) @ (m,topk,k)
    torch.einsum("mkh,mk->mh", x[idx].view(m, topk, k), w)               # (m,k,topk) @ (m,topk,1)

Post-grad ATen (einsum lowers to permutes around a bmm; identity permutes are kept by then)::

    squeeze.dim | reshape | view ( [permute(identity)] bmm.default(LHS, RHS) )  -> (m, k)
    orientation A: LHS = WEIGHTS (m, 1, topk),            RHS = ROWS (m, topk, k)
    orientation B: LHS = permute(ROWS, [0, 2, 1]) (m, k, topk), RHS = WEIGHTS (m, topk, 1)
    ROWS as in gather_mul_sum (gathered (m, topk, k) rows, views, fp32 upcasts)

Replacement (as gather_mul_sum's: one kernel, wrap and rounding inside it)::

    moe._shuffle_mul_sum_fused(x, idx, W.reshape(m, topk), bmm dtype, negative_index=wrap, factor_round=r)
"""
from __future__ import annotations

from typing import List, Tuple

from torch._inductor.pattern_matcher import CallFunction, Ignored, KeywordArg, Match
from torch.fx import Node

from ._common import RESHAPES, Plan, register, rewrite_per_slot
from ._match import (
    ORDER_PRESERVING,
    NoMatch,
    aten,
    is_identity_permute,
    out_dtype_of,
    require,
    same_shape,
    single_user,
    tensor_val,
)
from .gather_mul_sum import analyze_rows, check_weights

NAME = "bmm_combine"

_BMM = CallFunction(aten.bmm.default, KeywordArg("lhs"), KeywordArg("rhs"))
_PERMUTED_BMM = CallFunction(aten.permute.default, _BMM, Ignored())
_SQUEEZES = RESHAPES + [aten.squeeze.dim] + ([aten.squeeze.dims] if hasattr(aten.squeeze, "dims") else [])

PATTERNS = [
    CallFunction(_SQUEEZES, _BMM, Ignored()),
    CallFunction(_SQUEEZES, _PERMUTED_BMM, Ignored()),
    CallFunction(aten.squeeze.default, _BMM),
    CallFunction(aten.squeeze.default, _PERMUTED_BMM),
]


def peel_permutes(node: Node) -> Tuple[Node, List[int], List[Node]]:
    """node == base.permute(perm); walks single-user permutes (and order-preserving no-op views)."""
    perm = list(range(tensor_val(node).dim()))
    walked: List[Node] = []
    while node.op == "call_function" and single_user(node):
        if node.target is aten.permute.default:
            inner = list(node.args[1])
            perm = [inner[p] for p in perm]
        elif not (node.target in ORDER_PRESERVING
                  and same_shape(tensor_val(node).shape, tensor_val(node.args[0]).shape)):
            break
        walked.append(node)
        node = node.args[0]
    return node, perm, walked


def analyze(match: Match) -> Plan:
    anchor = match.output_node()
    out = tensor_val(anchor)
    require(out.dim() == 2, "result is not 2-D")
    m, k = out.shape
    inner = anchor.args[0]
    if inner.target is aten.permute.default:
        require(is_identity_permute(inner), "non-identity permute of the bmm result")
        inner = inner.args[0]
    out_dtype = out_dtype_of(inner)
    lhs, rhs = inner.args
    lv, rv = tensor_val(lhs), tensor_val(rhs)
    why = "not a (m,1,topk)@(m,topk,k) or (m,k,topk)@(m,topk,1) weighted sum"
    # orientation A: weights @ rows
    try:
        topk = lv.shape[2]
        check_weights(lhs, (m, 1, topk))
        x, index, walked, wraps = analyze_rows(rhs, m, topk, k)
        return Plan(rows=x, index=index, weights=lhs, m=m, topk=topk, k=k, out_dtype=out_dtype,
                    walked=walked, wraps=wraps)
    except NoMatch as e:
        why = str(e)
    # orientation B: rows^T @ weights
    try:
        topk = rv.shape[1]
        check_weights(rhs, (m, topk, 1))
        base, perm, permutes = peel_permutes(lhs)
        require(perm == [0, 2, 1], f"rows operand is permuted by {perm}")
        x, index, walked, wraps = analyze_rows(base, m, topk, k)
        return Plan(rows=x, index=index, weights=rhs, m=m, topk=topk, k=k, out_dtype=out_dtype,
                    walked=permutes + walked, wraps=wraps)
    except NoMatch as e:
        why = str(e)
    raise NoMatch(why)


def rewrite(match: Match, plan: Plan) -> None:
    rewrite_per_slot(match, plan, NAME)


register(PATTERNS, analyze, rewrite)
