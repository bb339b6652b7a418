"""Profitability rule of the fusion pass: which combine sizes to rewrite.

Edit ``should_rewrite`` here (its source is part of the pass's cache key), or replace
``fused_moe_ops.fusion.should_rewrite`` at runtime (then compile in a fresh cache: a runtime
replacement is not part of the key).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops import CUDA_MAX_TOPK


def should_rewrite(
    device_type: str, m: Optional[int], topk: Optional[int], k: Optional[int], dtype: torch.dtype
) -> bool:
    """Whether rewriting one combine of this size into ``moe::shuffle_mul_sum`` pays off.

    Called by the pass for every candidate it found, before rewriting it. Arguments: the device type
    (``"cpu"``, ``"cuda"``, ...), the number of tokens ``m``, ``topk``, the hidden size ``k`` (each a
    Python int, or ``None`` when that size is symbolic, e.g. the token count under dynamic shapes) and
    the dtype of the gathered rows.

    First a hard limit, not a preference: never emit a call the kernel would refuse. The CUDA kernel
    takes topk <= CUDA_MAX_TOPK, so on CUDA a larger or symbolic topk (the no-gather spelling also
    matches e.g. sum-pooling over a long sequence) is left to Inductor.

    Otherwise always True: on CPU the op beats Inductor's generated code at every measured size
    (docs/BENCHMARKS.md). The CUDA comparison is not measured yet; a measured rule for CUDA goes here
    (it must not guard on symbolic sizes: it gets ``None`` for them). This function's source is part
    of the pass's cache key (``uuid()``).
    """
    if device_type == "cuda" and (topk is None or topk > CUDA_MAX_TOPK):
        return False
    return True
