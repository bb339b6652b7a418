"""The CUDA kernels' device code on CPU tensors, through the grid emulator (test-only, never shipped).

``fused(...)`` takes the arguments of ``moe::_shuffle_mul_sum_fused`` (the public op is its all-default
case) and returns what the CUDA kernel computes. The host side is the CUDA library's: the argument
checks are ops.check_fused_args (the same rules as csrc/shuffle_mul_sum.h), the layout handling is
combine_into's (a non-dense last dimension of input made dense, the addend as (M, K) rows), the Params
are combine_cuda's, and the launch shape is the header's own choose_launch for ``Launch.sms`` SMs
unless ``Launch.threads`` / ``Launch.slices`` force one.

``scatter_fused(...)`` does the same for ``moe::_scatter_mul_sum_fused`` (and its public twin): its host
side is combine_scatter_cuda's (checks: ops.check_scatter_fused_args), its three steps the CUDA
library's, except the stable sort of step 2, which runs on the host (std::stable_sort in runner.cpp:
CUB's radix sort does not run under the emulator; the GPU tests run it).

Calls are batched: ``run([...])`` feeds every call to one runner process (runner.cpp). A failed launch
(a device-side assert, a barrier or warp-vote error) raises EmulatedLaunchError for that call; a
sanitizer report ends the process and raises EmulatorCrash for the batch.

Thread order: ``Launch.order`` ("forward", "reverse", "random"), by default FUSED_MOE_OPS_EMU_ORDER
(default "random") with seed FUSED_MOE_OPS_EMU_SEED (default 1).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from fused_moe_ops.ops import addend_as_rows, check_fused_args, check_scatter_fused_args

from . import build

ORDERS = {"forward": 0, "reverse": 1, "random": 2}
KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class EmulatedLaunchError(RuntimeError):
    """The launch failed on the emulated device, as cudaErrorAssert / cudaErrorLaunchFailure would."""


class EmulatorCrash(RuntimeError):
    """The runner process died (a sanitizer report, a watchdog, a crash)."""


def default_order() -> str:
    order = os.environ.get("FUSED_MOE_OPS_EMU_ORDER", "random")
    if order not in ORDERS:
        raise ValueError(f"FUSED_MOE_OPS_EMU_ORDER must be one of {sorted(ORDERS)}, got {order!r}")
    return order


@dataclasses.dataclass(frozen=True)
class Launch:
    sms: int = 132           # the GPU choose_launch plans for (H100 SXM: 132, A100: 108)
    threads: int = 0         # blockDim.x forced (0: choose_launch's)
    slices: int = 0          # gridDim.y forced (0: choose_launch's)
    order: Optional[str] = None  # None: default_order()
    seed: Optional[int] = None   # None: FUSED_MOE_OPS_EMU_SEED

    def describe(self) -> str:
        forced = f" threads={self.threads}" * bool(self.threads) + f" slices={self.slices}" * bool(self.slices)
        return f"sms={self.sms}{forced} order={self.order or default_order()}"


# The launch shapes every case runs under: what launch picks for 1, 108 and 132 SMs, and forced ones.
LAUNCHES = (Launch(sms=1), Launch(sms=108), Launch(sms=132), Launch(threads=32, slices=1),
            Launch(threads=64, slices=3), Launch(threads=128, slices=2))


@dataclasses.dataclass
class Call:
    input: torch.Tensor
    permutation: Optional[torch.Tensor]
    factors: torch.Tensor
    out_dtype: Optional[torch.dtype] = None
    negative_index: int = 0
    factor_round: int = 0
    scale: float = 1.0
    addend: Optional[torch.Tensor] = None
    row_mask: Optional[torch.Tensor] = None
    out: Optional[torch.Tensor] = None       # the .out form: an (M, K) tensor with a dense last dimension
    launch: Launch = Launch()
    spread_rows: int = 0  # > 0: the runner places input's rows this many elements apart (offsets past 2^31)


@dataclasses.dataclass
class ScatterCall:
    """One call of moe::_scatter_mul_sum_fused (the public op: the defaults)."""
    input: torch.Tensor
    index: torch.Tensor
    factors: Optional[torch.Tensor]
    num_tokens: int
    out_dtype: Optional[torch.dtype] = None
    negative_index: int = 0
    factor_round: int = 0
    scale: float = 1.0
    addend: Optional[torch.Tensor] = None
    launch: Launch = Launch()


@dataclasses.dataclass
class Result:
    out: Optional[torch.Tensor]
    shape: tuple                   # (threads, slices, vec) launched; (0, 0, 0): no launch (M = 0 or K = 0)
    error: Optional[str] = None    # the failed launch's message


def _extent(t: torch.Tensor) -> int:
    """Elements from t's first to its last element, inclusive (0 when empty)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))


