"""Triton kernels of ``moe::shuffle_mul_sum`` (the MoE combine step) and of its scatter form
``moe::scatter_mul_sum`` (at the end of this file: a sort of the destination index, then a segment sum).

    out[i, :] = sum_{j < topk, p = permutation[i*topk + j] >= 0} factors[i, j] * input[p, :]

float32 accumulation, one rounding to the output dtype, negative permutation entries skipped,
an entry >= R reported by a device-side assertion (no host synchronisation; under
TRITON_INTERPRET=1, whose interpreter ignores device assertions, by a host-side check of the
CPU tensors instead, with the same IndexError as the reference).

Where it is used:

* for CUDA tensors when the C++ CUDA kernel (csrc/shuffle_mul_sum_cuda.cu) could not be built
  (``fused_moe_ops._registry`` registers it under the CUDA key; on a GPU the CUDA build has no code
  for, the CUDA kernel raises an error that points here);
* when forced, for comparison: ``FUSED_MOE_OPS_CUDA_BACKEND=triton`` (or ``cuda`` /
  ``reference``) before ``import fused_moe_ops``;
* directly: ``fused_moe_ops.triton_kernel.shuffle_mul_sum_triton(input, permutation, factors)``
  whatever the registry chose (this is what the benchmark tool calls), and
  ``scatter_mul_sum_triton(input, index, factors, num_tokens)`` likewise;
* on CPU tensors with ``TRITON_INTERPRET=1`` set before this module is imported (the CI tests).

Layout: a 2-D grid, axis 0 = token (M, up to 2**31 - 1), axis 1 = a block of BLOCK_K columns.
Each program walks its token's ``topk`` slots up to 16 at a time (TOPK_BLOCK): their permutation
entries and factors as one small vector, then their source row slices as one (TOPK_BLOCK, BLOCK_K)
tile, so every load of a step is in flight at once (every real router's topk is one step), and
reduces over the slots in float32. ``topk`` is a compile-time constant (a model constant; it makes
the loop's bounds static). Offsets are int64 throughout.
BLOCK_K and num_warps are autotuned per (K, topk, dtypes, M class); the autotuning happens on the
first call of each key (that first call benchmarks, and so synchronises: warm up before CUDA
graph capture). Under TRITON_INTERPRET=1 there is a single small config, so tests stay fast;
FUSED_MOE_OPS_TRITON_AUTOTUNE=0 (read at import) also uses one config, BLOCK_K 1024 / 4 warps.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .ops import (addend_as_rows, check_args, check_fused_args, check_out, check_out_no_overlap,
                  check_scatter_fused_args)

try:
    import triton
    import triton.language as tl
    import triton.testing

    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Read once, as triton's @jit reads it once: a module imported without TRITON_INTERPRET=1 is a GPU module.
INTERPRET = _interpret_mode()


def unavailable_reason() -> Optional[str]:
    """None when the Triton kernel can run here, else why not."""
    if triton is None:
        return f"triton is not importable ({_IMPORT_ERROR})"
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (and TRITON_INTERPRET=1 was not set when fused_moe_ops.triton_kernel was imported)"
    return None


# Autotune space: small on purpose (each new key benchmarks every config once).
GPU_CONFIGS = (  # (BLOCK_K, num_warps)
    (256, 2),
    (512, 4),
    (1024, 4),
    (1024, 8),
    (2048, 8),
)
INTERPRET_CONFIGS = ((64, 1),)  # one config: no benchmarking on the CPU interpreter
NO_AUTOTUNE_CONFIG = ((1024, 4),)  # FUSED_MOE_OPS_TRITON_AUTOTUNE=0 (e.g. under compute-sanitizer)
AUTOTUNE = os.environ.get("FUSED_MOE_OPS_TRITON_AUTOTUNE", "1") not in ("0", "")


def _m_class(m: int) -> int:
    """Autotune bucket of the token count: decode-sized, mid, large."""
    return 0 if m <= 64 else (1 if m <= 1024 else 2)


if triton is not None:

    def _configs():
        chosen = INTERPRET_CONFIGS if INTERPRET else (GPU_CONFIGS if AUTOTUNE else NO_AUTOTUNE_CONFIG)
        return [triton.Config({"BLOCK_K": b}, num_warps=w, num_stages=1) for b, w in chosen]

    def _quick_bench(kernel_call, quantiles):
        # A short measurement per config (the default 25 + 100 ms per config is more than a
        # bandwidth-bound kernel needs to rank 5 configs); do_bench clears L2 before each call.
        return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)

    def _autotune(**kw):
        try:
            return triton.autotune(do_bench=_quick_bench, **kw)
        except TypeError:  # a triton without autotune(do_bench=...)
            return triton.autotune(**kw)

    # debug=True keeps tl.device_assert (the permutation range check) in the compiled kernel.
    # All index arithmetic is int64, so debug mode's integer-overflow checks (which only cover
    # narrower types) add nothing to the hot loop.
    @triton.jit
    def _round_to_bf16(x):
        # float32 -> bfloat16 -> float32, round to nearest even, as torch's .to(bfloat16) rounds. By
        # bits, because the CPU interpreter's cast truncates where the compiled cast rounds.
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)

    @_autotune(configs=_configs(), key=["K", "TOPK", "M_CLASS"])
    @triton.jit(debug=True)
    def _shuffle_mul_sum_kernel(
        in_ptr, perm_ptr, fac_ptr, out_ptr, add_ptr, mask_ptr,
        R, K,
        stride_in, stride_perm, stride_f0, stride_f1, stride_out, stride_add, stride_mask,
        scale,
        M_CLASS,
        HAS_PERM: tl.constexpr,
        NEGATIVE_INDEX: tl.constexpr,   # 0 skip, 1 wrap as x[idx], 2 error (ops.py: FUSED_SCHEMA)
        FACTOR_ROUND: tl.constexpr,     # 0 none, 1 float16, 2 bfloat16
        FACTORS_PER_ROW: tl.constexpr,  # factors[p] instead of factors[i, j]
        HAS_SCALE: tl.constexpr,
        HAS_ADDEND: tl.constexpr,
        HAS_ROW_MASK: tl.constexpr,     # mask[p] true: row p reads as zeros (adds 0 * factor)
        TOPK: tl.constexpr,             # a model constant: compile-time, so the top-k loop has static bounds
        TOPK_BLOCK: tl.constexpr,       # slots loaded per step: any topk, bounded registers
        ROUND_BF16_RNE: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        i = tl.program_id(0).to(tl.int64)
        kb = tl.program_id(1).to(tl.int64)
        cols = kb * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        col_ok = cols < K
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for j0 in range(0, TOPK, TOPK_BLOCK):
            j = j0 + tl.arange(0, TOPK_BLOCK).to(tl.int64)
            j_ok = j < TOPK
            slot = i * TOPK + j
            if HAS_PERM:
                p = tl.load(perm_ptr + slot * stride_perm, mask=j_ok, other=-1).to(tl.int64)
            else:
                p = slot
            if NEGATIVE_INDEX == 0:
                tl.device_assert((p < R) | ~j_ok, "moe::shuffle_mul_sum: permutation entry >= input.shape[0]")
            elif NEGATIVE_INDEX == 1:
                tl.device_assert(((p < R) & (p >= -R)) | ~j_ok,
                                 "moe::shuffle_mul_sum: permutation entry outside [-input.shape[0], input.shape[0])")
                p = tl.where(p < 0, p + R, p)
            else:
                tl.device_assert(((p < R) & (p >= 0)) | ~j_ok,
                                 "moe::shuffle_mul_sum: permutation entry outside [0, input.shape[0])")
            live = j_ok & (p >= 0) & (p < R)  # a skipped slot contributes nothing, its factor unread
            if FACTORS_PER_ROW:
                w = tl.load(fac_ptr + p * stride_f0, mask=live, other=0.0).to(tl.float32)
            else:
                w = tl.load(fac_ptr + i * stride_f0 + j * stride_f1, mask=live, other=0.0).to(tl.float32)
            if FACTOR_ROUND == 1:
                w = w.to(tl.float16).to(tl.float32)
            elif FACTOR_ROUND == 2:
                w = _round_to_bf16(w)
            if HAS_ROW_MASK:
                # A masked row reads as zeros: it adds 0 * w, which is 0, or NaN for a NaN/inf w
                # (eager's masked_fill-then-multiply); its row is not loaded.
                masked = tl.load(mask_ptr + tl.where(live, p, 0) * stride_mask, mask=live, other=0).to(tl.int1)
                masked = live & masked
                acc += tl.sum(tl.where(masked, w * 0.0, 0.0), axis=0)
                live = live & ~masked
            rows = tl.where(live, p, 0)
            x = tl.load(
                in_ptr + rows[:, None] * stride_in + cols[None, :],
                mask=live[:, None] & col_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(x * w[:, None], axis=0)
        if HAS_SCALE:
            acc = acc * scale
        if HAS_ADDEND:
            acc += tl.load(add_ptr + i * stride_add + cols, mask=col_ok, other=0.0).to(tl.float32)
        if ROUND_BF16_RNE:
            # Interpreter only: its float32 -> bfloat16 cast truncates, where the compiled cast
            # rounds to nearest even. Round here so the bfloat16 conversion below is exact.
            acc = _round_to_bf16(acc)
        tl.store(out_ptr + i * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


# Slots per step of the kernel's top-k loop: all of them up to 16 (one step for every real MoE
# router), then steps of 16, so registers stay bounded at any topk.
MAX_TOPK_BLOCK = 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _launch(input: Tensor, permutation: Optional[Tensor], factors: Tensor, dst: Tensor, m: int, topk: int, k: int,
            negative_index: int = 0, factor_round: int = 0, scale: float = 1.0, addend: Optional[Tensor] = None,
            row_mask: Optional[Tensor] = None):
    """Write the result into ``dst`` ((M, K), last dim dense). No host synchronisation.
    ``permutation`` is 1-D; ``factors`` (M, topk), or (R,) per input row."""
    if m == 0 or k == 0:
        return
    if topk == 0 and addend is None:
        dst.zero_()
        return
    if k > 1 and input.stride(1) != 1:
        input = input.contiguous()
    if addend is not None:
        addend = addend_as_rows(addend, m, k)
        if k > 1 and addend.stride(1) != 1:
            addend = addend.contiguous()
    rows = input.shape[0]
    if rows == 0:
        # Every entry must be negative (the assertion checks p < 0 = R); the kernel reads nothing
        # but must not get a null pointer.
        input = torch.zeros((1, 1), dtype=input.dtype, device=input.device)
    if INTERPRET:
        # Triton's CPU interpreter ignores tl.device_assert (it never runs in debug mode): check the
        # range on the host instead. These are CPU tensors, so there is nothing to synchronise.
        from .reference import check_permutation_range

        check_permutation_range(permutation, rows, negative_index)
    per_row = factors.dim() == 1
    grid = lambda meta: (m, triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
    _shuffle_mul_sum_kernel[grid](
        input, permutation if permutation is not None else input, factors, dst,
        addend if addend is not None else dst,
        row_mask if row_mask is not None else dst,
        rows, k,
        input.stride(0), permutation.stride(0) if permutation is not None else 0,
        factors.stride(0), 0 if per_row else factors.stride(1), dst.stride(0),
        addend.stride(0) if addend is not None else 0,
        row_mask.stride(0) if row_mask is not None else 0,
        float(scale),
        _m_class(m),
        HAS_PERM=permutation is not None,
        NEGATIVE_INDEX=negative_index,
        FACTOR_ROUND=factor_round,
        FACTORS_PER_ROW=per_row,
        HAS_SCALE=scale != 1.0,
        HAS_ADDEND=addend is not None,
        HAS_ROW_MASK=row_mask is not None,
        TOPK=topk,
        TOPK_BLOCK=min(_next_pow2(max(topk, 1)), MAX_TOPK_BLOCK),
        ROUND_BF16_RNE=INTERPRET and dst.dtype == torch.bfloat16,
    )


def _check_usable(op: str = "moe::shuffle_mul_sum") -> None:
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(f"{op}: the Triton kernel cannot run here: {why}")


def shuffle_mul_sum_triton(
    input: Tensor, permutation: Optional[Tensor], factors: Tensor, out_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """The op's functional form on the Triton kernel (same contract as torch.ops.moe.shuffle_mul_sum)."""
    m, topk, k = check_args(input, permutation, factors, out_dtype)
    out = torch.empty((m, k), dtype=out_dtype if out_dtype is not None else input.dtype, device=input.device)
    _check_usable()
    _launch(input, permutation, factors, out, m, topk, k)
    return out


