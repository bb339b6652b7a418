"""``moe::shuffle_mul_sum`` and ``moe::scatter_mul_sum``: schemas, argument checks, fake (meta)
implementations, typed wrappers.

This file is the single place where the operator is *defined*. Kernels only *implement* it:
``csrc/shuffle_mul_sum_cpu.cpp`` and ``csrc/shuffle_mul_sum_cuda.cu`` register with
``TORCH_LIBRARY_IMPL(moe, CPU|CUDA, m)``; ``fused_moe_ops.triton_kernel`` and
``fused_moe_ops.reference`` are registered from Python when a native build is missing
(see ``fused_moe_ops._registry``). Defining the schema here, not in C++, is what lets the
package import and the op run (on the reference) on a machine that cannot compile anything.

What it computes (the MoE combine step, one pass over memory)::

    out[i, :] = sum_{j < topk, p = permutation[i*topk + j], p >= 0} factors[i, j] * input[p, :]

accumulated in float32 and rounded once to ``out_dtype``. Negative permutation entries mean
"no contribution" (dropped token, expert on another rank): a skipped slot adds nothing and its
factor is never read, so a NaN/inf factor there has no effect. An entry >= R is an error.

The scatter form, for a destination index that nothing proves to be a permutation (any index eager's
``scatter_add`` / ``index_add`` / ``index_put(accumulate=True)`` accepts: duplicates, uneven counts,
tokens that receive nothing)::

    out[t, :] = sum_{r < R, index[r] = t} factors[r] * input[r, :]        t < num_tokens

accumulated in float32, a token's rows summed in increasing r (deterministic: no atomics whose order
changes the result), rounded once. A token no row reaches gets zeros. Negative entries contribute
nothing (dropped rows, rows of another rank; their factor is never read); an entry >= num_tokens is an
error. ``factors=None``: rows already weighted (factor 1).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

NAMESPACE = "moe"
OP_NAME = "shuffle_mul_sum"
QUALNAME = f"{NAMESPACE}::{OP_NAME}"

FUNCTIONAL_SCHEMA = (
    "shuffle_mul_sum(Tensor input, Tensor? permutation, Tensor factors, "
    "ScalarType? out_dtype=None) -> Tensor"
)
OUT_SCHEMA = (
    "shuffle_mul_sum.out(Tensor input, Tensor? permutation, Tensor factors, *, "
    "Tensor(a!) out) -> Tensor(a!)"
)

# The internal op the fusion pass emits (not public API: its schema may change with the pass). It is
# the public op plus the facts that would otherwise need a kernel of their own around the call, so
# that a rewritten graph launches exactly one kernel for the combine and its consumer:
#   negative_index  0: skip negative entries (the public op); 1: wrap them as x[idx] does
#                   (-R <= p < 0 reads row p + R, p < -R is an error); 2: every negative entry is an
#                   error (x.index_select(0, idx))
#   factor_round    0: none; 1 / 2: round each factor to float16 / bfloat16 first (w.to(dtype)).
#                   An int, not a ScalarType: AOTInductor < 2.12 misreads ScalarType arguments of
#                   custom ops (pytorch#169157)
#   factors         (M, topk) per slot, or (R,) per input row: slot (i, j) uses factors[p] for its
#                   (wrapped) row p (weights applied before the gather); then permutation is (M, topk)
#   scale, addend   out = scale * sum + addend, in float32, rounded once; addend broadcastable to
#                   (M, K), or with more than 2 dims M*K elements in (M, K) order; any float dtype
#   row_mask        bool (R,): a row whose entry is true reads as zeros, whatever it holds (a row
#                   masked to zero before the combine, as HF transformers masks its sentinel rows):
#                   its slots add 0 * factor, which is 0, or NaN for a NaN/inf (rounded) factor,
#                   exactly as eager's ``x.masked_fill(mask, 0)[idx] * w`` gives
# A 2-D permutation must be (M, topk); it is read row-major.
FUSED_OP_NAME = "_shuffle_mul_sum_fused"
FUSED_SCHEMA = (
    f"{FUSED_OP_NAME}(Tensor input, Tensor? permutation, Tensor factors, ScalarType? out_dtype=None, "
    "int negative_index=0, int factor_round=0, float scale=1.0, Tensor? addend=None, Tensor? row_mask=None) -> Tensor"
)
SKIP_NEGATIVE, WRAP_NEGATIVE, NEGATIVE_IS_ERROR = 0, 1, 2

# The scatter form (module docstring). Public: functional only (an ``out=`` form would have to say
# whether it overwrites or accumulates; neither is what a caller of scatter_add_ could assume).
SCATTER_OP_NAME = "scatter_mul_sum"
SCATTER_SCHEMA = (
    f"{SCATTER_OP_NAME}(Tensor input, Tensor index, Tensor? factors, SymInt num_tokens, "
    "ScalarType? out_dtype=None) -> Tensor"
)
# Its internal twin the fusion pass emits (not public API), with the facts of the spellings it replaces:
#   negative_index  0: skip negative entries (the public op); 1: wrap them as index_put does
#                   (-M <= t < 0 is token t + M, t < -M an error); 2: every negative entry is an error
#                   (scatter_add, index_add)
#   factor_round    as the gather form's: round each factor to float16 / bfloat16 first
#   scale, addend   out = scale * sum + addend, in float32, rounded once; addend as the gather form's
#                   (the destination of ``dest.scatter_add(...)`` when it is not zeros)
SCATTER_FUSED_OP_NAME = "_scatter_mul_sum_fused"
SCATTER_FUSED_SCHEMA = (
    f"{SCATTER_FUSED_OP_NAME}(Tensor input, Tensor index, Tensor? factors, SymInt num_tokens, "
    "ScalarType? out_dtype=None, int negative_index=0, int factor_round=0, float scale=1.0, "
    "Tensor? addend=None) -> Tensor"
)
FACTOR_ROUND = {None: 0, torch.float16: 1, torch.bfloat16: 2}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

# The library object must stay alive for the definitions to stay registered.
_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define(FUNCTIONAL_SCHEMA)
# torch.Tag.out (torch >= 2.12) tells functionalization that `out` is a write-only buffer, so
# torch.compile / torch.export can auto-functionalize the .out overload despite its aliasing
# return. Older torch has no such tag: there .out works in eager code only.
OUT_IS_FUNCTIONALIZABLE = hasattr(torch.Tag, "out")
_lib.define(OUT_SCHEMA, tags=(torch.Tag.out,) if OUT_IS_FUNCTIONALIZABLE else ())
_lib.define(FUSED_SCHEMA)
_lib.define(SCATTER_SCHEMA)
_lib.define(SCATTER_FUSED_SCHEMA)


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_defined(name: str, t: Optional[Tensor], expected: str) -> None:
    """A ``Tensor`` (not ``Tensor?``) argument given as None: the dispatcher passes it on (as None to a
    Python kernel, as an undefined tensor to a C++ one), so every kernel and the fake name it here,
    before reading it. Same message as csrc/shuffle_mul_sum.h's boxed::required."""
    torch._check(t is not None, lambda: f"moe::shuffle_mul_sum: {name} must be a tensor {expected}, got None")


