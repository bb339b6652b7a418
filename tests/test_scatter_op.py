"""``moe::scatter_mul_sum`` and its internal twin ``moe::_scatter_mul_sum_fused``: the named edge cases,
on every kernel reachable without a GPU: the ops as registered for CPU tensors (whatever serves CPU),
and the Triton kernel under its interpreter (a child process: TRITON_INTERPRET is read when
fused_moe_ops.triton_kernel is imported, as in tests/test_triton.py).

Every case: fresh random data with duplicates, uneven counts, tokens that receive nothing and negative
entries the mode allows; a NaN-poisoned allocator; inputs compared before and after; the float64
reference's NaN positions and its fp32-accumulation error bound for the dtype (tests/conftest.py),
with each token's rows counted as the terms of its sum; out_dtype=float32 too, where a narrower
accumulator could not hide behind the output's rounding.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import pytest
import torch

if __name__ == "__main__":  # the Triton worker (below): load the test helpers pytest would
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import conftest  # noqa: F401  (registers _moe_testlib)

from _moe_testlib import (
    NEGATIVE_FILLERS_I32, NEGATIVE_FILLERS_I64, assert_unmodified, error_bound, gen, make_input, poison_allocator,
    run_device_error_child, seed_of, snapshot, to_device,
)

import fused_moe_ops  # noqa: F401  (registers the ops)
from fused_moe_ops.ops import FACTOR_ROUND, NEGATIVE_IS_ERROR, SKIP_NEGATIVE, WRAP_NEGATIVE
from fused_moe_ops.reference import scatter_mul_sum_fused_reference

HERE = Path(__file__).resolve()


class Kernel(NamedTuple):
    name: str
    public: Callable  # (input, index, factors, num_tokens, out_dtype=None)
    fused: Callable   # (input, index, factors, num_tokens, out_dtype, negative_index, factor_round, scale, addend)


def op_kernel() -> Kernel:
    """The ops through the dispatcher, on CPU tensors: whatever serves the CPU key."""
    return Kernel("op", torch.ops.moe.scatter_mul_sum, torch.ops.moe._scatter_mul_sum_fused)


def triton_kernel() -> Kernel:
    from fused_moe_ops.triton_kernel import scatter_mul_sum_fused_triton, scatter_mul_sum_triton

    return Kernel("triton", scatter_mul_sum_triton, scatter_mul_sum_fused_triton)


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------
class Spec(NamedTuple):
    r: int = 23                 # input rows
    m: int = 7                  # num_tokens
    k: int = 20
    dtype: torch.dtype = torch.bfloat16
    factors: Optional[torch.dtype] = torch.float32  # None: factors=None
    index_dtype: torch.dtype = torch.int64
    mode: int = SKIP_NEGATIVE   # negative_index
    rounding: Optional[torch.dtype] = None
    scale: float = 1.0
    # addend: "same" (M, K) | "bias" (K,) float32 | "row" (1, K) | "col" (M, 1) | "viewed" (1, M, K)
    addend: Optional[str] = None
    pattern: str = "skewed"     # "skewed": uneven counts, a token with none | "one-token": every row to token M-1
    row_pad: int = 0            # input rows strided (row stride K + pad)
    strided: bool = False       # factors and index non-contiguous views
    nonfinite: bool = False     # NaN/inf rows and factors: on skipped entries (no effect) and live ones


CASES = {
    "duplicates-uneven-counts-f32": Spec(dtype=torch.float32),
    "bf16-skip-negatives-int32": Spec(index_dtype=torch.int32),
    "f16-skip-negatives-int64": Spec(dtype=torch.float16),
    "wrap-negatives-as-index_put": Spec(mode=WRAP_NEGATIVE),
    "error-mode-no-negatives": Spec(mode=NEGATIVE_IS_ERROR, index_dtype=torch.int32),
    "tokens-receiving-nothing-M-gt-R": Spec(r=5, m=12),
    "all-rows-to-one-token": Spec(r=13, m=3, pattern="one-token"),
    "all-rows-to-one-token-wrap": Spec(r=9, m=2, pattern="one-token", mode=WRAP_NEGATIVE),
    "many-rows-per-token": Spec(r=41, m=3, dtype=torch.float32),
    "M1-decode": Spec(r=8, m=1, k=70),
    "R0-no-rows": Spec(r=0),
    "R0-no-rows-addend": Spec(r=0, addend="same"),
    "M0-every-entry-negative": Spec(m=0, r=6),
    "K0": Spec(k=0),
    "K-over-several-column-blocks": Spec(r=9, m=3, k=130),
    "factors-none": Spec(factors=None),
    "factors-none-wrap-f16": Spec(factors=None, dtype=torch.float16, mode=WRAP_NEGATIVE),
    "factors-bf16-input-f32": Spec(dtype=torch.float32, factors=torch.bfloat16),
    "factors-f16-input-bf16": Spec(factors=torch.float16),
    "factor-round-bf16": Spec(rounding=torch.bfloat16),
    "factor-round-f16-f32-rows": Spec(dtype=torch.float32, rounding=torch.float16),
    "scale": Spec(scale=2.5),
    "addend-same": Spec(addend="same", dtype=torch.float32),
    "addend-f32-bias-broadcast": Spec(addend="bias"),
    "addend-row-1xK": Spec(addend="row"),
    "addend-col-Mx1": Spec(addend="col"),
    "addend-viewed-3d": Spec(addend="viewed", mode=WRAP_NEGATIVE),
    "scale-and-addend-f16": Spec(dtype=torch.float16, scale=-0.75, addend="same"),
    "strided-rows-factors-index": Spec(row_pad=3, strided=True, index_dtype=torch.int32),
    "nonfinite-rows-and-factors": Spec(nonfinite=True),
    "nonfinite-rows-and-factors-wrap": Spec(nonfinite=True, mode=WRAP_NEGATIVE, dtype=torch.float32),
}


def _destinations(spec: Spec, g: torch.Generator) -> torch.Tensor:
    """Each row's token in [0, M): duplicates, uneven counts, and (M >= 3) a token that gets none."""
    if spec.m == 0 or spec.r == 0:
        return torch.zeros(spec.r, dtype=torch.int64)
    if spec.pattern == "one-token":
        return torch.full((spec.r,), spec.m - 1, dtype=torch.int64)
    dest = (torch.rand(spec.r, generator=g, dtype=torch.float64) ** 2 * spec.m).long().clamp(max=spec.m - 1)
    if spec.m >= 3:
        dest[dest == spec.m // 2] = 0
    if spec.r >= 2:
        dest[-1] = dest[0]
    return dest


def make_scatter_case(spec: Spec, seed: int):
    """(input, index, factors, addend) on CPU, for ``spec``; negative entries as the mode allows them:
    skip: any negative (-1, -2, INT_MIN, ...); wrap: the same token written t - M; error: none."""
    g = gen(seed)
    x = make_input(spec.r, spec.k, spec.dtype, g, row_pad=spec.row_pad)
    dest = _destinations(spec, g)
    idx = dest.clone()
    n = spec.r
    if spec.mode != NEGATIVE_IS_ERROR and n >= 3:
        neg = torch.rand(n, generator=g) < 0.25
        neg[1] = True
        if spec.m == 0:
            neg[:] = True  # no token to go to: every entry is skipped
        if spec.mode == SKIP_NEGATIVE or spec.m == 0:
            fillers = NEGATIVE_FILLERS_I32 if spec.index_dtype == torch.int32 else NEGATIVE_FILLERS_I64
            vals = torch.tensor(fillers, dtype=torch.int64)[torch.randint(0, len(fillers), (n,), generator=g)]
            vals[1] = -1
        else:
            vals = dest - spec.m  # the same token, wrapped: -M <= t < 0
        idx = torch.where(neg, vals, dest)
    idx = idx.to(spec.index_dtype)
    f = None
    if spec.factors is not None:
        f = (torch.rand(n, generator=g, dtype=torch.float64) * 1.5 - 0.25).to(spec.factors)
    if spec.nonfinite:
        x, f = _poison(spec, x, idx, f)
    if spec.strided:
        idx = torch.stack([idx, torch.full_like(idx, 2**30)], 1).view(-1)[::2]  # the others: out of range
        if f is not None:
            f = torch.stack([f, torch.full_like(f, float("nan"))], 1).view(-1)[::2]
    a = None
    a_dtype = torch.float32 if spec.addend == "bias" else spec.dtype
    shape = {"same": (spec.m, spec.k), "bias": (spec.k,), "row": (1, spec.k), "col": (spec.m, 1),
             "viewed": (1, spec.m, spec.k), None: None}[spec.addend]
    if shape is not None:
        a = make_input(int(torch.Size(shape).numel()), 1, a_dtype, g).view(shape)
    return x, idx, f, a


def _poison(spec: Spec, x, idx, f):
    """NaN / inf where the semantics say what they do: on a skipped entry's row and factor (no effect),
    on a live row and a live factor (its token's sum is NaN / inf, as eager's)."""
    assert spec.mode == WRAP_NEGATIVE or (idx < 0).any(), "the case needs a skipped entry"
    x, f = x.clone(), f.clone()
    live = (idx >= 0) if spec.mode == SKIP_NEGATIVE else torch.ones_like(idx, dtype=torch.bool)
    skipped = (~live).nonzero().view(-1).tolist()
    for n, r in enumerate(skipped):
        x[r] = (float("nan"), float("inf"), float("-inf"))[n % 3]
        f[r] = (float("inf"), float("nan"))[n % 2]
    alive = live.nonzero().view(-1).tolist()
    x[alive[0], 0] = float("inf")
    x[alive[1], 1] = float("nan")
    f[alive[2]] = float("nan")
    return x, f


def _counts(idx, m: int, mode: int) -> int:
    """The most rows one token sums (the number of terms of the longest sum)."""
    dest = idx.long()
    if mode == WRAP_NEGATIVE:
        dest = torch.where(dest < 0, dest + m, dest)
    dest = dest[(dest >= 0) & (dest < m)]
    return int(torch.bincount(dest, minlength=1).max()) if dest.numel() else 0


def _call(kernel: Kernel, spec: Spec, x, idx, f, a, out_dtype=None):
    return kernel.fused(x, idx, f, spec.m, out_dtype, spec.mode, FACTOR_ROUND[spec.rounding], spec.scale, a)


def assert_scatter_matches_reference(out, x, idx, f, m, mode=SKIP_NEGATIVE, rounding=0, scale=1.0, a=None,
                                     out_dtype=None, what=""):
    """``out`` against the float64 reference: dtype, shape, NaN and inf positions, and elsewhere the
    fp32-accumulation bound of the dtype for sums of as many terms as the fullest token has."""
    out_dtype = out_dtype or x.dtype
    k = x.shape[1]
    assert out.dtype == out_dtype and tuple(out.shape) == (m, k), f"{what}: {out.dtype} {tuple(out.shape)}"
    args = (m, torch.float32, mode, rounding)
    ref = scatter_mul_sum_fused_reference(x, idx, f, *args, scale, a, acc_dtype=torch.float64).double()
    abs_sum = scatter_mul_sum_fused_reference(x.abs(), idx, None if f is None else f.abs(), *args, abs(scale),
                                              None if a is None else a.abs(), acc_dtype=torch.float64).double()
    got = out.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), (
        f"{what}: NaN at {torch.isnan(got).nonzero().tolist()[:6]}, the reference at "
        f"{torch.isnan(ref).nonzero().tolist()[:6]} (poison, or a skipped row / factor leaked)")
    assert torch.equal(got[torch.isinf(ref)], ref[torch.isinf(ref)]), f"{what}: inf not where the reference has it"
    terms = _counts(idx, m, mode) + (a is not None)
    bound = error_bound(ref[finite], abs_sum[finite], max(terms, 1), out_dtype)
    err = (got[finite] - ref[finite]).abs()
    assert (err <= bound).all(), (
        f"{what}: {int((err > bound).sum())} elements outside the fp32-accumulation bound; worst err/bound "
        f"{(err / bound).max().item():.3g}")


