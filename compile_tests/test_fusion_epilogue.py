"""With the pass, a combine and its consumer (a residual / shared-expert add,
a scale) are ONE launch, the op; never more kernels than Inductor's own graph. For every rewritten
spelling, static and with the token count dynamic, on CPU (and CUDA where present), counted in the
generated code, and the result checked against the float64 reference."""
from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fused_moe_ops
from fusion_cases import (
    BY_NAME, HF_TOPK, REWRITTEN, TOPK, assert_fused, check_accuracy, hf_grouped_mm_combine, hf_grouped_mm_inputs,
    kernel_launches, make_inputs, reference64,
)

M, K = 5, 16
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def with_residual(sp):
    def fn(*args):
        *inputs, residual = args
        return residual + sp.fn(*inputs)
    return fn


def with_scale_and_residual(sp):
    def fn(*args):
        *inputs, residual = args
        return sp.fn(*inputs) * 2.5 + residual
    return fn


def with_view_and_residual(sp):
    def fn(*args):
        *inputs, residual = args
        out = sp.fn(*inputs)
        return out.view(1, -1, out.shape[-1]) + residual
    return fn


CONSUMERS = {
    "residual": (with_residual, lambda m, dt: torch.randn(m, K).to(dt), {"epilogue_add": 1}, 1.0),
    "scale+residual": (with_scale_and_residual, lambda m, dt: torch.randn(m, K).to(dt),
                       {"epilogue_scale": 1, "epilogue_add": 1}, 2.5),
    "view+residual": (with_view_and_residual, lambda m, dt: torch.randn(1, m, K).to(dt), {"epilogue_add": 1}, 1.0),
}


def _eager_dtype(sp, dtype):
    """The combine's result dtype: float32 weights without .to promote the product."""
    return torch.float32 if sp.name == "seed_no_to" else dtype


def _run(sp, consumer, dtype, device, dynamic):
    wrap, make_residual, folded, scale = CONSUMERS[consumer]
    fn = wrap(sp)
    inputs = make_inputs(sp, M, dtype, device)
    residual = make_residual(M, _eager_dtype(sp, dtype)).to(device)
    fused_moe_ops.reset_fusion_stats()
    out, codes = run_and_get_code(torch.compile(fn, dynamic=dynamic), *inputs, residual)
    stats = fused_moe_ops.fusion_stats()["by_pattern"]
    assert stats == {sp.pattern: 1, **folded}, stats
    assert_fused("\n".join(codes), generated=sp.generated)  # the op, and no generated kernel (but the
    # scatter family's inverse permutation)
    ref = reference64(sp, [t.cpu() for t in inputs]) * scale + residual.cpu().double().reshape(M, K)
    check_accuracy(out.reshape(M, K), fn(*inputs, residual).reshape(M, K), ref)

    torch._dynamo.reset()
    with fused_moe_ops.disable_fusion():
        _, plain = run_and_get_code(torch.compile(fn, dynamic=dynamic), *inputs, residual)
    without = kernel_launches("\n".join(plain))
    assert without["op"] == 0 and without["generated"] >= 1, without  # Inductor's own: at least one kernel


