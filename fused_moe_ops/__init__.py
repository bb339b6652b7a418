"""fused_moe_ops: the MoE combine step (gather, weight, sum) as one fused PyTorch operator.

    import fused_moe_ops
    out = fused_moe_ops.shuffle_mul_sum(expert_out, permutation, topk_weights)   # or torch.ops.moe.shuffle_mul_sum

Importing the package defines ``torch.ops.moe.shuffle_mul_sum`` and loads its CPU kernel (from the
wheel, from the build cache, or compiled once; the CUDA kernel too where a GPU is visible), and
arranges for the Inductor pass that rewrites the eager combine spelling into the op under
``torch.compile`` to be installed when Inductor is imported (fusion/__init__.py), and the HF
transformers experts backend ``experts_implementation="fused_moe_ops"`` to be registered when
transformers' experts interface is imported (integrations/transformers.py). It imports neither
Inductor, Dynamo, Triton, transformers nor setuptools itself: an eager user pays only for the kernels.
"""
from .ops import scatter_mul_sum, shuffle_mul_sum  # noqa: F401  (defines the schemas and the fakes)
from .reference import scatter_mul_sum_reference, shuffle_mul_sum_reference  # noqa: F401
from . import _registry

_registry.setup()

# The fusion pass's switch and counters (cheap: the pass itself, and Inductor, load when Inductor is
# first imported; fusion/__init__.py).
from .fusion import disable_fusion, enable_fusion, fusion_enabled, fusion_stats, reset_fusion_stats  # noqa: F401,E402

# experts_implementation="fused_moe_ops" for HF transformers >= 5.7, registered when transformers'
# experts interface is imported (never imports transformers itself).
from .integrations import transformers as _hf_experts  # noqa: E402

_hf_experts.register_when_imported()

__version__ = "0.1.0"

# The engines' call signatures (integrations/engines.py: plain Python over the op, nothing heavy
# imported). Imported here rather than through a module __getattr__: Dynamo does not call one, so a
# first use inside torch.compile(fullgraph=True) would fail.
from .integrations.engines import apply_shuffle_mul_sum, moe_sum  # noqa: F401,E402