def _span_bytes(t: torch.Tensor) -> bytes:
    flat = t.as_strided((_extent(t),), (1,))
    return flat.contiguous().view(torch.uint8).numpy().tobytes()


class _Batch:
    def __init__(self):
        self.blob = bytearray()
        self.out_size = 0
        self.lines: List[str] = []

    def put(self, t: torch.Tensor, spread: int = 0) -> str:
        data = _span_bytes(t)
        off = len(self.blob)
        self.blob += data
        field = f"{off},{len(data)},{t.data_ptr() % 16}"
        if spread:
            row = t.shape[1] * t.element_size()
            field += f",{spread * t.element_size()},{row}"
        return field


def _prepare(batch: _Batch, call: Call):
    """The host side of the CUDA library for one call: checks, layouts, Params. Returns (out, key=value)."""
    x, p, f, a = call.input, call.permutation, call.factors, call.addend
    m, topk, k = check_fused_args(x, p, f, call.out_dtype, call.negative_index, call.factor_round, a, call.row_mask)
    if call.spread_rows:
        assert x.is_contiguous(), "spread_rows takes a dense input"
    if k > 1 and x.stride(1) != 1:  # combine_into: the last dimension must be dense
        x = x.contiguous()
    if a is not None:
        a = addend_as_rows(a, m, k)
        if k > 1 and a.stride(1) != 1:
            a = a.contiguous()
    out_dtype = call.out.dtype if call.out is not None else (call.out_dtype or x.dtype)
    out = call.out
    if out is None:
        out = torch.full((m, k), float("nan"), dtype=out_dtype)  # poisoned: an unwritten element shows
    assert k <= 1 or out.stride(1) == 1, "the emulated .out form takes an `out` with a dense last dimension"
    fields = {
        "m": m, "topk": topk, "k": k, "rows": x.shape[0], "in_kind": KIND[x.dtype], "out_kind": KIND[out_dtype],
        "input": batch.put(x, call.spread_rows), "input_row_stride": call.spread_rows or x.stride(0),
        "factors": batch.put(f), "factor_kind": KIND[f.dtype], "factor_stride0": f.stride(0),
        "factor_stride1": f.stride(1) if f.dim() > 1 else 0, "factors_per_row": int(f.dim() == 1),
        "negative_index": call.negative_index, "factor_round": call.factor_round, "scale": float(call.scale).hex(),
        "out": batch.put(out), "out_row_stride": out.stride(0), "out_result": batch.out_size,
    }
    batch.out_size += _extent(out) * out.element_size()
    if p is not None:  # perm_layout: (i, j) at perm[i * row + j * slot], 1-D or 2-D alike
        fields.update(perm=batch.put(p), perm_is_int32=int(p.dtype == torch.int32),
                      perm_stride_row=p.stride(0) if p.dim() == 2 else topk * p.stride(0),
                      perm_stride_slot=p.stride(1) if p.dim() == 2 else p.stride(0))
    if a is not None:
        fields.update(addend=batch.put(a), addend_kind=KIND[a.dtype],
                      addend_row_stride=0 if a.shape[0] == 1 else a.stride(0))
    if call.row_mask is not None:
        fields.update(row_mask=batch.put(call.row_mask), row_mask_stride=call.row_mask.stride(0))
    fields.update(_launch_fields(call.launch))
    return out, " ".join(f"{key}={value}" for key, value in fields.items())


def _launch_fields(launch: Launch) -> dict:
    return dict(sms=launch.sms, threads=launch.threads, slices=launch.slices,
                order=ORDERS[launch.order or default_order()],
                seed=launch.seed if launch.seed is not None else int(os.environ.get("FUSED_MOE_OPS_EMU_SEED", "1")))


