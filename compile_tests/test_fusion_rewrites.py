"""Every combine spelling is rewritten into moe.shuffle_mul_sum, in float32,
float16 and bfloat16, with static shapes and with a dynamic token count, and its result matches the
float64 reference at least as closely as eager does."""
from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fused_moe_ops
from fusion_cases import (
    BY_NAME,
    DTYPES,
    REWRITTEN,
    assert_fused,
    assert_not_fused,
    check_accuracy,
    fusion_log,
    make_inputs,
    reference64,
    symbolic_m_logged,
)

M = 5


def _compile_and_check(sp, dtype, device="cpu", m=M, **compile_kwargs):
    args = make_inputs(sp, m, dtype, device)
    compiled = torch.compile(sp.fn, **compile_kwargs)
    out, codes = run_and_get_code(compiled, *args)
    stats = fused_moe_ops.fusion_stats()
    assert stats["by_pattern"] == {sp.pattern: 1}, stats
    assert stats["rewrites"] == 1
    assert_fused("\n".join(codes), generated=sp.generated)
    check_accuracy(out, sp.fn(*args), reference64(sp, args))
    return compiled


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sp", REWRITTEN, ids=repr)
def test_rewritten_static(sp, dtype):
    _compile_and_check(sp, dtype)


def _dynamic_cases():
    cases = [(sp, torch.float32) for sp in REWRITTEN if sp.dynamic_ok]
    cases += [(BY_NAME["seed"], torch.float16), (BY_NAME["seed"], torch.bfloat16)]
    return cases


@pytest.mark.parametrize("sp,dtype", _dynamic_cases(), ids=lambda v: repr(v) if not isinstance(v, torch.dtype) else str(v))
def test_rewritten_dynamic_true(sp, dtype):
    """dynamic=True: one compile serves two token counts, and the rewrite saw a symbolic m."""
    with fusion_log() as messages:
        compiled = _compile_and_check(sp, dtype, dynamic=True)
    assert symbolic_m_logged(messages), messages
    args = make_inputs(sp, M + 4, dtype, seed=1)
    out = compiled(*args)
    assert fused_moe_ops.fusion_stats()["rewrites"] == 1, "recompiled for a new token count"
    check_accuracy(out, sp.fn(*args), reference64(sp, args))


def _mark_token_dims(sp, args):
    """The token count: dim 0 of every input (the weights and the index have m and m*topk entries,
    the expert output has m*topk + padding rows)."""
    for t in args:
        torch._dynamo.mark_dynamic(t, 0)


def _mark_dynamic_cases():
    cases = [(sp, torch.bfloat16) for sp in REWRITTEN if sp.dynamic_ok]
    cases += [(BY_NAME["seed"], torch.float32), (BY_NAME["seed"], torch.float16)]
    return cases


@pytest.mark.parametrize("sp,dtype", _mark_dynamic_cases(), ids=lambda v: repr(v) if not isinstance(v, torch.dtype) else str(v))
def test_rewritten_mark_dynamic(sp, dtype):
    args = make_inputs(sp, M, dtype)
    _mark_token_dims(sp, args)
    compiled = torch.compile(sp.fn)
    with fusion_log() as messages:
        out, codes = run_and_get_code(compiled, *args)
    assert fused_moe_ops.fusion_stats()["by_pattern"] == {sp.pattern: 1}
    assert_fused("\n".join(codes), generated=sp.generated)
    assert symbolic_m_logged(messages), messages
    check_accuracy(out, sp.fn(*args), reference64(sp, args))
    args = make_inputs(sp, M + 6, dtype, seed=2)
    out = compiled(*args)
    assert fused_moe_ops.fusion_stats()["rewrites"] == 1, "recompiled for a new token count"
    check_accuracy(out, sp.fn(*args), reference64(sp, args))


def test_check_can_fail_without_the_pass():
    """The generated-code check is not vacuous: with the pass off the seed line keeps its own reduction."""
    sp = BY_NAME["seed"]
    args = make_inputs(sp, M, torch.float32)
    with fused_moe_ops.disable_fusion():
        _, codes = run_and_get_code(torch.compile(sp.fn), *args)
    code = "\n".join(codes)
    assert_not_fused(code)
    with pytest.raises(Exception):
        assert_fused(code)
    assert fused_moe_ops.fusion_stats()["rewrites"] == 0


@pytest.mark.parametrize("name", ["seed", "weights_before_gather", "einsum"])
def test_negative_indices_follow_eager(name):
    """Negative entries in the graph input wrap like eager's x[idx] (the op alone would skip them)."""
    sp = BY_NAME[name]
    x, idx, w = make_inputs(sp, M, torch.float32)
    idx = -torch.arange(1, idx.numel() + 1) % 3 - 1   # only negative entries: -1, -2, -3, -1, ...
    args = (x, idx, w)
    out = torch.compile(sp.fn)(x, idx, w)
    assert fused_moe_ops.fusion_stats()["rewrites"] == 1
    eager = sp.fn(*args)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    skipped = fused_moe_ops.shuffle_mul_sum(x, idx, w.view(M, -1) if sp.kind != "sorted" else w[:idx.numel()].view(M, -1))
    assert not torch.allclose(out, skipped), "negative entries were skipped instead of wrapped"


@pytest.mark.parametrize("bad", ["too_large", "too_negative"])
def test_out_of_range_index_raises(bad):
    """An index eager rejects (>= R or < -R) is still an error after the rewrite."""
    sp = BY_NAME["seed"]
    x, idx, w = make_inputs(sp, M, torch.float32)
    idx = idx.clone()
    idx[3] = x.shape[0] if bad == "too_large" else -x.shape[0] - 1
    with pytest.raises((IndexError, RuntimeError)):
        sp.fn(x, idx, w)
    compiled = torch.compile(sp.fn)
    with pytest.raises((IndexError, RuntimeError)):
        compiled(x, idx, w)
    assert fused_moe_ops.fusion_stats()["rewrites"] == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_expert_output(dtype):
    """x with a row stride > K (a slice of a wider buffer) is passed to the op as is."""
    sp = BY_NAME["seed"]
    x, idx, w = make_inputs(sp, M, dtype)
    wide = torch.randn(x.shape[0], 2 * x.shape[1]).to(dtype)
    wide[:, : x.shape[1]] = x

    def fn(buf, idx, w):
        return sp.fn(buf[:, : x.shape[1]], idx, w)

    out, codes = run_and_get_code(torch.compile(fn), wide, idx, w)
    assert fused_moe_ops.fusion_stats()["rewrites"] == 1
    assert_fused("\n".join(codes))
    check_accuracy(out, fn(wide, idx, w), reference64(sp, (x, idx, w)))


_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@_needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sp", REWRITTEN, ids=repr)
def test_rewritten_static_cuda(sp, dtype):
    _compile_and_check(sp, dtype, device="cuda")


@pytest.mark.cuda
@_needs_cuda
@pytest.mark.parametrize("sp", [sp for sp in REWRITTEN if sp.dynamic_ok], ids=repr)
def test_rewritten_dynamic_true_cuda(sp):
    with fusion_log() as messages:
        compiled = _compile_and_check(sp, torch.bfloat16, device="cuda", dynamic=True)
    assert symbolic_m_logged(messages), messages
    args = make_inputs(sp, M + 4, torch.bfloat16, device="cuda", seed=1)
    out = compiled(*args)
    assert fused_moe_ops.fusion_stats()["rewrites"] == 1, "recompiled for a new token count"
    check_accuracy(out, sp.fn(*args), reference64(sp, args))