def _same_bits_or_both_nan(a, b) -> bool:
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def check_case(kernel: Kernel, name: str, device: str = "cpu") -> None:
    spec = CASES[name]
    cpu = make_scatter_case(spec, seed_of("scatter", name))
    x, idx, f, a = (to_device(t, device) for t in cpu)
    before = snapshot(x, idx, f, a)
    for out_dtype in (None, torch.float32):
        poison_allocator(max(spec.m * spec.k * 4, 64), device)
        out = _call(kernel, spec, x, idx, f, a, out_dtype)
        assert out.device == x.device, out.device
        assert_scatter_matches_reference(out.cpu(), *cpu[:3], spec.m, spec.mode, FACTOR_ROUND[spec.rounding],
                                         spec.scale, cpu[3], out_dtype, f"{kernel.name} {name} out_dtype={out_dtype}")
    if spec.mode == SKIP_NEGATIVE and not (spec.rounding or spec.scale != 1.0 or a is not None):
        # the public op is the internal one with its defaults
        public = kernel.public(x, idx, f, spec.m)
        assert _same_bits_or_both_nan(public, _call(kernel, spec, x, idx, f, a)), f"{name}: public op differs"
    assert_unmodified(before, x, idx, f, a)


# ------------------------------------------------------------------------------------------------
# Named semantics, each on a kernel (in-process for the op, in the worker for Triton)
# ------------------------------------------------------------------------------------------------
def check_eager_spellings(kernel: Kernel) -> None:
    """index_add_, scatter_add_ (negative entries an error there: mode 2), index_put_(accumulate=True)
    (negative entries wrap: mode 1), index_add_ of the rows kept (mode 0), in float32, within the
    bound; and each rounded to the input's dtype as the op rounds once."""
    for dtype in (torch.bfloat16, torch.float32):
        spec = Spec(r=29, m=6, k=24, dtype=dtype)
        g = gen(seed_of("eager", dtype))
        x = make_input(spec.r, spec.k, dtype, g)
        dest = _destinations(spec, g)
        w = (torch.rand(spec.r, generator=g) * 1.5 - 0.25).to(torch.bfloat16)
        y = x.float() * w.float()[:, None]
        zeros = torch.zeros(spec.m, spec.k)
        wrapped = torch.where(torch.arange(spec.r) % 3 == 1, dest - spec.m, dest)
        skipped = torch.where(torch.arange(spec.r) % 4 == 1, -1, dest)
        eager = {
            (NEGATIVE_IS_ERROR, "index_add_"): (dest, zeros.clone().index_add_(0, dest, y)),
            (NEGATIVE_IS_ERROR, "scatter_add_"): (dest, zeros.clone().scatter_add_(0, dest[:, None].expand(-1, spec.k),
                                                                                    y)),
            (WRAP_NEGATIVE, "index_put_"): (wrapped, zeros.clone().index_put_((wrapped,), y, accumulate=True)),
            (SKIP_NEGATIVE, "index_add_-kept"): (skipped, zeros.clone().index_add_(0, skipped[skipped >= 0],
                                                                                   y[skipped >= 0])),
        }
        for (mode, spelling), (idx, want) in eager.items():
            what = f"{kernel.name} vs eager {spelling} {dtype}"
            terms = _counts(idx, spec.m, mode)
            ref = scatter_mul_sum_fused_reference(x, idx, w, spec.m, torch.float32, mode, acc_dtype=torch.float64)
            mag = scatter_mul_sum_fused_reference(x.abs(), idx, w.abs(), spec.m, torch.float32, mode,
                                                  acc_dtype=torch.float64)
            bound = error_bound(ref.double(), mag.double(), terms, torch.float32)
            assert ((want.double() - ref.double()).abs() <= bound).all(), f"{what}: eager itself off (test setup)"
            got = kernel.fused(x, idx, w, spec.m, torch.float32, mode)
            assert ((got.double() - want.double()).abs() <= 2 * bound).all(), what
            rounded = kernel.fused(x, idx, w, spec.m, None, mode)
            assert rounded.dtype == dtype
            tol = 2 * bound + torch.finfo(dtype).eps * want.double().abs()
            assert ((rounded.double() - want.double()).abs() <= tol).all(), f"{what} rounded to {dtype}"
        # and the public op is mode 0
        idx = eager[(SKIP_NEGATIVE, "index_add_-kept")][0]
        assert torch.equal(kernel.public(x, idx, w, spec.m, torch.float32),
                           kernel.fused(x, idx, w, spec.m, torch.float32, SKIP_NEGATIVE)), kernel.name


