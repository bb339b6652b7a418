"""Programs an adversarial search found where the pass (or the op under torch.compile) parted from
eager: each compiled with the pass, without it, and run eagerly; every result must be eager's
(dtype, shape, NaN positions, values, raised error). The fuzzer (compile_tests/fuzz.py) finds more.
"""
from __future__ import annotations

import pytest
import torch

import fused_moe_ops
from fusion_cases import DTYPES, HF_TOPK, K, _TOL, hf_grouped_mm_combine, hf_grouped_mm_inputs


def _compiled(fn, dynamic, fusion: bool):
    torch._dynamo.reset()
    if fusion:
        fused_moe_ops.enable_fusion()
    else:
        fused_moe_ops.disable_fusion()
    return torch.compile(fn, dynamic=dynamic, fullgraph=True)


def _assert_same(out, eager, what):
    assert out.dtype == eager.dtype and out.shape == eager.shape, (what, out.dtype, eager.dtype, out.shape)
    assert torch.equal(out.isnan(), eager.isnan()), (
        f"{what}: NaN at {out.isnan().nonzero().tolist()[:6]}, eager at {eager.isnan().nonzero().tolist()[:6]}")
    tol = _TOL[eager.dtype] * max(1.0, float(eager.nan_to_num(0, 0, 0).abs().max()))
    torch.testing.assert_close(out, eager, equal_nan=True, atol=tol, rtol=_TOL[eager.dtype], msg=what)


def _run_three_ways(fn, args, dynamic):
    """eager, compiled with the pass, compiled without; returns (eager, with, without, fired)."""
    before = [a.clone() for a in args]
    eager = fn(*args)
    fused_moe_ops.reset_fusion_stats()
    with_pass = _compiled(fn, dynamic, fusion=True)(*args)
    fired = fused_moe_ops.fusion_stats()["by_pattern"]
    without = _compiled(fn, dynamic, fusion=False)(*args)
    fused_moe_ops.enable_fusion()
    for b, a in zip(before, args):
        assert torch.equal(b.isnan(), a.isnan()) and torch.equal(b.nan_to_num(), a.nan_to_num()), "an input changed"
    return eager, with_pass, without, fired


def where_mask_broadcast_branch(x, idx, w, mask):
    m, k = w.shape[0], x.shape[1]
    return (torch.where(mask, 0.0, x[:1])[idx].view(m, 2, k) * w.view(m, 2, 1)).sum(dim=1)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_row_mask_where_with_a_broadcasting_branch_compiles(dynamic):
    """``where(mask, 0, x[:1])``: the kept branch broadcasts from one row. Compiling used to fail
    with the pass (the op got the one-row branch and the four-row mask)."""
    x = torch.arange(16.0).view(4, 4)
    idx = torch.tensor([0, 1, 2, 3])
    w = torch.rand(2, 2)
    mask = torch.tensor([[True], [False], [False], [False]])
    eager, with_pass, without, _ = _run_three_ways(where_mask_broadcast_branch, (x, idx, w, mask), dynamic)
    _assert_same(with_pass, eager, "with the pass")
    _assert_same(without, eager, "without the pass")


def masked_rows_combine(x, idx, w, mask):
    m, k = w.shape[0], x.shape[1]
    return (x.masked_fill(mask, 0.0)[idx].view(m, 2, k) * w.view(m, 2, 1).to(x.dtype)).sum(dim=1)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_masked_row_times_nonfinite_weight_stays_nan(bad, dtype, dynamic):
    """0 * NaN is NaN in eager: a masked row with a NaN/inf router weight gives a NaN token, which is
    what a user needs to see. The pass still rewrites (row_mask), and keeps the NaN."""
    x = torch.arange(16.0).view(4, 4).to(dtype)
    x[0] = float("nan")  # the masked row's own content never leaks
    idx = torch.tensor([0, 1, 0, 3])
    w = torch.tensor([[bad, 1.0], [1.0, 1.0]])
    mask = torch.tensor([[True], [False], [False], [False]])
    eager, with_pass, without, fired = _run_three_ways(masked_rows_combine, (x, idx, w, mask), dynamic)
    assert eager[0].isnan().all() and not eager[1].isnan().any()
    assert fired.get("gather_mul_sum") == 1, fired
    _assert_same(with_pass, eager, "with the pass")
    _assert_same(without, eager, "without the pass")


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_hf_grouped_mm_nan_weight_on_a_sentinel_row_stays_nan(dynamic):
    """HF transformers' spelling: the weight is applied per row after the sentinel mask, so a NaN
    weight on a sentinel row makes its token NaN in eager; the rewritten graph must agree."""
    m = 4
    proj_out, weights, perm, residual = hf_grouped_mm_inputs(m, seed=5)
    mask = torch.zeros(m * HF_TOPK, 1, dtype=torch.bool)
    sentinel = int(perm[5])  # slot 5 (token 1) reads this row: mask it and NaN its weight
    mask[sentinel] = True
    proj_out[sentinel] = float("nan")
    weights.view(-1)[5] = float("nan")
    args = (proj_out, weights, perm, residual, mask)
    eager, with_pass, without, fired = _run_three_ways(hf_grouped_mm_combine, args, dynamic)
    assert eager[0, 1].isnan().all() and eager.isnan().sum() == K, "eager: exactly token 1 is NaN"
    assert fired.get("weighted_rows_sum") == 1, fired
    _assert_same(with_pass, eager, "with the pass")
    _assert_same(without, eager, "without the pass")


