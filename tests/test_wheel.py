"""The prebuilt wheel: one cp310-abi3 wheel, its kernels on torch's stable ABI, installed into a clean
virtual environment with no compiler reachable and an empty build cache, serves the op from the
compiled kernels inside it and builds nothing, under any torch from 2.10 on.

Needs the wheel: FUSED_MOE_OPS_WHEEL=dist/fused_moe_ops-*.whl (.ci/run builds it once, with
`pip wheel . --no-deps --no-build-isolation -w dist/` against torch 2.14.1, and runs this file once per
clean venv: torch 2.14.1 and torch 2.13.0). Without it the tests skip. The clean environment is
FUSED_MOE_OPS_WHEEL_VENV (a fresh venv with only torch in it: any version the wheel allows), or
else a new venv with the torch this process runs, from the package index; then the wheel goes in;
every check runs there with PATH holding
no compiler and no ninja, CC/CXX=/bin/false, HOME and FUSED_MOE_OPS_CACHE empty temporary
directories, and a working directory outside the checkout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

WHEEL = os.environ.get("FUSED_MOE_OPS_WHEEL")
TOOLS = ("gcc", "g++", "c++", "cc", "clang", "nvcc", "ninja")

if not WHEEL:
    # The README's test command runs before .ci/run has built the wheel; .ci/run then runs this file
    # with the wheel and fails if any of it fails.
    pytest.skip("FUSED_MOE_OPS_WHEEL=path/to/wheel not set (.ci/run sets it after building the wheel)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def wheel() -> Path:
    path = Path(WHEEL).resolve()
    assert path.is_file(), f"FUSED_MOE_OPS_WHEEL={WHEEL} is not a file"
    return path


@pytest.fixture(scope="module")
def clean(tmp_path_factory, wheel):
    """(python, env, site-packages package dir, cache dir) of a fresh venv with torch and the wheel."""
    root = tmp_path_factory.mktemp("clean")
    prepared = os.environ.get("FUSED_MOE_OPS_WHEEL_VENV")
    if prepared:  # .ci/run creates it (with torch only) while the JIT suite runs
        venv = Path(prepared)
        python = venv / "bin" / "python"
        probe = subprocess.run([str(python), "-c", "import importlib.util as u; "
                                "print(u.find_spec('fused_moe_ops') is None)"], capture_output=True, text=True,
                               cwd=str(root), timeout=300)
        assert probe.stdout.strip() == "True", f"FUSED_MOE_OPS_WHEEL_VENV={prepared} is not clean: {probe}"
        installs = [[str(wheel)]]
    else:
        venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=600)
        python = venv / "bin" / "python"
        installs = [["torch==" + torch.__version__.split("+")[0]], [str(wheel)]]
    for args in installs:
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                              timeout=1800)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    empty_bin, home, cache, work = (root / d for d in ("bin", "home", "cache", "work"))
    for d in (empty_bin, home, cache, work):
        d.mkdir()
    env = {
        "PATH": str(empty_bin),  # no compiler, no ninja (not even the venv's): python is called by path
        "HOME": str(home),
        "CC": "/bin/false",
        "CXX": "/bin/false",
        "CUDA_HOME": str(root / "no-cuda-toolkit"),
        "FUSED_MOE_OPS_CACHE": str(cache),
        "LANG": "C.UTF-8",
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
    }
    package = subprocess.run([str(python), "-c", "import importlib.util as u; "
                              "print(u.find_spec('fused_moe_ops').submodule_search_locations[0])"],
                             capture_output=True, text=True, env=env, cwd=str(work), timeout=300)
    assert package.returncode == 0, package.stderr
    return python, env, Path(package.stdout.strip()), cache, work


def _run(clean, args, **extra_env):
    python, env, _, _, work = clean
    proc = subprocess.run([str(python), *args], capture_output=True, text=True, timeout=900, cwd=str(work),
                          env=dict(env, **extra_env))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _report(clean, **extra_env) -> dict:
    return json.loads(_run(clean, ["-m", "fused_moe_ops", "--json"], **extra_env).stdout)


def _venv_torch(clean) -> dict:
    out = _run(clean, ["-c", "import json, torch; print(json.dumps({'version': torch.__version__, "
                             "'cuda': torch.version.cuda}))"])
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_wheel_is_abi3_and_requires_torch_2_10(wheel):
    """One wheel for CPython >= 3.10 and torch >= 2.10: the libraries use no Python API (abi3) and
    only torch's stable ABI, compiled for 2.10."""
    assert "-cp310-abi3-" in wheel.name, wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    libs = [n for n in names if n.startswith("fused_moe_ops/_C_") and n.endswith(".so")]
    assert "fused_moe_ops/_C_cpu.abi3.so" in libs, libs
    assert "fused_moe_ops/_prebuilt.json" in names
    assert "fused_moe_ops/csrc/shuffle_mul_sum_cpu.cpp" in names  # the JIT path where the library cannot serve
    manifest = json.loads(zipfile.ZipFile(wheel).read("fused_moe_ops/_prebuilt.json"))
    assert manifest["min_torch"] == "2.10"
    assert manifest["libraries"]["cpu"]["isas"] == ["DEFAULT", "AVX2", "AVX512"]
    assert "-DTORCH_TARGET_VERSION=0x020a000000000000" in manifest["libraries"]["cpu"]["flags"]
    if torch.version.cuda:  # a CUDA torch with nvcc (the CI machine) must give a wheel with the CUDA kernel
        assert "fused_moe_ops/_C_cuda.abi3.so" in libs, (libs, manifest.get("not_built"))
        assert manifest["libraries"]["cuda"]["cuda"].split(".")[0] == torch.version.cuda.split(".")[0]
    metadata = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    metadata = metadata.split("\n\n", 1)[0]  # the headers, not the README after them
    assert "Requires-Dist: torch>=2.10" in metadata, metadata
    assert "Requires-Dist: torch==" not in metadata, metadata
    print(f"wheel {wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB, built with torch {manifest['built_with_torch']}")


