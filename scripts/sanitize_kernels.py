"""Both kernels of moe::shuffle_mul_sum over every code path, each result checked against the
float64 reference: the program scripts/gpu_check.sh runs under compute-sanitizer (memcheck,
racecheck, synccheck) instead of the pytest suite (under memcheck, pytest's start-up and
Triton's JIT of every test specialisation cost minutes; this is seconds).

    python scripts/sanitize_kernels.py                       # both kernels on CUDA
    python scripts/sanitize_kernels.py --backend cuda --quick
    python scripts/sanitize_kernels.py --device cpu          # dry run: the CPU kernel + Triton's interpreter
    python scripts/sanitize_kernels.py --list                # the cases and the paths they cover
    compute-sanitizer --tool memcheck --error-exitcode 86 python scripts/sanitize_kernels.py --backend cuda

Backends:
    cuda    torch.ops.moe.shuffle_mul_sum with FUSED_MOE_OPS_CUDA_BACKEND=cuda (the C++ CUDA kernel,
            csrc/shuffle_mul_sum_cuda.cu); with --device cpu, whatever serves CPU (the C++ CPU kernel)
    triton  fused_moe_ops.triton_kernel.shuffle_mul_sum_triton called directly (a small set of cases:
            each new specialisation is a JIT compile, slow under the sanitizer); with --device cpu, under
            TRITON_INTERPRET=1

The cases cover: the 16-byte vector path and the scalar path (K not a multiple of the vector, odd
row stride, unaligned view), odd topk, topk 1, topk > 32 (two ballot rounds), topk 300 and 4096,
strided input rows, M = 1 (column-split grid), large M, the M = 1 / topk = 1 / K = 1 float32 call
(the smallest call: one slot, one element), all-negative permutations (with and without
input rows), duplicates, int32 / int64 / None permutations, strided permutations, transposed
factors, float32 / bfloat16 / float16 in every role, the functional and the out= form (contiguous,
row-padded and column-strided out), and the no-launch shapes (M, K or topk 0). Rows no live entry
points at hold NaN, so a kernel that reads a skipped row shows it.

Exit status: 0 every case matched; 1 a case failed (wrong answer, unwritten output, an exception);
2 a requested backend cannot run here. The last line is the summary that gpu_check parses:
"sanitize_kernels: N/N cases ok (...)".
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import List, NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]

F32, F16, BF16 = "f32", "f16", "bf16"


class Case(NamedTuple):
    name: str
    m: int
    topk: int
    k: int
    rows: Optional[int] = None     # input rows R (default max(1, M*topk)); identity: M*topk
    dtype: str = BF16              # input
    fac: str = F32                 # factors
    out: Optional[str] = None      # out dtype (None: the input's)
    index: Optional[str] = "i64"   # "i32", "i64", or None (identity permutation)
    layout: str = "dense"          # input rows: dense | pad8 (stride K+8) | odd (stride K+1) | offset (1 element in)
    perm: str = "mixed"            # mixed (dups, -1, other negatives) | all-neg | strided (a ::2 view) | nonneg
    factors: str = "dense"         # dense | transposed
    form: str = "func"             # func | out | out-padded (row stride K+8) | out-cols (column stride 2)
    triton: bool = False           # also in the Triton set
    quick: bool = False            # in the --quick set
    fused: str = ""                # the internal op the fusion pass emits (moe::_shuffle_mul_sum_fused), with
                                   # these options: "+"-joined of wrap | error | per-row | round | scale |
                                   # addend (the input's dtype, (M, K)) | bias (float32 (K,), broadcast) | mask


CASES: List[Case] = [
    # 16-byte vector path (VEC = 8 for 2-byte inputs, 4 for float32)
    Case("vec-bf16-M7-topk8-K4096", 7, 8, 4096, index="i32", triton=True, quick=True),
    Case("vec-f32-M5-topk6-K1024-out", 5, 6, 1024, dtype=F32, form="out", quick=True),
    Case("vec-f16-to-f32-M16-topk2-K512", 16, 2, 512, dtype=F16, fac=F16, out=F32),
    Case("vec-strided-rows-pad8-M33-topk8-K2048", 33, 8, 2048, layout="pad8"),
    Case("vec-out-row-padded-M7-topk4-K4096", 7, 4, 4096, dtype=F16, form="out-padded", quick=True),
    # scalar path (VEC = 1)
    Case("scalar-K4097-M7-topk6", 7, 6, 4097, quick=True),
    Case("scalar-odd-row-stride-M9-topk4-K512", 9, 4, 512, dtype=F16, layout="odd", triton=True, quick=True),
    Case("scalar-unaligned-view-M9-topk4-K512", 9, 4, 512, layout="offset", out=F32),
    Case("scalar-K7-M128-topk8-dups-R3", 128, 8, 7, rows=3),
    Case("scalar-f32-fac-bf16-out-f16-M7-topk6-K4097", 7, 6, 4097, dtype=F32, fac=BF16, out=F16),
    Case("scalar-out-cols-strided-M7-topk2-K64", 7, 2, 64, form="out-cols"),
    # topk
    Case("oob-regression-M1-topk1-K1-f32", 1, 1, 1, dtype=F32, triton=True, quick=True),
    Case("oob-regression-M1-topk1-K1-f32-out", 1, 1, 1, dtype=F32, form="out"),
    Case("topk1-M64-K256", 64, 1, 256, quick=True),
    Case("topk1-M3-K4-f32-identity", 3, 1, 4, dtype=F32, index=None),
    Case("topk3-odd-M17-K300-f16-i32", 17, 3, 300, dtype=F16, index="i32"),
    Case("topk33-M5-K640", 5, 33, 640, quick=True),  # Triton's topk loop: fused-topk300 below
    Case("topk64-M3-K7168", 3, 64, 7168, index="i32"),
    Case("topk300-M2-K1024-out-f32", 2, 300, 1024, out=F32, quick=True),
    Case("topk4096-M1-K4096-R512", 1, 4096, 4096, rows=512),
    # grid shapes
    Case("M1-decode-split-K7168-topk8", 1, 8, 7168, triton=True, quick=True),
    Case("M1-K4096-topk2-f32", 1, 2, 4096, dtype=F32),
    Case("M4096-topk8-K512", 4096, 8, 512),
    # permutations and factors
    Case("all-negative-M8-topk4-K1000", 8, 4, 1000, rows=16, perm="all-neg"),
    Case("all-negative-R0-M4-topk2-K64", 4, 2, 64, rows=0, perm="all-neg", triton=True),
    Case("identity-f16-to-bf16-M6-topk4-K1024", 6, 4, 1024, dtype=F16, out=BF16, index=None, triton=True),
    Case("identity-odd-stride-M4-topk3-K77", 4, 3, 77, dtype=F32, index=None, layout="odd"),
    Case("i64-no-negatives-M8-topk8-K128", 8, 8, 128, perm="nonneg"),
    Case("strided-permutation-M8-topk4-K256", 8, 4, 256, perm="strided", index="i32"),
    Case("transposed-factors-bf16-M8-topk4-K256", 8, 4, 256, fac=BF16, factors="transposed"),
    # no launch
    Case("M0-topk8-K4097", 0, 8, 4097),
    Case("K0-M5-topk2", 5, 2, 0),
    Case("topk0-M3-K16", 3, 0, 16),
    # the internal op (what the pass emits): index wrap, per-row factors, rounding, row mask, epilogue
    Case("fused-wrap-round-addend-M7-topk8-K4096", 7, 8, 4096, fused="wrap+round+addend", quick=True),
    Case("fused-per-row-mask-scale-M5-topk4-K1024", 5, 4, 1024, fused="wrap+per-row+mask+scale", triton=True,
         quick=True),
    Case("fused-scalar-K77-bias-f32-M9-topk3", 9, 3, 77, dtype=F32, fused="wrap+bias+scale", quick=True),
    Case("fused-M1-decode-K7168-topk8", 1, 8, 7168, fused="wrap+round+addend+mask"),
    Case("fused-topk300-chunked-M2-K512", 2, 300, 512, fused="wrap+per-row+addend+mask", triton=True),
    Case("fused-error-mode-nonneg-M64-topk2-K256", 64, 2, 256, perm="nonneg", fused="error+addend"),
    Case("fused-identity-mask-M4-topk3-K96-f16", 4, 3, 96, dtype=F16, index=None, fused="mask+addend"),
]

DTYPE_NAMES = {F32: "float32", F16: "float16", BF16: "bfloat16"}
# half an ulp of each output dtype, its smallest subnormal (the accuracy model of tests/conftest.py)
UNIT_ROUNDOFF = {F32: 2.0 ** -24, F16: 2.0 ** -11, BF16: 2.0 ** -8}
SMALLEST_SUBNORMAL = {F32: 2.0 ** -149, F16: 2.0 ** -24, BF16: 2.0 ** -133}
NEGATIVES = (-1, -1, -1, -2, -7, -(2 ** 31))


def select(backend: str, quick: bool, only: Optional[str] = None) -> List[Case]:
    cases = [c for c in CASES if (not quick or c.quick) and (backend != "triton" or c.triton)]
    if only:
        cases = [c for c in cases if only in c.name]
    return cases


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def make(case: Case, device: str, seed: int):
    """(input, permutation, factors) on `device`, built on CPU from `seed` (no device RNG kernels)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, DTYPE_NAMES[case.dtype])
    m, topk, k = case.m, case.topk, case.k
    n = m * topk
    rows = n if case.index is None else (case.rows if case.rows is not None else max(1, n))

    perm = None
    if case.index is not None:
        if rows == 0 or case.perm == "all-neg":
            perm = -torch.randint(1, 2 ** 31 - 1, (n,), generator=g)
            if n:
                perm[0] = -1
        else:
            perm = torch.randint(0, rows, (n,), generator=g)
            if n >= 2:
                perm[-1] = perm[0]  # a duplicate
            if case.perm != "nonneg" and n >= 3:
                neg = torch.rand(n, generator=g) < 0.2
                neg[1] = True  # a -1
                vals = torch.tensor(NEGATIVES)[torch.randint(0, len(NEGATIVES), (n,), generator=g)]
                vals[1] = -1
                perm = torch.where(neg, vals, perm)
                if case.index == "i64" and n >= 4:
                    perm[2] = -(2 ** 63)
        perm = perm.to(torch.int32 if case.index == "i32" else torch.int64)
        if case.perm == "strided":
            wide = torch.full((2 * n,), 2 ** 30, dtype=perm.dtype)  # out of range if read by mistake
            wide[::2] = perm
            perm = wide[::2]

    vals = torch.randn(rows, k, generator=g, dtype=torch.float64)
    vals = vals * torch.exp2(torch.randint(-4, 4, (rows, 1), generator=g).double())  # ~2.5 decades
    if perm is not None and rows:
        used = torch.zeros(rows, dtype=torch.bool)
        used[perm[perm >= 0].long()] = True
        vals[~used] = float("nan")  # rows no live entry points at: must never be read
    vals = vals.to(dt)
    # Padding around the rows is NaN too: a kernel that reads past a row's K elements shows it.
    if case.layout == "dense":
        x = vals
    elif case.layout == "offset":  # contiguous rows starting one element into the buffer: unaligned
        x = torch.full((rows * k + 1,), float("nan"), dtype=dt)[1:].view(rows, k)
        x.copy_(vals)
    else:
        pad = {"pad8": 8, "odd": 1}[case.layout]
        x = torch.full((rows, k + pad), float("nan"), dtype=dt)[:, :k]
        x.copy_(vals)

    f = (torch.rand(m, topk, generator=g, dtype=torch.float64) * 1.5 - 0.25).to(
        getattr(torch, DTYPE_NAMES[case.fac]))
    if case.factors == "transposed":
        f = f.t().contiguous().t()
    return tuple(None if t is None else _to(t, device) for t in (x, perm, f))


