"""The scatter form's CUDA kernels (csrc/scatter_mul_sum_cuda_device.cuh: keys, sort, segment sum),
executed on CPU by the grid emulator (tests/cuda_emulator/), as test_cuda_emulated.py does for the
gather kernel. The sort of step 2 runs on the host there (std::stable_sort stands in for CUB's radix
sort, which the GPU tests run); the two kernels around it are the library's own code.

Each case is checked three ways:
* bit for bit against ``fp32_in_order``: per token, ``acc = acc + f_r * x_r`` over its rows in
  increasing r, each product rounded to float32 before the add (no FMA), then ``* scale``,
  ``+ addend``, one rounding: the contract (deterministic, float32, a token's rows in increasing r).
  Every launch shape and thread order must give exactly it;
* bit for bit against the float32 reference (reference.scatter_mul_sum_fused_reference, CPU
  ``index_add_`` in index order), which the CPU and Triton kernels also match;
* within the float32 accumulation bound of conftest.py of the float64 reference, so that neither
  float32 model can drift from the spec unnoticed.

Built with ASan + UBSan by default (FUSED_MOE_OPS_EMU_BUILD=plain for the quick build); thread order
from FUSED_MOE_OPS_EMU_ORDER (forward | reverse | random, default random).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch

from _moe_testlib import (
    SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, assert_unmodified, gen, make_input, seed_of, snapshot,
)
from cuda_emulator import emulated
from cuda_emulator.emulated import LAUNCHES, Launch, ScatterCall

from fused_moe_ops.ops import FACTOR_ROUND, NEGATIVE_IS_ERROR, SKIP_NEGATIVE, WRAP_NEGATIVE
from fused_moe_ops.reference import scatter_mul_sum_fused_reference

pytestmark = pytest.mark.cuda_emulated

FP32_U = 2.0 ** -24
_ROUND_TO = {1: torch.float16, 2: torch.bfloat16}


# ---- what the kernels must compute -------------------------------------------------------------------

def destinations(index: torch.Tensor, m: int, negative_index: int) -> torch.Tensor:
    """The token of each row (int64), -1 for a skipped row (entries already in range)."""
    t = index.long()
    if negative_index == WRAP_NEGATIVE:
        t = torch.where(t < 0, t + m, t)
    return torch.where(t < 0, torch.full_like(t, -1), t)


def fp32_in_order(c: ScatterCall) -> torch.Tensor:
    """The kernels' result, bit for bit: per token, ``acc = acc + f_r * x_r`` over its rows in increasing
    r, the product rounded to float32 before the add (no FMA: the float32 reference's ``input * factors``
    then index_add_), then ``* scale``, ``+ addend``, one rounding."""
    m, k = c.num_tokens, c.input.shape[1]
    dest = destinations(c.index, m, c.negative_index)
    x = c.input.float()
    f = torch.ones(len(dest)) if c.factors is None else c.factors
    if c.factors is not None and c.factor_round:
        f = f.to(_ROUND_TO[c.factor_round])
    f = f.float()
    acc = torch.zeros(m, k, dtype=torch.float32)
    live = (dest >= 0).nonzero().flatten()
    rank = torch.zeros(len(dest), dtype=torch.long)  # a row's place among its token's rows (r order)
    seen = {}
    for r in live.tolist():
        t = int(dest[r])
        rank[r] = seen.get(t, 0)
        seen[t] = rank[r] + 1
    for j in range(max(seen.values(), default=0)):
        rows = live[rank[live] == j]
        tok = dest[rows]
        acc[tok] = acc[tok] + f[rows, None] * x[rows]
    if c.scale != 1.0:
        acc = acc * torch.tensor(c.scale, dtype=torch.float32)
    if c.addend is not None:
        from fused_moe_ops.ops import addend_as_rows

        acc = acc + addend_as_rows(c.addend, m, k).float()
    return acc.to(c.out_dtype or c.input.dtype)


def assert_matches_float64(out: torch.Tensor, c: ScatterCall, what: str) -> None:
    """Within the float32-accumulation bound of the float64 reference (conftest.py's accuracy model, n the
    token's row count); NaN and inf exactly where the reference has them."""
    out_dtype = c.out_dtype or c.input.dtype
    if out.numel() == 0:
        assert out.dtype == out_dtype and tuple(out.shape) == (c.num_tokens, c.input.shape[1]), what
        return
    args = (c.index, c.factors, c.num_tokens, torch.float32, c.negative_index, c.factor_round, c.scale)
    ref = scatter_mul_sum_fused_reference(c.input, *args, c.addend, acc_dtype=torch.float64).double()
    abs_f = None if c.factors is None else c.factors.abs()
    abs_a = None if c.addend is None else c.addend.abs()
    s = scatter_mul_sum_fused_reference(c.input.abs(), c.index, abs_f, c.num_tokens, torch.float32,
                                        c.negative_index, c.factor_round, abs(c.scale), abs_a,
                                        acc_dtype=torch.float64).double()
    dest = destinations(c.index, c.num_tokens, c.negative_index)
    count = torch.bincount(dest[dest >= 0], minlength=c.num_tokens)[:c.num_tokens].double()
    got = out.double()
    assert out.dtype == out_dtype and tuple(out.shape) == (c.num_tokens, c.input.shape[1]), \
        f"{what}: {out.dtype} {tuple(out.shape)}"
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), \
        f"{what}: NaN where the reference has none, or none where it has"
    finite = torch.isfinite(ref) & torch.isfinite(s)
    acc_err = (count[:, None] + 3) * FP32_U * s
    bound = (acc_err + FP32_U * ref.abs() + UNIT_ROUNDOFF[out_dtype] * (ref.abs() + acc_err)
             + SMALLEST_SUBNORMAL[out_dtype] + SMALLEST_SUBNORMAL[torch.float32])
    fmax = torch.finfo(out_dtype).max
    overflow_ok = torch.isinf(got) & (torch.sign(got) == torch.sign(ref)) & (ref.abs() + bound >= fmax)
    bad = finite & ~(((got - ref).abs() <= bound) | overflow_ok)
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements outside the float32 bound; first at "
                           f"{bad.nonzero()[0].tolist()}: got {got[bad][0].item()!r}, float64 {ref[bad][0].item()!r}")
    inf = torch.isinf(ref)
    assert torch.equal(got[inf], ref[inf]), f"{what}: an inf of the reference differs"


