"""``moe::_shuffle_mul_sum_fused`` written in plain ATen that Inductor compiles: the decompositions
Inductor's custom-op autotuning benchmarks against the op's own kernel (fusion/autotune.py).

A winning decomposition is inlined as Inductor IR, so it fuses with the combine's neighbours (the
un-permute before it, the residual add and RMSNorm after it) where the op would be a kernel of its own.
Each computes exactly the op's semantics (ops.py, FUSED_SCHEMA; fused_moe_ops/reference.py):

* float32 accumulation of ``factor * row``, then ``* scale``, then ``+ addend``, rounded once;
* ``negative_index`` 0: a negative entry contributes nothing (even where its factor is NaN/inf);
  1: it reads row ``p + R``; 2: it is an error. Out-of-range entries fail Inductor's bounds check of
  the indirect load: every entry the op rejects (``p >= R``; ``p < -R`` when wrapping; ``p < 0``
  as an error) reaches the load as a row index >= R, never as a negative one, which the load would
  wrap again;
* a ``row_mask``ed row reads as zeros and keeps its factor (``0 * NaN`` is NaN, as eager's
  ``masked_fill(mask, 0)[idx] * w``);
* per-row factors ``(R,)`` are read through the (wrapped) permutation; ``factor_round`` rounds each
  factor to float16/bfloat16 before the product.

Two spellings: ``reduction`` (gather ``(M, topk, K)``, multiply, ``sum(1)``: one reduction over
``topk``) and ``unrolled`` (``topk`` gathers summed pointwise: no reduction loop, which Inductor
vectorises along ``K``; only for a static ``topk``). Both are traced by make_fx inside Inductor's
lowering with the op's tensor arguments positional and the rest (``None`` tensors included) by name.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops import FACTOR_ROUND, NEGATIVE_IS_ERROR, SKIP_NEGATIVE, addend_as_rows

TENSOR_ARGS = ("input", "permutation", "factors", "addend", "row_mask")
DEFAULTS = dict(out_dtype=None, negative_index=0, factor_round=0, scale=1.0, addend=None, row_mask=None)
_ROUND_TO = {code: dtype for dtype, code in FACTOR_ROUND.items() if dtype is not None}


def bind(tensors: Tuple[Tensor, ...], kwargs: dict) -> dict:
    """The op's arguments by name from Inductor's call: tensors positional in schema order (the ones
    given as ``None`` or left at their default are missing), everything else by name."""
    names = [n for n in TENSOR_ARGS if n not in kwargs]
    args = dict(DEFAULTS, permutation=None)
    args.update(zip(names, tensors))
    args.update(kwargs)
    return args


def _slots(input: Tensor, permutation: Optional[Tensor], factors: Tensor, negative_index: int,
           row_mask: Optional[Tensor]):
    """(index (M, topk) into input's rows or None for the identity, keep (M, topk) bool or None,
    masked (M, topk) bool or None, factors (M, topk) before rounding)."""
    rows = input.shape[0]
    if factors.dim() == 1:
        m, topk = permutation.shape
    else:
        m, topk = factors.shape
    keep = None
    if permutation is None:
        index = None
    else:
        p = permutation.reshape(m, topk)
        if negative_index == SKIP_NEGATIVE:
            keep = p >= 0
            index = torch.where(keep, p, 0)
        elif negative_index == NEGATIVE_IS_ERROR:
            # Row R does not exist: the load's bounds check raises, as the op does.
            index = torch.where(p < 0, rows, p)
        else:
            # -R <= p < 0 reads row p + R. p < -R must not stay negative: Inductor's indirect load wraps a
            # negative index once more (-R-1 -> -1 -> R-1) before its bounds check, which would pass. Routed
            # to row R instead, which does not exist, so the bounds check raises as the op does.
            index = torch.where(p < -rows, rows, torch.where(p < 0, p + rows, p))
    masked = None
    if row_mask is not None:
        masked = row_mask.view(m, topk) if index is None else row_mask[index]
    if factors.dim() == 1:
        factors = factors[index]
    return index, keep, masked, factors, (m, topk)


def _prepare(tensors: Tuple[Tensor, ...], kwargs: dict):
    """What both decompositions start from: (arguments by name, input, then _slots' index, keep,
    masked and factors, and (M, topk, K))."""
    a = bind(tensors, kwargs)
    x = a["input"]
    index, keep, masked, factors, (m, topk) = _slots(x, a["permutation"], a["factors"], a["negative_index"],
                                                     a["row_mask"])
    return a, x, index, keep, masked, factors, (m, topk, x.shape[1])


def _finish(total: Tensor, input: Tensor, out_dtype, scale: float, addend: Optional[Tensor]) -> Tensor:
    m, k = total.shape
    if scale != 1.0:
        total = total * scale
    if addend is not None:
        total = total + addend_as_rows(addend, m, k).to(torch.float32)
    return total.to(out_dtype if out_dtype is not None else input.dtype)


def _factors32(factors: Tensor, factor_round: int) -> Tensor:
    if factor_round:
        factors = factors.to(_ROUND_TO[factor_round])
    return factors.to(torch.float32)


def combine_reduction(*tensors: Tensor, **kwargs) -> Tensor:
    """Gather (M, topk, K), weight, reduce over topk."""
    a, x, index, keep, masked, factors, (m, topk, k) = _prepare(tensors, kwargs)
    rows = x.unflatten(0, (m, topk)) if index is None else x[index.reshape(-1)].view(m, topk, k)
    rows = rows.to(torch.float32)
    if masked is not None:
        rows = torch.where(masked.unsqueeze(-1), 0.0, rows)
    contrib = rows * _factors32(factors, a["factor_round"]).unsqueeze(-1)
    if keep is not None:
        # where after the product: a skipped slot's row or factor may be NaN/inf and must not leak
        contrib = torch.where(keep.unsqueeze(-1), contrib, 0.0)
    return _finish(contrib.sum(dim=1), x, a["out_dtype"], a["scale"], a["addend"])


def combine_unrolled(*tensors: Tensor, **kwargs) -> Tensor:
    """``topk`` gathers summed pointwise, in slot order (static topk)."""
    a, x, index, keep, masked, factors, (m, topk, k) = _prepare(tensors, kwargs)
    f = _factors32(factors, a["factor_round"])
    ident = x.unflatten(0, (m, topk)) if index is None else None
    total = None
    for j in range(int(topk)):
        row = (ident[:, j] if index is None else x[index[:, j]]).to(torch.float32)
        if masked is not None:
            row = torch.where(masked[:, j:j + 1], 0.0, row)
        term = row * f[:, j:j + 1]
        if keep is not None:
            term = torch.where(keep[:, j:j + 1], term, 0.0)
        total = term if total is None else total + term
    if total is None:  # topk == 0
        total = x.new_zeros((m, k), dtype=torch.float32)
    return _finish(total, x, a["out_dtype"], a["scale"], a["addend"])


DECOMPOSITIONS = {"reduction": combine_reduction, "unrolled": combine_unrolled}


# ------------------------------------------------------------------ the scatter form

# ``moe::_scatter_mul_sum_fused`` (ops.py, SCATTER_FUSED_SCHEMA) in ATen: what Inductor would have compiled
# from the user's line, in float32, rounded once. Its tensors arrive positional (the given ones, in this
# order), the rest by name. ``num_tokens_like``: a tensor whose first size is the token count, given where
# that count is symbolic (a size the traced decomposition must read from a tensor; not an argument of the op).
SCATTER_TENSOR_ARGS = ("input", "index", "factors", "addend", "num_tokens_like")
SCATTER_DEFAULTS = dict(num_tokens=None, out_dtype=None, negative_index=0, factor_round=0, scale=1.0)


def scatter_rows_sum(*tensors: Tensor, **kwargs) -> Tensor:
    """float32 ``zeros(M, K)`` plus ``factors * rows`` scattered to their tokens, then ``* scale + addend``,
    rounded once. Negative entries: skipped (0: their row and factor never reach the sum, NaN included),
    wrapped (1) or refused (2). Every entry the op refuses (``>= M``; ``< -M`` when wrapping; any negative
    one as an error) reaches the scatter as token M, never as a negative index, which an indexed store
    could wrap once more: the scatter's range check raises, as the op does.

    The scatter is the one the spelling compiles to without the pass. Refused negatives (2: the user wrote
    ``scatter_add``): ``scatter_add``, which Inductor hands to ATen on a CPU with threads
    (``config.cpp.fallback_scatter_reduce_sum``), whose range check raises a RuntimeError. Otherwise
    (``index_put(accumulate=True)``, ``index_add`` once decomposed): ``index_add``, which Inductor compiles
    into its own accumulating kernel (atomic adds, fused with the product), as it does the user's line;
    that kernel checks the range inside its loop, where a failed check inside a parallel region aborts
    the process, with or without the pass. Summation order: ATen's, or atomic adds where Inductor
    generates the kernel: deterministic only up to float32 rounding there."""
    names = [n for n in SCATTER_TENSOR_ARGS if n not in kwargs]
    a = dict(SCATTER_DEFAULTS, factors=None, addend=None, num_tokens_like=None)
    a.update(zip(names, tensors))
    a.update(kwargs)
    x, index = a["input"], a["index"]
    m = a["num_tokens"] if a["num_tokens_like"] is None else a["num_tokens_like"].shape[0]
    mode = a["negative_index"]
    keep = None
    if mode == SKIP_NEGATIVE:
        keep = index >= 0
        dest = torch.where(keep, index, 0)
    elif mode == NEGATIVE_IS_ERROR:
        dest = torch.where(index < 0, m, index)
    else:
        dest = torch.where(index < -m, m, torch.where(index < 0, index + m, index))
    contrib = x.to(torch.float32)
    if a["factors"] is not None:
        contrib = contrib * _factors32(a["factors"], a["factor_round"]).unsqueeze(-1)
    if keep is not None:
        contrib = torch.where(keep.unsqueeze(-1), contrib, 0.0)
    k = x.shape[1]
    total = x.new_zeros((m, k), dtype=torch.float32)
    if mode == NEGATIVE_IS_ERROR:
        total = total.scatter_add(0, dest.long().unsqueeze(1).expand(-1, k), contrib)
    else:
        total = total.index_add(0, dest, contrib)
    return _finish(total, x, a["out_dtype"], a["scale"], a["addend"])
