"""The CUDA kernels' machine code, compiled here without a GPU: csrc/shuffle_mul_sum_cuda.cu through
nvcc (device code only, to PTX, with the library's flags) and ptxas, per architecture; for each
instantiation of a combine kernel (the gather form's shuffle_mul_sum_kernel<in_t, out_t, VEC>, the
scatter form's scatter_segment_sum_kernel<in_t, out_t, VEC>) the width of its input-row loads, addend
loads and output stores (from the PTX, by source line), and for those and the scatter form's
scatter_keys_kernel<index_t> their registers, spills, stack and shared memory (ptxas -v).
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import _kernel_spec as spec
from . import ptx as ptxlib

DEVICE_HEADER = "shuffle_mul_sum_cuda_device.cuh"

# The source lines of the accesses that must be 16 bytes wide in the vectorised instantiations,
# found by their text in DEVICE_HEADER (a rewrite that no longer matches fails loudly: no lines).
ACCESS_PATTERNS = {
    "row": r"reinterpret_cast<const Pack<in_t, VEC>\*>\(input\b",
    "addend": r"reinterpret_cast<const Pack<in_t, VEC>\*>\(static_cast<const in_t\*>\(P\.addend\)",
    "store": r"reinterpret_cast<Pack<out_t, VEC>\*>\(static_cast<out_t\*>\(P\.out\)",
}

# The kernels templated on <in_t, out_t, VEC> that read input rows through accumulate / store (the
# accesses checked); the gather form's first.
COMBINE_KERNELS = ("shuffle_mul_sum_kernel", "scatter_segment_sum_kernel")
KEYS_KERNEL = "scatter_keys_kernel"  # <index_t>: reads the index, writes keys (no row access)
_INDEX_DTYPES = {"i": "int32", "l": "int64"}

_DTYPES = {"f": "float32", "Half": "float16", "BFloat16": "bfloat16"}
_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_TEMPLATE_ARG = re.compile(r"f|N(?:3c10|S\d*_)(?:4Half|8BFloat16)E|S\d*_|Li(\d+)E")


@dataclasses.dataclass
class Instantiation:
    """One instantiation of one of our kernels for one architecture: a combine kernel's
    <in_t, out_t, VEC>, or the keys kernel's <index_t> (input = the index dtype, output "", vec 1)."""

    arch: str                 # "sm_90"
    ptx_arch: str             # "compute_90": the PTX it was assembled from
    symbol: str
    input: str                # dtype names
    output: str
    vec: int
    resources: ptxlib.Resources
    widths: Dict[str, List[int]]  # "row" / "addend" / "store" -> the bit width of each such access
    kernel: str = COMBINE_KERNELS[0]

    @property
    def name(self) -> str:
        if self.kernel == KEYS_KERNEL:
            return f"{KEYS_KERNEL} {self.input}"
        prefix = "" if self.kernel == COMBINE_KERNELS[0] else f"{self.kernel} "
        return f"{prefix}{self.input}->{self.output} x{self.vec}"

    @property
    def combine(self) -> bool:
        """A kernel that reads input rows (the accesses checked), not the keys kernel."""
        return self.kernel in COMBINE_KERNELS

    @property
    def vectorised(self) -> bool:
        """The 16-byte instantiation (VEC = 16 / sizeof(in_t)); VEC = 1 is the scalar fallback."""
        return self.vec > 1


def kernel_of(symbol: str) -> str:
    """Which of our kernels a mangled symbol instantiates (ValueError for any other)."""
    for kernel in COMBINE_KERNELS + (KEYS_KERNEL,):
        if f"{len(kernel)}{kernel}I" in symbol:
            return kernel
    raise ValueError(f"not an instantiation of {', '.join(COMBINE_KERNELS + (KEYS_KERNEL,))}: {symbol}")


def decode_keys_symbol(symbol: str) -> str:
    """'_ZN..19scatter_keys_kernelIiEEvNS0_17ScatterKeysParamsE' -> 'int32'."""
    code = symbol.split(f"{len(KEYS_KERNEL)}{KEYS_KERNEL}I", 1)[1][:1]
    if code not in _INDEX_DTYPES:
        raise ValueError(f"cannot decode {symbol}")
    return _INDEX_DTYPES[code]