def run_scatter_checked(calls):
    """Every call in one runner process; each result bit for bit fp32_in_order's (whatever the launch
    shape and thread order), the first of each distinct call also against the float64 reference."""
    results = emulated.run(calls)
    checked = set()
    for c, r in zip(calls, results):
        what = c.launch.describe()
        assert r.error is None, f"{what}: the launch failed: {r.error}"
        torch.testing.assert_close(r.out, fp32_in_order(c), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda msg: f"{what}: not the float32 sum in increasing r: {msg}")
        key = id(c.input), id(c.index), c.out_dtype, c.negative_index, c.factor_round, c.scale, id(c.addend)
        if key not in checked:
            assert_matches_float64(r.out, c, what)
            reference32 = scatter_mul_sum_fused_reference(c.input, c.index, c.factors, c.num_tokens, c.out_dtype,
                                                          c.negative_index, c.factor_round, c.scale, c.addend)
            torch.testing.assert_close(r.out, reference32, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda msg: f"{what}: not bitwise the float32 reference: {msg}")
            checked.add(key)
    return results


# ---- inputs ------------------------------------------------------------------------------------------

def make_index(rows: int, m: int, dtype, g, *, negative_index=SKIP_NEGATIVE, skew=True) -> torch.Tensor:
    """Destinations with duplicates, uneven counts (a few tokens take most rows), tokens no row reaches,
    and (skip mode) negative entries of every kind; in wrap mode some entries are -M..-1."""
    if m == 0:
        return torch.full((rows,), -1, dtype=dtype)
    t = torch.randint(0, m, (rows,), generator=g)
    if skew and m > 2:
        hot = torch.rand(rows, generator=g) < 0.4
        t = torch.where(hot, torch.randint(0, 2, (rows,), generator=g), t)  # tokens 0 and 1 take ~40%
        t = torch.where(t == m - 1, torch.zeros_like(t), t)  # token m - 1 receives nothing
    if negative_index == SKIP_NEGATIVE and rows >= 3:
        neg = torch.rand(rows, generator=g) < 0.2
        neg[1] = True
        fillers = torch.tensor([-1, -1, -2, -7, -(2 ** 31)] + ([-(2 ** 63)] if dtype == torch.int64 else []))
        t = torch.where(neg, fillers[torch.randint(0, len(fillers), (rows,), generator=g)], t)
    elif negative_index == WRAP_NEGATIVE:
        wrap = torch.rand(rows, generator=g) < 0.5
        t = torch.where(wrap, t - m, t)
    return t.to(dtype)


