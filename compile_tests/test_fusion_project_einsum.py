"""The per-token einsum combine as gpt-fast's Mixtral and SGLang's torch-native MoE write it (rebuilt
from their public source, not imported): every expert's weights gathered per token, three einsums for
the experts, then ``torch.einsum("tai,ta -> ti", expert_outs, weights)``. Compiled whole (routing
included), static and with the token count dynamic, in the three float dtypes: the combine is one call
of the op, the result is eager's (at least as close to the float64 layer as eager is), and the graph
launches no more kernels than without the pass.

Sources: pytorch-labs/gpt-fast mixtral-moe/model.py (ConditionalFeedForward, MOEFeedForward);
sgl-project/sglang python/sglang/srt/layers/moe/fused_moe_native.py (fused_moe_forward_native, and
moe_forward_native: DeepSeek-V2's per-expert loop after ``.cpu().numpy()``, which Dynamo runs
eagerly) with fused_topk_native.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.utils import run_and_get_code

import fused_moe_ops
from fusion_cases import DTYPES, kernel_launches

DIM, INTER, EXPERTS, TOPK = 16, 24, 4, 2


# ---------------------------------------------------------------- gpt-fast, mixtral-moe/model.py
class ConditionalFeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(EXPERTS, INTER, DIM) / DIM**0.5)
        self.w2 = nn.Parameter(torch.randn(EXPERTS, DIM, INTER) / INTER**0.5)
        self.w3 = nn.Parameter(torch.randn(EXPERTS, INTER, DIM) / DIM**0.5)

    def forward(self, x, expert_indices):
        w1_weights = self.w1[expert_indices]  # [T, A, D, D]
        w3_weights = self.w3[expert_indices]  # [T, A, D, D]
        w2_weights = self.w2[expert_indices]  # [T, A, D, D]
        x1 = F.silu(torch.einsum("ti,taoi -> tao", x, w1_weights))
        x3 = torch.einsum("ti, taoi -> tao", x, w3_weights)
        expert_outs = torch.einsum("tao, taio -> tai", (x1 * x3), w2_weights)
        return expert_outs


class MOEFeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(DIM, EXPERTS, bias=False)
        self.cond_ffn = ConditionalFeedForward()
        self.dim = DIM
        self.num_activated_experts = TOPK

    def forward(self, x):
        x = x.view(-1, self.dim)
        scores = self.gate(x)  # [T, E]
        expert_weights = F.softmax(scores, dim=-1)
        expert_weights, expert_indices = torch.topk(expert_weights, self.num_activated_experts, dim=-1)
        expert_weights /= expert_weights.sum(dim=-1, keepdim=True)  # [T, A]
        expert_outs = self.cond_ffn(x, expert_indices)
        return torch.einsum("tai,ta -> ti", expert_outs, expert_weights)


# ---------------------------------------------------------------- SGLang, layers/moe/fused_moe_native.py
def fused_topk_native(hidden_states, gating_output, topk, renormalize):
    topk_weights = F.softmax(gating_output.float(), dim=-1)
    topk_weights, topk_ids = torch.topk(topk_weights, topk, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


class SGLangMoE(nn.Module):
    """A FusedMoE layer's weights (w13 stacked, w2) and the router; ``loop`` picks moe_forward_native."""

    def __init__(self, loop: bool = False):
        super().__init__()
        self.gate = nn.Linear(DIM, EXPERTS, bias=False)
        self.w13_weight = nn.Parameter(torch.randn(EXPERTS, 2 * INTER, DIM) / DIM**0.5)
        self.w2_weight = nn.Parameter(torch.randn(EXPERTS, DIM, INTER) / INTER**0.5)
        self.num_experts = EXPERTS
        self.loop = loop

    def forward(self, x):
        router_logits = self.gate(x)
        topk_weights, topk_ids = fused_topk_native(x, router_logits, TOPK, renormalize=True)
        if self.loop:
            return self.moe_forward_native(x, topk_weights, topk_ids)
        w13_weights = self.w13_weight[topk_ids]
        w1_weights, w3_weights = torch.chunk(w13_weights, 2, dim=2)
        w2_weights = self.w2_weight[topk_ids]
        x1 = torch.einsum("ti,taoi -> tao", x, w1_weights)
        x1 = F.silu(x1)
        x3 = torch.einsum("ti, taoi -> tao", x, w3_weights)
        expert_outs = torch.einsum("tao, taio -> tai", (x1 * x3), w2_weights)
        return torch.einsum("tai,ta -> ti", expert_outs, topk_weights.to(expert_outs.dtype))

    def moe_forward_native(self, x, topk_weights, topk_ids):
        cnts = topk_ids.new_zeros((topk_ids.shape[0], self.num_experts))
        cnts.scatter_(1, topk_ids.to(torch.int64), 1)
        tokens_per_expert = cnts.sum(dim=0)
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // topk_ids.shape[1]]
        tokens_per_expert = tokens_per_expert.cpu().numpy()  # Dynamo runs the loop below eagerly
        outputs = []
        start_idx = 0
        for i, num_tokens in enumerate(tokens_per_expert):
            end_idx = start_idx + num_tokens
            if num_tokens == 0:
                continue
            tokens_for_this_expert = sorted_tokens[start_idx:end_idx]
            gate_up = F.linear(tokens_for_this_expert, self.w13_weight[i])
            gate, up = gate_up.chunk(2, dim=-1)
            expert_out = F.linear(F.silu(gate) * up, self.w2_weight[i])
            outputs.append(expert_out)
            start_idx = end_idx
        outs = torch.cat(outputs, dim=0) if len(outputs) else sorted_tokens.new_empty(0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        final_out = (
            new_x.view(*topk_ids.shape, -1)
            .type(topk_weights.dtype)
            .mul_(topk_weights.unsqueeze(dim=-1))
            .sum(dim=1)
            .type(new_x.dtype)
        )
        return final_out


_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _check(model, dtype, dynamic, tokens=(7, 12), rewrites=1):
    torch.manual_seed(0)
    reference = copy.deepcopy(model).double()
    model = model.to(dtype)
    x = torch.randn(tokens[0], DIM).to(dtype)
    with torch.no_grad():
        compiled = torch.compile(model, dynamic=dynamic)
        out, codes = run_and_get_code(compiled, x)
        stats = fused_moe_ops.fusion_stats()
        assert stats["by_pattern"].get("bmm_combine", 0) + stats["by_pattern"].get("gather_mul_sum", 0) == rewrites, stats
        with_pass = kernel_launches("\n".join(codes))
        assert with_pass["op"] == rewrites, with_pass
        for t in tokens:
            x = torch.randn(t, DIM).to(dtype)
            out = compiled(x)
            eager = model(x)
            assert out.dtype == eager.dtype and out.shape == eager.shape
            # the whole layer (routing and experts are Inductor's code, as without the pass); the
            # float64 layer too where the routing picks the same experts in both precisions
            scale = max(1.0, float(eager.abs().max()))
            torch.testing.assert_close(out, eager, atol=_TOL[dtype] * scale, rtol=0)
            if dtype == torch.float32:
                torch.testing.assert_close(out.double(), reference(x.double()), atol=_TOL[dtype] * scale, rtol=0)
        if dynamic:
            assert fused_moe_ops.fusion_stats()["rewrites"] == stats["rewrites"], "recompiled for a new token count"
        torch._dynamo.reset()
        with fused_moe_ops.disable_fusion():
            _, plain = run_and_get_code(torch.compile(model, dynamic=dynamic), torch.randn(tokens[0], DIM).to(dtype))
    code, plain = "\n".join(codes), "\n".join(plain)
    without = kernel_launches(plain)
    # No generated kernel is added. The op replaces the combine's bmm: an extern call where Inductor
    # keeps one; on CPU Inductor lowers a bmm with a unit dimension as a multiply and a sum inside its
    # own kernels, so there the op is one launch more than Inductor's graph (counted, not hidden).
    assert with_pass["generated"] <= without["generated"], (with_pass, without)
    total = with_pass["generated"] + with_pass["op"] + code.count("extern_kernels.bmm(")
    total_without = without["generated"] + plain.count("extern_kernels.bmm(")
    assert total <= total_without + rewrites, (with_pass, without, code.count("extern_kernels.bmm("),
                                               plain.count("extern_kernels.bmm("))


CASES = [(dtype, False) for dtype in DTYPES] + [(torch.float32, True), (torch.bfloat16, True)]
IDS = [f"{str(d).replace('torch.', '')}-{'dynamic' if dyn else 'static'}" for d, dyn in CASES]


@pytest.mark.parametrize("dtype,dynamic", CASES, ids=IDS)
def test_gpt_fast_mixtral_moe(dtype, dynamic):
    _check(MOEFeedForward(), dtype, dynamic)


@pytest.mark.parametrize("dtype,dynamic", CASES, ids=IDS)
def test_sglang_fused_moe_forward_native(dtype, dynamic):
    _check(SGLangMoE(), dtype, dynamic)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sglang_moe_forward_native_loop(dtype):
    """Out of reach: the graph break at ``.cpu().numpy()`` inside the per-expert loop is one Dynamo cannot
    resume from, so it runs the whole of moe_forward_native eagerly, combine included. Nothing is
    rewritten and the result is eager's."""
    torch.manual_seed(0)
    model = SGLangMoE(loop=True).to(dtype)
    x = torch.randn(9, DIM).to(dtype)
    with torch.no_grad():
        out = torch.compile(model)(x)
        eager = model(x)
    assert fused_moe_ops.fusion_stats()["rewrites"] == 0, fused_moe_ops.fusion_stats()
    torch.testing.assert_close(out, eager, atol=_TOL[dtype] * 4, rtol=_TOL[dtype])
