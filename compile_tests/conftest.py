"""Shared setup for the graph-rewrite tests (the Inductor fusion pass, fused_moe_ops/fusion/).

Helpers shared by the test modules live in fusion_cases.py (imported as ``from fusion_cases import``).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fused_moe_ops  # noqa: E402,F401  (installs the pass)
import fused_moe_ops.fusion as fusion  # noqa: E402


@pytest.fixture(scope="session")
def _shared_kernel_cache_dir(tmp_path_factory):
    """One Inductor cache directory per test process (per xdist worker), for the compiled kernels
    only: two tests that generate the same C++ source load the .so the first one built instead of
    running g++ again (most of this directory's time on a 2-core machine). The caches that could
    skip the pass are off in each test (``_fresh_compile_state``)."""
    path = tmp_path_factory.mktemp("inductor_kernels")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCHINDUCTOR_CACHE_DIR", str(path))
        env.setenv("TRITON_CACHE_DIR", str(path / "triton"))
        yield path


@contextlib.contextmanager
def _graph_caches_off():
    """The shared kernel directory with every cache above the kernels off: the FX graph cache and
    AOTAutograd's cache (a hit would skip the pass and hide a rewrite) and the autotuning result
    cache (a hit would skip Inductor's choice). In-memory caches cleared on both sides."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import clear_caches

    clear_caches()
    try:
        with inductor_config.patch(fx_graph_cache=False, autotune_local_cache=False), \
                functorch_config.patch(enable_autograd_cache=False):
            yield
    finally:
        clear_caches()


@pytest.fixture(autouse=True)
def _fresh_compile_state(request, _shared_kernel_cache_dir):
    """Every test starts from: dynamo reset, fusion on and installed, zero counters, and no cache
    that could skip the pass (a cache hit would hide a rewrite); the post-grad slot is restored
    afterwards. Compiled kernels are shared across a process's tests (``_shared_kernel_cache_dir``),
    except in modules that set ``FRESH_INDUCTOR_CACHE = True`` (those that time Inductor's choices
    or read its caches get an empty cache directory per test). Inductor's choice between the op and
    its own code (fusion/autotune.py) is off: these tests check the rewritten graph, whose op a
    benchmark could replace by Inductor's code at these small sizes; test_fusion_autotune.py turns
    it on and forces each choice."""
    import torch._inductor.config as inductor_config
    from torch._inductor import utils as inductor_utils

    if getattr(request.module, "FRESH_INDUCTOR_CACHE", False):
        caches = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    else:
        caches = _graph_caches_off
    saved_slot = inductor_config.post_grad_custom_post_pass
    fusion.enable_fusion()
    fusion.reset_fusion_stats()
    autotune_was = fusion.set_autotune(False)
    torch._dynamo.reset()
    try:
        with caches():
            yield
    finally:
        torch._dynamo.reset()
        fusion.enable_fusion()
        fusion.set_autotune(autotune_was)
        inductor_config.post_grad_custom_post_pass = saved_slot
        fusion.install()


@pytest.fixture
def inductor_chooses():
    """Inductor's choice between the op and its own code on, as a user gets it (``_fresh_compile_state``
    turns it off for the graph tests); for the modules that test that choice."""
    previous = fusion.set_autotune(True)
    try:
        yield
    finally:
        fusion.set_autotune(previous)