def make_factors(rows: int, dtype, g) -> torch.Tensor:
    return (torch.rand(rows, generator=g, dtype=torch.float64) * 1.5 - 0.25).to(dtype)


def calls_for(c: ScatterCall, launches=LAUNCHES):
    return [dataclasses.replace(c, launch=launch) for launch in launches]


# ---- named edge cases --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Spec:
    rows: int
    m: int
    k: int
    dtype: torch.dtype = torch.bfloat16
    factor_dtype: Optional[torch.dtype] = torch.float32   # None: no factors
    out_dtype: Optional[torch.dtype] = None
    index_dtype: torch.dtype = torch.int64
    negative_index: int = SKIP_NEGATIVE
    factor_round: int = 0
    scale: float = 1.0
    addend: Optional[str] = None   # "same" (M, K) input dtype, "row" (K,), "col" (M, 1), "scalar" (1, 1), "3d", "f32"
    all_to: Optional[int] = None   # every row to this token
    row_pad: int = 0               # input rows padded: row stride K + row_pad
    index_step: int = 1            # a strided index view
    skew: bool = True
    launches: tuple = LAUNCHES


CASES = {
    "duplicates-uneven-empty-tokens": Spec(rows=96, m=20, k=64),
    "prefill-shape-f32": Spec(rows=64, m=16, k=72, dtype=torch.float32),
    "decode-M1-column-slices": Spec(rows=8, m=1, k=2048, launches=(Launch(sms=1), Launch(sms=132), Launch(sms=108))),
    "one-token-all-rows-three-chunks": Spec(rows=600, m=5, k=24, all_to=3),
    "one-token-all-rows-chunk-exactly-256": Spec(rows=256, m=2, k=16, all_to=0),
    "segment-257-two-chunks-and-others": Spec(rows=300, m=3, k=16, skew=False, all_to=None),
    "R0-zeros": Spec(rows=0, m=4, k=16),
    "R0-addend-only": Spec(rows=0, m=3, k=16, addend="same", scale=3.0),
    "M0-every-row-skipped": Spec(rows=5, m=0, k=16),
    "K0": Spec(rows=6, m=3, k=0),
    "K0-num-tokens-2-to-the-40": Spec(rows=6, m=2 ** 40, k=0, skew=False),
    "skip-mode-every-negative-kind": Spec(rows=80, m=9, k=40, index_dtype=torch.int64),
    "skip-mode-int32": Spec(rows=80, m=9, k=40, index_dtype=torch.int32),
    "wrap-mode": Spec(rows=70, m=9, k=40, negative_index=WRAP_NEGATIVE),
    "error-mode-valid-entries": Spec(rows=70, m=9, k=40, negative_index=NEGATIVE_IS_ERROR),
    "no-factors": Spec(rows=50, m=7, k=48, factor_dtype=None),
    "factors-f16-rounded-bf16": Spec(rows=50, m=7, k=48, factor_dtype=torch.float16, factor_round=2),
    "factors-f32-rounded-f16": Spec(rows=50, m=7, k=48, factor_round=1),
    "factors-bf16-out-f32": Spec(rows=50, m=7, k=48, factor_dtype=torch.bfloat16, out_dtype=torch.float32),
    "f16-in-bf16-out": Spec(rows=40, m=6, k=40, dtype=torch.float16, out_dtype=torch.bfloat16),
    "f32-in-f16-out-scale": Spec(rows=40, m=6, k=40, dtype=torch.float32, out_dtype=torch.float16, scale=-0.5),
    "addend-same-dtype-vector-path": Spec(rows=40, m=6, k=64, addend="same"),
    "addend-row-broadcast": Spec(rows=40, m=6, k=64, addend="row"),
    "addend-column-broadcast": Spec(rows=40, m=6, k=64, addend="col"),
    "addend-scalar": Spec(rows=40, m=6, k=64, addend="scalar"),
    "addend-3d": Spec(rows=40, m=6, k=64, addend="3d"),
    "addend-f32-for-bf16-input-scale": Spec(rows=40, m=6, k=64, addend="f32", scale=2.0),
    "odd-K-scalar-path": Spec(rows=40, m=6, k=61),
    "padded-rows-odd-stride-scalar-path": Spec(rows=40, m=6, k=64, row_pad=3),
    "padded-rows-vector-stride": Spec(rows=40, m=6, k=64, row_pad=8),
    "strided-index": Spec(rows=40, m=6, k=32, index_step=2, index_dtype=torch.int32),
}


