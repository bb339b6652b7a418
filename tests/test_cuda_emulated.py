"""The CUDA kernel's device code (csrc/shuffle_mul_sum_cuda_device.cuh), executed on CPU by our grid
emulator (tests/cuda_emulator/), against the float64 reference: the cases that test_op.py and
test_fused_op.py run on the C++ CPU kernel and the Triton interpreter, from the same generators, each
under the launch shapes `launch` picks for 1, 108 and 132 SMs and under forced shapes.

Built with ASan + UBSan by default (FUSED_MOE_OPS_EMU_BUILD=plain for the quick build); thread order
from FUSED_MOE_OPS_EMU_ORDER (forward | reverse | random, default random). The last section builds the
kernel with known bugs put back (-DPLANT_*) and checks that each one fails.

    python -m pytest -m cuda_emulated
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from _moe_testlib import (
    assert_matches_reference, assert_unmodified, make_case, make_input, nan_like, seed_of, snapshot,
)
from cuda_emulator import emulated
from cuda_emulator.emulated import LAUNCHES, Call, Launch

import test_fused_op as fused_tests
import test_op as op_tests
from fused_moe_ops.ops import FACTOR_ROUND, NEGATIVE_IS_ERROR, SKIP_NEGATIVE, WRAP_NEGATIVE

pytestmark = pytest.mark.cuda_emulated

# Emulation costs about 1 us per element-slot: cases above this many run under two launch shapes
# (1 SM: the widest blocks; 132 SMs: the decode split) instead of all six.
ALL_LAUNCHES_UP_TO = 300_000


def launches_for(m: int, topk: int, k: int):
    if m * max(topk, 1) * k <= ALL_LAUNCHES_UP_TO:
        return LAUNCHES
    return (Launch(sms=1), Launch(sms=132))


def _call_key(call: Call) -> tuple:
    """A call's arguments but its launch (tensors by identity; `out` by dtype)."""
    return tuple((id(v) if isinstance(v, torch.Tensor) else v) if f.name != "out" else (v is not None and v.dtype)
                 for f in dataclasses.fields(call) if f.name != "launch" for v in (getattr(call, f.name),))


