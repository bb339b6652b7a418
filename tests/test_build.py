"""The native build: the CUDA sources compile and register, and the JIT build cache behaves.

On a machine with a CUDA torch and nvcc but no GPU (CI, the development machine) the CUDA
kernel cannot run, and `import fused_moe_ops` does not build it there; but it must compile, load
and register for the CUDA dispatch key when asked (FUSED_MOE_OPS_BUILD_CUDA=1, `python -m
fused_moe_ops.build --cuda`). With CI=true that test must run, not skip: a CI machine without the
toolkit is a broken CI machine.

The cache: a finished build is loaded without ninja or torch.utils.cpp_extension; two checkouts
with the same sources share one build and never rebuild each other; concurrent first imports (the
ranks of one job) build once.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fused_moe_ops
from fused_moe_ops import _registry, build as _build

# One xdist worker runs this whole file, in order: its tests compare the shared build cache's files
# before and after, and build into it.
pytestmark = pytest.mark.xdist_group("build_cache")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("torch._inductor", "torch._dynamo", "triton", "setuptools", "torch.utils.cpp_extension")


def _kernel_registered(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("moe::shuffle_mul_sum", key)


def _python(code: str, *, cwd=None, env=None, timeout=900) -> subprocess.CompletedProcess:
    full_env = dict(os.environ if env is None else env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=full_env)


def _last_json(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cpu_kernel_is_the_native_one():
    result = _build.RESULTS["cpu"]
    assert result.ok, f"CPU build failed: {result.error or result.skipped}"
    assert _registry.ACTIVE["cpu"] == "cpp"
    assert _kernel_registered("CPU")
    # The CPU registration comes from our C++ source, not from a Python fallback.
    assert "shuffle_mul_sum_cpu.cpp" in torch._C._dispatch_dump("moe::shuffle_mul_sum")
    # The library says which copy of the kernel it runs: the host's widest, unless capped.
    if not os.environ.get("ATEN_CPU_CAPABILITY"):
        assert result.isa == _build.cpu_isa().upper()


def _undefined_symbols(library: str):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm here")
    out = subprocess.run([nm, "-D", "--undefined-only", library], capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


def test_cpu_library_uses_only_the_stable_abi():
    """What makes one build serve every torch from 2.10 on: the library calls torch only through its
    C shim (aoti_torch_*, torch_*), never a C++ symbol of libtorch / c10 (whose ABI changes with
    every release), and it was compiled for torch 2.10's stable ABI."""
    result = _build.RESULTS["cpu"]
    assert "-DTORCH_TARGET_VERSION=0x020a000000000000" in result.flags
    torch_cxx = [s for s in _undefined_symbols(result.library) if s.startswith(("_ZN3c10", "_ZN2at", "_ZN5torch"))]
    assert torch_cxx == [], torch_cxx[:20]
    shims = [s for s in _undefined_symbols(result.library) if s.startswith(("aoti_torch_", "torch_"))]
    assert "torch_parallel_for" in shims and "aoti_torch_empty_strided" in shims, shims


