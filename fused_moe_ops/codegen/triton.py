"""The Triton kernel's machine code, compiled here without a GPU: `_shuffle_mul_sum_kernel`
(fused_moe_ops/triton_kernel.py) through `triton.compile` for a chosen GPU target, with the
signature, constants and alignment hints that Triton's runtime derives from the arguments the op
passes (the runtime's own binder, given CPU tensors of the same dtypes, strides and 16-byte
alignment), and the options the op's autotune configs give. For each specialization: the width of
its input-row loads, addend loads and output stores (from the PTX, by source line), and registers,
spills and shared memory (ptxas -v, the ptxas Triton ships).
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import io
import os
import tempfile
import textwrap
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from . import ptx as ptxlib

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One call shape of the op on the Triton kernel: what decides its specialization."""

    input: str = "bfloat16"
    factors: str = "float32"
    output: str = "bfloat16"
    topk: int = 8
    k: int = 4096                 # a multiple of 16 elements: the runtime gives K divisibility 16
    has_perm: bool = True
    negative_index: int = 0
    factor_round: int = 0
    factors_per_row: bool = False
    scale: float = 1.0
    has_addend: bool = False
    has_row_mask: bool = False
    block_k: int = 1024
    num_warps: int = 4
    misalign: bool = False        # input viewed one element off a 16-byte boundary (no divisibility hint)

    @property
    def name(self) -> str:
        flags = [f for f, on in (("identity", not self.has_perm), (f"neg{self.negative_index}", self.negative_index),
                                 (f"round{self.factor_round}", self.factor_round),
                                 ("per-row", self.factors_per_row), ("scale", self.scale != 1.0),
                                 ("addend", self.has_addend), ("row-mask", self.has_row_mask),
                                 ("misaligned", self.misalign)) if on]
        return (f"{self.input}->{self.output} w:{self.factors} topk {self.topk} "
                f"BLOCK_K {self.block_k}/{self.num_warps}w" + (" " + ",".join(flags) if flags else ""))


def kernel():
    """The JITFunction under the op's autotuner."""
    from .. import triton_kernel

    if triton_kernel.triton is None:
        raise RuntimeError(f"triton is not importable: {triton_kernel._IMPORT_ERROR}")
    if triton_kernel.INTERPRET:  # @triton.jit then gives the CPU interpreter's function: nothing to compile
        raise RuntimeError("fused_moe_ops.triton_kernel was imported with TRITON_INTERPRET=1; compile in a "
                           "process without it")
    return triton_kernel._shuffle_mul_sum_kernel.fn


def op_variants() -> List[Variant]:
    """Every specialization axis of the op's launches (triton_kernel._launch), each covered:
    all nine (input, output) dtype pairs with the factor dtype cycling through all three, each
    flag and option on its own, top-k blocks 1 to 16 and a two-step top-k; at the autotune
    config the op uses without autotuning. Every autotune config is covered by config_variants()."""
    from ..triton_kernel import NO_AUTOTUNE_CONFIG

    (block_k, warps), = NO_AUTOTUNE_CONFIG
    base = Variant(block_k=block_k, num_warps=warps)
    names = list(DTYPES)
    out = [base] + [dataclasses.replace(base, input=a, output=b, factors=names[(i + j) % 3])
           for i, a in enumerate(names) for j, b in enumerate(names)]
    out += [dataclasses.replace(base, has_perm=False), dataclasses.replace(base, negative_index=1),
            dataclasses.replace(base, negative_index=2), dataclasses.replace(base, factor_round=1),
            dataclasses.replace(base, factor_round=2), dataclasses.replace(base, factors_per_row=True),
            dataclasses.replace(base, scale=0.5), dataclasses.replace(base, has_addend=True),
            dataclasses.replace(base, has_row_mask=True)]
    out += [dataclasses.replace(base, topk=t) for t in (1, 2, 3, 16, 20)]
    return out


