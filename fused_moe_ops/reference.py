"""Plain-PyTorch reference for ``moe::shuffle_mul_sum``: the single source of truth for tests.

``shuffle_mul_sum_reference(..., acc_dtype=torch.float64)`` is what every kernel test compares
against. With the default ``acc_dtype=torch.float32`` it is also the op's fallback
implementation on devices where no kernel could be built (registered by ``_registry``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ops import FACTOR_ROUND, SKIP_NEGATIVE, WRAP_NEGATIVE, addend_as_rows, check_args, check_fused_args, check_out

_ROUND_TO = {code: dtype for dtype, code in FACTOR_ROUND.items() if dtype is not None}


def check_permutation_range(permutation: Optional[Tensor], num_rows: int, negative_index: int = SKIP_NEGATIVE) -> None:
    """Raise if any entry is out of range, naming the first bad position and its value: >= num_rows
    always; below -num_rows when negative entries wrap; any negative one when they are an error.

    Reads the permutation's values: on CUDA this synchronises, which is why the CUDA kernel
    checks on the device instead.
    """
    if permutation is None or permutation.numel() == 0:
        return
    flat = permutation.reshape(-1)
    if negative_index == SKIP_NEGATIVE:
        bad = (flat >= num_rows).nonzero()
        allowed = f"< {num_rows} (negative entries are skipped)"
    else:
        lowest = -num_rows if negative_index == WRAP_NEGATIVE else 0
        bad = ((flat < lowest) | (flat >= num_rows)).nonzero()
        allowed = f"in [{lowest}, {num_rows})"
    if bad.numel():
        pos = int(bad[0, 0])
        raise IndexError(
            f"moe::shuffle_mul_sum: permutation[{pos}] = {int(flat[pos])} is out of range: "
            f"input has {num_rows} rows, so entries must be {allowed}"
        )


def shuffle_mul_sum_reference(
    input: Tensor,
    permutation: Optional[Tensor],
    factors: Tensor,
    out_dtype: Optional[torch.dtype] = None,
    *,
    acc_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """out[i] = sum_j factors[i, j] * input[permutation[i*topk+j]], skipping negative entries.

    Accumulates in ``acc_dtype`` and rounds once to ``out_dtype`` (default input.dtype).
    """
    m, topk, k = check_args(input, permutation, factors, out_dtype)
    check_permutation_range(permutation, input.shape[0])
    total = _weighted_sum(input, permutation, factors, m, topk, k, acc_dtype)
    return total.to(out_dtype if out_dtype is not None else input.dtype)


def _weighted_sum(input: Tensor, permutation: Optional[Tensor], factors: Tensor, m, topk, k,
                  acc_dtype: torch.dtype) -> Tensor:
    """The sum in acc_dtype (arguments checked, entries < R; negative ones skipped)."""
    if permutation is None:
        rows = input.to(acc_dtype)
    elif input.shape[0] == 0:
        # Valid only when every entry is negative (checked above): nothing is gathered.
        rows = input.new_zeros((m * topk, k), dtype=acc_dtype)
    else:
        index = permutation.long()
        rows = input.index_select(0, index.clamp(min=0)).to(acc_dtype)
        # torch.where, not a multiply by the mask: a skipped row holding inf/nan must not leak.
        rows = torch.where((index >= 0).unsqueeze(-1), rows, rows.new_zeros(()))
    weighted = rows.view(m, topk, k) * factors.to(acc_dtype).view(m, topk, 1)
    return weighted.sum(dim=1)


def shuffle_mul_sum_fused_reference(
    input: Tensor,
    permutation: Optional[Tensor],
    factors: Tensor,
    out_dtype: Optional[torch.dtype] = None,
    negative_index: int = SKIP_NEGATIVE,
    factor_round: int = 0,
    scale: float = 1.0,
    addend: Optional[Tensor] = None,
    row_mask: Optional[Tensor] = None,
    *,
    acc_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The internal op ``moe::_shuffle_mul_sum_fused`` (ops.py: FUSED_SCHEMA) in plain PyTorch:
    ``scale * sum + addend`` accumulated in ``acc_dtype`` and rounded once."""
    m, topk, k = check_fused_args(input, permutation, factors, out_dtype, negative_index, factor_round, addend,
                                  row_mask)
    rows = input.shape[0]
    flat = None if permutation is None else permutation.reshape(-1)
    check_permutation_range(flat, rows, negative_index)
    if flat is not None and negative_index == WRAP_NEGATIVE:
        flat = torch.where(flat < 0, flat + rows, flat)
    if row_mask is not None:  # a masked row is skipped like a negative entry
        if flat is None:
            flat = torch.arange(m * topk, device=input.device)
        masked = (flat >= 0) & row_mask[flat.clamp(min=0)] if rows else torch.zeros_like(flat, dtype=torch.bool)
        flat = torch.where(masked, -1, flat)
    if factors.dim() == 1:  # per input row: follow the permutation (skipped slots read row 0, unused)
        factors = factors[flat.clamp(min=0).long()].view(m, topk) if rows else factors.new_zeros(m, topk)
    if factor_round:
        factors = factors.to(_ROUND_TO[factor_round])
    total = _weighted_sum(input, flat, factors, m, topk, k, acc_dtype) * scale
    if addend is not None:
        total = total + addend_as_rows(addend, m, k).to(acc_dtype)
    return total.to(out_dtype if out_dtype is not None else input.dtype)


def shuffle_mul_sum_reference_out(
    input: Tensor, permutation: Optional[Tensor], factors: Tensor, *, out: Tensor
) -> Tensor:
    m, _, k = check_args(input, permutation, factors, None)
    check_out(out, input, m, k)
    _check_no_overlap(out, input, permutation, factors)
    out.copy_(shuffle_mul_sum_reference(input, permutation, factors, out.dtype))
    return out


def _check_no_overlap(out: Tensor, *others: Optional[Tensor]) -> None:
    # Same rule and message as csrc/shuffle_mul_sum.h's check_out: writing into memory we also
    # read would be a silent wrong answer. Address spans: conservative, never wrong.
    if torch._debug_has_internal_overlap(out) == 1:
        raise RuntimeError(
            "moe::shuffle_mul_sum: out must not have elements that share memory (e.g. an expand()ed tensor)"
        )
    for other in others:
        if other is not None and other.numel() and out.numel() and _ranges_overlap(out, other):
            raise RuntimeError(
                "moe::shuffle_mul_sum: out must not share memory with input, permutation or factors"
            )


def _ranges_overlap(a: Tensor, b: Tensor) -> bool:
    def span(t: Tensor):
        start = t.data_ptr()
        extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
        return start, start + extent * t.element_size()

    a0, a1 = span(a)
    b0, b1 = span(b)
    return a0 < b1 and b0 < a1
