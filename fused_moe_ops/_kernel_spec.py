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
CUDA_SOURCES = ["shuffle_mul_sum_cuda.cu"]
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


def cuda_include_paths():
    """Headers that CUDA wheels of torch ship outside the toolkit (cusparse.h, cublas_v2.h, ...) in
    the pip "nvidia-*" packages."""
    from pathlib import Path

    paths = []
    try:
        import nvidia  # a namespace package
    except ImportError:
        return paths
    for root in list(nvidia.__path__):
        for inc in sorted(Path(root).glob("*/include")):
            if (inc / "cusparse.h").exists() or (inc / "cublas_v2.h").exists():
                paths.append(str(inc))
    return paths
