"""Hypothesis property test: moe::shuffle_mul_sum agrees with the float64 reference on arbitrary
small calls (at least 200 examples).

Hypothesis draws the structure (shapes, dtypes, permutation entries incl. duplicates, -1, other
negatives and out-of-range-free edges, layouts, form); the values are fresh random data from a
drawn seed (never zeros), so shrinking works on the structure. Also checked per example: the
fake (meta) agrees on shape and dtype, no argument is modified, `out` is fully written.
"""
from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from _moe_testlib import (
    DEVICES, FLOAT_DTYPES, Case, assert_matches_reference, assert_unmodified, gen, make_factors, make_input,
    nan_like, poison_allocator, snapshot, to_device,
)

op = torch.ops.moe.shuffle_mul_sum

SETTINGS = settings(max_examples=250, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def calls(draw):
    m = draw(st.integers(0, 9))
    topk = draw(st.one_of(st.integers(1, 9), st.sampled_from([16, 64])))
    k = draw(st.one_of(st.integers(0, 70), st.sampled_from([127, 128, 129, 1024, 4097])))
    in_dtype = draw(st.sampled_from(FLOAT_DTYPES))
    fac_dtype = draw(st.sampled_from(FLOAT_DTYPES))
    index = draw(st.sampled_from(["int32", "int64", "identity"]))
    if index == "identity":
        rows, perm = m * topk, None
    else:
        rows = draw(st.integers(0, 24))
        negative = st.sampled_from([-1, -1, -2, -3, -(2 ** 31)])
        entry = st.one_of(st.integers(0, rows - 1), negative) if rows else negative
        values = draw(st.lists(entry, min_size=m * topk, max_size=m * topk))
        perm = torch.tensor(values, dtype=torch.int64).to(torch.int32 if index == "int32" else torch.int64)
        if draw(st.booleans()) and perm.numel():  # a strided (non-contiguous) permutation
            wide = torch.full((2 * perm.numel(),), 12345, dtype=perm.dtype)
            wide[::2] = perm
            perm = wide[::2]
    row_pad = draw(st.sampled_from([0, 0, 1, 3, 16]))
    factors_transposed = draw(st.booleans())
    form = draw(st.sampled_from(["functional", "out"]))
    out_dtype = draw(st.sampled_from(FLOAT_DTYPES + (None,))) if form == "functional" else \
        draw(st.sampled_from(FLOAT_DTYPES))
    out_layout = draw(st.sampled_from(["contiguous", "transposed", "row-padded"])) if form == "out" else None
    seed = draw(st.integers(0, 2 ** 32 - 1))
    g = gen(seed)
    x = make_input(rows, k, in_dtype, g, row_pad=row_pad, scale=draw(st.sampled_from([1.0, 1e-3, 1e3])))
    f = make_factors(m, topk, fac_dtype, g, transposed=factors_transposed)
    return Case(x, perm, f), form, out_dtype, out_layout


def _check(device, call):
    (x, p, f), form, out_dtype, out_layout = call
    case = Case(*(to_device(t, device) for t in (x, p, f)))
    before = snapshot(*case)
    m, k = f.shape[0], x.shape[1]
    if form == "out":
        out = nan_like((m, k), out_dtype, device, layout=out_layout)
        res = op.out(*case, out=out)
        assert res.data_ptr() == out.data_ptr()
        expect_dtype = out_dtype
    else:
        poison_allocator(m * k * 4, device)
        out = op(*case, out_dtype)
        expect_dtype = out_dtype or x.dtype
    assert_unmodified(before, *case)
    assert_matches_reference(out, *case, expect_dtype, what=f"{form} {tuple(x.shape)} M={m} topk={f.shape[1]}")
    if form == "functional":  # the fake agrees with the kernel on shape and dtype
        meta = op(*(None if t is None else t.to("meta") for t in case), out_dtype)
        assert meta.shape == out.shape and meta.dtype == out.dtype


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(call=calls())
def test_matches_reference(device, call):
    _check(device, call)