def build(spec: Spec, seed: int) -> ScatterCall:
    g = gen(seed)
    x = make_input(spec.rows, spec.k, spec.dtype, g, row_pad=spec.row_pad)
    if spec.all_to is not None:
        index = torch.full((spec.rows,), spec.all_to, dtype=spec.index_dtype)
    else:
        index = make_index(spec.rows * spec.index_step, spec.m, spec.index_dtype, g,
                           negative_index=spec.negative_index, skew=spec.skew)[::spec.index_step]
    f = None if spec.factor_dtype is None else make_factors(spec.rows, spec.factor_dtype, g)
    addend = None
    if spec.addend is not None:
        shape = {"same": (spec.m, spec.k), "row": (spec.k,), "col": (spec.m, 1), "scalar": (1, 1),
                 "3d": (2, spec.m // 2, spec.k), "f32": (spec.m, spec.k)}[spec.addend]
        dtype = torch.float32 if spec.addend == "f32" else spec.dtype
        addend = torch.randn(*shape, generator=g).to(dtype)
    return ScatterCall(x, index, f, spec.m, spec.out_dtype, spec.negative_index, spec.factor_round, spec.scale,
                       addend)


@pytest.mark.parametrize("name", list(CASES))
def test_case(name):
    spec = CASES[name]
    c = build(spec, seed_of("scatter", name))
    before = snapshot(c.input, c.index, c.factors, c.addend)
    results = run_scatter_checked(calls_for(c, spec.launches))
    assert_unmodified(before, c.input, c.index, c.factors, c.addend)
    vec_ok = spec.k % (16 // c.input.element_size()) == 0 and spec.row_pad % (16 // c.input.element_size()) == 0
    if spec.m == 0 or spec.k == 0:
        assert all(r.shape == (0, 0, 0) for r in results), "a segment-sum launch for an empty result"
    elif not vec_ok:
        assert all(r.shape[2] == 1 for r in results), \
            f"the vector path for rows that do not allow it: {results[0].shape}"
    elif spec.launches == LAUNCHES and spec.m:
        assert any(r.shape[2] > 1 for r in results), "the vector path never taken"
    if name == "decode-M1-column-slices":
        assert max(r.shape[1] for r in results) > 1, [r.shape for r in results]


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["in-f32", "in-f16", "in-bf16"])
def test_every_output_dtype(in_dtype):
    g = gen(seed_of("dtypes", in_dtype))
    x = make_input(30, 40, in_dtype, g)
    index = make_index(30, 7, torch.int64, g)
    calls = []
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        for factor_dtype in (torch.float32, torch.float16, torch.bfloat16):
            c = ScatterCall(x, index, make_factors(30, factor_dtype, g), 7, out_dtype)
            calls += calls_for(c, (Launch(sms=1), Launch(threads=32, slices=2)))
    run_scatter_checked(calls)


def test_unaligned_view_takes_the_scalar_path():
    """Rows that start 2 bytes into their allocation: the vector path must be refused, and the scalar
    one read exactly the view (the runner keeps each pointer's alignment mod 16)."""
    g = gen(7)
    x = make_input(24, 65, torch.bfloat16, g)[:, 1:]
    c = ScatterCall(x, make_index(24, 5, torch.int64, g), make_factors(24, torch.float32, g), 5, torch.float32)
    results = run_scatter_checked(calls_for(c, (Launch(sms=1), Launch(sms=132))))
    assert all(r.shape[2] == 1 for r in results), [r.shape for r in results]


def test_nan_and_inf():
    """A live row's NaN/inf (in its input or its factor) reaches exactly its token; a skipped row's
    never does (its factor is not read); a token no row reaches stays 0."""
    g = gen(11)
    x = make_input(12, 16, torch.float32, g)
    f = make_factors(12, torch.float32, g)
    index = torch.tensor([0, -1, 2, 2, -5, 1, 0, 3, -1, 2, 1, 3])
    f[2] = f[3] = f[5] = 0.5       # positive: the signs of the infs below are known
    x[1, 3] = float("nan")         # skipped row
    f[4] = float("inf")            # skipped row's factor
    f[8] = float("nan")            # skipped row's factor
    x[2, 5] = float("inf")         # token 2, column 5: inf
    x[3, 5] = -float("inf")        # ... and -inf: NaN
    x[5, 7] = float("inf")         # token 1, column 7: inf
    f[7] = float("nan")            # token 3: NaN everywhere
    c = ScatterCall(x, index, f, 5)
    (r, *_) = run_scatter_checked(calls_for(c, (Launch(sms=1), Launch(threads=32, slices=1))))
    out = r.out
    assert torch.isnan(out[2, 5]) and torch.isinf(out[1, 7]) and out[1, 7] > 0
    assert torch.isnan(out[3]).all() and torch.equal(out[4], torch.zeros(16))
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2, :5]).all()


