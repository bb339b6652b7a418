"""The one-token combine, the loop over experts and the rank-3 per-token einsum, as public MoE code
writes them (compile_tests/reach_models.py rebuilds torchao's single-token path, vLLM's
moe_torch_iterative and gpt-oss's MLPBlock from their source, routing included), and the near misses
of those spellings that must stay Inductor's.

* torchao's ``(out * scores.view(-1, 1)).sum(dim=0)``: rewritten (``one_token_sum``, the gather
  form with one token); at decode Inductor takes its own code for it (``lowered``).
* vLLM's loop over experts: left alone (each expert's output is a tensor of its own; the op would
  need them copied into one, docs/FUSION.md).
* gpt-oss's ``einsum("bec,be->bc", t + bias, w)``: rewritten only where Inductor chooses between the
  op and its own code (its code fuses the bias again); with the op certain to stay it is left alone.
  ``"bce,be->bc"`` and ``"ebc,be->bc"`` over a transposed view of the same outputs are the same
  graph and rewritten; over outputs stored transposed they stay Inductor's (the op would need a copy).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fused_moe_ops
from fused_moe_ops.fusion.autotune import forced_lowering
from fused_moe_ops.reference import shuffle_mul_sum_reference
from fusion_cases import DTYPES, FUSED_CALL, kernel_launches
import reach_models as rm

H, INTER, E, TOPK = 16, 12, 4, 3
_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPE_IDS = [str(d).replace("torch.", "") for d in DTYPES]


def _layer_check(model, x, dtype, dynamic, pattern, rewrites, tokens=None):
    """Compile ``model`` (in ``dtype``), check the rewrite count of ``pattern`` and the result against
    eager (and the float64 layer in float32) for the first input and, where given, other token counts."""
    torch.manual_seed(1)
    reference = copy.deepcopy(model).double()
    model = model.to(dtype)
    with torch.no_grad():
        compiled = torch.compile(model, dynamic=dynamic)
        out, codes = run_and_get_code(compiled, x.to(dtype))
        stats = fused_moe_ops.fusion_stats()
        assert stats["by_pattern"].get(pattern, 0) == rewrites, stats
        combines = {p: n for p, n in stats["by_pattern"].items() if not p.startswith("epilogue_")}
        assert sum(combines.values()) == rewrites, stats  # no other combine rewritten
        launches = kernel_launches("\n".join(codes))
        for xi in [x] + [torch.randn(x.shape[:-2] + (t, x.shape[-1])) for t in tokens or ()]:
            xi = xi.to(dtype)
            got, eager = compiled(xi), model(xi)
            assert got.dtype == eager.dtype and got.shape == eager.shape
            scale = max(1.0, float(eager.abs().max()))
            torch.testing.assert_close(got, eager, atol=_TOL[dtype] * scale, rtol=0)
            if dtype == torch.float32:
                torch.testing.assert_close(got.double(), reference(xi.double()), atol=_TOL[dtype] * scale, rtol=0)
    return stats, launches


# ---------------------------------------------------------------- torchao: the one-token combine


@pytest.mark.parametrize("dtype", [pytest.param(d, id=i, marks=() if d == torch.float32 else pytest.mark.slow)
                                   for d, i in zip(DTYPES, DTYPE_IDS)])
def test_torchao_single_token_rewritten(dtype):
    stats, launches = _layer_check(rm.TorchaoSingleTokenMoE(H, INTER, E, TOPK), torch.randn(1, 1, H), dtype,
                                   False, "one_token_sum", 1)
    assert stats["lowered"] == {"op": 1} and launches["op"] == 1, (stats, launches)  # autotuning off here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torchao_single_token_dynamic(dtype):
    # dynamic=True: the token count 1 is specialised by Dynamo, the hidden size is symbolic
    _layer_check(rm.TorchaoSingleTokenMoE(H, INTER, E, TOPK), torch.randn(1, 1, H), dtype, True,
                 "one_token_sum", 1)


def test_torchao_single_token_inductor_chooses_its_code_at_decode(inductor_chooses):
    """At one token on CPU the op's dispatch costs more than the whole combine: Inductor's code is
    inlined, and the graph launches no more kernels than without the pass."""
    model = rm.TorchaoSingleTokenMoE(H, INTER, E, TOPK)
    stats, launches = _layer_check(model, torch.randn(1, 1, H), torch.bfloat16, False, "one_token_sum", 1)
    assert stats["lowered"] == {"unrolled": 1} and launches["op"] == 0, (stats, launches)
    torch._dynamo.reset()
    with fused_moe_ops.disable_fusion(), torch.no_grad():
        _, plain = run_and_get_code(torch.compile(model), torch.randn(1, 1, H).to(torch.bfloat16))
    assert launches["generated"] <= kernel_launches("\n".join(plain))["generated"], (launches, plain)


def _one_token_inputs(dtype, rows=6, k=H, special=True):
    """(x, idx, w): ``topk`` = 5 slots reading duplicated rows and a -1 entry (eager wraps it), with a
    NaN and an inf in the rows read where ``special``."""
    x = torch.randn(rows, k).to(dtype)
    idx = torch.tensor([2, 0, 2, -1, 4])
    w = torch.rand(1, idx.numel())
    if special:  # column-local: a NaN or inf weight would make every column non-finite (separate test)
        x[4, 3] = float("nan")
        x[0, 5] = float("inf")
    return x, idx, w


def _one_token_reference(x, idx, w):
    wrapped = torch.where(idx < 0, idx + x.shape[0], idx)
    return shuffle_mul_sum_reference(x.float(), wrapped, w.float(), torch.float32,
                                     acc_dtype=torch.float64).double().view(-1)


ONE_TOKEN_SPELLINGS = {
    # torchao writes rows and scores; with a gather, an index_select, keepdim, the upcast form
    "gathered": lambda x, idx, w: (x[idx] * w.view(-1, 1).to(x.dtype)).sum(dim=0),
    "commuted_keepdim": lambda x, idx, w: (w.view(-1, 1).to(x.dtype) * x[idx]).sum(0, keepdim=True),
    "index_select_dim_minus2": lambda x, idx, w: (x.index_select(0, idx.clamp(min=0)) * w.t().to(x.dtype)).sum(-2),
    "upcast": lambda x, idx, w: (x[idx].float() * w.view(-1, 1)).sum(0).to(x.dtype),
    "promoting": lambda x, idx, w: (x[idx] * w.view(-1, 1)).sum(0),  # float32 weights promote the result
}


def _spelling_params():
    """Every spelling, dtype and lowering; fast: the torchao spelling in every dtype and the others in
    bfloat16 (the rest repeat those paths, marked slow)."""
    for name in ONE_TOKEN_SPELLINGS:
        for dtype, dtype_id in zip(DTYPES, DTYPE_IDS):
            for lowering in ("op", "unrolled", "reduction"):
                fast = name == "gathered" or (dtype == torch.bfloat16 and lowering != "reduction")
                yield pytest.param(name, dtype, lowering, id=f"{name}-{dtype_id}-{lowering}",
                                   marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("name,dtype,lowering", list(_spelling_params()))
def test_one_token_spellings_under_every_lowering(name, dtype, lowering):
    """Duplicated rows, a wrapped -1, NaN and inf in rows and weights: eager's dtype, shape, NaN/inf
    positions and values (to the dtype's rounding), and at least as close to the float64 reference."""
    fn = ONE_TOKEN_SPELLINGS[name]
    x, idx, w = _one_token_inputs(dtype)
    if name == "index_select_dim_minus2":
        idx = idx.clamp(min=0)
    eager = fn(x, idx, w)
    with forced_lowering(lowering):
        out, codes = run_and_get_code(torch.compile(fn, fullgraph=True), x, idx, w)
    assert fused_moe_ops.fusion_stats()["by_pattern"] == {"one_token_sum": 1}, fused_moe_ops.fusion_stats()
    assert fused_moe_ops.fusion_stats()["lowered"] == {lowering: 1}
    assert (FUSED_CALL in codes[-1]) == (lowering == "op")
    assert out.dtype == eager.dtype and out.shape == eager.shape
    assert torch.equal(out.isnan(), eager.isnan()) and torch.equal(out.isinf(), eager.isinf())
    finite = eager.isfinite()
    ref = _one_token_reference(x, idx, w).view(eager.shape)
    err_out = (out.double() - ref)[finite].abs().max()
    err_eager = (eager.double() - ref)[finite].abs().max()
    # the op and both decompositions accumulate in float32 and round once: never further from the
    # float64 sum than eager (which rounds every product and, in 16-bit, the sum) plus one rounding
    ulp = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}[out.dtype]
    scale = max(1.0, float(ref[finite].abs().max()))
    assert err_out <= err_eager + 2 * ulp * scale, (err_out, err_eager)
    assert err_out <= _TOL[out.dtype] * scale, err_out


