"""moe::shuffle_mul_sum against the float64 reference.

Covering design instead of the full cross product (4 M x 4 topk x 6 K x 27 dtype combinations
x 3 index kinds x 2 forms would be ~15k cases):

* test_shapes:   the full M x K grid (24 cases); topk cycles as a Latin square, so every topk
                 meets every M and every K; dtype combination, index dtype and form cycle too.
* test_dtypes:   all 3 x 3 x 3 (input, factors, out) dtype combinations on a mid shape whose K
                 (4097) hits both the vector tiles and the scalar tail, in both forms.
* test_layouts:  strided / odd-stride / offset rows, non-contiguous last dim, non-contiguous
                 factors and permutation, int32 vs int64 vs identity, heavy duplication,
                 non-contiguous and row-padded `out`.
* test_topk_large, test_edge_cases: topk up to 128; M = 0, K = 0, R = 0, all-negative
                 permutations (exact zeros), inf / NaN rows that are skipped (must not leak).
* opcheck and autograd on representative samples; every test runs on cpu and on cuda (the
  latter skipped cleanly without a GPU).

Every call: fresh random data (seeded from the case id), permutations with duplicates, -1 and
other negative entries, NaN-poisoned `out` (and a NaN-poisoned allocator for the functional
form), inputs cloned before and compared after.
"""
from __future__ import annotations

import itertools

import pytest

from fused_moe_ops.ops import OUT_IS_FUNCTIONALIZABLE
import torch

from _moe_testlib import (
    DEVICES, DTYPE_ID, FLOAT_DTYPES, Case, assert_matches_reference, assert_unmodified, make_case, make_input,
    nan_like, poison_allocator, run_device_error_child, seed_of, snapshot, to_device,
)

import fused_moe_ops
from fused_moe_ops.reference import shuffle_mul_sum_reference

op = torch.ops.moe.shuffle_mul_sum

M_IDS = {0: "M0-empty", 1: "M1-decode", 7: "M7-odd", 128: "M128-prefill"}
TOPK_IDS = {1: "topk1-single", 2: "topk2", 6: "topk6", 8: "topk8"}
K_IDS = {1: "K1-single-col", 7: "K7-tail-only", 64: "K64-one-tile", 4096: "K4096-whole-tiles",
         4097: "K4097-tiles+tail", 7168: "K7168-deepseek-hidden"}
DTYPE_COMBOS = list(itertools.product(FLOAT_DTYPES, FLOAT_DTYPES, FLOAT_DTYPES))  # (input, factors, out)


def combo_id(i, f, o):
    return f"in-{DTYPE_ID[i]}_fac-{DTYPE_ID[f]}_out-{DTYPE_ID[o]}"


def run_functional(case: Case, out_dtype, *, what, pass_out_dtype=True):
    x, p, f = case
    before = snapshot(*case)
    poison_allocator(f.shape[0] * x.shape[1] * 4, x.device)
    out = op(x, p, f, out_dtype) if pass_out_dtype else op(x, p, f)
    assert out.device == x.device
    assert_unmodified(before, *case)
    assert_matches_reference(out, x, p, f, out_dtype, what=what)
    return out


def run_out(case: Case, out_dtype, *, what, layout="contiguous"):
    x, p, f = case
    m, k = f.shape[0], x.shape[1]
    out = nan_like((m, k), out_dtype, x.device, layout=layout)
    before = snapshot(*case)
    res = op.out(x, p, f, out=out)
    assert res is out or (res.data_ptr() == out.data_ptr() and res.shape == out.shape), ".out must return `out`"
    assert_unmodified(before, *case)
    assert_matches_reference(out, x, p, f, out_dtype, what=what)
    if layout == "row-padded" and out.numel():  # the padding columns are not ours to write
        assert torch.isnan(out._base[:, k:]).all(), "wrote outside `out`"
    return out


def run(case, out_dtype, form, what):
    if form == "out":
        return run_out(case, out_dtype or case.input.dtype, what=what)
    if form == "default-dtype":
        return run_functional(case, None, what=what, pass_out_dtype=False)
    return run_functional(case, out_dtype, what=what)


# ---------------------------------------------------------------------------------------------
# M x K grid, topk as a Latin square
# ---------------------------------------------------------------------------------------------