def check_args(
    input: Tensor, permutation: Optional[Tensor], factors: Tensor, out_dtype: Optional[torch.dtype]
) -> tuple:
    """Validate the arguments; return (M, topk, K). Works on real, fake and meta tensors.

    The C++ kernels run the same checks with the same messages (csrc/shuffle_mul_sum.h);
    tests/test_errors.py holds both to it.
    """
    p = "moe::shuffle_mul_sum: "
    check_defined("input", input, "(R, K)")
    check_defined("factors", factors, "(M, topk)")
    torch._check(
        input.dim() == 2,
        lambda: f"{p}input must be a 2-D tensor (R, K), got {input.dim()}-D with shape {tuple(input.shape)}",
    )
    torch._check(
        input.dtype in FLOAT_DTYPES,
        lambda: f"{p}input must have dtype {_names(FLOAT_DTYPES)}, got {input.dtype}",
    )
    torch._check(
        factors.dim() == 2,
        lambda: f"{p}factors must be a 2-D tensor (M, topk), got {factors.dim()}-D with shape {tuple(factors.shape)}",
    )
    torch._check(
        factors.dtype in FLOAT_DTYPES,
        lambda: f"{p}factors must have dtype {_names(FLOAT_DTYPES)}, got {factors.dtype}",
    )
    torch._check(
        factors.device == input.device,
        lambda: f"{p}factors must be on the same device as input ({input.device}), got {factors.device}",
    )
    rows, k = input.shape
    m, topk = factors.shape
    if permutation is None:
        torch._check(
            rows == m * topk,
            lambda: f"{p}permutation=None (identity) needs input.shape[0] == M*topk = {m}*{topk} = {m * topk}, "
            f"got input.shape[0] = {rows}",
        )
    else:
        torch._check(
            permutation.dtype in INDEX_DTYPES,
            lambda: f"{p}permutation must have dtype int32 or int64, got {permutation.dtype}",
        )
        torch._check(
            permutation.dim() == 1,
            lambda: f"{p}permutation must be a 1-D tensor (M*topk,), got {permutation.dim()}-D with shape "
            f"{tuple(permutation.shape)}",
        )
        torch._check(
            permutation.device == input.device,
            lambda: f"{p}permutation must be on the same device as input ({input.device}), got {permutation.device}",
        )
        torch._check(
            permutation.shape[0] == m * topk,
            lambda: f"{p}permutation must have M*topk = {m}*{topk} = {m * topk} entries (factors is {m}x{topk}), "
            f"got {permutation.shape[0]}",
        )
    if out_dtype is not None:
        torch._check(
            out_dtype in FLOAT_DTYPES,
            lambda: f"{p}out_dtype must be one of {_names(FLOAT_DTYPES)} or None, got {out_dtype}",
        )
    return m, topk, k


