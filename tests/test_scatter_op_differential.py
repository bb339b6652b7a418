"""A random differential test of the scatter form's internal op ``moe::_scatter_mul_sum_fused``, called
directly on every kernel reachable without a GPU (the C++ CPU kernel; the Triton kernel under its
interpreter and the CUDA kernel's device code under our grid emulator, each where it exists), against
the float64 reference.

Each case draws at random: R, M and K from 0 up (M = 1 decode, tokens no row reaches, every row to one
token, a skewed routing), int32 / int64 indices with duplicates and negative entries in each
negative-index mode (plus a strided index), factors None / float32 / float16 / bfloat16 / strided,
factor rounding (70000 overflows float16), scale, addend shapes (M, K), (K,), (1, K), (M, 1), (1, M, K) in
any float dtype, NaN / inf in rows and factors (a skipped row's NaN row or factor has no effect),
strided and transposed input rows, the output dtype, and in a fraction of the cases one out-of-range
entry (the reference's IndexError, word for word, and the caller's tensors unchanged). Checked: NaN and
inf positions, the fp32-accumulation error bound of the dtype (tests/conftest.py), inputs unchanged, a
NaN-poisoned allocator. On the C++ CPU kernel also the determinism contract, bit for bit: the result
is the float32 sum of each token's products added in increasing r (computed here independently).

The calls run in a child process that announces each case before it runs it: a crash (a segfault, an
abort) is reported with its case, and the run goes on from the next one.

    python tests/test_scatter_op_differential.py --kernel cpp --seed 1 --count 5000     # a long run
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

if __name__ == "__main__":  # the worker: load the test helpers pytest would
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import conftest  # noqa: F401  (registers _moe_testlib)

from _moe_testlib import (assert_unmodified, differential_run, differential_worker, error_bound, gen, make_input,
    poison_allocator, seed_of, snapshot)

from fused_moe_ops.ops import FACTOR_ROUND, NEGATIVE_IS_ERROR, SKIP_NEGATIVE, WRAP_NEGATIVE, addend_as_rows
from fused_moe_ops.reference import scatter_mul_sum_fused_reference

HERE = Path(__file__).resolve()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROUND_TO = {code: dtype for dtype, code in FACTOR_ROUND.items() if dtype is not None}


@dataclasses.dataclass(frozen=True)
class ScatterSpec:
    rows: int                  # R
    m: int                     # num_tokens
    k: int
    dtype: torch.dtype
    index_dtype: torch.dtype
    negative_index: int
    routing: str               # "uniform" | "one-token" (every live row to one token) | "skewed" |
                               # "sparse" (few tokens reached)
    factors: Optional[torch.dtype]  # None: factors=None
    factors_strided: bool
    factor_round: int
    scale: float
    addend: Optional[str]      # None | "same" (M, K) | "bias" (K,) | "row" (1, K) | "col" (M, 1) | "viewed" (1, M, K)
    addend_dtype: Optional[torch.dtype]
    row_pad: int               # input rows strided (row stride K + pad)
    transposed: bool           # input's last dimension not dense (a transposed view)
    index_strided: bool
    nonfinite: bool            # NaN / inf in some rows and factors, live and skipped
    bad_entry: Optional[str]   # None | "too-big" | "too-negative" (below -M, wrap mode) | "negative" (error mode)
    out_dtype: Optional[torch.dtype]


def random_case(rng: random.Random) -> ScatterSpec:
    """``rng`` decides everything, so (seed, i) names a case."""
    m = rng.choice((0, 1, 1, 1, 2, 3, 5, 16, 33))
    rows = rng.choice((0, 1, 2, 3, 8, 8, 9, 24, 64, 130))
    k = rng.choice((0, 1, 7, 8, 16, 33, 72, 130, 257) if rng.random() < 0.9 else (1024, 2100))
    if k >= 1024:  # up to 64 rows of 2100 floats: past the kernel's serial cut (256 KiB), so threads share it
        rows, m = min(rows, 64), min(m, 5)
    mode = rng.choice((SKIP_NEGATIVE, WRAP_NEGATIVE, NEGATIVE_IS_ERROR))
    bad = None
    if rng.random() < 0.12:
        bad = rng.choice({SKIP_NEGATIVE: ("too-big",), WRAP_NEGATIVE: ("too-big", "too-negative"),
                          NEGATIVE_IS_ERROR: ("too-big", "negative")}[mode])
        rows = max(rows, 1)
    elif m == 0 and mode != SKIP_NEGATIVE:
        rows = 0  # with no token, every entry of a wrap / error mode index is out of range
    factors = rng.choice((None, torch.float32, torch.float32, torch.float16, torch.bfloat16))
    addend = rng.choice((None, None, None, "same", "bias", "row", "col", "viewed"))
    return ScatterSpec(
        rows=rows, m=m, k=k, dtype=rng.choice(DTYPES), index_dtype=rng.choice((torch.int64, torch.int32)),
        negative_index=mode, routing=rng.choice(("uniform", "uniform", "one-token", "skewed", "sparse")),
        factors=factors, factors_strided=factors is not None and rng.random() < 0.25,
        factor_round=rng.choice((0, 0, 1, 2)), scale=rng.choice((1.0, 1.0, 0.5, -2.0, 3.0)),
        addend=addend, addend_dtype=rng.choice(DTYPES) if addend else None,
        row_pad=rng.choice((0, 0, 0, 3)), transposed=rng.random() < 0.08, index_strided=rng.random() < 0.15,
        nonfinite=rng.random() < 0.25, bad_entry=bad, out_dtype=rng.choice((None, None) + DTYPES))


def _destinations(spec: ScatterSpec, rng: random.Random) -> List[int]:
    """Each row's token (>= 0) or -1 for a row that adds nothing, by the case's routing."""
    m, rows = spec.m, spec.rows
    if m == 0:
        return [-1] * rows
    if spec.routing == "one-token":
        target = rng.randrange(m)
        dest = [target] * rows
    elif spec.routing == "skewed":
        dest = [0 if rng.random() < 0.7 else rng.randrange(m) for _ in range(rows)]
    elif spec.routing == "sparse":
        reached = rng.sample(range(m), max(1, m // 4))
        dest = [rng.choice(reached) for _ in range(rows)]
    else:
        dest = [rng.randrange(m) for _ in range(rows)]
    if spec.negative_index == SKIP_NEGATIVE:
        dest = [d if rng.random() < 0.8 else -1 for d in dest]
    return dest


def _spell(spec: ScatterSpec, dest: List[int], rng: random.Random) -> List[int]:
    """The index entries for the destinations, as the mode spells them: a skipped row as any negative
    number (down to the dtype's least), a token t as t or t - M where negative entries wrap."""
    least = -(2 ** 31) if spec.index_dtype == torch.int32 else -(2 ** 63)
    out = []
    for d in dest:
        if d < 0:
            out.append(rng.choice((-1, -1, -2, -spec.m - 1, least)))
        elif spec.negative_index == WRAP_NEGATIVE and rng.random() < 0.4:
            out.append(d - spec.m)
        else:
            out.append(d)
    return out


def make_case(spec: ScatterSpec, seed: int):
    """(input, index, factors, addend, destinations) on the CPU; ``destinations`` is each row's token
    (-1: adds nothing), what the index says once wrapped."""
    rng = random.Random(seed)
    g = gen(seed)
    rows, m, k = spec.rows, spec.m, spec.k
    if spec.transposed:
        x = make_input(k, rows, spec.dtype, g).t()
    else:
        x = make_input(rows, k, spec.dtype, g, row_pad=spec.row_pad)
    dest = _destinations(spec, rng)
    entries = _spell(spec, dest, rng)
    if spec.bad_entry is not None:
        pos = rng.randrange(rows)
        entries[pos] = {"too-big": rng.choice((m, m + 1, 2 ** 31 - 1)), "too-negative": -m - rng.choice((1, 5)),
                        "negative": rng.choice((-1, -m - 1))}[spec.bad_entry]
        if rng.random() < 0.5 and pos + 1 < rows:  # a second bad one after it: the first is reported
            entries[pos + 1] = m + 7
    index = torch.tensor(entries, dtype=torch.int64).to(spec.index_dtype)
    if spec.index_strided:
        # stride 2; the entries in the gaps are out of range, so reading one would raise
        index = torch.stack([index, torch.full_like(index, 2 ** 30)], 1).view(-1)[::2]
    f = None
    if spec.factors is not None:
        base = (torch.rand(rows * (2 if spec.factors_strided else 1), generator=g, dtype=torch.float64) * 1.5 - 0.25)
        f = base.to(spec.factors)[::2] if spec.factors_strided else base.to(spec.factors)
    if spec.nonfinite and rows:
        # x is this case's own tensor (a fresh one, or a view of one): written in place, layout kept.
        live = [r for r in range(rows) if dest[r] >= 0]
        skipped = [r for r in range(rows) if dest[r] < 0]
        # Skipped rows: NaN rows and NaN / inf factors that must have no effect.
        for r in skipped[:3]:
            x[r] = float("nan")
            if f is not None:
                f[r] = rng.choice((float("nan"), float("inf"), float("-inf")))
        # Live rows: an inf element, a NaN element, a NaN factor, a factor that overflows float16 when rounded.
        for n, r in enumerate(live[:4]):
            if k and n == 0:
                x[r, rng.randrange(k)] = rng.choice((float("inf"), float("-inf")))
            elif k and n == 1:
                x[r, rng.randrange(k)] = float("nan")
            elif f is not None and n == 2:
                f[r] = float("nan")
            elif f is not None and n == 3 and spec.factors != torch.float16:
                f[r] = 7e4
    a = None
    a_dtype = spec.addend_dtype
    if spec.addend == "same":
        a = make_input(m, k, a_dtype, g)
    elif spec.addend == "bias":
        a = make_input(1, k, a_dtype, g).view(k)
    elif spec.addend == "row":
        a = make_input(1, k, a_dtype, g)
    elif spec.addend == "col":
        a = make_input(m, 1, a_dtype, g)
    elif spec.addend == "viewed":
        a = make_input(m, k, a_dtype, g).view(1, m, k)
    return x, index, f, a, dest


def _rounded_factors(spec: ScatterSpec, f, rows: int) -> torch.Tensor:
    if f is None:
        return torch.ones(rows)
    if spec.factor_round:
        f = f.to(ROUND_TO[spec.factor_round])
    return f.float()


def float32_in_order(spec: ScatterSpec, x, f, a, dest: List[int]) -> torch.Tensor:
    """The determinism contract, computed independently of the reference: each token's products
    (each rounded to float32) added in float32 one row after the other in increasing r, then
    ``* scale`` and ``+ addend`` in float32, rounded once to the output dtype. Step j adds every
    token's j-th row at once (elementwise float32 ops: the same bits as one token at a time)."""
    m, k = spec.m, spec.k
    w = _rounded_factors(spec, f, spec.rows)
    acc = torch.zeros(m, k, dtype=torch.float32)
    by_token: Dict[int, List[int]] = {}
    for r, d in enumerate(dest):
        if d >= 0:
            by_token.setdefault(d, []).append(r)
    depth = max((len(v) for v in by_token.values()), default=0)
    for j in range(depth):
        tokens = [t for t, rs in by_token.items() if len(rs) > j]
        rows = [by_token[t][j] for t in tokens]
        product = x[rows].float() * w[rows].unsqueeze(-1)
        acc[tokens] = acc[tokens] + product
    if spec.scale != 1.0:
        acc = acc * spec.scale
    if a is not None:
        acc = acc + addend_as_rows(a, m, k).float()
    return acc.to(spec.out_dtype or spec.dtype)


def _call_args(spec: ScatterSpec, x, index, f, a):
    return (x, index, f, spec.m, spec.out_dtype, spec.negative_index, spec.factor_round, spec.scale, a)


# The worker's own torch ops (the references, the checks) run on one thread: on a machine whose cores
# are busy elsewhere each parallel region can wait milliseconds for a descheduled thread. The kernel
# under test runs with every thread (_kernel_threads), so its parallel split is exercised.
THREADS = torch.get_num_threads()


@contextlib.contextmanager
def _kernel_threads():
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def _reference64(spec: ScatterSpec, x, index, f, a):
    args = list(_call_args(spec, x, index, f, a))
    args[4] = torch.float32  # the float64 sum rounded once to float32 (error_bound counts that rounding)
    ref = scatter_mul_sum_fused_reference(*args, acc_dtype=torch.float64).double()
    args_abs = list(args)
    args_abs[0], args_abs[2], args_abs[7] = x.abs(), None if f is None else f.abs(), abs(spec.scale)
    args_abs[8] = None if a is None else a.abs()
    abs_sum = scatter_mul_sum_fused_reference(*args_abs, acc_dtype=torch.float64).double()
    return ref, abs_sum


def assert_scatter_matches_reference(out, spec: ScatterSpec, x, index, f, a, dest, what: str) -> None:
    out_dtype = spec.out_dtype or spec.dtype
    assert out.dtype == out_dtype and tuple(out.shape) == (spec.m, spec.k), (what, out.dtype, tuple(out.shape))
    ref, abs_sum = _reference64(spec, *(None if t is None else t.cpu() for t in (x, index, f, a)))
    got = out.cpu().double()
    nan = torch.isnan(ref)
    if not spec.nonfinite:
        assert not nan.any(), f"{what}: NaN in the reference of a finite case"
    assert torch.equal(torch.isnan(got), nan), (
        f"{what}: NaN at {torch.isnan(got).nonzero().tolist()[:6]}, the reference at {nan.nonzero().tolist()[:6]} "
        "(poison, or a skipped row's NaN row / factor leaked)")
    inf = torch.isinf(ref)
    assert torch.equal(got[inf], ref[inf]), f"{what}: inf where the reference has it, got {got[inf].tolist()[:6]}"
    depth = max((sum(1 for d in dest if d == t) for t in range(spec.m)), default=0)
    fin = ~(nan | inf)
    bound = error_bound(ref[fin], abs_sum[fin], depth + 1, out_dtype)  # +1: the addend's add
    err = (got[fin] - ref[fin]).abs()
    # Overflow of the output dtype (float16 at 65504) rounds to inf of the right sign.
    overflow_ok = torch.isinf(got[fin]) & (torch.sign(got[fin]) == torch.sign(ref[fin])) & \
        (ref[fin].abs() + bound >= torch.finfo(out_dtype).max)
    bad = ~((err <= bound) | overflow_ok)
    assert not bad.any(), \
        f"{what}: {int(bad.sum())} elements outside the bound; worst err/bound {(err / bound).max().item():.3g}"


def assert_bitwise_float32_in_order(out, spec: ScatterSpec, x, f, a, dest, what: str) -> None:
    want = float32_in_order(spec, x, f, a, dest)
    got = out.cpu()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN positions differ from the in-order float32 sum"
    same = got[~nan].view(-1).view(torch.int16 if got.element_size() == 2 else torch.int32) == \
        want[~nan].view(-1).view(torch.int16 if want.element_size() == 2 else torch.int32)
    assert bool(same.all()), (f"{what}: {int((~same).sum())} elements differ in their bits from the float32 sum of "
                              "each token's rows in increasing r (the determinism contract)")


def run_case(kernel: str, seed: int, i: int) -> None:
    """One case on one kernel; raises AssertionError (or the kernel's error) where it is wrong."""
    spec = random_case(random.Random(f"{seed}/{i}"))
    x, index, f, a, dest = make_case(spec, seed_of("scatter-differential", seed, i))
    before = snapshot(x, index, f, a)
    call = KERNELS[kernel]()
    args = _call_args(spec, x, index, f, a)
    if spec.bad_entry is not None:
        try:
            scatter_mul_sum_fused_reference(*args)
        except IndexError as e:
            want = str(e)
        else:
            raise AssertionError(f"case {seed}/{i}: the reference accepted a bad entry")
        try:
            with _kernel_threads():
                call(*args)
        except IndexError as e:
            assert str(e) == want, f"case {seed}/{i}: {str(e)!r} != the reference's {want!r}"
        except RuntimeError as e:
            # The CUDA kernel checks the range on the device (no host sync): a device-side assert, as
            # cudaErrorAssert reports it, not the host's IndexError.
            message = str(e)
            if (kernel != "cuda_emulated" or "device-side assert triggered" not in message
                    or "out of range" not in message):
                raise
        else:
            raise AssertionError(f"case {seed}/{i}: no IndexError for a bad entry ({want})")
        assert_unmodified(before, x, index, f, a)
        return
    poison_allocator(max(spec.m * spec.k * 4, 64), x.device)
    with _kernel_threads():
        out = call(*args)
    assert_scatter_matches_reference(out, spec, x, index, f, a, dest, f"case {seed}/{i}")
    if kernel == "cpp":
        assert_bitwise_float32_in_order(out, spec, x, f, a, dest, f"case {seed}/{i}")
    assert_unmodified(before, x, index, f, a)


def _cpp():
    from fused_moe_ops import _registry

    assert _registry.SCATTER_ACTIVE.get("cpu") == "cpp", f"the C++ CPU kernel is not loaded: {_registry.SCATTER_ACTIVE}"
    return torch.ops.moe._scatter_mul_sum_fused


def _triton():
    from fused_moe_ops.triton_kernel import scatter_mul_sum_fused_triton

    return scatter_mul_sum_fused_triton


def _cuda_emulated():
    from cuda_emulator import emulated

    return emulated.scatter_fused


# Each kernel as the worker calls it: the internal op's signature.
KERNELS = {"cpp": _cpp, "triton": _triton, "cuda_emulated": _cuda_emulated}
WORKER_ENV = {"triton": {"TRITON_INTERPRET": "1"}}


def kernel_missing(kernel: str) -> Optional[str]:
    """Why a kernel cannot run here (it is another part of the library's, and enables itself once it
    exists), or None. Looked up without importing Triton or building the emulator."""
    if kernel == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        source = HERE.parents[1] / "fused_moe_ops" / "triton_kernel.py"
        if "def scatter_mul_sum_fused_triton" not in source.read_text():
            return "fused_moe_ops.triton_kernel has no scatter_mul_sum_fused_triton"
    if kernel == "cuda_emulated":
        source = HERE.parent / "cuda_emulator" / "emulated.py"
        if not source.is_file() or "def scatter_fused" not in source.read_text():
            return "tests/cuda_emulator/emulated.py has no scatter_fused"
    return None


def _worker(kernel: str, seed: int, start: int, count: int) -> None:
    torch.set_num_threads(1)  # but for the kernel's calls: THREADS above
    differential_worker(run_case, kernel, seed, start, count)


def differential(kernel: str, seed: int, count: int, timeout: float = 900, env: Optional[Dict[str, str]] = None):
    """Run cases ``seed/0 .. seed/count-1`` on ``kernel`` in child processes; returns
    (number of cases that ran, [(case, problem)])."""
    return differential_run(HERE, kernel, seed, count, timeout, dict(WORKER_ENV.get(kernel, {}), **(env or {})))


def _report(seed: int, problems) -> str:
    return "\n\n".join(f"--- case {seed}/{i}: {random_case(random.Random(f'{seed}/{i}'))}\n{p}" for i, p in problems)


# CI's slice: a fixed seed; longer runs from the command line.
@pytest.mark.parametrize("kernel, count", [("cpp", 400), ("triton", 60),
                                           pytest.param("cuda_emulated", 150, marks=pytest.mark.cuda_emulated)])
def test_scatter_internal_op_random_differential(kernel, count):
    why = kernel_missing(kernel)
    if why is not None:
        pytest.skip(why)
    seed = 20261208
    ran, problems = differential(kernel, seed, count)
    assert not problems, _report(seed, problems)
    assert ran == count


def test_random_cases_cover_the_edges():
    """Not vacuous: the slice's cases reach every option and the empty sizes."""
    specs = [random_case(random.Random(f"20261208/{i}")) for i in range(400)]
    assert {s.negative_index for s in specs} == {0, 1, 2} and {s.routing for s in specs} == {
        "uniform", "one-token", "skewed", "sparse"}
    assert {s.addend for s in specs} == {None, "same", "bias", "row", "col", "viewed"}
    assert {s.factors for s in specs} == {None, torch.float32, torch.float16, torch.bfloat16}
    assert {s.bad_entry for s in specs} == {None, "too-big", "too-negative", "negative"}
    assert {s.factor_round for s in specs} == {0, 1, 2} and {s.index_dtype for s in specs} == {torch.int32, torch.int64}
    assert any(s.rows == 0 and s.bad_entry is None for s in specs) and any(s.m == 0 and s.rows > 0 for s in specs)
    assert any(s.k == 0 for s in specs) and any(s.m == 1 and s.rows >= 8 and s.k >= 1024 for s in specs)
    assert all(any(getattr(s, flag) for s in specs)
               for flag in ("factors_strided", "row_pad", "transposed", "index_strided", "nonfinite"))


def test_a_crash_is_reported_with_its_case_and_the_run_goes_on():
    ran, problems = differential("cpp", 20261208, 6, env={"FMO_DIFFERENTIAL_CRASH_AT": "3"})
    assert [i for i, _ in problems] == [3] and "the process died" in problems[0][1], problems
    assert ran == 6


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", choices=sorted(KERNELS), default="cpp")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        _worker(a.kernel, a.seed, a.start, a.count)
    else:
        n, found = differential(a.kernel, a.seed, a.count, timeout=24 * 3600)
        print(_report(a.seed, found) if found else "")
        print(f"{a.kernel}: seed {a.seed}: {n} cases, {len(found)} problems")
        sys.exit(1 if found else 0)