OUT_OF_RANGE = {  # (negative_index, the bad entry at position 2 of 4, M=4, what the message says)
    "skip-mode-M": (SKIP_NEGATIVE, 4, "index[2] = 4 is out of range: the result has 4 rows (num_tokens), so entries "
                                      "must be < 4 (negative entries are skipped)"),
    "skip-mode-huge-int64": (SKIP_NEGATIVE, 2**40, f"index[2] = {2**40} is out of range"),
    "wrap-mode-below-minus-M": (WRAP_NEGATIVE, -5, "index[2] = -5 is out of range: the result has 4 rows "
                                                   "(num_tokens), so entries must be in [-4, 4)"),
    "wrap-mode-M": (WRAP_NEGATIVE, 4, "index[2] = 4 is out of range"),
    "error-mode-minus-1": (NEGATIVE_IS_ERROR, -1, "index[2] = -1 is out of range: the result has 4 rows "
                                                  "(num_tokens), so entries must be in [0, 4)"),
    "error-mode-M": (NEGATIVE_IS_ERROR, 4, "index[2] = 4 is out of range"),
}


def check_out_of_range(kernel: Kernel) -> None:
    """An IndexError naming the index, the position, the value and the bound, in each mode; the first bad
    position is named; nothing of the caller's is written."""
    for name, (mode, bad, message) in OUT_OF_RANGE.items():
        for index_dtype in (torch.int64, torch.int32):
            if bad >= 2**31 and index_dtype == torch.int32:
                continue
            x, f = torch.randn(4, 8), torch.rand(4)
            idx = torch.tensor([0, 1, bad, 7], dtype=index_dtype)  # 7: out of range too, but later
            before = snapshot(x, idx, f)
            try:
                kernel.fused(x, idx, f, 4, None, mode)
            except IndexError as e:
                assert message in str(e) and str(e).startswith("moe::scatter_mul_sum: "), f"{name}: {e}"
            else:
                raise AssertionError(f"{kernel.name} {name}: no IndexError")
            assert_unmodified(before, x, idx, f)
    try:
        kernel.public(torch.randn(3, 2), torch.tensor([0, -1, 3]), None, 3)
    except IndexError as e:
        assert "index[2] = 3 is out of range" in str(e), str(e)
    else:
        raise AssertionError("the public op accepted an entry >= num_tokens")
    # M = 0: no entry but a negative one (skipped) is in range; K = 0 and R = 0 still check
    for call in (lambda: kernel.public(torch.randn(2, 3), torch.tensor([-1, 0]), None, 0),
                 lambda: kernel.public(torch.randn(2, 0), torch.tensor([0, 5]), None, 3),
                 lambda: kernel.fused(torch.randn(2, 3), torch.tensor([-1, 0]), None, 0, None, WRAP_NEGATIVE)):
        try:
            call()
        except IndexError as e:
            assert "is out of range" in str(e), str(e)
        else:
            raise AssertionError("an out-of-range entry of an empty result was accepted")


