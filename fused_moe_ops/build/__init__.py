"""How the native kernels get into the process: from the wheel, from the build cache, or compiled now.
``python -m fused_moe_ops.build`` builds them ahead of time.

Two independent libraries, so that a failing CUDA build never costs the CPU kernel. Both are written
on torch's stable ABI (_kernel_spec.py), so one build serves every torch from 2.10 on:

* ``cpu``:  csrc/shuffle_mul_sum_cpu.cpp: one library with a DEFAULT, an AVX2 and an AVX-512 copy of
  the kernel; it picks one when it loads (ATEN_CPU_CAPABILITY caps it). The wheel and the JIT build
  compile the same file with the same flags.
* ``cuda``: csrc/shuffle_mul_sum_cuda.cu, for sm_80 and sm_90 (+ PTX), when torch is a CUDA build.

Order, per library (``build_cpu`` / ``build_cuda``):

1. a library built into the installed wheel (``_prebuilt.json`` beside it names the oldest torch it
   serves and, for CUDA, the CUDA major version it was built with; a torch outside that falls
   through to 2), loaded with ``torch.ops.load_library``;
2. the JIT build cache: a directory named by a hash of (sources, flags, torch version, Python version,
   CPU ISA), under ``$FUSED_MOE_OPS_CACHE`` or ``~/.cache/fused_moe_ops``. A finished build is loaded
   directly: no ninja run, no ``torch.utils.cpp_extension`` import. The sources are copied into the
   build directory before compiling, so its ninja file names no checkout: two checkouts or venvs with
   the same sources share one build and never rebuild each other;
3. compile (``torch.utils.cpp_extension.load`` + ninja) under an exclusive file lock, so that the
   ranks of one job starting together build once and the others wait and load.

The CUDA library is considered on import only where a GPU is visible (or FUSED_MOE_OPS_BUILD_CUDA=1);
``python -m fused_moe_ops.build --cuda`` builds it ahead of time anywhere.

Environment:
    FUSED_MOE_OPS_CACHE=DIR     where JIT builds live
    FUSED_MOE_OPS_NO_BUILD=1    load and compile nothing (the op runs on the fallbacks)
    FUSED_MOE_OPS_NO_CUDA=1     do not load or compile the CUDA kernel
    FUSED_MOE_OPS_BUILD_CUDA=1  load / compile the CUDA kernel on import even without a visible GPU
    FUSED_MOE_OPS_VERBOSE=1     show the compiler's command lines and output
    TORCH_CUDA_ARCH_LIST        overrides the default "8.0;9.0+PTX"
    CUDA_HOME                   the CUDA toolkit (default: /usr/local/cuda if it has nvcc)
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .. import _kernel_spec as spec

DEFAULT_CUDA_ARCH_LIST = spec.DEFAULT_CUDA_ARCH_LIST
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # fused_moe_ops/


@dataclasses.dataclass
class BuildResult:
    kind: str                      # "cpu" or "cuda"
    ok: bool = False
    skipped: Optional[str] = None  # why it was not attempted
    error: Optional[str] = None    # compiler / loader message when it failed
    library: Optional[str] = None  # path of the loaded .so
    build_dir: Optional[str] = None
    built_now: bool = False        # compiled in this process (vs. found in the wheel or the cache)
    origin: Optional[str] = None   # "wheel", "cache" or "compiled"
    isa: Optional[str] = None      # CPU: the kernel copy the library selected (DEFAULT, AVX2, AVX512)
    row_prefetch: Optional[bool] = None  # CPU: whether that copy prefetches along each row
    note: Optional[str] = None     # e.g. why a wheel's library was not used
    flags: List[str] = dataclasses.field(default_factory=list)


RESULTS: Dict[str, BuildResult] = {}


def csrc_dir() -> Path:
    for candidate in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):  # installed package, source checkout
        if (candidate / spec.CPU_SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError(f"fused_moe_ops: csrc/ not found next to {PACKAGE_DIR}")


def cache_root() -> Path:
    env = os.environ.get("FUSED_MOE_OPS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fused_moe_ops"


def cpu_isa() -> str:
    """The widest x86 vector ISA this CPU supports, as /proc/cpuinfo tells (the copy the CPU library
    picks unless ATEN_CPU_CAPABILITY caps it)."""
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


def cpu_flags() -> List[str]:
    return list(spec.CPU_FLAGS)


def gpu_visible() -> bool:
    """A CUDA device is visible. torch.cuda.device_count() asks NVML first, so unlike a CUDA runtime
    call it leaves a later fork() able to use CUDA."""
    if torch.version.cuda is None:
        return False
    try:
        return torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - a broken driver is "no GPU" here; the report shows the error
        return False


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


def cuda_flags(cuda_home: Optional[str] = None) -> List[str]:
    return list(spec.CUDA_NVCC_FLAGS) + spec.cuda_pip_include_flags(cuda_home or find_cuda_home())


def _tag(kind: str, sources: List[Path], flags: List[str]) -> str:
    """Hash of what the library is built from: its sources, the shared headers, flags, versions.
    Contents only, never paths: two checkouts with the same sources share one build."""
    h = hashlib.sha256()
    headers = sorted(p for p in csrc_dir().iterdir() if p.suffix in spec.HEADER_SUFFIXES)
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


@contextlib.contextmanager
def build_lock(directory: Path):
    """Exclusive lock on ``directory/.build.lock`` (fcntl: released by the kernel if the holder dies,
    so a killed build never leaves the others waiting forever)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: torch's own FileLock in cpp_extension.load still serialises builds
        yield
        return
    with open(directory / ".build.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(build_dir: Path, build) -> bool:
    """Run ``build()`` unless ``build_dir`` already holds a finished build; True if it ran here.

    A finished build is marked by ``build_dir/complete``, written after ``build()`` returned, so a
    reader never takes a half-linked library for a finished one. Concurrent callers (the ranks of
    one job) serialise on the lock: the first builds, the others find the marker and return False.
    """
    marker = build_dir / "complete"
    if marker.exists():
        return False
    with build_lock(build_dir):
        if marker.exists():
            return False
        build()
        marker.write_text(json.dumps({"torch": torch.__version__, "python": sys.version.split()[0]}))
        return True


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


def _load_library(path: Path) -> None:
    torch.ops.load_library(str(path))


def prebuilt_manifest() -> Optional[dict]:
    """``_prebuilt.json`` of an installed wheel (None in a source checkout or an editable install)."""
    path = PACKAGE_DIR / spec.PREBUILT_MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_prebuilt(kind: str, result: BuildResult) -> bool:
    """Load the wheel's library for ``kind``; False (with result.note saying why) if there is none
    usable, so the caller goes on to the JIT build."""
    manifest = prebuilt_manifest()
    entry = (manifest or {}).get("libraries", {}).get(kind)
    if not entry:
        return False
    library = PACKAGE_DIR / entry["file"]
    minimum = manifest.get("min_torch", manifest.get("torch", ""))
    if spec.version_tuple(torch.__version__) < spec.version_tuple(minimum):
        # The stable ABI holds forward only: a library targeting a newer torch may call shims this one lacks.
        result.note = (f"the wheel's {kind} library needs torch >= {minimum}, this is torch {torch.__version__}; "
                       "using the JIT build instead")
        return False
    built_cuda = entry.get("cuda")
    if kind == "cuda" and built_cuda and str(torch.version.cuda).split(".")[0] != str(built_cuda).split(".")[0]:
        # The CUDA runtime is linked by major version (libcudart.so.13): a cu12 torch cannot serve it.
        result.note = (f"the wheel's CUDA library was built with CUDA {built_cuda}, this torch uses CUDA "
                       f"{torch.version.cuda}; using the JIT build instead")
        return False
    if not library.is_file():
        result.note = f"the wheel's {kind} library {library} is missing; using the JIT build instead"
        return False
    result.flags = list(entry.get("flags", []))
    _load_library(library)
    result.library = str(library)
    result.origin = "wheel"
    result.ok = True
    return True


def _jit(kind: str, sources: List[Path], cflags: List[str], cuda_cflags: List[str], includes: List[str],
         result: BuildResult, verbose: bool) -> None:
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if kind == "cuda" else ""
    tag = _tag(kind, sources, cflags + cuda_cflags + includes + [arch])
    name = f"fused_moe_ops_{kind}_{tag}"
    build_dir = cache_root() / name
    result.build_dir = str(build_dir)
    result.flags = cflags + cuda_cflags
    so = build_dir / f"{name}.so"
    missing = [str(src) for src in sources if not src.is_file()]
    if missing:
        raise FileNotFoundError(f"fused_moe_ops: source file(s) missing: {', '.join(missing)}")

    def compile_now() -> None:
        print(f"fused_moe_ops: compiling the {kind.upper()} kernel once (about a minute); cached in {build_dir}",
              file=sys.stderr, flush=True)
        # Compile copies of the sources: the ninja file then names only this directory, never a
        # checkout, so another checkout with the same sources finds this build as it is.
        src_dir = build_dir / "src"
        src_dir.mkdir(parents=True, exist_ok=True)
        for path in csrc_dir().iterdir():
            if path.suffix in spec.HEADER_SUFFIXES or path in sources:
                shutil.copyfile(path, src_dir / path.name)
        _cpp_extension().load(
            name=name,
            sources=[str(src_dir / s.name) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags,
            extra_include_paths=[str(src_dir)] + includes,
            build_directory=str(build_dir),
            is_python_module=False,  # the library registers kernels through TORCH_LIBRARY_IMPL
            verbose=verbose,
        )

    result.built_now = build_once(build_dir, compile_now)
    _load_library(so)  # a no-op where load() above already loaded it
    result.origin = "compiled" if result.built_now else "cache"
    result.library = str(so)
    result.ok = True


def _library_kernel_choice(library: str) -> Tuple[Optional[str], Optional[bool]]:
    """Which kernel copy the CPU library selected when it loaded, and whether it prefetches along each
    row (its exported fused_moe_ops_cpu_isa() and fused_moe_ops_cpu_row_prefetch())."""
    import ctypes

    try:
        lib = ctypes.CDLL(library)
        isa, prefetch = lib.fused_moe_ops_cpu_isa, lib.fused_moe_ops_cpu_row_prefetch
    except (OSError, AttributeError):
        return None, None
    isa.restype = ctypes.c_char_p
    prefetch.restype = ctypes.c_int
    return isa().decode(), bool(prefetch())


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
    """Load (wheel, cache) or compile the CPU library, once per process."""
    previous = RESULTS.get("cpu")
    if previous is not None and previous.ok:
        return previous
    result = RESULTS["cpu"] = BuildResult("cpu")
    if os.environ.get("FUSED_MOE_OPS_NO_BUILD") == "1":
        result.skipped = "FUSED_MOE_OPS_NO_BUILD=1"
        return result
    try:
        if not _load_prebuilt("cpu", result):
            sources = [csrc_dir() / s for s in spec.CPU_SOURCES]
            _jit("cpu", sources, cpu_flags(), [], [], result, _verbose(verbose))
        torch.ops.moe.shuffle_mul_sum.default  # noqa: B018  (fails loudly if registration went wrong)
        result.isa, result.row_prefetch = _library_kernel_choice(result.library)
    except Exception as e:  # noqa: BLE001 - any failure means "use the fallback", with the reason kept
        result.ok = False
        result.error = _describe(e)
    return result


NO_GPU_REASON = ("no CUDA device visible (FUSED_MOE_OPS_BUILD_CUDA=1 or `python -m fused_moe_ops.build --cuda` "
                 "builds it anyway)")


def cuda_build_possible() -> Optional[str]:
    """None when the CUDA library can be loaded or compiled here, else why not."""
    if os.environ.get("FUSED_MOE_OPS_NO_BUILD") == "1":
        return "FUSED_MOE_OPS_NO_BUILD=1"
    if os.environ.get("FUSED_MOE_OPS_NO_CUDA") == "1":
        return "FUSED_MOE_OPS_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if "cuda" in ((prebuilt_manifest() or {}).get("libraries") or {}):
        return None
    if find_cuda_home() is None:
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None


def cuda_wanted_on_import() -> bool:
    return gpu_visible() or os.environ.get("FUSED_MOE_OPS_BUILD_CUDA") == "1"


def build_cuda(verbose: bool = False, on_import: bool = False) -> BuildResult:
    """Load (wheel, cache) or compile the CUDA library, once per process. ``on_import``: only where a
    GPU is visible or FUSED_MOE_OPS_BUILD_CUDA=1 (a machine without a GPU cannot run it)."""
    previous = RESULTS.get("cuda")
    if previous is not None and previous.ok:
        return previous
    result = RESULTS["cuda"] = BuildResult("cuda")
    why_not = cuda_build_possible()
    if why_not is None and on_import and not cuda_wanted_on_import():
        why_not = NO_GPU_REASON
    if why_not:
        result.skipped = why_not
        return result
    try:
        if _load_prebuilt("cuda", result):
            return result
        cuda_home = find_cuda_home()
        if cuda_home is None:
            result.skipped = (result.note + "; " if result.note else "") + "no CUDA toolkit (nvcc) found; set CUDA_HOME"
            return result
        mismatch = spec.cuda_major_mismatch(cuda_home, torch.version.cuda)
        if mismatch:
            result.skipped = (result.note + "; " if result.note else "") + mismatch
            return result
        _cpp_extension().CUDA_HOME = cuda_home
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST
        with _env(CUDA_HOME=cuda_home, TORCH_CUDA_ARCH_LIST=arch):
            sources = [csrc_dir() / s for s in spec.CUDA_SOURCES]
            _jit("cuda", sources, list(spec.CUDA_CXX_FLAGS), cuda_flags(cuda_home), [], result,
                 _verbose(verbose))
    except Exception as e:  # noqa: BLE001
        result.ok = False
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
    import subprocess

    parser = argparse.ArgumentParser(prog="python -m fused_moe_ops.build",
                                     description="Build (or find in the cache) the native kernels ahead of time.")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's command lines and output")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cpu-only", action="store_true", help="skip the CUDA kernel")
    group.add_argument("--cuda", action="store_true",
                       help="build the CUDA kernel even where no GPU is visible (CI, a Docker build stage)")
    args = parser.parse_args(argv)
    cuda = RESULTS.get("cuda")
    if args.cuda and cuda is not None and cuda.skipped == NO_GPU_REASON:
        # This process's import registered the CUDA fallback already; build and load in a fresh one.
        env = dict(os.environ, FUSED_MOE_OPS_BUILD_CUDA="1")
        cmd = [sys.executable, "-m", "fused_moe_ops.build"] + (["--verbose"] if args.verbose else [])
        return subprocess.call(cmd, env=env)
    # Importing the package (which `python -m` does first) already built or found the libraries;
    # this reports them. For compiler output on a fresh build use FUSED_MOE_OPS_VERBOSE=1, which the
    # import-time build honours too.
    results = [build_cpu(args.verbose)]
    if not args.cpu_only:
        results.append(build_cuda(args.verbose, on_import=not args.cuda))
    status = 0
    for r in results:
        state = "ok" if r.ok else ("skipped: " + r.skipped if r.skipped else "FAILED")
        print(f"{r.kind:5s} {state}" + (f"  {r.library}" if r.library else ""))
        if r.error:
            print(r.error, file=sys.stderr)
            status = 1
    return status
