"""Hugging Face transformers MoE models for the model-level benchmark, built from transformers' own classes.

Random weights, nothing downloaded. Two decoder layers of the base model (``Qwen3MoeModel``,
``Qwen2MoeModel``, ``MixtralModel``, ``DeepseekV3Model``), fed ``inputs_embeds`` and returning the last hidden state: no embedding lookup
and no lm_head (at the real vocabulary, 151936, the lm_head GEMM and its logits would dwarf the MoE
layers whose combine is being measured).

The experts run transformers' ``experts_implementation`` "grouped_mm" by default: it is
transformers' default, it compiles into one graph (no data-dependent loop) and it is what a user
serving the model compiled runs. Its combine is
``(proj_out * w_sorted.unsqueeze(-1))[inv_perm].view(m, topk, k).sum(dim=1)`` (the pass's
``weighted_rows_sum``). "batched_mm" (gathers a weight matrix per token-slot: only viable at small
M) and "eager" (a per-expert loop with ``index_add_``: graph breaks, nothing to rewrite) can be
selected for comparison.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

HF_MODELS = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3")
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


def _experts(cfg) -> int:
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(cfg, attr, None):
            return getattr(cfg, attr)
    return 0


def transformers_unavailable_reason() -> Optional[str]:
    try:
        import transformers  # noqa: F401
        from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means: no HF models in this run
        return f"transformers not importable: {type(e).__name__}: {str(e)[:120]}"
    return None


# Full widths on CUDA: the real models' layer shapes. Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B);
# Qwen1.5-MoE-A2.7B (Qwen/Qwen1.5-MoE-A2.7B), the model Qwen2MoeConfig describes. Only the layer count
# (2) and the vocabulary (unused: inputs_embeds) differ.
# Tiny widths on CPU: hidden 256, so a run at up to 4096 tokens fits a few minutes on 2 shared cores;
# experts cut to 16 (CPU grouped_mm loops over experts), top-k kept (the combine's shape in top-k).
WIDTHS: Dict[str, Dict[str, Dict[str, object]]] = {
    "qwen3_moe": {
        "cuda": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     moe_intermediate_size=768, intermediate_size=6144, num_experts=128, num_experts_per_tok=8),
        "cpu": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                    moe_intermediate_size=128, intermediate_size=512, num_experts=16, num_experts_per_tok=8),
    },
    "qwen2_moe": {
        "cuda": dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
                     moe_intermediate_size=1408, intermediate_size=5632, shared_expert_intermediate_size=5632,
                     num_experts=60, num_experts_per_tok=4),
        "cpu": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                    moe_intermediate_size=128, intermediate_size=512, shared_expert_intermediate_size=512,
                    num_experts=16, num_experts_per_tok=4),
    },
    # Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1): 8 experts, top-2. CPU: experts kept at 8.
    "mixtral": {
        "cuda": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                     num_local_experts=8, num_experts_per_tok=2),
        "cpu": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                    num_local_experts=8, num_experts_per_tok=2),
    },
    # DeepSeek-V3 (deepseek-ai/DeepSeek-V3): 256 routed experts in 8 groups, top-8, one shared expert,
    # routed_scaling_factor 2.5, MLA attention. Both layers are MoE layers (first_k_dense_replace=0).
    "deepseek_v3": {
        "cuda": dict(hidden_size=7168, num_attention_heads=128, num_key_value_heads=128, intermediate_size=18432,
                     moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                     n_group=8, topk_group=4, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
                     qk_nope_head_dim=128, v_head_dim=128, first_k_dense_replace=0),
        "cpu": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, intermediate_size=512,
                    moe_intermediate_size=128, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=8,
                    n_group=4, topk_group=2, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=32,
                    qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=0),
    },
}


def hf_config(name: str, device: str, experts_implementation: str = "grouped_mm", layers: int = 2):
    from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    if experts_implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"experts_implementation must be one of {EXPERTS_IMPLEMENTATIONS}, "
                         f"got {experts_implementation!r}")
    widths = dict(WIDTHS[name]["cuda" if device == "cuda" else "cpu"]) if name in WIDTHS else {}
    common = dict(num_hidden_layers=layers, vocab_size=1024, max_position_embeddings=32768, use_cache=False,
                  tie_word_embeddings=False, experts_implementation=experts_implementation)
    if name == "qwen3_moe":
        return Qwen3MoeConfig(norm_topk_prob=True, **common, **widths)
    if name == "qwen2_moe":
        return Qwen2MoeConfig(**common, **widths)  # norm_topk_prob False, as Qwen1.5-MoE
    if name == "mixtral":
        return MixtralConfig(**common, **widths)
    if name == "deepseek_v3":
        return DeepseekV3Config(**common, **widths)
    raise ValueError(f"hf_config: name must be one of {HF_MODELS}, got {name!r}")


def build_hf_model(name: str, device: str, dtype: torch.dtype, experts_implementation: str = "grouped_mm",
                   layers: int = 2, layout: str = "sequence", sentinel_mask: bool = False) -> Tuple[Callable, Callable[[int, int], torch.Tensor],
                                                                         int, Dict[str, object]]:
    """(forward, make_input(m, seed), token_dim, description).

    forward(x) runs the 2-layer model on inputs_embeds x. layout "sequence": x is (1, m, hidden),
    one sequence of m tokens (a prefill, causal attention over m); "batch": (m, 1, hidden), m
    sequences of one token (attention is trivial, so the MoE layers dominate, as in a decode step
    minus its KV cache). token_dim is the dimension that holds m (marked dynamic when compiling
    once for all m).

    sentinel_mask: run the experts' expert-parallel path (``_is_expert_parallel = True``), whose
    grouped_mm code masks the expert rows with ``proj_out.masked_fill(sentinel_mask, 0.0)`` right
    before the combine. transformers 5.17 runs that code unconditionally (and has no such flag, so
    there this changes nothing); on a newer transformers it reproduces the graph 5.17 gives the pass."""
    from transformers import DeepseekV3Model, MixtralModel, Qwen2MoeModel, Qwen3MoeModel

    if layout not in ("sequence", "batch"):
        raise ValueError(f"layout must be 'sequence' or 'batch', got {layout!r}")
    cfg = hf_config(name, device, experts_implementation, layers)
    cls = {"qwen3_moe": Qwen3MoeModel, "qwen2_moe": Qwen2MoeModel, "mixtral": MixtralModel,
           "deepseek_v3": DeepseekV3Model}[name]
    torch.manual_seed(0)
    with torch.device(device):  # full-width weights are GBs: create and fill them where they run
        model = cls(cfg)
    # Whatever transformers' own init leaves (some versions keep torch.empty for the expert weights
    # outside from_pretrained), every parameter gets finite random values.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.initializer_range)
    model = model.to(device=device, dtype=dtype).eval()
    if sentinel_mask:
        for module in model.modules():
            if hasattr(module, "_is_expert_parallel"):
                module._is_expert_parallel = True
    hidden = cfg.hidden_size

    def forward(x):
        return model(inputs_embeds=x, use_cache=False).last_hidden_state

    def make_input(m: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed)
        shape = (1, m, hidden) if layout == "sequence" else (m, 1, hidden)
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    desc = {"class": cls.__name__, "layers": layers, "layout": layout, "sentinel_mask": sentinel_mask,
            # what transformers settled on (it may replace a request it cannot serve)
            "experts_implementation": getattr(model.config, "_experts_implementation", experts_implementation),
            "hidden": hidden, "experts": _experts(cfg), "topk": cfg.num_experts_per_tok,
            "moe_intermediate": getattr(cfg, "moe_intermediate_size", cfg.intermediate_size), "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "widths": "full (real model's layer shapes)" if device == "cuda" else "tiny (CPU)"}
    if name == "qwen2_moe":
        desc["shared_expert_intermediate"] = cfg.shared_expert_intermediate_size
    try:
        import transformers

        desc["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        pass
    return forward, make_input, (1 if layout == "sequence" else 0), desc