def check_skipped_factor_never_read(kernel: Kernel) -> None:
    """A skipped entry adds nothing, whatever its row and factor hold (NaN, inf): 2, not NaN."""
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.tensor([[bad, bad], [1.0, 1.0], [1.0, -1.0]])
        idx = torch.tensor([-1, 1, -7])
        w = torch.tensor([bad, 2.0, bad])
        want = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
        for out in (kernel.public(x, idx, w, 2), kernel.fused(x, idx, w, 2, None, SKIP_NEGATIVE, 2, 1.0, None)):
            assert torch.equal(out, want), (bad, out)
    # while a live NaN factor or row makes its token NaN, as eager's index_add_ does
    x = torch.ones(3, 2)
    w = torch.tensor([float("nan"), 1.0, 1.0])
    out = kernel.public(x, torch.tensor([0, 1, 1]), w, 2)
    assert torch.isnan(out[0]).all() and torch.equal(out[1], torch.full((2,), 2.0)), out


def check_factor_round_applied(kernel: Kernel) -> None:
    """Factors whose rounding moves the result: rounded as .to(bfloat16) / .to(float16) round them."""
    x = torch.ones(1, 4)
    idx = torch.zeros(1, dtype=torch.int64)
    f = torch.tensor([1.0 + 2.0 ** -10])  # not a bfloat16 value; a float16 one
    assert torch.equal(kernel.fused(x, idx, f, 1, None, 0, FACTOR_ROUND[torch.bfloat16]), torch.ones(1, 4))
    assert torch.equal(kernel.fused(x, idx, f, 1, None, 0, 0), torch.full((1, 4), 1.0 + 2.0 ** -10))
    f = torch.tensor([1.0 + 2.0 ** -13])  # not a float16 value: rounds to 1
    assert torch.equal(kernel.fused(x, idx, f, 1, None, 0, FACTOR_ROUND[torch.float16]), torch.ones(1, 4))
    big = torch.tensor([7e4])  # overflows float16: inf, as w.to(float16) gives
    assert torch.isinf(kernel.fused(x, idx, big, 1, None, 0, FACTOR_ROUND[torch.float16])).all()


def sequential_float32_sum(x, idx, f, m: int):
    """out[t] = (((0 + y_r0) + y_r1) + ...) in float32, r0 < r1 < ... the rows of token t, y_r =
    x[r] * f[r] rounded to float32: the order the op defines, spelt out."""
    out = torch.zeros(m, x.shape[1], dtype=torch.float32)
    for r in range(x.shape[0]):
        t = int(idx[r])
        if 0 <= t < m:
            out[t] = out[t] + x[r].float() * (1.0 if f is None else f[r].float())
    return out


