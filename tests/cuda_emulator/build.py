"""Builds the emulated CUDA kernel (runner.cpp + the device header + cuda_emulator.h) with g++, cached.

Test-only: nothing here is shipped or used by the library. Two variants:

* ``plain``: -O2, the quick build;
* ``sanitized``: ASan + UBSan (-fno-sanitize-recover: any report fails the run), what CI runs.

``plants`` adds -DPLANT_<name> switches (csrc/shuffle_mul_sum_cuda_device.cuh): builds with a bug put
back, which the emulated tests must catch. The cache key is the sources' contents and the flags;
the cache lives under FUSED_MOE_OPS_CACHE (else ~/.cache/fused_moe_ops) in emulator/.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
SOURCES = [HERE / "runner.cpp", HERE / "selftest.cpp", HERE / "cuda_emulator.h", CSRC / "shuffle_mul_sum_cuda_device.cuh",
           CSRC / "scatter_mul_sum_cuda_device.cuh", CSRC / "shuffle_mul_sum.h"]
# runner: the kernel fed cases by emulated.py; selftest: the emulator's own checks on small kernels.
PROGRAMS = ("runner", "selftest")

sys.path.insert(0, str(ROOT / "fused_moe_ops"))
from _kernel_spec import STABLE_ABI_FLAGS  # noqa: E402  (plain Python: the kernels' own ABI flags)

sys.path.pop(0)

VARIANTS = {
    "plain": ["-O2"],
    # -O1 keeps ASan fast enough; no recovery: the first report ends the run with a failure.
    "sanitized": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
}
# -fno-strict-aliasing: the kernel's 16-byte reinterpret_cast loads. Never -ffast-math: it folds isfinite.
# -ffp-contract=off: a * b + c stays two roundings where the device code asks for two (__fmul_rn / __fadd_rn).
COMMON_FLAGS = ["-std=c++17", "-g", "-fno-strict-aliasing", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas",
                "-Werror"]

# The sanitizer runtime's settings for the sanitized runner (the fiber stacks are switched by hand).
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_stack_use_after_return=0:abort_on_error=0:halt_on_error=1:exitcode=99",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=98",
}


def torch_include() -> str:
    import torch  # only for its headers: the runner links nothing of torch

    return str(Path(torch.__file__).parent / "include")


def cache_dir() -> Path:
    base = os.environ.get("FUSED_MOE_OPS_CACHE") or str(Path.home() / ".cache" / "fused_moe_ops")
    return Path(base) / "emulator"


def command(variant: str, plants: Sequence[str], out: Path, program: str = "runner") -> list:
    flags = COMMON_FLAGS + VARIANTS[variant] + STABLE_ABI_FLAGS + [f"-DPLANT_{p}" for p in sorted(plants)]
    return (["g++"] + flags + ["-I", str(CSRC), "-I", str(HERE), "-isystem", torch_include(),
                               str(HERE / f"{program}.cpp"), "-o", str(out)])


def runner(variant: str = "plain", plants: Sequence[str] = (), program: str = "runner") -> Path:
    """The `program` executable for `variant` with `plants`, built once per content."""
    assert program in PROGRAMS, program
    probe = command(variant, plants, Path("OUT"), program)
    h = hashlib.sha256(" ".join(probe).encode())
    for src in SOURCES:
        h.update(src.read_bytes())
    name = f"{program}-{variant}-{'-'.join(sorted(plants)) or 'clean'}-{h.hexdigest()[:16]}"
    path = cache_dir() / name
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # concurrent builders: the last rename wins
        tmp_out = Path(tmp) / program
        proc = subprocess.run(command(variant, plants, tmp_out, program), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the emulated CUDA kernel ({variant}, plants {list(plants)}) failed:\n"
                               f"{' '.join(command(variant, plants, tmp_out, program))}\n{proc.stderr[-6000:]}")
        os.replace(tmp_out, path)
    return path


def default_variant() -> str:
    """FUSED_MOE_OPS_EMU_BUILD=sanitized|plain (default sanitized: what CI runs)."""
    v = os.environ.get("FUSED_MOE_OPS_EMU_BUILD", "sanitized")
    if v not in VARIANTS:
        raise ValueError(f"FUSED_MOE_OPS_EMU_BUILD must be one of {sorted(VARIANTS)}, got {v!r}")
    return v
