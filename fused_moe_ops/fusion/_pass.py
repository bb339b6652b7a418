"""The Inductor post-grad pass, its cache key, and how it is installed next to a user's own pass."""
from __future__ import annotations

import hashlib
import inspect
import logging
import sys
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence

import torch
import torch._inductor.config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import _state

log = logging.getLogger("fused_moe_ops")

_HERE = Path(__file__).resolve().parent
_source_hash: Optional[str] = None


def _sources_digest() -> str:
    """sha256 over every module of this package (patterns, replacements, policy, this file)."""
    global _source_hash
    if _source_hash is None:
        h = hashlib.sha256()
        for path in sorted(_HERE.glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
        _source_hash = h.hexdigest()
    return _source_hash


def _hook_digest() -> str:
    """The should_rewrite in use, if it was replaced at runtime (its source when it has one)."""
    hook = getattr(sys.modules[__package__], "should_rewrite", None)
    from .policy import should_rewrite as default

    if hook is None or hook is default:
        return "default"
    try:
        src = inspect.getsource(hook)
    except (OSError, TypeError):
        src = repr(getattr(hook, "__code__", hook))
    return hashlib.sha256(f"{getattr(hook, '__module__', '')}.{getattr(hook, '__qualname__', '')}\n{src}".encode()).hexdigest()


class ShuffleMulSumFusionPass(CustomGraphPass):
    """Rewrites the MoE combine subgraph (gather, weight, sum over top-k) into ``moe.shuffle_mul_sum``.

    A ``CustomGraphPass`` for ``torch._inductor.config.post_grad_custom_post_pass``. ``matched_count``
    is the number of rewrites of the last graph it ran on; ``fused_moe_ops.fusion_stats()`` keeps the
    running totals.
    """

    def __init__(self) -> None:
        self.matched_count = 0
        self._patterns = None

    def _get_patterns(self):
        if self._patterns is None:
            # Importing the fusion modules registers their patterns (deferred so that
            # `import fused_moe_ops` stays cheap).
            from . import bmm_combine, gather_mul_sum, one_token_sum, scatter_add_combine, weighted_rows_sum  # noqa: F401
            # After scatter_add_combine: the same scatters, where that one proves nothing (first match wins).
            from . import scatter_mul_sum  # noqa: F401
            from ._common import PATTERNS

            self._patterns = PATTERNS
        return self._patterns

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.matched_count = 0
        if not _state.enabled():
            return
        realize_inputs_as_inductor_will()
        self.matched_count = self._get_patterns().apply(graph)
        if self.matched_count:  # then the consumers of what was rewritten (a scale, an add)
            from .autotune import ensure_registered
            from .epilogue import fold_epilogues

            fold_epilogues(graph)
            ensure_registered()  # Inductor chooses between the op and its own code (torch >= 2.12)
            from .scatter_autotune import ensure_registered as ensure_scatter_registered

            ensure_scatter_registered()

    def uuid(self) -> Optional[Any]:
        from .autotune import cache_key

        on = "on" if _state.enabled() else "off"
        return hashlib.sha256(f"{_sources_digest()}|{on}|{_hook_digest()}|{cache_key()}".encode()).hexdigest()

    def __repr__(self) -> str:
        return f"<fused_moe_ops fusion pass ({'enabled' if _state.enabled() else 'disabled'})>"


def realize_inputs_as_inductor_will() -> None:
    """Put the ops in Inductor's ``needs_realized_inputs`` before the graph is lowered.

    Inductor registers a custom op's fallback, and with it puts the op in that set, the first time it
    lowers the op: a node read by several users, one of them such an op, is then realized once instead
    of being computed inside each reader. In a process's first compile the nodes lowered before the
    op's first lowering (the residual add that feeds both the next RMSNorm and the combine's addend)
    miss that, so the first compile's kernels differed from every later compile's, with the same
    graph, the same choices and an empty Inductor cache each time. Done here, before any lowering,
    the first compile is what the later ones are."""
    from torch._inductor import lowering

    needs_realized = getattr(lowering, "needs_realized_inputs", None)
    if needs_realized is None:  # a torch without the set: nothing differs between compiles
        return
    for op in (torch.ops.moe._shuffle_mul_sum_fused.default, torch.ops.moe.shuffle_mul_sum.default,
               torch.ops.moe._scatter_mul_sum_fused.default):
        if op not in needs_realized:
            needs_realized.add(op)


FUSION_PASS = ShuffleMulSumFusionPass()


class ComposedPass(CustomGraphPass):
    """Runs several post-grad passes in order; its uuid combines theirs.

    If one of them is not a ``CustomGraphPass`` with a uuid, ``uuid()`` is None and Inductor bypasses
    the FX graph cache for the compile, exactly as it would for that pass alone.
    """

    def __init__(self, passes: Sequence[Any]) -> None:
        self.passes: List[Any] = list(passes)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self) -> Optional[Any]:
        parts = []
        for p in self.passes:
            u = p.uuid() if isinstance(p, CustomGraphPass) else None
            if u is None:
                return None
            parts.append(f"{type(p).__module__}.{type(p).__qualname__}:{u!r}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def __repr__(self) -> str:
        return f"ComposedPass({self.passes!r})"


def _flatten(p: Any) -> Iterable[Any]:
    if p is None:
        return
    if isinstance(p, ComposedPass):
        for q in p.passes:
            yield from _flatten(q)
    elif isinstance(p, (list, tuple)):
        for q in p:
            yield from _flatten(q)
    else:
        yield p


def contains_fusion(p: Any) -> bool:
    return any(q is FUSION_PASS for q in _flatten(p))


def compose_with(their_pass: Any) -> CustomGraphPass:
    """A pass that runs the fusion first and then ``their_pass`` (a CustomGraphPass, a plain callable,
    a list of them, or None). Use it where your code sets the slot after ``import fused_moe_ops``::

        torch._inductor.config.post_grad_custom_post_pass = fused_moe_ops.fusion.compose_with(my_pass)
    """
    others = [q for q in _flatten(their_pass) if q is not FUSION_PASS]
    if not others:
        return FUSION_PASS
    return ComposedPass([FUSION_PASS, *others])


def install() -> Any:
    """Put the fusion into ``torch._inductor.config.post_grad_custom_post_pass`` (idempotent).

    An empty slot gets the pass; a slot holding someone else's pass gets ``compose_with(theirs)``
    (ours first, then theirs); a slot that already runs ours is left as it is.
    """
    current = inductor_config.post_grad_custom_post_pass
    if contains_fusion(current):
        return current
    new = compose_with(current)
    inductor_config.post_grad_custom_post_pass = new
    if current is not None:
        log.info("fused_moe_ops: composing the fusion pass with the existing post_grad_custom_post_pass %r", current)
    return new


def uninstall() -> None:
    """Remove the fusion from the slot, leaving any pass it was composed with."""
    current = inductor_config.post_grad_custom_post_pass
    if not contains_fusion(current):
        return
    others = [q for q in _flatten(current) if q is not FUSION_PASS]
    inductor_config.post_grad_custom_post_pass = (
        None if not others else others[0] if len(others) == 1 else ComposedPass(others)
    )
