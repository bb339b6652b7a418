"""Shared setup for the graph-rewrite tests (the Inductor fusion pass, fused_moe_ops/fusion/).

Helpers shared by the test modules live in fusion_cases.py (imported as ``from fusion_cases import``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fused_moe_ops  # noqa: E402,F401  (installs the pass)
import fused_moe_ops.fusion as fusion  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    """Every test starts from: dynamo reset, fusion on and installed, zero counters, and an empty
    Inductor cache (a cache hit would skip the pass and hide a rewrite); the post-grad slot is
    restored afterwards. Inductor's choice between the op and its own code (fusion/autotune.py) is
    off: these tests check the rewritten graph, whose op a benchmark could replace by Inductor's code
    at these small sizes; test_fusion_autotune.py turns it on and forces each choice."""
    import torch._inductor.config as inductor_config
    from torch._inductor import utils as inductor_utils

    fresh = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    saved_slot = inductor_config.post_grad_custom_post_pass
    fusion.enable_fusion()
    fusion.reset_fusion_stats()
    autotune_was = fusion.set_autotune(False)
    torch._dynamo.reset()
    try:
        with fresh():
            yield
    finally:
        torch._dynamo.reset()
        fusion.enable_fusion()
        fusion.set_autotune(autotune_was)
        inductor_config.post_grad_custom_post_pass = saved_slot
        fusion.install()