def check_determinism(kernel: Kernel) -> None:
    """Bitwise repeatable, and bitwise the float32 sum of each token's rows in increasing r (rounded once
    to a narrower out_dtype). Factors are
    powers of two, so each product is exact (with or without FMA) and only the order of the adds
    decides the bits; the data is chosen so that another order gives other bits."""
    g = gen(seed_of("determinism"))
    r, m, k = 64, 5, 33
    x = make_input(r, k, torch.float32, g) * torch.exp2(torch.randint(-12, 12, (r, 1), generator=g).float())
    idx = torch.randint(0, m, (r,), generator=g)
    idx[::7] = -1
    f = torch.exp2(torch.randint(-3, 4, (r,), generator=g).float()) * (torch.randint(0, 2, (r,), generator=g) * 2 - 1)
    want = sequential_float32_sum(x, idx, f, m)
    backwards = sequential_float32_sum(x.flip(0), idx.flip(0), f.flip(0), m)
    assert not torch.equal(want, backwards), "test setup: the order of the adds must matter for this data"
    for fac in (f, None):
        want = sequential_float32_sum(x, idx, fac, m)
        first = kernel.public(x, idx, fac, m, torch.float32)
        for _ in range(2):
            assert torch.equal(kernel.public(x, idx, fac, m, torch.float32), first), "not bitwise repeatable"
        diff = (first != want).sum().item()
        assert diff == 0, f"{kernel.name}: {diff} elements differ from the float32 sum in increasing r"
        for out_dtype in (torch.bfloat16, torch.float16):  # then one rounding, to nearest even
            diff = (kernel.public(x, idx, fac, m, out_dtype) != want.to(out_dtype)).sum().item()
            assert diff == 0, f"{kernel.name}: {diff} elements not the float32 sum rounded once to {out_dtype}"


def check_bad_arguments(kernel: Kernel) -> None:
    """Every check of ops.check_scatter_args / check_scatter_fused_args, with its message."""
    for name, (call, exc, message) in BAD_ARGS.items():
        try:
            call(kernel)
        except exc as e:
            assert message in str(e), f"{name}: {e}"
        else:
            raise AssertionError(f"{kernel.name} {name}: accepted")


def _ok():
    return torch.randn(4, 8), torch.tensor([0, 1, -1, 1]), torch.rand(4)


def _bad(over, public=True):
    """A call with one argument replaced (``over``: name -> value)."""
    def call(kernel):
        x, idx, f = _ok()
        kw = dict(input=x, index=idx, factors=f, num_tokens=2, out_dtype=None, negative_index=0, factor_round=0,
                  scale=1.0, addend=None)
        kw.update(over)
        if public:
            return kernel.public(kw["input"], kw["index"], kw["factors"], kw["num_tokens"], kw["out_dtype"])
        return kernel.fused(*kw.values())
    return call


P = "moe::scatter_mul_sum: "
BAD_ARGS = {
    "input-None": (_bad(dict(input=None)), RuntimeError, P + "input must be a tensor (R, K), got None"),
    "index-None": (_bad(dict(index=None)), RuntimeError, P + "index must be a tensor (R,), got None"),
    "input-1d": (_bad(dict(input=torch.randn(4))), RuntimeError,
                 P + "input must be a 2-D tensor (R, K), got 1-D with shape (4,)"),
    "input-float64": (_bad(dict(input=torch.randn(4, 8, dtype=torch.float64))), RuntimeError,
                      P + "input must have dtype float32, float16, bfloat16, got torch.float64"),
    "input-int32": (_bad(dict(input=torch.ones(4, 8, dtype=torch.int32))), RuntimeError,
                    P + "input must have dtype float32, float16, bfloat16, got torch.int32"),
    "index-float32": (_bad(dict(index=torch.zeros(4))), RuntimeError,
                      P + "index must have dtype int32 or int64, got torch.float32"),
    "index-int16": (_bad(dict(index=torch.zeros(4, dtype=torch.int16))), RuntimeError,
                    P + "index must have dtype int32 or int64, got torch.int16"),
    "index-too-short": (_bad(dict(index=torch.tensor([0, 1, 1]))), RuntimeError,
                        P + "index must be a 1-D tensor of input.shape[0] = 4 entries (R,), got shape (3,)"),
    "index-2d": (_bad(dict(index=torch.zeros(2, 2, dtype=torch.int64))), RuntimeError,
                 P + "index must be a 1-D tensor of input.shape[0] = 4 entries (R,), got shape (2, 2)"),
    "factors-2d": (_bad(dict(factors=torch.rand(4, 1))), RuntimeError,
                   P + "factors must be a 1-D tensor of input.shape[0] = 4 entries (R,) or None, got shape (4, 1)"),
    "factors-too-long": (_bad(dict(factors=torch.rand(5))), RuntimeError,
                         P + "factors must be a 1-D tensor of input.shape[0] = 4 entries (R,) or None, got shape (5,)"),
    "factors-float64": (_bad(dict(factors=torch.rand(4, dtype=torch.float64))), RuntimeError,
                        P + "factors must have dtype float32, float16, bfloat16, got torch.float64"),
    "num_tokens-negative": (_bad(dict(num_tokens=-1)), RuntimeError, P + "num_tokens must be >= 0, got -1"),
    "out_dtype-float64": (_bad(dict(out_dtype=torch.float64)), RuntimeError,
                          P + "out_dtype must be one of float32, float16, bfloat16 or None, got torch.float64"),
    "out_dtype-int32": (_bad(dict(out_dtype=torch.int32)), RuntimeError,
                        P + "out_dtype must be one of float32, float16, bfloat16 or None, got torch.int32"),
    "negative_index-3": (_bad(dict(negative_index=3), public=False), RuntimeError,
                         P + "negative_index must be 0 (skip), 1 (wrap) or 2 (error), got 3"),
    "factor_round-5": (_bad(dict(factor_round=5), public=False), RuntimeError,
                       P + "factor_round must be 0 (none), 1 (float16) or 2 (bfloat16), got 5"),
    "addend-shape": (_bad(dict(addend=torch.randn(3, 8)), public=False), RuntimeError,
                     P + "addend must broadcast to (M, K) = (2, 8) or, with more than 2 dimensions, hold M*K "
                     "elements with last dimension K, got (3, 8)"),
    "addend-3d-numel": (_bad(dict(addend=torch.randn(1, 2, 4)), public=False), RuntimeError,
                        P + "addend must broadcast to (M, K) = (2, 8)"),
    "addend-int32": (_bad(dict(addend=torch.ones(2, 8, dtype=torch.int32)), public=False), RuntimeError,
                     P + "addend must have dtype float32, float16, bfloat16, got torch.int32"),
}
# Devices: a second device is what only the fake can be shown here (a meta tensor beside CPU ones).
BAD_DEVICES = {
    "index-device": (dict(index=torch.zeros(4, dtype=torch.int64, device="meta")),
                     P + "index must be on the same device as input (cpu), got meta"),
    "factors-device": (dict(factors=torch.rand(4, device="meta")),
                       P + "factors must be on the same device as input (cpu), got meta"),
    "addend-device": (dict(addend=torch.rand(2, 8, device="meta")),
                      P + "addend must be on the same device as input (cpu), got meta"),
}