def _to(t, device):
    """Move keeping the layout (a strided view stays a strided view, offsets included)."""
    import torch

    if t.device.type == device:
        return t
    n = t.untyped_storage().nbytes() // t.element_size()
    flat = torch.as_strided(t, (n,), (1,), 0)
    return flat.to(device).as_strided(t.shape, t.stride(), t.storage_offset())


def new_out(case: Case, dtype, device):
    import torch

    m, k = case.m, case.k
    if case.form == "out-padded":
        return torch.full((m, k + 8), float("nan"), dtype=dtype, device=device)[:, :k]
    if case.form == "out-cols":
        return torch.full((m, 2 * k), float("nan"), dtype=dtype, device=device)[:, ::2]
    return torch.full((m, k), float("nan"), dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------------

def check_close(got, x, perm, f, out_code: str, what: str = "") -> float:
    """Raise AssertionError unless `got` is the float64 reference up to float32 accumulation and one
    rounding to the output dtype (the bound of tests/conftest.py). Returns the worst err / bound."""
    import torch
    from fused_moe_ops.reference import shuffle_mul_sum_reference

    m, topk = f.shape
    want_dtype = getattr(torch, DTYPE_NAMES[out_code])
    assert got.dtype == want_dtype, f"{what}: dtype {got.dtype}, expected {want_dtype}"
    assert tuple(got.shape) == (m, x.shape[1]), f"{what}: shape {tuple(got.shape)}, expected {(m, x.shape[1])}"
    if got.numel() == 0:
        return 0.0
    xc, pc, fc = x.cpu(), (None if perm is None else perm.cpu()), f.cpu()
    ref = shuffle_mul_sum_reference(xc, pc, fc, torch.float32, acc_dtype=torch.float64).double()
    mag = shuffle_mul_sum_reference(xc.abs(), pc, fc.abs(), torch.float32, acc_dtype=torch.float64).double()
    g = got.detach().cpu().double()
    assert not torch.isnan(g).any(), (f"{what}: NaN in the output at {torch.isnan(g).nonzero()[0].tolist()} "
                                      "(an unwritten element, or a skipped / unreferenced row was read)")
    acc = (topk + 2) * 2.0 ** -24 * mag
    ref_rounding = 2.0 ** -24 * ref.abs() + SMALLEST_SUBNORMAL[F32]
    bound = acc + ref_rounding + UNIT_ROUNDOFF[out_code] * (ref.abs() + acc + ref_rounding) \
        + SMALLEST_SUBNORMAL[out_code]
    err = (g - ref).abs()
    fmax = torch.finfo(want_dtype).max
    overflow_ok = torch.isinf(g) & (torch.sign(g) == torch.sign(ref)) & (ref.abs() + bound >= fmax)
    bad = ~((err <= bound) | overflow_ok)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements outside the fp32-accumulation bound; first at {idx}: "
            f"got {g[tuple(idx)].item()!r}, float64 reference {ref[tuple(idx)].item()!r}, "
            f"bound {bound[tuple(idx)].item():.3g}")
    return float((err / bound).max())


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------

