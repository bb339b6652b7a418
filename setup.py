"""Packaging of fused_moe_ops. Metadata lives in pyproject.toml; this file adds the compiled kernels.

* ``pip wheel . --no-deps --no-build-isolation -w dist/`` (torch installed where it runs, the
  torch-extension convention) compiles the kernels ahead of time into one ``cp310-abi3`` wheel:
  ``fused_moe_ops/_C_cpu.abi3.so`` (DEFAULT / AVX2 / AVX-512 copies of the kernel, picked when it
  loads) and, where torch is a CUDA build and nvcc is found, ``fused_moe_ops/_C_cuda.abi3.so``
  (sm_80 and sm_90 machine code + compute_90 PTX, or $TORCH_CUDA_ARCH_LIST). Both are written on
  torch's stable ABI and compiled for torch 2.10 (_kernel_spec.py), so the wheel requires
  ``torch>=2.10``, whatever torch built it; ``_prebuilt.json`` beside them records what they were
  built with (the CUDA library needs a torch of the same CUDA major version).
* ``pip install -e .`` (build isolation: no torch here) builds nothing: a source checkout compiles
  its kernels on first import (fused_moe_ops/build).

The kernel sources and flags come from fused_moe_ops/_kernel_spec.py, shared with the JIT build.
"""
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_spec():
    # By path: importing the fused_moe_ops package would import torch.
    loader = importlib.util.spec_from_file_location("_fmo_kernel_spec", ROOT / "fused_moe_ops" / "_kernel_spec.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


SPEC = _load_spec()
BASE_DEPENDENCIES = ["ninja", "numpy"]
# Python's own CFLAGS carry -g; debug info would double the CPU library's size in the wheel.
NO_DEBUG_INFO = ["-g0"]
X86_64 = platform.machine() in ("x86_64", "AMD64")


def _installed_torch():
    """The version of the torch installed where setup.py runs (without importing it), or None."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def _dependencies():
    # The libraries target the stable ABI of MIN_TORCH: any torch from there on serves them, the
    # one that built them or not; a source install compiles against whatever torch it finds.
    return [f"torch>={SPEC.MIN_TORCH}"] + BASE_DEPENDENCIES


def _find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and Path(os.environ[var], "bin", "nvcc").exists():
            return os.environ[var]
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    return None


def _torch_extensions(skipped):
    """The CPU extension and, where possible, the CUDA one: no Python API used (py_limited_api), so
    one cp310-abi3 wheel serves every CPython from 3.10 on."""
    import torch
    from torch.utils import cpp_extension

    csrc = "csrc"  # relative: setuptools wants relative source paths
    extensions = [cpp_extension.CppExtension(
        "fused_moe_ops." + SPEC.WHEEL_LIBRARIES["cpu"],
        sources=[f"{csrc}/{s}" for s in SPEC.CPU_SOURCES],
        include_dirs=[str(ROOT / csrc)],
        # -ffile-prefix-map: the dispatcher names "csrc/shuffle_mul_sum_cpu.cpp", not the build machine's path.
        extra_compile_args={"cxx": SPEC.CPU_FLAGS + NO_DEBUG_INFO + [f"-ffile-prefix-map={ROOT}/="]},
        py_limited_api=True,
    )]
    if torch.version.cuda is None:
        skipped["cuda"] = f"torch {torch.__version__} is not a CUDA build"
    elif _find_cuda_home() is None:
        skipped["cuda"] = "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    elif mismatch := SPEC.cuda_major_mismatch(_find_cuda_home(), torch.version.cuda):
        skipped["cuda"] = mismatch
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", SPEC.DEFAULT_CUDA_ARCH_LIST)
        extensions.append(cpp_extension.CUDAExtension(
            "fused_moe_ops." + SPEC.WHEEL_LIBRARIES["cuda"],
            sources=[f"{csrc}/{s}" for s in SPEC.CUDA_SOURCES],
            include_dirs=[str(ROOT / csrc)],
            extra_compile_args={"cxx": SPEC.CUDA_CXX_FLAGS + NO_DEBUG_INFO, "nvcc": SPEC.CUDA_NVCC_FLAGS + SPEC.cuda_pip_include_flags(_find_cuda_home())},
            py_limited_api=True,
        ))
    for kind, why in skipped.items():
        print(f"fused_moe_ops: the wheel carries no {kind} kernel: {why}", file=sys.stderr)
    return extensions


def _torch_build_ext_class(skipped):
    import torch
    from torch.utils.cpp_extension import BuildExtension

    class BuildKernels(BuildExtension):
        """torch's BuildExtension, plus _prebuilt.json."""

        def run(self):
            super().run()
            libraries = {}
            for ext in self.extensions:
                kind = ext.name.rsplit("_C_", 1)[1]
                entry = {"file": Path(self.get_ext_filename(ext.name)).name,
                         "flags": list(ext.extra_compile_args.get("nvcc" if kind == "cuda" else "cxx", []))}
                if kind == "cpu":
                    entry["isas"] = list(SPEC.CPU_ISAS) if X86_64 else ["DEFAULT"]
                else:
                    entry["arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
                    entry["cuda"] = torch.version.cuda
                libraries[kind] = entry
            manifest = {"min_torch": SPEC.MIN_TORCH, "built_with_torch": torch.__version__,
                        "torch_cuda": torch.version.cuda, "libraries": libraries, "not_built": skipped}
            out_dir = (ROOT if self.inplace else Path(self.build_lib)) / "fused_moe_ops"
            (out_dir / SPEC.PREBUILT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    return BuildKernels


def _building_kernels():
    """Compile only for a real (non-editable) binary build, with torch installed in this environment."""
    if _installed_torch() is None:
        return False
    commands = {"bdist_wheel", "build", "build_ext", "install", "bdist"}
    return bool(commands & set(sys.argv[1:]))


if _building_kernels():
    _cuda_home = _find_cuda_home()
    if _cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = _cuda_home  # before cpp_extension guesses it from a stray nvcc on PATH
    _skipped = {}
    EXT_MODULES, CMDCLASS = _torch_extensions(_skipped), {"build_ext": _torch_build_ext_class(_skipped)}
    # One wheel for CPython >= 3.10 (the oldest torch 2.10 supports): the libraries use no Python API.
    OPTIONS = {"bdist_wheel": {"py_limited_api": "cp310"}}
else:  # editable install, sdist, metadata: no torch needed, nothing compiled
    EXT_MODULES, CMDCLASS, OPTIONS = [], {}, {}

setup(install_requires=_dependencies(), ext_modules=EXT_MODULES, cmdclass=CMDCLASS, options=OPTIONS)
