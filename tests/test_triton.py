"""The Triton kernel (fused_moe_ops/triton_kernel.py) against the float64 reference.

On CPU the kernel runs under Triton's interpreter. ``TRITON_INTERPRET`` is read when
``@triton.jit`` decorates, so setting it inside this pytest process would be too late (triton
may already be imported) and would leak into other tests. Instead one worker subprocess
(this file run as a script, with TRITON_INTERPRET=1) runs every case once and reports a JSON
verdict per case; each pytest test below asserts its own case's verdict, so a failure names
its case and prints the worker's message.

With a CUDA device the same cases also run in-process on the compiled kernel (``-m cuda``),
plus the device-side range assertion in a subprocess (a device assert poisons the CUDA context).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# One worker runs the module (pytest-xdist): its module fixture runs the interpreter worker once.
pytestmark = pytest.mark.xdist_group("triton_interpreter")

ROOT = Path(__file__).resolve().parents[1]

DT = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}

# (id, spec). spec keys: m, topk, k, r (input rows), in, fac, out (None = default), perm
# ("int32"/"int64"/None), extra_stride (row padding of input), form ("func"/"out"/"out_strided").
CASES = []


def _case(cid, **spec):
    base = dict(m=7, topk=4, k=200, r=None, dtype="bf16", fac="f32", out=None, perm="int32",
                extra_stride=0, form="func", neg=True)
    base.update(spec)
    CASES.append((cid, base))


# dtype matrix (a representative subset of 3 inputs x 3 factors x {default, 3 outs})
for _in in ("f32", "f16", "bf16"):
    for _out in (None, "f32", "bf16", "f16"):
        _case(f"dtype-in_{_in}-out_{_out}", dtype=_in, out=_out, fac={"f32": "bf16", "f16": "f32", "bf16": "f32"}[_in])
for _fac in ("f16", "bf16"):
    _case(f"factors_{_fac}-in_bf16", fac=_fac)
# K not a multiple of the block (64 under the interpreter, 256..2048 on GPU), tiny and large K
for _k in (1, 3, 63, 64, 65, 100, 257, 1000, 7168 + 5):
    _case(f"k_{_k}", k=_k)
# top-k shapes: 1, non powers of two, larger than 8
for _t in (1, 2, 3, 6, 8, 9):
    _case(f"topk_{_t}", topk=_t)
_case("perm_int64", perm="int64")
_case("perm_none_identity", perm=None, neg=False)
_case("perm_no_negatives", neg=False)
_case("strided_input_rows", extra_stride=37)
_case("strided_input_rows_f32_out_bf16", extra_stride=8, dtype="f32", out="bf16")
_case("out_form_poisoned", form="out")
_case("out_form_f32_from_bf16", form="out", out="f32")
_case("out_form_strided_columns", form="out_strided")
_case("m_1", m=1, k=7168)
_case("m_0", m=0)
_case("k_0", k=0)
_case("m_0_out_form", m=0, form="out")
_case("r_0_all_negative", r=0)
_case("more_rows_than_slots", r=97)
_case("duplicates_heavy", r=3)
CASE_IDS = [c for c, _ in CASES]
SPECIAL = ["out_of_range_raises_and_leaves_out", "bad_args_rejected", "harness_can_fail", "nan_rows_not_referenced"]


# --------------------------------------------------------------------------------------------
# The checks (run in the worker on CPU/interpreter, or in-process on CUDA)
# --------------------------------------------------------------------------------------------
def _make(spec, device, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    m, topk, k = spec["m"], spec["topk"], spec["k"]
    dtype = getattr(torch, DT[spec["dtype"]])
    r = spec["r"] if spec["r"] is not None else max(m * topk, 1)
    if spec["perm"] is None:
        r = m * topk
    # fresh random data, never zeros; rows not referenced are poisoned with NaN
    big = torch.randn(r, k + spec["extra_stride"], generator=g, dtype=torch.float32) * 3 + 0.5
    x = big.to(dtype)[:, :k] if spec["extra_stride"] else big.to(dtype)
    perm = None
    if spec["perm"] is not None:
        if r == 0:
            perm = torch.full((m * topk,), -1, dtype=getattr(torch, spec["perm"]))
        else:
            p = torch.randint(0, r, (m * topk,), generator=g)  # duplicates included
            if m * topk >= 2:
                p[1] = p[0]  # at least one duplicate
            if spec["neg"]:
                drop = torch.rand(m * topk, generator=g) < 0.2
                if m * topk:
                    drop[-1] = True
                if m >= 2:
                    drop[:topk] = True  # token 0 has no live slot at all -> zeros
                p = torch.where(drop, torch.full_like(p, -1), p)
            perm = p.to(getattr(torch, spec["perm"]))
            used = torch.zeros(r, dtype=torch.bool)
            used[perm[perm >= 0].long()] = True
            if x.shape[0] and (~used).any():
                x[~used] = float("nan")  # must never leak into the output
    f = (torch.rand(m, topk, generator=g) * 2 - 0.5).to(getattr(torch, DT[spec["fac"]]))
    return x.to(device), (perm.to(device) if perm is not None else None), f.to(device)


_RTOL = {"float32": 2.0 ** -23, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def _assert_matches(got, x, perm, f, out_dtype_name):
    """got must equal the float64 reference up to one rounding to got.dtype plus float32 accumulation."""
    import torch
    from fused_moe_ops.reference import shuffle_mul_sum_reference as ref

    xc, pc, fc = x.cpu(), (perm.cpu() if perm is not None else None), f.cpu()
    if xc.shape[0] == 0:  # no rows: every entry is -1, the answer is zeros (the reference cannot index 0 rows)
        assert pc is None or bool((pc < 0).all())
        exact = mag = torch.zeros(f.shape[0], xc.shape[1], dtype=torch.float64)
    else:
        exact = ref(xc, pc, fc, torch.float32, acc_dtype=torch.float64).double()
        mag = ref(xc.abs(), pc, fc.abs(), torch.float32, acc_dtype=torch.float64).double()
    topk = max(f.shape[1], 1)
    bound = _RTOL[out_dtype_name] * exact.abs() + 2 * topk * 2.0 ** -24 * mag + 1e-30
    if out_dtype_name == "float16":
        bound = bound + 2.0 ** -25  # subnormal spacing
    g = got.cpu().double()
    assert got.dtype == getattr(torch, out_dtype_name), (got.dtype, out_dtype_name)
    assert tuple(got.shape) == tuple(exact.shape), (tuple(got.shape), tuple(exact.shape))
    assert not torch.isnan(g).any(), "NaN in output (a skipped/unreferenced row leaked, or out not written)"
    err = (g - exact).abs()
    bad = err > bound
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} elements off; first at {idx}: got {g[tuple(idx)].item()!r}, "
            f"exact {exact[tuple(idx)].item()!r}, bound {bound[tuple(idx)].item()!r}"
        )


def run_case(spec, device, seed=0):
    import torch
    from fused_moe_ops.triton_kernel import shuffle_mul_sum_triton, shuffle_mul_sum_triton_out

    x, perm, f = _make(spec, device, seed)
    out_name = DT[spec["out"]] if spec["out"] else DT[spec["dtype"]]
    out_dtype = getattr(torch, out_name)
    m, k = spec["m"], spec["k"]
    if spec["form"] == "func":
        got = shuffle_mul_sum_triton(x, perm, f, getattr(torch, DT[spec["out"]]) if spec["out"] else None)
    elif spec["form"] == "out":
        out = torch.full((m, k), float("nan"), dtype=out_dtype, device=device)
        got = shuffle_mul_sum_triton_out(x, perm, f, out=out)
        assert got is out, "out= form must return out itself"
    else:  # out with non-unit column stride
        buf = torch.full((m, 2 * k), float("nan"), dtype=out_dtype, device=device)
        out = buf[:, ::2]
        got = shuffle_mul_sum_triton_out(x, perm, f, out=out)
        assert got is out
        assert torch.isnan(buf[:, 1::2].float()).all(), "wrote outside out's elements"
    _assert_matches(got, x, perm, f, out_name)


def run_special(name, device):
    import torch
    from fused_moe_ops.triton_kernel import shuffle_mul_sum_triton, shuffle_mul_sum_triton_out

    spec = dict(CASES[0][1])
    if name == "out_of_range_raises_and_leaves_out":
        x, perm, f = _make(dict(spec, neg=False), device, 1)
        perm[5] = x.shape[0]
        out = torch.full((spec["m"], spec["k"]), float("nan"), dtype=x.dtype, device=device)
        try:
            shuffle_mul_sum_triton_out(x, perm, f, out=out)
        except IndexError as e:
            assert "permutation[5]" in str(e) and "out of range" in str(e), str(e)
        else:
            raise AssertionError("an entry >= R did not raise")
        assert torch.isnan(out.float()).all(), "a rejected call wrote into out"
    elif name == "bad_args_rejected":
        x, perm, f = _make(spec, device, 2)
        for call in (
            lambda: shuffle_mul_sum_triton(x, perm[:-1], f),                   # wrong permutation length
            lambda: shuffle_mul_sum_triton(x.double(), perm, f),               # unsupported dtype
            lambda: shuffle_mul_sum_triton(x, perm.float(), f),                # float permutation
            lambda: shuffle_mul_sum_triton_out(x, perm, f, out=x[: spec["m"], : spec["k"] - 1].clone()),
            lambda: shuffle_mul_sum_triton_out(x, perm, f, out=x[: spec["m"]]),  # out aliases input
        ):
            try:
                call()
            except (RuntimeError, ValueError, IndexError):
                pass
            else:
                raise AssertionError("bad arguments were accepted")
    elif name == "harness_can_fail":
        # The comparison must reject a wrong answer (one element off by 2 ulp-ish) and a NaN.
        x, perm, f = _make(dict(spec, dtype="f32", out="f32"), device, 3)
        got = shuffle_mul_sum_triton(x, perm, f, torch.float32)
        wrong = got.clone()
        wrong[1, 3] += 1e-3 * (wrong[1, 3].abs() + 1)
        for bad in (wrong, torch.where(torch.arange(wrong.numel(), device=device).view_as(wrong) == 7,
                                       torch.full_like(wrong, float("nan")), wrong)):
            try:
                _assert_matches(bad, x, perm, f, "float32")
            except AssertionError:
                continue
            raise AssertionError("the comparison accepted a wrong output")
        # and a kernel that ignored -1 (used row 0 instead) would be caught
        p0 = perm.clone()
        p0[p0 < 0] = 0
        try:
            _assert_matches(shuffle_mul_sum_triton(x, p0, f, torch.float32), x, perm, f, "float32")
        except AssertionError:
            pass
        else:
            raise AssertionError("the comparison accepted a result with -1 entries treated as row 0")
    elif name == "nan_rows_not_referenced":
        # every row a live entry does not point to is NaN; inf in a skipped position must not leak
        x, perm, f = _make(dict(spec, r=40), device, 4)
        assert torch.isnan(x.float()).any(), "test setup: expected poisoned rows"
        _assert_matches(shuffle_mul_sum_triton(x, perm, f), x, perm, f, DT[spec["dtype"]])
    else:
        raise KeyError(name)


def _worker(device="cpu"):
    """Run every case, print {case: "ok" | message} as JSON on the last line."""
    import traceback

    results = {}
    for cid, spec in CASES:
        try:
            run_case(spec, device)
            results[cid] = "ok"
        except Exception:  # noqa: BLE001
            results[cid] = traceback.format_exc(limit=4)
    for name in SPECIAL:
        try:
            run_special(name, device)
            results[name] = "ok"
        except Exception:  # noqa: BLE001
            results[name] = traceback.format_exc(limit=4)
    print("RESULTS_JSON " + json.dumps(results))


# --------------------------------------------------------------------------------------------
# pytest side
# --------------------------------------------------------------------------------------------
def _interp_env():
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["FUSED_MOE_OPS_NO_CUDA"] = "1"  # the CUDA build is not what is tested here
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def interp_results():
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, __file__, "--worker"], env=_interp_env(), cwd=str(ROOT),
                          capture_output=True, text=True, timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS_JSON ")]
    assert proc.returncode == 0 and line, f"worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(line[-1][len("RESULTS_JSON "):])


@pytest.mark.parametrize("case", CASE_IDS + SPECIAL)
def test_interpreter(interp_results, case):
    verdict = interp_results.get(case, "missing from the worker's results")
    assert verdict == "ok", f"{case}:\n{verdict}"


def test_worker_runs_in_interpret_mode():
    """The subprocess really is the interpreter (otherwise the cases above test nothing on CPU)."""
    pytest.importorskip("triton")
    code = "import fused_moe_ops.triton_kernel as t; print(t.INTERPRET, t.unavailable_reason())"
    out = subprocess.run([sys.executable, "-c", code], env=_interp_env(), cwd=str(ROOT), capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.split()[:2] == ["True", "None"], out.stdout + out.stderr


def test_unavailable_reason_without_interpreter_or_gpu():
    code = textwrap.dedent("""
        import torch, fused_moe_ops.triton_kernel as t
        r = t.unavailable_reason()
        print("REASON", "none" if r is None else "some", torch.cuda.is_available())
    """)
    env = dict(os.environ, TRITON_INTERPRET="0", FUSED_MOE_OPS_NO_CUDA="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT), capture_output=True, text=True,
                         timeout=300)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("REASON")]
    assert line, out.stdout + out.stderr
    _, reason, cuda = line[0].split()
    assert reason == ("none" if cuda == "True" else "some"), line[0]


# ---- the compiled kernel on a GPU ---------------------------------------------------------
def _cuda_ok():
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


cuda_only = pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA device and triton")


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("case", CASE_IDS)
def test_cuda_triton(case):
    import fused_moe_ops  # noqa: F401

    run_case(dict(CASES)[case], "cuda", seed=5)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("name", [n for n in SPECIAL if n != "out_of_range_raises_and_leaves_out"])
def test_cuda_triton_special(name):
    import fused_moe_ops  # noqa: F401

    run_special(name, "cuda")


@pytest.mark.cuda
@cuda_only
def test_cuda_triton_m_classes_and_no_sync():
    """M in every autotune class; no device->host sync in a warm call."""
    import torch
    from fused_moe_ops.triton_kernel import shuffle_mul_sum_triton

    for m in (3, 200, 5000):
        spec = dict(CASES[0][1], m=m, topk=8, k=4096 + 8)
        x, perm, f = _make(spec, "cuda", m)
        got = shuffle_mul_sum_triton(x, perm, f)  # first call autotunes (may sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = shuffle_mul_sum_triton(x, perm, f)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _assert_matches(got, x, perm, f, "bfloat16")


@pytest.mark.cuda
@pytest.mark.slow
@cuda_only
def test_cuda_triton_int64_offsets():
    """Rows beyond 2**31 elements from the base pointer (4.3 GB of input): 32-bit offsets would wrap."""
    import torch
    from fused_moe_ops.reference import shuffle_mul_sum_reference as ref
    from fused_moe_ops.triton_kernel import shuffle_mul_sum_triton

    k = 4096
    rows = 2**31 // k + 4000
    try:
        x = torch.empty(rows, k, device="cuda", dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        pytest.skip("needs 4.3 GB of GPU memory")
    perm = torch.tensor([rows - 1, 5, rows - 2, -1, 2**31 // k + 1, rows - 3000, 0, rows - 1],
                        device="cuda", dtype=torch.int32)
    live = perm[perm >= 0].long()
    x[live] = torch.randn(live.numel(), k, device="cuda", dtype=torch.bfloat16)
    f = torch.rand(4, 2, device="cuda")
    got = shuffle_mul_sum_triton(x, perm, f, torch.float32)
    # the reference on just the rows used (a gather of 4.3 GB in float64 would not fit)
    small_perm = torch.where(perm >= 0, torch.searchsorted(live.unique(), perm.long().clamp(min=0)), -1)
    want = ref(x[live.unique()], small_perm, f, torch.float32, acc_dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    del x


@pytest.mark.cuda
@cuda_only
def test_cuda_triton_device_assert_on_out_of_range():
    """An entry >= R trips the kernel's device assertion (in a child process: it poisons the context)."""
    from _moe_testlib import run_device_error_child

    line = run_device_error_child("""
    import torch
    from fused_moe_ops.triton_kernel import shuffle_mul_sum_triton
    x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
    perm = torch.randint(0, 16, (32,), device="cuda", dtype=torch.int32)
    f = torch.rand(4, 8, device="cuda")
    shuffle_mul_sum_triton(x, perm, f); torch.cuda.synchronize()
    perm[9] = 16
    shuffle_mul_sum_triton(x, perm, f)""")
    assert "device-side assert" in line, line  # the Triton kernel checks on the device, never on the host


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.path.insert(0, str(ROOT))
        _worker()
    else:
        sys.exit(pytest.main([__file__, "-q"]))
