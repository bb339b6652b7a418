"""Just-in-time build of the native kernels with ``torch.utils.cpp_extension.load`` and ninja.

Two independent libraries, so that a failing CUDA build never costs the CPU kernel:

* ``cpu``:  csrc/shuffle_mul_sum_cpu.cpp, built with the host's AVX2 / AVX-512 flags.
* ``cuda``: csrc/shuffle_mul_sum_cuda.cu, built for sm_80 and sm_90 (+ PTX) when torch is a
  CUDA build and nvcc is found.

Each build lives in a directory named by a hash of (sources, flags, torch version, Python
version, CPU ISA), under ``$FUSED_MOE_OPS_CACHE`` or ``~/.cache/fused_moe_ops``: a change of
any of them gives a fresh directory, so a stale library is never loaded, and a second process
finds the library already there. ``python -m fused_moe_ops.build`` builds ahead of time.

Environment:
    FUSED_MOE_OPS_CACHE=DIR     where builds live
    FUSED_MOE_OPS_NO_BUILD=1    do not compile anything (the op runs on the fallbacks)
    FUSED_MOE_OPS_NO_CUDA=1     do not compile the CUDA kernel
    FUSED_MOE_OPS_VERBOSE=1     show the compiler's command lines and output
    TORCH_CUDA_ARCH_LIST        overrides the default "8.0;9.0+PTX"
    CUDA_HOME                   the CUDA toolkit (default: /usr/local/cuda if it has nvcc)
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


@dataclasses.dataclass
class BuildResult:
    kind: str                      # "cpu" or "cuda"
    ok: bool = False
    skipped: Optional[str] = None  # why it was not attempted
    error: Optional[str] = None    # compiler / loader message when it failed
    library: Optional[str] = None  # path of the loaded .so
    build_dir: Optional[str] = None
    built_now: bool = False        # compiled in this process (vs. found in the cache)
    flags: List[str] = dataclasses.field(default_factory=list)


RESULTS: Dict[str, BuildResult] = {}


def csrc_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):  # installed wheel, source checkout
        if (candidate / "shuffle_mul_sum_cpu.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"fused_moe_ops: csrc/ not found next to {here}")


def cache_root() -> Path:
    env = os.environ.get("FUSED_MOE_OPS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fused_moe_ops"


def cpu_isa() -> str:
    """The widest x86 vector ISA that both this CPU and at::vec support."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "default"
    try:
        flags = set()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "default"


def cpu_flags(isa: str) -> List[str]:
    # No -std: torch's cpp_extension picks the standard its headers need (C++17 for 2.11, C++20 later).
    common = ["-O3", "-fopenmp"]
    if isa == "avx512":
        return common + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                         "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if isa == "avx2":
        return common + ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return common + ["-DCPU_CAPABILITY=DEFAULT"]


