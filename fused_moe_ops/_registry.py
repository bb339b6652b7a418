"""Which implementation serves ``moe::shuffle_mul_sum`` on each device, decided once at import.

    CPU : the C++ kernel (csrc/shuffle_mul_sum_cpu.cpp); if it could not be built, the reference.
          The scatter form (moe::scatter_mul_sum, _scatter_mul_sum_fused) alike.
    CUDA: the C++ CUDA kernel (csrc/shuffle_mul_sum_cuda.cu); if it could not be built, the Triton
          kernel (fused_moe_ops/triton_kernel.py); if Triton is missing, the reference.
          FUSED_MOE_OPS_CUDA_BACKEND=cuda|triton|reference forces one. Where no GPU is visible no CUDA
          tensor can reach the op: the CUDA key gets the reference, and neither the CUDA library nor
          Triton is loaded (both cost import time), unless asked for (build). The scatter form: the
          CUDA kernel where the library serves CUDA, the Triton kernel where it serves the gather
          form, else the reference.
    Meta / FakeTensor: ops.py's fake.

A fallback is announced with one warning that says why (the compiler's full message is in
``python -m fused_moe_ops``).
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, Optional

import torch

from . import build as _build
from .ops import FUSED_OP_NAME, NAMESPACE, QUALNAME, SCATTER_FUSED_OP_NAME, SCATTER_OP_NAME, _lib, check_args, check_out
from .reference import (scatter_mul_sum_fused_reference, scatter_mul_sum_reference, shuffle_mul_sum_fused_reference,
                        shuffle_mul_sum_reference, shuffle_mul_sum_reference_out)

CUDA_BACKENDS = ("cuda", "triton", "reference")

# What serves each device key: "cpp", "cuda", "triton" or "reference".
ACTIVE: Dict[str, str] = {}
FALLBACK_REASONS: Dict[str, str] = {}
# What serves the scatter form (moe::scatter_mul_sum, _scatter_mul_sum_fused) on each device key.
SCATTER_ACTIVE: Dict[str, str] = {}


class _NoBackward(torch.autograd.Function):
    """An inference op's autograd: forward runs the op below autograd; backward raises (what C++'s
    autogradNotImplementedFallback does; the stable ABI has none, so it is registered from here)."""

    @staticmethod
    def forward(ctx, op, *args):
        # Named after the public op the caller knows (an internal twin reports its public form's name).
        scatter = op.name().split("::")[-1] in (SCATTER_OP_NAME, SCATTER_FUSED_OP_NAME)
        ctx.op_name = f"{NAMESPACE}::{SCATTER_OP_NAME}" if scatter else QUALNAME
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"derivative for {ctx.op_name} is not implemented (it is an inference op)")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _autograd_functional(input, permutation, factors, out_dtype=None):
    op = torch.ops.moe.shuffle_mul_sum.default
    if _needs_grad(input, permutation, factors):
        return _NoBackward.apply(op, input, permutation, factors, out_dtype)
    with torch._C._AutoDispatchBelowAutograd():
        return op(input, permutation, factors, out_dtype)


def _autograd_out(input, permutation, factors, *, out):
    if not _needs_grad(input, permutation, factors):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.moe.shuffle_mul_sum.out(input, permutation, factors, out=out)
    # Through _NoBackward so that `out` carries a grad_fn whose backward raises.
    m, _, k = check_args(input, permutation, factors, None)
    check_out(out, input, m, k)
    return out.copy_(_NoBackward.apply(torch.ops.moe.shuffle_mul_sum.default, input, permutation, factors, out.dtype))


def _autograd_fused(input, permutation, factors, out_dtype=None, negative_index=0, factor_round=0, scale=1.0,
                    addend=None, row_mask=None):
    op = getattr(torch.ops.moe, FUSED_OP_NAME).default
    args = (input, permutation, factors, out_dtype, negative_index, factor_round, scale, addend, row_mask)
    if _needs_grad(input, permutation, factors, addend):
        return _NoBackward.apply(op, *args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _autograd_scatter(input, index, factors, num_tokens, out_dtype=None):
    op = getattr(torch.ops.moe, SCATTER_OP_NAME).default
    args = (input, index, factors, num_tokens, out_dtype)
    if _needs_grad(input, factors):
        return _NoBackward.apply(op, *args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _autograd_scatter_fused(input, index, factors, num_tokens, out_dtype=None, negative_index=0, factor_round=0,
                            scale=1.0, addend=None):
    op = getattr(torch.ops.moe, SCATTER_FUSED_OP_NAME).default
    args = (input, index, factors, num_tokens, out_dtype, negative_index, factor_round, scale, addend)
    if _needs_grad(input, factors, addend):
        return _NoBackward.apply(op, *args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _register_autograd() -> None:
    """No derivative (an inference op), for every device and every kernel: forward runs under
    autograd, backward raises "derivative for moe::shuffle_mul_sum is not implemented" (or
    moe::scatter_mul_sum, for the scatter form). A call whose
    inputs need no grad (inference, torch.no_grad) costs one Python frame."""
    _lib.impl("shuffle_mul_sum", _autograd_functional, "Autograd")
    _lib.impl("shuffle_mul_sum.out", _autograd_out, "Autograd")
    _lib.impl(FUSED_OP_NAME, _autograd_fused, "Autograd")
    _lib.impl(SCATTER_OP_NAME, _autograd_scatter, "Autograd")
    _lib.impl(SCATTER_FUSED_OP_NAME, _autograd_scatter_fused, "Autograd")


def _register_scatter_reference(key: str) -> None:
    """The scatter form on the reference, for a device key its native kernel does not serve."""
    _lib.impl(SCATTER_OP_NAME, scatter_mul_sum_reference, key)
    _lib.impl(SCATTER_FUSED_OP_NAME, scatter_mul_sum_fused_reference, key)
    SCATTER_ACTIVE[key.lower()] = "reference"


def _short(msg: str, limit: int = 300) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def _register_python(key: str, functional, out_variant, fused=shuffle_mul_sum_fused_reference,
                     scatter=None, scatter_fused=None) -> None:
    _lib.impl("shuffle_mul_sum", functional, key)
    _lib.impl("shuffle_mul_sum.out", out_variant, key)
    _lib.impl(FUSED_OP_NAME, fused, key)
    if scatter is not None:
        _lib.impl(SCATTER_OP_NAME, scatter, key)
        _lib.impl(SCATTER_FUSED_OP_NAME, scatter_fused, key)


def _reference_functional(input, permutation, factors, out_dtype=None):
    return shuffle_mul_sum_reference(input, permutation, factors, out_dtype)


def _setup_cpu() -> None:
    result = _build.build_cpu()
    prefetch = os.environ.get("FUSED_MOE_OPS_CPU_PREFETCH")
    if prefetch not in (None, "0", "1"):
        warnings.warn(f"fused_moe_ops: FUSED_MOE_OPS_CPU_PREFETCH must be 0 (off) or 1 (on), got {prefetch!r}: "
                      "ignored, the CPU kernel keeps its default", RuntimeWarning, stacklevel=3)
    if result.ok:
        ACTIVE["cpu"] = "cpp"
        SCATTER_ACTIVE["cpu"] = "cpp"  # the library registers both forms
        return
    reason = result.skipped or _short(result.error or "unknown error")
    FALLBACK_REASONS["cpu"] = reason
    _register_python("CPU", _reference_functional, shuffle_mul_sum_reference_out)
    _register_scatter_reference("CPU")
    ACTIVE["cpu"] = "reference"
    if not result.skipped:
        warnings.warn(
            f"fused_moe_ops: the C++ CPU kernel could not be built ({reason}); moe::shuffle_mul_sum runs on the "
            "plain-PyTorch reference on CPU. `python -m fused_moe_ops` shows the compiler's message.",
            RuntimeWarning,
            stacklevel=3,
        )


def _triton_unavailable() -> Optional[str]:
    try:
        from . import triton_kernel
    except ImportError as e:
        return f"Triton kernel unavailable ({e})"
    return triton_kernel.unavailable_reason()


def _setup_cuda() -> None:
    forced = os.environ.get("FUSED_MOE_OPS_CUDA_BACKEND", "").strip().lower() or None
    if forced is not None and forced not in CUDA_BACKENDS:
        raise ValueError(f"FUSED_MOE_OPS_CUDA_BACKEND must be one of {', '.join(CUDA_BACKENDS)}, got {forced!r}")
    reasons = []
    gpu = _build.gpu_visible()
    if forced in (None, "cuda"):
        result = _build.build_cuda(on_import=True)
        if result.ok:
            ACTIVE["cuda"] = "cuda"
            SCATTER_ACTIVE["cuda"] = "cuda"  # the library registers both forms
            return
        reasons.append(f"CUDA kernel not built: {result.skipped or _short(result.error or '')}")
    if forced == "triton" or (forced is None and gpu):
        why = _triton_unavailable()
        if why is None:
            from .triton_kernel import (scatter_mul_sum_fused_triton, scatter_mul_sum_triton,
                                        shuffle_mul_sum_fused_triton, shuffle_mul_sum_triton,
                                        shuffle_mul_sum_triton_out)

            _register_python("CUDA", shuffle_mul_sum_triton, shuffle_mul_sum_triton_out, shuffle_mul_sum_fused_triton,
                             scatter_mul_sum_triton, scatter_mul_sum_fused_triton)
            ACTIVE["cuda"] = "triton"
            SCATTER_ACTIVE["cuda"] = "triton"
            FALLBACK_REASONS["cuda"] = "; ".join(reasons) or "forced by FUSED_MOE_OPS_CUDA_BACKEND"
            return
        reasons.append(why)
    _register_python("CUDA", _reference_functional, shuffle_mul_sum_reference_out)
    _register_scatter_reference("CUDA")
    ACTIVE["cuda"] = "reference"
    FALLBACK_REASONS["cuda"] = "; ".join(reasons) or "forced by FUSED_MOE_OPS_CUDA_BACKEND"
    # Only worth a warning where CUDA tensors can actually reach the op.
    if gpu and forced is None:
        warnings.warn(
            f"fused_moe_ops: moe::shuffle_mul_sum runs on the plain-PyTorch reference on CUDA "
            f"({FALLBACK_REASONS['cuda']}).",
            RuntimeWarning,
            stacklevel=3,
        )


_DONE = False


def setup() -> None:
    global _DONE
    if _DONE:
        return
    _DONE = True
    _register_autograd()
    # The scatter form is registered with the gather form: by the C++ libraries where they load, else
    # by _setup_cpu's / _setup_cuda's fallbacks (the Triton kernel, the reference).
    _setup_cpu()
    _setup_cuda()
