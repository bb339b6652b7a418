"""Shared helpers for the moe::shuffle_mul_sum tests.

The helpers below are imported by the test modules as ``from _moe_testlib import ...``: this
conftest registers itself under that unique module name, so that a second ``conftest.py``
elsewhere in ``testpaths`` (compile_tests/) cannot shadow it the way ``from conftest import``
could. The fallback test also imports this file in a subprocess (FUSED_MOE_OPS_NO_BUILD=1) to
run the same bad-input table there.

Accuracy model (used by ``assert_matches_reference``)
-----------------------------------------------------
Every kernel reads its low-precision inputs exactly (fp16 / bf16 -> fp32 is exact), accumulates
``sum_j f_ij * x_pj`` in float32 and rounds once to the output dtype. We compare against the
float64 reference built from plain torch ops (``shuffle_mul_sum_reference(acc_dtype=float64)``)
on the *same* low-precision inputs, so input rounding does not enter the comparison. The
reference accumulates in float64 and (the op's dtypes stop at float32) rounds once to float32:
ref_err = 2^-24 |ref| + tiny_f32. Per element:

    |kernel - ref| <= acc_err + ref_err + u_out * (|ref| + acc_err + ref_err) + tiny_out
    acc_err          =  (topk + 2) * 2^-24 * S,    S = sum_j |f_ij| * |x_pj|   (float64)

* ``acc_err``: a float32 sum of topk products with or without FMA has error at most
  gamma_n * S, gamma_n = n*u/(1-n*u) with u = 2^-24; (topk + 2) covers the product roundings and
  the 1/(1-n*u) term. S (not |ref|) is the right scale: with cancellation |ref| << S.
* ``u_out * |.|``: the single final rounding, half an ulp of the output dtype relative to the
  value: u = 2^-24 (float32, 24-bit significand), 2^-11 (float16, 11 bits), 2^-8 (bfloat16, 8 bits).
* ``tiny_out``: the output dtype's smallest subnormal, the absolute granularity near zero
  (float16 saturates to subnormals at 6e-5, which products of N(0,1) data reach).

A kernel that accumulates in the output dtype, rounds twice, drops a term, uses a wrong factor or
a wrong row violates this bound by orders of magnitude (tests/test_op.py::test_tolerance_can_fail
shows it), while a correct fp32 kernel is always inside it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import pytest
import torch

import fused_moe_ops  # noqa: F401  (defines and registers the op)
from fused_moe_ops import _registry
from fused_moe_ops.reference import shuffle_mul_sum_reference, shuffle_mul_sum_reference_out

sys.modules.setdefault("_moe_testlib", sys.modules[__name__])

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_ID = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
            torch.int32: "i32", torch.int64: "i64", None: "identity"}

HAS_CUDA = torch.cuda.is_available()

# half an ulp relative to the value, per output dtype (see module docstring)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
SMALLEST_SUBNORMAL = {torch.float32: 2.0 ** -149, torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133}
FP32_U = 2.0 ** -24

MARK_CUDA = pytest.mark.cuda
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=MARK_CUDA),
]


def pytest_collection_modifyitems(config, items):
    # Device tests: CUDA cases are marked `cuda` and skipped cleanly where there is no GPU.
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # the marker, not a keyword/param id named "cuda"
            item.add_marker(skip)


ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Child interpreters (device-side asserts, heavy compiles: what could take this process down)
# ----------------------------------------------------------------------------------------------

def child_env(**extra) -> dict:
    """This process's environment with the checkout first on PYTHONPATH (a child started from any
    cwd imports the same fused_moe_ops, and finds the same build cache)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def describe_exit(proc: subprocess.CompletedProcess, tail: int = 3000) -> str:
    """How a child ended (exit status, or the signal that killed it) and the end of its output."""
    rc = proc.returncode
    if rc < 0:
        try:
            how = f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            how = f"killed by signal {-rc}"
    else:
        how = f"exit status {rc}"
    return f"child {how}\n--- stdout ---\n{proc.stdout[-tail:]}\n--- stderr ---\n{proc.stderr[-tail:]}"


# After a device-side assert the CUDA context is dead: any later CUDA call of the process (the
# interpreter's own teardown included) can fail, hang or crash. So such a call runs in a child
# that reports what it caught and leaves with os._exit, and the test checks both.
DEVICE_ERROR_CHILD = """
import os, sys
try:
{body}
    import torch
    torch.cuda.synchronize()
except Exception as e:
    print("RAISED", type(e).__name__, " ".join(str(e).split())[:500], flush=True)
else:
    print("NO ERROR", flush=True)
sys.stderr.flush()
os._exit(0)
"""


