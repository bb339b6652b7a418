"""CI's slice of the differential fuzzer (compile_tests/fuzz.py): a fixed seed, a few hundred
programs at the graph level and a few end to end. Longer runs: ``python compile_tests/fuzz.py``."""
from __future__ import annotations

import pytest
import torch

import fuzz


def test_fuzz_slice_finds_nothing():
    s = fuzz.fuzz(seed=20261202, n_graph=150, n_e2e=4, stop_after=3)
    assert not s.findings, "\n\n".join(f.report() for f in s.findings)
    assert s.graph == 150 and s.e2e == 4
    # Not vacuous: most programs are spellings the pass claims, and it rewrote a good share of them.
    assert s.claimed >= 100 and s.fired >= 50, (s.claimed, s.fired)


def _outcome(value=None, error=None, inputs=()):
    return fuzz.Outcome(value=value, error=error, inputs_after=list(inputs))


T = torch.tensor


@pytest.mark.parametrize("got,eager,plain,expect", [
    (_outcome(T([1.0, float("nan")])), _outcome(T([1.0, 2.0])), None, "NaN at"),
    (_outcome(T([1.0, 2.0])), _outcome(T([1.0, float("nan")])), None, "NaN at"),
    (_outcome(T([float("inf")])), _outcome(T([float("-inf")])), None, "inf at"),
    (_outcome(T([1.0, 2.5])), _outcome(T([1.0, 2.0])), None, "max error"),
    (_outcome(T([1.0]).half()), _outcome(T([1.0])), None, "eager torch.float32"),
    (_outcome(T([1.0, 2.0])), _outcome(T([[1.0, 2.0]])), None, "eager torch.float32 (1, 2)"),
    (_outcome(T([1.0])), _outcome(error=IndexError), _outcome(error=RuntimeError), "the rewritten graph returned"),
    (_outcome(error=ValueError), _outcome(error=IndexError), _outcome(error=RuntimeError), "error type ValueError"),
    (_outcome(T([1.0]), inputs=[T([0.0])]), _outcome(T([1.0]), inputs=[T([5.0])]), None, "input 0 after the call"),
], ids=["nan-added", "nan-dropped", "inf-sign", "value", "dtype", "shape", "error-lost", "error-type", "input-mutation"])
def test_compare_reports_each_kind_of_difference(got, eager, plain, expect):
    problem = fuzz.compare(got, eager, plain, scale=1.0, topk=2, unit=2.0**-23)
    assert problem is not None and expect in problem, problem


def test_compare_accepts_what_inductor_accepts():
    """Eager refuses (index_select of a negative entry), Inductor's decomposition wraps: the rewritten
    graph is held to Inductor's result, not to eager's error."""
    plain = _outcome(T([3.0]))
    assert fuzz.compare(_outcome(T([3.0])), _outcome(error=IndexError), plain, 1.0, 2) is None
    assert fuzz.compare(_outcome(T([4.0])), _outcome(error=IndexError), plain, 1.0, 2, 2.0**-23) is not None


def test_compare_takes_the_scatter_range_error_for_eagers():
    """The scatter form's range check raises IndexError where eager's scatter_add raises RuntimeError:
    the same refusal (as the compile tests hold it). Any other IndexError for a RuntimeError is reported."""
    ours = fuzz.Outcome(value=None, error=IndexError, inputs_after=[],
                        message="moe::scatter_mul_sum: index[2] = -1 is out of range: the result has 3 rows")
    assert fuzz.compare(ours, _outcome(error=RuntimeError), _outcome(error=RuntimeError), 1.0, 2) is None
    other = fuzz.Outcome(value=None, error=IndexError, inputs_after=[], message="index 5 is out of bounds")
    assert "error type IndexError" in fuzz.compare(other, _outcome(error=RuntimeError), _outcome(error=RuntimeError), 1.0, 2)
    decomposition = fuzz.Outcome(value=None, error=RuntimeError, inputs_after=[],
                                 message="index 1 is out of bounds for dimension 0 with size 1")
    assert fuzz.compare(decomposition, _outcome(error=IndexError), _outcome(error=IndexError), 1.0, 2) is None
    assert "error type RuntimeError" in fuzz.compare(_outcome(error=RuntimeError), _outcome(error=IndexError),
                                                     _outcome(error=IndexError), 1.0, 2)