def shuffle_mul_sum_triton_out(input: Tensor, permutation: Optional[Tensor], factors: Tensor, *, out: Tensor) -> Tensor:
    """The op's ``.out`` form on the Triton kernel."""

    m, topk, k = check_args(input, permutation, factors, None)
    check_out(out, input, m, k)
    check_out_no_overlap(out, input, permutation, factors)
    _check_usable()
    direct = k <= 1 or out.stride(1) == 1
    dst = out if direct else torch.empty((m, k), dtype=out.dtype, device=out.device)
    _launch(input, permutation, factors, dst, m, topk, k)
    if not direct:
        out.copy_(dst)
    return out


def shuffle_mul_sum_fused_triton(
    input: Tensor, permutation: Optional[Tensor], factors: Tensor, out_dtype: Optional[torch.dtype] = None,
    negative_index: int = 0, factor_round: int = 0, scale: float = 1.0, addend: Optional[Tensor] = None,
    row_mask: Optional[Tensor] = None,
) -> Tensor:
    """The internal op ``moe::_shuffle_mul_sum_fused`` (ops.py: FUSED_SCHEMA) on the Triton kernel."""
    m, topk, k = check_fused_args(input, permutation, factors, out_dtype, negative_index, factor_round, addend,
                                  row_mask)
    out = torch.empty((m, k), dtype=out_dtype if out_dtype is not None else input.dtype, device=input.device)
    _check_usable()
    _launch(input, None if permutation is None else permutation.reshape(-1), factors, out, m, topk, k,
            negative_index, factor_round, scale, addend, row_mask)
    return out