def test_no_compiler_reachable(clean):
    out = _run(clean, ["-c", f"import shutil, json; print(json.dumps([shutil.which(t) for t in {TOOLS!r}]))"])
    assert json.loads(out.stdout) == [None] * len(TOOLS)


def test_installed_wheel_uses_its_compiled_kernel_and_builds_nothing(clean):
    _, _, package, cache, _ = clean
    info = _report(clean)
    cpu = info["builds"]["cpu"]
    assert info["active"]["cpu"] == "cpp", info
    assert cpu["state"] == "ok" and cpu["built_now"] is False and cpu["origin"] == "wheel", cpu
    assert Path(cpu["library"]).parent == package, cpu["library"]
    assert Path(info["package"]["path"]) == package
    assert info["dispatcher"]["cpu"].split(":")[0].endswith("shuffle_mul_sum_cpu.cpp")
    assert list(cache.iterdir()) == [], "the wheel's import wrote to the JIT build cache"
    assert info["builds"]["cuda"]["built_now"] is False


SMOKE = r"""
import json, os, sys
import torch
import fused_moe_ops
from fused_moe_ops import build as _build

def combine64(x, perm, w):
    m, topk = w.shape
    rows = x.double()[perm.clamp(min=0)] * (perm >= 0).double().unsqueeze(1)
    return (rows.view(m, topk, -1) * w.double().view(m, topk, 1)).sum(1), \
           (rows.abs().view(m, topk, -1) * w.double().abs().view(m, topk, 1)).sum(1)

U = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
TINY = {torch.float32: 2.0 ** -149, torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133}
g = torch.Generator().manual_seed(int(os.environ.get("SEED", "0")))
worst = 0.0
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for m, topk, k in ((7, 6, 4097), (1, 2, 7168), (33, 8, 64), (5, 3, 1), (64, 4, 300)):
        r = m * topk // 2 + 1  # fewer rows than slots: duplicates
        x = torch.randn(r, k, generator=g).to(dtype)
        perm = torch.randint(-1, r, (m * topk,), generator=g)  # -1: no contribution
        w = torch.rand(m, topk, generator=g) * 1.5 - 0.25
        ref, s = combine64(x, perm, w.to(dtype))
        bound = (topk + 2) * 2.0 ** -24 * s + 2.0 ** -24 * ref.abs() + U[dtype] * ref.abs() * 1.01 + TINY[dtype] + TINY[torch.float32]
        # The functional form, the out= form into a NaN-poisoned buffer (its overlap checks) and into a
        # transposed one (a dense temporary, then aten::copy_ through the dispatcher), and a strided input.
        dense_out = torch.full((m, k), float("nan"), dtype=dtype)
        t_out = torch.full((k, m), float("nan"), dtype=dtype).t()
        results = [torch.ops.moe.shuffle_mul_sum(x, perm, w.to(dtype)),
                   torch.ops.moe.shuffle_mul_sum.out(x, perm, w.to(dtype), out=dense_out),
                   torch.ops.moe.shuffle_mul_sum.out(x, perm, w.to(dtype), out=t_out),
                   torch.ops.moe.shuffle_mul_sum(x.t().contiguous().t(), perm, w.to(dtype))]
        for out in results:
            err = ((out.double() - ref).abs() / bound).max().item()
            worst = max(worst, err if err == err else float("inf"))  # a NaN left in out fails
r = _build.RESULTS["cpu"]
print(json.dumps({"worst_err_over_bound": worst, "isa": r.isa, "origin": r.origin,
                  "torch_capability": torch.backends.cpu.get_cpu_capability()}))
"""