@pytest.mark.parametrize("lowering", ["op", "unrolled"])
@pytest.mark.parametrize("weight", [float("nan"), float("inf")], ids=["nan_weight", "inf_weight"])
def test_one_token_non_finite_weight(weight, lowering):
    """A NaN or inf router weight shows in every column, as eager's product gives (inf * 0 is NaN)."""
    fn = ONE_TOKEN_SPELLINGS["gathered"]
    x, idx, w = _one_token_inputs(torch.bfloat16, special=False)
    x[0, 2] = 0.0
    w[0, 1] = weight  # slot 1 reads row 0
    eager = fn(x, idx, w)
    with forced_lowering(lowering):
        out = torch.compile(fn, fullgraph=True)(x, idx, w)
    assert fused_moe_ops.fusion_stats()["rewrites"] == 1
    assert torch.equal(out.isnan(), eager.isnan()) and torch.equal(out.isinf(), eager.isinf()), (out, eager)
    assert eager.isnan().any() and not eager.isfinite().any()


def test_one_token_out_of_range_index_raises():
    fn = ONE_TOKEN_SPELLINGS["gathered"]
    x, idx, w = _one_token_inputs(torch.float32, special=False)
    compiled = torch.compile(fn, fullgraph=True)
    compiled(x, idx, w)
    assert fused_moe_ops.fusion_stats()["rewrites"] == 1
    bad = idx.clone()
    bad[2] = x.shape[0]
    with pytest.raises((IndexError, RuntimeError), match="out of bounds|out of range"):
        compiled(x, bad, w)