def config_variants() -> List[Variant]:
    """Every autotune config (triton_kernel.GPU_CONFIGS) for each input dtype, output = input,
    with an addend (so every checked access is there), top-k 8."""
    from ..triton_kernel import GPU_CONFIGS

    return [Variant(input=d, output=d, block_k=b, num_warps=w, has_addend=True)
            for d in DTYPES for b, w in GPU_CONFIGS]


def _aligned(shape, dtype, misalign=False) -> torch.Tensor:
    """A CPU tensor whose storage starts on a 16-byte boundary (or one element past it)."""
    if not misalign:
        return torch.empty(shape, dtype=dtype)
    flat = torch.empty(int(torch.Size(shape).numel()) + 1, dtype=dtype)
    return flat[1:].view(shape)


def launch_args(v: Variant) -> Tuple[tuple, dict]:
    """The kernel's arguments as triton_kernel._launch passes them for a call of shape `v` (CPU
    tensors stand in for the CUDA ones: the runtime's specialization reads only their dtypes,
    data pointers and strides, and the integers)."""
    from ..triton_kernel import MAX_TOPK_BLOCK, _next_pow2

    m, rows = 16, 16 * v.topk
    row_stride = v.k + 1 if v.misalign else v.k
    x = _aligned((rows, row_stride), DTYPES[v.input], v.misalign)[:, :v.k]
    perm = torch.empty(m * v.topk, dtype=torch.int64) if v.has_perm else None
    factors = torch.empty(rows if v.factors_per_row else (m, v.topk), dtype=DTYPES[v.factors])
    out = torch.empty((m, v.k), dtype=DTYPES[v.output])
    addend = torch.empty((m, v.k), dtype=DTYPES[v.input]) if v.has_addend else None
    mask = torch.empty(rows, dtype=torch.bool) if v.has_row_mask else None
    per_row = factors.dim() == 1
    args = (x, perm if perm is not None else x, factors, out, addend if addend is not None else out,
            mask if mask is not None else out, rows, v.k, x.stride(0), perm.stride(0) if perm is not None else 0,
            factors.stride(0), 0 if per_row else factors.stride(1), out.stride(0),
            addend.stride(0) if addend is not None else 0, mask.stride(0) if mask is not None else 0,
            float(v.scale), 0)
    constexprs = dict(HAS_PERM=v.has_perm, NEGATIVE_INDEX=v.negative_index, FACTOR_ROUND=v.factor_round,
                      FACTORS_PER_ROW=per_row, HAS_SCALE=v.scale != 1.0, HAS_ADDEND=v.has_addend,
                      HAS_ROW_MASK=v.has_row_mask, TOPK=v.topk,
                      TOPK_BLOCK=min(_next_pow2(max(v.topk, 1)), MAX_TOPK_BLOCK), ROUND_BF16_RNE=False,
                      BLOCK_K=v.block_k)
    return args, constexprs


