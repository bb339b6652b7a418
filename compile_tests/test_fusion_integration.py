"""FX graph cache across processes, fullgraph, max-autotune, and a real MoE block."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import fused_moe_ops
from fusion_cases import BY_NAME, assert_fused, check_accuracy, make_inputs, reference64

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

_CACHE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {here!r})
    import torch
    import fused_moe_ops
    from torch._dynamo.utils import counters
    from torch._inductor.codecache import PyCodeCache
    from fusion_cases import BY_NAME, check_accuracy, make_inputs, reference64

    if sys.argv[1] == "off":
        fused_moe_ops.disable_fusion()
    # The op, not Inductor's choice (test_fusion_autotune.py checks the cache with that choice).
    fused_moe_ops.fusion.set_autotune(False)
    sp = BY_NAME["seed"]
    args = make_inputs(sp, 5, torch.bfloat16)
    out = torch.compile(sp.fn)(*args)
    check_accuracy(out, sp.fn(*args), reference64(sp, args))
    mods = PyCodeCache.modules
    mods = list(mods.values()) if isinstance(mods, dict) else list(mods)
    sources = [open(m.__file__).read() for m in mods if getattr(m, "__file__", None)]
    print(json.dumps({{
        "hit": counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"],
        "miss": counters["inductor"]["fxgraph_cache_miss"],
        "rewrites": fused_moe_ops.fusion_stats()["rewrites"],
        "from_cache": fused_moe_ops.fusion_stats()["from_cache"],
        "fused": any("torch.ops.moe._shuffle_mul_sum_fused" in s for s in sources),
    }}))
    """
)


@pytest.mark.slow
def test_fx_graph_cache_across_processes(tmp_path):
    """A second compile in a fresh process is served from the FX graph cache with the pass installed
    (and still runs the fused op); with the pass disabled the key differs, so it is not."""
    script = tmp_path / "compile_seed.py"
    script.write_text(_CACHE_SCRIPT.format(here=str(HERE)))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor_cache"),
               TORCHINDUCTOR_FX_GRAPH_CACHE="1", PYTHONPATH=str(REPO))
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)

    def run(mode):
        res = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    first = run("on")
    assert first["miss"] >= 1 and first["hit"] == 0 and first["rewrites"] == 1 and first["fused"], first
    second = run("on")
    assert second["hit"] >= 1 and second["miss"] == 0, second
    # Served the fused graph without re-running the pass; fusion_stats() still counts its rewrite.
    assert second["rewrites"] == 1 and second["from_cache"] == 1 and second["fused"], second
    off = run("off")
    assert off["hit"] == 0 and off["rewrites"] == 0 and off["from_cache"] == 0 and not off["fused"], off


def test_fullgraph_no_graph_breaks():
    sp = BY_NAME["seed"]
    args = make_inputs(sp, 5, torch.float16)
    out = torch.compile(sp.fn, fullgraph=True)(*args)
    assert fused_moe_ops.fusion_stats()["rewrites"] == 1
    check_accuracy(out, sp.fn(*args), reference64(sp, args))

    def direct(x, idx, w):  # the op itself, called from model code
        return fused_moe_ops.shuffle_mul_sum(x, idx.clamp(min=0), w, out_dtype=torch.float32) * 2

    x, idx, w = args
    explanation = torch._dynamo.explain(direct)(x, idx, w)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    out = torch.compile(direct, fullgraph=True)(x, idx, w)
    torch.testing.assert_close(out, direct(x, idx, w))


def test_max_autotune_no_cudagraphs():
    sp = BY_NAME["upcast"]
    args = make_inputs(sp, 5, torch.bfloat16)
    out, codes = run_and_get_code(torch.compile(sp.fn, mode="max-autotune-no-cudagraphs"), *args)
    assert fused_moe_ops.fusion_stats()["by_pattern"] == {"gather_mul_sum": 1}
    assert_fused("\n".join(codes))
    check_accuracy(out, sp.fn(*args), reference64(sp, args))


