"""A user's first compile: HF MoE models compiled in an empty Inductor cache, with Inductor choosing
between the op and its own code (fusion/autotune.py), as ``torch.compile(model)`` does by default.

* The output code a user collects (``torch._inductor.utils.run_and_get_code``) launches no more
  kernels with the pass than without it, and is the code of a second compile whose cache holds the
  choice (same lowerings, same kernels): the modules Inductor compiles only to time the choices are
  not part of it.
* With the autotuning cache off every combine of the model is lowered the same way (at decode sizes
  on CPU the decomposition without a benchmark; where a benchmark runs, one decomposition against
  the op, and between choices that time alike policy.choice_order picks, not the noise). A combine
  that is benchmarked shows only the model's code.
* The pick itself (``autotune._pick``) on given timings: ties within the tolerance go by the order,
  a clear winner wins, the op's time counts ``preference`` times.

Each compile here starts from an empty cache (``FRESH_INDUCTOR_CACHE``; the other modules share
compiled kernels, which hid what a first compile does).
"""
from __future__ import annotations

import contextlib
import logging
import re

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._inductor.utils import fresh_cache, run_and_get_code

import fused_moe_ops
from fused_moe_ops.bench.hf_models import build_hf_model, transformers_unavailable_reason
from fused_moe_ops.bench.models import count_launches
from fused_moe_ops.fusion import autotune, policy
from fusion_cases import fusion_log

pytestmark = [
    pytest.mark.skipif(autotune.available() is not None, reason=str(autotune.available())),
    pytest.mark.skipif(transformers_unavailable_reason() is not None, reason=str(transformers_unavailable_reason())),
]

# conftest.py, _fresh_compile_state: an empty Inductor cache per test.
FRESH_INDUCTOR_CACHE = True


@pytest.fixture(autouse=True)
def _inductor_chooses(inductor_chooses):
    """Inductor chooses in every test here, as a user's compile does (conftest.py)."""


def _lowered() -> dict:
    return dict(fused_moe_ops.fusion_stats().get("lowered", {}))


def _compile(forward, *inputs, fusion: bool = True):
    """(output, every module run_and_get_code returns, the lowerings this compile chose, the
    benchmarks' times and kept choices as the fused_moe_ops logger gave them)."""
    before = _lowered()
    off = contextlib.nullcontext() if fusion else fused_moe_ops.disable_fusion()
    with torch.inference_mode(), off, fusion_log(logging.DEBUG) as messages:
        out, codes = run_and_get_code(torch.compile(forward, fullgraph=True), *inputs)
    lowered = {k: n - before.get(k, 0) for k, n in _lowered().items() if n != before.get(k, 0)}
    return out, codes, lowered, [m for m in messages if "benchmark" in m or "stays" in m]


def _launches(codes) -> int:
    counted = count_launches(codes)
    return counted["generated"] + counted["extern"]


def _normalised(codes) -> list:
    """The modules without what differs between two compiles of one graph: the compile's number
    (``# AOT ID``) and the paths and hashes of the kernel files."""
    return [re.sub(r"/\S+\.(?:py|so|cpp)|\b[a-z0-9]{40,}\b", "<file>", re.sub(r"(?m)^# AOT ID: .*$", "", code))
            for code in codes]


def _first_difference(a: str, b: str) -> str:
    import difflib

    return "\n".join(list(difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=1))[:40])


# Decode sizes, where a launch more is what the pass exists to remove. The fast set: top-8 at one
# token and the top-2 model at 16 tokens (there the two decompositions time alike); the slow set
# DeepSeek-V3 (shared experts, the most launches) at both. Each case compiles its model three times in
# empty caches (~30-45 s of CPU): the other two pairings repeat what these show.
FAST = [("qwen3_moe", 1), ("mixtral", 16)]
SLOW = [("deepseek_v3", 1), ("deepseek_v3", 16)]
CASES = ([pytest.param(name, m, id=f"{name}-{m}tok") for name, m in FAST]
         + [pytest.param(name, m, id=f"{name}-{m}tok", marks=pytest.mark.slow) for name, m in SLOW])


@pytest.mark.parametrize("name, m", CASES)
def test_first_compile_launches_what_a_warm_compile_does_and_no_more_than_inductor(name, m):
    forward, make_input, _, _ = build_hf_model(name, "cpu", torch.bfloat16)
    x = make_input(m)
    with torch.inference_mode():
        eager = forward(x).float()
    with fresh_cache():
        plain, plain_codes, _, _ = _compile(forward, x, fusion=False)
    with fresh_cache():
        cold, cold_codes, cold_lowered, cold_log = _compile(forward, x)
        # The same model again, the choices now in the autotuning cache (the FX graph cache off, so
        # the pass and the lowering run again rather than the graph being served whole).
        with inductor_config.patch(fx_graph_cache=False):
            warm, warm_codes, warm_lowered, warm_log = _compile(forward, x)
    assert sum(cold_lowered.values()) >= 2, f"not every combine was rewritten and lowered: {cold_lowered} {cold_log}"
    assert cold_lowered == warm_lowered, (cold_lowered, warm_lowered, cold_log, warm_log)
    assert len(cold_codes) == len(warm_codes) == len(plain_codes) == 1, \
        "a compile's output code holds modules that do not run in the model"
    (cold_code,), (warm_code,) = _normalised(cold_codes), _normalised(warm_codes)
    assert cold_code == warm_code, "the first compile's code is not the warm compile's:\n" + _first_difference(
        cold_code, warm_code)
    assert _launches(cold_codes) <= _launches(plain_codes), (
        f"with the pass {count_launches(cold_codes)}, without {count_launches(plain_codes)} ({cold_lowered} {cold_log})")
    assert torch.equal(cold, warm)
    tol = 3e-2 * max(1.0, float(eager.abs().max()))
    assert float((cold.float() - eager).abs().max()) <= tol
    assert float((cold.float() - plain.float()).abs().max()) <= tol