def run_device_error_child(body: str, timeout: int = 300) -> str:
    """Run `body` (statements, indented by 4) in a child interpreter that expects a device-side
    error; assert it caught one (a device-side assert, or the host-side IndexError of a fallback
    that checks on the host) and exited cleanly. Returns the RAISED line."""
    code = DEVICE_ERROR_CHILD.format(body=body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT), env=child_env())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("RAISED", "NO ERROR"))]
    assert lines, f"the child reported nothing; {describe_exit(proc)}"
    assert lines[-1].startswith("RAISED"), f"an out-of-range entry did not raise; {describe_exit(proc)}"
    assert "device-side assert" in lines[-1] or ("IndexError" in lines[-1] and "out of range" in lines[-1]), \
        f"not the device-side range check's error: {lines[-1]}; {describe_exit(proc)}"
    assert proc.returncode == 0, f"the error was caught, but then {describe_exit(proc)}"
    return lines[-1]


def seed_of(*parts) -> int:
    """A stable seed from a test's parameters: fresh data per case, reproducible per run."""
    return zlib.crc32(repr(parts).encode())


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

NEGATIVE_FILLERS_I64 = (-1, -1, -1, -2, -7, -(2 ** 31), -(2 ** 63))
NEGATIVE_FILLERS_I32 = (-1, -1, -1, -2, -7, -(2 ** 31))


def make_permutation(m: int, topk: int, rows: int, index_dtype, g: torch.Generator,
                     neg_frac: float = 0.2) -> torch.Tensor:
    """Random rows of ``input`` with duplicates and negative ("skip") entries.

    When there is room: at least one duplicate pair and at least one -1; other negatives
    (-2, -7, INT_MIN) appear too, to test "negative", not just "== -1".
    """
    n = m * topk
    if rows == 0:
        perm = torch.full((n,), -1, dtype=torch.int64)
    else:
        perm = torch.randint(0, rows, (n,), generator=g, dtype=torch.int64)
    if n >= 2 and rows > 0:
        perm[-1] = perm[0]  # a guaranteed duplicate
    if n >= 3:
        neg = torch.rand(n, generator=g) < neg_frac
        neg[1] = True  # a guaranteed -1
        fillers = NEGATIVE_FILLERS_I32 if index_dtype == torch.int32 else NEGATIVE_FILLERS_I64
        pick = torch.randint(0, len(fillers), (n,), generator=g)
        vals = torch.tensor(fillers, dtype=torch.int64)[pick]
        vals[1] = -1
        perm = torch.where(neg, vals, perm)
    return perm.to(index_dtype)


