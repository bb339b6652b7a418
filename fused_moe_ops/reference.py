"""Plain-PyTorch reference for ``moe::shuffle_mul_sum``: the single source of truth for tests.

``shuffle_mul_sum_reference(..., acc_dtype=torch.float64)`` is what every kernel test compares
against. With the default ``acc_dtype=torch.float32`` it is also the op's fallback
implementation on devices where no kernel could be built (registered by ``_registry``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ops import (FACTOR_ROUND, SKIP_NEGATIVE, WRAP_NEGATIVE, addend_as_rows, check_args, check_fused_args, check_out,
                  check_out_no_overlap, check_scatter_args, check_scatter_fused_args)

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
    """out[i] = sum_j factors[i, j] * input[permutation[i*topk+j]], skipping negative entries (a
    skipped slot's factor is never read: NaN/inf there has no effect).

    Accumulates in ``acc_dtype`` and rounds once to ``out_dtype`` (default input.dtype).
    """
    m, topk, k = check_args(input, permutation, factors, out_dtype)
    check_permutation_range(permutation, input.shape[0])
    total = _weighted_sum(input, permutation, factors, m, topk, k, acc_dtype)
    return total.to(out_dtype if out_dtype is not None else input.dtype)


def _weighted_sum(input: Tensor, permutation: Optional[Tensor], factors: Tensor, m, topk, k,
                  acc_dtype: torch.dtype, zero_rows: Optional[Tensor] = None) -> Tensor:
    """The sum in acc_dtype (arguments checked, entries < R).

    A negative entry is a skipped slot: it contributes nothing, whatever its factor (its factor is
    never read, so a NaN/inf there has no effect). ``zero_rows`` (bool, one per slot) marks slots whose
    row reads as zeros: they contribute ``0 * factor``, i.e. NaN for a NaN/inf factor.
    """
    if permutation is None:
        rows = input.to(acc_dtype)
        live = None
    elif input.shape[0] == 0:
        # Valid only when every entry is negative (checked above): nothing is gathered.
        rows = input.new_zeros((m * topk, k), dtype=acc_dtype)
        live = torch.zeros(m * topk, dtype=torch.bool, device=input.device)
    else:
        index = permutation.long()
        rows = input.index_select(0, index.clamp(min=0)).to(acc_dtype)
        live = index >= 0
    if zero_rows is not None:
        # torch.where, not a multiply by the mask: a zeroed row holding inf/nan must not leak.
        rows = torch.where(zero_rows.unsqueeze(-1), rows.new_zeros(()), rows)
    weighted = rows.view(m, topk, k) * factors.to(acc_dtype).view(m, topk, 1)
    if live is not None:
        # After the multiply: a skipped slot's factor (NaN/inf included) must not leak either.
        weighted = torch.where(live.view(m, topk, 1), weighted, weighted.new_zeros(()))
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
    zero_rows = None
    if row_mask is not None:  # a masked row reads as zeros: 0 * factor (NaN for a NaN/inf factor)
        slots = flat if flat is not None else torch.arange(m * topk, device=input.device)
        zero_rows = ((slots >= 0) & row_mask[slots.clamp(min=0)] if rows
                     else torch.zeros(m * topk, dtype=torch.bool, device=input.device))
    if factors.dim() == 1:  # per input row: follow the permutation (skipped slots read row 0, unused)
        factors = factors[flat.clamp(min=0).long()].view(m, topk) if rows else factors.new_zeros(m, topk)
    if factor_round:
        factors = factors.to(_ROUND_TO[factor_round])
    total = _weighted_sum(input, flat, factors, m, topk, k, acc_dtype, zero_rows) * scale
    if addend is not None:
        total = total + addend_as_rows(addend, m, k).to(acc_dtype)
    return total.to(out_dtype if out_dtype is not None else input.dtype)


def shuffle_mul_sum_reference_out(
    input: Tensor, permutation: Optional[Tensor], factors: Tensor, *, out: Tensor
) -> Tensor:
    m, _, k = check_args(input, permutation, factors, None)
    check_out(out, input, m, k)
    check_out_no_overlap(out, input, permutation, factors)
    out.copy_(shuffle_mul_sum_reference(input, permutation, factors, out.dtype))
    return out


# ------------------------------------------------------------------ the scatter form


def check_index_range(index: Tensor, num_tokens: int, negative_index: int = SKIP_NEGATIVE) -> None:
    """The scatter form's range check (check_permutation_range's, for a destination index): entries
    must be < num_tokens; >= -num_tokens where negative entries wrap; >= 0 where they are an error."""
    if index.numel() == 0:
        return
    if negative_index == SKIP_NEGATIVE:
        bad = (index >= num_tokens).nonzero()
        allowed = f"< {num_tokens} (negative entries are skipped)"
    else:
        lowest = -num_tokens if negative_index == WRAP_NEGATIVE else 0
        bad = ((index < lowest) | (index >= num_tokens)).nonzero()
        allowed = f"in [{lowest}, {num_tokens})"
    if bad.numel():
        pos = int(bad[0, 0])
        raise IndexError(
            f"moe::scatter_mul_sum: index[{pos}] = {int(index[pos])} is out of range: the result has "
            f"{num_tokens} rows (num_tokens), so entries must be {allowed}"
        )


def scatter_mul_sum_fused_reference(
    input: Tensor,
    index: Tensor,
    factors: Optional[Tensor],
    num_tokens: int,
    out_dtype: Optional[torch.dtype] = None,
    negative_index: int = SKIP_NEGATIVE,
    factor_round: int = 0,
    scale: float = 1.0,
    addend: Optional[Tensor] = None,
    *,
    acc_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The internal scatter op ``moe::_scatter_mul_sum_fused`` (ops.py: SCATTER_FUSED_SCHEMA) in plain
    PyTorch: ``out[t] = scale * sum_{index[r] = t} factors[r] * input[r] + addend[t]`` in
    ``acc_dtype``, a token's rows added in increasing r, rounded once.

    Computed on the CPU (CPU ``index_add_`` adds the rows one after the other, in index order; on CUDA it
    uses atomics, whose order changes the result) and copied back: the fallback of last resort, and the
    tests' ground truth with ``acc_dtype=torch.float64``.
    """
    rows, m, k = check_scatter_fused_args(input, index, factors, num_tokens, out_dtype, negative_index,
                                          factor_round, addend)
    m = int(m)
    check_index_range(index, m, negative_index)
    device = input.device
    dest = index.to("cpu", torch.int64)
    if negative_index == WRAP_NEGATIVE:
        dest = torch.where(dest < 0, dest + m, dest)
    live = dest >= 0  # skipped rows: neither the row nor its factor is read
    contrib = input.to("cpu", acc_dtype)[live]
    if factors is not None:
        f = factors.to("cpu")
        if factor_round:
            f = f.to(_ROUND_TO[factor_round])
        contrib = contrib * f.to(acc_dtype)[live].unsqueeze(-1)
    total = torch.zeros((m, k), dtype=acc_dtype).index_add_(0, dest[live], contrib)
    if scale != 1.0:
        total = total * scale
    if addend is not None:
        total = total + addend_as_rows(addend.to("cpu"), m, k).to(acc_dtype)
    return total.to(device=device, dtype=out_dtype if out_dtype is not None else input.dtype)


def scatter_mul_sum_reference(
    input: Tensor,
    index: Tensor,
    factors: Optional[Tensor],
    num_tokens: int,
    out_dtype: Optional[torch.dtype] = None,
    *,
    acc_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``moe::scatter_mul_sum`` in plain PyTorch (the fused reference with its defaults)."""
    check_scatter_args(input, index, factors, num_tokens, out_dtype)
    return scatter_mul_sum_fused_reference(input, index, factors, num_tokens, out_dtype, acc_dtype=acc_dtype)