ONE_TOKEN_NEAR_MISSES = {
    # a product that is not rows times one weight per row
    "full_weights": (lambda x, w: (x * w).sum(0), lambda: (torch.randn(5, H), torch.rand(5, H))),
    "weights_broadcast_over_rows": (lambda x, w: (x * w).sum(0), lambda: (torch.randn(5, H), torch.rand(1, H))),
    # the right product, summed over the other dimension or over both
    "sum_over_dim1": (lambda x, w: (x * w.view(-1, 1)).sum(1), lambda: (torch.randn(5, H), torch.rand(5))),
    "sum_over_all": (lambda x, w: (x * w.view(-1, 1)).sum(), lambda: (torch.randn(5, H), torch.rand(5))),
    # 3-D: a sum over dim 0 of (topk, m, k) rows is not the one-token combine
    "three_d_sum_dim0": (lambda x, w: (x * w.unsqueeze(-1)).sum(0), lambda: (torch.randn(3, 4, H), torch.rand(3, 4))),
    "integer_rows": (lambda x, w: (x * w.view(-1, 1)).sum(0), lambda: (torch.randint(0, 9, (5, H)), torch.randint(0, 9, (5,)))),
    "float64": (lambda x, w: (x * w.view(-1, 1)).sum(0), lambda: (torch.randn(5, H).double(), torch.rand(5).double())),
    "product_read_twice": (lambda x, w: (lambda p: (p.sum(0), p))(x * w.view(-1, 1)),
                           lambda: (torch.randn(5, H), torch.rand(5))),
}


