"""The machine-code table of docs/BENCHMARKS.md: rows from the compiled kernels (cuda.py,
triton.py), rendered as markdown between two markers, read back from that markdown, and compared
with what a GPU reports (gpu.py).

A row: kernel ("cuda" / "triton"), arch ("sm_90"), name (the instantiation or config), registers,
spill bytes, stack bytes, shared bytes, the bit widths of row loads / addend loads / stores, the
threads per block it is counted at and the model's blocks per SM there.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from . import occupancy

ARCHS = (80, 90, 100)
BEGIN = "<!-- machine-code table: python -m fused_moe_ops.codegen --write docs/BENCHMARKS.md -->"
END = "<!-- end of machine-code table -->"
SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
# Threads per block the CUDA kernel's launch shapes use (choose_launch): 128 with many tokens, down
# to 32 for decode.
CUDA_THREADS = (128, 32)


@dataclasses.dataclass
class Row:
    kernel: str
    arch: str
    name: str
    registers: int
    spills: int
    stack: int
    shared: int
    row_bits: str
    addend_bits: str
    store_bits: str
    threads: int
    blocks: int


def _bits(widths: Sequence[int]) -> str:
    return "/".join(str(w) for w in sorted(set(widths), reverse=True)) or "-"


def cuda_rows(archs=ARCHS, cuda_home: Optional[str] = None) -> Tuple[List[Row], List[str]]:
    from ..build import find_cuda_home
    from . import cuda

    cuda_home = cuda_home or find_cuda_home()
    rows, problems = [], []
    with ProcessPoolExecutor(max_workers=min(len(archs), os.cpu_count() or 1)) as pool:
        # What the library runs on each arch: its cubin, or the driver's JIT of its PTX (ptxas here).
        ptx_archs = [cuda.library_image_arch(a)[1] for a in archs]
        for arch, kernels in zip(archs, pool.map(cuda.compile_arch, [cuda_home] * len(archs), archs, ptx_archs)):
            for k in kernels:
                problems += cuda.problems(k)
                if k.kernel != cuda.COMBINE_KERNELS[0]:
                    continue  # the table tabulates the gather kernel (test_gpu_codegen checks the others)
                r = k.resources
                for threads in CUDA_THREADS:
                    rows.append(Row("cuda", k.arch, f"{SHORT[k.input]}->{SHORT[k.output]} x{k.vec}", r.registers,
                                    r.spills, r.stack, r.shared, _bits(k.widths["row"]), _bits(k.widths["addend"]),
                                    _bits(k.widths["store"]), threads,
                                    occupancy.blocks_per_sm(arch, threads, r.registers, r.shared)))
    return rows, problems


def _compile_triton(args):
    from . import triton as tri

    variant, arch = args
    return tri.compile_variant(variant, arch)


def triton_compiled(archs=ARCHS, variants=None, workers: Optional[int] = None):
    """Every (variant, arch) compiled, in a process pool (each compile is single-threaded)."""
    from . import triton as tri

    variants = variants if variants is not None else tri.op_variants() + tri.config_variants()
    variants = list(dict.fromkeys(variants))  # a config variant may also be an op variant
    jobs = [(v, a) for a in archs for v in variants]
    with ProcessPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(_compile_triton, jobs, chunksize=4))


def triton_rows(compiled) -> Tuple[List[Row], List[str]]:
    """Table rows for the autotune configs (the config variants); problems of every variant."""
    from . import triton as tri

    configs = set(tri.config_variants())
    rows, problems = [], []
    for c in compiled:
        problems += tri.problems(c)
        if c.variant not in configs:
            continue
        v, r, threads = c.variant, c.resources, 32 * c.variant.num_warps
        rows.append(Row("triton", f"sm_{c.arch}", f"{SHORT[v.input]} BLOCK_K {v.block_k}/{v.num_warps}w",
                        r.registers, r.spills, r.stack, c.shared, _bits(c.widths["row"]),
                        _bits(c.widths["addend"]), _bits(c.widths["store"]), threads,
                        occupancy.blocks_per_sm(c.arch, threads, r.registers, c.shared)))
    return rows, problems


COLUMNS = ("kernel", "arch", "name", "registers", "spills", "stack", "shared", "row_bits", "addend_bits",
           "store_bits", "threads", "blocks")
HEADER = ("kernel", "arch", "instantiation / config", "registers", "spill bytes", "stack bytes", "shared bytes",
          "row load bits", "addend load bits", "store bits", "threads / block", "blocks / SM (model)")


def markdown(rows: List[Row]) -> str:
    """One line per group of rows (of one kernel and arch) that differ only in name, names joined by ", "."""
    groups: Dict[tuple, List[str]] = {}
    for r in rows:
        groups.setdefault(tuple(getattr(r, c) for c in COLUMNS if c != "name"), []).append(r.name)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * 3 + "---:|" * (len(HEADER) - 3)]
    for key, names in groups.items():
        values = dict(zip([c for c in COLUMNS if c != "name"], key), name=", ".join(names))
        lines.append("| " + " | ".join(str(values[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def parse_markdown(text: str) -> List[Row]:
    """The rows of the table between BEGIN and END in `text` (docs/BENCHMARKS.md)."""
    if BEGIN not in text or END not in text:
        raise ValueError("no machine-code table (its markers) in the text")
    body = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = []
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != len(COLUMNS) or cells[0] not in ("cuda", "triton"):
            continue
        values = dict(zip(COLUMNS, cells))
        for c in ("registers", "spills", "stack", "shared", "threads", "blocks"):
            values[c] = int(values[c])
        for name in values.pop("name").split(", "):
            rows.append(Row(name=name, **values))
    return rows


def replace_table(text: str, table: str) -> str:
    head, rest = text.split(BEGIN, 1)
    return head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1]


def compare(expected: List[Row], observed: List[Dict]) -> List[str]:
    """Where a GPU's report differs from the table. `observed`: dicts with kernel, arch, name,
    threads and any of registers, spills, shared, blocks (what the GPU measured: the driver's
    function attributes and its occupancy calculator). Rows the GPU did not measure are not
    compared; an observed row with no table row is reported."""
    table = {(r.kernel, r.arch, r.name, r.threads): r for r in expected}
    out = []
    for o in observed:
        key = (o["kernel"], o["arch"], o["name"], int(o["threads"]))
        row = table.get(key)
        if row is None:
            out.append(f"{' '.join(map(str, key))}: measured on the GPU, not in the table")
            continue
        for field in ("registers", "spills", "shared", "blocks"):
            if field in o and o[field] is not None and int(o[field]) != getattr(row, field):
                out.append(f"{row.kernel} {row.arch} {row.name} ({row.threads} threads): {field} "
                           f"{o[field]} on the GPU, {getattr(row, field)} in the table")
    return out
