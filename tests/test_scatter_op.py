"""The scatter form ``moe::scatter_mul_sum`` / ``moe::_scatter_mul_sum_fused`` in named cases on the CPU
kernel: opcheck of both ops, sizes past the kernel's serial cut (its parallel split over tokens and
column chunks: decode M = 1, prefill-like M, every row to one token), the same bits on 1 and on every
thread, the empty sizes, and eager's own spellings (``zeros.index_add_``). The random differential test
(tests/test_scatter_op_differential.py) covers the option space; these are the shapes it does not reach.
"""
from __future__ import annotations

import pytest
import torch

from _moe_testlib import FLOAT_DTYPES, assert_unmodified, poison_allocator, seed_of, snapshot

from fused_moe_ops.ops import SKIP_NEGATIVE, WRAP_NEGATIVE
from test_scatter_op_differential import (
    ScatterSpec, assert_bitwise_float32_in_order, assert_scatter_matches_reference, make_case,
)

scatter = torch.ops.moe.scatter_mul_sum
scatter_fused = torch.ops.moe._scatter_mul_sum_fused


def spec(rows, m, k, dtype=torch.float32, **over) -> ScatterSpec:
    base = dict(rows=rows, m=m, k=k, dtype=dtype, index_dtype=torch.int64, negative_index=SKIP_NEGATIVE,
                routing="uniform", factors=torch.float32, factors_strided=False, factor_round=0, scale=1.0,
                addend=None, addend_dtype=None, row_pad=0, transposed=False, index_strided=False, nonfinite=False,
                bad_entry=None, out_dtype=None)
    base.update(over)
    return ScatterSpec(**base)


# Each reads at least 256 KiB (the kernel's serial cut) unless said otherwise, so threads share it.
LARGE = {
    "decode-M1-topk8-K8192-bf16": spec(8, 1, 8192, torch.bfloat16, addend="same", addend_dtype=torch.bfloat16),
    "decode-M16-topk8-K4096": spec(128, 16, 4096, factor_round=2),
    "prefill-M256-topk8-K1024-bf16-int32": spec(2048, 256, 1024, torch.bfloat16, index_dtype=torch.int32,
                                                out_dtype=torch.float32),
    "all-rows-to-one-token-of-64": spec(1024, 64, 1024, routing="one-token", scale=0.5),
    "skewed-wrap-f16-strided-rows": spec(1024, 48, 768, torch.float16, routing="skewed", negative_index=WRAP_NEGATIVE,
                                         row_pad=5, addend="bias", addend_dtype=torch.float32),
    "sparse-tokens-nonfinite-K-tail": spec(600, 40, 1000, routing="sparse", nonfinite=True, factors=torch.bfloat16),
    "decode-below-serial-cut": spec(8, 1, 4096, torch.bfloat16),
}


def _call(s: ScatterSpec, x, index, f, a):
    return scatter_fused(x, index, f, s.m, s.out_dtype, s.negative_index, s.factor_round, s.scale, a)


@pytest.mark.parametrize("name", list(LARGE))
def test_scatter_large_matches_reference_bitwise(name):
    s = LARGE[name]
    x, index, f, a, dest = make_case(s, seed_of("scatter-large", name))
    before = snapshot(x, index, f, a)
    poison_allocator(s.m * s.k * 4, "cpu")
    out = _call(s, x, index, f, a)
    assert_scatter_matches_reference(out, s, x, index, f, a, dest, name)
    assert_bitwise_float32_in_order(out, s, x, f, a, dest, name)
    assert_unmodified(before, x, index, f, a)


@pytest.mark.parametrize("name", ["decode-M1-topk8-K8192-bf16", "all-rows-to-one-token-of-64",
                                  "prefill-M256-topk8-K1024-bf16-int32"])
