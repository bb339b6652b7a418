"""CUDA graphs. GPU only: every test here skips cleanly without CUDA.

* Manual ``torch.cuda.graphs`` capture of ``moe.shuffle_mul_sum`` (functional and ``.out``), then
  replays after copying new values, a new permutation (with -1 entries) and new factors into the
  captured input buffers: every replay must match the float64 reference for the *new* data.
* ``torch.compile(mode="reduce-overhead")`` of a MoE block (seed spelling) with the fusion pass,
  in a child interpreter: the pass fires, cudagraphs are not skipped, and replays on fresh inputs
  match eager.

The reduce-overhead block is a static-shape variant of examples/moe_block.py's: each expert-sorted
row is multiplied by its own expert's weights (batched matmul over gathered weights) instead of
per-expert slices, because data-dependent slice sizes (``.tolist()``) make Inductor skip CUDA graphs.
Decode-time serving engines capture exactly this kind of static-shape step.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fused_moe_ops
from fused_moe_ops import _registry

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from moe_block import MoEBlock  # noqa: E402

from _moe_testlib import assert_matches_reference, child_env, describe_exit, make_case, seed_of  # noqa: E402


def _skip_if_reference_backend():
    if _registry.ACTIVE.get("cuda") == "reference":
        # The plain-PyTorch fallback validates the permutation on the host (a device sync), which
        # is not capturable; the native and Triton kernels check on the device.
        pytest.skip(f"CUDA op runs on the reference fallback ({_registry.FALLBACK_REASONS.get('cuda')})")


# ------------------------------------------------------------------------------------------------
# Manual capture of the op
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_manual_capture_replays_with_new_data(dtype, index_dtype):
    _skip_if_reference_backend()
    m, topk, k, rows = 37, 3, 200, 90
    first = make_case(m, topk, k, in_dtype=dtype, fac_dtype=dtype, index_dtype=index_dtype, rows=rows,
                      seed=seed_of("graph", dtype, index_dtype, 0), device="cuda")
    x, p, f = (t.clone() for t in first)           # the static buffers the graph reads
    out32 = torch.empty(m, k, device="cuda", dtype=torch.float32)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                   # warm up outside the capture (lazy init, autotune)
        for _ in range(2):
            torch.ops.moe.shuffle_mul_sum(x, p, f)
            torch.ops.moe.shuffle_mul_sum.out(x, p, f, out=out32)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.moe.shuffle_mul_sum(x, p, f)                  # output allocated in the graph's pool
        torch.ops.moe.shuffle_mul_sum.out(x, p, f, out=out32)       # into a caller-owned buffer

    for trial in range(4):
        case = first if trial == 0 else make_case(
            m, topk, k, in_dtype=dtype, fac_dtype=dtype, index_dtype=index_dtype, rows=rows,
            seed=seed_of("graph", dtype, index_dtype, trial), device="cuda")
        x.copy_(case.input)
        p.copy_(case.permutation)
        f.copy_(case.factors)
        assert int((p < 0).sum()) > 0, "the case should include skipped (-1) entries"
        out32.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_reference(y, *case, what=f"replay {trial}, functional")
        assert_matches_reference(out32, *case, out_dtype=torch.float32, what=f"replay {trial}, .out")


def test_manual_capture_identity_permutation():
    _skip_if_reference_backend()
    m, topk, k = 16, 2, 64
    case = make_case(m, topk, k, index_dtype=None, seed=seed_of("graph-identity"), device="cuda")
    x, f = case.input.clone(), case.factors.clone()
    torch.ops.moe.shuffle_mul_sum(x, None, f)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.moe.shuffle_mul_sum(x, None, f)
    for trial in range(3):
        x.copy_(torch.randn_like(x))
        f.copy_(torch.rand_like(f))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_reference(y, x, None, f, what=f"identity replay {trial}")


# ------------------------------------------------------------------------------------------------
# torch.compile(mode="reduce-overhead") with the fusion pass
# ------------------------------------------------------------------------------------------------

class StaticMoEBlock(MoEBlock):
    """examples/moe_block.py's block with static shapes: no data-dependent expert slices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, k = x.shape
        topk = self.topk
        topk_weights, flat_ids, order, c_map, a = self.route(x)
        expert_of_row = flat_ids[order]
        gate, up = torch.bmm(a.unsqueeze(1), self.w_up[expert_of_row]).squeeze(1).chunk(2, dim=-1)
        c2 = torch.bmm((F.silu(gate) * up).unsqueeze(1), self.w_down[expert_of_row]).squeeze(1)
        return (c2[c_map].view(m, topk, k) * topk_weights.view(m, topk, 1).to(x.dtype)).sum(dim=1)


