"""Tiny random HF transformers MoE causal LMs, one per family whose experts accept experts_implementation.

The families are enumerated from the installed transformers (a modeling file with an
``@use_experts_implementation`` experts class and a causal-LM auto mapping), so a family added to
transformers is tested without an edit here. Each config is the family's default config with every
size attribute it has shrunk (the same overrides for all; a family needing more lists it in
``EXTRA``), float32 weights drawn at random from a fixed seed, the experts' own (biases included)
redrawn at a larger scale.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List

SHRINK = dict(
    hidden_size=32, intermediate_size=48, moe_intermediate_size=24, expert_intermediate_size=24,
    shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    head_dim=16, vocab_size=96, num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8,
    num_experts_per_tok=2, moe_topk=2, top_k=2, n_shared_experts=1, num_shared_experts=1,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    first_k_dense_replace=0, n_group=1, topk_group=1, max_position_embeddings=64, sliding_window=8,
    ffn_hidden_size=48, expert_ffn_hidden_size=24, zero_expert_num=2, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_head_dim=16, vocab_size_per_layer_input=96, hidden_size_per_layer_input=16,
    index_n_heads=2, index_num_heads=2, index_head_dim=16, index_topk=4, decoder_sparse_step=1, moe_layer_freq=1,
    mlp_only_layers=[], pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
EXTRA: Dict[str, dict] = {
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0),
    "zaya": dict(num_experts_per_tok=1),
    "gemma4": dict(enable_moe_block=True, top_k_experts=2),
    "longcat_flash": dict(num_layers=1),  # two sub-layers per layer
    "bailing_hybrid": dict(num_expert_group=1),
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=8,
                             layer_types=["linear_attention", "attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),
    "qwen4_exp": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                      indexer_compress_ratio=2),
    # attention with as many key/value heads as query heads
    **{name: dict(num_key_value_heads=2) for name in ("axk2", "deepseek_v32", "glm_moe_dsa")},
    "dots3_note": dict(num_key_value_heads=2, adapter_in_dim=32, adapter_input_size=32),
}
SEQ = 7


def families() -> List[str]:
    """model_type of every causal LM family whose experts dispatch through experts_implementation."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    found = set()
    for path in glob.glob(os.path.join(root, "*", "modeling_*.py")):
        with open(path, encoding="utf-8") as f:
            if "@use_experts_implementation" in f.read():
                found.add(os.path.basename(os.path.dirname(path)))
    return sorted(found & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))


def is_experts_module(module) -> bool:
    """An ``@use_experts_implementation`` module: the attributes every transformers >= 5.7 decorator sets."""
    return all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "is_concatenated"))


def _distinct(values: list) -> list:
    return list(dict.fromkeys(values))


def _shrunk(defaults: dict, overrides: dict) -> dict:
    """Constructor kwargs: ``overrides`` for the attributes the config has, its sub-configs (a
    text_config) shrunk the same way."""
    kwargs = {k: v for k, v in overrides.items() if k in defaults}
    # Per-layer lists (attention kinds, dense/sparse MLPs) keep each kind once, in order: as many
    # layers as kinds (at least 2), so every kind of layer, the MoE one included, runs.
    per_layer = {k: _distinct(v) for k, v in defaults.items()
                 if k.endswith("layer_types") and isinstance(v, list) and v and k not in overrides}
    if "num_hidden_layers" in kwargs:
        kwargs["num_hidden_layers"] = max([kwargs["num_hidden_layers"]] + [len(v) for v in per_layer.values()])
        layers = kwargs["num_hidden_layers"]
        for k, kinds in per_layer.items():
            kwargs[k] = [kinds[i % len(kinds)] for i in range(layers)]
        if isinstance(defaults.get("per_layer_config"), dict):
            kwargs["per_layer_config"] = {i: v for i, v in defaults["per_layer_config"].items() if int(i) < layers}
    # Multi-head latent attention ropes head_dim = qk_rope_head_dim.
    if "qk_rope_head_dim" in kwargs and defaults.get("head_dim") == defaults.get("qk_rope_head_dim"):
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
    for key, value in defaults.items():
        if isinstance(value, dict) and "hidden_size" in value:
            kwargs[key] = {**value, **_shrunk(value, overrides)}
    return kwargs


def tiny_model(model_type: str, experts_implementation: str, dtype=None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = {**SHRINK, **EXTRA.get(model_type, {})}
    config_class = type(AutoConfig.for_model(model_type))
    config = config_class(**_shrunk(config_class().to_dict(), overrides))
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, experts_implementation=experts_implementation)
    except AttributeError:
        # A release whose causal LM takes only the family's text config, which the auto class does
        # not extract from the composite one (qwen3_5_moe in transformers 5.7): that config, directly.
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        text_class = model_class.config_class
        if text_class is config_class:
            raise
        config = text_class(**_shrunk(text_class().to_dict(), overrides))
        torch.manual_seed(0)
        model = model_class._from_config(config, experts_implementation=experts_implementation)
    model.eval()
    # The experts' weights drawn afresh, biases included (initialised to 0 they would hide a bias
    # the backend forgot): what is under test must matter to the logits.
    with torch.no_grad():
        for module in model.modules():
            if is_experts_module(module):
                for name, p in module.named_parameters(recurse=False):
                    p.normal_(0.0, 0.1)
    if dtype is not None:
        model.to(dtype)
    return model
