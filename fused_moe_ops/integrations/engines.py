"""The serving engines' own call signatures for the combine, as thin functions over our op.

Engine code already calls a combine kernel under its own name and argument shapes. These functions
take exactly those arguments, adapt them to ``moe::shuffle_mul_sum.out`` without copying the expert
outputs, and write the caller's ``output`` (they return None, as the engines' kernels do)::

    apply_shuffle_mul_sum(input, output, permutation, factors=None)   # SGLang (sgl-kernel)
    moe_sum(input, output, topk_ids=None, expert_map=None)            # vLLM (_moe_C)

The op does the work and the checks it owns (dtypes, devices, permutation range, overlap); what is
checked here is only what the adaptation reads (the shapes the engines' arguments have). Both are
capturable in a CUDA graph (no host synchronisation; the cached helper tensors below are only cached
outside a capture) and traceable by ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..ops import FLOAT_DTYPES, INDEX_DTYPES, _names

# A plain sum reads its factors as a stride-0 (M, topk) view of one element holding 1: nothing the
# size of the problem is allocated or read for them. One element per (device, dtype).
_ONES: Dict[Tuple[torch.device, torch.dtype], Tensor] = {}
# 0, 1, 2, ... per device (int64), grown on demand: slot indices are views of it, not new tensors.
_ARANGE: Dict[torch.device, Tensor] = {}
# Every buffer _ARANGE has held stays alive: a CUDA graph captured while one was current reads its
# memory at each replay, and holds no reference to it. Growth doubles, so this is < 2x the largest.
_ARANGE_RETIRED: List[Tensor] = []


def _capturing(device: torch.device) -> bool:
    # Inside a CUDA-graph capture a kernel is recorded, not run: a tensor filled there holds garbage
    # until the graph is replayed, so it must not be cached for eager calls.
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _unit_factors(m, topk, like: Tensor) -> Tensor:
    dtype = like.dtype if like.dtype in FLOAT_DTYPES else torch.float32
    if torch.compiler.is_compiling():
        return like.new_ones((), dtype=dtype).expand(m, topk)
    key = (like.device, dtype)
    one = _ONES.get(key)
    if one is None:
        one = torch.ones((), dtype=dtype, device=like.device)
        if not _capturing(like.device):
            _ONES[key] = one
    return one.expand(m, topk)


def _arange(n, device: torch.device) -> Tensor:
    if torch.compiler.is_compiling():
        return torch.arange(n, device=device)
    buf = _ARANGE.get(device)
    if buf is None or buf.numel() < n:
        old = buf
        buf = torch.arange(max(n, 1024, 2 * (0 if old is None else old.numel())), device=device)
        if not _capturing(device):
            if old is not None:
                _ARANGE_RETIRED.append(old)
            _ARANGE[device] = buf
    return buf[:n]


# ------------------------------------------------------------------------------------------------
# SGLang
# ------------------------------------------------------------------------------------------------

def apply_shuffle_mul_sum(input: Tensor, output: Tensor, permutation: Tensor,
                          factors: Optional[Tensor] = None) -> None:
    """SGLang's ``apply_shuffle_mul_sum``: ``output[i] = sum_j factors[i, j] * input[permutation[i*topk + j]]``.

    Shapes (M from ``output``, topk = permutation.numel() // M):
        input:       (R, K)          float32 / float16 / bfloat16, rows may be strided
        output:      (M, K)          written in place, any float dtype (the sum is rounded once to it)
        permutation: (M*topk,)       int32 / int64; negative entries contribute nothing
        factors:     (M*topk,), (M, topk) or None (a plain sum); any float dtype

    Accumulates in float32, as ``moe::shuffle_mul_sum`` does.
    """
    # Checks are plain `if ...: raise` (not torch._check): Dynamo cannot trace a message closure over
    # tensors, and a closure built per call costs time in the eager path this signature is for.
    p = "fused_moe_ops.apply_shuffle_mul_sum: "
    if output.dim() != 2:
        raise RuntimeError(f"{p}output must be a 2-D tensor (M, K), got {output.dim()}-D with shape "
                           f"{tuple(output.shape)}")
    if permutation.dim() != 1:
        raise RuntimeError(f"{p}permutation must be a 1-D tensor (M*topk,), got {permutation.dim()}-D with shape "
                           f"{tuple(permutation.shape)}")
    m, entries = output.shape[0], permutation.shape[0]
    if factors is not None and factors.dim() == 2:
        topk = factors.shape[1]
        if factors.shape[0] != m:
            raise RuntimeError(f"{p}factors as (M, topk) must have M = output.shape[0] = {m} rows, got shape "
                               f"{tuple(factors.shape)}")
    elif m == 0:
        topk = 0
        if entries != 0:
            raise RuntimeError(f"{p}permutation must be empty when output has 0 rows, got {entries} entries")
    else:
        topk = entries // m
        if entries % m != 0:
            raise RuntimeError(f"{p}permutation must have M*topk entries, a multiple of M = output.shape[0] = {m}, "
                               f"got {entries}")
    if factors is None:
        factors = _unit_factors(m, topk, input)
    elif factors.dim() == 1:
        if factors.shape[0] != entries:
            raise RuntimeError(f"{p}factors as (M*topk,) must have one entry per permutation entry ({entries}), got "
                               f"shape {tuple(factors.shape)}")
        factors = factors.view(m, topk)
    elif factors.dim() != 2:
        raise RuntimeError(f"{p}factors must be None, 1-D (M*topk,) or 2-D (M, topk), got {factors.dim()}-D with "
                           f"shape {tuple(factors.shape)}")
    torch.ops.moe.shuffle_mul_sum.out(input, permutation, factors, out=output)


# ------------------------------------------------------------------------------------------------
# vLLM
# ------------------------------------------------------------------------------------------------

def moe_sum(input: Tensor, output: Tensor, topk_ids: Optional[Tensor] = None,
            expert_map: Optional[Tensor] = None) -> None:
    """vLLM's ``moe_sum``: ``output[i] = sum_j input[i, j]`` over the slots that hold an expert output.

    Shapes:
        input:      (num_tokens, topk, hidden_size)   float32 / float16 / bfloat16, any strides (read in place
                                                       when the hidden dimension is dense)
        output:     (num_tokens, hidden_size)         same dtype as input, written in place
        topk_ids:   (num_tokens, topk) or None        int32 / int64; a negative id is a padding slot, skipped
        expert_map: (num_experts,) or None            int32 / int64, global id -> local id, -1 for an expert on
                                                       another rank (its slots are skipped); needs topk_ids

    A skipped slot adds nothing, whatever it holds (uninitialised memory, NaN). Accumulates in float32.
    """
    p = "fused_moe_ops.moe_sum: "
    if input.dim() != 3:
        raise RuntimeError(f"{p}input must be a 3-D tensor (num_tokens, topk, hidden_size), got {input.dim()}-D with "
                           f"shape {tuple(input.shape)}")
    m, topk, k = input.shape
    if output.dim() != 2 or output.shape[0] != m or output.shape[1] != k:
        raise RuntimeError(f"{p}output must have shape (num_tokens, hidden_size) = ({m}, {k}), got "
                           f"{tuple(output.shape)}")
    if output.dtype != input.dtype:
        raise RuntimeError(f"{p}output must have the same dtype as input ({input.dtype}), got {output.dtype}")
    if expert_map is not None and topk_ids is None:
        raise RuntimeError(f"{p}expert_map requires topk_ids (which expert each slot holds), got topk_ids=None")
    rows, slots = _slot_rows(input)
    permutation = slots
    if topk_ids is not None:
        if topk_ids.dim() != 2 or topk_ids.shape[0] != m or topk_ids.shape[1] != topk:
            raise RuntimeError(f"{p}topk_ids must have shape (num_tokens, topk) = ({m}, {topk}), got "
                               f"{tuple(topk_ids.shape)}")
        _check_index(p, "topk_ids", topk_ids, input)
        key = topk_ids.reshape(-1)  # negative: a padding slot
        if expert_map is not None:
            if expert_map.dim() != 1:
                raise RuntimeError(f"{p}expert_map must be a 1-D tensor (num_experts,), got {expert_map.dim()}-D "
                                   f"with shape {tuple(expert_map.shape)}")
            _check_index(p, "expert_map", expert_map, input)
            key = torch.minimum(key, _local_ids(p, expert_map, topk_ids))  # ... or an expert on another rank
        if slots is None:
            slots = _arange(m * topk, input.device)
        permutation = slots.masked_fill(key < 0, -1)
    torch.ops.moe.shuffle_mul_sum.out(rows, permutation, _unit_factors(m, topk, input), out=output)


def _check_index(p: str, name: str, t: Tensor, input: Tensor) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise RuntimeError(f"{p}{name} must have dtype {_names(INDEX_DTYPES)}, got {t.dtype}")
    if t.device != input.device:
        raise RuntimeError(f"{p}{name} must be on the same device as input ({input.device}), got {t.device}")


def _local_ids(p: str, expert_map: Tensor, topk_ids: Tensor) -> Tensor:
    """expert_map[topk_ids], padding slots read entry 0 (they are skipped anyway). An id past the map is
    an error: named here on CPU, a device-side assert on CUDA (reading the ids on the host would
    synchronise, and break a CUDA-graph capture)."""
    ids = topk_ids.clamp(min=0).reshape(-1)
    if torch.compiler.is_compiling() or topk_ids.device.type != "cpu":
        return expert_map.index_select(0, ids)
    try:
        return expert_map.index_select(0, ids)
    except IndexError:
        bad = (ids >= expert_map.shape[0]).nonzero()
        if not bad.numel():
            raise
        pos = int(bad[0, 0])
        raise IndexError(f"{p}topk_ids[{pos // topk_ids.shape[1]}, {pos % topk_ids.shape[1]}] = {int(ids[pos])} is "
                         f"out of range: expert_map has {expert_map.shape[0]} entries") from None


def _slot_rows(input: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """``input`` (M, topk, K) as the op's operands: ``rows``, a 2-D (R, K) view of its storage, and
    ``slots`` (M*topk,), the row of slot (i, j) at i*topk + j, or None when that row is i*topk + j.

    The token and slot strides are multiples of their gcd g, so every slot starts on a row of the
    view with row stride g: contiguous and row-padded inputs are the identity, a transposed or a
    topk-sliced input (a view of a wider buffer) an index of M*topk entries, and no expert output
    is copied. A hidden dimension that is not dense is copied once (the kernels read dense rows).
    """
    m, topk, k = input.shape
    if input.is_contiguous():
        return input.view(m * topk, k), None
    if input.numel() == 0 or (torch.compiler.is_compiling()
                              and not all(type(n) is int for n in (*input.shape, *input.stride()))):
        # Symbolic sizes or strides (torch.compile with a dynamic shape): Inductor lays out a reshape.
        return input.reshape(m * topk, k), None
    if k > 1 and input.stride(2) != 1:
        input = input.contiguous()
    # A dimension of size 1 is never stepped over: its stride does not matter.
    s_token = input.stride(0) if m > 1 else 0
    s_slot = input.stride(1) if topk > 1 else 0
    g = _gcd(s_token, s_slot)
    if g == 0:  # one slot in all, or every slot the same row (an expand()ed input)
        return input.as_strided((1, k), (k, 1)), (None if m * topk == 1 else _arange(1, input.device).expand(m * topk))
    a, b = s_token // g, s_slot // g
    rows = input.as_strided(((m - 1) * a + (topk - 1) * b + 1, k), (g, 1))
    if (m == 1 or a == topk) and (topk == 1 or b == 1):
        return rows, None
    index = _arange(rows.shape[0], input.device)
    return rows, index.as_strided((m, topk), (a, b)).reshape(-1)


def _gcd(a: int, b: int) -> int:
    # Not math.gcd: Dynamo does not constant-fold it on static strides (it tries to put it in the graph).
    while b:
        a, b = b, a % b
    return a
