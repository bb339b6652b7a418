"""Inductor chooses, per combine, between the op's kernel and its own code for it.

The pass emits ``moe::_shuffle_mul_sum_fused``. Where torch has custom-op autotuning
(``torch._inductor.kernel.custom_op.register_custom_op_autotuning``, torch >= 2.12), the op is
registered with the decompositions of fusion/decompositions.py: at compile time Inductor benchmarks
the op's kernel against one of them (``unrolled`` where topk <= 16, else ``reduction``) on the
combine's real sizes and, when the decomposition wins, inlines it as Inductor IR, where it fuses with
its neighbours (the residual add and the next RMSNorm at decode). Where our kernel is clearly faster
(large M) the op stays. Choices within ``policy.choice_tolerance`` of each other go by
``policy.choice_order`` (the decomposition first), not by the benchmark's noise; on CPU a
decode-sized combine takes the decomposition without a benchmark (``policy.choice_without_benchmark``).
The modules Inductor compiles to time the choices are kept out of the output code, so a first
compile shows what a later one does.

A decomposition is benchmarked alone, so what it gains by fusing is not in the comparison; the
preference (``decomposition_preference``, default ``DEFAULT_PREFERENCE``) stands for it: the op's
time counts ``preference`` times.

Where a size is symbolic (the token count under dynamic shapes) a benchmark would time one token
count for all of them: there the static rule ``policy.symbolic_size_choice`` names the decomposition
to inline, or the op. Where Inductor cannot choose at all the op stays, as it always did: AOTInductor
(its decomposition cannot be benchmarked there), ``torch._inductor.config.deterministic`` (no
benchmarking), torch < 2.12 (nothing is registered), or the autotuning switched off.

Switch: ``fused_moe_ops.fusion.set_autotune(False)`` or ``FUSED_MOE_OPS_AUTOTUNE=0``; preference:
``set_decomposition_preference(x)`` or ``FUSED_MOE_OPS_DECOMPOSITION_PREFERENCE=x``. Both are part
of the pass's cache key (``cache_key()``), so a cached graph never comes back with the other setting.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
from typing import Any, Callable, Dict, Optional

import torch

from . import _state, policy
from .decompositions import DECOMPOSITIONS, DEFAULTS, TENSOR_ARGS

log = logging.getLogger("fused_moe_ops")

_ENV_SWITCH = "FUSED_MOE_OPS_AUTOTUNE"
_ENV_PREFERENCE = "FUSED_MOE_OPS_DECOMPOSITION_PREFERENCE"
# Measured on CPU (docs/BENCHMARKS.md, "decomposition preference"): see policy.py.
DEFAULT_PREFERENCE = policy.DECOMPOSITION_PREFERENCE
# The unrolled decomposition is one gather per slot: beyond this topk its code grows for no gain.
MAX_UNROLLED_TOPK = 16

_lock = threading.Lock()
_enabled: bool = os.environ.get(_ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _env_preference() -> float:
    raw = os.environ.get(_ENV_PREFERENCE, "").strip()
    if not raw:
        return DEFAULT_PREFERENCE
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{_ENV_PREFERENCE} must be a positive number, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{_ENV_PREFERENCE} must be a positive number, got {raw!r}")
    return value


_preference: float = _env_preference()
# A lowering forced for every combine (forced_lowering): "op" or a DECOMPOSITIONS key; None: Inductor chooses.
LOWERINGS = ("op",) + tuple(DECOMPOSITIONS)
_forced: Optional[str] = None
_registered = False
_call = threading.local()  # the combine being lowered: what the input generators and configs need


def _op():
    return torch.ops.moe._shuffle_mul_sum_fused.default


_AVAILABLE: list = []


def available() -> Optional[str]:
    """None where this torch has custom-op autotuning as this module uses it (torch >= 2.12), else why
    not. torch 2.11 has an earlier ``autotune_custom_op`` (no choice returned, no registry of user
    lowerings): there, as on older torch, nothing is registered and the op stays."""
    if not _AVAILABLE:
        _AVAILABLE.append(_why_unavailable())
    return _AVAILABLE[0]


def _why_unavailable() -> Optional[str]:
    prefix = f"torch {torch.__version__} has no custom-op autotuning as fused_moe_ops uses it"
    try:
        from torch._inductor import lowering
        from torch._inductor.kernel import custom_op
    except ImportError as e:
        return f"{prefix} ({e})"
    fn = getattr(custom_op, "autotune_custom_op", None)
    if fn is None:
        return f"{prefix} (no torch._inductor.kernel.custom_op.autotune_custom_op)"
    if not isinstance(getattr(lowering, "user_lowerings", None), dict):
        return f"{prefix} (no torch._inductor.lowering.user_lowerings)"
    params = inspect.signature(fn).parameters
    wanted = ("name", "decompositions", "inputs", "non_tensor_args", "op_overload", "user_input_gen_fns")
    if any(p not in params for p in wanted) or "return_choice" in params:
        return f"{prefix} (autotune_custom_op{inspect.signature(fn)})"
    return None


def set_autotune(enabled: bool) -> bool:
    """Let Inductor choose between the op and its own code (True, the default) or always keep the op
    (False). Returns the previous setting. Compile after changing it (it is part of the cache key)."""
    global _enabled
    with _lock:
        previous, _enabled = _enabled, bool(enabled)
    return previous


def autotune_enabled() -> bool:
    return _enabled


def set_decomposition_preference(value: float) -> float:
    """The decomposition is taken when its benchmarked time is at most ``value`` x the op's (1.0:
    plain timing; larger prefers Inductor's code, for the fusion it gets). Returns the previous value."""
    global _preference
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"decomposition preference must be a positive number, got {value!r}")
    with _lock:
        previous, _preference = _preference, float(value)
    return previous