def test_wrap_reads_index_put_tokens():
    """negative_index=1: -M <= t < 0 is token t + M, as index_put(accumulate=True) takes it."""
    x = torch.arange(12.0).view(4, 3)
    index = torch.tensor([-1, -3, 0, 2])
    eager = torch.zeros(3, 3).index_put_((index,), x, accumulate=True)
    assert torch.equal(emulated.scatter_fused(x, index, None, 3, None, WRAP_NEGATIVE), eager)
    skip = torch.zeros(3, 3)
    skip[0], skip[2] = x[2], x[3]
    assert torch.equal(emulated.scatter_fused(x, index, None, 3, None, SKIP_NEGATIVE), skip)


def test_factor_rounding_is_applied():
    x = torch.ones(1, 8)
    f = torch.full((1,), 1.0 + 2.0 ** -10)  # not a bfloat16 value
    index = torch.zeros(1, dtype=torch.int64)
    assert torch.equal(emulated.scatter_fused(x, index, f, 1, None, 0, FACTOR_ROUND[torch.bfloat16]), torch.ones(1, 8))
    assert torch.equal(emulated.scatter_fused(x, index, f, 1, None, 0, 0), torch.full((1, 8), 1.0 + 2.0 ** -10))


# ---- errors on the device ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode, bad, m, k", [
    pytest.param(SKIP_NEGATIVE, 6, 6, 32, id="skip-mode-M"),
    pytest.param(WRAP_NEGATIVE, -7, 6, 32, id="wrap-below-minus-M"),
    pytest.param(NEGATIVE_IS_ERROR, -1, 6, 32, id="error-mode-minus-1"),
    pytest.param(SKIP_NEGATIVE, 0, 0, 32, id="M0-any-non-negative-entry"),
    pytest.param(SKIP_NEGATIVE, 9, 6, 0, id="K0-still-checked"),
])
def test_out_of_range_entry_asserts_on_the_device(mode, bad, m, k):
    """Entry 3 is out of range: the keys kernel's device assert names it (block 0, thread 3) and the call
    raises, as cudaErrorAssert does; nothing is read for it (ASan). Checked even when the result is empty."""
    x = torch.randn(8, k)
    index = torch.tensor([0, 3, 1, bad, 2, 2, 5, 0]).clamp(max=max(m - 1, 0)) if m else torch.tensor([-1] * 8)
    index[3] = bad
    with pytest.raises(emulated.EmulatedLaunchError) as info:
        emulated.scatter_fused(x, index, torch.rand(8), m, None, mode)
    message = str(info.value)
    assert "device-side assert triggered" in message and "block: [0,0,0], thread: [3,0,0]" in message, message
    assert "index entry out of range" in message, message