def check_out(out: Tensor, input: Tensor, m, k) -> None:
    p = "moe::shuffle_mul_sum: "
    check_defined("out", out, "(M, K)")
    torch._check(
        out.dim() == 2 and out.shape[0] == m and out.shape[1] == k,
        lambda: f"{p}out must have shape (M, K) = ({m}, {k}), got {tuple(out.shape)}",
    )
    torch._check(
        out.dtype in FLOAT_DTYPES,
        lambda: f"{p}out must have dtype {_names(FLOAT_DTYPES)}, got {out.dtype}",
    )
    torch._check(
        out.device == input.device,
        lambda: f"{p}out must be on the same device as input ({input.device}), got {out.device}",
    )


def check_out_no_overlap(out: Tensor, *others: Optional[Tensor]) -> None:
    """``out`` must not overlap itself nor any of ``others``: writing into memory the op also reads
    would be a silent wrong answer. Same rule and messages as csrc/shuffle_mul_sum.h's check_out.
    Address spans: conservative, never wrong. On fake tensors (torch.compile, where ``out`` is
    functionalized into a fresh buffer before any kernel runs) the spans are compared within a shared
    storage, so the compiled call raises exactly where the eager one does."""
    if torch._debug_has_internal_overlap(out) == 1:
        raise RuntimeError(
            "moe::shuffle_mul_sum: out must not have elements that share memory (e.g. an expand()ed tensor)"
        )
    for other in others:
        if other is not None and other.numel() and out.numel() and _spans_overlap(out, other):
            raise RuntimeError("moe::shuffle_mul_sum: out must not share memory with input, permutation or factors")