# ------------------------------------------------------------------ the scatter form
#
#     out[t, :] = scale * sum_{r : index[r] = t} f(factors[r]) * input[r, :] + addend[t, :]
#
# Not a gather: a token's rows are wherever its index entries are. Three steps, none of which reads a
# value back to the host (CUDA-graph capturable once autotuned):
#   1. _scatter_keys_kernel: each entry's destination token (wrapped per negative_index, a skipped entry
#      -> M, past the last token), its range checked by a device-side assertion (the gather kernel's
#      mechanism; under the interpreter the host checks the CPU tensors, as for the gather form);
#   2. torch.sort(keys, stable=True): its indices list each token's rows in increasing r; then
#      torch.searchsorted of 0..M gives each token's segment of them (no atomics anywhere);
#   3. _scatter_segment_sum_kernel: one program per (token, block of BLOCK_K columns) adds its
#      segment's rows one after the other in that order, in float32, with product and sum each rounded
#      to float32 (launched without FMA contraction), so the result is bitwise the float32 sum of the
#      token's rows in increasing r, on every device and every launch.

# Rows per step of the segment loop: their order entries, factors and row loads are independent, so
# a step's loads are all in flight at once (a token of a top-8 router is one step); the adds stay in
# order. Under the interpreter a small step keeps the tests fast and still crosses step boundaries.
SCATTER_ROW_BLOCK = 2 if INTERPRET else 8
SCATTER_KEYS_BLOCK = 1024

