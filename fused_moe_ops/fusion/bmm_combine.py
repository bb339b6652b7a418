"""Fusion 2: the weighted sum written as a batched matmul (bmm / einsum / matmul).

Eager spellings::

    torch.bmm(w.unsqueeze(1), x[idx].view(m, topk, k)).squeeze(1)        # (m,1,topk) @ (m,topk,k)
    torch.einsum("mkh,mk->mh", x[idx].view(m, topk, k), w)               # (m,k,topk) @ (m,topk,1)
    torch.bmm(w.reshape(-1, 1, topk), x[idx].view(m, topk, k).float()).to(x.dtype).squeeze(1)  # a cast
    torch.einsum("tai,ta -> ti", expert_outs, w)     # SGLang's torch-native MoE, gpt-fast's Mixtral

Post-grad ATen (einsum lowers to permutes around a bmm; identity permutes are kept by then)::

    [convert] squeeze.dim | reshape | view ( [convert] [permute(identity)] bmm.default(LHS, RHS) )  -> (m, k)
    convert  = a float32 -> float downcast of the bmm's result, before or after the squeeze (one of
               them): folded into out_dtype
    orientation A: LHS = WEIGHTS (m, 1, topk),            RHS = ROWS (m, topk, k)
    orientation B: LHS = permute(ROWS, [0, 2, 1]) (m, k, topk), RHS = WEIGHTS (m, topk, 1)
    ROWS as in gather_mul_sum (gathered (m, topk, k) rows, views, permutes that only move unit
         dimensions, fp32 upcasts), or, with no gather, any float tensor whose elements in row-major
         order are the (m * topk, k) rows (the (T*A, 1, I) result of gpt-fast's expert einsum)

Replacement (as gather_mul_sum's: one kernel, wrap and rounding inside it)::

    moe._shuffle_mul_sum_fused(x, idx, W.reshape(m, topk), bmm dtype, negative_index=wrap, factor_round=r)
"""
from __future__ import annotations

from typing import List, Tuple

from torch._inductor.pattern_matcher import CallFunction, Ignored, KeywordArg, Match
from torch.fx import Node

from ._common import RESHAPES, Plan, register, rewrite_per_slot
from ._match import (
    CONVERT,
    ORDER_PRESERVING,
    NoMatch,
    absorbable_downcast,
    aten,
    is_identity_permute,
    moves_only_unit_dims,
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

_RESULTS = [_BMM, _PERMUTED_BMM]
_RESULTS += [CallFunction(CONVERT, r, Ignored()) for r in _RESULTS]  # bmm(...).to(dtype).squeeze(1)
_SQUEEZED = [CallFunction(_SQUEEZES, r, Ignored()) for r in _RESULTS] + [
    CallFunction(aten.squeeze.default, r) for r in _RESULTS]
# bmm(...).squeeze(1).to(dtype) first: the matcher visits nodes from the output up, the outer form must win
PATTERNS = [CallFunction(CONVERT, s, Ignored()) for s in _SQUEEZED] + _SQUEEZED


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
    squeezed, out_dtype = anchor, None
    if anchor.target is CONVERT:
        require(absorbable_downcast(anchor), "outer convert is not a float32 -> float downcast")
        squeezed, out_dtype = anchor.args[0], anchor.args[1]
    out = tensor_val(squeezed)
    require(out.dim() == 2, "result is not 2-D")
    m, k = out.shape
    inner = squeezed.args[0]
    if inner.target is CONVERT:
        require(out_dtype is None, "two converts of the bmm result")
        require(absorbable_downcast(inner), "convert of the bmm result is not a float32 -> float downcast")
        out_dtype, inner = inner.args[1], inner.args[0]
    if inner.target is aten.permute.default:
        # identity, or moving only unit dimensions (one token: (1, 1, k) -> (1, k, 1))
        require(is_identity_permute(inner) or moves_only_unit_dims(inner), "non-identity permute of the bmm result")
        inner = inner.args[0]
    require(inner.target is aten.bmm.default, "no bmm")
    if out_dtype is None:
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