def _run_reduce_overhead(dtype_name: str, device: str = "cuda") -> dict:
    """The reduce-overhead compile and its replays; returns what the test asserts on. Runs in a
    child interpreter (see the test below). device="cpu" only to try the mechanics without a GPU
    (there is no CUDA graph on CPU: Inductor skips it and says so in cudagraph_skips)."""
    from torch._dynamo.utils import counters

    dtype = getattr(torch, dtype_name)
    if not fused_moe_ops.fusion_enabled():
        return {"skip": "fusion disabled in this environment"}
    torch.manual_seed(seed_of("reduce-overhead", dtype))
    block = StaticMoEBlock(hidden=256, ffn=128, experts=8, topk=2).to(device, dtype).eval()
    tokens = 64

    torch._dynamo.reset()
    counters.clear()
    fused_moe_ops.reset_fusion_stats()
    compiled = torch.compile(block, mode="reduce-overhead", fullgraph=True, dynamic=False)
    results = []
    with torch._inductor.config.patch(fx_graph_cache=False), torch.no_grad():
        for step in range(6):                     # warm-up, record, then replays
            x = torch.randn(tokens, 256, device=device, dtype=dtype)
            torch.compiler.cudagraph_mark_step_begin()
            y = compiled(x).clone()               # the graph's output buffer is reused by the next replay
            results.append((step, y, block(x)))
        if device == "cuda":
            torch.cuda.synchronize()
    steps = []
    for step, got, want in results:
        steps.append({"step": step, "err": (got.float() - want.float()).abs().max().item(),
                      "scale": want.float().abs().max().item()})
    return {"stats": fused_moe_ops.fusion_stats(), "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0),
            "steps": steps, "last_two_differ": not torch.equal(results[-1][1], results[-2][1])}


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="f32"),
                                   pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.slow)])
def test_reduce_overhead_moe_block_with_fusion(dtype):
    """In a fresh interpreter: CUDA graph trees keep a process-wide tree and memory pool alive after
    the test, and the compile (Inductor, Triton, graph recording) is the heaviest native work of the
    suite; a crash there names this test (with its signal) instead of killing the whole run, and the
    graph state does not leak into later tests."""
    dtype_name = str(dtype).replace("torch.", "")
    code = textwrap.dedent(f"""
        import json, sys
        sys.path[:0] = [{str(ROOT / "tests")!r}, {str(ROOT / "examples")!r}, {str(ROOT)!r}]
        import conftest  # noqa: F401  (registers the _moe_testlib helpers)
        import test_cuda_graphs
        result = test_cuda_graphs._run_reduce_overhead({dtype_name!r})
        print("@@RESULT@@" + json.dumps(result), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=str(ROOT),
                          env=child_env())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")]
    assert lines, f"child produced no result; {describe_exit(proc)}"
    res = json.loads(lines[-1][len("@@RESULT@@"):])
    assert proc.returncode == 0, f"the results came, but then {describe_exit(proc)}"
    if "skip" in res:
        pytest.skip(res["skip"])
    assert res["stats"]["rewrites"] >= 1, f"the fusion pass did not fire: {res['stats']}"
    assert res["cudagraph_skips"] == 0, f"Inductor skipped CUDA graphs ({res['cudagraph_skips']}); see TORCH_LOGS=perf_hints"
    rel_tol = {torch.float32: 2e-3, torch.bfloat16: 4e-2}[dtype]
    for s in res["steps"]:
        assert s["err"] <= rel_tol * s["scale"], \
            f"step {s['step']}: max |compiled - eager| = {s['err']:.3g} (scale {s['scale']:.3g})"
    # Different inputs gave different outputs (the replays did not return a stale buffer).
    assert res["last_two_differ"]
