"""What the native kernels are built from: sources and flags, shared by the wheel build (setup.py)
and the just-in-time build (_build.py).

Plain Python, no torch: setup.py reads this file by path, before torch is importable (the
editable install's isolated build environment has no torch).

CPU: ``shuffle_mul_sum_cpu.cpp`` holds the kernel inside ``namespace CPU_CAPABILITY`` (the at::vec
convention). The wheel compiles it once per ISA in ``CPU_ISAS`` into one library; the DEFAULT
copy also registers the op and picks, when the library loads, the widest copy that
``at::native::get_cpu_capability()`` allows (which honours ``ATEN_CPU_CAPABILITY=avx2|default``).
The JIT build compiles it once, for the host's ISA only (``CPU_SINGLE_ISA_FLAGS``).
"""

CPU_SOURCES = ["shuffle_mul_sum_cpu.cpp"]
CUDA_SOURCES = ["shuffle_mul_sum_cuda.cu"]
HEADER_SUFFIXES = (".h", ".cuh")

# No -std: torch's cpp_extension picks the standard its headers need (C++17 for 2.11, C++20 later).
CPU_COMMON_FLAGS = ["-O3", "-fopenmp"]

# Per ISA: compiler flags and the CPU_CAPABILITY macros at::vec selects its implementation by.
# The first entry is the baseline: in the dispatching library its object is linked first, so where
# the ISA copies share an inline function (std::vector's, c10::Half's), the linker keeps the
# baseline's copy and no AVX-512 instruction leaks into code that runs on an AVX2 machine.
CPU_ISAS = {
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}
# The DEFAULT copy of the dispatching library also registers the op and selects an ISA at load.
CPU_DISPATCH_FLAG = "-DFMO_CPU_DISPATCH"

CUDA_NVCC_FLAGS = ["-O3", "-lineinfo"]
CUDA_CXX_FLAGS = ["-O3"]
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

# Library names: in the wheel they sit in the package as fused_moe_ops/_C_cpu*.so and _C_cuda*.so;
# _prebuilt.json beside them records the torch they were built against.
WHEEL_LIBRARIES = {"cpu": "_C_cpu", "cuda": "_C_cuda"}
PREBUILT_MANIFEST = "_prebuilt.json"


def cuda_include_paths():
    """Headers that ATen/cuda needs and that CUDA wheels of torch ship outside the toolkit (cusparse.h,
    cublas_v2.h, ...) in the pip "nvidia-*" packages."""
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