def decomposition_preference() -> float:
    return _preference


@contextlib.contextmanager
def forced_lowering(choice: Optional[str]):
    """Inside, every rewritten combine Inductor lowers is lowered as ``choice`` without a benchmark:
    "op" (the op's kernel), "reduction" or "unrolled" (that decomposition inlined; "unrolled" needs a
    static topk <= MAX_UNROLLED_TOPK, else the op stays), or None (Inductor chooses). For tests and the
    fuzzer, which hold each lowering to eager's result; ``fusion_stats()["lowered"]`` says what was
    lowered. Part of the cache key: compile inside the block."""
    global _forced
    if choice is not None and choice not in LOWERINGS:
        raise ValueError(f"forced_lowering takes one of {LOWERINGS} or None, got {choice!r}")
    with _lock:
        previous, _forced = _forced, choice
    try:
        yield
    finally:
        with _lock:
            _forced = previous


def cache_key() -> str:
    """What decides the choice, for the pass's uuid (the FX graph cache key)."""
    return (f"autotune={'on' if _enabled else 'off'}|available={available() is None}|preference={_preference!r}"
            f"|forced={_forced}")


# ------------------------------------------------------------------ registration


# Inductor's autotuning (torch._inductor.kernel.custom_op) times its fallback choice by calling the op
# with the tensor inputs positional and the other arguments by name. The op's schema has scalars
# between its tensors (out_dtype before addend), so that call cannot be made on the op itself
# (register_custom_op_autotuning on it fails to lower any combine with an addend). The choice is
# timed on this twin instead: the same arguments, tensors first, calling the op. It only serves the
# benchmark: where the op wins, the graph keeps the op's own lowering (the twin never runs in it).
BENCH_OP_NAME = "_shuffle_mul_sum_fused_tensors_first"
BENCH_SCHEMA = (
    f"{BENCH_OP_NAME}(Tensor input, Tensor? permutation, Tensor factors, Tensor? addend=None, "
    "Tensor? row_mask=None, ScalarType? out_dtype=None, int negative_index=0, int factor_round=0, "
    "float scale=1.0) -> Tensor"
)
# A combine without a permutation (rows already in slot order: the one-token combine, a per-token
# einsum) would put an absent tensor ahead of the factors in that positional call; its twin takes the
# permutation last, by name (always None).
BENCH_IDENTITY_OP_NAME = "_shuffle_mul_sum_fused_identity_tensors_first"
BENCH_IDENTITY_SCHEMA = (
    f"{BENCH_IDENTITY_OP_NAME}(Tensor input, Tensor factors, Tensor? addend=None, Tensor? row_mask=None, "
    "Tensor? permutation=None, ScalarType? out_dtype=None, int negative_index=0, int factor_round=0, "
    "float scale=1.0) -> Tensor"
)
_bench_lib = None