@pytest.mark.parametrize("capability", [None, "avx2", "default"])
def test_kernel_copy_for_each_isa_matches_the_reference(clean, capability):
    """One library, three copies of the kernel: the one torch's CPU capability names is the one that
    runs (ATEN_CPU_CAPABILITY=avx2 forces the AVX2 copy on an AVX-512 host), and each is correct."""
    extra = {"ATEN_CPU_CAPABILITY": capability} if capability else {}
    info = json.loads(_run(clean, ["-c", SMOKE], **extra).stdout.strip().splitlines()[-1])
    assert info["origin"] == "wheel"
    expected = info["torch_capability"] if info["torch_capability"] in ("AVX2", "AVX512") else "DEFAULT"
    assert info["isa"] == expected, info
    if capability:
        assert info["isa"] == capability.upper(), info
    assert info["worst_err_over_bound"] <= 1.0, info


FUSION = r"""
import json, torch, fused_moe_ops

def combine(c2, c_map, topk_weights, m: int, topk: int, k: int):
    return (c2[c_map].view(m, topk, k) * topk_weights.view(m, topk, 1).to(c2.dtype)).sum(dim=1)

g = torch.Generator().manual_seed(1)
m, topk, k = 16, 4, 96
c2 = torch.randn(m * topk, k, generator=g)
c_map = torch.randperm(m * topk, generator=g)
w = torch.rand(m, topk, generator=g)
out = torch.compile(combine, fullgraph=True)(c2, c_map, w, m, topk, k)
ok = torch.allclose(out, combine(c2, c_map, w, m, topk, k), rtol=1e-5, atol=1e-5)
# The token count dynamic: one compile for two token counts (this torch's custom-op lowering).
dynamic = torch.compile(combine, dynamic=True, fullgraph=True)
for mm in (16, 9):
    args = (torch.randn(mm * topk, k, generator=g), torch.randperm(mm * topk, generator=g),
            torch.rand(mm, topk, generator=g), mm, topk, k)
    ok = ok and torch.allclose(dynamic(*args), combine(*args), rtol=1e-5, atol=1e-5)
r = fused_moe_ops.build.RESULTS["cpu"]
print(json.dumps({"stats": fused_moe_ops.fusion_stats(), "close": bool(ok), "origin": r.origin,
                  "built_now": r.built_now}))
"""


def test_fusion_pass_fires_with_the_installed_wheel(clean):
    """torch.compile of the README's seed line is rewritten (static, and with the token count dynamic)
    and gives eager's result. Inductor itself compiles C++
    for CPU graphs (it checks for a compiler before it schedules anything), so this one check sees
    the system compiler; fused_moe_ops still builds nothing (the JIT cache stays empty)."""
    _, _, _, cache, _ = clean
    info = json.loads(_run(clean, ["-c", FUSION], PATH="/usr/bin:/bin", CXX="g++", CC="gcc")
                      .stdout.strip().splitlines()[-1])
    assert info["stats"]["rewrites"] >= 1, info
    assert info["close"]
    assert info["origin"] == "wheel" and not info["built_now"], info
    assert list(cache.iterdir()) == []


