"""What the native kernels are built from: sources and flags, shared by the wheel build (setup.py)
and the just-in-time build (fused_moe_ops/build).

Plain Python, no torch: setup.py reads this file by path, before torch is importable (the
editable install's isolated build environment has no torch).

Both libraries are written on torch's stable ABI (torch/csrc/stable, torch/headeronly) and compiled
with TORCH_TARGET_VERSION = MIN_TORCH: the headers then expose only what that torch already
provides, and one library loads under every torch from MIN_TORCH on. Without the target the build
silently links shims of the torch it was compiled against, and fails to load on older ones.

CPU: ``shuffle_mul_sum_cpu.cpp`` holds three copies of the kernel (DEFAULT, AVX2, AVX-512, each in a
``#pragma GCC target`` region) and picks one when it loads, so the wheel and the JIT build compile
the same file with the same flags.
"""

CPU_SOURCES = ["shuffle_mul_sum_cpu.cpp"]
# The first is the one the machine-code checks compile (fused_moe_ops/codegen): every kernel of ours; the
# second holds only the scatter form's CUB sort (scatter_sort_cuda.h).
CUDA_SOURCES = ["shuffle_mul_sum_cuda.cu", "scatter_sort_cuda.cu"]
HEADER_SUFFIXES = (".h", ".cuh")

# The oldest torch the libraries serve, and its TORCH_TARGET_VERSION (0xMMmmpp... : 2.10.0).
MIN_TORCH = "2.10"
STABLE_ABI_FLAGS = ["-DTORCH_TARGET_VERSION=0x020a000000000000", "-DTORCH_STABLE_ONLY"]
# The kernel copies the CPU library carries (x86-64; elsewhere DEFAULT only).
CPU_ISAS = ["DEFAULT", "AVX2", "AVX512"]

# No -std: torch's cpp_extension picks the standard its headers need (C++17 at least).
CPU_FLAGS = ["-O3"] + STABLE_ABI_FLAGS

CUDA_NVCC_FLAGS = ["-O3", "-lineinfo"] + STABLE_ABI_FLAGS
CUDA_CXX_FLAGS = ["-O3"] + STABLE_ABI_FLAGS
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

# Library names: in the wheel they sit in the package as fused_moe_ops/_C_cpu.abi3.so and
# _C_cuda.abi3.so; _prebuilt.json beside them records what they were built for.
WHEEL_LIBRARIES = {"cpu": "_C_cpu", "cuda": "_C_cuda"}
PREBUILT_MANIFEST = "_prebuilt.json"


def version_tuple(version):
    """'2.14.1+cu130' -> (2, 14, 1); '2.10' -> (2, 10)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:
            break
    return tuple(parts)


def toolkit_cuda_version(cuda_home):
    """The CUDA version of the toolkit's nvcc ("13.0"), or None where it cannot be told."""
    import json
    import subprocess
    from pathlib import Path

    if not cuda_home:
        return None
    try:  # version.json: present since CUDA 11.1, cheaper than running nvcc
        return json.loads(Path(cuda_home, "version.json").read_text())["cuda_nvcc"]["version"].rsplit(".", 1)[0]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        out = subprocess.run([str(Path(cuda_home, "bin", "nvcc")), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():  # "Cuda compilation tools, release 12.8, V12.8.93"
        if "release" in line:
            return line.split("release", 1)[1].split(",")[0].strip()
    return None


def cuda_major_mismatch(cuda_home, torch_cuda):
    """One line saying why the toolkit cannot build for this torch (their CUDA majors differ: the
    library would link libcudart.so of another major), or None where they match or cannot be told."""
    nvcc = toolkit_cuda_version(cuda_home)
    if not nvcc or not torch_cuda or nvcc.split(".")[0] == str(torch_cuda).split(".")[0]:
        return None
    return (f"nvcc {nvcc} ({cuda_home}) and torch's CUDA {torch_cuda} differ in major version; "
            f"set CUDA_HOME to a CUDA {str(torch_cuda).split('.')[0]} toolkit")


# Headers of CUDA libraries the CUDA sources include beyond the CUDA runtime's: none today (the
# kernel is written on torch's stable ABI, no ATen/cuda, so no cuBLAS / cuSPARSE). A toolkit
# may lack such headers (a runtime-only install); CUDA wheels of torch ship them in the pip
# "nvidia-*" packages, which cuda_pip_include_flags() then adds behind the toolkit's own.
CUDA_LIBRARY_HEADERS = ()


def cuda_pip_include_flags(cuda_home, headers=CUDA_LIBRARY_HEADERS):
    """nvcc flags that search a pip "nvidia-*" include directory for the ``headers`` the toolkit
    lacks, AFTER the toolkit's include directory; [] where the toolkit has them all.

    Never ahead of it: the pip directory of a torch built for a newer CUDA minor (torch 2.15:
    13.2) also carries cuda_runtime_api.h and CCCL of that release, which an older nvcc (13.0)
    rejects ("CUDA compiler and CUDA toolkit headers are incompatible"). ``-I`` cannot order it
    behind: torch's cpp_extension names the toolkit's include with ``-isystem``, and gcc drops a
    ``-I`` of a directory that is also ``-isystem`` to the system position, behind every other
    ``-I``. So the pip directory comes as ``-isystem`` too, in flags that follow torch's.
    """
    from pathlib import Path

    toolkit = Path(cuda_home, "include") if cuda_home else None
    missing = [h for h in headers if toolkit is None or not (toolkit / h).exists()]
    if not missing:
        return []
    try:
        import nvidia  # a namespace package
    except ImportError:
        return []
    flags = []
    for root in list(nvidia.__path__):
        for inc in sorted(Path(root).glob("*/include")):
            if any((inc / h).exists() for h in missing):
                flags += ["-isystem", str(inc)]
    return flags