def find_cuda_home() -> Optional[str]:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and Path(os.environ[var], "bin", "nvcc").exists():
            return os.environ[var]
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(nvcc).resolve().parent.parent
        if (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    return None


def cuda_include_paths() -> List[str]:
    """Headers that ATen/cuda needs and that CUDA wheels ship outside the toolkit (cusparse.h, ...)."""
    paths = []
    try:
        import nvidia  # the pip "nvidia-*" packages; a namespace package
        for root in list(nvidia.__path__):
            for inc in sorted(Path(root).glob("*/include")):
                if (inc / "cusparse.h").exists() or (inc / "cublas_v2.h").exists():
                    paths.append(str(inc))
    except ImportError:
        pass
    return paths


def cuda_flags() -> List[str]:
    return ["-O3", "-lineinfo"]


def _tag(kind: str, sources: List[Path], flags: List[str]) -> str:
    """Hash of what the library is built from: its sources, the shared headers, flags, versions."""
    h = hashlib.sha256()
    headers = sorted(p for p in csrc_dir().iterdir() if p.suffix in (".h", ".cuh"))
    for src in headers + sorted(sources):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    for item in flags + [torch.__version__, str(torch.version.cuda), sys.version, kind, platform.machine()]:
        h.update(item.encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cpp_extension():
    """torch.utils.cpp_extension, imported with CUDA_HOME pointing at the real toolkit.

    cpp_extension resolves CUDA_HOME once, at its import, from `which nvcc`; where that nvcc is a
    stray copy (/usr/local/bin/nvcc) the guess is wrong and it warns on every import.
    """
    cuda_home = find_cuda_home() if torch.version.cuda else None
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # "No CUDA runtime is found": expected on a build-only machine
    try:
        with _env(CUDA_HOME=os.environ.get("CUDA_HOME") or cuda_home):
            from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    if cuda_home and os.environ.get("CUDA_HOME") is None:
        cpp_extension.CUDA_HOME = cuda_home
    return cpp_extension


def _load(kind: str, sources: List[Path], cflags: List[str], cuda_cflags: List[str], includes: List[str],
          result: BuildResult, verbose: bool) -> None:
    cpp_extension = _cpp_extension()

    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if kind == "cuda" else ""
    tag = _tag(kind, sources, cflags + cuda_cflags + includes + [arch])
    name = f"fused_moe_ops_{kind}_{tag}"
    build_dir = cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    result.build_dir = str(build_dir)
    result.flags = cflags + cuda_cflags
    so = build_dir / f"{name}.so"
    missing = [str(src) for src in sources if not src.is_file()]
    if missing:
        raise FileNotFoundError(f"fused_moe_ops: source file(s) missing: {', '.join(missing)}")
    if not so.exists():
        result.built_now = True
        print(f"fused_moe_ops: compiling the {kind.upper()} kernel once (about a minute); cached in {build_dir}",
              file=sys.stderr, flush=True)
    cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_cflags,
        extra_include_paths=[str(csrc_dir())] + includes,
        build_directory=str(build_dir),
        is_python_module=False,  # the library registers kernels through TORCH_LIBRARY_IMPL
        verbose=verbose,
    )
    result.library = str(so)
    result.ok = True


def _describe(e: BaseException) -> str:
    """The exception with whatever compiler output it carries (a CalledProcessError keeps it aside)."""
    text = f"{type(e).__name__}: {e}"
    for attr in ("stderr", "output"):
        extra = getattr(e, attr, None)
        if isinstance(extra, bytes):
            extra = extra.decode(errors="replace")
        if extra and extra not in text:
            text += "\n" + extra
    return text


def _verbose(verbose: bool) -> bool:
    return verbose or os.environ.get("FUSED_MOE_OPS_VERBOSE") == "1"


def build_cpu(verbose: bool = False) -> BuildResult:
    result = RESULTS["cpu"] = BuildResult("cpu")
    if os.environ.get("FUSED_MOE_OPS_NO_BUILD") == "1":
        result.skipped = "FUSED_MOE_OPS_NO_BUILD=1"
        return result
    try:
        _load("cpu", [csrc_dir() / "shuffle_mul_sum_cpu.cpp"], cpu_flags(cpu_isa()), [], [], result,
              _verbose(verbose))
        torch.ops.moe.shuffle_mul_sum.default  # noqa: B018  (fails loudly if registration went wrong)
    except Exception as e:  # noqa: BLE001 - any failure means "use the fallback", with the reason kept
        result.error = _describe(e)
    return result


def cuda_build_possible() -> Optional[str]:
    """None when a CUDA build can be attempted, else why not."""
    if os.environ.get("FUSED_MOE_OPS_NO_BUILD") == "1":
        return "FUSED_MOE_OPS_NO_BUILD=1"
    if os.environ.get("FUSED_MOE_OPS_NO_CUDA") == "1":
        return "FUSED_MOE_OPS_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if find_cuda_home() is None:
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None


def build_cuda(verbose: bool = False) -> BuildResult:
    result = RESULTS["cuda"] = BuildResult("cuda")
    why_not = cuda_build_possible()
    if why_not:
        result.skipped = why_not
        return result
    try:
        cuda_home = find_cuda_home()
        _cpp_extension().CUDA_HOME = cuda_home
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST
        with _env(CUDA_HOME=cuda_home, TORCH_CUDA_ARCH_LIST=arch):
            _load("cuda", [csrc_dir() / "shuffle_mul_sum_cuda.cu"], ["-O3"],
                  cuda_flags(), cuda_include_paths(), result, _verbose(verbose))
    except Exception as e:  # noqa: BLE001
        result.error = _describe(e)
    return result


def fatbin_targets(library: str) -> List[str]:
    """The GPU code embedded in a CUDA library, e.g. ["sm_80", "sm_90", "compute_90"] (sm_*: machine
    code; compute_*: PTX, JIT-compiled by the driver on newer GPUs). Parses the fatbinary headers
    directly, so it needs no cuobjdump."""
    import struct

    data = Path(library).read_bytes()
    magic = struct.pack("<I", 0xBA55ED50)
    found = set()
    pos = data.find(magic)
    while pos >= 0:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry + 32 <= end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if kind in (1, 2) and entry_header:
                found.add(("compute_" if kind == 1 else "sm_") + str(arch))
            if not entry_header:
                break
            entry += entry_header + size
        pos = data.find(magic, max(end, pos + 4))
    return sorted(found, key=lambda t: (int(t.split("_")[1]), t.startswith("compute")))


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fused_moe_ops.build",
                                     description="Build (or find in the cache) the native kernels ahead of time.")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's command lines and output")
    parser.add_argument("--cpu-only", action="store_true", help="skip the CUDA kernel")
    args = parser.parse_args(argv)
    # Importing the package (which `python -m` does first) already built or found the libraries;
    # this re-checks them and reports. For compiler output on a fresh build use
    # FUSED_MOE_OPS_VERBOSE=1, which the import-time build honours too.
    results = [build_cpu(args.verbose)]
    if not args.cpu_only:
        results.append(build_cuda(args.verbose))
    status = 0
    for r in results:
        state = "ok" if r.ok else ("skipped: " + r.skipped if r.skipped else "FAILED")
        print(f"{r.kind:5s} {state}" + (f"  {r.library}" if r.library else ""))
        if r.error:
            print(r.error, file=sys.stderr)
            status = 1
    return status