def test_cuda_library_in_the_wheel_loads_without_a_toolkit(clean, wheel):
    _, _, package, cache, _ = clean
    manifest = json.loads(zipfile.ZipFile(wheel).read("fused_moe_ops/_prebuilt.json"))
    if "cuda" not in manifest["libraries"]:
        pytest.skip("no CUDA library in the wheel (built against a CPU-only torch)")
    venv_cuda = _venv_torch(clean)["cuda"]
    if not venv_cuda or venv_cuda.split(".")[0] != manifest["libraries"]["cuda"]["cuda"].split(".")[0]:
        pytest.skip(f"the clean venv's torch is not a CUDA {manifest['libraries']['cuda']['cuda']} build "
                    f"(torch.version.cuda = {venv_cuda}): the wheel's CUDA library does not serve it")
    info = _report(clean, FUSED_MOE_OPS_BUILD_CUDA="1")
    cuda = info["builds"]["cuda"]
    assert cuda["state"] == "ok" and cuda["origin"] == "wheel" and cuda["built_now"] is False, cuda
    assert Path(cuda["library"]).parent == package
    assert info["active"]["cuda"] == "cuda"
    assert list(cache.iterdir()) == []
    targets = _run(clean, ["-c", "import sys; from fused_moe_ops import build as _build; "
                                 f"print(_build.fatbin_targets({cuda['library']!r}))"]).stdout.strip()
    assert targets == "['sm_80', 'sm_90', 'compute_90']"


def test_library_for_a_newer_torch_is_not_loaded(clean, tmp_path):
    """The stable ABI holds forward only: a library whose manifest names a newer minimum torch than
    the installed one is not loaded (it may call shims this torch lacks) and the JIT build takes
    over: here, with no compiler, the reference fallback, with the reason in the report."""
    _, _, package, _, _ = clean
    manifest_path = package / "_prebuilt.json"
    original = manifest_path.read_text()
    manifest = json.loads(original)
    manifest["min_torch"] = "99.0"
    manifest_path.write_text(json.dumps(manifest))
    try:
        info = _report(clean, FUSED_MOE_OPS_CACHE=str(tmp_path / "cache"))  # the JIT attempt's build dir
    finally:
        manifest_path.write_text(original)
    cpu = info["builds"]["cpu"]
    assert cpu["origin"] != "wheel" and "needs torch >= 99.0" in (cpu["note"] or ""), cpu
    assert info["active"]["cpu"] == "reference"


AOTI = r"""
import json, os, sys, torch, fused_moe_ops

class Combine(torch.nn.Module):
    def forward(self, x, perm, w):
        return torch.ops.moe.shuffle_mul_sum(x, perm, w) * 2.0

g = torch.Generator().manual_seed(2)
x, perm, w = torch.randn(24, 80, generator=g), torch.randperm(24, generator=g), torch.rand(6, 4, generator=g)
ep = torch.export.export(Combine(), (x, perm, w))
path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(sys.argv[1], "combine.pt2"))
runner = torch._inductor.aoti_load_package(path)
got = runner(x, perm, w)
want = fused_moe_ops.reference.shuffle_mul_sum_reference(x, perm, w) * 2.0
r = fused_moe_ops.build.RESULTS["cpu"]
print(json.dumps({"close": bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5)), "origin": r.origin,
                  "torch": torch.__version__}))
"""


def test_aoti_package_calls_the_wheel_kernel(clean, tmp_path):
    """AOTInductor compiles a graph holding the op into a package and runs it, the op served by the
    wheel's library (the generated C++ calls it through the dispatcher). AOTInductor compiles C++
    itself, so this check sees the system compiler; fused_moe_ops still builds nothing."""
    _, _, _, cache, _ = clean
    out = _run(clean, ["-c", AOTI, str(tmp_path)], PATH="/usr/bin:/bin", CXX="g++", CC="gcc")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["close"] and info["origin"] == "wheel", info
    assert list(cache.iterdir()) == []