def run_fused_case(case: Case, backend: str, device: str, seed: int) -> float:
    """The internal op with case.fused's options, against its float64 reference (the same accuracy model)."""
    import torch
    from fused_moe_ops.ops import FACTOR_ROUND, NEGATIVE_IS_ERROR, SKIP_NEGATIVE, WRAP_NEGATIVE
    from fused_moe_ops.reference import shuffle_mul_sum_fused_reference as reference

    opts = set(case.fused.split("+"))
    x, perm, f = make(case, "cpu", seed)
    x = torch.nan_to_num(x, nan=0.5)  # make() poisons unread rows; wrapped negative entries read them
    g = torch.Generator().manual_seed(seed + 1)
    rows = x.shape[0]
    mode = WRAP_NEGATIVE if "wrap" in opts else (NEGATIVE_IS_ERROR if "error" in opts else SKIP_NEGATIVE)
    if perm is not None and mode == WRAP_NEGATIVE:  # wrap mode: negatives in [-R, 0)
        perm = torch.where(perm < 0, -(perm.abs() % rows) - 1, perm).to(perm.dtype) if rows else perm
    if "per-row" in opts:
        f = torch.rand(rows, generator=g)
        perm = perm.view(case.m, case.topk)
    rounding = FACTOR_ROUND[torch.bfloat16] if "round" in opts else 0
    scale = 0.75 if "scale" in opts else 1.0
    addend = None
    if "addend" in opts:
        addend = torch.randn(case.m, case.k, generator=g).to(x.dtype)
    elif "bias" in opts:
        addend = torch.randn(case.k, generator=g)
    mask = None
    if "mask" in opts:
        mask = torch.rand(rows, generator=g) < 0.3
        x = x.clone()
        x[mask] = float("nan")  # a masked row must not leak
    cpu = (x, perm, f, None, mode, rounding, scale, addend, mask)
    ref = reference(x, perm, f, torch.float32, mode, rounding, scale, addend, mask, acc_dtype=torch.float64).double()
    abs_sum = reference(x.abs(), perm, f.abs(), torch.float32, mode, rounding, abs(scale),
                        None if addend is None else addend.abs(), mask, acc_dtype=torch.float64).double()
    args = [_to(t, device) if isinstance(t, torch.Tensor) else t for t in cpu]
    if backend == "triton":
        from fused_moe_ops.triton_kernel import shuffle_mul_sum_fused_triton as fused
    else:
        fused = torch.ops.moe._shuffle_mul_sum_fused
    if device == "cuda":
        torch.full((max(1, case.m * case.k),), float("nan"), dtype=torch.float32, device=device)
    got = fused(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    got = got.cpu().double()
    if got.numel() == 0:
        return 0.0
    assert not torch.isnan(got).any(), f"{backend} {case.name}: NaN in the output (a masked row or poison leaked)"
    u = UNIT_ROUNDOFF[case.out or case.dtype]
    bound = (case.topk + 3) * 2.0 ** -24 * abs_sum + u * (ref.abs() + abs_sum * 2.0 ** -20) + SMALLEST_SUBNORMAL[
        case.out or case.dtype] + 2.0 ** -24 * ref.abs()
    worst = float(((got - ref).abs() / bound).max())
    assert worst <= 1.0, f"{backend} {case.name}: worst err/bound {worst:.3g}"
    return worst


def run_case(case: Case, backend: str, device: str, seed: int) -> float:
    import torch

    if case.fused:
        return run_fused_case(case, backend, device, seed)
    x, perm, f = make(case, device, seed)
    out_code = case.out or case.dtype
    out_dtype = getattr(torch, DTYPE_NAMES[out_code])
    if backend == "triton":
        from fused_moe_ops.triton_kernel import shuffle_mul_sum_triton as functional
        from fused_moe_ops.triton_kernel import shuffle_mul_sum_triton_out as out_form
    else:
        functional = torch.ops.moe.shuffle_mul_sum
        out_form = torch.ops.moe.shuffle_mul_sum.out
    if case.form == "func":
        if device == "cuda":  # NaN bytes where the caching allocator will place the output
            torch.full((max(1, case.m * case.k),), float("nan"), dtype=torch.float32, device=device)
        got = functional(x, perm, f, out_dtype if case.out else None)
    else:
        out = new_out(case, out_dtype, device)
        got = out_form(x, perm, f, out=out)
        assert got.data_ptr() == out.data_ptr(), "the out= form must return out"
        if case.form == "out-padded" and out.numel():
            assert torch.isnan(out._base[:, case.k:].float()).all(), "wrote into out's row padding"
        if case.form == "out-cols" and out.numel():
            assert torch.isnan(out._base[:, 1::2].float()).all(), "wrote between out's columns"
    if device == "cuda":
        torch.cuda.synchronize()  # an asynchronous fault belongs to this case
    return check_close(got, x, perm, f, out_code, what=f"{backend} {case.name}")


def _setup(args) -> List[str]:
    """Environment before fused_moe_ops is imported; returns the backends to run."""
    backends = ["cuda", "triton"] if args.backend == "both" else [args.backend]
    if args.device == "cuda" and "cuda" in backends:
        os.environ.setdefault("FUSED_MOE_OPS_CUDA_BACKEND", "cuda")
    if args.device == "cpu" and "triton" in backends:
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton's @jit decorates: before the import
    if args.device == "cpu":
        os.environ.setdefault("FUSED_MOE_OPS_NO_CUDA", "1")
    os.environ.setdefault("FUSED_MOE_OPS_TRITON_AUTOTUNE", "0")  # no benchmarking under a sanitizer
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return backends


def _unavailable(backend: str, device: str) -> Optional[str]:
    import torch
    from fused_moe_ops import _registry

    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if backend == "cuda":
        active = _registry.ACTIVE.get(device)
        want = "cuda" if device == "cuda" else "cpp"
        if active != want:
            return (f"torch.ops.moe.shuffle_mul_sum on {device} is served by {active!r}, not the native kernel "
                    f"({_registry.FALLBACK_REASONS.get(device, 'no reason recorded')})")
        return None
    try:
        from fused_moe_ops import triton_kernel
    except ImportError as e:
        return f"fused_moe_ops.triton_kernel: {e}"
    return triton_kernel.unavailable_reason()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("cuda", "triton", "both"), default="both")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="a third of the cases, one per code path")
    p.add_argument("--only", default=None, help="cases whose name contains this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    args = p.parse_args(argv)
    if args.list:
        for c in CASES:
            print(f"{c.name:<48} M={c.m:<5} topk={c.topk:<5} K={c.k:<5} {c.dtype}/{c.fac}/{c.out or c.dtype} "
                  f"index={c.index} layout={c.layout} perm={c.perm} form={c.form}"
                  f"{' [triton]' if c.triton else ''}{' [quick]' if c.quick else ''}")
        return 0
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = _setup(args)

    import torch
    import fused_moe_ops  # noqa: F401  (defines and registers the op)

    t0 = time.time()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else None
    print(f"sanitize_kernels: device {args.device}" + (f" ({gpu})" if gpu else "")
          + f", torch {torch.__version__}, backends {','.join(backends)}{' (quick)' if args.quick else ''}", flush=True)
    total = ok = 0
    failed: List[str] = []
    per_backend = {}
    for backend in backends:
        why = _unavailable(backend, args.device)
        if why is not None:
            print(f"sanitize_kernels: backend {backend} cannot run: {why}", flush=True)
            print(f"sanitize_kernels: 0/0 cases ok (backend {backend} unavailable)")
            return 2
        cases = select(backend, args.quick, args.only)
        if not cases:
            print(f"sanitize_kernels: 0/0 cases ok (no {backend} case matches --only {args.only!r})")
            return 2
        n_ok = 0
        for i, case in enumerate(cases):
            total += 1
            t = time.time()
            try:
                worst = run_case(case, backend, args.device, seed=args.seed * 1000 + i)
            except Exception as e:  # noqa: BLE001 - a failed case is reported and the run goes on
                failed.append(f"{backend}:{case.name}")
                msg = "".join(traceback.format_exception_only(type(e), e)).strip()
                print(f"FAIL {backend:<6} {case.name:<48} {msg[:600]}", flush=True)
                if device_is_dead(args.device, e):
                    print("sanitize_kernels: the CUDA context is unusable after that error; stopping", flush=True)
                    break
                continue
            ok += 1
            n_ok += 1
            print(f"ok   {backend:<6} {case.name:<48} err/bound {worst:.2f}  {time.time() - t:.2f}s", flush=True)
        per_backend[backend] = f"{backend} {n_ok}/{len(cases)}"
    summary = (f"sanitize_kernels: {ok}/{total} cases ok ({', '.join(per_backend.values())}) "
               f"in {time.time() - t0:.1f}s")
    if failed:
        summary += "; FAILED: " + ", ".join(failed)
    print(summary, flush=True)
    return 0 if ok == total else 1


def device_is_dead(device: str, e: Exception) -> bool:
    if device != "cuda":
        return False
    text = str(e)
    return any(s in text for s in ("device-side assert", "illegal memory access", "misaligned address",
                                   "unspecified launch failure", "CUDA error: an illegal"))


if __name__ == "__main__":
    sys.exit(main())
