"""Run a callback right after a module is imported, without importing it.

What fused_moe_ops plugs into another library (the fusion pass into Inductor, the HF experts backend
into transformers) must be in place before that library is used, yet ``import fused_moe_ops`` must
not import it. If the module is imported already the
callback runs at once; otherwise a one-shot ``sys.meta_path`` finder wraps the module's loader and
runs the callback right after the module's own code ran. The fusion pass is installed this way when
``torch._inductor`` is imported (fusion/__init__.py). A callback that raises is reported as a
warning: it never breaks the user's import.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
import warnings
from typing import Any, Callable

_lock = threading.Lock()


class _CallAfterExec(importlib.abc.Loader):
    """Runs the real loader of the module, then the callback."""

    def __init__(self, inner: Any, callback: Callable[[], None]) -> None:
        self._inner = inner
        self._callback = callback

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, is_package, ...
        return getattr(self._inner, name)

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        # Put the real loader back first: nothing should see this wrapper after the import.
        module.__loader__ = self._inner
        if module.__spec__ is not None:
            module.__spec__.loader = self._inner
        self._inner.exec_module(module)
        _run(self._callback, module.__name__)


class AfterImportHook(importlib.abc.MetaPathFinder):
    """One-shot finder: the first import of ``module_name`` gets a loader that calls ``callback``."""

    def __init__(self, module_name: str, callback: Callable[[], None]) -> None:
        self.module_name = module_name
        self.callback = callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.module_name:
            return None
        self.remove()
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _CallAfterExec(spec.loader, self.callback)
        return spec

    def remove(self) -> None:
        with _lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)

    def pending(self) -> bool:
        return self in sys.meta_path


def _run(callback: Callable[[], None], module_name: str) -> None:
    try:
        callback()
    except Exception as e:  # noqa: BLE001 - never break the user's import
        warnings.warn(f"fused_moe_ops: hook on the import of {module_name} failed ({type(e).__name__}: {e})",
                      RuntimeWarning, stacklevel=3)


def call_after_import(module_name: str, callback: Callable[[], None]) -> AfterImportHook:
    """Call ``callback`` now if ``module_name`` is imported, else right after its first import."""
    hook = AfterImportHook(module_name, callback)
    if module_name in sys.modules:
        _run(callback, module_name)
        return hook
    with _lock:
        sys.meta_path.insert(0, hook)
    return hook
