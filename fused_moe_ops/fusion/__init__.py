"""Automatic fusion: an Inductor post-grad pass that rewrites the MoE combine step into ``moe::shuffle_mul_sum``.

``import fused_moe_ops`` installs it into ``torch._inductor.config.post_grad_custom_post_pass``
(composed with a pass already there). Public API::

    fused_moe_ops.fusion_stats()        # {"rewrites": n, "by_pattern": {name: n}, "enabled": bool}
    fused_moe_ops.reset_fusion_stats()
    fused_moe_ops.disable_fusion()      # globally; `with fused_moe_ops.disable_fusion():` for a block
    fused_moe_ops.enable_fusion()
    fused_moe_ops.fusion_enabled()
    fused_moe_ops.fusion.compose_with(my_pass)   # for a post-grad pass of yours set after import
    fused_moe_ops.fusion.should_rewrite(...)     # profitability rule (policy.py)

FUSED_MOE_OPS_DISABLE_FUSION=1 in the environment: the pass is not installed at import.
See docs/FUSION.md for what it matches.
"""
from __future__ import annotations

import sys
from typing import Any, Dict

from . import _state
from ._pass import FUSION_PASS, ComposedPass, ShuffleMulSumFusionPass, compose_with, contains_fusion, install, uninstall
from .policy import should_rewrite

__all__ = [
    "FUSION_PASS",
    "ComposedPass",
    "ShuffleMulSumFusionPass",
    "compose_with",
    "contains_fusion",
    "disable_fusion",
    "enable_fusion",
    "fusion_enabled",
    "fusion_stats",
    "install",
    "reset_fusion_stats",
    "should_rewrite",
    "uninstall",
]


class _Disabled:
    """What disable_fusion() returns: the pass is already off; leaving a ``with`` block turns it back
    to what it was before the call."""

    def __init__(self, previous: bool) -> None:
        self._previous = previous

    def __enter__(self) -> "_Disabled":
        return self

    def __exit__(self, *exc: Any) -> None:
        _state.set_enabled(self._previous)

    def __repr__(self) -> str:
        return "<fused_moe_ops fusion disabled>"


def disable_fusion() -> _Disabled:
    """Turn the fusion pass off: for good when called plainly, or only inside ``with disable_fusion():``.

    Compiles done while it is off are cached under a different key (the pass's uuid changes), so
    they are never served a fused graph, nor the other way round.
    """
    return _Disabled(_state.set_enabled(False))


def enable_fusion() -> None:
    """Turn the fusion pass on (and install it if FUSED_MOE_OPS_DISABLE_FUSION kept it out)."""
    _state.set_enabled(True)
    install()


def fusion_enabled() -> bool:
    return _state.enabled()


def fusion_stats() -> Dict[str, Any]:
    """Rewrites done by this process: ``{"rewrites": total, "by_pattern": {name: count}, "enabled": bool}``.

    Counted when the pass runs, i.e. on an actual compile: a compile served from Inductor's FX graph
    cache does not run the pass again and does not count.
    """
    return _state.stats()


def reset_fusion_stats() -> None:
    _state.reset()


if not _state.disabled_by_env():
    install()

# fused_moe_ops/__init__.py re-exports the switch and the stats; make reset_fusion_stats reachable
# there too even on a version of that file that does not import it.
_parent = sys.modules.get(__name__.rpartition(".")[0])
if _parent is not None and not hasattr(_parent, "reset_fusion_stats"):
    _parent.reset_fusion_stats = reset_fusion_stats
del _parent