def _spans_overlap(a: Tensor, b: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(a) or is_fake(b) or a.device.type == "meta":
        from torch.multiprocessing.reductions import StorageWeakRef

        if StorageWeakRef(a.untyped_storage()) != StorageWeakRef(b.untyped_storage()):
            return False
        start = lambda t: t.storage_offset() * t.element_size()  # noqa: E731
    else:
        start = lambda t: t.data_ptr()  # noqa: E731

    def span(t: Tensor):
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
        return start(t), start(t) + extent * t.element_size()

    a0, a1 = span(a)
    b0, b1 = span(b)
    return a0 < b1 and b0 < a1


def addend_fits(addend: Tensor, m, k) -> bool:
    """Broadcastable to (M, K), or, with more than two dimensions, M*K elements in row-major (M, K)
    order (the residual of ``out.view(b, s, h) + r``). Same rule as csrc/shuffle_mul_sum.h."""
    if addend.dim() > 2:
        return addend.shape[-1] == k and addend.numel() == m * k
    return all(size == 1 or size == want for size, want in zip(reversed(addend.shape), (k, m)))


def addend_as_rows(addend: Tensor, m, k) -> Tensor:
    return addend.reshape(m, k) if addend.dim() > 2 else addend.expand(m, k)


def check_fused_args(input: Tensor, permutation: Optional[Tensor], factors: Tensor, out_dtype: Optional[torch.dtype],
                     negative_index: int, factor_round: int, addend: Optional[Tensor],
                     row_mask: Optional[Tensor] = None) -> tuple:
    """Validate the internal op's arguments; return (M, topk, K). Same rules and messages as
    csrc/shuffle_mul_sum.h's check_fused_args."""
    p = "moe::shuffle_mul_sum: "
    check_defined("input", input, "(R, K)")
    check_defined("factors", factors, "(M, topk) or (R,)")
    torch._check(negative_index in (SKIP_NEGATIVE, WRAP_NEGATIVE, NEGATIVE_IS_ERROR),
                 lambda: f"{p}negative_index must be 0 (skip), 1 (wrap) or 2 (error), got {negative_index}")
    torch._check(factor_round in FACTOR_ROUND.values(),
                 lambda: f"{p}factor_round must be 0 (none), 1 (float16) or 2 (bfloat16), got {factor_round}")
    if factors.dim() != 1:
        if permutation is not None and permutation.dim() == 2:
            torch._check(tuple(permutation.shape) == tuple(factors.shape),
                         lambda: f"{p}a 2-D permutation must have the factors' shape (M, topk) = "
                         f"{tuple(factors.shape)}, got {tuple(permutation.shape)}")
            permutation = permutation.reshape(-1)
        m, topk, k = check_args(input, permutation, factors, out_dtype)
    else:
        torch._check(permutation is not None and permutation.dim() == 2,
                     lambda: f"{p}per-row factors need the permutation as a 2-D (M, topk) tensor")
        torch._check(factors.shape[0] == input.shape[0],
                     lambda: f"{p}per-row factors must be a 1-D tensor of input.shape[0] = {input.shape[0]} "
                     f"entries, got shape {tuple(factors.shape)}")
        like = factors.new_empty(()).expand(permutation.shape[0], permutation.shape[1])
        m, topk, k = check_args(input, permutation.reshape(-1), like, out_dtype)
    if addend is not None:
        torch._check(addend_fits(addend, m, k),
                     lambda: f"{p}addend must broadcast to (M, K) = ({m}, {k}) or, with more than 2 dimensions, "
                     f"hold M*K elements with last dimension K, got {tuple(addend.shape)}")
        torch._check(addend.dtype in FLOAT_DTYPES,
                     lambda: f"{p}addend must have dtype {_names(FLOAT_DTYPES)}, got {addend.dtype}")
        torch._check(addend.device == input.device,
                     lambda: f"{p}addend must be on the same device as input ({input.device}), got {addend.device}")
    if row_mask is not None:
        torch._check(row_mask.dtype == torch.bool and row_mask.dim() == 1 and row_mask.shape[0] == input.shape[0],
                     lambda: f"{p}row_mask must be a 1-D bool tensor of input.shape[0] = {input.shape[0]} entries, "
                     f"got {row_mask.dtype} of shape {tuple(row_mask.shape)}")
        torch._check(row_mask.device == input.device,
                     lambda: f"{p}row_mask must be on the same device as input ({input.device}), got {row_mask.device}")
    return m, topk, k


@torch.library.register_fake(f"{NAMESPACE}::{FUSED_OP_NAME}")
def _shuffle_mul_sum_fused_fake(input, permutation, factors, out_dtype=None, negative_index=0, factor_round=0,
                                scale=1.0, addend=None, row_mask=None):
    m, _, k = check_fused_args(input, permutation, factors, out_dtype, negative_index, factor_round, addend, row_mask)
    return input.new_empty((m, k), dtype=out_dtype if out_dtype is not None else input.dtype)


@torch.library.register_fake(QUALNAME)
def _shuffle_mul_sum_fake(input, permutation, factors, out_dtype=None):
    m, _, k = check_args(input, permutation, factors, out_dtype)
    return input.new_empty((m, k), dtype=out_dtype if out_dtype is not None else input.dtype)


@torch.library.register_fake(f"{QUALNAME}.out")
def _shuffle_mul_sum_out_fake(input, permutation, factors, *, out):
    m, _, k = check_args(input, permutation, factors, None)
    check_out(out, input, m, k)
    check_out_no_overlap(out, input, permutation, factors)
    return out



def check_scatter_args(input: Tensor, index: Tensor, factors: Optional[Tensor], num_tokens,
                       out_dtype: Optional[torch.dtype]) -> tuple:
    """Validate the scatter form's arguments; return (R, M, K). Works on real, fake and meta tensors.
    The C++ kernels run the same checks with the same messages (csrc/shuffle_mul_sum.h)."""
    p = "moe::scatter_mul_sum: "
    torch._check(input is not None, lambda: f"{p}input must be a tensor (R, K), got None")
    torch._check(index is not None, lambda: f"{p}index must be a tensor (R,), got None")
    torch._check(
        input.dim() == 2,
        lambda: f"{p}input must be a 2-D tensor (R, K), got {input.dim()}-D with shape {tuple(input.shape)}",
    )
    torch._check(input.dtype in FLOAT_DTYPES,
                 lambda: f"{p}input must have dtype {_names(FLOAT_DTYPES)}, got {input.dtype}")
    rows, k = input.shape
    torch._check(index.dtype in INDEX_DTYPES, lambda: f"{p}index must have dtype int32 or int64, got {index.dtype}")
    torch._check(
        index.dim() == 1 and index.shape[0] == rows,
        lambda: f"{p}index must be a 1-D tensor of input.shape[0] = {rows} entries (R,), got shape "
        f"{tuple(index.shape)}",
    )
    torch._check(index.device == input.device,
                 lambda: f"{p}index must be on the same device as input ({input.device}), got {index.device}")
    if factors is not None:
        torch._check(
            factors.dim() == 1 and factors.shape[0] == rows,
            lambda: f"{p}factors must be a 1-D tensor of input.shape[0] = {rows} entries (R,) or None, got shape "
            f"{tuple(factors.shape)}",
        )
        torch._check(factors.dtype in FLOAT_DTYPES,
                     lambda: f"{p}factors must have dtype {_names(FLOAT_DTYPES)}, got {factors.dtype}")
        torch._check(factors.device == input.device,
                     lambda: f"{p}factors must be on the same device as input ({input.device}), got {factors.device}")
    torch._check(num_tokens >= 0, lambda: f"{p}num_tokens must be >= 0, got {num_tokens}")
    if out_dtype is not None:
        torch._check(out_dtype in FLOAT_DTYPES,
                     lambda: f"{p}out_dtype must be one of {_names(FLOAT_DTYPES)} or None, got {out_dtype}")
    return rows, num_tokens, k


def check_scatter_fused_args(input: Tensor, index: Tensor, factors: Optional[Tensor], num_tokens,
                             out_dtype: Optional[torch.dtype], negative_index: int, factor_round: int,
                             addend: Optional[Tensor]) -> tuple:
    """Validate the internal scatter op's arguments; return (R, M, K)."""
    p = "moe::scatter_mul_sum: "
    torch._check(negative_index in (SKIP_NEGATIVE, WRAP_NEGATIVE, NEGATIVE_IS_ERROR),
                 lambda: f"{p}negative_index must be 0 (skip), 1 (wrap) or 2 (error), got {negative_index}")
    torch._check(factor_round in FACTOR_ROUND.values(),
                 lambda: f"{p}factor_round must be 0 (none), 1 (float16) or 2 (bfloat16), got {factor_round}")
    rows, m, k = check_scatter_args(input, index, factors, num_tokens, out_dtype)
    if addend is not None:
        torch._check(addend_fits(addend, m, k),
                     lambda: f"{p}addend must broadcast to (M, K) = ({m}, {k}) or, with more than 2 dimensions, "
                     f"hold M*K elements with last dimension K, got {tuple(addend.shape)}")
        torch._check(addend.dtype in FLOAT_DTYPES,
                     lambda: f"{p}addend must have dtype {_names(FLOAT_DTYPES)}, got {addend.dtype}")
        torch._check(addend.device == input.device,
                     lambda: f"{p}addend must be on the same device as input ({input.device}), got {addend.device}")
    return rows, m, k


@torch.library.register_fake(f"{NAMESPACE}::{SCATTER_OP_NAME}")
def _scatter_mul_sum_fake(input, index, factors, num_tokens, out_dtype=None):
    _, m, k = check_scatter_args(input, index, factors, num_tokens, out_dtype)
    return input.new_empty((m, k), dtype=out_dtype if out_dtype is not None else input.dtype)


@torch.library.register_fake(f"{NAMESPACE}::{SCATTER_FUSED_OP_NAME}")
def _scatter_mul_sum_fused_fake(input, index, factors, num_tokens, out_dtype=None, negative_index=0,
                                factor_round=0, scale=1.0, addend=None):
    _, m, k = check_scatter_fused_args(input, index, factors, num_tokens, out_dtype, negative_index,
                                       factor_round, addend)
    return input.new_empty((m, k), dtype=out_dtype if out_dtype is not None else input.dtype)


def scatter_mul_sum(
    input: Tensor,
    index: Tensor,
    factors: Optional[Tensor],
    num_tokens: int,
    *,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Scatter each row of ``input`` to its token ``index[r]``, scaled by ``factors[r]``, and sum per token.

    Shapes:
        input:      (R, K)   float32 / float16 / bfloat16 (expert outputs in any order)
        index:      (R,)     int32 / int64: the token each row belongs to, any index (duplicates, uneven
                             counts, tokens without rows); negative entries contribute nothing
        factors:    (R,)     float32 / float16 / bfloat16 (router weight of each row), or None (1)
        num_tokens: M        the rows of the result
        returns:    (M, K)   dtype ``out_dtype`` (default: input.dtype)

    Equivalent to (for entries in [0, M))::

        torch.zeros(M, K).index_add_(0, index, input.float() * factors.float()[:, None]).to(out_dtype)

    with one rounding at the end, each token's rows added in increasing r (deterministic on every
    device). An entry >= M is an error. No autograd formula: backward raises.
    """
    return torch.ops.moe.scatter_mul_sum(input, index, factors, num_tokens, out_dtype)


def shuffle_mul_sum(
    input: Tensor,
    permutation: Optional[Tensor],
    factors: Tensor,
    *,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[Tensor] = None,
) -> Tensor:
    """Gather rows of ``input`` by ``permutation``, scale by ``factors`` and sum over top-k.

    Shapes:
        input:       (R, K)        float32 / float16 / bfloat16; rows may be strided (row stride >= K)
        permutation: (M*topk,)     int32 / int64, or None for the identity (then R == M*topk);
                                   entry ``i*topk + j`` is the row of ``input`` holding token i's
                                   j-th expert output; negative entries contribute nothing
                                   (their factors are not read: NaN/inf there has no effect)
        factors:     (M, topk)     float32 / float16 / bfloat16 (router weights)
        returns:     (M, K)        dtype ``out_dtype`` (default: input.dtype), or ``out``

    Equivalent to (for non-negative permutation entries)::

        (input[permutation].view(M, topk, K).float() * factors.view(M, topk, 1).float()).sum(1).to(out_dtype)

    with one rounding at the end. No autograd formula: backward raises.
    """
    if out is not None:
        if out_dtype is not None and out_dtype != out.dtype:
            raise ValueError(
                f"moe::shuffle_mul_sum: out_dtype={out_dtype} disagrees with out.dtype={out.dtype}; pass one of them"
            )
        return torch.ops.moe.shuffle_mul_sum.out(input, permutation, factors, out=out)
    return torch.ops.moe.shuffle_mul_sum(input, permutation, factors, out_dtype)