def access_calls(source: str, first_line: int) -> List[Tuple[int, str, Optional[str]]]:
    """Each tl.load / tl.store call of the kernel: (its first line in the kernel's file, "ld" or
    "st", "row" / "addend" / "store" for the checked ones (pointer from in_ptr, add_ptr, out_ptr),
    else None), by first line."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("load", "store") and node.args):
            continue
        names = {n.id for n in ast.walk(node.args[0]) if isinstance(n, ast.Name)}
        if node.func.attr == "load":
            which = "row" if "in_ptr" in names else "addend" if "add_ptr" in names else None
        else:
            which = "store" if "out_ptr" in names else None
        out.append((first_line + node.lineno - 1, "ld" if node.func.attr == "load" else "st", which))
    return sorted(out)


def classify(calls: List[Tuple[int, str, Optional[str]]], kind: str, line: int) -> Optional[str]:
    """Which checked access a PTX load / store at `line` belongs to: the call of its kind that starts
    last at or before that line (LLVM may attribute an instruction to a later line of the kernel,
    e.g. the addend's load to the statement after it, never to an earlier one)."""
    which = None
    for start, call_kind, name in calls:
        if call_kind == kind and start <= line:
            which = name
    return which


@dataclasses.dataclass
class Compiled:
    variant: Variant
    arch: int
    resources: ptxlib.Resources
    widths: Dict[str, List[int]]
    shared: int                  # bytes (Triton's metadata: the dynamic shared memory it launches with)
    kernel: object = None        # the CompiledKernel (compile_variant(keep=True), to load it on a GPU)

    def expected_bits(self, which: str) -> int:
        """The widest access the layout allows: the elements one thread holds along K, up to 16 bytes
        (the row tile holds TOPK_BLOCK rows, so its threads hold more of each row than the addend's
        or the output's); one element where the input is misaligned."""
        from ..triton_kernel import MAX_TOPK_BLOCK, _next_pow2

        v = self.variant
        size = DTYPES[v.output if which == "store" else v.input].itemsize
        if v.misalign and which == "row":
            return 8 * size
        rows = min(_next_pow2(max(v.topk, 1)), MAX_TOPK_BLOCK) if which == "row" else 1
        per_thread = max(1, rows * v.block_k // (32 * v.num_warps))
        return min(128, 8 * size * min(per_thread, v.block_k))


@contextlib.contextmanager
def _isolated_cache() -> Iterator[None]:
    """A throw-away Triton cache, and ptxas's report printed (captured by the caller): every variant
    really compiles, and a developer's cache is neither read nor filled."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        saved = (knobs.cache.dir, knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = tmp, True, True
        try:
            yield
        finally:
            knobs.cache.dir, knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved


def compile_variant(v: Variant, arch: int, fn=None, keep: bool = False) -> Compiled:
    """triton.compile for GPUTarget("cuda", arch, 32), specialised as the runtime would for `v`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = fn or kernel()
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args, constexprs = launch_args(v)
    kwargs = dict(constexprs, num_warps=v.num_warps, num_stages=1, debug=fn.debug)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, consts, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    with _isolated_cache(), contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, consts, attrs), target=target, options=options.__dict__)
    ptx_text = compiled.asm["ptx"]
    src_lines, first = inspect.getsourcelines(fn.fn)
    calls = access_calls(textwrap.dedent("".join(src_lines)), first)
    src_file = os.path.basename(inspect.getsourcefile(fn.fn))
    widths: Dict[str, List[int]] = {"row": [], "addend": [], "store": []}
    for a in ptxlib.global_accesses(ptx_text):
        which = classify(calls, a.kind, a.line) if os.path.basename(a.file) == src_file else None
        if which:
            widths[which].append(a.bits)
    res = ptxlib.ptxas_resources(log.getvalue())
    resources = res.get(compiled.metadata.name) or next(iter(res.values()), ptxlib.Resources())
    return Compiled(v, arch, resources, widths, compiled.metadata.shared, compiled if keep else None)


def problems(c: Compiled) -> List[str]:
    """What is wrong with a specialization's machine code ([] when nothing): a row load, addend load
    or output store narrower than the layout and alignment allow, a missing one, or any spill."""
    out = []
    tag = f"sm_{c.arch} {c.variant.name}"
    wanted = ["row", "store"] + (["addend"] if c.variant.has_addend else [])
    for which in wanted:
        if not c.widths[which]:
            out.append(f"{tag}: no {which} access found at its source lines")
            continue
        bad = sorted({w for w in c.widths[which] if w != c.expected_bits(which)})
        if bad:
            out.append(f"{tag}: {which} accesses of {bad} bits, not {c.expected_bits(which)} "
                       f"({len(c.widths[which])} such accesses)")
    if c.resources.spills or c.resources.stack:
        out.append(f"{tag}: local memory: {c.resources.stack} bytes stack, {c.resources.spill_stores} bytes "
                   f"spill stores, {c.resources.spill_loads} bytes spill loads")
    if not c.resources.registers:
        out.append(f"{tag}: no ptxas resource report")
    return out
