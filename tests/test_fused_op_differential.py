"""A random differential test of the internal op ``moe::_shuffle_mul_sum_fused``, called directly on
every kernel reachable without a GPU (the C++ CPU kernel, the Triton kernel under its interpreter, the
CUDA kernel's device code under our grid emulator), against the float64 reference.

Each case draws its options at random: negative-index mode, factor rounding, per-row factors, scale,
addend shapes (M, K), (K,), (1, K), (M, 1), (1, M, K) in any float dtype, row mask, strided rows and
factors, int32 / int64 entries with duplicates, NaN / inf factors where the semantics say what they do,
M, topk and K from 0 up, topk above the CUDA kernel's 256-slot staging chunk, and the output dtype.
Checked as tests/test_fused_op.py checks its named cases (NaN positions, the fp32-accumulation error
bound of the dtype, inputs unchanged, a NaN-poisoned allocator).

The calls run in a child process that announces each case before it runs it: a crash (a segfault, an
abort) is reported with its case, and the run goes on from the next one.

    python tests/test_fused_op_differential.py --kernel cpp --seed 1 --count 5000     # a long run
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import random
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
import torch

if __name__ == "__main__":  # the worker: load the test helpers pytest would
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import conftest  # noqa: F401  (registers _moe_testlib)

from _moe_testlib import (assert_unmodified, differential_run, differential_worker, poison_allocator, seed_of, snapshot)

from fused_moe_ops.ops import FACTOR_ROUND, NEGATIVE_IS_ERROR, SKIP_NEGATIVE, WRAP_NEGATIVE
from test_fused_op import Spec, assert_fused_matches_reference, make_fused_case

HERE = Path(__file__).resolve()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_case(rng: random.Random) -> Tuple[Spec, Optional[torch.dtype]]:
    """(the case, its out_dtype); ``rng`` decides everything, so (seed, i) names a case."""
    topk = rng.choice((0, 1, 1, 2, 3, 8, 8, 257) if rng.random() < 0.15 else (1, 2, 4, 8))
    m = rng.choice((0, 1, 2) if topk > 256 else (0, 1, 1, 2, 3, 5, 17))
    k = rng.choice((0, 1, 7, 8, 33, 40) if topk > 256 else (0, 1, 7, 8, 16, 33, 72, 130))
    identity = rng.random() < 0.1
    mode = rng.choice((SKIP_NEGATIVE, WRAP_NEGATIVE, NEGATIVE_IS_ERROR))
    per_row = not identity and rng.random() < 0.25
    row_mask = rng.random() < 0.25
    # NaN / inf factors on skipped slots (add nothing): the case needs a skipped slot (entry 1 is -1).
    nonfinite = mode == SKIP_NEGATIVE and not (identity or per_row or row_mask) and m * topk >= 3 and rng.random() < 0.4
    addend = rng.choice((None, None, "same", "f32-bias", "viewed", "row", "col"))
    spec = Spec(
        m=m, topk=topk, k=k, dtype=rng.choice(DTYPES), negative_index=mode, per_row=per_row,
        rounding=rng.choice((None, None, torch.float16, torch.bfloat16)), scale=rng.choice((1.0, 1.0, 0.5, -2.0)),
        addend=addend, addend_dtype=rng.choice((None,) + DTYPES) if addend else None,
        index_dtype=rng.choice((torch.int64, torch.int32)), row_pad=rng.choice((0, 0, 3)), row_mask=row_mask,
        identity=identity, nonfinite=nonfinite, factors_strided=rng.random() < 0.25)
    return spec, rng.choice((None, None) + DTYPES)


def run_case(kernel: str, seed: int, i: int) -> None:
    """One case on one kernel; raises AssertionError (or the kernel's error) where it is wrong."""
    spec, out_dtype = random_case(random.Random(f"{seed}/{i}"))
    x, p, f, a, mask = make_fused_case(spec, seed_of("differential", seed, i), "cpu")
    before = snapshot(x, p, f, a, mask)
    poison_allocator(max(spec.m * spec.k * 4, 64), x.device)
    call = KERNELS[kernel](random.Random(f"{seed}/{i}/launch"))
    out = call(x, p, f, out_dtype, spec.negative_index, FACTOR_ROUND[spec.rounding], spec.scale, a, mask)
    assert_fused_matches_reference(out, spec, x, p, f, a, mask, out_dtype or spec.dtype, f"case {seed}/{i}")
    assert_unmodified(before, x, p, f, a, mask)


def _cpp(rng: random.Random):
    from fused_moe_ops import _registry

    assert _registry.ACTIVE.get("cpu") == "cpp", f"the C++ CPU kernel is not loaded: {_registry.ACTIVE}"
    return torch.ops.moe._shuffle_mul_sum_fused


def _triton(rng: random.Random):
    from fused_moe_ops.triton_kernel import shuffle_mul_sum_fused_triton

    return shuffle_mul_sum_fused_triton


def _cuda_emulated(rng: random.Random):
    """The CUDA kernel's device code under the grid emulator (tests/cuda_emulator), in a launch shape
    the real launch picks for 1, 108 or 132 SMs or a forced one, in a random thread order."""
    from cuda_emulator import emulated

    launch = rng.choice((emulated.Launch(sms=1), emulated.Launch(sms=108), emulated.Launch(sms=132),
                         emulated.Launch(threads=32, slices=1), emulated.Launch(threads=64, slices=3)))
    return functools.partial(emulated.fused, launch=dataclasses.replace(launch, order="random", seed=rng.randrange(2**31)))


# Each kernel as the worker calls it (the internal op's signature), given the case's own random source.
KERNELS = {"cpp": _cpp, "triton": _triton, "cuda_emulated": _cuda_emulated}
WORKER_ENV = {"triton": {"TRITON_INTERPRET": "1"}}


def _worker(kernel: str, seed: int, start: int, count: int) -> None:
    differential_worker(run_case, kernel, seed, start, count)


def differential(kernel: str, seed: int, count: int, timeout: float = 900, env: Optional[Dict[str, str]] = None):
    """Run cases ``seed/0 .. seed/count-1`` on ``kernel`` in child processes; returns
    (number of cases that ran, [(case, problem)])."""
    return differential_run(HERE, kernel, seed, count, timeout, dict(WORKER_ENV.get(kernel, {}), **(env or {})))


def _report(seed: int, problems) -> str:
    return "\n\n".join(f"--- case {seed}/{i}: {random_case(random.Random(f'{seed}/{i}'))}\n{p}" for i, p in problems)


# CI's slice: a fixed seed; longer runs from the command line.
@pytest.mark.parametrize("kernel, count", [("cpp", 300), ("triton", 60),
                                           pytest.param("cuda_emulated", 150, marks=pytest.mark.cuda_emulated)])
def test_internal_op_random_differential(kernel, count):
    if kernel == "triton":
        pytest.importorskip("triton")
    seed = 20261206
    ran, problems = differential(kernel, seed, count)
    assert not problems, _report(seed, problems)
    assert ran == count


def test_random_cases_cover_the_edges():
    """Not vacuous: the slice's cases reach every option and the empty sizes."""
    specs = [random_case(random.Random(f"20261206/{i}"))[0] for i in range(300)]
    assert any(s.m == 0 and s.addend == "col" for s in specs)
    assert any(s.topk > 256 for s in specs) and any(s.k == 0 for s in specs) and any(s.topk == 0 for s in specs)
    assert {s.negative_index for s in specs} == {0, 1, 2} and {s.addend for s in specs} >= {"col", "row", "f32-bias"}
    assert all(any(getattr(s, flag) for s in specs)
               for flag in ("per_row", "row_mask", "identity", "nonfinite", "factors_strided", "row_pad", "rounding"))


def test_a_crash_is_reported_with_its_case_and_the_run_goes_on():
    ran, problems = differential("cpp", 20261206, 6, env={"FMO_DIFFERENTIAL_CRASH_AT": "3"})
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