def decode_symbol(symbol: str) -> Tuple[str, str, int]:
    """'_ZN..shuffle_mul_sum_kernelIN3c108BFloat16ES3_Li8EEEvNS0_6ParamsE' -> ('bfloat16', 'bfloat16', 8);
    the same for scatter_segment_sum_kernel."""
    kernel = kernel_of(symbol)
    if kernel not in COMBINE_KERNELS:
        raise ValueError(f"not a combine kernel instantiation: {symbol}")
    marker = f"{kernel}I"
    rest, types, vec = symbol.split(marker, 1)[1], [], None
    while vec is None:
        m = _TEMPLATE_ARG.match(rest)
        if m is None:
            raise ValueError(f"cannot decode {symbol}")
        token, rest = m.group(0), rest[m.end():]
        if m.group(1):
            vec = int(m.group(1))
        elif token == "f":
            types.append("float32")
        elif token.startswith("N"):
            types.append("float16" if "Half" in token else "bfloat16")
        else:  # a substitution: the one type named before
            types.append(types[-1])
    if len(types) != 2:
        raise ValueError(f"cannot decode {symbol}")
    return types[0], types[1], vec


def access_lines(header_text: str) -> Dict[str, List[int]]:
    """The DEVICE_HEADER lines of each checked access (a statement split over lines counts all of its lines)."""
    lines = header_text.splitlines()
    out: Dict[str, List[int]] = {}
    for name, pattern in ACCESS_PATTERNS.items():
        found = []
        for n, text in enumerate(lines, 1):
            if re.search(pattern, text):
                found.append(n)
                if n >= 2 and not lines[n - 2].rstrip().endswith((";", "{", "}")):
                    found.append(n - 1)  # the statement starts on the line before
        out[name] = sorted(found)
    return out


def nvcc_path(cuda_home: str) -> str:
    return str(Path(cuda_home, "bin", "nvcc"))


def ptxas_path(cuda_home: str) -> str:
    return str(Path(cuda_home, "bin", "ptxas"))


def nvcc_device_flags(cuda_home: str) -> List[str]:
    """The library's nvcc flags (fused_moe_ops/build: torch's cpp_extension common flags + ours), the
    include directories, without -gencode: the caller names one virtual architecture."""
    from torch.utils import cpp_extension

    from ..build import csrc_dir, cuda_flags

    includes = []
    for path in cpp_extension.include_paths("cuda") + [str(Path(cuda_home, "include"))]:
        includes += ["-isystem", path]
    return (["-I", str(csrc_dir())] + includes + list(cpp_extension.COMMON_NVCC_FLAGS) + cuda_flags(cuda_home)
            + ["-std=c++20"])


