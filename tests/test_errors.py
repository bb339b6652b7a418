"""Bad input: every bad call raises, naming the argument, the expectation and
what came; the message is the same from the C++ kernel, the Python reference (the fallback) and
the fake / meta path; nothing the caller passed is modified (``out`` included: a bad call must
not write into it).

The table lives in conftest.py (BAD_CALLS) because test_fallback.py runs it again in a process
where the C++ kernel is not built.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, NamedTuple

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from _moe_testlib import (
    BAD_CALLS, DEVICES, MARK_CUDA, active_cpu, call_op, call_reference, capture_error, gen, make_case, make_input,
    seed_of, snapshot, assert_unmodified,
)

from fused_moe_ops.reference import scatter_mul_sum_fused_reference, scatter_mul_sum_reference

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


# ---- the scatter form: moe::scatter_mul_sum and moe::_scatter_mul_sum_fused -----------------------
# The same rules for the scatter form's checks (csrc/shuffle_mul_sum.h against ops.check_scatter_args /
# check_scatter_fused_args and reference.check_index_range): each bad call on the public op (where it has
# no internal-op option) and on the internal op, on the C++ kernel, the reference and the fake.

SCATTER_PREFIX = "moe::scatter_mul_sum: "


class BadScatter(NamedTuple):
    id: str
    over: Callable[[str], dict]  # device -> the arguments that differ from a good call's
    exc: type
    needles: tuple
    value_check: bool = False    # needs the index's values: not checkable on meta / fake tensors
    fused_only: bool = False     # an option of the internal op


def _scatter_ok(device, **over):
    """A good call: 7 rows (duplicates, a -1) to 3 tokens of 5 columns, with factors."""
    g = gen(seed_of("bad-scatter"))
    kw = dict(input=make_input(7, 5, torch.float32, g).to(device),
              index=torch.tensor([2, 0, -1, 2, 1, 0, 2], device=device),
              factors=torch.rand(7, generator=g).to(device), num_tokens=3, out_dtype=None,
              negative_index=0, factor_round=0, scale=1.0, addend=None)
    kw.update(over)
    return kw


def _idx(device, values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype, device=device)


BAD_SCATTER: List[BadScatter] = [
    BadScatter("input-None", lambda d: dict(input=None), RuntimeError, ("input must be a tensor (R, K)", "got None")),
    BadScatter("index-None", lambda d: dict(index=None), RuntimeError, ("index must be a tensor (R,)", "got None")),
    BadScatter("input-1d", lambda d: dict(input=torch.randn(7, device=d)), RuntimeError,
               ("input must be a 2-D tensor (R, K)", "got 1-D with shape (7,)")),
    BadScatter("input-3d", lambda d: dict(input=torch.randn(7, 5, 1, device=d)), RuntimeError,
               ("input must be a 2-D tensor (R, K)", "got 3-D with shape (7, 5, 1)")),
    BadScatter("input-float64", lambda d: dict(input=torch.randn(7, 5, dtype=torch.float64, device=d)), RuntimeError,
               ("input must have dtype float32, float16, bfloat16", "got torch.float64")),
    BadScatter("input-int32", lambda d: dict(input=torch.ones(7, 5, dtype=torch.int32, device=d)), RuntimeError,
               ("input must have dtype float32, float16, bfloat16", "got torch.int32")),
    BadScatter("index-float32", lambda d: dict(index=torch.zeros(7, device=d)), RuntimeError,
               ("index must have dtype int32 or int64", "got torch.float32")),
    BadScatter("index-int16", lambda d: dict(index=torch.zeros(7, dtype=torch.int16, device=d)), RuntimeError,
               ("index must have dtype int32 or int64", "got torch.int16")),
    BadScatter("index-2d", lambda d: dict(index=torch.zeros(7, 1, dtype=torch.int64, device=d)), RuntimeError,
               ("index must be a 1-D tensor of input.shape[0] = 7 entries (R,)", "got shape (7, 1)")),
    BadScatter("index-0d", lambda d: dict(index=torch.tensor(0, device=d)), RuntimeError,
               ("index must be a 1-D tensor of input.shape[0] = 7 entries (R,)", "got shape ()")),
    BadScatter("index-too-short", lambda d: dict(index=_idx(d, [0, 1, 2, 0, 1, 2])), RuntimeError,
               ("index must be a 1-D tensor of input.shape[0] = 7 entries (R,)", "got shape (6,)")),
    BadScatter("factors-2d", lambda d: dict(factors=torch.rand(7, 1, device=d)), RuntimeError,
               ("factors must be a 1-D tensor of input.shape[0] = 7 entries (R,) or None", "got shape (7, 1)")),
    BadScatter("factors-too-long", lambda d: dict(factors=torch.rand(8, device=d)), RuntimeError,
               ("factors must be a 1-D tensor of input.shape[0] = 7 entries (R,) or None", "got shape (8,)")),
    BadScatter("factors-float64", lambda d: dict(factors=torch.rand(7, dtype=torch.float64, device=d)), RuntimeError,
               ("factors must have dtype float32, float16, bfloat16", "got torch.float64")),
    BadScatter("factors-int64", lambda d: dict(factors=torch.ones(7, dtype=torch.int64, device=d)), RuntimeError,
               ("factors must have dtype float32, float16, bfloat16", "got torch.int64")),
    BadScatter("num_tokens-negative", lambda d: dict(num_tokens=-1), RuntimeError,
               ("num_tokens must be >= 0", "got -1")),
    BadScatter("out_dtype-float64", lambda d: dict(out_dtype=torch.float64), RuntimeError,
               ("out_dtype must be one of float32, float16, bfloat16 or None", "got torch.float64")),
    BadScatter("out_dtype-int32", lambda d: dict(out_dtype=torch.int32), RuntimeError,
               ("out_dtype must be one of float32, float16, bfloat16 or None", "got torch.int32")),
    BadScatter("negative_index-3", lambda d: dict(negative_index=3), RuntimeError,
               ("negative_index must be 0 (skip), 1 (wrap) or 2 (error)", "got 3"), fused_only=True),
    BadScatter("negative_index-minus1-before-input-None", lambda d: dict(negative_index=-1, input=None), RuntimeError,
               ("negative_index must be 0 (skip), 1 (wrap) or 2 (error)", "got -1"), fused_only=True),
    BadScatter("factor_round-3", lambda d: dict(factor_round=3), RuntimeError,
               ("factor_round must be 0 (none), 1 (float16) or 2 (bfloat16)", "got 3"), fused_only=True),
    BadScatter("addend-wrong-cols", lambda d: dict(addend=torch.randn(3, 4, device=d)), RuntimeError,
               ("addend must broadcast to (M, K) = (3, 5)", "got (3, 4)"), fused_only=True),
    BadScatter("addend-3d-wrong-numel", lambda d: dict(addend=torch.randn(2, 2, 5, device=d)), RuntimeError,
               ("addend must broadcast to (M, K) = (3, 5) or, with more than 2 dimensions", "got (2, 2, 5)"),
               fused_only=True),
    BadScatter("addend-int32", lambda d: dict(addend=torch.ones(3, 5, dtype=torch.int32, device=d)), RuntimeError,
               ("addend must have dtype float32, float16, bfloat16", "got torch.int32"), fused_only=True),
    # The index's values (IndexError, the first bad entry named; checked before anything is written).
    BadScatter("entry-eq-M", lambda d: dict(index=_idx(d, [2, 0, -1, 3, 1, 0, 2])), IndexError,
               ("index[3] = 3 is out of range", "the result has 3 rows (num_tokens)", "entries must be < 3"), True),
    BadScatter("entry-huge-int32-first-named", lambda d: dict(index=_idx(d, [0, -5, 2 ** 31 - 1, 9, 1, 0, 2],
                                                                          torch.int32)),
               IndexError, (f"index[2] = {2 ** 31 - 1} is out of range", "entries must be < 3"), True),
    BadScatter("entry-with-no-tokens", lambda d: dict(num_tokens=0), IndexError,
               ("index[0] = 2 is out of range", "the result has 0 rows", "entries must be < 0"), True),
    BadScatter("entry-below-minus-M-wrap", lambda d: dict(index=_idx(d, [2, -3, -4, 2, 1, 0, 2]), negative_index=1),
               IndexError, ("index[2] = -4 is out of range", "entries must be in [-3, 3)"), True, True),
    BadScatter("entry-negative-error-mode", lambda d: dict(negative_index=2), IndexError,
               ("index[2] = -1 is out of range", "entries must be in [0, 3)"), True, True),
    BadScatter("entry-huge-negative-int64-error-mode",
               lambda d: dict(index=_idx(d, [2, 0, -(2 ** 63), 2, 1, 0, 2]), negative_index=2), IndexError,
               (f"index[2] = {-(2 ** 63)} is out of range", "entries must be in [0, 3)"), True, True),
]
BAD_SCATTER_BY_ID = {c.id: c for c in BAD_SCATTER}
assert len(BAD_SCATTER_BY_ID) == len(BAD_SCATTER)

SCATTER_FORMS = ["public", "internal"]


def _scatter_calls(call: BadScatter):
    return [form for form in SCATTER_FORMS if not (call.fused_only and form == "public")]


def _scatter_params(value_checks: bool = True):
    return [pytest.param(c, form, id=f"{c.id}-{form}") for c in BAD_SCATTER for form in _scatter_calls(c)
            if value_checks or not c.value_check]


def _scatter_args(kw, form):
    head = (kw["input"], kw["index"], kw["factors"], kw["num_tokens"], kw["out_dtype"])
    return head if form == "public" else head + (kw["negative_index"], kw["factor_round"], kw["scale"], kw["addend"])


def scatter_op(kw, form):
    op = torch.ops.moe.scatter_mul_sum if form == "public" else torch.ops.moe._scatter_mul_sum_fused
    return op(*_scatter_args(kw, form))


def scatter_reference(kw, form):
    ref = scatter_mul_sum_reference if form == "public" else scatter_mul_sum_fused_reference
    return ref(*_scatter_args(kw, form))


def _scatter_error(fn, kw, form):
    try:
        fn(kw, form)
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)
    return "no error", ""


def _scatter_tensors(kw):
    return [kw[k] for k in ("input", "index", "factors", "addend")]


@pytest.mark.parametrize("call, form", _scatter_params())
def test_scatter_bad_input_via_dispatcher(call, form):
    """On CPU tensors: the C++ kernel (or the reference where it is not built). Names the argument, the
    expectation and what came; nothing the caller passed is modified."""
    kw = _scatter_ok("cpu", **call.over("cpu"))
    before = snapshot(*_scatter_tensors(kw))
    with pytest.raises(call.exc) as info:
        scatter_op(kw, form)
    msg = str(info.value)
    assert msg.startswith(SCATTER_PREFIX), msg
    for needle in call.needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert_unmodified(before, *_scatter_tensors(kw))


@needs_cpp
@pytest.mark.parametrize("call, form", _scatter_params())
def test_scatter_messages_agree_cpp_vs_reference(call, form):
    kw = _scatter_ok("cpu", **call.over("cpu"))
    assert _scatter_error(scatter_op, kw, form) == _scatter_error(scatter_reference, kw, form)


@pytest.mark.parametrize("call, form", _scatter_params(value_checks=False))
def test_scatter_messages_agree_fake(call, form):
    """The fake (meta tensors, and FakeTensorMode as torch.compile traces) gives the reference's message."""
    ref = _scatter_error(scatter_reference, _scatter_ok("cpu", **call.over("cpu")), form)
    assert _scatter_error(scatter_op, _scatter_ok("meta", **call.over("meta")), form) == ref
    kw = _scatter_ok("cpu", **call.over("cpu"))
    with FakeTensorMode() as mode:
        fkw = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        assert _scatter_error(scatter_op, fkw, form) == ref


@pytest.mark.parametrize("where", ["index", "factors", "addend"])
def test_scatter_device_mismatch_cpu_vs_meta(where):
    """CPU input, one other tensor on meta: reaches the fake (Meta wins the dispatch), whose message is
    the reference's."""
    kw = _scatter_ok("cpu", addend=torch.randn(3, 5))
    kw[where] = kw[where].to("meta")
    expected = ("RuntimeError", f"{SCATTER_PREFIX}{where} must be on the same device as input (cpu), got meta")
    assert _scatter_error(scatter_op, kw, "internal") == expected
    assert _scatter_error(scatter_reference, kw, "internal") == expected


def test_scatter_bad_table_is_not_vacuous():
    """Every bad call is good once its one bad argument is taken out (the table tests what it names)."""
    kw = _scatter_ok("cpu")
    for form in SCATTER_FORMS:
        assert scatter_op(kw, form).shape == (3, 5)
