"""The native build: the CUDA sources compile and register, and the build cache behaves.

On a machine with a CUDA torch and nvcc but no GPU (CI, the development machine) the CUDA
kernel cannot run, but it must compile, load and register for the CUDA dispatch key. With
CI=true that test must run, not skip: a CI machine without the toolkit is a broken CI machine.
"""
import os
import subprocess
import sys

import pytest
import torch

import fused_moe_ops
from fused_moe_ops import _build, _registry

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _kernel_registered(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("moe::shuffle_mul_sum", key)


def test_cpu_kernel_is_the_native_one():
    result = _build.RESULTS["cpu"]
    assert result.ok, f"CPU build failed: {result.error or result.skipped}"
    assert _registry.ACTIVE["cpu"] == "cpp"
    assert _kernel_registered("CPU")
    # The CPU registration comes from our C++ source, not from a Python fallback.
    assert "shuffle_mul_sum_cpu.cpp" in torch._C._dispatch_dump("moe::shuffle_mul_sum")


def test_cuda_sources_compile_and_register():
    why_not = _build.cuda_build_possible()
    if why_not is not None:
        if IN_CI:
            pytest.fail(f"CI must compile the CUDA sources, but: {why_not}")
        pytest.skip(why_not)
    result = _build.RESULTS.get("cuda") or _build.build_cuda()
    assert result.ok, f"CUDA build failed:\n{result.error}"
    assert os.path.isfile(result.library)
    assert _registry.ACTIVE["cuda"] == "cuda"
    assert _kernel_registered("CUDA")
    dump = torch._C._dispatch_dump("moe::shuffle_mul_sum")
    assert "shuffle_mul_sum_cuda.cu" in dump, dump
    # Both overloads are served by the CUDA library.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("moe::shuffle_mul_sum.out", "CUDA")


def test_cuda_library_targets_sm80_and_sm90_with_ptx():
    result = _build.RESULTS.get("cuda")
    if result is None or not result.ok:
        if IN_CI and _build.cuda_build_possible() is None:
            pytest.fail("CUDA library missing in CI")
        pytest.skip("no CUDA build here")
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("TORCH_CUDA_ARCH_LIST overrides the default targets")
    # Machine code for A100-class and H100/H200, PTX so newer GPUs (Blackwell) JIT it.
    assert _build.fatbin_targets(result.library) == ["sm_80", "sm_90", "compute_90"]


def test_second_process_finds_the_cached_build():
    # A fresh process must load the libraries from the cache without compiling again.
    code = (
        "import fused_moe_ops; from fused_moe_ops import _build; "
        "print({k: (r.ok, r.built_now) for k, r in _build.RESULTS.items()})"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "compiling" not in proc.stderr, proc.stderr
    assert "'cpu': (True, False)" in proc.stdout, proc.stdout


def test_build_dir_changes_when_sources_change(tmp_path):
    src = _build.csrc_dir() / "shuffle_mul_sum_cpu.cpp"
    flags = _build.cpu_flags(_build.cpu_isa())
    tag = _build._tag("cpu", [src], flags)
    assert tag == _build._tag("cpu", [src], flags)  # deterministic
    copy = tmp_path / "shuffle_mul_sum_cpu.cpp"
    copy.write_bytes(src.read_bytes() + b"\n// changed\n")
    assert _build._tag("cpu", [copy], flags) != tag
    assert _build._tag("cpu", [src], flags + ["-DX"]) != tag


def test_build_module_runs_ahead_of_time():
    proc = subprocess.run([sys.executable, "-m", "fused_moe_ops.build", "--cpu-only"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("cpu   ok"), proc.stdout