# ---- planted bugs: each must fail these checks ---------------------------------------------------------

def _planted_calls():
    calls = []
    for name in ("duplicates-uneven-empty-tokens", "one-token-all-rows-three-chunks", "wrap-mode"):
        c = build(CASES[name], seed_of("planted", name))
        calls += [dataclasses.replace(c, launch=Launch(threads=threads, order=order))
                  for order in ("forward", "reverse") for threads in (32, 128)]
    return calls


def _planted_failure(plants, variant):
    calls = _planted_calls()
    try:
        results = emulated.run(calls, variant=variant, plants=plants)
    except emulated.EmulatorCrash as e:
        reports = [ln for ln in str(e).splitlines() if "ERROR: AddressSanitizer" in ln or "runtime error" in ln]
        return f"crash: {(reports or [str(e)[:300]])[0]}"
    for c, r in zip(calls, results):
        if r.error is not None:
            return f"launch error: {r.error[:300]}"
        if not torch.equal(r.out.nan_to_num(7.0), fp32_in_order(c).nan_to_num(7.0)):
            return f"wrong answer ({c.launch.describe()})"
    return ""


def test_planted_calls_pass_without_plants():
    assert _planted_failure((), "plain") == ""


SCATTER_PLANTS = {
    # a skipped row sent to token 0: token 0 gains rows it must not have
    "SCATTER_SKIP_KEY_ZERO": ("plain", "wrong answer"),
    # upper_bound for the segment start: every token reads its successor's rows
    "SEGMENT_UPPER_BOUND": ("plain", "wrong answer"),
    # slots read before the threads that stage them have run: poison row numbers (-1), read out of bounds
    "SCATTER_NO_SYNCTHREADS_AFTER_STAGING": ("sanitized", "heap-buffer-overflow"),
}


@pytest.mark.slow  # a build of the emulated kernel each (~25 s of g++, ~70 s sanitized)
@pytest.mark.parametrize("plant", list(SCATTER_PLANTS))
def test_planted_bug_fails(plant):
    variant, how = SCATTER_PLANTS[plant]
    failure = _planted_failure((plant,), variant)
    assert failure, f"PLANT_{plant} passed"
    assert how in failure, f"PLANT_{plant} failed, but not as expected ({how!r}): {failure}"
