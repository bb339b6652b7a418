"""Automatic fusion: an Inductor post-grad pass that rewrites the MoE combine step into ``moe::shuffle_mul_sum``.

``import fused_moe_ops`` installs it into ``torch._inductor.config.post_grad_custom_post_pass``
(composed with a pass already there) when Inductor is first imported, i.e. before the first
``torch.compile`` runs, or at once if Inductor is already imported; eager users never pay for
importing Inductor. Public API::

    fused_moe_ops.fusion_stats()        # {"rewrites": n, "by_pattern": {name: n}, "lowered": {choice: n}, "enabled": bool}
    fused_moe_ops.reset_fusion_stats()
    fused_moe_ops.disable_fusion()      # globally; `with fused_moe_ops.disable_fusion():` for a block
    fused_moe_ops.enable_fusion()
    fused_moe_ops.fusion_enabled()
    fused_moe_ops.fusion.compose_with(my_pass)   # for a post-grad pass of yours set after import
    fused_moe_ops.fusion.should_rewrite(...)     # profitability rule (policy.py)
    fused_moe_ops.fusion.set_autotune(False)     # keep the op: no benchmark against Inductor's own code
    fused_moe_ops.fusion.set_decomposition_preference(x)  # take Inductor's code within x times the op's time

FUSED_MOE_OPS_DISABLE_FUSION=1 in the environment: the pass is not installed. FUSED_MOE_OPS_AUTOTUNE=0:
the op is never benchmarked against Inductor's code (fusion/autotune.py).
See docs/FUSION.md for what it matches.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, Optional

from .._import_hook import AfterImportHook, call_after_import
from . import _state
from .autotune import autotune_enabled, decomposition_preference, set_autotune, set_decomposition_preference
from .policy import should_rewrite

# Defined in ._pass, which imports torch._inductor: loaded on first use (module __getattr__ below).
_PASS_NAMES = ("FUSION_PASS", "ComposedPass", "ShuffleMulSumFusionPass", "compose_with", "contains_fusion",
               "install", "uninstall")

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
    "autotune_enabled",
    "decomposition_preference",
    "set_autotune",
    "set_decomposition_preference",
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
    from ._pass import install

    install()


def fusion_enabled() -> bool:
    return _state.enabled()


def fusion_stats() -> Dict[str, Any]:
    """The rewrites in the graphs this process compiled: ``{"rewrites": total, "by_pattern": {name:
    count}, "lowered": {choice: count}, "from_cache": n, "enabled": bool}``.

    ``lowered`` says how Inductor lowered the rewritten combines where it chooses (fusion/autotune.py):
    ``"op"`` (our kernel) or the decomposition it inlined as its own code (``"reduction"``,
    ``"unrolled"``); empty where torch has no custom-op autotuning (there every rewrite keeps the op).
    A graph served from Inductor's FX graph cache runs no pass, but counts all the same, as the compile
    that stored it did; ``from_cache`` says how many of ``rewrites`` came that way.
    """
    return _state.stats()


def reset_fusion_stats() -> None:
    _state.reset()


def __getattr__(name: str) -> Any:
    if name in _PASS_NAMES:
        from . import _pass

        return getattr(_pass, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- installing the pass when Inductor is imported -------------------------------------------------
#
# Importing torch._inductor (and torch._dynamo with it) takes about a second; an eager user should not
# pay it. Inductor reads post_grad_custom_post_pass only when it compiles, and every path to a compile
# imports the torch._inductor package first. So: if it is imported already, install now; otherwise
# right after the package's own code ran (a one-shot import hook, fused_moe_ops/_import_hook.py).

_INDUCTOR = "torch._inductor"
_HOOK: Optional[AfterImportHook] = None
log = logging.getLogger("fused_moe_ops")


def _install_now() -> None:
    if _state.disabled_by_env():
        return
    try:
        from ._pass import install

        install()
    except Exception as e:  # noqa: BLE001 - never break the user's import of torch._inductor
        warnings.warn(f"fused_moe_ops: could not install the fusion pass ({type(e).__name__}: {e}); "
                      "torch.compile runs without it", RuntimeWarning, stacklevel=2)


def install_when_inductor_loads() -> None:
    """Install the pass now if torch._inductor is imported, else as soon as it is."""
    global _HOOK
    if not install_pending():
        _HOOK = call_after_import(_INDUCTOR, _install_now)


def install_pending() -> bool:
    """Whether the pass waits for torch._inductor to be imported."""
    return _HOOK is not None and _HOOK.pending()


if not _state.disabled_by_env():
    install_when_inductor_loads()
