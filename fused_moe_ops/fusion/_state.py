"""On/off switch and counters of the fusion pass (no torch imports: read at import and by the pass)."""
from __future__ import annotations

import os
import threading
from collections import Counter
from typing import Any, Dict

_ENV_DISABLE = "FUSED_MOE_OPS_DISABLE_FUSION"

_lock = threading.Lock()
_enabled: bool = os.environ.get(_ENV_DISABLE, "").strip().lower() not in ("1", "true", "yes", "on")
_by_pattern: Counter = Counter()
# How Inductor lowered each rewritten combine where it chooses (fusion/autotune.py): "op" (our
# kernel), or the name of the decomposition it inlined as its own code.
_lowered: Counter = Counter()


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


def count(pattern: str) -> None:
    with _lock:
        _by_pattern[pattern] += 1


def count_lowering(choice: str) -> None:
    with _lock:
        _lowered[choice] += 1


def stats() -> Dict[str, Any]:
    with _lock:
        by_pattern, lowered = dict(_by_pattern), dict(_lowered)
    return {"rewrites": sum(by_pattern.values()), "by_pattern": by_pattern, "lowered": lowered,
            "enabled": _enabled}


def reset() -> None:
    with _lock:
        _by_pattern.clear()
        _lowered.clear()