def _prepare_scatter(batch: _Batch, call: ScatterCall):
    """The host side of the CUDA library's scatter form for one call (combine_scatter_cuda)."""
    x, index, f, a = call.input, call.index, call.factors, call.addend
    rows, m, k = check_scatter_fused_args(x, index, f, call.num_tokens, call.out_dtype, call.negative_index,
                                          call.factor_round, a)
    if k > 1 and x.stride(1) != 1:  # the last dimension must be dense
        x = x.contiguous()
    if a is not None:
        a = addend_as_rows(a, m, k)
        if k > 1 and a.stride(1) != 1:
            a = a.contiguous()
    out_dtype = call.out_dtype or x.dtype
    out = torch.full((m, k), float("nan"), dtype=out_dtype)  # poisoned: an unwritten element shows
    fields = {
        "op": "scatter", "m": m, "k": k, "rows": rows, "in_kind": KIND[x.dtype], "out_kind": KIND[out_dtype],
        "input": batch.put(x), "input_row_stride": x.stride(0),
        "index": batch.put(index), "index_is_int32": int(index.dtype == torch.int32), "index_stride": index.stride(0),
        "negative_index": call.negative_index, "factor_round": call.factor_round, "scale": float(call.scale).hex(),
        "out": batch.put(out), "out_row_stride": out.stride(0), "out_result": batch.out_size,
    }
    batch.out_size += _extent(out) * out.element_size()
    if f is not None:
        fields.update(factors=batch.put(f), factor_kind=KIND[f.dtype], factor_stride0=f.stride(0))
    if a is not None:
        fields.update(addend=batch.put(a), addend_kind=KIND[a.dtype],
                      addend_row_stride=0 if a.shape[0] == 1 else a.stride(0))
    fields.update(_launch_fields(call.launch))
    return out, " ".join(f"{key}={value}" for key, value in fields.items())


def run(calls: Sequence, *, variant: Optional[str] = None, plants: Sequence[str] = (),
        timeout: float = 600) -> List[Result]:
    """Every call in one runner process; a Result per call."""
    exe = build.runner(variant or build.default_variant(), plants)
    batch = _Batch()
    outs = []
    for call in calls:
        out, line = (_prepare_scatter if isinstance(call, ScatterCall) else _prepare)(batch, call)
        outs.append(out)
        batch.lines.append(line)
    with tempfile.TemporaryDirectory(prefix="fmo-emu-") as tmp:
        d = Path(tmp)
        (d / "cases").write_text("\n".join(batch.lines) + "\n")
        (d / "blob").write_bytes(bytes(batch.blob))
        env = dict(os.environ, **build.SANITIZER_ENV)
        proc = subprocess.run([str(exe), str(d / "cases"), str(d / "blob"), str(d / "results"), str(d / "out")],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise EmulatorCrash(f"the emulated kernel's runner ({exe.name}) exited with status {proc.returncode}:\n"
                                f"{proc.stderr[-8000:]}\n{proc.stdout[-2000:]}")
        verdicts = (d / "results").read_text().splitlines()
        out_blob = (d / "out").read_bytes()
    assert len(verdicts) == len(calls), (len(verdicts), len(calls), proc.stderr[-3000:])
    results = []
    for call, out, line, verdict in zip(calls, outs, batch.lines, verdicts):
        if verdict.startswith("error "):
            results.append(Result(None, (), verdict[len("error "):]))
            continue
        threads, slices, vec = (int(v) for v in verdict.split()[1:])
        at = int(line.split("out_result=")[1].split()[0])
        n = _extent(out)
        if n:
            raw = torch.frombuffer(bytearray(out_blob[at:at + n * out.element_size()]), dtype=torch.uint8)
            out.as_strided((n,), (1,)).copy_(raw.view(out.dtype))
        results.append(Result(out, (threads, slices, vec)))
    return results


def fused(input, permutation, factors, out_dtype=None, negative_index=0, factor_round=0, scale=1.0, addend=None,
          row_mask=None, *, out=None, launch: Launch = Launch(), variant=None, plants=()) -> torch.Tensor:
    """moe::_shuffle_mul_sum_fused (and, with the defaults, moe::shuffle_mul_sum) on the emulated CUDA
    kernel, one launch; raises EmulatedLaunchError where the launch fails."""
    call = Call(input, permutation, factors, out_dtype, negative_index, factor_round, scale, addend, row_mask, out,
                launch)
    result = run([call], variant=variant, plants=plants)[0]
    if result.error is not None:
        raise EmulatedLaunchError(f"CUDA error: {result.error}")
    return result.out


def scatter_fused(input, index, factors, num_tokens, out_dtype=None, negative_index=0, factor_round=0, scale=1.0,
                  addend=None, launch: Launch = Launch(), *, variant=None, plants=()) -> torch.Tensor:
    """moe::_scatter_mul_sum_fused (and, with the defaults, moe::scatter_mul_sum) on the emulated CUDA
    kernels, one call; raises EmulatedLaunchError where a launch fails (an index entry out of range)."""
    call = ScatterCall(input, index, factors, num_tokens, out_dtype, negative_index, factor_round, scale, addend,
                       launch)
    result = run([call], variant=variant, plants=plants)[0]
    if result.error is not None:
        raise EmulatedLaunchError(f"CUDA error: {result.error}")
    return result.out
