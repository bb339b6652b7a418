"""Bad input: every bad call raises, naming the argument, the expectation and
what came; the message is the same from the C++ kernel, the Python reference (the fallback) and
the fake / meta path; nothing the caller passed is modified (``out`` included: a bad call must
not write into it).

The table lives in conftest.py (BAD_CALLS) because test_fallback.py runs it again in a process
where the C++ kernel is not built.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from _moe_testlib import (
    BAD_CALLS, DEVICES, MARK_CUDA, active_cpu, call_op, call_reference, capture_error, make_case,
    snapshot, assert_unmodified,
)

op = torch.ops.moe.shuffle_mul_sum
needs_cpp = pytest.mark.skipif(active_cpu() != "cpp", reason="the C++ CPU kernel is not built in this process")

BAD_IDS = [c.id for c in BAD_CALLS]
SHAPE_IDS = [c.id for c in BAD_CALLS if not c.value_check]  # checkable without the permutation's values


def _params(ids):
    return [pytest.param(c, id=c.id) for c in BAD_CALLS if c.id in ids]


def _expect(call, kw, fn):
    tensors = [kw[k] for k in ("input", "permutation", "factors", "out")]
    before = snapshot(*tensors)
    with pytest.raises(call.exc) as info:
        fn(kw)
    msg = str(info.value)
    assert msg.startswith("moe::shuffle_mul_sum: "), msg
    for needle in call.needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert_unmodified(before, *tensors)  # on the error path too, `out` included
    return type(info.value).__name__, msg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call", _params(BAD_IDS))
def test_bad_input_via_dispatcher(device, call):
    """torch.ops.moe.shuffle_mul_sum on real tensors: the C++ kernel on CPU (or whatever serves
    the device). Out-of-range entries on CUDA are tested in test_op.py (in a subprocess)."""
    if call.value_check and device == "cuda":
        pytest.skip("out-of-range entries on CUDA: test_op.py::test_cuda_out_of_range_raises")
    _expect(call, call.build(device), call_op)


@pytest.mark.parametrize("call", _params(BAD_IDS))
def test_bad_input_reference(call):
    _expect(call, call.build("cpu"), call_reference)


@needs_cpp
@pytest.mark.parametrize("call", _params(BAD_IDS))
def test_messages_agree_cpp_vs_reference(call):
    """The C++ checks (csrc/shuffle_mul_sum.h) and the Python checks (ops.check_args / check_out /
    reference.check_permutation_range) must give the same exception type and the same text."""
    kw = call.build("cpu")
    cpp = capture_error(call_op, kw)
    ref = capture_error(call_reference, kw)
    assert cpp == ref


@pytest.mark.parametrize("call", _params(SHAPE_IDS))
def test_messages_agree_meta(call):
    """The fake registered in ops.py (serves meta tensors) gives the same message as the reference."""
    ref = capture_error(call_reference, call.build("cpu"))
    meta = capture_error(call_op, call.build("meta"))
    assert meta == ref


@pytest.mark.parametrize("call", _params(SHAPE_IDS))
def test_messages_agree_fake_tensor_mode(call):
    ref = capture_error(call_reference, call.build("cpu"))
    kw = call.build("cpu")
    with FakeTensorMode() as mode:
        fkw = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        fake = capture_error(call_op, fkw)
    assert fake == ref


def test_out_of_range_is_not_checkable_on_fake_tensors():
    """Documented limit: the fake cannot read values, so an entry >= R is only caught at run time."""
    kw = [c for c in BAD_CALLS if c.id == "perm-entry-eq-R"][0].build("meta")
    assert call_op(kw).shape == (3, 5)


# ---- tensors on different devices -----------------------------------------------------------

DEVICE_MISMATCH = [
    pytest.param("factors", id="factors-other-device"),
    pytest.param("permutation", id="permutation-other-device"),
    pytest.param("out", id="out-other-device"),
]


def _mismatch_kw(where, dev_input, dev_other):
    case = make_case(3, 2, 5, rows=8, seed=11)
    kw = dict(input=case.input.to(dev_input), permutation=case.permutation.to(dev_input),
              factors=case.factors.to(dev_input), out_dtype=None, out=None)
    if where == "out":
        kw["out"] = torch.full((3, 5), float("nan"), device=dev_other)
    else:
        kw[where] = kw[where].to(dev_other)
    return kw


@pytest.mark.parametrize("where", DEVICE_MISMATCH)
def test_device_mismatch_cpu_vs_meta(where):
    """CPU input, one other tensor on meta. Through the dispatcher this reaches the fake (Meta wins
    the dispatch), so both the fake and the reference's checks are covered here; the C++ device
    check is exercised with CUDA below (on a CPU-only machine no other real device exists)."""
    kw = _mismatch_kw(where, "cpu", "meta")
    expected = f"moe::shuffle_mul_sum: {where} must be on the same device as input (cpu), got meta"
    assert capture_error(call_op, kw) == ("RuntimeError", expected)
    assert capture_error(call_reference, kw) == ("RuntimeError", expected)


@MARK_CUDA
@pytest.mark.parametrize("where", DEVICE_MISMATCH)
@pytest.mark.parametrize("dev_input, dev_other", [("cuda", "cpu"), ("cpu", "cuda")], ids=["input-cuda", "input-cpu"])
def test_device_mismatch_cuda(where, dev_input, dev_other):
    kw = _mismatch_kw(where, dev_input, dev_other)
    before = snapshot(*(kw[k] for k in ("input", "permutation", "factors", "out")))
    err = capture_error(call_op, kw)
    assert err[0] == "RuntimeError"
    want = (f"moe::shuffle_mul_sum: {where} must be on the same device as input "
            f"({torch.device(dev_input) if dev_input == 'cpu' else kw['input'].device}), got ")
    assert err[1].startswith(want), err
    assert err == capture_error(call_reference, kw)
    assert_unmodified(before, *(kw[k] for k in ("input", "permutation", "factors", "out")))


# ---- the typed wrapper, overlap -----------------------------------------------------------------

def test_wrapper_out_dtype_conflict():
    import fused_moe_ops

    case = make_case(3, 2, 5, rows=8, seed=3)
    out = torch.full((3, 5), float("nan"))
    before = snapshot(*case, out)
    with pytest.raises(ValueError, match=r"^moe::shuffle_mul_sum: out_dtype=torch.bfloat16 disagrees with "
                                         r"out.dtype=torch.float32; pass one of them$"):
        fused_moe_ops.shuffle_mul_sum(*case, out=out, out_dtype=torch.bfloat16)
    assert_unmodified(before, *case, out)


OVERLAP_MSG = "moe::shuffle_mul_sum: out must not share memory with input, permutation or factors"
INTERNAL_MSG = "moe::shuffle_mul_sum: out must not have elements that share memory (e.g. an expand()ed tensor)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alias", ["out-is-input-rows", "out-overlaps-factors-dense",
                                   "out-overlaps-factors-strided-views", "out-overlaps-permutation",
                                   "out-internal-overlap-expanded"])
def test_out_overlapping_an_input_raises(device, alias):
    """Writing into memory the op also reads would be a silent wrong answer: the C++ kernel and the
    reference refuse, with the same message, before writing anything."""
    buf = torch.randn(64, 8, device=device)
    msg = OVERLAP_MSG
    if alias == "out-is-input-rows":
        x, out = buf, buf[:3]
        p, f = torch.tensor([0, 5, -1, 9, 2, 2], device=device), torch.rand(3, 2, device=device)
    elif alias == "out-overlaps-factors-dense":
        x, p = torch.randn(6, 8, device=device), None
        out, f = buf[:3], buf.view(-1)[20:26].view(3, 2)
    elif alias == "out-overlaps-factors-strided-views":  # neither view is dense
        x, p = torch.randn(6, 2, device=device), None
        out, f = buf[:3, :2], buf[1:4, :2]
    elif alias == "out-overlaps-permutation":
        x, f = torch.randn(10, 2, device=device), torch.rand(3, 2, device=device)
        fbuf = torch.zeros(64, dtype=torch.float32, device=device)
        p = fbuf.view(torch.int32)[:6]  # int32 zeros: valid entries; bytes [0, 24)
        out = fbuf[2:8].view(3, 2)
    else:
        x, p, f = torch.randn(10, 4, device=device), torch.tensor([0, 1, -1, 3, 4, 9], device=device), \
            torch.rand(3, 2, device=device)
        out, msg = torch.full((1, 4), float("nan"), device=device).expand(3, 4), INTERNAL_MSG
    errors = []
    for fn in (call_op, call_reference):
        before = buf.clone()
        before_out = out.clone()
        err = capture_error(fn, dict(input=x, permutation=p, factors=f, out_dtype=None, out=out))
        assert err == ("RuntimeError", msg), (fn.__name__, err)
        assert torch.equal(buf, before) and torch.equal(out.nan_to_num(), before_out.nan_to_num()), \
            f"{fn.__name__} wrote before raising"
        errors.append(err)
    assert errors[0] == errors[1]


# ---- None for a Tensor argument ------------------------------------------------------------------
# The dispatcher passes None on for a `Tensor` argument (an undefined tensor to a C++ kernel, None to a
# Python one): every kernel and the fake name the argument. The functional and .out forms with input or
# factors None are in BAD_CALLS above; here the .out form's out=None, the internal op, and compiled code.

def _none_kernels():
    from fused_moe_ops import reference, triton_kernel

    kernels = [("dispatcher", torch.ops.moe._shuffle_mul_sum_fused, torch.ops.moe.shuffle_mul_sum.out),
               ("reference", reference.shuffle_mul_sum_fused_reference, reference.shuffle_mul_sum_reference_out),
               ("triton", triton_kernel.shuffle_mul_sum_fused_triton, triton_kernel.shuffle_mul_sum_triton_out)]
    return [pytest.param(fused, out_form, id=name) for name, fused, out_form in kernels]


@pytest.mark.parametrize("fused, out_form", _none_kernels())
@pytest.mark.parametrize("tensors", ["real", "fake"])
def test_none_for_a_tensor_argument_names_it(fused, out_form, tensors):
    x, p, f = torch.randn(8, 5), torch.tensor([0, 1, -1, 3, 4, 2]), torch.rand(3, 2)
    out = torch.full((3, 5), float("nan"))
    if tensors == "fake":
        mode = FakeTensorMode()
        x, p, f, out = (mode.from_tensor(t) for t in (x, p, f, out))
    else:
        mode = contextlib.nullcontext()
    before = snapshot(x, p, f, out) if tensors == "real" else None
    cases = [
        (lambda: out_form(x, p, f, out=None), "out must be a tensor (M, K), got None"),
        (lambda: fused(x, p, None, None, 1, 0, 1.0, None, None), "factors must be a tensor (M, topk) or (R,), got None"),
        (lambda: fused(None, p, f, None, 1, 0, 1.0, None, None), "input must be a tensor (R, K), got None"),
    ]
    for call, message in cases:
        with mode:
            with pytest.raises(RuntimeError) as info:
                call()
        assert str(info.value) == f"moe::shuffle_mul_sum: {message}", str(info.value)
    if before is not None:
        assert_unmodified(before, x, p, f, out)


@pytest.mark.parametrize("spelling", ["functional", "out-form", "internal-op"])
def test_none_for_a_tensor_argument_names_it_compiled(spelling):
    """torch.compile of a call with None where a tensor goes: the fake's message, naming the argument."""
    x, p, f = torch.randn(8, 5), torch.tensor([0, 1, -1, 3, 4, 2]), torch.rand(3, 2)
    fn, message = {
        "functional": (lambda x, p: torch.ops.moe.shuffle_mul_sum(x, p, None), "factors must be a tensor (M, topk)"),
        "out-form": (lambda x, p: torch.ops.moe.shuffle_mul_sum.out(x, p, f, out=None), "out must be a tensor (M, K)"),
        "internal-op": (lambda x, p: torch.ops.moe._shuffle_mul_sum_fused(x, p, None, None, 1),
                        "factors must be a tensor (M, topk) or (R,)"),
    }[spelling]
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(fn, backend="inductor", fullgraph=True)(x, p)
    assert f"moe::shuffle_mul_sum: {message}, got None" in str(info.value), str(info.value)