def _shape_cases():
    forms = ["functional", "out", "default-dtype"]
    index_kinds = [torch.int64, torch.int32, torch.int64, None]  # None: identity permutation
    cases = []
    for im, m in enumerate(M_IDS):
        for ik, k in enumerate(K_IDS):
            c = im * len(K_IDS) + ik
            topk = list(TOPK_IDS)[(im + ik) % len(TOPK_IDS)]
            dt = DTYPE_COMBOS[(c * 7) % len(DTYPE_COMBOS)]  # 24 distinct combinations
            idx = index_kinds[c % len(index_kinds)]
            form = forms[c % len(forms)]
            if form == "default-dtype":
                dt = (dt[0], dt[1], dt[0])
            cases.append(pytest.param(
                m, topk, k, dt, idx, form,
                id=f"{M_IDS[m]}_{TOPK_IDS[topk]}_{K_IDS[k]}_{combo_id(*dt)}_{DTYPE_ID[idx]}_{form}"))
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m, topk, k, dtypes, index_dtype, form", _shape_cases())
def test_shapes(device, m, topk, k, dtypes, index_dtype, form):
    in_dt, fac_dt, out_dt = dtypes
    case = make_case(m, topk, k, in_dtype=in_dt, fac_dtype=fac_dt, index_dtype=index_dtype,
                     seed=seed_of(m, topk, k, dtypes, index_dtype), device=device)
    run(case, out_dt, form, what=f"M={m} topk={topk} K={k}")


# ---------------------------------------------------------------------------------------------
# every (input, factors, out) dtype combination on a mid shape
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["functional", "out"])
@pytest.mark.parametrize("dtypes", [pytest.param(c, id=combo_id(*c)) for c in DTYPE_COMBOS])
def test_dtypes(device, dtypes, form):
    in_dt, fac_dt, out_dt = dtypes
    index_dtype = torch.int32 if in_dt == fac_dt else torch.int64
    case = make_case(7, 6, 4097, in_dtype=in_dt, fac_dtype=fac_dt, index_dtype=index_dtype, rows=30,
                     row_pad=3 if form == "out" else 0, seed=seed_of("dtypes", dtypes), device=device)
    run(case, out_dt, form, what=combo_id(*dtypes))


# ---------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------

def _layout_case(name, m, topk, k, seed):
    dt = torch.bfloat16
    g_case = dict(in_dtype=dt, fac_dtype=torch.float32, seed=seed)
    if name == "index-int32":
        return make_case(m, topk, k, index_dtype=torch.int32, **g_case)
    if name == "index-int64":
        return make_case(m, topk, k, index_dtype=torch.int64, **g_case)
    if name == "identity-perm-None":
        return make_case(m, topk, k, index_dtype=None, **g_case)
    if name == "strided-rows-odd-stride":  # row stride K+3: misaligned rows for vector loads
        return make_case(m, topk, k, row_pad=3, **g_case)
    if name == "strided-rows-pad-128":
        return make_case(m, topk, k, row_pad=128, **g_case)
    if name == "strided-rows-storage-offset":  # starts 1 element into the buffer, odd row stride
        c = make_case(m, topk, k + 1, row_pad=2, **g_case)
        return Case(c.input[:, 1:], c.permutation, c.factors)
    if name == "strided-rows-identity":
        return make_case(m, topk, k, index_dtype=None, row_pad=5, **g_case)
    if name == "input-last-dim-noncontig":  # stride (1, R): the op makes it contiguous
        c = make_case(m, topk, k, **g_case)
        return Case(c.input.t().contiguous().t(), c.permutation, c.factors)
    if name == "input-every-other-col":  # stride (2K, 2)
        c = make_case(m, topk, 2 * k, **g_case)
        return Case(c.input[:, ::2], c.permutation, c.factors)
    if name == "input-rows-expanded-stride0":  # every row is the same memory
        c = make_case(m, topk, k, rows=9, **g_case)
        return Case(c.input[2:3].expand(9, k), c.permutation, c.factors)
    if name == "factors-transposed":
        return make_case(m, topk, k, factors_transposed=True, **g_case)
    if name == "factors-every-other-col":
        c = make_case(m, 2 * topk, k, **g_case)
        return Case(c.input, make_case(m, topk, k, rows=c.input.shape[0], seed=seed + 1).permutation,
                    c.factors[:, ::2])
    if name == "perm-strided":
        c = make_case(m, 2 * topk, k, **g_case)
        return Case(c.input, c.permutation[::2], make_case(m, topk, k, seed=seed + 1).factors.to(torch.float32))
    if name == "few-rows-heavy-duplication":  # R=3 rows for M*topk slots
        return make_case(m, topk, k, rows=3, **g_case)
    raise ValueError(name)


