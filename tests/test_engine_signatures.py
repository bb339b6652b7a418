"""The engines' call signatures: ``fused_moe_ops.apply_shuffle_mul_sum`` (SGLang's) and
``fused_moe_ops.moe_sum`` (vLLM's), over ``moe::shuffle_mul_sum``.

Each runs its peer's own test grid (sgl-kernel's test_apply_shuffle_mul_sum shapes and dtypes,
vLLM's test_moe_sum / expert-map / padded-topk_ids grids), on the peer's kind of data (randn), with
what the peers leave out: duplicates and -1 entries, skipped slots holding NaN, a NaN-poisoned
``output``, strided inputs. Every result is held to the peer's own tolerance against the eager
spelling and to the float32-accumulation bound against the float64 reference (conftest.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch

import fused_moe_ops
from fused_moe_ops.integrations import engines
from _moe_testlib import (DTYPE_ID, FLOAT_DTYPES, MARK_CUDA, assert_matches_reference, assert_unmodified, gen,
                          make_permutation, seed_of, snapshot)

DTYPES = [pytest.param(d, id=DTYPE_ID[d]) for d in FLOAT_DTYPES]
VLLM_DTYPES = [pytest.param(d, id=DTYPE_ID[d]) for d in (torch.float32, torch.bfloat16)]  # vLLM's test_moe_sum
INDEX_DTYPES = [pytest.param(torch.int32, id="i32"), pytest.param(torch.int64, id="i64")]
# The peers' tolerances for their eager references (sgl-kernel: per dtype; vLLM: atol 2e-2, rtol 0).
SGLANG_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=5e-2, rtol=1e-2),
              torch.bfloat16: dict(atol=5e-2, rtol=1e-2)}
VLLM_TOL = dict(atol=2e-2, rtol=0)


def _nan_output(m, k, dtype):
    return torch.full((m, k), float("nan"), dtype=dtype)


# ------------------------------------------------------------------------------------------------
# SGLang: apply_shuffle_mul_sum(input, output, permutation, factors=None)
# ------------------------------------------------------------------------------------------------

def _sglang_case(m, topk, k, dtype, index_dtype, factors_form, seed):
    g = gen(seed)
    input = torch.randn(m * topk, k, generator=g).to(dtype)
    permutation = make_permutation(m, topk, m * topk, index_dtype, g)  # duplicates, -1 and other negatives
    flat = torch.rand(m * topk, generator=g).to(dtype)
    # What the op must not read holds NaN: rows no entry names, and the factors of skipped slots.
    named = torch.zeros(m * topk, dtype=torch.bool)
    named[permutation[permutation >= 0].long()] = True
    input[~named] = float("nan")
    flat[permutation < 0] = float("nan")
    factors = {"flat": flat, "m_topk": flat.view(m, topk), "none": None}[factors_form]
    return input, permutation, factors, (flat.view(m, topk) if factors is not None else torch.ones(m, topk))


def _sglang_eager(input, permutation, factors2d):
    """sgl-kernel's own reference (gather, weight in float32, sum), skipping negative entries."""
    m, topk = factors2d.shape
    live = (permutation >= 0).view(m, topk, 1)
    gathered = input[permutation.long().clamp(min=0)].view(m, topk, -1).float()
    return torch.where(live, gathered * factors2d.view(m, topk, 1).float(), 0).sum(1).to(input.dtype)


@pytest.mark.parametrize("factors_form,index_dtype",
                         [("flat", torch.int32), ("m_topk", torch.int64), ("none", torch.int32)],
                         ids=["flat-i32", "m_topk-i64", "none-i32"])