def run_checked(calls, check):
    """Run every call (one runner process). The first result of each distinct call (its arguments
    but the launch) goes through check(out, call, what) against the float64 reference; the others
    must equal it bit for bit: whatever the grid, block and thread order, each output element is
    accumulated over the same staged slots in the same order."""
    results = emulated.run(calls)
    first = {}
    for call, result in zip(calls, results):
        what = call.launch.describe()
        assert result.error is None, f"{what}: the launch failed: {result.error}"
        key = _call_key(call)
        if key not in first:
            check(result.out, call, what)
            first[key] = (result.out, what)
        else:
            torch.testing.assert_close(result.out, first[key][0], rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{what} differs from {first[key][1]}: {m}")
    return results


# ---- the public op: test_op.py's shape grid, dtype combinations, layouts, large topk --------------

def _run_public(case, out_dtype, form, launches, *, what):
    x, p, f = case
    m, k = f.shape[0], x.shape[1]
    before = snapshot(*case)
    calls = []
    for launch in launches:
        out = nan_like((m, k), out_dtype or x.dtype, "cpu") if form == "out" else None
        calls.append(Call(x, p, f, None if form == "out" else out_dtype, out=out, launch=launch))

    def check(out, call, launch_what):
        assert_matches_reference(out, x, p, f, out_dtype or x.dtype, what=f"{what} {launch_what}")

    results = run_checked(calls, check)
    assert_unmodified(before, *case)
    return results


@pytest.mark.parametrize("m, topk, k, dtypes, index_dtype, form", op_tests._shape_cases())
def test_shapes(m, topk, k, dtypes, index_dtype, form):
    in_dt, fac_dt, out_dt = dtypes
    case = make_case(m, topk, k, in_dtype=in_dt, fac_dtype=fac_dt, index_dtype=index_dtype,
                     seed=seed_of(m, topk, k, dtypes, index_dtype))
    out_dtype = None if form == "default-dtype" else out_dt
    results = _run_public(case, out_dtype, form, launches_for(m, topk, k), what=f"M={m} topk={topk} K={k}")
    if m == 0 or k == 0:
        assert all(r.shape == (0, 0, 0) for r in results), "a launch for an empty output"


@pytest.mark.parametrize("form", ["functional", "out"])
@pytest.mark.parametrize("dtypes", [pytest.param(c, id=op_tests.combo_id(*c)) for c in op_tests.DTYPE_COMBOS])
def test_dtypes(dtypes, form):
    in_dt, fac_dt, out_dt = dtypes
    index_dtype = torch.int32 if in_dt == fac_dt else torch.int64
    # test_op's case at K = 1031 (odd: the scalar path) and 1032 (the vector path), not 4097: emulation time.
    for k in (1031, 1032):
        case = make_case(7, 6, k, in_dtype=in_dt, fac_dtype=fac_dt, index_dtype=index_dtype, rows=30,
                         seed=seed_of("dtypes", dtypes, k))
        _run_public(case, out_dt, form, launches_for(7, 6, k), what=op_tests.combo_id(*dtypes))


@pytest.mark.parametrize("m, topk, k", [pytest.param(7, 6, 1025, id="M7_topk6_K1025"),
                                        pytest.param(128, 8, 7, id="M128_topk8_K7")])
@pytest.mark.parametrize("layout", op_tests.LAYOUTS)
def test_layouts(layout, m, topk, k):
    case = op_tests._layout_case(layout, m, topk, k, seed_of(layout, m, topk, k))
    _run_public(case, torch.float32, "functional", launches_for(m, topk, k), what=layout)


@pytest.mark.parametrize("k", [pytest.param(64, id="K64-aligned"), pytest.param(61, id="K61-odd")])
def test_unaligned_views(k):
    """Views that start 2 or 4 bytes into an allocation: the vector path must be refused, and the
    scalar one read exactly the view (the runner keeps each pointer's alignment mod 16)."""
    case = make_case(5, 4, k + 1, in_dtype=torch.bfloat16, seed=seed_of("unaligned", k))
    x = case.input[:, 1:]
    for launch in (Launch(sms=1), Launch(sms=132)):
        out = nan_like((5, k + 1), torch.float32, "cpu")[:, 1:]
        result = emulated.run([Call(x, case.permutation, case.factors, out=out, launch=launch)])[0]
        assert result.error is None, result.error
        assert result.shape[2] == 1, f"the vector path for an unaligned view: {result.shape}"
        assert_matches_reference(result.out, x, case.permutation, case.factors, torch.float32, what="unaligned")


@pytest.mark.parametrize("m, topk, k", [
    pytest.param(5, 1, 64, id="topk1"),
    pytest.param(5, 2, 72, id="topk2"),
    pytest.param(3, 33, 64, id="topk33-odd"),
    pytest.param(2, 256, 40, id="topk256-one-full-chunk"),
    pytest.param(2, 257, 40, id="topk257-two-chunks"),
    pytest.param(1, 600, 24, id="topk600-three-chunks-decode"),
])
def test_topk(m, topk, k):
    case = make_case(m, topk, k, in_dtype=torch.bfloat16, fac_dtype=torch.float32, seed=seed_of("topk", m, topk, k))
    _run_public(case, torch.float32, "functional", launches_for(m, topk, k), what=f"topk={topk}")


# ---- the internal op: every case of test_fused_op.py --------------------------------------------

# Beyond test_fused_op.py's cases: the paths only the CUDA kernel has (the NaN flag sticky over staging
# chunks, per-row factors over several chunks, one slot per row).
EXTRA_FUSED_CASES = {
    "row-mask-nan-flag-over-chunks-topk300": fused_tests.Spec(m=2, topk=300, k=40, row_mask=True, nonfinite=True),
    "per-row-factors-topk513-int32": fused_tests.Spec(m=2, topk=513, k=24, per_row=True, index_dtype=torch.int32,
                                                      rounding=torch.float16, dtype=torch.float32),
    "topk1-addend-scale-f16": fused_tests.Spec(m=9, topk=1, k=64, dtype=torch.float16, scale=-2.0, addend="same",
                                               negative_index=SKIP_NEGATIVE),
}


@pytest.mark.parametrize("name", list(fused_tests.CASES) + list(EXTRA_FUSED_CASES))
def test_fused(name):
    spec = fused_tests.CASES.get(name) or EXTRA_FUSED_CASES[name]
    x, p, f, a, mask = fused_tests.make_fused_case(spec, seed_of("fused", name), "cpu")
    before = snapshot(x, p, f, a, mask)
    calls = [Call(x, p, f, out_dtype, spec.negative_index, FACTOR_ROUND[spec.rounding], spec.scale, a, mask,
                  launch=launch)
             for out_dtype in (None, torch.float32) for launch in launches_for(spec.m, spec.topk, spec.k)]

    def check(out, call, what):
        fused_tests.assert_fused_matches_reference(out, spec, x, p, f, a, mask, call.out_dtype or spec.dtype,
                                                   f"{name} out_dtype={call.out_dtype} {what}")

    run_checked(calls, check)
    assert_unmodified(before, x, p, f, a, mask)


def test_fused_wrap_reads_the_row_eager_reads():
    x = torch.arange(12.0).view(4, 3)
    p = torch.tensor([-1, -4, 0, 3])
    f = torch.ones(2, 2)
    eager = (x[p].view(2, 2, 3) * f.view(2, 2, 1)).sum(1)
    assert torch.equal(emulated.fused(x, p, f, None, WRAP_NEGATIVE), eager)
    assert torch.equal(emulated.fused(x, p, f, None, SKIP_NEGATIVE), torch.stack([torch.zeros(3), x[0] + x[3]]))


def test_fused_rounding_is_applied():
    x = torch.ones(1, 8)
    f = torch.full((1, 1), 1.0 + 2.0 ** -10)  # not a bfloat16 value
    p = torch.zeros(1, dtype=torch.int64)
    assert torch.equal(emulated.fused(x, p, f, None, WRAP_NEGATIVE, FACTOR_ROUND[torch.bfloat16]), torch.ones(1, 8))
    assert torch.equal(emulated.fused(x, p, f, None, WRAP_NEGATIVE, 0), torch.full((1, 8), 1.0 + 2.0 ** -10))


# ---- errors on the device ------------------------------------------------------------------------

@pytest.mark.parametrize("mode, bad", [pytest.param(SKIP_NEGATIVE, 10, id="skip-mode-R"),
                                       pytest.param(WRAP_NEGATIVE, -11, id="wrap-below-minus-R"),
                                       pytest.param(NEGATIVE_IS_ERROR, -1, id="error-mode-minus-1")])
def test_out_of_range_entry_asserts_on_the_device(mode, bad):
    """Entry 3 (row 1, slot 1) is out of range: the device assert names block (1,0,0) and thread
    (1,0,0), and the call raises, as cudaErrorAssert does; nothing is read out of range (ASan)."""
    x, f = torch.randn(10, 64), torch.rand(3, 2)
    p = torch.tensor([0, 3, 1, bad, 2, 2])
    with pytest.raises(emulated.EmulatedLaunchError) as info:
        emulated.fused(x, p, f, None, mode)
    message = str(info.value)
    assert "device-side assert triggered" in message, message
    assert "block: [1,0,0], thread: [1,0,0]" in message, message
    assert "out of range" in message, message


def test_row_offsets_past_2_to_the_31():
    """Input rows 2^28 elements apart: row 8 starts at element 2^31, which an int32 offset wraps. The
    runner places the rows that far apart (4 GiB of address space, the gaps never touched)."""
    spread = 2 ** 28
    x = make_input(9, 8, torch.bfloat16, torch.Generator().manual_seed(5))
    p = torch.tensor([8, 7, 8, 0, -1, 8])
    f = torch.rand(3, 2)
    call = Call(x, p, f, torch.float32, launch=Launch(sms=1), spread_rows=spread)
    result = emulated.run([call], variant="plain")[0]
    assert result.error is None, result.error
    assert_matches_reference(result.out, x, p, f, torch.float32, what="rows 2^28 apart")


def test_launch_shapes_follow_the_sm_count():
    """Decode (M = 1) splits the row over more, smaller blocks the more SMs there are; prefill runs
    full blocks, one per row: the shapes the suite runs under are the ones `launch` picks."""
    case = make_case(1, 8, 7168, in_dtype=torch.bfloat16, seed=1)
    shapes = {launch.sms: r.shape for launch, r in
              zip(LAUNCHES[:3], emulated.run([Call(*case, launch=launch) for launch in LAUNCHES[:3]]))}
    assert shapes[1][:2] == (128, 4) and shapes[132][:2] == (32, 28), shapes
    prefill = make_case(128, 8, 64, seed=2)
    (r,) = emulated.run([Call(*prefill, launch=Launch(sms=132))])
    assert r.shape[1] == 1, r.shape


# ---- the emulator's own checks (tests/cuda_emulator/selftest.cpp) --------------------------------

SELFTESTS = {  # kernel: what the emulator must say (file:line, block and thread included)
    "barrier-at-two-sites": "selftest.cpp:18: block (0,0,0) thread (16,0,0): __syncthreads reached at different "
                            "call sites: this one and ",
    "barrier-after-an-exit": "__syncthreads not reached by every thread of the block: thread 5 has exited",
    "ballot-names-an-exited-lane": "__ballot_sync(mask 0xffffffff): the mask names lane 3, but thread 3 has exited",
    "ballot-names-a-lane-at-a-barrier": "the mask names lane 7, but thread 7 waits at __syncthreads",
    "ballot-omits-the-caller": "thread (1,0,0): __ballot_sync(mask 0x00000001): the mask omits the calling lane 1",
    "ballot-names-a-missing-lane": "the mask names lane 16, which does not exist (blockDim.x = 16)",
    "any-at-two-sites": "the mask names lane 1, but thread 1 waits at __any_sync",
    "device-assert": "device-side assert triggered: ",
    "votes": "LAUNCH OK warp0 ballot=49249249 any=0 half=ffff popc=11;warp1 ballot=49249349 any=1 half=ffff popc=12;",
    "shared-poison": "LAUNCH OK int=-1 nan=1;",
    "shared-is-per-block": "LAUNCH OK block0 found -1;block1 found -1;",
}


def _selftest(name, order="forward", timeout=60):
    import subprocess

    from cuda_emulator import build

    exe = build.runner(build.default_variant(), program="selftest")
    return subprocess.run([str(exe), name, order], capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, **build.SANITIZER_ENV})