@pytest.mark.parametrize("consumer", list(CONSUMERS))
@pytest.mark.parametrize("sp", REWRITTEN, ids=repr)
def test_consumer_folds_into_the_one_launch(sp, consumer):
    _run(sp, consumer, torch.bfloat16, "cpu", dynamic=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("consumer", list(CONSUMERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_consumer_folds_dynamic(device, consumer, dtype):
    from fusion_cases import BY_NAME

    for name in ("seed", "weights_before_gather", "einsum"):
        torch._dynamo.reset()
        _run(BY_NAME[name], consumer, dtype, device, dynamic=True)


def _seed(x, idx, w):
    m, k = w.shape[0], x.shape[1]
    return (x[idx].view(m, TOPK, k) * w.view(m, TOPK, 1).to(x.dtype)).sum(dim=1)


LEFT = {
    # the add promotes bf16 to float32: the op would round once where eager rounds the combine first
    "promoting-add": lambda x, idx, w, r: _seed(x, idx, w) + r.float(),
    # the result is read twice: folding would lose the plain combine
    "two-users": lambda x, idx, w, r: (lambda c: torch.cat([c + r, c]))(_seed(x, idx, w)),
    # the addend broadcasts the result to (2, M, K)
    "broadcasting-add": lambda x, idx, w, r: _seed(x, idx, w) + r.expand(2, -1, -1),
    # a tensor scale is not a constant of the op
    "tensor-scale": lambda x, idx, w, r: _seed(x, idx, w) * r[0, 0],
}


@pytest.mark.parametrize("name", list(LEFT))
def test_consumer_left_alone(name):
    """The combine is still rewritten; the consumer stays an Inductor kernel (and the result is right)."""
    from fusion_cases import BY_NAME

    fn = LEFT[name]
    x, idx, w = make_inputs(BY_NAME["seed"], M, torch.bfloat16)
    r = torch.randn(M, K).bfloat16()
    out, codes = run_and_get_code(torch.compile(fn), x, idx, w, r)
    stats = fused_moe_ops.fusion_stats()["by_pattern"]
    assert "epilogue_add" not in stats and "epilogue_scale" not in stats, stats
    assert stats.get("gather_mul_sum", 0) >= 1, stats
    launches = kernel_launches("\n".join(codes))
    assert launches["generated"] >= 1, launches
    torch.testing.assert_close(out.float(), fn(x, idx, w, r).float(), atol=0.07, rtol=0.02)


# ------------------------------------------------------------------------------------------------
# HF transformers' grouped_mm experts (fusion_cases.hf_grouped_mm_combine).
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sentinel", [False, True], ids=["transformers-5.24", "transformers-5.17-sentinel-mask"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_hf_grouped_mm_combine_is_one_launch(sentinel, dynamic):
    m = 6
    proj_out, weights, perm, residual = hf_grouped_mm_inputs(m, seed=3)
    s = m * HF_TOPK
    args = [proj_out, weights, perm, residual]
    if sentinel:
        mask = torch.zeros(s, 1, dtype=torch.bool)
        mask[[2, 7]] = True
        proj_out[[2, 7]] = float("nan")  # a sentinel row's garbage must not leak
        args.append(mask)
    out, codes = run_and_get_code(torch.compile(hf_grouped_mm_combine, dynamic=dynamic), *args)
    stats = fused_moe_ops.fusion_stats()["by_pattern"]
    assert stats == {"weighted_rows_sum": 1, "epilogue_add": 1}, stats
    with_pass = kernel_launches("\n".join(codes))
    # What is left besides the op: the inverse permutation's scatter and the weights' gather, which
    # feed the op and which Inductor computes with or without the pass.
    assert with_pass["op"] == 1 and with_pass["generated"] <= 1, with_pass
    eager = hf_grouped_mm_combine(*args)
    assert not out.isnan().any()
    ref = hf_grouped_mm_combine(*[a.double() if a.is_floating_point() else a for a in args])
    err, err_eager = (out.double() - ref).abs().max(), (eager.double() - ref).abs().max()
    assert err <= err_eager + 2 ** -6 * ref.abs().max(), (err, err_eager)

    torch._dynamo.reset()
    with fused_moe_ops.disable_fusion():
        _, plain = run_and_get_code(torch.compile(hf_grouped_mm_combine, dynamic=dynamic), *args)
    without = kernel_launches("\n".join(plain))
    assert with_pass["generated"] + with_pass["op"] <= max(without["generated"], 1) + 1, (with_pass, without)


class SharedExpertAfterCombine(torch.nn.Module):
    """Qwen2-MoE's order: the routed combine first, then the gated shared expert, then their sum. The
    addend is computed after the op, so folding it moves the op down to the add."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(K, K)
        self.gate = torch.nn.Linear(K, 1)

    def forward(self, x, idx, w, h):
        from fusion_cases import seed

        routed = seed(x, idx, w)
        shared = torch.sigmoid(self.gate(h)) * self.shared(h)
        return routed + shared


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_shared_expert_computed_after_the_combine_folds(dynamic):
    from fusion_cases import BY_NAME

    torch.manual_seed(0)
    model = SharedExpertAfterCombine()
    x, idx, w = make_inputs(BY_NAME["seed"], M, torch.float32)
    h = torch.randn(M, K)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(model, dynamic=dynamic), x, idx, w, h)
        eager = model(x, idx, w, h)
    assert fused_moe_ops.fusion_stats()["by_pattern"] == {"gather_mul_sum": 1, "epilogue_add": 1}
    # the op, and the gated shared expert's pointwise kernel (its GEMMs are extern calls)
    assert kernel_launches("\n".join(codes))["op"] == 1
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


class SharedExpertThenResidual(SharedExpertAfterCombine):
    """As in a decoder layer: the routed + shared sum, viewed back to (batch, seq, hidden), then the
    residual add. Inductor computes the shared-expert add inside the residual add's kernel, so folding
    it into the op would only move the op down (and reorder the graph Inductor fuses by)."""

    def forward(self, x, idx, w, h, residual):
        return residual + super().forward(x, idx, w, h).view(1, M, K)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_shared_expert_add_read_by_a_pointwise_op_stays_in_place(dynamic):
    torch.manual_seed(0)
    model = SharedExpertThenResidual()
    x, idx, w = make_inputs(BY_NAME["seed"], M, torch.float32)
    h, residual = torch.randn(M, K), torch.randn(1, M, K)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(model, dynamic=dynamic), x, idx, w, h, residual)
        eager = model(x, idx, w, h, residual)
    assert fused_moe_ops.fusion_stats()["by_pattern"] == {"gather_mul_sum": 1}
    launches = kernel_launches("\n".join(codes))
    torch._dynamo.reset()
    with fused_moe_ops.disable_fusion():
        _, plain = run_and_get_code(torch.compile(model, dynamic=dynamic), x, idx, w, h, residual)
    without = kernel_launches("\n".join(plain))
    # the op, and one pointwise kernel for the gate, the two adds (Inductor's graph: one more for the combine)
    assert launches["op"] == 1 and launches["generated"] <= without["generated"], (launches, without)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