LAYOUTS = ["index-int32", "index-int64", "identity-perm-None", "strided-rows-odd-stride", "strided-rows-pad-128",
           "strided-rows-storage-offset", "strided-rows-identity", "input-last-dim-noncontig",
           "input-every-other-col", "input-rows-expanded-stride0", "factors-transposed",
           "factors-every-other-col", "perm-strided", "few-rows-heavy-duplication"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["functional", "out"])
@pytest.mark.parametrize("m, topk, k", [pytest.param(7, 6, 4097, id="M7_topk6_K4097"),
                                        pytest.param(128, 8, 7, id="M128_topk8_K7")])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(device, layout, m, topk, k, form):
    case = _layout_case(layout, m, topk, k, seed_of(layout, m, topk, k))
    case = Case(*(to_device(t, device) for t in case))
    run(case, torch.float32 if form == "functional" else torch.bfloat16, form, what=layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_layout", ["transposed", "row-padded"])
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=lambda d: "out-" + DTYPE_ID[d])
@pytest.mark.parametrize("m, k", [pytest.param(7, 4097, id="M7_K4097"), pytest.param(128, 64, id="M128_K64"),
                                  pytest.param(5, 1, id="M5_K1")])
def test_out_noncontiguous(device, m, k, out_dtype, out_layout):
    case = make_case(m, 2, k, in_dtype=torch.float16, seed=seed_of("outnc", m, k, out_dtype), device=device)
    run_out(case, out_dtype, what=f"out {out_layout}", layout=out_layout)


# ---------------------------------------------------------------------------------------------
# topk beyond the usual range, edge shapes, skipped non-finite rows
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m, topk, k", [
    pytest.param(7, 16, 4097, id="topk16_K4097"),
    pytest.param(3, 33, 64, id="topk33-odd"),
    pytest.param(128, 64, 7, id="topk64-prefill"),
    pytest.param(1, 64, 7168, id="topk64-decode-K7168"),
    pytest.param(2, 128, 65, id="topk128"),
])
def test_topk_large(device, m, topk, k):
    case = make_case(m, topk, k, in_dtype=torch.bfloat16, fac_dtype=torch.float32,
                     seed=seed_of("topk", m, topk, k), device=device)
    run(case, torch.float32, "functional", what=f"topk={topk}")
    run(case, torch.bfloat16, "out", what=f"topk={topk}")


def _all_negative_case(m, topk, k, rows, device, index_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed_of("neg", m, topk, k, rows))
    x = torch.full((rows, k), float("nan"))
    if rows:
        x[::2] = float("inf")
    perm = -torch.randint(1, 2 ** 31 - 1, (m * topk,), generator=g)
    if m * topk:
        perm[0] = -1
    f = torch.rand(m, topk, generator=g) + 0.5
    return Case(x.to(device), perm.to(index_dtype).to(device), f.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["functional", "out"])
@pytest.mark.parametrize("m, topk, k, rows, index_dtype", [
    pytest.param(7, 6, 4097, 11, torch.int64, id="all-negative_M7_K4097_nan-inf-rows"),
    pytest.param(128, 8, 7, 3, torch.int32, id="all-negative_M128_K7_int32"),
    pytest.param(4, 2, 64, 0, torch.int64, id="all-negative_R0-empty-input"),
])
def test_all_negative_gives_exact_zero(device, form, m, topk, k, rows, index_dtype):
    case = _all_negative_case(m, topk, k, rows, device, index_dtype)
    before = snapshot(*case)
    if form == "out":
        out = torch.full((m, k), float("nan"), dtype=torch.bfloat16, device=device)
        op.out(*case, out=out)
    else:
        poison_allocator(m * k * 4, device)
        out = op(*case, None)
    assert_unmodified(before, *case)
    assert torch.equal(out, torch.zeros_like(out)), "all slots skipped: output must be exactly 0"
    assert not torch.signbit(out).any(), "expected +0.0"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["functional", "out"])
