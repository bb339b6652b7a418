"""Where MoE users already are: the library's op behind other projects' interfaces.

``engines``: SGLang's ``apply_shuffle_mul_sum`` and vLLM's ``moe_sum`` call signatures, re-exported
as ``fused_moe_ops.apply_shuffle_mul_sum`` and ``fused_moe_ops.moe_sum``.
``transformers``: HF transformers' experts implementation ``"fused_moe_ops"``, registered when
transformers is imported (it imports transformers lazily: importing this package does not).
"""