def make_input(rows: int, k: int, dtype, g, *, row_pad: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Random (rows, k) values, never zeros; ``row_pad`` > 0 gives a strided view (row stride k+pad)."""
    base = torch.randn(rows, k + row_pad, generator=g, dtype=torch.float64) * scale
    # spread magnitudes over ~3 decades so relative and absolute errors both matter
    base = base * torch.exp2(torch.randint(-5, 5, (rows, 1), generator=g).double())
    big = torch.finfo(dtype).max / 4  # scale=1e3 in float16 must not produce inf inputs
    base = base.clamp(-big, big).to(dtype)
    return base[:, :k] if row_pad else base


def make_factors(m: int, topk: int, dtype, g, *, transposed: bool = False) -> torch.Tensor:
    """Router-like weights, mostly positive with some negatives (exercises cancellation)."""
    f = (torch.rand(m, topk, generator=g, dtype=torch.float64) * 1.5 - 0.25).to(dtype)
    if transposed:  # same values, non-contiguous (stride (1, m))
        f = f.t().contiguous().t()
    return f


class Case(NamedTuple):
    input: torch.Tensor
    permutation: Optional[torch.Tensor]
    factors: torch.Tensor


def make_case(m, topk, k, *, in_dtype=torch.float32, fac_dtype=torch.float32, index_dtype=torch.int64,
              rows=None, row_pad=0, factors_transposed=False, seed=0, device="cpu") -> Case:
    g = gen(seed)
    if index_dtype is None:
        rows = m * topk
    elif rows is None:
        rows = max(1, m * topk)
    x = make_input(rows, k, in_dtype, g, row_pad=row_pad)
    p = None if index_dtype is None else make_permutation(m, topk, rows, index_dtype, g)
    f = make_factors(m, topk, fac_dtype, g, transposed=factors_transposed)
    return Case(*(to_device(t, device) for t in (x, p, f)))


def to_device(t, device):
    """Move to ``device`` keeping the layout (strided views stay strided views)."""
    if t is None or t.device.type == device:
        return t
    flat = torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    return flat.to(device).as_strided(t.shape, t.stride(), t.storage_offset())


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def reference64(input, permutation, factors):
    """The float64 reference on CPU, from plain torch ops (``shuffle_mul_sum_reference``)."""
    cpu = [None if t is None else t.cpu() for t in (input, permutation, factors)]
    # out_dtype=float32 because the op (and its reference) only produce float32/16/bf16: the float64
    # sum is rounded once to float32, which error_bound accounts for (REF_ROUNDING).
    ref = shuffle_mul_sum_reference(*cpu, torch.float32, acc_dtype=torch.float64)
    abs_sum = shuffle_mul_sum_reference(cpu[0].abs(), cpu[1], cpu[2].abs(), torch.float32,
                                        acc_dtype=torch.float64)
    return ref.double(), abs_sum.double()


def error_bound(ref, abs_sum, topk: int, out_dtype) -> torch.Tensor:
    acc_err = (topk + 2) * FP32_U * abs_sum
    ref_rounding = FP32_U * ref.abs() + SMALLEST_SUBNORMAL[torch.float32]  # the reference's own fp32 rounding
    return (acc_err + ref_rounding + UNIT_ROUNDOFF[out_dtype] * (ref.abs() + acc_err + ref_rounding)
            + SMALLEST_SUBNORMAL[out_dtype])


def assert_matches_reference(out: torch.Tensor, input, permutation, factors, out_dtype=None, *, what=""):
    out_dtype = out_dtype or input.dtype
    m, topk = factors.shape
    assert out.dtype == out_dtype, f"{what}: dtype {out.dtype}, expected {out_dtype}"
    assert tuple(out.shape) == (m, input.shape[1]), f"{what}: shape {tuple(out.shape)}"
    ref, abs_sum = reference64(input, permutation, factors)
    got = out.detach().cpu().double()
    if out.numel() == 0:
        return
    assert not torch.isnan(got).any(), f"{what}: NaN in the output (poison / uninitialised memory leaked)"
    bound = error_bound(ref, abs_sum, topk, out_dtype)
    err = (got - ref).abs()
    # Overflow of the output dtype (float16 at 65504) must round to inf of the right sign; near the
    # threshold (within the bound) both the largest finite value and inf are correct.
    fmax = torch.finfo(out_dtype).max
    overflow_ok = torch.isinf(got) & (torch.sign(got) == torch.sign(ref)) & (ref.abs() + bound >= fmax)
    bad = ~((err <= bound) | overflow_ok)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        ratio = (err / bound).max().item()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements outside the fp32-accumulation bound; "
            f"first at {idx}: got {got[tuple(idx)].item()!r}, float64 reference {ref[tuple(idx)].item()!r}, "
            f"bound {bound[tuple(idx)].item():.3g}; worst err/bound = {ratio:.3g}"
        )


def snapshot(*tensors):
    """Values and metadata of the caller's tensors, to compare after the call."""
    return [None if t is None else (t.detach().clone(), t.stride(), t.storage_offset(), t.data_ptr())
            for t in tensors]


def assert_unmodified(before, *tensors):
    for i, (snap, t) in enumerate(zip(before, tensors)):
        if t is None:
            assert snap is None
            continue
        b, stride, offset, ptr = snap
        assert (t.dtype, t.shape, t.stride(), t.storage_offset(), t.data_ptr()) == (b.dtype, b.shape, stride,
                                                                                     offset, ptr), \
            f"argument {i}: metadata changed"
        assert torch.equal(t.detach(), b) or _equal_nan(t, b), f"argument {i} was modified by the call"


def _equal_nan(a, b):
    return bool(torch.isclose(a.detach().double(), b.double(), rtol=0, atol=0, equal_nan=True).all())


def poison_allocator(nbytes: int, device) -> None:
    """Leave NaN bytes in memory the allocator is about to hand out again (caching allocator on
    CUDA, malloc's free lists on CPU), so a kernel that forgets to write an element shows NaN."""
    if nbytes <= 0:
        return
    t = torch.full((nbytes // 2 + 8,), float("nan"), dtype=torch.float16, device=device)
    del t


def nan_like(shape, dtype, device, *, layout="contiguous"):
    """A NaN-filled `out` for the .out form; layouts: contiguous, transposed, row-padded."""
    m, k = shape
    if layout == "contiguous":
        return torch.full((m, k), float("nan"), dtype=dtype, device=device)
    if layout == "transposed":  # stride (1, m): non-dense rows, goes through the kernel's buffer
        return torch.full((k, m), float("nan"), dtype=dtype, device=device).t()
    if layout == "row-padded":  # stride (k + 5, 1): dense rows, row stride > K
        return torch.full((m, k + 5), float("nan"), dtype=dtype, device=device)[:, :k]
    raise ValueError(layout)


# ----------------------------------------------------------------------------------------------
# The bad-input table, shared by test_errors.py and test_fallback.py
# ----------------------------------------------------------------------------------------------

class BadCall(NamedTuple):
    id: str
    build: Callable[[str], dict]   # device -> dict(input=, permutation=, factors=, out_dtype=, out=)
    exc: type                      # RuntimeError or IndexError
    needles: tuple                 # substrings the message must contain: argument, expectation, what came
    value_check: bool = False      # needs the permutation's values: not checkable on meta / fake tensors


def _ok(device, m=3, topk=2, k=5, rows=8, **over):
    g = gen(seed_of("bad", m, topk, k, rows))
    d = dict(input=make_input(rows, k, torch.float32, g).to(device),
             permutation=make_permutation(m, topk, rows, torch.int64, g).to(device),
             factors=make_factors(m, topk, torch.float32, g).to(device),
             out_dtype=None, out=None)
    d.update(over)
    return d


def _perm(device, values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype, device=device)


BAD_CALLS: List[BadCall] = [
    BadCall("perm-float32", lambda d: _ok(d, permutation=torch.zeros(6, device=d)), RuntimeError,
            ("permutation must have dtype int32 or int64", "got torch.float32")),
    BadCall("perm-float16", lambda d: _ok(d, permutation=torch.zeros(6, dtype=torch.float16, device=d)), RuntimeError,
            ("permutation must have dtype int32 or int64", "got torch.float16")),
    BadCall("perm-float64", lambda d: _ok(d, permutation=torch.zeros(6, dtype=torch.float64, device=d)), RuntimeError,
            ("permutation must have dtype int32 or int64", "got torch.float64")),
    BadCall("perm-float8", lambda d: _ok(d, permutation=torch.zeros(6, device=d).to(torch.float8_e4m3fn)),
            RuntimeError, ("permutation must have dtype int32 or int64", "got torch.float8_e4m3fn")),
    BadCall("perm-int16", lambda d: _ok(d, permutation=torch.zeros(6, dtype=torch.int16, device=d)), RuntimeError,
            ("permutation must have dtype int32 or int64", "got torch.int16")),
    BadCall("perm-2d", lambda d: _ok(d, permutation=torch.zeros(3, 2, dtype=torch.int64, device=d)), RuntimeError,
            ("permutation must be a 1-D tensor (M*topk,)", "got 2-D with shape (3, 2)")),
    BadCall("perm-0d", lambda d: _ok(d, permutation=torch.tensor(0, device=d)), RuntimeError,
            ("permutation must be a 1-D tensor (M*topk,)", "got 0-D with shape ()")),
    BadCall("perm-too-short", lambda d: _ok(d, permutation=_perm(d, [0, 1, 2, 3, 4])), RuntimeError,
            ("permutation must have M*topk = 3*2 = 6 entries", "got 5")),
    BadCall("perm-too-long", lambda d: _ok(d, permutation=_perm(d, list(range(7)))), RuntimeError,
            ("permutation must have M*topk = 3*2 = 6 entries", "got 7")),
    BadCall("perm-entry-eq-R", lambda d: _ok(d, permutation=_perm(d, [0, -1, 8, 2, 3, 4])), IndexError,
            ("permutation[2] = 8 is out of range", "input has 8 rows", "entries must be < 8"), True),
    BadCall("perm-entry-gt-R-int32-first-named", lambda d: _ok(d, permutation=_perm(d, [0, 1, 2, -5, 100, 9],
                                                                                     torch.int32)),
            IndexError, ("permutation[4] = 100 is out of range", "entries must be < 8"), True),
    BadCall("perm-entry-huge-int64", lambda d: _ok(d, permutation=_perm(d, [0, 1, 2, 3, 4, 2 ** 40])),
            IndexError, (f"permutation[5] = {2 ** 40} is out of range",), True),
    BadCall("perm-entry-oob-out-form",
            lambda d: _ok(d, permutation=_perm(d, [9, 0, 0, 0, 0, 0]), out=torch.full((3, 5), float("nan"), device=d)),
            IndexError, ("permutation[0] = 9 is out of range",), True),
    BadCall("factors-1d", lambda d: _ok(d, factors=torch.rand(6, device=d)), RuntimeError,
            ("factors must be a 2-D tensor (M, topk)", "got 1-D with shape (6,)")),
    BadCall("factors-3d", lambda d: _ok(d, factors=torch.rand(3, 2, 1, device=d)), RuntimeError,
            ("factors must be a 2-D tensor (M, topk)", "got 3-D with shape (3, 2, 1)")),
    BadCall("factors-float64", lambda d: _ok(d, factors=torch.rand(3, 2, dtype=torch.float64, device=d)),
            RuntimeError, ("factors must have dtype float32, float16, bfloat16", "got torch.float64")),
    BadCall("input-1d", lambda d: _ok(d, input=torch.randn(8, device=d)), RuntimeError,
            ("input must be a 2-D tensor (R, K)", "got 1-D with shape (8,)")),
    BadCall("input-3d", lambda d: _ok(d, input=torch.randn(8, 5, 1, device=d)), RuntimeError,
            ("input must be a 2-D tensor (R, K)", "got 3-D with shape (8, 5, 1)")),
    BadCall("input-int32", lambda d: _ok(d, input=torch.ones(8, 5, dtype=torch.int32, device=d)), RuntimeError,
            ("input must have dtype float32, float16, bfloat16", "got torch.int32")),
    BadCall("input-complex64", lambda d: _ok(d, input=torch.ones(8, 5, dtype=torch.complex64, device=d)),
            RuntimeError, ("input must have dtype float32, float16, bfloat16", "got torch.complex64")),
    BadCall("out_dtype-int32", lambda d: _ok(d, out_dtype=torch.int32), RuntimeError,
            ("out_dtype must be one of float32, float16, bfloat16 or None", "got torch.int32")),
    BadCall("out_dtype-int64", lambda d: _ok(d, out_dtype=torch.int64), RuntimeError,
            ("out_dtype must be one of float32, float16, bfloat16 or None", "got torch.int64")),
    BadCall("out_dtype-bool", lambda d: _ok(d, out_dtype=torch.bool), RuntimeError,
            ("out_dtype must be one of float32, float16, bfloat16 or None", "got torch.bool")),
    BadCall("out_dtype-float64", lambda d: _ok(d, out_dtype=torch.float64), RuntimeError,
            ("out_dtype must be one of float32, float16, bfloat16 or None", "got torch.float64")),
    BadCall("identity-R-lt-M*topk", lambda d: _ok(d, permutation=None, rows=5), RuntimeError,
            ("permutation=None (identity) needs input.shape[0] == M*topk = 3*2 = 6", "got input.shape[0] = 5")),
    BadCall("identity-R-gt-M*topk", lambda d: _ok(d, permutation=None, rows=8), RuntimeError,
            ("permutation=None (identity) needs input.shape[0] == M*topk = 3*2 = 6", "got input.shape[0] = 8")),
    BadCall("out-wrong-rows", lambda d: _ok(d, out=torch.full((4, 5), float("nan"), device=d)), RuntimeError,
            ("out must have shape (M, K) = (3, 5)", "got (4, 5)")),
    BadCall("out-wrong-cols", lambda d: _ok(d, out=torch.full((3, 4), float("nan"), device=d)), RuntimeError,
            ("out must have shape (M, K) = (3, 5)", "got (3, 4)")),
    BadCall("out-1d", lambda d: _ok(d, out=torch.full((15,), float("nan"), device=d)), RuntimeError,
            ("out must have shape (M, K) = (3, 5)", "got (15,)")),
    BadCall("out-int32", lambda d: _ok(d, out=torch.zeros(3, 5, dtype=torch.int32, device=d)), RuntimeError,
            ("out must have dtype float32, float16, bfloat16", "got torch.int32")),
    # None for a Tensor argument: the dispatcher passes it on (an undefined tensor to a C++ kernel).
    BadCall("input-None", lambda d: _ok(d, input=None), RuntimeError, ("input must be a tensor (R, K)", "got None")),
    BadCall("factors-None", lambda d: _ok(d, factors=None), RuntimeError,
            ("factors must be a tensor (M, topk)", "got None")),
    BadCall("input-None-out-form", lambda d: _ok(d, input=None, out=torch.full((3, 5), float("nan"), device=d)),
            RuntimeError, ("input must be a tensor (R, K)", "got None")),
    BadCall("factors-None-out-form", lambda d: _ok(d, factors=None, out=torch.full((3, 5), float("nan"), device=d)),
            RuntimeError, ("factors must be a tensor (M, topk)", "got None")),
    BadCall("out-float64", lambda d: _ok(d, out=torch.full((3, 5), float("nan"), dtype=torch.float64, device=d)),
            RuntimeError, ("out must have dtype float32, float16, bfloat16", "got torch.float64")),
]
BAD_CALLS_BY_ID: Dict[str, BadCall] = {c.id: c for c in BAD_CALLS}
assert len(BAD_CALLS_BY_ID) == len(BAD_CALLS)


def call_op(kw):
    """Through the dispatcher: torch.ops.moe.shuffle_mul_sum(.out)."""
    if kw["out"] is not None:
        return torch.ops.moe.shuffle_mul_sum.out(kw["input"], kw["permutation"], kw["factors"], out=kw["out"])
    return torch.ops.moe.shuffle_mul_sum(kw["input"], kw["permutation"], kw["factors"], kw["out_dtype"])


def call_reference(kw):
    """The Python reference directly (the fallback's implementation), no dispatcher involved."""
    if kw["out"] is not None:
        return shuffle_mul_sum_reference_out(kw["input"], kw["permutation"], kw["factors"], out=kw["out"])
    return shuffle_mul_sum_reference(kw["input"], kw["permutation"], kw["factors"], kw["out_dtype"])


def capture_error(fn, kw):
    """(exception type name, message) of fn(kw), or ("no error", "")."""
    try:
        fn(kw)
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)
    return "no error", ""


def active_cpu() -> str:
    return _registry.ACTIVE.get("cpu", "?")


# ---------------------------------------------------------------- random differential harness
# tests/test_fused_op_differential.py and tests/test_scatter_op_differential.py run their random cases
# in child processes (the module itself, with --worker) that announce each case before running it, so a
# crash (a segfault, an abort) is blamed on its case and the run goes on from the next one.


def differential_worker(run_case: Callable[[str, int, int], None], kernel: str, seed: int, start: int,
                        count: int) -> None:
    """The child's loop: ``run_case(kernel, seed, i)`` for each case, announced and reported on stdout."""
    import json
    import traceback

    crash_at = int(os.environ.get("FMO_DIFFERENTIAL_CRASH_AT", "-1"))  # the harness's own test
    for i in range(start, start + count):
        print(f"START {i}", flush=True)
        if i == crash_at:
            os.abort()
        try:
            run_case(kernel, seed, i)
            print(f"OK {i}", flush=True)
        except Exception:  # noqa: BLE001 - reported per case
            print(f"FAIL {i} " + json.dumps(traceback.format_exc(limit=4)), flush=True)


def differential_run(script: Path, kernel: str, seed: int, count: int, timeout: float,
                     env: Optional[Dict[str, str]] = None):
    """Run cases ``seed/0 .. seed/count-1`` on ``kernel`` in children of ``script`` (a differential test
    module run with --worker); returns (number of cases that ran, [(case, problem)])."""
    import json

    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(script.parents[1]), str(script.parent), env.get("PYTHONPATH", "")])
    problems: List[tuple] = []
    ran, start = 0, 0
    while start < count:
        proc = subprocess.run([sys.executable, str(script), "--worker", "--kernel", kernel, "--seed", str(seed),
                               "--start", str(start), "--count", str(count - start)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        started = None
        for line in proc.stdout.splitlines():
            word, _, rest = line.partition(" ")
            if word == "START":
                started = int(rest)
            elif word == "OK":
                ran, started = ran + 1, None
            elif word == "FAIL":
                index, _, tb = rest.partition(" ")
                problems.append((int(index), json.loads(tb)))
                ran, started = ran + 1, None
        if proc.returncode == 0:
            break
        if started is None:  # died before its first case: nothing to blame a case for
            raise RuntimeError(f"the {kernel} worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        problems.append((started, f"the process died (rc {proc.returncode}) in this case:\n{proc.stderr[-1500:]}"))
        ran, start = ran + 1, started + 1
    return ran, problems