def _bench_op(identity: bool = False):
    return getattr(torch.ops.moe, BENCH_IDENTITY_OP_NAME if identity else BENCH_OP_NAME).default


def _bench_tensor_names(named: dict) -> tuple:
    """The tensor arguments of the twin that benchmarks this call, in its positional order."""
    if named.get("permutation") is None:
        return tuple(n for n in TENSOR_ARGS if n != "permutation")
    return TENSOR_ARGS


def ensure_registered() -> bool:
    """Register the op's autotuning lowering (and the benchmark twin) once; False where torch has no
    custom-op autotuning. Called by the pass before Inductor lowers a graph holding the op."""
    global _registered, _bench_lib
    if _registered:
        return True
    if available() is not None:
        return False
    with _lock:
        if _registered:
            return True
        from torch._inductor.lowering import user_lowerings

        lib = torch.library.Library("moe", "FRAGMENT")
        lib.define(BENCH_SCHEMA)

        def twin(input, permutation, factors, addend=None, row_mask=None, out_dtype=None, negative_index=0,
                 factor_round=0, scale=1.0):
            return _op()(input, permutation, factors, out_dtype, negative_index, factor_round, scale, addend,
                         row_mask)

        lib.impl(BENCH_OP_NAME, twin, "CompositeExplicitAutograd")
        torch.library.register_fake(f"moe::{BENCH_OP_NAME}", twin, lib=lib)
        lib.define(BENCH_IDENTITY_SCHEMA)

        def identity_twin(input, factors, addend=None, row_mask=None, permutation=None, out_dtype=None,
                          negative_index=0, factor_round=0, scale=1.0):
            return _op()(input, permutation, factors, out_dtype, negative_index, factor_round, scale, addend,
                         row_mask)

        lib.impl(BENCH_IDENTITY_OP_NAME, identity_twin, "CompositeExplicitAutograd")
        torch.library.register_fake(f"moe::{BENCH_IDENTITY_OP_NAME}", identity_twin, lib=lib)
        _bench_lib = lib
        previous = user_lowerings.get(_op())
        user_lowerings[_op()] = _lowering if previous is None else _chained(previous)
        _registered = True
    return True


def _chained(previous: Callable) -> Callable:
    def lowering(*args: Any, **kwargs: Any):
        out = _lowering(*args, **kwargs)
        return previous(*args, **kwargs) if out is None else out

    return lowering


def _valid_permutation(fake: torch.Tensor) -> torch.Tensor:
    # Inductor benchmarks integer inputs as zeros: every slot would read row 0 from cache.
    return torch.randint(0, _call.rows, tuple(fake.shape), dtype=fake.dtype, device=fake.device)


def _sparse_row_mask(fake: torch.Tensor) -> torch.Tensor:
    return torch.rand(tuple(fake.shape), device=fake.device) < 0.05


def _named(args: tuple, kwargs: dict) -> dict:
    names = [a.name for a in _op()._schema.arguments]
    named = dict(zip(names, args))
    named.update(kwargs)
    return named


def _static(size) -> Optional[int]:
    """An IR size as an int, or None where it is symbolic."""
    try:
        return int(size)
    except TypeError:
        return None


def _sizes(named: dict):
    """(R, M, topk, K) as ints, or None where one is symbolic."""
    x, factors, perm = named["input"], named["factors"], named.get("permutation")
    rows, k = x.get_size()
    if len(factors.get_size()) == 1:
        m, topk = perm.get_size()
    else:
        m, topk = factors.get_size()
    sizes = tuple(_static(s) for s in (rows, m, topk, k))
    return None if any(s is None for s in sizes) else sizes


