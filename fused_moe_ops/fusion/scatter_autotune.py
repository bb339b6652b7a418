"""Inductor chooses, per scatter combine, between ``moe::_scatter_mul_sum_fused``'s kernel and its own
code for it (fusion/autotune.py does the same for the gather form).

The decomposition (fusion/decompositions.py, ``scatter_rows_sum``) is what Inductor compiles from the
user's ``scatter_add``, in float32 and rounded once: inlined as Inductor IR, the graph launches what
Inductor's graph without the pass launches. Which one is kept (``policy.scatter_choice``):

* where the op's kernel is the plain-PyTorch reference (no native kernel registered for the device),
  the decomposition, without a benchmark: the reference copies to the CPU and back;
* a symbolic size (the token count under ``dynamic=True``), or a CPU combine of at most
  ``policy.CPU_NO_BENCHMARK_ELEMENTS`` row elements: the decomposition, without a benchmark;
* elsewhere Inductor benchmarks the op against the decomposition on the combine's sizes (custom-op
  autotuning, torch >= 2.12), ties going to the decomposition as for the gather form.

Where Inductor cannot choose (torch < 2.12, AOTInductor, deterministic mode, the autotuning switched
off) the op stays. ``autotune.forced_lowering("op")`` keeps the op; any decomposition name forced there
inlines this one. ``fusion_stats()["lowered"]`` counts ``"scatter_op"`` or ``"scatter_decomposition"``.
"""
from __future__ import annotations

import inspect
import logging
import os
import threading
from typing import Any, Optional

import torch

from . import _state, autotune, policy
from .decompositions import SCATTER_DEFAULTS, scatter_rows_sum

log = logging.getLogger("fused_moe_ops")

OP_CHOICE, DECOMPOSITION_CHOICE = "scatter_op", "scatter_decomposition"
_TENSORS = ("input", "index", "factors", "addend")
_SCALARS = ("num_tokens", "out_dtype", "negative_index", "factor_round", "scale")

# Inductor times its fallback choice with the tensors positional and the rest by name; the op's schema
# has scalars between its tensors (num_tokens before addend). The twin takes the tensors first and
# calls the op; it serves only the benchmark (where the op wins, the graph keeps the op itself).
BENCH_OP_NAME = "_scatter_mul_sum_fused_tensors_first"
BENCH_SCHEMA = (
    f"{BENCH_OP_NAME}(Tensor input, Tensor index, Tensor? factors=None, Tensor? addend=None, SymInt num_tokens=0, "
    "ScalarType? out_dtype=None, int negative_index=0, int factor_round=0, float scale=1.0) -> Tensor"
)

_lock = threading.Lock()
_registered = False
_bench_lib = None
_call = threading.local()


def _op():
    return torch.ops.moe._scatter_mul_sum_fused.default


def _bench_op():
    return getattr(torch.ops.moe, BENCH_OP_NAME).default


