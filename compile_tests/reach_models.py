"""MoE layers rebuilt from public source (not imported), for the compile tests of the one-token
combine, the loop over experts and the rank-3 per-token einsum (test_fusion_project_reach.py), and
for timing them with and without the pass (scripts/time_reach.py).

Sources:
* pytorch/ao torchao/prototype/moe_quant/quantizable_moe_modules.py: MoEFeedForwardAOQuantizable's
  router and ExpertsAOQuantizable._forward_single_token_linear_decomposition (one token: its topk
  experts' weights gathered, a Python loop over them, ``torch.cat`` of the outputs, then
  ``(out * scores.view(-1, 1)).sum(dim=0)``).
* vllm-project/vllm vllm/model_executor/layers/fused_moe/moe_torch_iterative.py: ``fused_moe``, a
  loop over every expert, each computing all tokens, accumulated as
  ``final = final + x * (topk_weights * (selected_experts == e)).sum(-1, keepdim=True)``.
* openai/gpt-oss gpt_oss/torch/model.py: MLPBlock (per-token weight gathers, ``einsum("beck,bk->bec")``
  plus bias, swiglu, ``einsum("beck,bek->bec")`` plus bias, then ``einsum("bec,be->bc", t, w)`` and
  the residual).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------- torchao, single-token path
class TorchaoSingleTokenMoE(nn.Module):
    def __init__(self, hidden, expert_dim, experts, topk):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.up_proj = nn.Parameter(torch.randn(experts, 2 * expert_dim, hidden) / hidden**0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, expert_dim) / expert_dim**0.5)
        self.top_k = topk

    def forward(self, x):
        batch_size, num_tokens, hidden_dim = x.shape
        x = x.view(-1, hidden_dim)
        scores = F.softmax(self.router(x), dim=-1)
        scores, expert_indices = torch.topk(scores, self.top_k, dim=-1)
        scores /= scores.sum(dim=-1, keepdim=True).to(x.dtype)
        # _forward_single_token_linear_decomposition
        num_activated_experts = expert_indices.numel()
        expert_indices = expert_indices.view(-1)
        cur_up_proj = self.up_proj[expert_indices]
        cur_down_proj = self.down_proj[expert_indices]
        outs = []
        for index in range(num_activated_experts):
            gate, up = F.linear(x, cur_up_proj[index]).chunk(2, dim=-1)
            y1 = F.silu(gate) * up
            outs.append(F.linear(y1, cur_down_proj[index]))
        out = torch.cat(outs, dim=0)
        final_out = (out * scores.view(-1, 1)).sum(dim=0).unsqueeze(0)
        return final_out.reshape(batch_size, -1, hidden_dim)


# ---------------------------------------------------------------- vLLM, moe_torch_iterative.fused_moe
class VllmIterativeMoE(nn.Module):
    def __init__(self, hidden, inter, experts, topk, renormalize=True):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, 2 * inter, hidden) / hidden**0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, inter) / inter**0.5)
        self.topk, self.renormalize = topk, renormalize

    def forward(self, hidden_states):
        gating_output = self.gate(hidden_states)
        w1, w2, topk = self.w1, self.w2, self.topk
        orig_shape = hidden_states.shape
        hidden_size = hidden_states.shape[-1]
        num_tokens = hidden_states.shape[:-1].numel()
        num_experts = w1.shape[0]
        intermediate_size = w2.shape[-1]
        dtype = hidden_states.dtype
        hidden_states = hidden_states.view(num_tokens, hidden_size)
        gating_output = gating_output.view(num_tokens, num_experts)
        topk_weights = gating_output.softmax(dim=-1, dtype=torch.float)
        topk_weights, selected_experts = topk_weights.topk(topk, dim=-1)
        if self.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        topk_weights = topk_weights.to(dtype)
        final_hidden_states = None
        for expert_idx in range(num_experts):
            expert_mask = selected_experts == expert_idx
            expert_weights = (topk_weights * expert_mask).sum(dim=-1, keepdim=True)
            x = F.linear(hidden_states, w1[expert_idx])
            gate = F.silu(x[:, :intermediate_size])
            x = x[:, intermediate_size:] * gate
            x = F.linear(x, w2[expert_idx])
            current_hidden_states = x * expert_weights
            if final_hidden_states is None:
                final_hidden_states = current_hidden_states
            else:
                final_hidden_states = final_hidden_states + current_hidden_states
        return final_hidden_states.view(orig_shape)


# ---------------------------------------------------------------- gpt-oss, torch reference MLPBlock
class RMSNorm(nn.Module):
    def __init__(self, hidden, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(hidden, dtype=torch.float32))

    def forward(self, x):
        t, dtype = x.float(), x.dtype
        t = t * torch.rsqrt(torch.mean(t**2, dim=-1, keepdim=True) + self.eps)
        return (t * self.scale).to(dtype)


def swiglu(x, alpha: float = 1.702, limit: float = 7.0):
    x_glu, x_linear = x[..., ::2], x[..., 1::2]
    x_glu = x_glu.clamp(min=None, max=limit)
    x_linear = x_linear.clamp(min=-limit, max=limit)
    out_glu = x_glu * torch.sigmoid(alpha * x_glu)
    return out_glu * (x_linear + 1)


class GptOssMLPBlock(nn.Module):
    """``combine`` picks the final einsum's spelling: "bec,be->bc" as gpt-oss writes it, or the same
    contraction over a transposed expert output ("bce,be->bc", "ebc,be->bc")."""

    def __init__(self, hidden, inter, experts, topk, combine="bec,be->bc"):
        super().__init__()
        self.experts_per_token = topk
        self.norm = RMSNorm(hidden)
        self.gate = nn.Linear(hidden, experts)
        self.mlp1_weight = nn.Parameter(torch.randn(experts, inter * 2, hidden) / hidden**0.5)
        self.mlp1_bias = nn.Parameter(torch.randn(experts, inter * 2) / 4)
        self.mlp2_weight = nn.Parameter(torch.randn(experts, hidden, inter) / inter**0.5)
        self.mlp2_bias = nn.Parameter(torch.randn(experts, hidden) / 4)
        self.combine = combine

    def forward(self, x):
        t = self.norm(x)
        g = self.gate(t)
        experts = torch.topk(g, k=self.experts_per_token, dim=-1, sorted=True)
        expert_weights = torch.nn.functional.softmax(experts.values, dim=1)
        expert_indices = experts.indices
        mlp1_weight = self.mlp1_weight[expert_indices, ...]
        mlp1_bias = self.mlp1_bias[expert_indices, ...]
        t = torch.einsum("beck,bk->bec", mlp1_weight, t) + mlp1_bias
        t = swiglu(t, limit=7.0)
        mlp2_weight = self.mlp2_weight[expert_indices, ...]
        mlp2_bias = self.mlp2_bias[expert_indices, ...]
        t = torch.einsum("beck,bek->bec", mlp2_weight, t)
        t += mlp2_bias
        if self.combine == "bce,be->bc":
            t = t.transpose(1, 2)
        elif self.combine == "ebc,be->bc":
            t = t.transpose(0, 1)
        t = torch.einsum(self.combine, t, expert_weights)
        return x + t