ISA_PROBE = """
    import json, torch, fused_moe_ops
    from fused_moe_ops import build as _build
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for m, topk, k in ((5, 3, 97), (2, 8, 4160), (1, 2, 64)):
            x = torch.randn(m * topk + 3, k, generator=g).to(dtype)
            p = torch.randint(-1, m * topk + 3, (m * topk,), generator=g)
            w = torch.rand(m, topk, generator=g).to(dtype)
            got = torch.ops.moe.shuffle_mul_sum(x, p, w).double()
            rows = x.double()[p.clamp(min=0)] * (p >= 0).double().unsqueeze(1)  # float64 reference
            want = (rows.view(m, topk, k) * w.double().view(m, topk, 1)).sum(1)
            worst = max(worst, ((got - want).abs() / (want.abs() + 1e-3)).max().item())
    print(json.dumps({"isa": _build.RESULTS["cpu"].isa, "worst_rel": worst}))
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_aten_cpu_capability_caps_the_kernel_copy(capability):
    """One library, one copy per ISA: ATEN_CPU_CAPABILITY picks a narrower one (as it does for ATen's
    own kernels), and that copy is correct too (a float32 accumulator: rounding of the output only)."""
    if _build.cpu_isa() == "default" and capability != "default":
        pytest.skip("this CPU has no AVX2")
    info = _last_json(_python(ISA_PROBE, cwd=str(ROOT), env=dict(os.environ, ATEN_CPU_CAPABILITY=capability)))
    assert info["isa"] == capability.upper(), info
    assert info["worst_rel"] < 2 ** -7, info


PREFETCH_PROBE = """
    import hashlib, json, torch, fused_moe_ops
    from fused_moe_ops import build as _build
    g = torch.Generator().manual_seed(1)
    digest, worst = hashlib.sha256(), 0.0
    # topk 8 rows, K off the tile: tiles of <= 1024 bytes, the ones the row prefetch serves.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        m, topk, k, rows = 6, 8, 4160, 40
        x = torch.randn(rows, k, generator=g).to(dtype)
        p = torch.randint(-1, rows, (m * topk,), generator=g)
        w = torch.rand(m, topk, generator=g)
        got = torch.ops.moe.shuffle_mul_sum(x, p, w)
        digest.update(got.view(torch.int16 if got.element_size() == 2 else torch.int32).numpy().tobytes())
        ref = (x.double()[p.clamp(min=0)] * (p >= 0).double().unsqueeze(1)).view(m, topk, k)
        ref = (ref * w.double().view(m, topk, 1)).sum(1)
        worst = max(worst, ((got.double() - ref).abs() / (ref.abs() + 1e-3)).max().item())
    r = _build.RESULTS["cpu"]
    print(json.dumps({"isa": r.isa, "row_prefetch": r.row_prefetch, "digest": digest.hexdigest(), "worst_rel": worst}))
"""


def _cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def test_row_prefetch_is_chosen_at_load_and_overridable():
    """The software row prefetch is off in the AVX2 copy on AMD CPUs (where it was measured to slow
    the kernel down) and on elsewhere; FUSED_MOE_OPS_CPU_PREFETCH=0 / 1 overrides. It changes
    speed only: the outputs are the same bits either way, and right."""
    env = {k: v for k, v in os.environ.items() if k != "FUSED_MOE_OPS_CPU_PREFETCH"}
    runs = {setting: _last_json(_python(PREFETCH_PROBE, cwd=str(ROOT),
                                        env=env if setting is None else dict(env, FUSED_MOE_OPS_CPU_PREFETCH=setting)))
            for setting in (None, "0", "1")}
    isa = runs[None]["isa"]
    assert runs[None]["row_prefetch"] is not (isa == "AVX2" and _cpu_vendor() == "AuthenticAMD"), runs
    assert runs["0"]["row_prefetch"] is False and runs["1"]["row_prefetch"] is True, runs
    assert len({r["digest"] for r in runs.values()}) == 1, runs
    assert all(r["worst_rel"] < 2 ** -7 for r in runs.values()), runs
    # Any other value is ignored, and said so.
    bad = _python(PREFETCH_PROBE, cwd=str(ROOT), env=dict(env, FUSED_MOE_OPS_CPU_PREFETCH="yes"))
    assert _last_json(bad)["row_prefetch"] is runs[None]["row_prefetch"], bad.stdout
    assert "FUSED_MOE_OPS_CPU_PREFETCH must be 0 (off) or 1 (on), got 'yes'" in bad.stderr, bad.stderr


CONVERSION_PROBE = """
    import json, torch, fused_moe_ops
    from fused_moe_ops import build as _build
    bad = {}
    def same(got, want):  # bit for bit, any NaN matching any NaN
        g, w = got.float(), want.float()
        ok = (g == w) | (g.isnan() & w.isnan())
        return int((~ok).sum())
    # Loads: every 16-bit pattern, as a row read with factor 1 into float32 (the kernel's float32
    # accumulator starts at +0, so -0 reads as +0: eager's sum gives the same).
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 4096)
        p = torch.arange(x.shape[0])
        w = torch.ones(x.shape[0], 1)
        got = torch.ops.moe.shuffle_mul_sum(x, p, w, torch.float32)
        bad[f"load {dtype}"] = same(got, x.float() + 0.0)
    # Stores: float32 values at every rounding boundary of both 16-bit types (ties to even, both
    # sides of each), subnormals, overflow to inf, inf, NaN, signed zeros.
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    edges = []
    for dtype in (torch.float16, torch.bfloat16):
        v = halves.view(dtype).float()
        nxt = torch.nextafter(v, torch.full_like(v, float("inf")))
        mid = (v.double() + nxt.double()) / 2
        for t in (mid, torch.nextafter(mid.float(), torch.zeros_like(v)).double(), mid + mid.abs() * 2 ** -30):
            edges.append(t.float())
        edges.append(v)
    edges.append(torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e30, -1e30, 3.4e38, float("inf"),
                               float("-inf"), float("nan"), 2 ** -24, 2 ** -25, 1.5 * 2 ** -25, 2 ** -149, 1e-40]))
    y = torch.cat(edges).nan_to_num(nan=float("nan"))
    y = torch.cat([y, torch.zeros((-y.numel()) % 1024)]).reshape(-1, 1024)
    p = torch.arange(y.shape[0])
    w = torch.ones(y.shape[0], 1)
    for dtype in (torch.float16, torch.bfloat16):
        got = torch.ops.moe.shuffle_mul_sum(y, p, w, dtype)
        bad[f"store {dtype}"] = same(got, (y + 0.0).to(dtype))
    print(json.dumps({"isa": _build.RESULTS["cpu"].isa, "mismatches": bad}))
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "host_widest"])
def test_kernel_copy_converts_16_bit_types_bit_exactly(capability):
    """Each copy's float16 / bfloat16 conversions (the baseline copy's are its own bit arithmetic) give
    torch's bits: every 16-bit pattern loaded, every rounding boundary stored."""
    env = dict(os.environ)
    if capability == "host_widest":
        env.pop("ATEN_CPU_CAPABILITY", None)
    elif _build.cpu_isa() == "default" and capability != "default":
        pytest.skip("this CPU has no AVX2")
    else:
        env["ATEN_CPU_CAPABILITY"] = capability
    info = _last_json(_python(CONVERSION_PROBE, cwd=str(ROOT), env=env))
    if capability != "host_widest":
        assert info["isa"] == capability.upper(), info
    assert all(n == 0 for n in info["mismatches"].values()), info