def test_every_combine_lowered_alike_with_the_autotuning_cache_off():
    """Mixtral (top-2) at 16 tokens: when both decompositions were benchmarked they timed alike, and a
    cold compile with the autotuning cache off lowered one layer each way. Every combine of the model
    must be lowered the same way."""
    forward, make_input, _, _ = build_hf_model("mixtral", "cpu", torch.bfloat16)
    x = make_input(16)
    with fresh_cache(), inductor_config.patch(autotune_local_cache=False):
        _, codes, lowered, log = _compile(forward, x)
    assert len(lowered) == 1 and sum(lowered.values()) == 2, (lowered, log)
    assert len(codes) == 1


def test_benchmarked_combine_shows_only_the_models_code():
    """A combine large enough to be benchmarked (policy.choice_without_benchmark says None): Inductor
    compiles a module per choice to time it, and run_and_get_code returns the model's module alone,
    on the first compile as on a later one."""
    m, topk, k = 128, 8, 256
    assert policy.choice_without_benchmark("cpu", m, topk, k, torch.bfloat16) is None

    def layer(x, idx, w, residual):
        return residual + (x[idx].view(m, topk, k) * w.view(m, topk, 1).to(x.dtype)).sum(dim=1)

    torch.manual_seed(0)
    args = (torch.randn(m * topk, k, dtype=torch.bfloat16), torch.randperm(m * topk), torch.rand(m, topk),
            torch.randn(m, k, dtype=torch.bfloat16))
    with fresh_cache():
        out, codes, lowered, log = _compile(layer, *args)
    assert any("benchmark" in msg and " us" in msg for msg in log), log
    assert sum(lowered.values()) == 1, lowered
    assert len(codes) == 1, [c[:200] for c in codes]
    expected = layer(*args).float()
    assert float((out.float() - expected).abs().max()) <= 3e-2 * max(1.0, float(expected.abs().max()))


def test_decode_sizes_on_cpu_take_the_decomposition_without_a_benchmark():
    forward, make_input, _, _ = build_hf_model("qwen3_moe", "cpu", torch.bfloat16)
    with fresh_cache():
        _, codes, lowered, log = _compile(forward, make_input(1))
    assert lowered == {"unrolled": 2}, (lowered, log)
    assert not any("benchmark" in msg and " us" in msg for msg in log), log


# ---------------------------------------------------------------- the pick on given timings


class _Choice:
    """A benchmarked choice as _pick sees it: a decomposition (its name holds the function's)."""

    def __init__(self, name: str):
        self.name = name


def _op_choice():
    from torch._inductor.select_algorithm import ExternKernelCaller

    op = object.__new__(ExternKernelCaller)
    op.name = "moe_shuffle_mul_sum_fused_fallback"
    return op


UNROLLED, REDUCTION = _Choice("combine_unrolled_0"), _Choice("combine_reduction_1")
ORDER = ("unrolled", "reduction", "op")


@pytest.mark.parametrize("times, expected", [
    pytest.param({UNROLLED: 1.10, REDUCTION: 1.00}, "unrolled", id="tie-goes-by-order"),
    pytest.param({UNROLLED: 1.30, REDUCTION: 1.00}, "reduction", id="beyond-tolerance-the-fastest"),
    pytest.param({UNROLLED: 1.00, REDUCTION: 1.20, "op": 1.15}, "unrolled", id="order-first-is-fastest"),
    pytest.param({UNROLLED: 5.00, REDUCTION: 4.00, "op": 1.00}, "op", id="op-clearly-fastest"),
    pytest.param({UNROLLED: 1.15, REDUCTION: 3.00, "op": 1.00}, "unrolled", id="decomposition-ties-the-op"),
    pytest.param({UNROLLED: float("inf"), REDUCTION: 2.00, "op": 1.90}, "reduction", id="failed-benchmark-skipped"),
    pytest.param({UNROLLED: float("nan"), "op": 1.00}, "op", id="nan-benchmark-skipped"),
])
def test_pick_ties_go_by_the_order(times, expected):
    op = _op_choice()
    timings = {(op if c == "op" else c): t for c, t in times.items()}
    best = min(timings, key=lambda c: timings[c] if timings[c] == timings[c] else float("inf"))
    chosen = autotune._pick(best, timings, 1.0, ORDER, 0.2)
    assert autotune._choice_name(chosen) == expected


def test_pick_counts_the_op_preference_times():
    op = _op_choice()
    timings = {UNROLLED: 2.9, op: 1.0}
    assert autotune._choice_name(autotune._pick(op, timings, 1.0, ORDER, 0.2)) == "op"
    assert autotune._choice_name(autotune._pick(op, timings, 3.0, ORDER, 0.2)) == "unrolled"


def test_cpu_order_and_tolerance():
    assert policy.choice_order("cpu", 16, 2, 256, torch.bfloat16)[-1] == "op"
    assert policy.choice_without_benchmark("cpu", 16, 8, 1024, torch.bfloat16) == "unrolled"
    assert policy.choice_without_benchmark("cpu", 1, 32, 256, torch.bfloat16) == "reduction"
    assert policy.choice_without_benchmark("cpu", 16, 8, 4096, torch.bfloat16) is None
    assert policy.choice_without_benchmark("cuda", 1, 8, 256, torch.bfloat16) is None
    assert 0 < policy.choice_tolerance("cpu") < 1 and 0 < policy.choice_tolerance("cuda") <= policy.choice_tolerance("cpu")