def out_into_own_input(x, idx, w):
    return torch.ops.moe.shuffle_mul_sum.out(x, idx, w, out=x[:2])


def out_into_separate_alias(x, idx, w, out):
    return torch.ops.moe.shuffle_mul_sum.out(x, idx, w, out=out)


def out_expanded(x, idx, w):
    return torch.ops.moe.shuffle_mul_sum.out(x, idx, w, out=torch.zeros(1, x.shape[1]).expand(2, x.shape[1]))


OVERLAP = "out must not share memory with input, permutation or factors"
ALIAS_CASES = {
    "out-a-view-of-input-inside-the-graph": (out_into_own_input, lambda x: (), OVERLAP),
    "out-an-aliasing-graph-input": (out_into_separate_alias, lambda x: (x[1:3],), OVERLAP),
    "out-expanded": (out_expanded, lambda x: (), "out must not have elements that share memory"),
}


@pytest.mark.skipif(not fused_moe_ops.ops.OUT_IS_FUNCTIONALIZABLE, reason="the .out overload compiles on torch >= 2.12")
@pytest.mark.parametrize("fusion", [True, False], ids=["with-pass", "without-pass"])
@pytest.mark.parametrize("name", list(ALIAS_CASES))
def test_out_overlap_raises_compiled_as_in_eager(name, fusion):
    fn, extra, message = ALIAS_CASES[name]
    x, idx, w = torch.randn(4, 4), torch.tensor([0, 1, 2, 3]), torch.rand(2, 2)
    before = x.clone()
    args = (x, idx, w) + extra(x)
    with pytest.raises(RuntimeError, match=message):
        fn(*args)
    with pytest.raises(Exception, match=message):
        _compiled(fn, False, fusion)(*args)
    fused_moe_ops.enable_fusion()
    assert torch.equal(x, before), "the caller's tensor was written"


# ------------------------------------------------------------------ a torch whose autotuning API differs


def test_torch_2_11_autotuning_api_is_not_used(monkeypatch):
    """torch 2.11 has an ``autotune_custom_op`` of another shape (``return_choice``, no choice returned)
    and no ``user_lowerings``: the pass registered its lowering there anyway and every compile it
    rewrote failed with ImportError (found with the wheel under torch 2.11.0). Such a torch must read
    as "no custom-op autotuning", so the op stays and the compile works."""
    import inspect
    import sys
    import types

    from torch._inductor import lowering
    from torch._inductor.kernel import custom_op

    from fused_moe_ops.fusion import autotune

    def autotune_custom_op_2_11(name, decompositions, inputs, non_tensor_args, op_overload,
                                user_input_gen_fns=None, return_choice=False):
        raise AssertionError("not to be called")

    with monkeypatch.context() as mp:
        mp.setattr(custom_op, "autotune_custom_op", autotune_custom_op_2_11)
        assert "autotune_custom_op" in (autotune._why_unavailable() or "")
    fake_lowering = types.ModuleType("torch._inductor.lowering")  # no user_lowerings
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "torch._inductor.lowering", fake_lowering)
        mp.setattr(torch._inductor, "lowering", fake_lowering)
        assert "user_lowerings" in (autotune._why_unavailable() or "")
    if hasattr(lowering, "user_lowerings") and "return_choice" not in inspect.signature(
            custom_op.autotune_custom_op).parameters:
        assert autotune._why_unavailable() is None  # this torch's own API is the one used
