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

    Always True: rewriting does not decide the speed by itself. The op the pass emits is lowered by
    fusion/autotune.py, where Inductor benchmarks the op's kernel against its own code for the
    combine (static sizes) or ``symbolic_size_choice`` decides (a symbolic token count); where Inductor
    cannot choose (AOTInductor, deterministic mode, torch < 2.12, the autotuning switched off) the op
    stays. What is not worth rewriting at any size is decided structurally before
    this hook (a combine whose rows are a pointwise result Inductor would compute inside its own
    kernel is left alone). Every kernel takes any topk, so nothing is a hard limit. A rule here must
    not guard on symbolic sizes: it gets ``None`` for them. This function's source is part of the
    pass's cache key (``uuid()``).
    """
    return True


# Where Inductor chooses between the op and its own code (fusion/autotune.py: torch >= 2.12, static
# sizes, not AOTInductor, not deterministic mode), the fastest decomposition is taken when its
# benchmarked time is at most this many times the op's. It is benchmarked alone: what it gains by
# fusing with the residual add and RMSNorm after the combine is not in that comparison. 1.0 (plain
# timing) because on CPU that already gives the decomposition every case where its fusion paid in the
# model runs (docs/BENCHMARKS.md, 2026-12-02 autotuning run): the op's benchmark is an extern call
# with its Python dispatch, which at decode costs more than the unrolled decomposition's kernel.
# No GPU measurement backs a CUDA value yet.
DECOMPOSITION_PREFERENCE = 1.0


def symbolic_size_choice(device_type: str, topk: Optional[int], k: Optional[int], dtype: torch.dtype) -> str:
    """What a combine whose token count is symbolic (dynamic shapes) becomes where the autotuning is
    on: ``"unrolled"`` or ``"reduction"`` (that decomposition, fusion/decompositions.py, inlined as
    Inductor IR with no benchmark) or ``"op"`` (the op's kernel). One compile serves every token
    count, so this is a rule, not a measurement of the call. Its source is part of the pass's cache key.

    CPU: the unrolled decomposition. It is Inductor's own code for the combine, so the graph launches
    exactly the kernels Inductor's does (it fuses with the un-permute before it and the residual add
    and RMSNorm after it), and as pointwise code it is faster than the spelling it replaced at every
    token count; the op is faster still only at large M (docs/BENCHMARKS.md). CUDA and the rest: the
    op (no GPU measurement of the decomposition yet)."""
    if device_type == "cpu" and topk is not None:
        return "unrolled"
    return "op"


def should_autotune(device_type: str, m: int, topk: int, k: int, dtype: torch.dtype) -> bool:
    """Whether Inductor benchmarks the op against its own code for one combine of these (static)
    sizes; False keeps the op without a benchmark (saves its compile time).

    Where Inductor cannot choose (torch < 2.12, AOTInductor, deterministic mode, the autotuning
    switched off) the op stays: on CPU it beats Inductor's code for the combine alone at every
    measured size, and it is what those paths ran before. A symbolic size: ``symbolic_size_choice``.
    Its source is part of the pass's cache key."""
    return True


def choice_order(device_type: str, m: int, topk: int, k: int, dtype: torch.dtype) -> tuple:
    """Which lowering Inductor keeps among those whose benchmarked times tie (within
    ``choice_tolerance``): the first of this order. Names: ``"unrolled"``, ``"reduction"``, ``"op"``.

    The decompositions before the op: inlined, they launch what Inductor's own graph launches (they
    fuse with the un-permute before the combine and the residual add and RMSNorm after it), where the
    op is a kernel of its own. ``unrolled`` before ``reduction``: alone it is as fast or much faster
    (at topk 8 on CPU the reduction over topk is a slow loop), and in whole models the two were
    within the measurement's noise of each other (docs/BENCHMARKS.md, the cold-compile run). Its
    source is part of the pass's cache key."""
    return ("unrolled", "reduction", "op")


# How far apart two benchmarked lowerings must be for the benchmark to decide between them; nearer,
# choice_order decides. CPU: Inductor times each choice for a short while on cores that other
# processes share; on a loaded 2-core machine one lowering's time moved by 20 to 50% from one cold
# compile to the next at the larger sizes, and by over 10% with a second compile running beside it
# (docs/BENCHMARKS.md, the cold-compile run). Within 25% the decomposition is kept: inlined, it is
# Inductor's own code for the combine, never slower than the graph without the pass. CUDA: timed in
# a CUDA graph, steadier; not measured on a GPU yet.
CHOICE_TOLERANCE = {"cpu": 0.25, "cuda": 0.05}


def choice_tolerance(device_type: str) -> float:
    """The fraction within which two benchmarked lowerings count as tied (``CHOICE_TOLERANCE``)."""
    return CHOICE_TOLERANCE.get(device_type, CHOICE_TOLERANCE["cuda"])


# CPU: the op is an extern call whose dispatch alone takes 17 to 22 us; Inductor's code for a small
# combine takes a few (K 256, bf16: M 1 topk 8 1.4 us, M 16 topk 8 3.4 us, M 16 topk 2 2.1 us; at
# M 256 topk 8, 524288 elements, 34 us against the op's 60 us: docs/BENCHMARKS.md, the cold-compile
# run). Up to this many gathered elements (M * topk * K) the decomposition is taken without a
# benchmark: there the benchmark could only lose, and on a busy machine it once timed the
# decomposition 10x slower than itself and kept the op (a launch more in the model).
CPU_NO_BENCHMARK_ELEMENTS = 131072


def choice_without_benchmark(device_type: str, m: int, topk: int, k: int, dtype: torch.dtype) -> Optional[str]:
    """The lowering to take for a combine of these (static) sizes without benchmarking (``"unrolled"``,
    ``"reduction"`` or ``"op"``), or None to let Inductor benchmark. CPU: the decomposition wherever the
    op's dispatch cost outweighs the whole combine (``CPU_NO_BENCHMARK_ELEMENTS``). Its source is part
    of the pass's cache key."""
    if device_type == "cpu" and m * topk * k <= CPU_NO_BENCHMARK_ELEMENTS:
        return "unrolled" if topk <= 16 else "reduction"
    return None


def scatter_choice(device_type: str, m: Optional[int], rows: Optional[int], k: Optional[int], dtype: torch.dtype,
                   native_kernel: bool) -> Optional[str]:
    """How Inductor lowers one scatter combine (``moe::_scatter_mul_sum_fused``, fusion/scatter_autotune.py):
    ``"decomposition"`` (fusion/decompositions.py ``scatter_rows_sum``: Inductor's own code for a
    scatter_add of the rows, inlined without a benchmark), ``"op"`` (the op's kernel) or None (Inductor benchmarks the two). ``m``, ``rows``, ``k``
    are ints, or None where symbolic; ``native_kernel`` whether a C++/CUDA kernel serves the op on the
    device (else it is the plain-PyTorch reference, which copies through the CPU).

    The decomposition wherever the op cannot be shown to be faster: without a native kernel; for a
    symbolic size (one compile serves every token count; no measurement covers them all); on CPU up to
    ``CPU_NO_BENCHMARK_ELEMENTS`` row elements (rows * k), where the op's dispatch alone costs more than
    Inductor's whole combine (as for the gather form). Else a benchmark, ties going to the
    decomposition. Its source is part of the pass's cache key."""
    if not native_kernel or m is None or rows is None or k is None:
        return "decomposition"
    if device_type == "cpu" and rows * k <= CPU_NO_BENCHMARK_ELEMENTS:
        return "decomposition"
    return None
