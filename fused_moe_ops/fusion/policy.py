"""Profitability rule of the fusion pass: which combine sizes to rewrite.

Edit ``should_rewrite`` here (its source is part of the pass's cache key), or replace
``fused_moe_ops.fusion.should_rewrite`` at runtime (then compile in a fresh cache: a runtime
replacement is not part of the key).
"""
from __future__ import annotations

from typing import Optional

import torch



def should_rewrite(
    device_type: str, m: Optional[int], topk: Optional[int], k: Optional[int], dtype: torch.dtype
) -> bool:
    """Whether rewriting one combine of this size into the op pays off.

    Called by the pass for every candidate it found, before rewriting it. Arguments: the device type
    (``"cpu"``, ``"cuda"``, ...), the number of tokens ``m``, ``topk``, the hidden size ``k`` (each a
    Python int, or ``None`` when that size is symbolic, e.g. the token count under dynamic shapes) and
    the dtype of the gathered rows.

    Always True. Every kernel takes any topk, so nothing is a hard limit. What is not worth rewriting
    at any size is decided structurally before this hook (a combine whose rows are a pointwise result
    Inductor would compute inside its own kernel is left alone). The rewritten graph launches
    one kernel for the combine and nothing that only feeds it. The index wrap, the factors' rounding,
    a per-row factor gather, and a following scale or add are all arguments of the op, so the pass
    never adds a launch to Inductor's graph; on CPU the op beats Inductor's generated code at every
    measured size (docs/BENCHMARKS.md). A measured CUDA rule would go here. It must not guard on
    symbolic sizes: it gets ``None`` for them. This function's source is part of the pass's cache
    key (``uuid()``).
    """
    return True


# The decomposition is taken when its benchmarked time is at most this many times the op's
# (fusion/autotune.py): it is benchmarked alone, and what it gains by fusing with its neighbours
# (the residual add and RMSNorm after the combine) is not in that comparison.
DECOMPOSITION_PREFERENCE = 1.0


def should_autotune(device_type: str, m: int, topk: int, k: int, dtype: torch.dtype) -> bool:
    """Whether Inductor benchmarks the op against its own code for this combine (static sizes only,
    torch >= 2.12, not AOTInductor / deterministic; fusion/autotune.py). False keeps the op."""
    return True