@pytest.mark.parametrize("k", [pytest.param(7, id="K7-tail"), pytest.param(4097, id="K4097-tiles+tail")])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_skipped_nonfinite_rows_do_not_leak(device, form, k, poison):
    """Rows that only negative entries could 'point at' hold NaN / inf: row 0 (what a clamp to 0
    would read), row R-1 (what Python-style -1 indexing would read) and every unreferenced row."""
    m, topk, rows = 16, 6, 40
    case = make_case(m, topk, k, in_dtype=torch.float16, rows=rows, seed=seed_of("leak", k, form))
    x, p, f = case
    p = torch.where(p >= 0, p % (rows - 4) + 2, p)  # live entries only in rows 2..rows-3
    x = x.clone()
    used = torch.zeros(rows, dtype=torch.bool)
    used[p[p >= 0]] = True
    x[~used] = poison
    assert not used[0] and not used[rows - 1] and (p < 0).sum() >= 2
    case = Case(*(t.to(device) for t in (x, p, f)))
    run(case, torch.float32, form, what=f"skipped rows hold {poison}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["functional", "out", "default-dtype"])
@pytest.mark.parametrize("m, topk, k, index_dtype", [
    pytest.param(0, 8, 4097, torch.int64, id="M0_perm-empty"),
    pytest.param(0, 2, 64, None, id="M0_identity_R0"),
    pytest.param(0, 1, 0, torch.int32, id="M0_K0"),
    pytest.param(5, 2, 0, torch.int64, id="K0"),
    pytest.param(5, 2, 0, None, id="K0_identity"),
    pytest.param(1, 1, 1, torch.int64, id="M1_topk1_K1-scalar"),
    pytest.param(3, 0, 16, torch.int64, id="topk0-no-slots"),
])
def test_empty_and_tiny(device, form, m, topk, k, index_dtype):
    case = make_case(m, topk, k, in_dtype=torch.float16, index_dtype=index_dtype, fac_dtype=torch.bfloat16,
                     rows=None if index_dtype is None else 4, seed=seed_of("tiny", m, topk, k), device=device)
    out = run(case, torch.float32, form, what="tiny")
    assert out.shape == (m, k)
    if topk == 0 and out.numel():
        assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------
# The typed wrapper
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_wrapper(device):
    case = make_case(7, 6, 65, in_dtype=torch.bfloat16, fac_dtype=torch.float16, seed=seed_of("wrapper"),
                     device=device)
    y = fused_moe_ops.shuffle_mul_sum(*case)
    assert_matches_reference(y, *case, torch.bfloat16, what="wrapper default")
    y = fused_moe_ops.shuffle_mul_sum(*case, out_dtype=torch.float32)
    assert_matches_reference(y, *case, torch.float32, what="wrapper out_dtype")
    out = torch.full((7, 65), float("nan"), dtype=torch.float16, device=device)
    assert fused_moe_ops.shuffle_mul_sum(*case, out=out) is out
    assert_matches_reference(out, *case, torch.float16, what="wrapper out")
    out2 = torch.full((7, 65), float("nan"), dtype=torch.float16, device=device)
    assert fused_moe_ops.shuffle_mul_sum(*case, out=out2, out_dtype=torch.float16) is out2  # agreeing: fine
    out3 = torch.full((7, 65), float("nan"), dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match=r"out_dtype=torch.float32 disagrees with out.dtype=torch.float16"):
        fused_moe_ops.shuffle_mul_sum(*case, out=out3, out_dtype=torch.float32)
    assert torch.isnan(out3).all()


# ---------------------------------------------------------------------------------------------
# The tests can fail: the bound rejects plausible kernel mistakes
# ---------------------------------------------------------------------------------------------

def _bad_low_precision_accumulation(x, p, f, out_dtype):
    return shuffle_mul_sum_reference(x, p, f, out_dtype, acc_dtype=torch.bfloat16)


def _bad_drop_last_slot(x, p, f, out_dtype):
    p = p.clone()
    p.view(f.shape)[:, -1] = -1
    return shuffle_mul_sum_reference(x, p, f, out_dtype)


def _bad_minus_one_wraps(x, p, f, out_dtype):  # Python indexing: -1 reads the last row
    m, topk = f.shape
    rows = x.float()[p.long().clamp(min=-1)]
    rows = torch.where((p.long() >= -1).unsqueeze(-1), rows, torch.zeros_like(rows))
    return (rows.view(m, topk, -1) * f.float().view(m, topk, 1)).sum(1).to(out_dtype)


def _bad_double_rounding(x, p, f, out_dtype):  # products rounded to the input dtype first
    m, topk = f.shape
    rows = torch.where((p >= 0).unsqueeze(-1), x[p.long().clamp(min=0)], torch.zeros((), dtype=x.dtype))
    return (rows.view(m, topk, -1) * f.to(x.dtype).view(m, topk, 1)).float().sum(1).to(out_dtype)


def _bad_transposed_factors(x, p, f, out_dtype):
    return shuffle_mul_sum_reference(x, p, f.t().reshape(f.shape), out_dtype)


@pytest.mark.parametrize("bad", [_bad_low_precision_accumulation, _bad_drop_last_slot, _bad_minus_one_wraps,
                                 _bad_double_rounding, _bad_transposed_factors],
                         ids=lambda fn: fn.__name__[5:])
def test_tolerance_can_fail(bad):
    case = make_case(7, 6, 4097, in_dtype=torch.bfloat16, fac_dtype=torch.float32, rows=20, seed=seed_of(bad))
    good = shuffle_mul_sum_reference(*case, torch.float32)
    assert_matches_reference(good, *case, torch.float32, what="fp32 reference")  # the bound admits fp32 acc
    with pytest.raises(AssertionError, match="outside the fp32-accumulation bound"):
        assert_matches_reference(bad(*case, torch.float32), *case, torch.float32, what=bad.__name__)


def test_tolerance_is_tight_for_float16_output():
    """A correct fp32 kernel whose result is rounded twice (fp32 -> bf16 -> fp16) must fail."""
    case = make_case(7, 6, 4097, in_dtype=torch.float16, fac_dtype=torch.float16, seed=seed_of("tight"))
    twice = shuffle_mul_sum_reference(*case, torch.bfloat16).to(torch.float16)
    with pytest.raises(AssertionError):
        assert_matches_reference(twice, *case, torch.float16)


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------

NO_GRAD_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _opcheck_samples(device):
    def c(*a, **kw):
        return make_case(*a, seed=seed_of("opcheck", a, tuple(kw.items())), device=device, **kw)

    s = []
    s.append(pytest.param(c(7, 6, 65), None, id="f32_int64"))
    s.append(pytest.param(c(5, 2, 33, in_dtype=torch.bfloat16, fac_dtype=torch.float16, index_dtype=torch.int32),
                          torch.float32, id="bf16xf16->f32_int32"))
    s.append(pytest.param(c(4, 3, 8, in_dtype=torch.float16, index_dtype=None), None, id="identity-None"))
    s.append(pytest.param(c(6, 2, 17, row_pad=3, factors_transposed=True), torch.bfloat16,
                          id="strided-rows_noncontig-factors"))
    s.append(pytest.param(c(0, 4, 9), None, id="M0"))
    s.append(pytest.param(c(3, 2, 0), None, id="K0"))
    s.append(pytest.param(c(16, 8, 128, rows=40), None, id="dynamic-ish-bigger"))
    return s


SAMPLE_IDS = ["f32_int64", "bf16xf16->f32_int32", "identity-None", "strided-rows_noncontig-factors", "M0", "K0",
              "dynamic-ish-bigger"]


def _sample(device, sample_id):
    (p,) = [p for p in _opcheck_samples(device) if p.id == sample_id]
    return p.values


def _opcheck(o, args, kwargs=None, utils=NO_GRAD_UTILS):
    return torch.library.opcheck(o, args, kwargs, test_utils=utils)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample_id", SAMPLE_IDS)
def test_opcheck_functional(device, sample_id):
    case, out_dtype = _sample(device, sample_id)
    _opcheck(op.default, (*case, out_dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample_id", ["f32_int64", "identity-None", "strided-rows_noncontig-factors", "M0"])
def test_opcheck_functional_requires_grad(device, sample_id):
    """With inputs requiring grad, test_autograd_registration really runs (it returns early
    otherwise) and must pass. test_aot_dispatch_dynamic cannot pass here *by design*: it traces and
    runs the backward, and the op has no derivative; it must fail with exactly that message."""
    case, out_dtype = _sample(device, sample_id)
    x, p, f = case
    args = (x.detach().requires_grad_(), p, f.detach().requires_grad_(), out_dtype)
    _opcheck(op.default, args, utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with pytest.raises(Exception, match="derivative for moe::shuffle_mul_sum is not implemented"):
        _opcheck(op.default, args, utils=("test_aot_dispatch_dynamic",))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample_id", ["f32_int64", "bf16xf16->f32_int32", "identity-None",
                                       "strided-rows_noncontig-factors", "M0", "K0"])
def test_opcheck_out(device, sample_id):
    case, out_dtype = _sample(device, sample_id)
    x, p, f = case
    out = torch.full((f.shape[0], x.shape[1]), float("nan"), dtype=out_dtype or x.dtype, device=device)
    _opcheck(op.out, case, {"out": out}, utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    # ... and with inputs that require grad, so test_autograd_registration is not a no-op
    _opcheck(op.out, (x.detach().requires_grad_(), p, f), {"out": out}, utils=("test_autograd_registration",))


@pytest.mark.xfail(
    not OUT_IS_FUNCTIONALIZABLE,
    strict=True,
    reason="torch < 2.12 has no torch.Tag.out, and its functionalization (torch.compile / AOT) does not "
    "support custom ops whose *output* carries an alias annotation; shuffle_mul_sum.out returns Tensor(a!).",
)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_out_aot_dispatch_dynamic(device):
    case, _ = _sample(device, "f32_int64")
    out = torch.empty((case.factors.shape[0], case.input.shape[1]), device=device)
    _opcheck(op.out, case, {"out": out}, utils=("test_aot_dispatch_dynamic",))


# ---------------------------------------------------------------------------------------------
# autograd: forward works, backward raises
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["functional", "out"])
@pytest.mark.parametrize("grad_on", ["input", "factors", "both"])
def test_backward_raises(device, form, grad_on):
    case = make_case(5, 3, 40, seed=seed_of("grad", form, grad_on), device=device)
    x = case.input.detach().requires_grad_(grad_on in ("input", "both"))
    f = case.factors.detach().requires_grad_(grad_on in ("factors", "both"))
    if form == "out":
        y = torch.full((5, 40), float("nan"), device=device)
        op.out(x, case.permutation, f, out=y)
    else:
        y = op(x, case.permutation, f)
    assert_matches_reference(y, x.detach(), case.permutation, f.detach(), torch.float32, what="forward under grad")
    assert y.requires_grad, "output of an op whose inputs require grad must require grad (so backward can raise)"
    with pytest.raises(RuntimeError, match="derivative for moe::shuffle_mul_sum is not implemented"):
        y.sum().backward()
    assert x.grad is None and f.grad is None


def test_no_grad_output_does_not_require_grad():
    case = make_case(5, 3, 40, seed=1)
    with torch.no_grad():
        y = op(case.input.requires_grad_(), case.permutation, case.factors)
    assert not y.requires_grad
    with torch.inference_mode():
        y = op(*case)
    assert_matches_reference(y, *case, what="inference_mode")


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_int64_offsets():
    """R * K > 2^31 elements: row offsets must be computed in 64 bits. (On CPU the same test would
    need 4+ GiB of host memory on a shared machine; the CPU kernel computes p * row_stride in int64.)"""
    k = 7168
    rows = (2 ** 31) // k + 3
    x = torch.empty((rows, k), dtype=torch.bfloat16, device="cuda")
    g = torch.Generator().manual_seed(7)
    tail = make_input(4, k, torch.bfloat16, g)
    head = make_input(2, k, torch.bfloat16, g)
    x[-4:] = tail.cuda()
    x[:2] = head.cuda()
    perm = torch.tensor([rows - 1, 0, -1, rows - 2, rows - 3, 1, rows - 4, -1], device="cuda")
    f = torch.rand(4, 2, generator=g).cuda()
    y = op(x, perm, f, torch.float32)
    small = torch.cat([head, tail]).cuda()
    remap = {rows - 4 + i: 2 + i for i in range(4)}
    perm_small = torch.tensor([remap.get(int(v), int(v)) for v in perm.cpu()], device="cuda")
    assert_matches_reference(y, small, perm_small, f, torch.float32, what="int64 offsets")


@pytest.mark.cuda
@pytest.mark.parametrize("value", [10, 2 ** 40], ids=["just-out-of-range", "huge"])
def test_cuda_out_of_range_raises(value):
    """An entry >= R on CUDA must raise (the kernel checks on the device). In a child process: a
    device-side assert poisons the process's CUDA context for every later test (and its teardown)."""
    run_device_error_child(f"""
    import torch, fused_moe_ops
    x = torch.randn(10, 64, device="cuda"); f = torch.rand(2, 2, device="cuda")
    p = torch.tensor([0, {value}, 1, -1], device="cuda")
    torch.ops.moe.shuffle_mul_sum(x, p, f)""")