@pytest.mark.parametrize("target", ["host_baseline_copy", "aarch64_under_qemu"])
def test_kernel_probe_runs_the_baseline_copy_without_torch(target):
    """scripts/cross_arch/check.sh: the CPU kernel's translation unit built without torch and run,
    its baseline copy (the one every aarch64 CPU runs) checked bit for bit on the 16-bit conversions
    and against a float64 reference on random combines. Here on the host (so the probe keeps
    compiling against the kernel), and for aarch64 under qemu-user where the cross toolchain is."""
    env = dict(os.environ, PYTHON=sys.executable)
    if target == "aarch64_under_qemu":
        if not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")):
            pytest.skip("needs g++-aarch64-linux-gnu and qemu-user (apt)")
        args = []
    else:
        if shutil.which("g++") is None:
            pytest.skip("needs g++")
        args = ["--host"]
        env["ATEN_CPU_CAPABILITY"] = "default"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "cross_arch" / "check.sh"), *args], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("kernel copy: DEFAULT") == 2, proc.stdout
    assert proc.stdout.count("all checks passed") == 2, proc.stdout


# --- CUDA: compiled on request, here without a GPU ------------------------------------------------

CUDA_PROBE = """
    import json, torch, fused_moe_ops
    from fused_moe_ops import _registry, build as _build
    r = _build.RESULTS["cuda"]
    print(json.dumps({"ok": r.ok, "error": r.error, "skipped": r.skipped, "library": r.library,
                      "active": _registry.ACTIVE.get("cuda"),
                      "dump": torch._C._dispatch_dump("moe::shuffle_mul_sum"),
                      "out_has_cuda": torch._C._dispatch_has_kernel_for_dispatch_key("moe::shuffle_mul_sum.out",
                                                                                     "CUDA"),
                      "scatter_active": _registry.SCATTER_ACTIVE.get("cuda"),
                      "scatter_dumps": [torch._C._dispatch_dump(f"moe::{op}")
                                        for op in ("scatter_mul_sum", "_scatter_mul_sum_fused")]}))
"""


