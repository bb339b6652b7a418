"""moe::scatter_mul_sum / _scatter_mul_sum_fused on a GPU (marker cuda; scripts/gpu_check.sh runs them on a
lent GPU): the CUDA library's three steps, CUB's radix sort included (the emulated tests,
test_cuda_emulated_scatter.py, run the same device code on CPU with the sort on the host).

* every named edge case of the emulated tests: bit for bit the float32 reference (the contract: each
  token's rows added in increasing r, products rounded, one final rounding) and within the float32
  bound of the float64 reference; the caller's tensors unchanged;
* bitwise repeatable from run to run (no atomics), where eager index_add_ on CUDA is not required to be;
* captured into a CUDA graph and replayed on new data (no host sync, no allocation outside torch's);
* an out-of-range entry trips the device-side assert (in a child: it poisons the CUDA context).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from _moe_testlib import assert_unmodified, gen, make_input, run_device_error_child, seed_of, snapshot
from fused_moe_ops import _registry
from fused_moe_ops.ops import NEGATIVE_IS_ERROR, SKIP_NEGATIVE, WRAP_NEGATIVE
from fused_moe_ops.reference import scatter_mul_sum_fused_reference

from test_cuda_emulated_scatter import CASES, Spec, assert_matches_float64, build, make_factors, make_index

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


def _need_cuda_kernel():
    if _registry.SCATTER_ACTIVE.get("cuda") != "cuda":
        pytest.skip(f"the scatter form is not served by the CUDA library on CUDA ({_registry.SCATTER_ACTIVE}, "
                    f"{_registry.FALLBACK_REASONS.get('cuda')})")


def _on_cuda(c):
    move = lambda t: None if t is None else t.cuda()  # noqa: E731
    return dataclasses.replace(c, input=move(c.input), index=move(c.index), factors=move(c.factors),
                               addend=move(c.addend))


def _op(c):
    return torch.ops.moe._scatter_mul_sum_fused(c.input, c.index, c.factors, c.num_tokens, c.out_dtype,
                                                c.negative_index, c.factor_round, c.scale, c.addend)


def _reference32(c):
    return scatter_mul_sum_fused_reference(c.input.cpu(), c.index.cpu(), None if c.factors is None else c.factors.cpu(),
                                           c.num_tokens, c.out_dtype, c.negative_index, c.factor_round, c.scale,
                                           None if c.addend is None else c.addend.cpu())


# R = 40000 rows, one token taking half (a segment of ~160 chunks), the rest spread over 3000 tokens,
# half of which receive nothing; M = 70000 tokens for 50 rows (the segment search over mostly empty tokens).
GPU_CASES = dict(CASES, **{
    "R40000-hot-token-many-chunks": Spec(rows=40000, m=3000, k=256),
    "M70000-R50-mostly-empty": Spec(rows=50, m=70000, k=64, skew=False),
    "M1-R4096-decode-all-rows": Spec(rows=4096, m=1, k=7168, all_to=0),
})


@pytest.mark.parametrize("name", list(GPU_CASES))
def test_matches_the_float32_reference_bit_for_bit(name):
    _need_cuda_kernel()
    c = build(GPU_CASES[name], seed_of("scatter-gpu", name))
    g = _on_cuda(c)
    before = snapshot(g.input, g.index, g.factors, g.addend)
    torch.cuda.empty_cache()
    out = _op(g)
    torch.cuda.synchronize()
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), _reference32(c), rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{name}: not bitwise the float32 reference: {m}")
    assert_matches_float64(out.cpu(), c, name)
    assert_unmodified(before, g.input, g.index, g.factors, g.addend)


def test_public_op_and_eager_index_add():
    """The public op against eager's spelling of the same combine (index_add_ on CUDA adds with
    atomics: equal within the float32 bound, not bitwise)."""
    _need_cuda_kernel()
    g = gen(3)
    x = make_input(3000, 512, torch.bfloat16, g).cuda()
    index = make_index(3000, 400, torch.int64, g, negative_index=NEGATIVE_IS_ERROR).cuda()
    f = make_factors(3000, torch.float32, g).cuda()
    out = torch.ops.moe.scatter_mul_sum(x, index, f, 400, torch.float32)
    eager = torch.zeros(400, 512, device="cuda").index_add_(0, index, x.float() * f[:, None])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-4)


def test_bitwise_repeatable():
    _need_cuda_kernel()
    c = _on_cuda(build(Spec(rows=20000, m=500, k=1024, dtype=torch.float16), seed_of("repeat")))
    first = _op(c)
    for _ in range(5):
        assert torch.equal(_op(c), first)


@pytest.mark.parametrize("mode", [SKIP_NEGATIVE, WRAP_NEGATIVE], ids=["skip", "wrap"])
def test_cuda_graph_capture_replays_with_new_data(mode):
    """Keys, CUB's sort (its scratch from torch's allocator) and the segment sum captured into one graph,
    replayed on new inputs copied into the captured ones."""
    _need_cuda_kernel()
    rows, m, k = 4096, 300, 512
    c = _on_cuda(build(Spec(rows=rows, m=m, k=k, negative_index=mode, addend="same", scale=0.5), seed_of("graph")))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        _op(c)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _op(c)
    for trial in range(3):
        fresh = build(Spec(rows=rows, m=m, k=k, negative_index=mode, addend="same", scale=0.5),
                      seed_of("graph", trial))
        for static, new in ((c.input, fresh.input), (c.index, fresh.index), (c.factors, fresh.factors),
                            (c.addend, fresh.addend)):
            static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.cpu(), _reference32(fresh), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("mode, value", [(SKIP_NEGATIVE, 300), (WRAP_NEGATIVE, -301), (NEGATIVE_IS_ERROR, -1)],
                         ids=["skip-M", "wrap-below-minus-M", "error-mode-minus-1"])
def test_out_of_range_entry_trips_the_device_assert(mode, value):
    _need_cuda_kernel()
    run_device_error_child(f"""
    import torch, fused_moe_ops
    x = torch.randn(64, 128, device="cuda"); f = torch.rand(64, device="cuda")
    index = torch.randint(0, 300, (64,), device="cuda"); index[37] = {value}
    torch.ops.moe._scatter_mul_sum_fused(x, index, f, 300, None, {mode})""")


# test_schema, test_autograd_registration, test_faketensor, test_aot_dispatch_dynamic (test_op.py's set):
# the CUDA kernel agrees with the fake (shapes, dtypes, strides) and the schema (nothing mutated, nothing
# aliased); no grad inputs, so the backward (there is none) is not traced.
NO_GRAD_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("name", ["duplicates-uneven-empty-tokens", "R0-addend-only", "M0-every-row-skipped",
                                  "wrap-mode", "addend-3d", "padded-rows-odd-stride-scalar-path"])
def test_opcheck(name):
    _need_cuda_kernel()
    c = _on_cuda(build(CASES[name], seed_of("opcheck", name)))
    torch.library.opcheck(torch.ops.moe._scatter_mul_sum_fused.default,
                          (c.input, c.index, c.factors, c.num_tokens, c.out_dtype, c.negative_index, c.factor_round,
                           c.scale, c.addend), test_utils=NO_GRAD_UTILS)
    torch.library.opcheck(torch.ops.moe.scatter_mul_sum.default,  # negative entries skipped: any case is valid
                          (c.input, c.index, c.factors, c.num_tokens, c.out_dtype), test_utils=NO_GRAD_UTILS)