def test_scatter_same_bits_on_one_and_every_thread(name):
    """The split over threads (tokens, column chunks) must not change a bit: each element's sum is one
    thread's, in increasing r, whatever the split."""
    s = LARGE[name]
    x, index, f, a, _ = make_case(s, 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _call(s, x, index, f, a)
    finally:
        torch.set_num_threads(threads)
    if threads < 2:
        pytest.skip("one thread only: the split is not exercised")
    every = _call(s, x, index, f, a)
    assert torch.equal(one.view(torch.int16) if one.element_size() == 2 else one.view(torch.int32),
                       every.view(torch.int16) if every.element_size() == 2 else every.view(torch.int32))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_scatter_equals_eager_index_add_float32(dtype):
    """The public op against eager's spelling, ``zeros.index_add_(0, idx, y * w[:, None])`` in float32
    (CPU index_add_ adds in index order), rounded once: the same bits."""
    g = torch.Generator().manual_seed(3)
    y = torch.randn(64, 96, generator=g).to(dtype)
    w = torch.rand(64, generator=g).to(dtype)
    idx = torch.randint(0, 11, (64,), generator=g)
    idx[5] = idx[4]
    eager = torch.zeros(11, 96).index_add_(0, idx, y.float() * w.float()[:, None]).to(dtype)
    assert torch.equal(scatter(y, idx, w, 11), eager)
    plain = torch.zeros(11, 96).index_add_(0, idx, y.float()).to(dtype)
    assert torch.equal(scatter(y, idx, None, 11), plain)


@pytest.mark.parametrize("rows, m, k", [(0, 3, 5), (0, 0, 5), (4, 0, 5), (4, 3, 0), (0, 3, 0)],
                         ids=["R0", "R0-M0", "M0-skipped-rows", "K0", "R0-K0"])
@pytest.mark.parametrize("addend", [None, "col"], ids=["no-addend", "addend-(M,1)"])
def test_scatter_empty_sizes(rows, m, k, addend):
    """No rows: zeros, or the addend (2 * nothing + addend); no tokens or columns: an empty result."""
    x = torch.randn(rows, k)
    index = torch.full((rows,), -1) if m == 0 else torch.randint(0, m, (rows,))
    a = torch.randn(m, 1) if addend else None
    poison_allocator(64, "cpu")
    out = scatter_fused(x, index, None, m, None, SKIP_NEGATIVE, 0, 2.0, a)
    want = torch.zeros(m, k) if a is None else a.expand(m, k)  # every case with elements has no rows
    assert out.shape == (m, k) and out.dtype == torch.float32
    assert torch.equal(out, want)


def test_scatter_skipped_rows_nan_never_read():
    """Rows and factors of skipped entries hold NaN: the result has none."""
    x = torch.randn(6, 40)
    x[1] = float("nan")
    f = torch.rand(6)
    f[4] = float("nan")
    index = torch.tensor([0, -1, 2, 0, -7, 2])
    out = scatter(x, index, f, 3)
    assert not out.isnan().any()
    assert torch.equal(out[1], torch.zeros(40))


def _opcheck_samples():
    x = torch.randn(9, 33)
    idx = torch.tensor([2, 0, -1, 2, 1, 0, 2, 4, 4])
    yield "public-f32", scatter, (x, idx, torch.rand(9), 5, None)
    yield "public-bf16-no-factors-int32", scatter, (x.bfloat16(), idx.int(), None, 5, torch.float32)
    yield "public-M0", scatter, (torch.randn(2, 4), torch.tensor([-1, -3]), None, 0, None)
    a = torch.randn(5, 33)
    wrapped = torch.tensor([2, -5, 4, 2, -4, 0, -3, 4, -1])  # -5 <= t < 0 is token t + 5
    yield "internal-wrap-round-scale-addend", scatter_fused, (x, wrapped, torch.rand(9).half(), 5, None,
                                                             WRAP_NEGATIVE, 2, 0.5, a)
    yield "internal-bias-strided-rows", scatter_fused, (torch.randn(9, 40)[:, :33], idx, torch.rand(18)[::2], 5,
                                                        torch.bfloat16, SKIP_NEGATIVE, 0, 1.0, torch.randn(33))


OPCHECK = list(_opcheck_samples())


@pytest.mark.parametrize("op, args", [pytest.param(op, args, id=name) for name, op, args in OPCHECK])
def test_scatter_opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


def test_scatter_no_elements_needs_no_scratch_per_token():
    """K = 0: the result has no elements however many tokens; the range is still checked, and nothing
    of size M is allocated (2**40 tokens would be 8 TiB of sort scratch)."""
    out = scatter_fused(torch.randn(3, 0), torch.tensor([-1, -2, -3]), None, 2 ** 40)
    assert out.shape == (2 ** 40, 0)
    with pytest.raises(IndexError, match=r"index\[1\] = 5 is out of range"):
        scatter_fused(torch.randn(3, 0), torch.tensor([0, 5, 1]), None, 2)


def test_scatter_token_without_rows_gets_scale_times_zero_plus_addend():
    """scale * 0 + addend for a token no row reaches: the addend for a finite scale, NaN for an infinite
    one (0 * inf), as the reference computes it."""
    x, index, a = torch.randn(4, 40), torch.tensor([0, 2, 2, -1]), torch.randn(3, 40)
    finite = scatter_fused(x, index, None, 3, None, SKIP_NEGATIVE, 0, -2.0, a)
    assert torch.equal(finite[1], a[1])
    infinite = scatter_fused(x, index, None, 3, None, SKIP_NEGATIVE, 0, float("inf"), a)
    assert infinite[1].isnan().all() and infinite[[0, 2]].isinf().all()