@pytest.mark.parametrize("name", list(ONE_TOKEN_NEAR_MISSES))
def test_one_token_near_misses_left_alone(name):
    fn, make = ONE_TOKEN_NEAR_MISSES[name]
    args = make()
    out = torch.compile(fn, fullgraph=True)(*args)
    assert fused_moe_ops.fusion_stats()["rewrites"] == 0, fused_moe_ops.fusion_stats()
    eager = fn(*args)
    for got, want in zip(out if isinstance(out, tuple) else (out,), eager if isinstance(eager, tuple) else (eager,)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- vLLM: the loop over experts


@pytest.mark.parametrize("dtype,dynamic", [(torch.float32, False),
                                           pytest.param(torch.bfloat16, False, marks=pytest.mark.slow),
                                           (torch.float16, True)],
                         ids=["float32-static", "bfloat16-static", "float16-dynamic"])
def test_vllm_iterative_loop_left_to_inductor(dtype, dynamic):
    """Each expert's output is a tensor of its own: the op would need them copied into one first,
    where Inductor adds them in one pointwise kernel (docs/FUSION.md, measured). Left alone."""
    _layer_check(rm.VllmIterativeMoE(H, INTER, E, 2), torch.randn(6, H), dtype, dynamic, "-", 0,
                 tokens=(3,) if dynamic else None)


# ---------------------------------------------------------------- gpt-oss: einsum("bec,be->bc") of biased rows

@pytest.mark.parametrize("dtype", [pytest.param(d, id=i, marks=() if d == torch.bfloat16 else pytest.mark.slow)
                                   for d, i in zip(DTYPES, DTYPE_IDS)])
def test_gpt_oss_biased_rows_rewritten_where_inductor_chooses(dtype, inductor_chooses):
    """The expert outputs plus their bias: rewritten, and at decode Inductor's code is inlined, so the
    bias add fuses into the combine again and the graph launches no more kernels than without the pass."""
    model = rm.GptOssMLPBlock(H, INTER, E, TOPK)
    stats, launches = _layer_check(model, torch.randn(1, H), dtype, False, "bmm_combine", 1)
    assert stats["lowered"] == {"unrolled": 1} and launches["op"] == 0, (stats, launches)
    torch._dynamo.reset()
    with fused_moe_ops.disable_fusion(), torch.no_grad():
        _, plain = run_and_get_code(torch.compile(model.to(dtype)), torch.randn(1, H).to(dtype))
    assert launches["generated"] <= kernel_launches("\n".join(plain))["generated"], launches


def test_gpt_oss_dynamic_tokens(inductor_chooses):
    """A dynamic token count: the rule for symbolic sizes inlines Inductor's code (CPU), so the rewrite
    stands; every token count gives eager's result from one compile."""
    stats, launches = _layer_check(rm.GptOssMLPBlock(H, INTER, E, TOPK), torch.randn(5, H), torch.bfloat16,
                                   True, "bmm_combine", 1, tokens=(2, 9))
    assert stats["lowered"] == {"unrolled": 1}, stats
    assert fused_moe_ops.fusion_stats()["rewrites"] == stats["rewrites"], "recompiled for a new token count"


def test_gpt_oss_biased_rows_left_alone_where_the_op_would_stay():
    """Autotuning off (this directory's default): the op would certainly stay, and the bias add would
    become a kernel of its own writing the rows out: left alone, as on torch without the autotuning."""
    _layer_check(rm.GptOssMLPBlock(H, INTER, E, TOPK), torch.randn(5, H), torch.float32, False, "bmm_combine", 0)


@pytest.mark.parametrize("spelling", ["bce,be->bc", "ebc,be->bc"])
def test_gpt_oss_transposed_spellings_rewritten(spelling, inductor_chooses):
    """The same contraction written over a transposed view of the expert outputs: einsum permutes the
    operand back, so the graph holds the same combine over the same rows, rewritten as gpt-oss's."""
    stats, _ = _layer_check(rm.GptOssMLPBlock(H, INTER, E, TOPK, combine=spelling), torch.randn(5, H),
                            torch.float32, False, "bmm_combine", 1)
    assert stats["lowered"] == {"unrolled": 1}, stats


EINSUM_NEAR_MISSES = {
    # another contraction of the same operands: a sum over the experts' outputs' k, not over the slots
    "bec,bc->be": (lambda t, w: torch.einsum("bec,bc->be", t, w), (5, TOPK, H), (5, H)),
    # weights per (slot, k): not one scalar per slot
    "bec,bec->bc": (lambda t, w: torch.einsum("bec,bec->bc", t, w), (5, TOPK, H), (5, TOPK, H)),
    # weights shared by every token
    "bec,e->bc": (lambda t, w: torch.einsum("bec,e->bc", t, w), (5, TOPK, H), (TOPK,)),
    # the result keeps the slots
    "bec,be->bec": (lambda t, w: torch.einsum("bec,be->bec", t, w), (5, TOPK, H), (5, TOPK)),
    # the combine, but over expert outputs stored transposed: the op reads each slot's k elements as a
    # row in slot order, which these are not without a copy; Inductor's code reads them in place
    "bce,be->bc_stored_transposed": (lambda t, w: torch.einsum("bce,be->bc", t, w), (5, H, TOPK), (5, TOPK)),
    "ebc,be->bc_stored_transposed": (lambda t, w: torch.einsum("ebc,be->bc", t, w), (TOPK, 5, H), (5, TOPK)),
}


@pytest.mark.parametrize("name", list(EINSUM_NEAR_MISSES))
def test_einsum_near_misses_left_alone(name, inductor_chooses):
    fn, ts, ws = EINSUM_NEAR_MISSES[name]
    t, w = torch.randn(ts), torch.rand(ws)
    bias = torch.randn(ts)
    biased = lambda t, b, w: fn(t + b, w)  # noqa: E731
    out = torch.compile(biased, fullgraph=True)(t, bias, w)
    assert fused_moe_ops.fusion_stats()["rewrites"] == 0, fused_moe_ops.fusion_stats()
    torch.testing.assert_close(out, biased(t, bias, w))