@pytest.fixture(scope="module")
def cuda_build():
    """`python -m fused_moe_ops.build --cuda` (compiles the CUDA kernel here if the cache lacks it), then
    what a fresh process with FUSED_MOE_OPS_BUILD_CUDA=1 loads."""
    why_not = _build.cuda_build_possible()
    if why_not is not None:
        if IN_CI:
            pytest.fail(f"CI must compile the CUDA sources, but: {why_not}")
        pytest.skip(why_not)
    build = subprocess.run([sys.executable, "-m", "fused_moe_ops.build", "--cuda"], capture_output=True,
                           text=True, timeout=1800, cwd=str(ROOT))
    probe = _python(CUDA_PROBE, cwd=str(ROOT), env=dict(os.environ, FUSED_MOE_OPS_BUILD_CUDA="1"))
    return build, _last_json(probe)


def test_cuda_sources_compile_and_register(cuda_build):
    build, info = cuda_build
    assert build.returncode == 0, build.stdout + build.stderr
    assert "cuda  ok" in build.stdout, build.stdout
    assert info["ok"], f"CUDA build failed:\n{info['error'] or info['skipped']}"
    assert os.path.isfile(info["library"])
    assert info["active"] == "cuda"
    assert "shuffle_mul_sum_cuda.cu" in info["dump"], info["dump"]
    # Both overloads are served by the CUDA library.
    assert info["out_has_cuda"]
    # The scatter form too, by the same library (not the reference of the fallbacks).
    assert info["scatter_active"] == "cuda"
    for dump in info["scatter_dumps"]:
        cuda_line = next(line for line in dump.splitlines() if line.startswith("CUDA:"))
        assert "shuffle_mul_sum_cuda.cu" in cuda_line, dump


def test_cuda_library_targets_sm80_and_sm90_with_ptx(cuda_build):
    _, info = cuda_build
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("TORCH_CUDA_ARCH_LIST overrides the default targets")
    # Machine code for A100-class and H100/H200, PTX so newer GPUs (Blackwell) JIT it.
    assert _build.fatbin_targets(info["library"]) == ["sm_80", "sm_90", "compute_90"]


def test_cuda_build_searches_the_toolkits_headers_before_pips(cuda_build):
    """nvcc must see its own toolkit's cuda_runtime_api.h and CCCL: those of a pip "nvidia-*"
    package of a newer CUDA minor (torch 2.15's 13.2 beside nvcc 13.0) stop it with "CUDA compiler
    and CUDA toolkit headers are incompatible". No pip include directory comes before the toolkit's."""
    _, info = cuda_build
    ninja = (Path(info["library"]).parent / "build.ninja").read_text()
    cuda_cflags = next(line for line in ninja.splitlines() if line.startswith("cuda_cflags"))
    toolkit = os.path.join(_build.find_cuda_home(), "include")
    assert toolkit in cuda_cflags, cuda_cflags
    before_toolkit = cuda_cflags[:cuda_cflags.index(toolkit)]
    assert "site-packages/nvidia" not in before_toolkit, cuda_cflags


def _nvidia_include_with(header: str):
    try:
        import nvidia
    except ImportError:
        return None
    return next((inc for root in nvidia.__path__ for inc in sorted(Path(root).glob("*/include"))
                 if (inc / header).exists()), None)


def test_pip_cuda_headers_only_for_what_the_toolkit_lacks(tmp_path):
    from fused_moe_ops import _kernel_spec as spec

    pip_inc = _nvidia_include_with("cublas_v2.h")
    if pip_inc is None:
        pytest.skip("no pip nvidia-* package with cublas_v2.h here")
    toolkit = tmp_path / "cuda"
    (toolkit / "include").mkdir(parents=True)
    # The toolkit lacks cuBLAS: the pip directory is searched, as a system directory after torch's
    # -isystem of the toolkit (a -I would be dropped behind every -I by gcc, or come first).
    assert spec.cuda_pip_include_flags(str(toolkit), ("cublas_v2.h",)) == ["-isystem", str(pip_inc)]
    # The toolkit has it: the pip packages are not searched at all.
    (toolkit / "include" / "cublas_v2.h").write_text("")
    assert spec.cuda_pip_include_flags(str(toolkit), ("cublas_v2.h",)) == []
    # The kernel needs no header beyond the runtime's today: nothing from pip.
    assert spec.cuda_pip_include_flags(str(toolkit)) == []


