"""The scatter-add combine as torchao's MoE quantization modules and JetMoE write it (rebuilt from their
public source, not imported), routing included: the rows come out of the experts in expert order and
are scattered back to their tokens with ``scatter_add`` / ``index_add``.

Sources: pytorch/ao torchao/prototype/moe_quant/quantizable_moe_modules.py (MoEFeedForwardAOQuantizable,
ExpertsAOQuantizable._forward_grouped_mm); huggingface/transformers models/jetmoe (JetMoeTopKGating,
JetMoeParallelExperts, JetMoeMoE).

torchao: rewritten into the gather form with static shapes. Its token numbers are a float32 division
(``perm.div(top_k).floor()``), provably ``perm // top_k`` only for a known row count, so with a dynamic
token count the combine takes the scatter form (any index). JetMoE: its router calls ``.tolist()``, a
graph break; the combine's graph gets the token index as an input, where nothing shows it came from a
sort: the scatter form; with ``capture_scalar_outputs`` the router and the combine are one graph and
the gather form is taken.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.utils import run_and_get_code

import fused_moe_ops
from fusion_cases import kernel_launches

DIM, INTER, EXPERTS, TOPK = 16, 32, 4, 2
_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


# ---------------------------------------------------------------- torchao, quantizable_moe_modules.py
class ExpertsAOQuantizable(nn.Module):
    def __init__(self, num_experts, hidden_dim, expert_dim, act_fn=F.silu):
        super().__init__()
        self.up_proj = nn.Parameter(torch.randn(num_experts, 2 * expert_dim, hidden_dim) / hidden_dim**0.5)
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden_dim, expert_dim) / expert_dim**0.5)
        self.act_fn = act_fn

    def forward(self, x, expert_indices, scores):
        orig_shape = x.shape
        x = x.view(-1, x.shape[-1])
        final_out = self._forward_grouped_mm(x, expert_indices, scores, self.up_proj, self.down_proj, self.act_fn)
        return final_out.view(orig_shape)

    @staticmethod
    def _forward_grouped_mm(x, expert_indices, scores, up_proj, down_proj, act_fn):
        num_experts, hidden_dim, expert_dim = down_proj.shape
        num_tokens, top_k = expert_indices.shape
        num_token_activations = num_tokens * top_k

        expert_indices = expert_indices.view(-1)
        ordered_token_activations = expert_indices.argsort(stable=True)
        ordered_token_indices = ordered_token_activations.div(top_k).floor().to(torch.int32)
        indices_for_histc = expert_indices if expert_indices.is_cuda else expert_indices.float()
        num_tokens_per_expert = torch.histc(indices_for_histc, bins=num_experts, min=0, max=num_experts)
        offs = num_tokens_per_expert.cumsum(dim=0).to(torch.int32)
        ordered_inputs = x[ordered_token_indices]
        ordered_scores = scores.view(-1, 1)[ordered_token_activations]

        gate, up = torch._grouped_mm(ordered_inputs, up_proj.transpose(-2, -1), offs).chunk(2, dim=1)
        y1 = act_fn(gate) * up
        ordered_outs = torch._grouped_mm(y1, down_proj.transpose(-2, -1), offs)
        ordered_weighted_outs = ordered_scores * ordered_outs

        final_out = torch.zeros_like(x)
        final_out = final_out.scatter_add(
            dim=0,
            index=ordered_token_indices.unsqueeze(-1).expand(num_token_activations, hidden_dim).to(torch.int64),
            src=ordered_weighted_outs,
        )
        return final_out


class MoEFeedForwardAOQuantizable(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(DIM, EXPERTS, bias=False)
        self.experts = ExpertsAOQuantizable(EXPERTS, DIM, INTER)
        self.top_k = TOPK

    def forward(self, x):
        batch_size, num_tokens, hidden_dim = x.shape
        x = x.view(-1, hidden_dim)
        scores = self.router(x)
        scores = F.softmax(scores, dim=-1)
        scores, expert_indices = torch.topk(scores, self.top_k, dim=-1)
        scores /= scores.sum(dim=-1, keepdim=True).to(x.dtype)
        out = self.experts(x, expert_indices, scores)
        return out.reshape(batch_size, -1, hidden_dim)


# ---------------------------------------------------------------- JetMoE, modeling_jetmoe.py
class JetMoeParallelExperts(nn.Module):
    def __init__(self, num_experts, input_size, output_size):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, output_size, input_size) / input_size**0.5)
        self.num_experts = num_experts

    def forward(self, inputs, expert_size):
        input_list = inputs.split(expert_size, dim=0)
        output_list = []
        for i in range(self.num_experts):
            output_list.append(F.linear(input_list[i], self.weight[i]))
        return torch.cat(output_list, dim=0)


class JetMoeTopKGating(nn.Module):
    def __init__(self, input_size, num_experts, top_k):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.layer = nn.Linear(input_size, num_experts, bias=False)

    def forward(self, hidden_states):
        logits = self.layer(hidden_states).float()
        top_k_logits, top_k_indices = logits.topk(self.top_k, dim=1)
        top_k_gates = torch.softmax(top_k_logits, dim=1).type_as(hidden_states)
        zeros = torch.zeros([top_k_gates.size(0), self.num_experts], dtype=top_k_gates.dtype,
                            device=top_k_gates.device)
        gates = zeros.scatter(1, top_k_indices, 1)
        expert_size = gates.long().sum(0)
        expert_size = expert_size.tolist()
        top_k_experts = top_k_indices.flatten()
        _, index_sorted_experts = top_k_experts.sort(0)
        batch_index = index_sorted_experts.div(self.top_k, rounding_mode="trunc")
        top_k_gates = top_k_gates.flatten()
        batch_gates = top_k_gates[index_sorted_experts]
        return index_sorted_experts, batch_index, batch_gates, expert_size, logits


class JetMoeMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_size = DIM
        self.activation = F.silu
        self.bias = nn.Parameter(torch.randn(DIM) / 10)
        self.input_linear = JetMoeParallelExperts(EXPERTS, DIM, INTER * 2)
        self.output_linear = JetMoeParallelExperts(EXPERTS, INTER, DIM)
        self.router = JetMoeTopKGating(DIM, EXPERTS, TOPK)

    def forward(self, layer_input):
        bsz, length, emb_size = layer_input.size()
        layer_input = layer_input.reshape(-1, emb_size)
        _, batch_index, batch_gates, expert_size, router_logits = self.router(layer_input)
        expert_inputs = layer_input[batch_index]
        hidden_states = self.input_linear(expert_inputs, expert_size)
        chunked_hidden_states = hidden_states.chunk(2, dim=-1)
        hidden_states = self.activation(chunked_hidden_states[0]) * chunked_hidden_states[1]
        expert_outputs = self.output_linear(hidden_states, expert_size)
        expert_outputs = expert_outputs * batch_gates[:, None]
        zeros = torch.zeros((bsz * length, self.input_size), dtype=expert_outputs.dtype, device=expert_outputs.device)
        layer_output = zeros.index_add(0, batch_index, expert_outputs)
        layer_output = layer_output.view(bsz, length, self.input_size)
        layer_output = layer_output + self.bias
        return layer_output, router_logits


def _run(model, dtype, dynamic, tokens=(9, 14)):
    torch.manual_seed(0)
    reference = copy.deepcopy(model).double()
    model = model.to(dtype)
    compiled = torch.compile(model, dynamic=dynamic)
    codes = None
    with torch.no_grad():
        for t in tokens:
            x = torch.randn(1, t, DIM).to(dtype)
            if codes is None:
                out, codes = run_and_get_code(compiled, x)
            else:
                out = compiled(x)
            eager = model(x)
            out, eager = (out[0], eager[0]) if isinstance(out, tuple) else (out, eager)
            assert out.dtype == eager.dtype and out.shape == eager.shape
            scale = max(1.0, float(eager.abs().max()))
            torch.testing.assert_close(out, eager, atol=_TOL[dtype] * scale, rtol=0)
            if dtype == torch.float32:
                ref = reference(x.double())
                ref = ref[0] if isinstance(ref, tuple) else ref
                torch.testing.assert_close(out.double(), ref, atol=1e-5 * scale, rtol=0)
    return "\n".join(codes)


# torch._grouped_mm compiles for bfloat16 only (its meta function refuses float32 on CPU)
def test_torchao_grouped_mm_static():
    code = _run(MoEFeedForwardAOQuantizable(), torch.bfloat16, dynamic=False, tokens=(9,))
    assert fused_moe_ops.fusion_stats()["by_pattern"] == {"scatter_add_combine": 1}, fused_moe_ops.fusion_stats()
    assert kernel_launches(code)["op"] == 1
    assert "torch.ops.aten.scatter_add" not in code and "scatter_add_(" not in code


def test_torchao_grouped_mm_dynamic_scatter_form():
    _run(MoEFeedForwardAOQuantizable(), torch.bfloat16, dynamic=True)
    assert fused_moe_ops.fusion_stats()["by_pattern"] == {"scatter_mul_sum": 1}, fused_moe_ops.fusion_stats()


def test_jetmoe_graph_break_scatter_form():
    """``.tolist()`` breaks the graph inside the router: the combine's graph reads the token index as an
    input. The scatter form, and right (two token counts, static: two compiles)."""
    _run(JetMoeMoE(), torch.float32, dynamic=False)
    assert fused_moe_ops.fusion_stats()["by_pattern"] == {"scatter_mul_sum": 2}, fused_moe_ops.fusion_stats()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_jetmoe_one_graph_with_captured_scalars(dtype):
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        _run(JetMoeMoE(), dtype, dynamic=False, tokens=(9,))
    assert fused_moe_ops.fusion_stats()["by_pattern"].get("scatter_add_combine", 0) == 1, fused_moe_ops.fusion_stats()