@pytest.mark.parametrize("m,topk,k", [(32, 2, 256), (64, 4, 1024), (128, 8, 512)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_shuffle_mul_sum_sglang_grid(dtype, m, topk, k, index_dtype, factors_form):
    input, permutation, factors, factors2d = _sglang_case(m, topk, k, dtype, index_dtype, factors_form,
                                                          seed_of("sglang", m, topk, k, dtype, index_dtype))
    output = _nan_output(m, k, dtype)
    before = snapshot(input, permutation, factors)
    assert fused_moe_ops.apply_shuffle_mul_sum(input, output, permutation, factors) is None
    assert_unmodified(before, input, permutation, factors)
    torch.testing.assert_close(output, _sglang_eager(input, permutation, factors2d), **SGLANG_TOL[dtype])
    assert_matches_reference(output, input, permutation, factors2d, what="apply_shuffle_mul_sum")


@pytest.mark.parametrize("case", ["output_f32_from_bf16", "input_more_rows", "strided_rows_and_factors",
                                  "m_1", "topk_1", "m_0", "k_0"])
def test_apply_shuffle_mul_sum_edges(case):
    g = gen(seed_of("sglang-edge", case))
    m, topk, k, rows, dtype, out_dtype = 5, 3, 40, 15, torch.bfloat16, torch.bfloat16
    if case == "output_f32_from_bf16":
        out_dtype = torch.float32
    m = {"m_1": 1, "m_0": 0}.get(case, m)
    topk = 1 if case == "topk_1" else topk
    k = 0 if case == "k_0" else k
    rows = 50 if case == "input_more_rows" else max(m * topk, 1)
    input = torch.randn(rows, k + 7, generator=g).to(dtype)[:, :k]  # row stride k + 7
    permutation = make_permutation(m, topk, rows, torch.int32, g)
    factors = torch.rand(m * topk * 2, generator=g)[::2] if case == "strided_rows_and_factors" else \
        torch.rand(m * topk, generator=g)
    output = _nan_output(m, k, out_dtype)
    fused_moe_ops.apply_shuffle_mul_sum(input, output, permutation, factors)
    assert_matches_reference(output, input, permutation, factors.view(m, topk), out_dtype, what=case)


def test_apply_shuffle_mul_sum_no_factors_reads_one_cached_element():
    # A plain sum allocates nothing for its factors: a stride-0 view of one cached element per dtype.
    x = torch.randn(4, 8)
    a, b = engines._unit_factors(3, 5, x), engines._unit_factors(7, 2, x)
    assert a.stride() == (0, 0) and b.stride() == (0, 0) and a.data_ptr() == b.data_ptr()
    assert a.dtype == x.dtype and bool((a == 1).all())
    assert engines._unit_factors(2, 2, x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_cached_slot_indices_outlive_their_growth():
    # A CUDA graph captured while a cached index buffer was current reads that memory at every
    # replay without holding it: growing the cache must not free the buffer it replaces.
    small = engines._arange(8, torch.device("cpu"))
    first = small.untyped_storage().data_ptr()
    grown = engines._arange(engines._ARANGE[torch.device("cpu")].numel() + 1, torch.device("cpu"))
    assert grown.untyped_storage().data_ptr() != first
    del small
    assert any(b.untyped_storage().data_ptr() == first for b in engines._ARANGE_RETIRED)
    assert torch.equal(grown, torch.arange(grown.numel()))


@pytest.mark.parametrize("later", ["grad_enabled", "no_grad"])
def test_helpers_cached_under_inference_mode_serve_other_modes(later, monkeypatch):
    # A server warms up under torch.inference_mode(): the cached ones and slot index are then
    # inference tensors, which later calls in other grad modes may read (never write).
    monkeypatch.setattr(engines, "_ONES", {})
    monkeypatch.setattr(engines, "_ARANGE", {})
    g = gen(7)
    x = torch.randn(5, 4, 16, generator=g)
    topk_ids, expert_map, live = _routing(5, 4, "expert_map", torch.int64, g)
    with torch.inference_mode():
        fused_moe_ops.moe_sum(x, _nan_output(5, 16, torch.float32), topk_ids, expert_map)
    assert all(t.is_inference() for t in (*engines._ONES.values(), *engines._ARANGE.values()))
    with (torch.enable_grad() if later == "grad_enabled" else torch.no_grad()):
        _check_moe_sum(x, topk_ids, expert_map, live, what=f"moe_sum {later}")
        output = _nan_output(5, 16, torch.float32)
        fused_moe_ops.apply_shuffle_mul_sum(x.view(20, 16), output, torch.arange(20))
        torch.testing.assert_close(output, x.sum(1))


# ------------------------------------------------------------------------------------------------
# vLLM: moe_sum(input, output, topk_ids=None, expert_map=None)
# ------------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "transposed", "topk_sliced", "row_padded", "hidden_strided", "expanded")


def _layout(m, topk, k, dtype, layout, g) -> torch.Tensor:
    """(m, topk, k) with the strides a caller may hand over."""
    if layout == "contiguous":
        return torch.randn(m, topk, k, generator=g).to(dtype)
    if layout == "transposed":  # expert-major buffer: stride (k, m*k, 1)
        return torch.randn(topk, m, k, generator=g).to(dtype).transpose(0, 1)
    if layout == "topk_sliced":  # the first topk slots of a wider buffer
        return torch.randn(m, topk + 3, k, generator=g).to(dtype)[:, 1:topk + 1]
    if layout == "row_padded":
        return torch.randn(m, topk, k + 5, generator=g).to(dtype)[..., :k]
    if layout == "hidden_strided":  # vLLM's own non-contiguous case: every other hidden element
        return torch.randn(m, topk, 2 * k, generator=g).to(dtype)[..., ::2]
    if layout == "expanded":  # one row for every slot (stride 0, 0)
        return torch.randn(1, 1, k, generator=g).to(dtype).expand(m, topk, k)
    raise ValueError(layout)


def _routing(m, topk, skip, index_dtype, g, num_experts=8):
    """(topk_ids, expert_map, live) as vLLM builds them: -1 ids are padding, -1 in the map a remote expert."""
    if skip == "none":
        return None, None, torch.ones(m, topk, dtype=torch.bool)
    topk_ids = torch.randint(0, num_experts, (m, topk), generator=g)
    topk_ids[:, -1] = -1  # vLLM's padded case: the last slot of every token
    topk_ids[torch.rand(m, topk, generator=g) < 0.2] = -1
    live = topk_ids >= 0
    expert_map = None
    if skip == "expert_map":
        expert_map = torch.arange(num_experts)
        expert_map[torch.randperm(num_experts, generator=g)[:num_experts // 2]] = -1
        live = live & (expert_map[topk_ids.clamp(min=0)] >= 0)
        expert_map = expert_map.to(index_dtype)
    return topk_ids.to(index_dtype), expert_map, live


def _check_moe_sum(input, topk_ids, expert_map, live, *, what):
    m, topk, k = input.shape
    output = _nan_output(m, k, input.dtype)
    before = snapshot(input, topk_ids, expert_map)
    assert fused_moe_ops.moe_sum(input, output, topk_ids, expert_map) is None
    assert_unmodified(before, input, topk_ids, expert_map)
    expected = torch.where(live.unsqueeze(-1), input, 0).sum(dim=1)  # vLLM's reference, NaN-safe
    torch.testing.assert_close(output, expected, **VLLM_TOL)
    slots = torch.where(live.reshape(-1), torch.arange(m * topk), -1)
    assert_matches_reference(output, input.reshape(m * topk, k), slots, torch.ones(m, topk), what=what)


@pytest.mark.parametrize("k", [128, 511, 1024])
@pytest.mark.parametrize("topk", [2, 6])
@pytest.mark.parametrize("m", [1, 33, 222])
@pytest.mark.parametrize("dtype", VLLM_DTYPES)
def test_moe_sum_vllm_grid(dtype, m, topk, k):
    g = gen(seed_of("vllm", m, topk, k, dtype))
    _check_moe_sum(torch.randn(m, topk, k, generator=g).to(dtype), None, None, torch.ones(m, topk, dtype=torch.bool),
                   what="moe_sum")


@pytest.mark.parametrize("skip", ["padding", "expert_map"])
@pytest.mark.parametrize("k", [128, 1024])
@pytest.mark.parametrize("topk", [2, 6])
@pytest.mark.parametrize("m", [1, 33, 64])
@pytest.mark.parametrize("dtype", VLLM_DTYPES)
def test_moe_sum_vllm_skipped_slots_grid(dtype, m, topk, k, skip):
    g = gen(seed_of("vllm-skip", m, topk, k, dtype, skip))
    input = torch.randn(m, topk, k, generator=g).to(dtype)
    topk_ids, expert_map, live = _routing(m, topk, skip, torch.int32, g)
    input.masked_fill_(~live.unsqueeze(-1), float("nan"))  # skipped slots: uninitialised memory in vLLM
    _check_moe_sum(input, topk_ids, expert_map, live, what=f"moe_sum {skip}")


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("skip", ["none", "padding", "expert_map"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_sum_layouts(dtype, layout, skip, index_dtype):
    g = gen(seed_of("vllm-layout", dtype, layout, skip, index_dtype))
    input = _layout(33, 6, 200, dtype, layout, g)
    topk_ids, expert_map, live = _routing(33, 6, skip, index_dtype, g)
    if layout != "expanded":  # (every slot is one row there)
        input.masked_fill_(~live.unsqueeze(-1), float("nan"))
    _check_moe_sum(input, topk_ids, expert_map, live, what=f"moe_sum {layout} {skip}")


@pytest.mark.parametrize("ids_dtype,map_dtype", [(torch.int32, torch.int64), (torch.int64, torch.int32)],
                         ids=["ids_i32-map_i64", "ids_i64-map_i32"])
def test_moe_sum_mixed_index_dtypes(ids_dtype, map_dtype):
    g = gen(seed_of("vllm-mixed", ids_dtype, map_dtype))
    input = torch.randn(17, 4, 64, generator=g)
    topk_ids, expert_map, live = _routing(17, 4, "expert_map", torch.int64, g)
    _check_moe_sum(input, topk_ids.to(ids_dtype), expert_map.to(map_dtype), live, what="moe_sum mixed index dtypes")


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "hidden_strided"])
def test_moe_sum_reads_the_input_in_place(layout):
    # Only a hidden dimension that is not dense is copied: every other layout is a view of the
    # caller's storage, with an index only where a slot is not row i*topk + j of that view.
    input = _layout(5, 3, 16, torch.float32, layout, gen(0))
    rows, slots = engines._slot_rows(input)
    assert rows.untyped_storage().data_ptr() == input.untyped_storage().data_ptr()
    assert (slots is None) == (layout in ("contiguous", "row_padded"))
    gathered = rows[slots] if slots is not None else rows
    torch.testing.assert_close(gathered.view(5, 3, 16), input, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0, 4, 8), (3, 0, 8), (3, 4, 0), (1, 1, 8), (7, 1, 8)],
                         ids=["m_0", "topk_0", "k_0", "m_1_topk_1", "topk_1"])
def test_moe_sum_edges(shape):
    m, topk, k = shape
    g = gen(seed_of("vllm-edge", shape))
    input = torch.randn(m, topk, k, generator=g)
    if m * topk:
        topk_ids, expert_map, live = _routing(m, topk, "expert_map", torch.int64, g)
    else:
        topk_ids, expert_map, live = None, None, torch.ones(m, topk, dtype=torch.bool)
    _check_moe_sum(input, topk_ids, expert_map, live, what=f"moe_sum {shape}")


# ------------------------------------------------------------------------------------------------
# Bad arguments: an error naming the argument, the expectation and what came; nothing modified
# ------------------------------------------------------------------------------------------------

class BadCall(NamedTuple):
    id: str
    call: Callable[[], dict]   # -> dict(fn=, args=): the arguments of one bad call
    exc: type
    needles: tuple


def _sg(**over):
    g = gen(1)
    d = dict(input=torch.randn(6, 8, generator=g), output=_nan_output(3, 8, torch.float32),
             permutation=torch.tensor([0, 1, -1, 3, 4, 0], dtype=torch.int32), factors=torch.rand(6, generator=g))
    d.update(over)
    return dict(fn=fused_moe_ops.apply_shuffle_mul_sum, args=d)


def _vl(**over):
    g = gen(2)
    d = dict(input=torch.randn(3, 2, 8, generator=g), output=_nan_output(3, 8, torch.float32),
             topk_ids=torch.tensor([[0, 5], [-1, 2], [7, 7]], dtype=torch.int32),
             expert_map=torch.tensor([0, -1, 1, -1, 2, 3, -1, 4], dtype=torch.int32))
    d.update(over)
    return dict(fn=fused_moe_ops.moe_sum, args=d)


SG, VL, OP = "fused_moe_ops.apply_shuffle_mul_sum: ", "fused_moe_ops.moe_sum: ", "moe::shuffle_mul_sum: "
BAD_CALLS = [
    BadCall("sglang-output-1d", lambda: _sg(output=_nan_output(3, 8, torch.float32).view(-1)), RuntimeError,
            (SG, "output must be a 2-D tensor (M, K)", "got 1-D with shape (24,)")),
    BadCall("sglang-permutation-2d", lambda: _sg(permutation=torch.zeros(3, 2, dtype=torch.int32)), RuntimeError,
            (SG, "permutation must be a 1-D tensor (M*topk,)", "got 2-D with shape (3, 2)")),
    BadCall("sglang-permutation-not-multiple-of-m", lambda: _sg(permutation=torch.zeros(7, dtype=torch.int32)),
            RuntimeError, (SG, "a multiple of M = output.shape[0] = 3", "got 7")),
    BadCall("sglang-permutation-float", lambda: _sg(permutation=torch.zeros(6)), RuntimeError,
            (OP, "permutation must have dtype int32 or int64", "got torch.float32")),
    BadCall("sglang-permutation-out-of-range", lambda: _sg(permutation=torch.tensor([0, 1, 2, 3, 4, 6])), IndexError,
            (OP, "permutation[5] = 6 is out of range", "input has 6 rows")),
    BadCall("sglang-factors-flat-wrong-length", lambda: _sg(factors=torch.rand(5)), RuntimeError,
            (SG, "factors as (M*topk,) must have one entry per permutation entry (6)", "got shape (5,)")),
    BadCall("sglang-factors-2d-wrong-rows", lambda: _sg(factors=torch.rand(2, 3)), RuntimeError,
            (SG, "factors as (M, topk) must have M = output.shape[0] = 3 rows", "got shape (2, 3)")),
    BadCall("sglang-factors-2d-wrong-topk", lambda: _sg(factors=torch.rand(3, 3)), RuntimeError,
            (OP, "permutation must have M*topk = 3*3 = 9 entries", "got 6")),
    BadCall("sglang-factors-3d", lambda: _sg(factors=torch.rand(3, 2, 1)), RuntimeError,
            (SG, "factors must be None, 1-D (M*topk,) or 2-D (M, topk)", "got 3-D with shape (3, 2, 1)")),
    BadCall("sglang-factors-float64", lambda: _sg(factors=torch.rand(6, dtype=torch.float64)), RuntimeError,
            (OP, "factors must have dtype float32, float16, bfloat16", "got torch.float64")),
    BadCall("sglang-output-wrong-k", lambda: _sg(output=_nan_output(3, 7, torch.float32)), RuntimeError,
            (OP, "out must have shape (M, K) = (3, 8)", "got (3, 7)")),
    BadCall("sglang-output-int", lambda: _sg(output=torch.zeros(3, 8, dtype=torch.int32)), RuntimeError,
            (OP, "out must have dtype float32, float16, bfloat16", "got torch.int32")),
    BadCall("vllm-expert-map-without-topk-ids", lambda: _vl(topk_ids=None), RuntimeError,
            (VL, "expert_map requires topk_ids", "got topk_ids=None")),
    BadCall("vllm-input-2d", lambda: _vl(input=torch.randn(6, 8)), RuntimeError,
            (VL, "input must be a 3-D tensor (num_tokens, topk, hidden_size)", "got 2-D with shape (6, 8)")),
    BadCall("vllm-output-wrong-shape", lambda: _vl(output=_nan_output(3, 7, torch.float32)), RuntimeError,
            (VL, "output must have shape (num_tokens, hidden_size) = (3, 8)", "got (3, 7)")),
    BadCall("vllm-output-dtype-mismatch", lambda: _vl(output=_nan_output(3, 8, torch.float16)), RuntimeError,
            (VL, "output must have the same dtype as input (torch.float32)", "got torch.float16")),
    BadCall("vllm-topk-ids-wrong-shape", lambda: _vl(topk_ids=torch.zeros(3, 1, dtype=torch.int32)), RuntimeError,
            (VL, "topk_ids must have shape (num_tokens, topk) = (3, 2)", "got (3, 1)")),
    BadCall("vllm-topk-ids-float", lambda: _vl(topk_ids=torch.zeros(3, 2)), RuntimeError,
            (VL, "topk_ids must have dtype int32, int64", "got torch.float32")),
    BadCall("vllm-expert-map-2d", lambda: _vl(expert_map=torch.zeros(2, 4, dtype=torch.int32)), RuntimeError,
            (VL, "expert_map must be a 1-D tensor (num_experts,)", "got 2-D with shape (2, 4)")),
    BadCall("vllm-expert-map-float", lambda: _vl(expert_map=torch.zeros(8)), RuntimeError,
            (VL, "expert_map must have dtype int32, int64", "got torch.float32")),
    BadCall("vllm-topk-id-past-expert-map", lambda: _vl(topk_ids=torch.tensor([[0, 5], [-1, 8], [7, 7]])), IndexError,
            (VL, "topk_ids[1, 1] = 8 is out of range", "expert_map has 8 entries")),
    BadCall("vllm-input-int", lambda: _vl(input=torch.ones(3, 2, 8, dtype=torch.int32),
                                          output=torch.zeros(3, 8, dtype=torch.int32)), RuntimeError,
            (OP, "input must have dtype float32, float16, bfloat16", "got torch.int32")),
]


@pytest.mark.parametrize("bad", [pytest.param(b, id=b.id) for b in BAD_CALLS])
def test_bad_arguments_raise_clearly(bad):
    spec = bad.call()
    args = spec["args"]
    before = snapshot(*args.values())
    with pytest.raises(bad.exc) as info:
        spec["fn"](**args)
    for needle in bad.needles:
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"
    assert_unmodified(before, *args.values())  # output included: a bad call writes nothing


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True), CUDA graphs
# ------------------------------------------------------------------------------------------------

def _both(x3, out_vllm, topk_ids, expert_map, x2, out_sglang, permutation, factors):
    fused_moe_ops.moe_sum(x3, out_vllm, topk_ids, expert_map)
    fused_moe_ops.apply_shuffle_mul_sum(x2, out_sglang, permutation, factors)
    return out_vllm, out_sglang


def _both_args(seed, device="cpu", factors="flat", m=9):
    g = gen(seed)
    topk, k = 4, 24
    x3 = torch.randn(topk, m, k, generator=g).transpose(0, 1)
    topk_ids, expert_map, live = _routing(m, topk, "expert_map", torch.int32, g)
    x2 = torch.randn(m * topk, k, generator=g).to(torch.bfloat16)
    permutation = make_permutation(m, topk, m * topk, torch.int64, g)
    f = torch.rand(m * topk, generator=g) if factors == "flat" else None
    args = [x3, _nan_output(m, k, torch.float32), topk_ids, expert_map, x2, _nan_output(m, k, torch.bfloat16),
            permutation, f]
    return [None if a is None else a.to(device) for a in args]


@pytest.mark.parametrize("factors,dynamic", [("flat", False), ("none", False), ("flat", True)],
                         ids=["factors_flat", "factors_none", "dynamic_token_count"])
def test_fullgraph_compile_matches_eager(factors, dynamic):
    # aot_eager: Dynamo's capture (fullgraph: no graph break anywhere in either function) and
    # functionalization of the op's .out form, without Inductor's codegen time. Static strides take
    # the eager path's row view of the transposed input; a dynamic token count the reshape.
    torch._dynamo.reset()
    compiled = torch.compile(_both, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for seed in (3, 4) if dynamic else (3,):
        got = compiled(*_both_args(seed, factors=factors, m=9 + 4 * (seed - 3)))
        want = _both(*_both_args(seed, factors=factors, m=9 + 4 * (seed - 3)))
        for a, b in zip(got, want):
            assert not a.isnan().any()
            torch.testing.assert_close(a, b, rtol=0, atol=0)


COMPILED_BAD = ("sglang-output-1d", "sglang-factors-flat-wrong-length", "sglang-factors-float64",
                "vllm-expert-map-without-topk-ids", "vllm-output-dtype-mismatch", "vllm-topk-ids-wrong-shape")


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph_breaks_allowed", "fullgraph"])
@pytest.mark.parametrize("bad", [pytest.param(b, id=b.id) for b in BAD_CALLS if b.id in COMPILED_BAD])
def test_bad_arguments_compiled_name_the_same_thing(bad, fullgraph):
    # Compiled, a bad call names what eager names: the same exception type where Dynamo may fall back
    # to eager (the op's own checks come as Dynamo's TorchRuntimeError, a RuntimeError); under
    # fullgraph=True Dynamo reports the raise as unsupported, with our message inside.
    spec = bad.call()
    torch._dynamo.reset()
    compiled = torch.compile(lambda kw: spec["fn"](**kw), fullgraph=fullgraph, backend="aot_eager")
    before = snapshot(*spec["args"].values())
    with pytest.raises(Exception) as info:
        compiled(spec["args"])
    if not fullgraph:
        assert issubclass(info.type, bad.exc)
    for needle in bad.needles:
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"
    assert_unmodified(before, *spec["args"].values())


@MARK_CUDA
@pytest.mark.parametrize("cold_cache", [False, True], ids=["warm_cache", "cold_cache"])
def test_cuda_graph_capture_and_replay(cold_cache):
    # Neither function synchronises with the host, so both capture. With a cold cache the helper
    # tensors (the ones, the slot index) are first made inside the capture, where a kernel is
    # recorded and not run: they must not be cached, or the eager call after it reads garbage.
    from fused_moe_ops import _registry

    if _registry.ACTIVE.get("cuda") == "reference":
        pytest.skip(f"CUDA op runs on the reference fallback ({_registry.FALLBACK_REASONS.get('cuda')})")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture (lazy module loading)
        _both(*_both_args(4, "cuda", factors="none"))
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if cold_cache:
        engines._ONES.clear()
        engines._ARANGE.clear()
    args = _both_args(5, "cuda", factors="none")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _both(*args)
    for out in (args[1], args[5]):
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    eager_after = _both(*_both_args(5, "cuda", factors="none"))
    on_cpu = _both(*_both_args(5, "cpu", factors="none"))
    for replayed, eager, cpu in zip((args[1], args[5]), eager_after, on_cpu):
        torch.testing.assert_close(replayed, eager, rtol=0, atol=0)
        torch.testing.assert_close(replayed.cpu(), cpu)


# ------------------------------------------------------------------------------------------------
# The README's lines run and print what it says; the overhead tool runs
# ------------------------------------------------------------------------------------------------

def test_readme_engine_section_runs_as_printed(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Use it from an engine", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    printed = section.split("prints `", 1)[1].split("`", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == printed


def test_overhead_tool_runs():
    from fused_moe_ops.bench import engines as bench

    threads = torch.get_num_threads()
    try:
        rows = bench.run(0.002, "inference", [(2, 3, 16)])
    finally:
        torch.set_num_threads(threads)
    assert len(rows) == 5 and all(r["wrapper_us"] > 0 and r["op_us"] > 0 for r in rows)
