"""Compiling one function twice, with and without the fusion pass, so that neither reuses the other's code.

The fusion pass API (fused_moe_ops.disable_fusion / fusion_stats) is optional: without it there is
only the "without pass" variant, and the callers say so.
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable, Optional

import torch

import fused_moe_ops


def fusion_api_reason() -> Optional[str]:
    """None when the pass can be switched off and on; else why not (reported in place of the with-pass rows)."""
    if not callable(getattr(fused_moe_ops, "disable_fusion", None)):
        return "fusion pass API absent (fused_moe_ops.disable_fusion not found)"
    return None


def fusion_rewrites() -> Optional[int]:
    """Rewrites the pass has made in this process so far (None without the stats API)."""
    stats = getattr(fused_moe_ops, "fusion_stats", None)
    if not callable(stats):
        return None
    try:
        return int(stats().get("rewrites", 0))
    except Exception:  # noqa: BLE001
        return None


def fusion_rewrites_by_pattern() -> dict:
    stats = getattr(fused_moe_ops, "fusion_stats", None)
    try:
        return dict(stats().get("by_pattern", {})) if callable(stats) else {}
    except Exception:  # noqa: BLE001
        return {}


@contextlib.contextmanager
def pass_disabled():
    """The "without pass" context: compiles (and calls) inside it see the pass off."""
    reason = fusion_api_reason()
    if reason is not None:
        yield
        return
    with fused_moe_ops.disable_fusion():
        yield


def _fresh_copy(fn: Callable) -> Callable:
    """fn with a code object of its own. Dynamo keeps compiled code per code object, so two
    torch.compile wrappers of one function share (and overwrite) one cache: the "without pass"
    wrapper would end up running the "with pass" code. A copy per variant keeps them apart."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def compile_fresh(fn: Callable, with_pass: bool, fullgraph: bool = False, dynamic: Optional[bool] = False):
    """torch.compile of fn that shares no compiled code with any other variant (its own code
    object; the FX graph cache is off for the whole run, see the CLI), so the pass really runs, or
    really does not, on its first call. with_pass only documents the intent: the caller compiles
    inside `pass_disabled()` for the variant without it.

    Only the outermost frame gets its own code object: a graph break inside a module's forward
    would make the inner frames' compiled code shared between variants. Models therefore compile
    with fullgraph=True (a graph break is an error, not a silently shared cache)."""
    if isinstance(fn, torch.nn.Module):
        module = fn

        def fn(x):
            return module(x)

    return torch.compile(_fresh_copy(fn), dynamic=dynamic, fullgraph=fullgraph)
