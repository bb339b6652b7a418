"""The no-compiler fallback: with FUSED_MOE_OPS_NO_BUILD=1 at import, CPU calls run on the
plain-torch reference (``_registry.ACTIVE["cpu"] == "reference"``), give the right answers,
raise the same errors as the C++ kernel and the fake, and refuse backward.

One subprocess (module-scoped fixture) runs everything that needs the fallback registration and
reports back as JSON; the tests here compare that report with what this process (C++ kernel)
and the reference function give.
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

from _moe_testlib import BAD_CALLS, active_cpu, call_op, call_reference, capture_error

# One worker runs the module (pytest-xdist): its module fixture runs the fallback subprocess once.
pytestmark = pytest.mark.xdist_group("fallback")

TESTS_DIR = Path(__file__).resolve().parent

FALLBACK_SCRIPT = textwrap.dedent(r"""
    import json, sys, traceback, warnings
    with warnings.catch_warnings(record=True) as import_warnings:
        warnings.simplefilter("always")
        sys.path.insert(0, sys.argv[1])
        import conftest as lib  # imports fused_moe_ops under FUSED_MOE_OPS_NO_BUILD=1
    import torch
    from fused_moe_ops import _registry

    op = torch.ops.moe.shuffle_mul_sum
    report = {"active": dict(_registry.ACTIVE), "fallback_reasons": dict(_registry.FALLBACK_REASONS),
              "import_warnings": [str(w.message) for w in import_warnings if issubclass(w.category, RuntimeWarning)],
              "cases": {}, "errors": {}, "autograd": {}, "opcheck": {}}

    def attempt(table, name, fn):
        try:
            fn()
            table[name] = "ok"
        except BaseException as e:  # noqa
            table[name] = f"{type(e).__name__}: {e}"[:2000]

    # --- correctness against the float64 reference ---------------------------------------
    def functional(m, topk, k, out_dtype=None, **kw):
        def run():
            c = lib.make_case(m, topk, k, seed=lib.seed_of("fb", m, topk, k, tuple(kw.items())), **kw)
            before = lib.snapshot(*c)
            lib.poison_allocator(m * k * 4, "cpu")
            y = op(*c, out_dtype)
            lib.assert_unmodified(before, *c)
            lib.assert_matches_reference(y, *c, out_dtype, what="fallback functional")
        return run

    def out_form(m, topk, k, out_dtype, layout="contiguous", **kw):
        def run():
            c = lib.make_case(m, topk, k, seed=lib.seed_of("fbo", m, topk, k, tuple(kw.items())), **kw)
            out = lib.nan_like((m, k), out_dtype, "cpu", layout=layout)
            before = lib.snapshot(*c)
            assert op.out(*c, out=out) is out
            lib.assert_unmodified(before, *c)
            lib.assert_matches_reference(out, *c, out_dtype, what="fallback out")
        return run

    def all_negative(rows):
        def run():
            x = torch.full((rows, 16), float("nan"))
            p = torch.tensor([-1, -2, -(2 ** 31), -1, -7, -1])
            y = op(x, p, torch.rand(3, 2), torch.float32)
            assert torch.equal(y, torch.zeros(3, 16)), y
        return run

    B, H, F = torch.bfloat16, torch.float16, torch.float32
    cases = {
        "M7_topk6_K4097_f32_int64": functional(7, 6, 4097),
        "M128_topk8_K64_bf16xf16->f32_int32": functional(128, 8, 64, F, in_dtype=B, fac_dtype=H,
                                                          index_dtype=torch.int32),
        "M1_topk2_K7168_f16_identity": functional(1, 2, 7168, in_dtype=H, index_dtype=None),
        "M7_topk64_K7_strided-rows_noncontig-factors": functional(7, 64, 7, B, row_pad=3, factors_transposed=True),
        "M0_K4097": functional(0, 8, 4097),
        "M5_K0": functional(5, 2, 0),
        "out_M7_topk6_K65_bf16->f16": out_form(7, 6, 65, H, in_dtype=B),
        "out_M7_topk2_K33_transposed-out": out_form(7, 2, 33, B, layout="transposed", in_dtype=H, fac_dtype=B),
        "out_M3_topk8_K4097_row-padded-out_identity": out_form(3, 8, 4097, F, layout="row-padded",
                                                                index_dtype=None),
        "all-negative_nan-rows_exact-zero": all_negative(4),
        "all-negative_R0-empty-input": all_negative(0),
    }
    for name, fn in cases.items():
        attempt(report["cases"], name, fn)

    # --- the bad-input table through the dispatcher (CPU -> reference fallback) ---------------
    for call in lib.BAD_CALLS:
        kw = call.build("cpu")
        before = lib.snapshot(*(kw[k] for k in ("input", "permutation", "factors", "out")))
        report["errors"][call.id] = list(lib.capture_error(lib.call_op, kw))
        try:
            lib.assert_unmodified(before, *(kw[k] for k in ("input", "permutation", "factors", "out")))
            report["errors"][call.id].append("unmodified")
        except AssertionError as e:
            report["errors"][call.id].append(f"MODIFIED: {e}")

    # --- autograd: forward works, backward raises -------------------------------------------
    def autograd(form):
        def run():
            c = lib.make_case(5, 3, 40, seed=5)
            x = c.input.detach().requires_grad_()
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                if form == "out":
                    y = torch.full((5, 40), float("nan"))
                    op.out(x, c.permutation, c.factors, out=y)
                else:
                    y = op(x, c.permutation, c.factors)
                lib.assert_matches_reference(y, c.input, c.permutation, c.factors, what="forward under grad")
                assert y.requires_grad, "output does not require grad"
                try:
                    y.sum().backward()
                except RuntimeError as e:
                    raise RuntimeError(f"backward raised: {e}")
            raise AssertionError(f"backward did not raise; x.grad={x.grad is not None}; warnings: "
                                 + " | ".join(str(i.message)[:150] for i in w))
        return run

    for form in ("functional", "out"):
        attempt(report["autograd"], form, autograd(form))

    # --- opcheck on the fallback registration --------------------------------------------------
    def oc(o, args, kwargs=None, utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                           "test_aot_dispatch_dynamic")):
        return lambda: torch.library.opcheck(o, args, kwargs, test_utils=utils)

    c = lib.make_case(7, 6, 65, seed=9, index_dtype=torch.int32, in_dtype=torch.bfloat16)
    ci = lib.make_case(4, 2, 33, seed=10, index_dtype=None, row_pad=3)
    three = ("test_schema", "test_autograd_registration", "test_faketensor")
    report_oc = report["opcheck"]
    attempt(report_oc, "functional", oc(op.default, (*c, torch.float32)))
    attempt(report_oc, "functional_identity", oc(op.default, (*ci, None)))
    attempt(report_oc, "functional_requires_grad", oc(op.default, (c.input.requires_grad_(), c.permutation,
                                                                   c.factors, None), utils=three))
    attempt(report_oc, "out", oc(op.out, tuple(ci), {"out": torch.empty(4, 33)}, utils=three))
    attempt(report_oc, "out_requires_grad",
            oc(op.out, (ci.input.detach().requires_grad_(), None, ci.factors), {"out": torch.empty(4, 33)},
               utils=("test_autograd_registration",)))
    print("@@REPORT@@" + json.dumps(report))