MISMATCH_PROBE = """
    import json, torch
    torch.cuda.device_count = lambda: 1  # a GPU "visible": the import builds CUDA, Triton is the fallback
    import fused_moe_ops
    from fused_moe_ops import _registry, build as _build
    from fused_moe_ops.__main__ import collect, render
    r = _build.RESULTS["cuda"]
    print(json.dumps({"skipped": r.skipped, "error": r.error, "active": _registry.ACTIVE["cuda"],
                      "report": render(collect())}))
"""


def test_nvcc_of_another_cuda_major_is_named_and_triton_serves_cuda(tmp_path):
    """A toolkit whose CUDA major differs from torch's cannot build a library torch can load (it links
    libcudart.so of its own major): the build is skipped with one line naming both versions, the
    report shows that line, and CUDA tensors get the Triton kernel."""
    from fused_moe_ops import _kernel_spec as spec

    if torch.version.cuda is None:
        pytest.skip("torch is not a CUDA build")
    other = f"{int(torch.version.cuda.split('.')[0]) - 1}.8"
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")  # must not run: the versions decide
    (toolkit / "bin" / "nvcc").chmod(0o755)
    (toolkit / "version.json").write_text(json.dumps({"cuda_nvcc": {"version": f"{other}.93"}}))
    line = spec.cuda_major_mismatch(str(toolkit), torch.version.cuda)
    assert line == (f"nvcc {other} ({toolkit}) and torch's CUDA {torch.version.cuda} differ in major version; "
                    f"set CUDA_HOME to a CUDA {torch.version.cuda.split('.')[0]} toolkit")
    # This process's build cache: the CPU kernel loads from it, no compile.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_MOE_OPS_") or k == "FUSED_MOE_OPS_CACHE"}
    env.update(CUDA_HOME=str(toolkit), TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    info = _last_json(_python(MISMATCH_PROBE, cwd=str(ROOT), env=env))
    assert info["skipped"] == line and info["error"] is None, info
    assert info["active"] == "triton", info
    assert "\n" not in info["skipped"]
    assert f"skipped: {line}" in info["report"], info["report"]


def test_cuda_not_built_on_import_without_gpu():
    if torch.cuda.device_count() > 0:
        pytest.skip("a GPU is visible: import builds the CUDA kernel")
    r = _build.RESULTS["cuda"]
    assert not r.ok and r.skipped, r
    if r.skipped not in ("FUSED_MOE_OPS_NO_CUDA=1", "FUSED_MOE_OPS_NO_BUILD=1") and _build.cuda_build_possible() is None:
        assert r.skipped == _build.NO_GPU_REASON


# --- the cache --------------------------------------------------------------------------------

LOAD_PROBE = """
    import json, sys
    import fused_moe_ops
    from fused_moe_ops import build as _build
    r = _build.RESULTS["cpu"]
    print(json.dumps({"ok": r.ok, "built_now": r.built_now, "origin": r.origin, "library": r.library,
                      "build_dir": r.build_dir, "package": fused_moe_ops.__file__,
                      "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY_MODULES,)


def test_second_process_loads_the_cached_build_without_ninja():
    # A fresh process loads the library from the cache: no compile, no ninja run (nothing in the build
    # directory changes), no torch.utils.cpp_extension import.
    result = _build.RESULTS["cpu"]
    if result.origin == "wheel":
        pytest.skip("the package is an installed wheel: no JIT cache in use")
    before = {p: p.stat().st_mtime_ns for p in Path(result.build_dir).iterdir() if p.is_file()}
    info = _last_json(_python(LOAD_PROBE, cwd=str(ROOT)))
    assert info == dict(info, ok=True, built_now=False, origin="cache", library=result.library), info
    assert info["heavy"] == [], info
    after = {p: p.stat().st_mtime_ns for p in Path(result.build_dir).iterdir() if p.is_file()}
    assert after == before


def _checkout_copy(dest: Path) -> Path:
    """A second checkout: the package and csrc/ copied elsewhere (same contents, another path)."""
    shutil.copytree(ROOT / "fused_moe_ops", dest / "fused_moe_ops",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "_prebuilt.json"))
    shutil.copytree(ROOT / "csrc", dest / "csrc")
    return dest


def test_two_checkouts_share_one_build_and_never_rebuild_each_other(tmp_path):
    """The cache key is the content, and the build directory names no checkout: imports alternating
    between this checkout and two copies of it all load the one cached build."""
    result = _build.RESULTS["cpu"]
    if result.origin == "wheel":
        pytest.skip("the package is an installed wheel: no JIT cache in use")
    a, b = _checkout_copy(tmp_path / "a"), _checkout_copy(tmp_path / "b")
    ninja = Path(result.build_dir) / "build.ninja"
    ninja_before = ninja.read_bytes() if ninja.exists() else None
    for checkout in (a, b, a, b):
        env = dict(os.environ, PYTHONPATH=str(checkout))
        info = _last_json(_python(LOAD_PROBE, cwd=str(checkout), env=env))
        assert info["package"].startswith(str(checkout)), info
        assert info == dict(info, ok=True, built_now=False, origin="cache", library=result.library), info
    if ninja_before is not None:
        assert ninja.read_bytes() == ninja_before
        # It names the copies in the build directory, never a checkout's csrc/ (torch's include
        # directories, from whichever venv built it first, do not matter: same torch version).
        assert str(_build.csrc_dir()) not in ninja_before.decode(), "the ninja file names a checkout's sources"
        assert str(Path(result.build_dir) / "src") in ninja_before.decode()


def test_build_dir_changes_when_sources_change(tmp_path):
    src = _build.csrc_dir() / "shuffle_mul_sum_cpu.cpp"
    flags = _build.cpu_flags()
    tag = _build._tag("cpu", [src], flags)
    assert tag == _build._tag("cpu", [src], flags)  # deterministic
    copy = tmp_path / "shuffle_mul_sum_cpu.cpp"
    copy.write_bytes(src.read_bytes() + b"\n// changed\n")
    assert _build._tag("cpu", [copy], flags) != tag
    assert _build._tag("cpu", [src], flags + ["-DX"]) != tag
    # Same contents at another path: same tag.
    same = tmp_path / "same"
    same.mkdir()
    shutil.copyfile(src, same / src.name)
    assert _build._tag("cpu", [same / src.name], flags) == tag


RANK = """
    import sys, time
    from pathlib import Path
    from fused_moe_ops import build as _build
    build_dir, rank, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    (build_dir.parent / f"ready.{rank}").touch()
    while len(list(build_dir.parent.glob("ready.*"))) < n:  # start together, like the ranks of a job
        time.sleep(0.01)

    def build():
        with open(build_dir.parent / "builds.log", "a") as log:
            log.write(rank + "\\n")
        time.sleep(2.0)  # a build that takes a while: the others must wait, not start their own
        (build_dir / "lib.so").write_text("built by " + rank)

    ran = _build.build_once(build_dir, build)
    print(rank, ran, (build_dir / "lib.so").read_text())
"""


def test_concurrent_first_imports_build_once(tmp_path):
    """Eight processes reach an empty build directory at the same moment: one builds, the other seven
    wait on the lock and then find the finished build (the real kernel: see docs/BUILDING.md)."""
    n = 8
    build_dir = tmp_path / "cache" / "fused_moe_ops_cpu_test"
    build_dir.parent.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(RANK), str(build_dir), str(i), str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
             for i in range(n)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    builders = (tmp_path / "cache" / "builds.log").read_text().split()
    assert len(builders) == 1, builders
    lines = [out.split() for out, _ in outs]
    assert sum(line[1] == "True" for line in lines) == 1, lines
    assert all(" ".join(line[2:]) == f"built by {builders[0]}" for line in lines), lines


def test_failed_build_is_retried_not_marked_finished(tmp_path):
    build_dir = tmp_path / "b"

    def failing():
        raise RuntimeError("compiler failed")

    with pytest.raises(RuntimeError):
        _build.build_once(build_dir, failing)
    assert not (build_dir / "complete").exists()
    assert _build.build_once(build_dir, lambda: None) is True
    assert _build.build_once(build_dir, failing) is False  # finished: not run again


def test_build_module_runs_ahead_of_time():
    proc = subprocess.run([sys.executable, "-m", "fused_moe_ops.build", "--cpu-only"],
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("cpu   ok"), proc.stdout