@pytest.mark.parametrize("name", list(SELFTESTS))
def test_emulator_reports(name):
    proc = _selftest(name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SELFTESTS[name] in proc.stdout, proc.stdout
    if name == "device-assert":  # CUDA's wording: where, which block, which thread
        assert "selftest.cpp:" in proc.stdout and "block: [1,0,0], thread: [9,0,0] Assertion" in proc.stdout


def test_emulator_thread_orders():
    firsts = {order: _selftest("order", order).stdout.strip() for order in ("forward", "reverse", "random")}
    assert firsts["forward"] == "LAUNCH OK 0123" and firsts["reverse"] == "LAUNCH OK 3210", firsts
    assert firsts["random"] not in (firsts["forward"], firsts["reverse"]), firsts


def test_emulator_never_hangs_on_a_spinning_thread():
    proc = _selftest("spins")
    assert proc.returncode == 3 and "ran past the watchdog" in proc.stderr, (proc.returncode, proc.stderr[-2000:])


def test_emulator_stack_overflow_hits_the_guard_page():
    proc = _selftest("stack-overflow")
    assert proc.returncode != 0 and "LAUNCH OK" not in proc.stdout, (proc.returncode, proc.stdout)


# ---- planted bugs: each must fail the emulated suite ----------------------------------------------

def _planted_battery():
    """Small cases that between them reach every staged path: topk 1 (the tail loop alone), 8, a
    masked row with a NaN factor (s_nan), 300 (two chunks); 32- and 128-thread blocks."""
    cases = []
    for m, topk, k, seed in ((3, 1, 64, 1), (4, 8, 72, 2), (2, 300, 16, 3), (2, 4, 1024, 5)):
        c = make_case(m, topk, k, seed=seed)
        cases.append(Call(*c))
    spec = fused_tests.CASES["nonfinite-factors-masked-rows"]
    x, p, f, a, mask = fused_tests.make_fused_case(spec, 4, "cpu")
    cases.append(Call(x, p, f, None, spec.negative_index, 0, spec.scale, a, mask))
    calls = []
    for order in ("forward", "reverse", "random"):
        for threads in (32, 128):
            calls += [dataclasses.replace(c, launch=Launch(threads=threads, order=order)) for c in cases]
    return calls


def _battery_failures(plants, variant):
    """How the battery fails with `plants` built in ('' if it passes)."""
    calls = _planted_battery()
    try:
        results = emulated.run(calls, variant=variant, plants=plants)
    except emulated.EmulatorCrash as e:
        reports = [ln for ln in str(e).splitlines() if "ERROR: AddressSanitizer" in ln or "runtime error" in ln]
        return f"crash: {(reports or [str(e)[:300]])[0]}"
    for call, result in zip(calls, results):
        if result.error is not None:
            return f"launch error: {result.error[:300]}"
        try:
            if call.addend is None and call.row_mask is None:
                assert_matches_reference(result.out, call.input, call.permutation, call.factors, what="planted")
            else:
                spec = fused_tests.CASES["nonfinite-factors-masked-rows"]
                fused_tests.assert_fused_matches_reference(result.out, spec, call.input, call.permutation,
                                                           call.factors, call.addend, call.row_mask,
                                                           spec.dtype, "planted")
        except AssertionError as e:
            return f"wrong answer ({call.launch.describe()}): {str(e)[:300]}"
    return ""


def test_planted_battery_passes_without_plants():
    assert _battery_failures((), "sanitized") == ""


# (build, how it must fail): the sanitized build where only ASan sees the bug, the quick one where the
# answer or the emulator's own checks do.
PLANTS = {
    # topk = 1: a 16-byte read from a 12-byte staging allocation (what compute-sanitizer found on an H200)
    "STAGING_UNPADDED": ("sanitized", "heap-buffer-overflow"),
    # the other warps read s_live / s_nan before warp 0 wrote them: poison (one-warp blocks pass in forward order)
    "NO_SYNCTHREADS_AFTER_STAGING": ("plain", "wrong answer"),
    # lanes 16..31 vote with a mask that omits them
    "BALLOT_MASK_DROPS_LANES": ("plain", "the mask omits the calling lane 16"),
    # the NaN flag read before the barrier that publishes it: poison
    "S_NAN_BEFORE_BARRIER": ("plain", "wrong answer"),
    # one staged slot too many: a poison row (-1) and weight (NaN)
    "SLOT_COUNT_OFF_BY_ONE": ("plain", "wrong answer"),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_planted_bug_fails(plant):
    variant, how = PLANTS[plant]
    failure = _battery_failures((plant,), variant)
    assert failure, f"PLANT_{plant} passed the emulated battery"
    assert how in failure, f"PLANT_{plant} failed, but not as expected ({how!r}): {failure}"


def test_a_missing_barrier_needs_an_order_other_than_forward():
    """Why CI runs three orders: with one-warp blocks, forward order runs lane 0 (which publishes the
    staged count) before the lanes that read it, so a missing __syncthreads passes; reverse does not."""
    case = make_case(4, 8, 72, seed=2)
    verdicts = {}
    for order in ("forward", "reverse"):
        (r,) = emulated.run([Call(*case, launch=Launch(threads=32, order=order))], variant="plain",
                            plants=("NO_SYNCTHREADS_AFTER_STAGING",))
        try:
            assert_matches_reference(r.out, *case, what=order)
            verdicts[order] = "passes"
        except AssertionError:
            verdicts[order] = "fails"
    assert verdicts == {"forward": "passes", "reverse": "fails"}, verdicts


def test_planted_32_bit_row_offset_fails():
    spread = 2 ** 28
    x = make_input(9, 8, torch.bfloat16, torch.Generator().manual_seed(5))
    p = torch.tensor([8, 7, 8, 0, -1, 8])
    f = torch.rand(3, 2)
    call = Call(x, p, f, torch.float32, launch=Launch(sms=1), spread_rows=spread)
    try:
        result = emulated.run([call], variant="plain", plants=("ROW_OFFSET_32_BIT",))[0]
    except emulated.EmulatorCrash:
        return  # read 4 GiB before the input: a crash
    with pytest.raises(AssertionError):
        assert result.error is None
        assert_matches_reference(result.out, x, p, f, torch.float32, what="32-bit offsets")
