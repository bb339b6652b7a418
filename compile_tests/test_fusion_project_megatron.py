"""Megatron-LM's MoE layer as its local (one-rank) path writes it, rebuilt from the public source (not
imported): the router's top-k routing map, ``permute`` (tokens grouped by expert with ``masked_select``),
the experts one after the other (``SequentialMLP``: ``torch.split`` by ``tokens_per_expert.tolist()``),
and ``unpermute``: the weighted rows scattered back with
``output.scatter_add_(0, sorted_indices.unsqueeze(1).expand(-1, hidden), permuted_tokens * probs)``.

Sources: NVIDIA/Megatron-LM megatron/core/transformer/moe/moe_utils.py (``permute``, ``unpermute``,
``topk_routing_with_score_function``), megatron/core/transformer/moe/experts.py (``SequentialMLP``),
megatron/core/transformer/moe/token_dispatcher.py (the all-gather dispatcher's local path).

``masked_select`` and ``.tolist()`` break the graph (data-dependent sizes), so the combine's graph gets
``sorted_indices`` and the permuted probabilities as inputs: nothing shows the index is a permutation,
and the combine takes the scatter form of the op. The probabilities are float32 (the router's softmax),
so bfloat16 / float16 expert outputs are promoted by the weighting, summed in float32 and cast back, as
Megatron's comment on ``unpermute`` says.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_moe_ops
from fused_moe_ops.fusion import autotune

DIM, FFN, EXPERTS, TOPK = 16, 24, 4, 2
_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def topk_routing_with_score_function(logits, topk):
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    probs, top_indices = torch.topk(scores, k=topk, dim=1)
    routing_probs = torch.zeros_like(scores).scatter(1, top_indices, probs)
    routing_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
    return routing_probs, routing_map


def permute(tokens, routing_map):
    num_tokens, hidden = tokens.shape
    num_experts = routing_map.shape[1]
    routing_map = routing_map.bool().T.contiguous()
    token_indices = torch.arange(num_tokens, device=routing_map.device).unsqueeze(0).expand(num_experts, -1)
    sorted_indices = token_indices.masked_select(routing_map)
    permuted_input = tokens.index_select(0, sorted_indices)
    return permuted_input, sorted_indices


def unpermute(permuted_tokens, sorted_indices, restore_shape, probs, routing_map):
    _, hidden = restore_shape
    input_dtype = permuted_tokens.dtype
    permuted_probs = probs.T.contiguous().masked_select(routing_map.T.contiguous())
    permuted_tokens = permuted_tokens * permuted_probs.unsqueeze(-1)
    output_tokens = torch.zeros(restore_shape, dtype=permuted_tokens.dtype, device=permuted_tokens.device)
    output_tokens.scatter_add_(0, sorted_indices.unsqueeze(1).expand(-1, hidden), permuted_tokens)
    return output_tokens.to(dtype=input_dtype)


class SequentialMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.ParameterList([nn.Parameter(torch.randn(2 * FFN, DIM) / DIM**0.5) for _ in range(EXPERTS)])
        self.fc2 = nn.ParameterList([nn.Parameter(torch.randn(DIM, FFN) / FFN**0.5) for _ in range(EXPERTS)])

    def forward(self, permuted_local_hidden_states, tokens_per_expert):
        tokens_list = torch.split(permuted_local_hidden_states, tokens_per_expert.tolist())
        outputs = []
        for expert, tokens in enumerate(tokens_list):
            gate, up = F.linear(tokens, self.fc1[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, self.fc2[expert]))
        return torch.cat(outputs, dim=0)


class MoELayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(DIM, EXPERTS, bias=False)
        self.experts = SequentialMLP()

    def forward(self, hidden_states):
        hidden_shape = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_shape[-1])
        probs, routing_map = topk_routing_with_score_function(self.router(hidden_states), TOPK)
        tokens_per_expert = routing_map.sum(dim=0).long()
        permuted, sorted_indices = permute(hidden_states, routing_map)
        expert_output = self.experts(permuted, tokens_per_expert)
        output = unpermute(expert_output, sorted_indices, hidden_states.shape, probs, routing_map)
        return output.view(hidden_shape)


# How each compile mode treats the combine's graph (rewrites expected, token counts run):
#   static:             one compile, rewritten
#   automatic dynamic:  (torch.compile's default) the first compile is static and rewritten; the
#                       recompile for the next token count is rewritten where its hidden sizes stay one
#                       size (a script run: symbolic token count, rewritten), and left to Inductor where
#                       they become unrelated symbols as below (under pytest: left alone). Both right.
#   dynamic=True:       the hidden size of ``restore_shape`` (a torch.Size argument) and the rows' hidden
#                       size are two unrelated symbols: nothing shows the expanded index covers the rows
#                       (eager would scatter only the index's columns), so the combine stays Inductor's
MODES = {"static": (False, (1,), (7,)), "automatic-dynamic": (None, (1, 2), (7, 12, 9)),
         "dynamic-true": (True, (0,), (7, 12))}


@pytest.mark.parametrize("dtype, mode", [
    pytest.param(torch.float32, "static", id="float32-static"),
    pytest.param(torch.bfloat16, "static", id="bfloat16-static", marks=pytest.mark.slow),
    pytest.param(torch.bfloat16, "automatic-dynamic", id="bfloat16-automatic-dynamic", marks=pytest.mark.slow),
    pytest.param(torch.float16, "static", id="float16-static", marks=pytest.mark.slow),
    pytest.param(torch.float32, "automatic-dynamic", id="float32-automatic-dynamic", marks=pytest.mark.slow),
    pytest.param(torch.float32, "dynamic-true", id="float32-dynamic-true", marks=pytest.mark.slow),
    pytest.param(torch.float16, "automatic-dynamic", id="float16-automatic-dynamic", marks=pytest.mark.slow),
])
def test_megatron_moe_layer_scatter_form(dtype, mode):
    dynamic, rewrites, token_counts = MODES[mode]
    torch.manual_seed(0)
    model = MoELayer()
    reference = copy.deepcopy(model).double()
    model = model.to(dtype)
    compiled = torch.compile(model, dynamic=dynamic)
    with torch.no_grad():
        for tokens in token_counts:
            x = torch.randn(1, tokens, DIM).to(dtype)
            out, eager = compiled(x), model(x)
            assert out.dtype == eager.dtype and out.shape == eager.shape
            scale = max(1.0, float(eager.abs().max()))
            torch.testing.assert_close(out, eager, atol=_TOL[dtype] * scale, rtol=0)
            if dtype == torch.float32:
                torch.testing.assert_close(out.double(), reference(x.double()), atol=1e-5 * scale, rtol=0)
    by_pattern = fused_moe_ops.fusion_stats()["by_pattern"]
    assert set(by_pattern) <= {"scatter_mul_sum"} and by_pattern.get("scatter_mul_sum", 0) in rewrites, by_pattern


@pytest.mark.parametrize("lowering", [pytest.param("op", id="forced-op"),
                                      pytest.param("unrolled", id="forced-decomposition")])
def test_megatron_unpermute_out_of_range_raises_as_eager(lowering):
    """A sorted_indices entry outside [0, num_tokens) (a corrupted routing result): eager's scatter_add
    raises; so does the compiled unpermute, under the op (IndexError) and its decomposition."""
    torch.manual_seed(1)
    num_tokens = 5
    probs, routing_map = topk_routing_with_score_function(torch.randn(num_tokens, EXPERTS), TOPK)
    _, sorted_indices = permute(torch.randn(num_tokens, DIM), routing_map)
    permuted_tokens = torch.randn(sorted_indices.shape[0], DIM)
    compiled = torch.compile(unpermute)
    restore_shape = torch.Size((num_tokens, DIM))
    torch._dynamo.reset()
    autotune_was = fused_moe_ops.fusion.set_autotune(True)
    try:
        with autotune.forced_lowering(lowering):
            good = compiled(permuted_tokens, sorted_indices, restore_shape, probs, routing_map)
            torch.testing.assert_close(good, unpermute(permuted_tokens, sorted_indices, restore_shape, probs,
                                                       routing_map), atol=1e-5, rtol=0)
            for entry in (num_tokens, -1):
                bad = sorted_indices.clone()
                bad[3] = entry
                with pytest.raises(RuntimeError):
                    unpermute(permuted_tokens, bad, restore_shape, probs, routing_map)
                with pytest.raises((IndexError, RuntimeError)):
                    compiled(permuted_tokens, bad, restore_shape, probs, routing_map)
    finally:
        fused_moe_ops.fusion.set_autotune(autotune_was)
    stats = fused_moe_ops.fusion_stats()
    assert stats["by_pattern"] == {"scatter_mul_sum": 1}, stats
    assert stats["lowered"] == {"scatter_op" if lowering == "op" else "scatter_decomposition": 1}, stats