""")


@pytest.fixture(scope="module")
def fallback_report():
    env = dict(os.environ, FUSED_MOE_OPS_NO_BUILD="1", PYTHONWARNINGS="default")
    r = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT, str(TESTS_DIR)], capture_output=True, text=True,
                       env=env, timeout=600, cwd=str(TESTS_DIR.parent))
    marker = [line for line in r.stdout.splitlines() if line.startswith("@@REPORT@@")]
    assert r.returncode == 0 and marker, f"fallback subprocess failed (rc={r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(marker[0][len("@@REPORT@@"):])


def test_fallback_is_active(fallback_report):
    assert fallback_report["active"]["cpu"] == "reference"
    assert fallback_report["fallback_reasons"].get("cpu") == "FUSED_MOE_OPS_NO_BUILD=1"
    # a deliberate opt-out is not a failure: no RuntimeWarning on import (a GPU without a CUDA
    # build may warn about CUDA, which is fine)
    assert not [w for w in fallback_report["import_warnings"] if "CPU kernel" in w]


FALLBACK_CASES = ["M7_topk6_K4097_f32_int64", "M128_topk8_K64_bf16xf16->f32_int32", "M1_topk2_K7168_f16_identity",
                  "M7_topk64_K7_strided-rows_noncontig-factors", "M0_K4097", "M5_K0", "out_M7_topk6_K65_bf16->f16",
                  "out_M7_topk2_K33_transposed-out", "out_M3_topk8_K4097_row-padded-out_identity",
                  "all-negative_nan-rows_exact-zero", "all-negative_R0-empty-input"]


@pytest.mark.parametrize("name", FALLBACK_CASES)
def test_fallback_matches_reference(fallback_report, name):
    assert fallback_report["cases"][name] == "ok"


@pytest.mark.parametrize("call", [pytest.param(c, id=c.id) for c in BAD_CALLS])
def test_fallback_errors_agree(fallback_report, call):
    """Fallback (dispatcher -> Python reference) vs the reference called directly vs the C++ kernel
    in this process: same exception type and text; arguments unmodified on the error path."""
    fb = fallback_report["errors"][call.id]
    assert fb[2] == "unmodified", fb[2]
    assert fb[0] == call.exc.__name__, fb
    for needle in call.needles:
        assert needle in fb[1]
    assert tuple(fb[:2]) == capture_error(call_reference, call.build("cpu"))
    if active_cpu() == "cpp":
        assert tuple(fb[:2]) == capture_error(call_op, call.build("cpu")), "C++ kernel and fallback disagree"


@pytest.mark.parametrize("form", ["functional", "out"])
def test_fallback_backward_raises(fallback_report, form):
    got = fallback_report["autograd"][form]
    assert got.startswith("RuntimeError: backward raised: derivative for moe::shuffle_mul_sum is not implemented"), got


@pytest.mark.parametrize("name", ["functional", "functional_identity", "functional_requires_grad", "out",
                                  "out_requires_grad"])
def test_fallback_opcheck(fallback_report, name):
    assert fallback_report["opcheck"][name] == "ok"


def test_reference_handles_empty_input_with_all_negative_permutation():
    """R == 0 is a valid input when every entry is negative (the C++ kernel returns zeros)."""
    from fused_moe_ops.reference import shuffle_mul_sum_reference

    y = shuffle_mul_sum_reference(torch.empty(0, 4), torch.tensor([-1, -3]), torch.rand(1, 2))
    assert torch.equal(y, torch.zeros(1, 4))