def check_empty_sizes(kernel: Kernel) -> None:
    """R = 0, M = 0, K = 0: the result's shape and dtype, zeros (+ addend) where no row arrives."""
    a = torch.randn(3, 4)
    cases = [
        (torch.randn(0, 4), torch.zeros(0, dtype=torch.int64), torch.rand(0), 3, None, torch.zeros(3, 4)),
        (torch.randn(0, 4), torch.zeros(0, dtype=torch.int32), None, 3, a, a),
        (torch.randn(5, 4), torch.full((5,), -1), torch.rand(5), 0, None, torch.zeros(0, 4)),
        (torch.randn(5, 0), torch.tensor([0, 1, 2, 2, -1]), torch.rand(5), 3, None, torch.zeros(3, 0)),
        (torch.randn(0, 0), torch.zeros(0, dtype=torch.int64), None, 0, None, torch.zeros(0, 0)),
    ]
    for x, idx, f, m, add, want in cases:
        for out_dtype in (None, torch.bfloat16):
            poison_allocator(256, "cpu")
            out = kernel.fused(x, idx, f, m, out_dtype, SKIP_NEGATIVE, 0, 1.0, add)
            assert out.dtype == (out_dtype or x.dtype) and out.shape == want.shape, (out.dtype, out.shape)
            assert torch.equal(out, want.to(out.dtype)), out


CHECKS = {
    "eager-spellings": check_eager_spellings,
    "out-of-range-each-mode": check_out_of_range,
    "skipped-row-and-factor-never-read": check_skipped_factor_never_read,
    "factor-round-applied": check_factor_round_applied,
    "determinism-bitwise-increasing-r": check_determinism,
    "bad-arguments-name-the-argument": check_bad_arguments,
    "empty-sizes": check_empty_sizes,
}


# ------------------------------------------------------------------------------------------------
# The op as registered for CPU tensors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_scatter_case(name):
    check_case(op_kernel(), name)


@pytest.mark.parametrize("name", list(CHECKS))
def test_scatter_semantics(name):
    CHECKS[name](op_kernel())


@pytest.mark.parametrize("name", list(BAD_ARGS) + list(BAD_DEVICES))
def test_scatter_fake_rejects_bad_arguments(name):
    """The fake (what torch.compile traces with) raises what the kernels raise."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        if name in BAD_DEVICES:
            over, message = BAD_DEVICES[name]
            call, exc = _bad(over, public=False), RuntimeError
        else:
            call, exc, message = BAD_ARGS[name]
        with pytest.raises(exc) as info:
            call(op_kernel())
    assert message in str(info.value), str(info.value)


def _compiled_combine():
    def combine(x, idx, f, m: int, mode: int):  # the op alone: no kernel of Inductor's own to compile
        return torch.ops.moe._scatter_mul_sum_fused(x, idx, f, m, None, mode)

    return torch.compile(combine, fullgraph=True)


@pytest.mark.parametrize("name", ["skip-mode-M", "wrap-mode-below-minus-M", "error-mode-minus-1"])
def test_scatter_compiled_out_of_range_raises_the_same(name):
    """torch.compile(fullgraph=True) of a function calling the op raises eager's IndexError. The
    internal op is lowered as the op (forced_lowering("op")): left to choose, Inductor inlines its
    decomposition at this size, whose own bounds check refuses the same entries with its RuntimeError
    (compile_tests/test_fusion_scatter_form.py holds every lowering to that)."""
    from fused_moe_ops.fusion.autotune import forced_lowering

    torch._dynamo.reset()
    mode, bad, message = OUT_OF_RANGE[name]
    x, f = torch.randn(4, 8), torch.rand(4)
    with forced_lowering("op"):
        combine = _compiled_combine()
        good = combine(x, torch.tensor([0, 1, 3, 2]), f, 4, mode)  # compiles with valid data first
        assert_scatter_matches_reference(good, x, torch.tensor([0, 1, 3, 2]), f, 4, mode)
        with pytest.raises(IndexError) as info:
            combine(x, torch.tensor([0, 1, bad, 2]), f, 4, mode)
    assert message in str(info.value), str(info.value)


def test_public_scatter_compiled_out_of_range_raises_the_same():
    """The public op (never replaced by Inductor's code) raises eager's IndexError from a compiled graph."""
    torch._dynamo.reset()
    combine = torch.compile(lambda x, idx, f: torch.ops.moe.scatter_mul_sum(x, idx, f, 4), fullgraph=True)
    x, f = torch.randn(4, 8), torch.rand(4)
    torch.testing.assert_close(combine(x, torch.tensor([0, 1, 3, 2]), f),
                               torch.ops.moe.scatter_mul_sum(x, torch.tensor([0, 1, 3, 2]), f, 4))
    with pytest.raises(IndexError) as info:
        combine(x, torch.tensor([0, 1, 4, 2]), f)
    assert "index[2] = 4 is out of range" in str(info.value), str(info.value)


def test_scatter_compiled_static_and_dynamic():
    """Static shapes, and dynamic=True over R and M (the fake's SymInt num_tokens): eager's results,
    one compile for the dynamic function across sizes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()

    def combine(x, idx, f, like):  # M from a tensor's size: a SymInt under dynamic=True
        return torch.ops.moe.scatter_mul_sum(x, idx, f, like.shape[0], torch.float32)

    static = torch.compile(combine, fullgraph=True)
    counter = CompileCounterWithBackend("inductor")
    dynamic = torch.compile(combine, fullgraph=True, dynamic=True, backend=counter)
    for r, m in ((23, 7), (40, 11), (9, 3)):
        spec = Spec(r=r, m=m, k=16)
        x, idx, f, _ = make_scatter_case(spec, seed_of("compile", r, m))
        like = torch.randn(m, 16)
        want = torch.ops.moe.scatter_mul_sum(x, idx, f, m, torch.float32)
        for fn in ((static,) if r == 23 else ()) + (dynamic,):
            got = fn(x, idx, f, like)
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert counter.frame_count == 1, f"dynamic=True recompiled: {counter.frame_count} compiles"


def test_scatter_opcheck():
    x, idx, f, a = make_scatter_case(Spec(addend="same", mode=WRAP_NEGATIVE, rounding=torch.bfloat16), 7)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.moe.scatter_mul_sum, (x, idx.clamp(min=-1), f, 7, torch.float32),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.moe._scatter_mul_sum_fused, (x, idx, f, 7, None, WRAP_NEGATIVE, 2, 0.5, a),
                          test_utils=utils)


@pytest.mark.parametrize("which", ["public", "fused"])
def test_scatter_backward_raises(which):
    x = torch.randn(5, 4, requires_grad=True)
    idx = torch.tensor([0, 1, 1, -1, 2])
    op = torch.ops.moe.scatter_mul_sum if which == "public" else torch.ops.moe._scatter_mul_sum_fused
    out = op(x, idx, torch.rand(5), 3)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="derivative for moe::scatter_mul_sum is not implemented"):
        out.sum().backward()


