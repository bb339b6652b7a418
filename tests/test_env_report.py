"""``python -m fused_moe_ops``: the environment report tells the truth.

Each case runs the report in a fresh interpreter under one environment, and checks it against
facts gathered *without* the report's code in another fresh interpreter under the same
environment: the dispatcher's own record of where the op's CPU / CUDA kernels were registered
(a csrc/ file for native kernels, a Python file for the fallbacks), torch / triton versions, the
cache directory. Environments: as is (CUDA build attempted), FUSED_MOE_OPS_NO_CUDA=1,
FUSED_MOE_OPS_NO_BUILD=1, a forced compiler failure (fake $CXX, temporary cache), and the fusion
pass switched off.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()

FAKE_CXX_MESSAGE = "fakecc: error: forced compile failure (fused_moe_ops env-report test)"

TRUTH = r"""
import json, os, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fused_moe_ops
import torch
def registrations(op):
    reg = {}
    for line in torch._C._dispatch_dump(op).splitlines():
        key, sep, rest = line.partition(": registered at ")
        if sep and key in ("CPU", "CUDA"):
            reg[key.lower()] = rest.split(" :: ")[0].strip()
    return reg
reg = registrations("moe::shuffle_mul_sum")
reg_scatter = registrations("moe::scatter_mul_sum")
try:
    import triton
    tv = triton.__version__
except Exception:
    tv = None
# The op still works, whatever served it.
x = torch.randn(6, 3); p = torch.tensor([0, -1, 2, 5, 4, 1]); f = torch.rand(3, 2)
ref = fused_moe_ops.shuffle_mul_sum_reference(x, p, f, acc_dtype=torch.float64)
ok = bool(torch.allclose(torch.ops.moe.shuffle_mul_sum(x, p, f).double(), ref.double(), rtol=1e-5, atol=1e-6))
print(json.dumps({
    "registered": reg, "registered_scatter": reg_scatter,
    "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": tv,
    "op_ok": ok,
    "runtime_warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
}))
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_MOE_OPS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


def _run(args, env, timeout=900):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=str(ROOT))
    return proc


def _report(env, tmp_path):
    """(text report, json report, truth) for one environment."""
    out = tmp_path / "report.json"
    text = _run(["-m", "fused_moe_ops", "--json-out", str(out)], env)
    assert text.returncode == 0, f"report failed:\n{text.stdout}\n{text.stderr}"
    truth = _run(["-c", TRUTH], env)
    assert truth.returncode == 0, truth.stderr
    return text.stdout, json.loads(out.read_text()), json.loads(truth.stdout.strip().splitlines()[-1])


def _kind_of_registration(where: str) -> str:
    """What the dispatcher's file says about the kernel: cpp, cuda, or python (a fallback)."""
    if where.split(":")[0].endswith(".cpp"):
        return "cpp"
    if where.split(":")[0].endswith(".cu"):
        return "cuda"
    return "python"


def _kernel_row(text: str, device: str) -> str:
    rows = [line for line in text.splitlines() if line.strip().startswith(device + " ") and "kernel" not in line]
    assert rows, f"no {device} row in the kernel table:\n{text}"
    return rows[0]


def _check_common(text, info, truth):
    # Versions: as the child saw them.
    assert info["torch"] == truth["torch"] and f"torch         {truth['torch']}" in text
    assert info["triton"] == truth["triton"]
    if truth["triton"]:
        assert f"triton        {truth['triton']}" in text
    assert info["torch_cuda"] == truth["torch_cuda"]
    if truth["torch_cuda"]:
        assert f"CUDA {truth['torch_cuda']}" in text
    else:
        assert "CPU-only build" in text
    # Active kernels agree with the dispatcher (ground truth).
    for device in ("cpu", "cuda"):
        active = info["active"][device]
        reg = _kind_of_registration(truth["registered"][device])
        assert {"cpp": "cpp", "cuda": "cuda"}.get(active, "python") == reg, (device, active, truth["registered"])
        assert _kernel_row(text, device).split()[1] == active
    # Build table states.
    for device in ("cpu", "cuda"):
        b = info["builds"][device]
        row = _kernel_row(text, device)
        if b["state"] == "ok":
            assert Path(b["library"]).is_file() and b["library"] in row
        elif b["state"] == "skipped":
            assert f"skipped: {b['skipped']}" in row
        elif b["state"] == "failed":
            assert "FAILED" in row and f"Build error ({device})" in text
    assert truth["op_ok"]
    assert info["dispatcher"] == truth["registered"]
    # The scatter form: the C++ library serves it on CPU exactly when it serves the gather form.
    assert info["dispatcher_scatter"] == truth["registered_scatter"]
    scatter_cpu = info["active_scatter"]["cpu"]
    assert scatter_cpu == ("cpp" if info["active"]["cpu"] == "cpp" else "reference")
    assert _kind_of_registration(truth["registered_scatter"]["cpu"]) == ("cpp" if scatter_cpu == "cpp" else "python")
    assert f"Kernels for moe::scatter_mul_sum: cpu {scatter_cpu}, cuda {info['active_scatter']['cuda']}" in text


