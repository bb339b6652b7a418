"""On/off switch and counters of the fusion pass (no torch imports: read at import and by the pass).

The counters tell what the compiled graphs of this process contain, compiles served from Inductor's
FX graph cache included: a cache hit runs no pass, so each count is also added to torch's
``counters["inductor"]`` (as ``fused_moe_ops.rewrite.<pattern>`` / ``fused_moe_ops.lowered.<choice>``),
whose increments during a compile Inductor stores with the cache entry and adds again on every hit
of it. What grew there without a count here came from the cache.
"""
from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from typing import Any, Dict, Optional

_ENV_DISABLE = "FUSED_MOE_OPS_DISABLE_FUSION"
_KEY_PREFIX = "fused_moe_ops."

_lock = threading.Lock()
_enabled: bool = os.environ.get(_ENV_DISABLE, "").strip().lower() not in ("1", "true", "yes", "on")
# Counts, by "rewrite" (per pattern) and "lowered" (how Inductor lowered each rewritten combine where
# it chooses, fusion/autotune.py: "op", our kernel, or the decomposition it inlined as its own code):
# those of compiles that ran the pass here, and those replayed from the FX graph cache.
_compiled: Dict[str, Counter] = {"rewrite": Counter(), "lowered": Counter()}
_from_cache: Dict[str, Counter] = {"rewrite": Counter(), "lowered": Counter()}
# The value each of our keys in torch's counters["inductor"] had when last looked at.
_seen: Counter = Counter()


def enabled() -> bool:
    return _enabled


def set_enabled(value: bool) -> bool:
    """Set the switch; return the previous value."""
    global _enabled
    with _lock:
        previous, _enabled = _enabled, bool(value)
    return previous


def disabled_by_env() -> bool:
    return os.environ.get(_ENV_DISABLE, "").strip().lower() in ("1", "true", "yes", "on")


def _inductor_counters() -> Optional[Counter]:
    """torch's counters["inductor"], where Dynamo is loaded (without it nothing was compiled)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return None if utils is None else utils.counters["inductor"]


def _take_cache_replays() -> None:
    """Move what Inductor added to our keys since the last look (cache hits) into _from_cache.
    A key that shrank was cleared by someone (counters.clear()): start again from its value."""
    counters = _inductor_counters()
    if counters is None:
        return
    for key in set(_seen) | {k for k in counters if k.startswith(_KEY_PREFIX)}:
        now = counters.get(key, 0)
        if now > _seen[key]:
            kind, name = key[len(_KEY_PREFIX):].split(".", 1)
            _from_cache[kind][name] += now - _seen[key]
        _seen[key] = now


def _count(kind: str, name: str) -> None:
    with _lock:
        _take_cache_replays()
        _compiled[kind][name] += 1
        counters = _inductor_counters()
        if counters is not None:
            key = f"{_KEY_PREFIX}{kind}.{name}"
            counters[key] += 1
            _seen[key] = counters[key]


def count(pattern: str) -> None:
    _count("rewrite", pattern)


def count_lowering(choice: str) -> None:
    _count("lowered", choice)


def stats() -> Dict[str, Any]:
    with _lock:
        _take_cache_replays()
        by_pattern = dict(_compiled["rewrite"] + _from_cache["rewrite"])
        lowered = dict(_compiled["lowered"] + _from_cache["lowered"])
        from_cache = sum(_from_cache["rewrite"].values())
    return {"rewrites": sum(by_pattern.values()), "by_pattern": by_pattern, "lowered": lowered,
            "from_cache": from_cache, "enabled": _enabled}


def reset() -> None:
    with _lock:
        _take_cache_replays()  # what the cache served so far belongs to before the reset
        for counter in (*_compiled.values(), *_from_cache.values()):
            counter.clear()