def native_kernel(device_type: str) -> bool:
    """Whether a kernel registered from C++/CUDA serves the scatter op on this device (else it is the
    plain-PyTorch reference, or a Python kernel nothing has measured)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    for line in torch._C._dispatch_dump(f"moe::{_op()._schema.name.split('::')[1]}").splitlines():
        if line.startswith(f"{key}:"):
            return ".cpp:" in line or ".cu:" in line
    return False


def ensure_registered() -> bool:
    """Register the scatter op's lowering (and its benchmark twin) once; False without custom-op
    autotuning (torch < 2.12), where the op stays."""
    global _registered, _bench_lib
    if _registered:
        return True
    if autotune.available() is not None:
        return False
    with _lock:
        if _registered:
            return True
        from torch._inductor.lowering import user_lowerings

        lib = torch.library.Library("moe", "FRAGMENT")
        lib.define(BENCH_SCHEMA)

        def twin(input, index, factors=None, addend=None, num_tokens=0, out_dtype=None, negative_index=0,
                 factor_round=0, scale=1.0):
            return _op()(input, index, factors, num_tokens, out_dtype, negative_index, factor_round, scale, addend)

        lib.impl(BENCH_OP_NAME, twin, "CompositeExplicitAutograd")
        torch.library.register_fake(f"moe::{BENCH_OP_NAME}", twin, lib=lib)
        _bench_lib = lib
        previous = user_lowerings.get(_op())

        def lowering(*args: Any, **kwargs: Any):
            out = _lowering(*args, **kwargs)
            return previous(*args, **kwargs) if out is None and previous is not None else out

        user_lowerings[_op()] = lowering
        _registered = True
    return True


def _named(args: tuple, kwargs: dict) -> dict:
    named = dict(zip([a.name for a in _op()._schema.arguments], args))
    named.update(kwargs)
    return named


def _static(size) -> Optional[int]:
    try:
        return int(size)
    except TypeError:
        return None


def _lowering(*args: Any, **kwargs: Any):
    result, choice = _choose(_named(args, kwargs))
    _state.count_lowering(choice)
    return result


def _why_op_stays() -> Optional[str]:
    from torch._inductor import config as inductor_config
    from torch._inductor.virtualized import V

    if not autotune.autotune_enabled():
        return "autotuning switched off"
    if V.aot_compilation:
        return "AOTInductor (a decomposition cannot be benchmarked there)"
    if inductor_config.deterministic:
        return "torch._inductor.config.deterministic (no benchmarking)"
    return None


def _choose(named: dict):
    """(the inlined IR or None for the op's own lowering, OP_CHOICE or DECOMPOSITION_CHOICE)."""
    forced = autotune._forced
    if forced is not None:
        return (None, OP_CHOICE) if forced == "op" else _inline(named, "forced_lowering")
    why = _why_op_stays()
    if why is not None:
        log.debug("fused_moe_ops: the scatter op stays (not benchmarked): %s", why)
        return None, OP_CHOICE
    x = named["input"]
    rows, k = (_static(s) for s in x.get_size())
    m = _static(named["num_tokens"])
    device, dtype = x.get_device(), x.get_dtype()
    choice = policy.scatter_choice(device.type, m, rows, k, dtype, native_kernel(device.type))
    if choice == "decomposition":
        return _inline(named, "policy.scatter_choice")
    if choice == "op" or named.get("factors") is None and named.get("addend") is not None or 0 in (m, rows, k):
        # (an absent factors ahead of a given addend cannot be passed to the twin positionally)
        return None, OP_CHOICE
    return _benchmark(named, m, rows, k)


def _inline(named: dict, why: str):
    """The decomposition inlined as IR without a benchmark, or the op where torch cannot inline it."""
    from torch._inductor.kernel import custom_op

    lower = getattr(custom_op, "_lower_single_impl", None)
    if lower is None or list(inspect.signature(lower).parameters)[:5] != [
            "impl", "impl_kwargs", "runtime_kwargs", "tensor_inputs", "name"]:
        return None, OP_CHOICE
    tensors = [named[n] for n in _TENSORS if named.get(n) is not None]
    kwargs = {n: named.get(n, SCATTER_DEFAULTS[n]) for n in _SCALARS}
    kwargs.update({n: None for n in _TENSORS if named.get(n) is None})
    if _static(kwargs["num_tokens"]) is None:
        # A symbolic token count: make_fx traces tensors, not sizes, so the decomposition reads it from an
        # empty (M, 0) tensor (no data: nothing is allocated for it).
        from torch._inductor.lowering import empty

        x = named["input"]
        tensors.append(empty([kwargs.pop("num_tokens"), 0], dtype=x.get_dtype(), device=x.get_device()))
    else:
        kwargs["num_tokens"] = _static(kwargs["num_tokens"])
        kwargs["num_tokens_like"] = None
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    try:
        result = lower(scatter_rows_sum, kwargs, {}, tensors, "moe_scatter_mul_sum_fused_decomposition")
    finally:
        shapes_log.setLevel(level)
    log.debug("fused_moe_ops: %s", "the scatter op stays (the decomposition adds a guard)"
              if result is None else f"scatter decomposition inlined ({why})")
    return result, (OP_CHOICE if result is None else DECOMPOSITION_CHOICE)


def _valid_index(fake: torch.Tensor) -> torch.Tensor:
    # Inductor benchmarks integer inputs as zeros: every row would add into token 0.
    return torch.randint(0, max(_call.m, 1), tuple(fake.shape), dtype=fake.dtype, device=fake.device)


def _benchmark(named: dict, m: int, rows: int, k: int):
    import torch._inductor.config as inductor_config
    from torch._inductor.kernel.custom_op import autotune_custom_op

    x = named["input"]
    device, dtype = x.get_device(), x.get_dtype()
    tensors = [named[n] for n in _TENSORS if named.get(n) is not None]
    scalars = {n: named.get(n, SCATTER_DEFAULTS[n]) for n in _SCALARS}
    scalars["num_tokens"] = m
    options = {}
    if "benchmark_with_cudagraphs" in inspect.signature(autotune_custom_op).parameters:
        options["benchmark_with_cudagraphs"] = device.type == "cuda"
    quiet = ({} if "TORCHINDUCTOR_MAX_AUTOTUNE_REPORT_CHOICES_STATS" in os.environ
             else {"max_autotune_report_choices_stats": False})
    _call.m = m
    order = ("decomposition", "op")  # ties to the decomposition: it launches what Inductor's own graph does
    with autotune._steady_pick(autotune.decomposition_preference(), order, policy.choice_tolerance(device.type)), \
            autotune._benchmark_code_unsaved(), inductor_config.patch(quiet):
        result, choice = autotune_custom_op(
            name="moe_scatter_mul_sum_fused", decompositions=[scatter_rows_sum], inputs=tensors,
            non_tensor_args=[dict(scalars)], op_overload=_bench_op(), user_input_gen_fns={"index": _valid_index},
            **options)
    if getattr(choice, "gm", None) is None:
        log.debug("fused_moe_ops: the scatter op won the benchmark (m=%s rows=%s k=%s)", m, rows, k)
        return None, OP_CHOICE
    log.debug("fused_moe_ops: scatter decomposition won the benchmark (m=%s rows=%s k=%s): inlined", m, rows, k)
    return result, DECOMPOSITION_CHOICE