# ---------------------------------------------------------------- a real MoE block


class SparseMoeBlock(torch.nn.Module):
    """A sort-based top-k MoE layer, written like model code (not shaped to the pattern):
    route, sort token copies by expert, run every copy through its expert, un-sort, combine."""

    def __init__(self, hidden: int = 32, ffn: int = 48, num_experts: int = 4, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.num_experts = num_experts
        self.gate = torch.nn.Linear(hidden, num_experts, bias=False)
        self.w_up = torch.nn.Parameter(torch.randn(num_experts, hidden, ffn) / hidden**0.5)
        self.w_down = torch.nn.Parameter(torch.randn(num_experts, ffn, hidden) / ffn**0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        num_tokens, hidden_dim = hidden_states.shape
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=-1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)

        # group the (token, slot) copies by expert
        flat_experts = selected_experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        sorted_experts = flat_experts[order]
        token_of_row = order // self.top_k
        rows = hidden_states[token_of_row]

        # every row through its expert
        up = torch.bmm(rows.unsqueeze(1), self.w_up[sorted_experts]).squeeze(1)
        expert_out = torch.bmm(F.silu(up).unsqueeze(1), self.w_down[sorted_experts]).squeeze(1)

        # combine: row of expert_out holding token t's j-th expert, weighted sum over the top-k
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        combined = expert_out[inverse].view(num_tokens, self.top_k, hidden_dim)
        combined = combined * routing_weights.to(combined.dtype).unsqueeze(-1)
        return combined.sum(dim=1)


@pytest.mark.parametrize(
    "dtype,dynamic",
    [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
    ids=["float32", "bfloat16", "float32-dynamic"],
)
def test_moe_block_combine_is_rewritten(dtype, dynamic):
    torch.manual_seed(0)
    model = SparseMoeBlock().to(dtype).eval()
    x = torch.randn(7, 32).to(dtype)
    with torch.no_grad():
        compiled = torch.compile(model, dynamic=dynamic)
        out, codes = run_and_get_code(compiled, x)
        eager = model(x)
        ref = model.double()(x.double())
        model.to(dtype)
    stats = fused_moe_ops.fusion_stats()
    assert stats["by_pattern"] == {"gather_mul_sum": 1}, stats  # the combine; the expert bmms are left alone
    FileCheck_code = "\n".join(codes)
    assert "torch.ops.moe._shuffle_mul_sum_fused.default(" in FileCheck_code
    check_accuracy(out, eager, ref)
    if dynamic:
        x2 = torch.randn(11, 32).to(dtype)
        with torch.no_grad():
            out2, eager2 = compiled(x2), model(x2)
        assert fused_moe_ops.fusion_stats()["rewrites"] == 1
        torch.testing.assert_close(out2, eager2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("needs_grad", ["x", "x_and_w"])
def test_training_graph_keeps_gradients(needs_grad):
    """Under autograd the pass sees the partitioned forward and backward graphs: it rewrites a combine
    only where its intermediates are not saved for backward (the partitioner may also choose to
    recompute the gather in backward), and the results and the gradients stay eager's."""
    sp = BY_NAME["seed"]
    x, idx, w = make_inputs(sp, 5, torch.float32)
    x.requires_grad_(True)
    w.requires_grad_(needs_grad == "x_and_w")
    out = torch.compile(sp.fn)(x, idx, w)
    grads = torch.autograd.grad(out.square().sum(), [t for t in (x, w) if t.requires_grad])
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(w.requires_grad)
    eager = sp.fn(x2, idx, w2)
    grads2 = torch.autograd.grad(eager.square().sum(), [t for t in (x2, w2) if t.requires_grad])
    torch.testing.assert_close(out, eager)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2)
    assert fused_moe_ops.fusion_stats()["rewrites"] >= 1