def test_harness_catches_a_wrong_answer():
    """The comparison rejects: a float32 sum rounded through bfloat16 after every add (an accumulator
    of the input's dtype), a skipped entry's row added, a NaN where the result has none."""
    spec = Spec(r=40, m=4, k=16)
    x, idx, f, _ = make_scatter_case(spec, 3)
    keep = idx >= 0
    bf16_acc = torch.zeros(spec.m, spec.k, dtype=torch.bfloat16)
    for r in keep.nonzero().view(-1).tolist():
        bf16_acc[idx[r]] = (bf16_acc[idx[r]].float() + x[r].float() * f[r].float()).to(torch.bfloat16)
    leaked = scatter_mul_sum_fused_reference(x, idx.clamp(min=0), f, spec.m, torch.float32)
    poisoned = scatter_mul_sum_fused_reference(x, idx, f, spec.m, torch.float32)
    poisoned[1, 2] = float("nan")
    for wrong in (bf16_acc.float(), leaked, poisoned):
        with pytest.raises(AssertionError):
            assert_scatter_matches_reference(wrong, x, idx, f, spec.m, out_dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# The compiled Triton kernel on a GPU (called directly: the op on CUDA may be served by another kernel)
# ------------------------------------------------------------------------------------------------
def _triton_on_cuda() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


triton_cuda_only = pytest.mark.skipif(not _triton_on_cuda(), reason="needs a CUDA device and triton")


@pytest.mark.cuda
@triton_cuda_only
@pytest.mark.parametrize("name", list(CASES))
def test_scatter_triton_cuda(name):
    """Each case on the compiled kernel; and bitwise the float32 reference (no FMA contraction)."""
    check_case(triton_kernel(), name, "cuda")
    spec = CASES[name]
    x, idx, f, a = make_scatter_case(spec, seed_of("scatter", name))
    want = scatter_mul_sum_fused_reference(x, idx, f, spec.m, None, spec.mode, FACTOR_ROUND[spec.rounding],
                                           spec.scale, a)
    got = _call(triton_kernel(), spec, *(to_device(t, "cuda") for t in (x, idx, f, a))).cpu()
    assert _same_bits_or_both_nan(got, want), f"{name}: not bitwise the float32 sum in increasing r"


@pytest.mark.cuda
@triton_cuda_only
@pytest.mark.parametrize("name", [n for n in CHECKS if n != "out-of-range-each-mode"])
def test_scatter_triton_cuda_semantics(name):
    """The named checks build CPU tensors: the kernel pair moves them to the GPU and the result back."""
    tk = triton_kernel()

    def on_cuda(fn):
        def call(*args):
            moved = [to_device(t, "cuda") if isinstance(t, torch.Tensor) else t for t in args]
            return fn(*moved).cpu()
        return call

    CHECKS[name](Kernel("triton-cuda", on_cuda(tk.public), on_cuda(tk.fused)))


@pytest.mark.cuda
@triton_cuda_only
def test_scatter_triton_cuda_no_sync_and_graph_capture():
    """A warm call never waits for the device; captured in a CUDA graph, it replays on new data."""
    from fused_moe_ops.triton_kernel import scatter_mul_sum_fused_triton as fused

    spec = Spec(r=4096, m=512, k=2048, mode=WRAP_NEGATIVE, addend="same")
    first = [to_device(t, "cuda") for t in make_scatter_case(spec, 1)]
    x, idx, f, a = (t.clone() for t in first)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture (compile, autotune)
        for _ in range(2):
            fused(x, idx, f, spec.m, None, spec.mode, 0, 1.0, a)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused(x, idx, f, spec.m, None, spec.mode, 0, 1.0, a)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused(x, idx, f, spec.m, None, spec.mode, 0, 1.0, a)
    for trial in range(3):
        case = make_scatter_case(spec, 1 + trial)
        for dst, src in zip((x, idx, f, a), case):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert_scatter_matches_reference(y.cpu(), *case[:3], spec.m, spec.mode, a=case[3], what=f"replay {trial}")


@pytest.mark.cuda
@triton_cuda_only
@pytest.mark.parametrize("mode,bad", [(SKIP_NEGATIVE, 16), (WRAP_NEGATIVE, -17), (NEGATIVE_IS_ERROR, -1)],
                         ids=["skip-mode-M", "wrap-mode-below-minus-M", "error-mode-minus-1"])
def test_scatter_triton_cuda_device_assert_on_out_of_range(mode, bad):
    """An out-of-range entry trips the device-side assertion (in a child: it poisons the context)."""
    line = run_device_error_child(f"""
    import torch
    from fused_moe_ops.triton_kernel import scatter_mul_sum_fused_triton as fused
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, 16, (64,), device="cuda")
    fused(x, idx, None, 16, None, {mode}); torch.cuda.synchronize()
    idx[9] = {bad}
    fused(x, idx, None, 16, None, {mode})""")
    assert "device-side assert" in line, line  # checked on the device, never on the host


def _recorder(calls, name):
    class Launch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((name, args, kwargs))
    return Launch()


def test_scatter_triton_machine_code(monkeypatch):
    """The kernels as _scatter_launch launches them, compiled for sm_90 without a GPU: the index's range
    check is in the keys kernel's code (a device-side assertion), and the segment sum has no FMA (a
    product rounded before its add: what makes the GPU's sum bitwise the CPU's)."""
    pytest.importorskip("triton")
    from fused_moe_ops import triton_kernel as tk
    from fused_moe_ops.codegen.triton import _isolated_cache

    if tk.INTERPRET:
        pytest.skip("triton_kernel was imported under TRITON_INTERPRET=1: nothing to compile")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jits = {"keys": tk._scatter_keys_kernel, "segment": tk._scatter_segment_sum_kernel.fn}  # under its autotuner
    calls = []
    monkeypatch.setattr(tk, "_scatter_keys_kernel", _recorder(calls, "keys"))
    monkeypatch.setattr(tk, "_scatter_segment_sum_kernel", _recorder(calls, "segment"))
    x, idx, f, a = make_scatter_case(Spec(addend="same", rounding=torch.bfloat16, scale=0.5), 5)
    tk._scatter_launch(x, idx, f, torch.empty(7, 20, dtype=x.dtype), 7, 20, SKIP_NEGATIVE, 2, 0.5, a)
    assert [c[0] for c in calls] == ["keys", "segment"], calls

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    block_k, warps = tk.GPU_CONFIGS[0]
    ptx = {}
    for name, args, kwargs in calls:
        jit = jits[name]
        if name == "segment":
            kwargs = dict(kwargs, BLOCK_K=block_k, num_warps=warps, num_stages=1)
        kwargs = dict(kwargs, debug=jit.debug)
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, consts, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
        try:
            with _isolated_cache(), contextlib.redirect_stdout(io.StringIO()):  # nor read nor fill a user's cache
                compiled = triton.compile(ASTSource(jit, signature, consts, attrs), target=target,
                                          options=options.__dict__)
        except Exception as e:  # noqa: BLE001 - no ptxas / no CUDA backend in this triton
            pytest.skip(f"cannot compile for sm_90 here: {type(e).__name__}: {str(e)[:200]}")
        ptx[name] = compiled.asm["ptx"]
    assert "__assertfail" in ptx["keys"], "the keys kernel lost its device-side range check"
    assert "fma.rn.f32" not in ptx["segment"], "the segment sum contracts a product and its add into an FMA"
    assert "mul.rn.f32" in ptx["segment"] or "mul.f32" in ptx["segment"], "no float32 multiply: wrong kernel?"


# ------------------------------------------------------------------------------------------------
# The Triton kernel, under its interpreter in a child process
# ------------------------------------------------------------------------------------------------
def _triton_worker() -> None:
    kernel = triton_kernel()
    verdicts = {}
    for group, names, run in (("case", CASES, lambda n: check_case(kernel, n)),
                              ("check", CHECKS, lambda n: CHECKS[n](kernel))):
        for name in names:
            try:
                run(name)
                verdicts[f"{group}:{name}"] = "ok"
            except Exception:  # noqa: BLE001 - reported per case
                verdicts[f"{group}:{name}"] = traceback.format_exc(limit=4)
    print("VERDICTS " + json.dumps(verdicts))


_TRITON_VERDICTS = None


def _triton_verdicts():
    global _TRITON_VERDICTS
    if _TRITON_VERDICTS is None:
        env = dict(os.environ, TRITON_INTERPRET="1", FUSED_MOE_OPS_NO_CUDA="1", CUDA_VISIBLE_DEVICES="")
        env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), str(HERE.parent), env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, str(HERE), "--triton-worker"], env=env, capture_output=True,
                              text=True, timeout=600, cwd=str(HERE.parents[1]))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("VERDICTS ")), None)
        assert line is not None, \
            f"triton worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        _TRITON_VERDICTS = json.loads(line[len("VERDICTS "):])
    return _TRITON_VERDICTS


@pytest.mark.xdist_group("scatter_op_triton")  # one worker: the interpreter subprocess runs once
@pytest.mark.parametrize("name", [f"case:{n}" for n in CASES] + [f"check:{n}" for n in CHECKS])
def test_scatter_triton_interpreter(name):
    pytest.importorskip("triton")
    verdict = _triton_verdicts().get(name, "missing from the worker's verdicts")
    assert verdict == "ok", verdict


if __name__ == "__main__" and "--triton-worker" in sys.argv:
    _triton_worker()