def why_not_autotuned(named: dict) -> Optional[str]:
    """Why this call keeps the op without benchmarking (None: Inductor chooses)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.virtualized import V

    if not _enabled:
        return "autotuning switched off"
    if V.aot_compilation:
        return "AOTInductor (a decomposition cannot be benchmarked there)"
    if inductor_config.deterministic:
        return "torch._inductor.config.deterministic (no benchmarking)"
    sizes = _sizes(named)
    if sizes is None:
        return SYMBOLIC
    present = [named.get(n) is not None for n in _bench_tensor_names(named)]
    if present != sorted(present, reverse=True):
        # The benchmark calls the twin with the given tensors positional: an absent one ahead of a
        # given one (a row mask without an addend) cannot be expressed.
        return UNEXPRESSED
    if 0 in sizes:
        return "an empty operand"
    return None


# A benchmark would time one size (the hint) for every token count the graph serves: there the static
# rule policy.symbolic_size_choice decides instead.
SYMBOLIC = "a symbolic size (a benchmark would choose once, at the size hint)"
# Only the benchmark is ruled out: a choice made without one (policy.choice_without_benchmark) stands.
UNEXPRESSED = "an absent tensor argument ahead of a given one"


def inlines_its_own_code(device_type: str, m: Any, topk: Any, k: Any, dtype: torch.dtype) -> bool:
    """Whether a combine of these sizes (Python ints, None where symbolic) is certain to be lowered
    as a decomposition (Inductor's own code) without a benchmark: a forced decomposition, a
    decode-sized combine (``policy.choice_without_benchmark``) or a symbolic token count whose rule
    names a decomposition (``policy.symbolic_size_choice``), with Inductor able to choose at all.

    fusion/_common.py reads it for rows that are a pointwise result Inductor computes inside its own
    combine (``t + bias`` before gpt-oss's einsum): rewritten only here, where the inlined code reads
    the pointwise inputs directly again. A benchmark cannot decide for them: it times the op on rows
    already written out, so it does not see the extra write and read the op costs (gpt-oss at 512
    tokens: the op won the benchmark and the layer was slower, docs/FUSION.md)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.virtualized import V

    if available() is not None or not _enabled or _forced == "op":
        return False
    if V.aot_compilation or inductor_config.deterministic:
        return False
    if _forced is not None:
        choice = _forced
    elif m is None or topk is None or k is None:
        choice = policy.symbolic_size_choice(device_type, topk, k, dtype)
    elif not policy.should_autotune(device_type, m, topk, k, dtype):
        return False
    else:
        choice = policy.choice_without_benchmark(device_type, m, topk, k, dtype)
    return choice == "reduction" or (choice == "unrolled" and topk is not None and topk <= MAX_UNROLLED_TOPK)


_SCALARS = ("out_dtype", "negative_index", "factor_round", "scale")


def _lowering(*args: Any, **kwargs: Any):
    """Inductor's lowering of the op: where Inductor can choose, the op's kernel and the
    decompositions are benchmarked on the combine's sizes (autotune_custom_op); a winning
    decomposition comes back inlined as IR. Else (and where the op wins) None: the op's own lowering.
    Each choice is counted (``fusion_stats()["lowered"]``)."""
    result, choice = _choose(_named(args, kwargs))
    _state.count_lowering(choice)
    return result


def _decomposition_name(choice) -> str:
    """The DECOMPOSITIONS key of a benchmark's winning choice (its name holds the function's)."""
    for key, fn in DECOMPOSITIONS.items():
        if fn.__name__ in str(getattr(choice, "name", "")):
            return key
    return "decomposition"


def _choose(named: dict):
    """(the inlined IR or None for the op's own lowering, "op" or the decomposition's name)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.kernel.custom_op import autotune_custom_op

    if _forced is not None:
        return _inline(named, _forced, "forced_lowering")
    why = why_not_autotuned(named)
    if why is SYMBOLIC:
        return _lower_symbolic(named)
    if why is not None and why is not UNEXPRESSED:
        log.debug("fused_moe_ops: the op stays (not benchmarked): %s", why)
        return None, "op"
    rows, m, topk, k = _sizes(named)
    device, dtype = named["input"].get_device(), named["input"].get_dtype()
    if not policy.should_autotune(device.type, m, topk, k, dtype):
        log.debug("fused_moe_ops: the op stays (not benchmarked): policy.should_autotune said no")
        return None, "op"
    settled = policy.choice_without_benchmark(device.type, m, topk, k, dtype)
    # Inductor's test switch that forces the benchmark's outcome needs the benchmark.
    if settled is not None and getattr(inductor_config.test_configs, "force_custom_op_decomposition", None) is None:
        return _inline(named, settled, "policy.choice_without_benchmark")
    if why is UNEXPRESSED:
        log.debug("fused_moe_ops: the op stays (not benchmarked): %s", why)
        return None, "op"
    identity = named.get("permutation") is None
    tensors = [named[n] for n in _bench_tensor_names(named) if named.get(n) is not None]
    scalars = {n: named.get(n, DEFAULTS[n]) for n in _SCALARS}
    if identity:  # by name, for the identity twin and the decompositions' bind()
        scalars["permutation"] = None
    # One decomposition against the op: the unrolled one where topk allows it, else the reduction.
    # Timed alone, the reduction was never measurably faster than the unrolled one (equal at topk 2,
    # 10 to 200x slower at topk 8 on CPU: docs/BENCHMARKS.md, the cold-compile run); benchmarking both
    # only let the noise pick between equals, one layer one way and the next the other.
    decomps = [DECOMPOSITIONS["unrolled"] if topk <= MAX_UNROLLED_TOPK else DECOMPOSITIONS["reduction"]]
    options: Dict[str, Any] = {}
    if "benchmark_with_cudagraphs" in inspect.signature(autotune_custom_op).parameters:
        options["benchmark_with_cudagraphs"] = device.type == "cuda"  # timed as it runs: in a CUDA graph
    _call.rows = rows
    # Inductor writes a JSON line per benchmark to stderr ("Autotune Choices Stats"), which every user
    # of torch.compile would see for each combine: quiet unless asked for through its own variable.
    quiet = ({} if "TORCHINDUCTOR_MAX_AUTOTUNE_REPORT_CHOICES_STATS" in os.environ
             else {"max_autotune_report_choices_stats": False})
    order = policy.choice_order(device.type, m, topk, k, dtype)
    tolerance = policy.choice_tolerance(device.type)
    with _steady_pick(_preference, order, tolerance), _benchmark_code_unsaved(), inductor_config.patch(quiet):
        result, choice = autotune_custom_op(
            name="moe_shuffle_mul_sum_fused", decompositions=decomps, inputs=tensors,
            non_tensor_args=[dict(scalars) for _ in decomps], op_overload=_bench_op(identity),
            user_input_gen_fns={"permutation": _valid_permutation, "row_mask": _sparse_row_mask}, **options)
    if getattr(choice, "gm", None) is None:
        log.debug("fused_moe_ops: the op won the benchmark (m=%s topk=%s k=%s)", m, topk, k)
        return None, "op"
    log.debug("fused_moe_ops: %s won the benchmark (m=%s topk=%s k=%s): inlined", choice.name, m, topk, k)
    return result, _decomposition_name(choice)


def _lower_symbolic(named: dict):
    """A combine with a symbolic size (the token count under dynamic shapes): the decomposition
    ``policy.symbolic_size_choice`` names, inlined as IR without a benchmark, or None (the op stays);
    with the choice's name as _choose gives it."""
    x, factors = named["input"], named["factors"]
    topk = _static((named["permutation"].get_size() if len(factors.get_size()) == 1 else factors.get_size())[1])
    k = _static(x.get_size()[1])
    device, dtype = x.get_device(), x.get_dtype()
    return _inline(named, policy.symbolic_size_choice(device.type, topk, k, dtype), "policy.symbolic_size_choice")


def _inline(named: dict, choice: str, why: str):
    """The decomposition ``choice`` inlined as IR without a benchmark, or None where the op stays
    (``choice`` "op", an unrolled decomposition without a small static topk, torch without the inliner);
    with the choice's name as _choose gives it."""
    from torch._inductor.kernel import custom_op

    factors = named["factors"]
    topk = _static((named["permutation"].get_size() if len(factors.get_size()) == 1 else factors.get_size())[1])
    lower = getattr(custom_op, "_lower_single_impl", None)  # torch's own inliner (private: checked)
    if lower is not None and list(inspect.signature(lower).parameters)[:5] != [
            "impl", "impl_kwargs", "runtime_kwargs", "tensor_inputs", "name"]:
        lower = None
    if choice == "op" or lower is None or (choice == "unrolled" and (topk is None or topk > MAX_UNROLLED_TOPK)):
        log.debug("fused_moe_ops: the op stays (%s: %s)", why, choice)
        return None, "op"
    tensors = [named[n] for n in TENSOR_ARGS if named.get(n) is not None]
    kwargs = {n: named.get(n, DEFAULTS[n]) for n in _SCALARS}
    kwargs.update({n: None for n in TENSOR_ARGS if named.get(n) is None})  # bind() reads absent ones by name
    # Traced symbolically; None where the decomposition would add a guard on a size (a token count
    # derived from another size, e.g. M = R // topk, where M < 2 cannot be ruled out): the op stays.
    # That attempt is expected here, so the shape environment's warning about it is kept off stderr.
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    try:
        result = lower(DECOMPOSITIONS[choice], kwargs, {}, tensors, f"moe_shuffle_mul_sum_fused_{choice}")
    finally:
        shapes_log.setLevel(level)
    log.debug("fused_moe_ops: %s", "the op stays (the decomposition adds a guard)"
              if result is None else f"{choice} inlined ({why})")
    return result, ("op" if result is None else choice)


@contextlib.contextmanager
def _steady_pick(preference: float, order: tuple, tolerance: float):
    """Inside: Inductor's pick among the benchmarked choices (``_pick``), in place of its own (the
    fastest, with a threshold that only ever favours the op)."""
    from torch._inductor.virtualized import V

    outer = V.choices
    if not hasattr(outer, "override_best_choice"):
        yield
        return

    class _Steady:
        """Delegates to the handler in place (Inductor's or the user's); only the pick changes."""

        def __getattr__(self, name):
            return getattr(outer, name)

        def override_best_choice(self, best_choice, timings):
            best_choice = _pick(best_choice, timings, preference, order, tolerance)
            return outer.override_best_choice(best_choice, timings)

    with V.set_choices_handler(_Steady()):
        yield


def _choice_name(choice) -> str:
    """"op" for the op's kernel (Inductor's extern call of the twin), else the DECOMPOSITIONS key."""
    from torch._inductor.select_algorithm import ExternKernelCaller

    return "op" if isinstance(choice, ExternKernelCaller) else _decomposition_name(choice)


def _pick(best_choice, timings: dict, preference: float, order: tuple, tolerance: float):
    """The choice to keep: the first in ``order`` whose time is within ``1 + tolerance`` of the
    fastest, where the op's time counts ``preference`` times (a decomposition is taken over the op when
    it is at most ``preference x`` the op's time). Two lowerings within the benchmark's noise of each
    other would otherwise be picked by the noise: a cold compile on a busy machine flipped between
    them from one compile to the next. ``order``: policy.choice_order (the decomposition before the
    op: inlined, it launches what Inductor's own graph does)."""
    scaled = {c: t * preference if _choice_name(c) == "op" else t for c, t in timings.items()}
    finite = {c: t for c, t in scaled.items() if t == t and t != float("inf")}
    if not finite:
        return best_choice
    fastest = min(finite.values())
    rank = {name: i for i, name in enumerate(order)}
    within = [c for c, t in finite.items() if t <= fastest * (1.0 + tolerance)]
    chosen = min(within, key=lambda c: (rank.get(_choice_name(c), len(order)), finite[c]))
    log.debug("fused_moe_ops: benchmark %s; within %.0f%% of the fastest: %s; kept %s",
              ", ".join(f"{_choice_name(c)} {t * 1e3:.3g} us" for c, t in timings.items()), tolerance * 100,
              ", ".join(_choice_name(c) for c in within), _choice_name(chosen))
    return chosen


@contextlib.contextmanager
def _benchmark_code_unsaved():
    """Inside: the modules Inductor compiles only to time the choices (graphs named ``benchmark_*``)
    stay out of the output code that ``torch._inductor.utils.run_and_get_code`` collects and
    ``TORCH_LOGS=output_code`` prints. They never run in the model; shown, a compile with an empty
    autotuning cache looked like it launches one more kernel per decomposition than a compile whose
    cache held the choice, for the same model code."""
    from torch._inductor import codecache
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V

    # The artifact logger TORCH_LOGS=output_code prints through (a private name: absent, no filter).
    output_code_log = getattr(codecache, "output_code_log", None) or logging.getLogger("torch._inductor.codecache.__output_code")

    def benchmarking() -> bool:
        return str(getattr(V.graph, "name", None) or "").startswith("benchmark_")

    raw = GraphLowering.__dict__.get("save_output_code")
    saver = GraphLowering.save_output_code

    def save(code: str) -> None:
        if not benchmarking():
            saver(code)

    class _NotBenchmarkCode(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not benchmarking()

    quiet = _NotBenchmarkCode()
    if saver is not None:
        GraphLowering.save_output_code = save
    output_code_log.addFilter(quiet)
    try:
        yield
    finally:
        output_code_log.removeFilter(quiet)
        if saver is not None and GraphLowering.__dict__.get("save_output_code") is save:
            GraphLowering.save_output_code = raw