if triton is not None:

    @triton.jit(debug=True)  # keeps tl.device_assert, the range check of the index
    def _scatter_keys_kernel(
        index_ptr, keys_ptr,
        R, M,
        stride_index,
        NEGATIVE_INDEX: tl.constexpr,  # 0 skip, 1 wrap as index_put, 2 error (ops.py: SCATTER_FUSED_SCHEMA)
        BLOCK: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        in_range = r < R
        t = tl.load(index_ptr + r * stride_index, mask=in_range, other=0).to(tl.int64)
        if NEGATIVE_INDEX == 0:
            tl.device_assert((t < M) | ~in_range, "moe::scatter_mul_sum: index entry >= num_tokens")
            valid = t < M
            key = tl.where(t < 0, M, t)
        elif NEGATIVE_INDEX == 1:
            tl.device_assert(((t < M) & (t >= -M)) | ~in_range,
                             "moe::scatter_mul_sum: index entry outside [-num_tokens, num_tokens)")
            valid = (t < M) & (t >= -M)
            key = tl.where(t < 0, t + M, t)
        else:
            tl.device_assert(((t < M) & (t >= 0)) | ~in_range,
                             "moe::scatter_mul_sum: index entry outside [0, num_tokens)")
            valid = (t < M) & (t >= 0)
            key = t
        # An entry the assertion rejects sorts past the last token too: nothing reads memory by it.
        key = tl.where(valid, key, M)
        tl.store(keys_ptr + r, key.to(keys_ptr.dtype.element_ty), mask=in_range)

    @_autotune(configs=_configs(), key=["K", "M_CLASS"])
    @triton.jit
    def _scatter_segment_sum_kernel(
        in_ptr, order_ptr, start_ptr, fac_ptr, out_ptr, add_ptr,
        K,
        stride_in, stride_f, stride_out, stride_add,
        scale,
        M_CLASS,
        HAS_FACTORS: tl.constexpr,
        FACTOR_ROUND: tl.constexpr,  # 0 none, 1 float16, 2 bfloat16
        HAS_SCALE: tl.constexpr,
        HAS_ADDEND: tl.constexpr,
        ROUND_BF16_RNE: tl.constexpr,
        ROW_BLOCK: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        kb = tl.program_id(1).to(tl.int64)
        cols = kb * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        col_ok = cols < K
        begin = tl.load(start_ptr + t)
        end = tl.load(start_ptr + t + 1)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for s0 in range(begin, end, ROW_BLOCK):
            for i in tl.static_range(ROW_BLOCK):
                s = s0 + i
                live = s < end
                r = tl.load(order_ptr + s, mask=live, other=0)
                # A step's slot past the segment loads nothing and adds +0.0, which changes no sum (acc
                # starts at +0.0 and a float32 sum never becomes -0.0 from there).
                x = tl.load(in_ptr + r * stride_in + cols, mask=live & col_ok, other=0.0).to(tl.float32)
                if HAS_FACTORS:
                    w = tl.load(fac_ptr + r * stride_f, mask=live, other=0.0).to(tl.float32)
                    if FACTOR_ROUND == 1:
                        w = w.to(tl.float16).to(tl.float32)
                    elif FACTOR_ROUND == 2:
                        w = _round_to_bf16(w)
                    x = x * w
                acc += x
        if HAS_SCALE:
            acc = acc * scale
        if HAS_ADDEND:
            acc += tl.load(add_ptr + t * stride_add + cols, mask=col_ok, other=0.0).to(tl.float32)
        if ROUND_BF16_RNE:
            acc = _round_to_bf16(acc)  # the interpreter's bfloat16 cast truncates (as in the gather kernel)
        tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def _scatter_launch(input: Tensor, index: Tensor, factors: Optional[Tensor], dst: Tensor, m: int, k: int,
                    negative_index: int = 0, factor_round: int = 0, scale: float = 1.0,
                    addend: Optional[Tensor] = None) -> None:
    """Write the scatter form's result into ``dst`` ((M, K), dense rows). No host synchronisation."""
    rows = input.shape[0]
    device = input.device
    if INTERPRET:
        # As in _launch: the interpreter ignores tl.device_assert; these are CPU tensors, nothing to sync.
        from .reference import check_index_range

        check_index_range(index, m, negative_index)
    # int32 keys sort faster; M itself (the skipped entries' key) must fit.
    keys = torch.empty(rows, dtype=torch.int32 if m < 2**31 - 1 else torch.int64, device=device)
    if rows:
        # Before any early return: an out-of-range entry is an error whatever M and K are.
        _scatter_keys_kernel[(triton.cdiv(rows, SCATTER_KEYS_BLOCK),)](
            index, keys, rows, m, index.stride(0), NEGATIVE_INDEX=negative_index, BLOCK=SCATTER_KEYS_BLOCK)
    if m == 0 or k == 0:
        return
    if rows == 0:
        # No row reaches any token; the kernel reads nothing but must not get null pointers.
        starts = torch.zeros(m + 1, dtype=torch.int64, device=device)
        order = starts
        input = torch.zeros((1, 1), dtype=input.dtype, device=device)
    else:
        sorted_keys, order = torch.sort(keys, stable=True)
        starts = torch.searchsorted(sorted_keys, torch.arange(m + 1, dtype=keys.dtype, device=device))
        if k > 1 and input.stride(1) != 1:
            input = input.contiguous()
    if addend is not None:
        addend = addend_as_rows(addend, m, k)
        if k > 1 and addend.stride(1) != 1:
            addend = addend.contiguous()
    has_factors = factors is not None and rows > 0
    grid = lambda meta: (m, triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
    _scatter_segment_sum_kernel[grid](
        input, order, starts, factors if has_factors else input, dst, addend if addend is not None else dst,
        k,
        input.stride(0), factors.stride(0) if has_factors else 0, dst.stride(0),
        addend.stride(0) if addend is not None else 0,
        float(scale),
        _m_class(m),
        HAS_FACTORS=has_factors,
        FACTOR_ROUND=factor_round,
        HAS_SCALE=scale != 1.0,
        HAS_ADDEND=addend is not None,
        ROUND_BF16_RNE=INTERPRET and dst.dtype == torch.bfloat16,
        ROW_BLOCK=SCATTER_ROW_BLOCK,
        # A product rounded to float32 before its add, as the reference's float32 sum has it: no FMA.
        enable_fp_fusion=False,
    )


def scatter_mul_sum_triton(input: Tensor, index: Tensor, factors: Optional[Tensor], num_tokens: int,
                           out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``moe::scatter_mul_sum`` on the Triton kernel (same contract as torch.ops.moe.scatter_mul_sum)."""
    return scatter_mul_sum_fused_triton(input, index, factors, num_tokens, out_dtype)


def scatter_mul_sum_fused_triton(
    input: Tensor, index: Tensor, factors: Optional[Tensor], num_tokens: int,
    out_dtype: Optional[torch.dtype] = None, negative_index: int = 0, factor_round: int = 0, scale: float = 1.0,
    addend: Optional[Tensor] = None,
) -> Tensor:
    """The internal op ``moe::_scatter_mul_sum_fused`` (ops.py: SCATTER_FUSED_SCHEMA) on the Triton kernel."""
    _, m, k = check_scatter_fused_args(input, index, factors, num_tokens, out_dtype, negative_index, factor_round,
                                       addend)
    m = int(m)
    out = torch.empty((m, k), dtype=out_dtype if out_dtype is not None else input.dtype, device=input.device)
    _check_usable("moe::scatter_mul_sum")
    _scatter_launch(input, index, factors, out, m, k, negative_index, factor_round, scale, addend)
    return out
