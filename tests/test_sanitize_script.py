"""scripts/sanitize_kernels.py, the program gpu_check runs under compute-sanitizer: it runs here on
CPU (the C++ CPU kernel and Triton's interpreter over the same cases), its check rejects wrong
answers, and its cases reach every code path of the CUDA kernel."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
import torch

from _moe_testlib import ROOT, child_env, describe_exit

SCRIPT = ROOT / "scripts" / "sanitize_kernels.py"


SCATTER_SCRIPT = ROOT / "scripts" / "sanitize_scatter.py"


def _module():
    spec = importlib.util.spec_from_file_location("sanitize_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_on_cpu():
    backend = "both"
    try:
        import triton  # noqa: F401
    except ImportError:
        backend = "cuda"  # the op's native kernel on CPU only
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--backend", backend, "--quick"],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT), env=child_env())
    assert proc.returncode == 0, describe_exit(proc)
    last = proc.stdout.strip().splitlines()[-1]
    m = re.match(r"sanitize_kernels: (\d+)/(\d+) cases ok", last)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 10, last
    assert proc.stdout.count("\nok   ") + proc.stdout.startswith("ok   ") == int(m.group(2)), proc.stdout


def test_scatter_dry_run_on_cpu():
    """scripts/sanitize_scatter.py (the scatter form's cases gpu_check runs under compute-sanitizer) on
    whatever serves the scatter form on CPU: every case bit for bit the float32 reference."""
    proc = subprocess.run([sys.executable, str(SCATTER_SCRIPT), "--device", "cpu"], capture_output=True, text=True,
                          timeout=300, cwd=str(ROOT), env=child_env())
    assert proc.returncode == 0, describe_exit(proc)
    last = proc.stdout.strip().splitlines()[-1]
    m = re.match(r"sanitize_kernels: (\d+)/(\d+) cases ok", last)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 10, last


def test_no_matching_case_is_an_error(monkeypatch, capsys):
    for var in ("FUSED_MOE_OPS_NO_CUDA", "FUSED_MOE_OPS_TRITON_AUTOTUNE"):  # main() sets defaults for these
        monkeypatch.setenv(var, "0")
    assert _module().main(["--device", "cpu", "--backend", "cuda", "--only", "no-such-case"]) == 2
    assert "0/0 cases ok" in capsys.readouterr().out


def test_check_rejects_wrong_answers():
    sk = _module()
    case = sk.Case("t", 7, 6, 4097, dtype=sk.BF16)
    x, p, f = sk.make(case, "cpu", seed=3)
    assert torch.isnan(x.float()).any(), "rows no live entry points at should be NaN"
    good = torch.ops.moe.shuffle_mul_sum(x, p, f, torch.float32)
    assert sk.check_close(good, x, p, f, sk.F32) <= 1.0
    wrong = good.clone()
    wrong[3, 100] += 1e-3 * (wrong[3, 100].abs() + 1)
    with pytest.raises(AssertionError, match="outside the fp32-accumulation bound"):
        sk.check_close(wrong, x, p, f, sk.F32)
    with pytest.raises(AssertionError, match="NaN in the output"):
        sk.check_close(torch.where(good == good[0, 0], float("nan"), good), x, p, f, sk.F32)
    reads_skipped = torch.ops.moe.shuffle_mul_sum(x, torch.where(p < 0, 0, p), f, torch.float32)
    with pytest.raises(AssertionError):  # a kernel treating -1 as row 0 reads a NaN row or adds a term
        sk.check_close(reads_skipped, x, p, f, sk.F32)
    with pytest.raises(AssertionError, match="dtype"):
        sk.check_close(good.to(torch.bfloat16), x, p, f, sk.F32)


def test_cases_cover_the_code_paths():
    sk = _module()
    cases = sk.CASES
    assert len({c.name for c in cases}) == len(cases)

    def has(pred, what):
        assert any(pred(c) for c in cases), f"no case for: {what}"

    vec = {sk.F32: 4, sk.F16: 8, sk.BF16: 8}
    has(lambda c: c.k % vec[c.dtype] == 0 and c.layout in ("dense", "pad8") and c.k and c.m, "16-byte vector path")
    has(lambda c: c.layout == "pad8" and c.k % 8 == 0, "strided rows on the vector path")
    has(lambda c: c.k % vec[c.dtype] != 0, "K not a multiple of the vector")
    has(lambda c: c.layout == "odd", "odd row stride")
    has(lambda c: c.layout == "offset", "unaligned view")
    for topk in (1, 3, 33, 64, 300, 4096):
        has(lambda c, t=topk: c.topk == t, f"topk {topk}")
    has(lambda c: c.m == 1 and c.topk == 1 and c.k == 1 and c.dtype == sk.F32, "M=1 topk=1 K=1 float32")
    has(lambda c: c.m == 1 and c.k >= 4096, "M = 1, column-split grid")
    has(lambda c: c.m >= 4096, "large M")
    has(lambda c: c.perm == "all-neg" and c.rows, "all-negative permutation")
    has(lambda c: c.rows == 0, "no input rows")
    has(lambda c: c.rows is not None and c.rows < c.m * c.topk // 4, "heavy duplication")
    for index in ("i32", "i64", None):
        has(lambda c, i=index: c.index == i, f"index {index}")
    has(lambda c: c.perm == "strided", "strided permutation")
    has(lambda c: c.factors == "transposed", "transposed factors")
    for role in ("dtype", "fac", "out"):
        for dt in (sk.F32, sk.F16, sk.BF16):
            has(lambda c, r=role, d=dt: (getattr(c, r) or c.dtype) == d, f"{role} {dt}")
    for form in ("func", "out", "out-padded", "out-cols"):
        has(lambda c, fm=form: c.form == fm, f"form {form}")
    for zero in ("m", "k", "topk"):
        has(lambda c, z=zero: getattr(c, z) == 0, f"{zero} = 0 (no launch)")
    triton = [c for c in cases if c.triton]
    assert 4 <= len(triton) <= 8, "the Triton set stays small (each specialisation is a JIT compile)"
    # The Triton kernel loads at most 16 slots per step (triton_kernel.MAX_TOPK_BLOCK) and loops: a
    # topk of several steps must be in its set.
    assert any(c.topk > 16 * 2 for c in triton), "the Triton kernel's top-k loop (several steps)"
    assert any(c.m == 1 and c.topk == 1 and c.k == 1 for c in triton)