def test_report_default_environment(tmp_path):
    text, info, truth = _report(_env(), tmp_path)
    _check_common(text, info, truth)
    expected_root = Path.home() / ".cache" / "fused_moe_ops"
    assert info["cache"] == {"root": str(expected_root), "from_env": False}
    assert f"Build cache     {expected_root}" in text
    # Whatever the CUDA outcome, it is stated with its reason.
    cuda = info["builds"]["cuda"]
    if cuda["state"] != "ok":
        assert info["active"]["cuda"] != "cuda" and info["fallback_reasons"].get("cuda")
        reason = info["fallback_reasons"]["cuda"]
        if reason == f"CUDA kernel not built: {cuda['skipped']}":  # said once, in the kernel table's row
            assert f"skipped: {cuda['skipped']}" in _kernel_row(text, "cuda") and "fallback because" not in text
        else:
            assert f"cuda fallback because: {reason}" in text
    if info["builds"]["cpu"]["state"] == "ok":
        assert info["active"]["cpu"] == "cpp"
    assert info["fusion"]["installed"] and info["fusion"]["enabled"]
    assert "Fusion pass     installed" in text and "enabled" in text


def test_report_without_cuda_build(tmp_path):
    text, info, truth = _report(_env(FUSED_MOE_OPS_NO_CUDA="1"), tmp_path)
    _check_common(text, info, truth)
    assert info["builds"]["cuda"]["state"] == "skipped"
    assert info["builds"]["cuda"]["skipped"] == "FUSED_MOE_OPS_NO_CUDA=1"
    assert info["active"]["cuda"] in ("triton", "reference")
    assert _kind_of_registration(truth["registered"]["cuda"]) == "python"
    assert "skipped: FUSED_MOE_OPS_NO_CUDA=1" in _kernel_row(text, "cuda")
    assert "FUSED_MOE_OPS_NO_CUDA=1" in text.split("Environment", 1)[1]


def test_report_no_build_reference_fallback(tmp_path):
    text, info, truth = _report(_env(FUSED_MOE_OPS_NO_BUILD="1"), tmp_path)
    _check_common(text, info, truth)
    assert info["active"]["cpu"] == "reference"
    assert info["builds"]["cpu"] == dict(info["builds"]["cpu"], state="skipped", skipped="FUSED_MOE_OPS_NO_BUILD=1")
    assert info["builds"]["cuda"]["state"] == "skipped"
    assert _kind_of_registration(truth["registered"]["cpu"]) == "python"
    assert "cpu     reference  skipped: FUSED_MOE_OPS_NO_BUILD=1" in text
    # A deliberate skip is not a failure: no warning at import, nothing under "Build error".
    assert truth["runtime_warnings"] == [] or HAS_CUDA
    assert "Build error" not in text


def test_report_shows_compiler_message_of_failed_build(tmp_path):
    """A compiler that fails on every compile (but answers --version like the real one, so torch's
    compiler check passes): the CPU build fails; import still works with one warning; the report
    names the failure and prints the compiler's own message."""
    fake = tmp_path / "fakecc"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case " $* " in
          *" -c "*) echo "{FAKE_CXX_MESSAGE}" >&2; exit 1;;
        esac
        exec c++ "$@"
    """))
    fake.chmod(0o755)
    env = _env(CXX=str(fake), FUSED_MOE_OPS_CACHE=str(tmp_path / "cache"), FUSED_MOE_OPS_NO_CUDA="1")
    text, info, truth = _report(env, tmp_path)
    _check_common(text, info, truth)
    cpu = info["builds"]["cpu"]
    assert cpu["state"] == "failed" and FAKE_CXX_MESSAGE in cpu["error"]
    assert info["active"]["cpu"] == "reference"
    assert info["cache"] == {"root": str(tmp_path / "cache"), "from_env": True}
    row = _kernel_row(text, "cpu")
    assert row.split()[1] == "reference" and "FAILED" in row and FAKE_CXX_MESSAGE in row
    # The full message, compiler command line included, under "Build error (cpu)".
    tail = text.split("Build error (cpu)", 1)[1]
    assert FAKE_CXX_MESSAGE in tail and "shuffle_mul_sum_cpu.cpp" in tail
    # Import succeeded with exactly one RuntimeWarning, which points at the report.
    assert len(truth["runtime_warnings"]) == 1, truth["runtime_warnings"]
    assert "python -m fused_moe_ops" in truth["runtime_warnings"][0]
    # --strict turns the failed build into a non-zero exit.
    strict = _run(["-m", "fused_moe_ops", "--strict"], env)
    assert strict.returncode == 1, strict.stdout


def test_report_fusion_disabled_by_env(tmp_path):
    text, info, truth = _report(_env(FUSED_MOE_OPS_DISABLE_FUSION="1", FUSED_MOE_OPS_NO_CUDA="1"), tmp_path)
    _check_common(text, info, truth)
    assert info["fusion"]["available"] and not info["fusion"]["installed"]
    assert "available but NOT installed (FUSED_MOE_OPS_DISABLE_FUSION is set)" in text


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_report_forced_cuda_backend(backend, tmp_path):
    text, info, truth = _report(_env(FUSED_MOE_OPS_CUDA_BACKEND=backend, FUSED_MOE_OPS_NO_CUDA="1"), tmp_path)
    _check_common(text, info, truth)
    # Triton may be unusable here (no GPU): then the forced choice falls through to the reference.
    assert info["active"]["cuda"] in (backend, "reference")
    assert _kind_of_registration(truth["registered"]["cuda"]) == "python"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_report_with_gpu(tmp_path):
    text, info, truth = _report(_env(), tmp_path)
    _check_common(text, info, truth)
    dev = info["cuda_device"]
    assert dev["available"] and dev["name"] == torch.cuda.get_device_name()
    assert f"CUDA device   {dev['name']}" in text
    if info["builds"]["cuda"]["state"] == "ok":
        assert info["active"]["cuda"] == "cuda"