def compile_ptx(cuda_home: str, ptx_arch: int, out: Path, defines: Sequence[str] = ()) -> str:
    """nvcc: the library's .cu to PTX for compute_<ptx_arch> (device code only: no host compile)."""
    from ..build import csrc_dir

    cmd = [nvcc_path(cuda_home), *nvcc_device_flags(cuda_home), *[f"-D{d}" for d in defines],
           f"-arch=compute_{ptx_arch}", "--ptx", str(csrc_dir() / spec.CUDA_SOURCES[0]), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return out.read_text()


def assemble(cuda_home: str, ptx_file: Path, arch: int, extra: Sequence[str] = ()) -> str:
    """ptxas -v: the PTX to sm_<arch> machine code; returns ptxas's report."""
    cmd = [ptxas_path(cuda_home), "-O3", f"-arch=sm_{arch}", "-v", *extra, str(ptx_file),
           "-o", str(ptx_file.with_suffix(f".sm_{arch}.cubin"))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def instantiations(ptx_text: str, ptxas_log: str, arch: int, ptx_arch: int,
                   header_text: Optional[str] = None) -> List[Instantiation]:
    """The per-instantiation report of one PTX module assembled for sm_<arch>."""
    from ..build import csrc_dir

    if header_text is None:
        header_text = (csrc_dir() / DEVICE_HEADER).read_text()
    lines = access_lines(header_text)
    resources = ptxlib.ptxas_resources(ptxas_log)
    accesses = ptxlib.global_accesses(ptx_text)
    out = []
    for symbol in ptxlib.entries(ptx_text):
        kernel = kernel_of(symbol)
        if kernel == KEYS_KERNEL:
            out.append(Instantiation(f"sm_{arch}", f"compute_{ptx_arch}", symbol, decode_keys_symbol(symbol), "", 1,
                                     resources.get(symbol, ptxlib.Resources()), {name: [] for name in lines},
                                     kernel))
            continue
        in_t, out_t, vec = decode_symbol(symbol)
        widths: Dict[str, List[int]] = {name: [] for name in lines}
        for a in accesses:
            if a.function != symbol or not a.file.endswith(DEVICE_HEADER):
                continue
            for name, numbers in lines.items():
                if a.line in numbers and (a.kind == "st") == (name == "store"):
                    widths[name].append(a.bits)
        out.append(Instantiation(f"sm_{arch}", f"compute_{ptx_arch}", symbol, in_t, out_t, vec,
                                 resources.get(symbol, ptxlib.Resources()), widths, kernel))
    order = {name: i for i, name in enumerate(COMBINE_KERNELS + (KEYS_KERNEL,))}
    return sorted(out, key=lambda k: (order[k.kernel], k.input, k.output, k.vec))


def compile_arch(cuda_home: str, arch: int, ptx_arch: Optional[int] = None, defines: Sequence[str] = (),
                 workdir: Optional[Path] = None, ptxas_extra: Sequence[str] = ()) -> List[Instantiation]:
    """Every instantiation compiled for sm_<arch> from compute_<ptx_arch> PTX (default: the same arch,
    as nvcc does for -gencode arch=compute_X,code=sm_X)."""
    return compile_image(cuda_home, arch, ptx_arch, defines, workdir, ptxas_extra)[0]


def compile_image(cuda_home: str, arch: int, ptx_arch: Optional[int] = None, defines: Sequence[str] = (),
                  workdir: Optional[Path] = None, ptxas_extra: Sequence[str] = ()
                  ) -> Tuple[List[Instantiation], str, bytes]:
    """compile_arch's instantiations, with the PTX text and the sm_<arch> cubin."""
    ptx_arch = ptx_arch or arch
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        ptx_file = Path(tmp, f"shuffle_mul_sum_cuda.compute_{ptx_arch}.ptx")
        ptx_text = compile_ptx(cuda_home, ptx_arch, ptx_file, defines)
        log = assemble(cuda_home, ptx_file, arch, ptxas_extra)
        cubin = ptx_file.with_suffix(f".sm_{arch}.cubin").read_bytes()
        return instantiations(ptx_text, log, arch, ptx_arch), ptx_text, cubin


def library_image_arch(arch: int) -> tuple:
    """(machine-code arch or None, PTX arch) of the library's image for a GPU of `arch`: its cubin where the
    default arch list has one, else its newest PTX not above the GPU (driver JIT)."""
    targets = [t.strip() for t in spec.DEFAULT_CUDA_ARCH_LIST.split(";")]
    cubins = [int(float(t.replace("+PTX", "")) * 10) for t in targets]
    ptx = [int(float(t.replace("+PTX", "")) * 10) for t in targets if t.endswith("+PTX")]
    if arch in cubins:
        return arch, arch
    return None, max(p for p in ptx if p <= arch)


def element_bytes(dtype: str) -> int:
    return _ELEMENT_BYTES[dtype]


def store_bits(k: Instantiation) -> int:
    """The widest output store the instantiation's Pack allows: VEC elements of out_t, up to 128 bits."""
    return min(128, 8 * k.vec * element_bytes(k.output))


def problems(k: Instantiation) -> List[str]:
    """What is wrong with an instantiation's machine code ([] when nothing): a vectorised
    instantiation whose input-row or addend loads are not all 128-bit, a scalar one whose loads are
    not one element wide, no row load found, or any spill. Output stores are reported
    (Instantiation.widths["store"]), not checked: see docs/BENCHMARKS.md, "Machine code"."""
    out = []
    if not k.combine:  # the keys kernel: no row access to check
        if k.resources.spills:
            out.append(f"{k.arch} {k.name}: spills {k.resources.spill_stores} bytes stored, "
                       f"{k.resources.spill_loads} loaded")
        if not k.resources.registers:
            out.append(f"{k.arch} {k.name}: no ptxas resource report")
        return out
    if not k.widths["row"]:
        out.append(f"{k.arch} {k.name}: no input-row load found at the lines of {DEVICE_HEADER} (code moved?)")
    for name in ("row", "addend"):
        want = 128 if k.vectorised else 8 * element_bytes(k.input)
        bad = sorted({w for w in k.widths[name] if w != want})
        if bad:
            out.append(f"{k.arch} {k.name}: {name} loads of {bad} bits, not {want} "
                       f"({len(k.widths[name])} such loads)")
    if k.resources.spills:
        out.append(f"{k.arch} {k.name}: spills {k.resources.spill_stores} bytes stored, "
                   f"{k.resources.spill_loads} loaded")
    if not k.resources.registers:
        out.append(f"{k.arch} {k.name}: no ptxas resource report")
    return out
