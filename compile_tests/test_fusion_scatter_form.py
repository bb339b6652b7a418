"""The scatter-add combine with a token index nothing proves (a graph input: the routing ran in another
graph) is rewritten into the scatter form of the op, ``moe._scatter_mul_sum_fused``
(fusion/scatter_mul_sum.py), and every way Inductor can lower it gives eager's result: the op's kernel
and its decomposition (fusion/decompositions.py, ``scatter_rows_sum``), each forced, static and dynamic.

Inputs: a random index with duplicates, a token no row reaches, -1 and -m where the spelling takes
them (index_put wraps them; scatter_add and index_add refuse them in eager), a NaN row and an inf
weight; results against eager (dtype, shape, NaN positions) and the float64 reference (tolerance of
one rounding of the result dtype: a 16-bit accumulator would miss it with ~10 rows per token).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import fused_moe_ops
from fused_moe_ops.fusion import autotune
from fusion_cases import DTYPES, TOPK, route

M, K = 6, 16
ROWS_PER_TOKEN = 10
# one rounding of the result, relative: the op accumulates in float32 and rounds once
_ONE_ROUNDING = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
# eager rounds each product and, in a 16-bit destination, each add
_EAGER_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 8e-2}


# ---- the spellings (y: rows (n, k); tok: (n,) token index; w: (n,) router weights; dest: (m, k))


def megatron_scatter_add(y, tok, w, dest):  # Megatron-LM moe_utils.unpermute
    hidden = dest.shape[1]
    output_tokens = torch.zeros(dest.shape, dtype=y.dtype)
    output_tokens.scatter_add_(0, tok.unsqueeze(1).expand(-1, hidden), y * w.unsqueeze(-1))
    return output_tokens


def scatter_add_into_dest_unweighted(y, tok, w, dest):
    return dest.scatter_add(0, tok.view(-1, 1).expand(-1, y.shape[1]), y)


def index_add_alpha(y, tok, w, dest):
    return torch.zeros_like(dest).index_add(0, tok, y * w[:, None], alpha=0.5)


def index_add_into_dest(y, tok, w, dest):
    return dest.index_add(0, tok, y * w[:, None])


def index_put_rounded_weights(y, tok, w, dest):  # fp16-rounded weights promote the product to float32
    src = y * w.to(torch.float16)[:, None]
    return torch.zeros(dest.shape, dtype=src.dtype).index_put_((tok,), src, accumulate=True)


def index_put_into_dest_unweighted(y, tok, w, dest):
    return dest.clone().index_put_((tok,), y, accumulate=True)


# (spelling, dtype, negative entries taken, scale, weights rounded to, dest is the addend, weighted)
SPELLINGS = {
    "megatron_scatter_add": (megatron_scatter_add, torch.float32, False, 1.0, None, False, True),
    "scatter_add_into_dest_unweighted": (scatter_add_into_dest_unweighted, torch.bfloat16, False, 1.0, None, True,
                                         False),
    "index_add_alpha": (index_add_alpha, torch.float16, False, 0.5, None, False, True),
    "index_add_into_dest": (index_add_into_dest, torch.bfloat16, False, 1.0, None, True, True),
    "index_put_rounded_weights": (index_put_rounded_weights, torch.bfloat16, True, 1.0, torch.float16, False, True),
    "index_put_into_dest_unweighted": (index_put_into_dest_unweighted, torch.float32, True, 1.0, None, True, False),
}


def _inputs(m, dtype, negative, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = m * ROWS_PER_TOKEN
    tok = torch.randint(1, m, (n,), generator=gen)  # token 0 receives no row; duplicates everywhere
    if negative:
        tok[3], tok[7] = -1, -m  # index_put: token m - 1 and token 0 (wrapped)
    y = torch.randn(n, K, generator=gen).to(dtype)
    y[5] = float("nan")
    w = (torch.rand(n, generator=gen) + 0.1).to(dtype)
    w[11] = float("inf")
    dest = torch.randn(m, K, generator=gen).to(dtype)
    return y, tok, w, dest


def _reference(y, tok, w, dest, scale, rounding, addend, weighted):
    """float64 eager of the semantics: dest? + scale * sum of the (weighted) rows per (wrapped) token."""
    m = dest.shape[0]
    t = torch.where(tok < 0, tok + m, tok)
    rows = y.double()
    if weighted:
        f = w.to(rounding) if rounding is not None else w
        rows = rows * f.double()[:, None]
    total = torch.zeros(m, y.shape[1], dtype=torch.float64).index_add_(0, t, rows) * scale
    return total + dest.double() if addend else total


def _check(out, eager, ref, what):
    assert out.dtype == eager.dtype and out.shape == eager.shape, what
    assert torch.equal(out.isnan(), eager.isnan()), what
    assert torch.equal(out.isinf(), eager.isinf()), what
    finite = ~(eager.isnan() | eager.isinf())
    scale = max(1.0, float(ref[finite].abs().max()))
    torch.testing.assert_close(out[finite], eager[finite], atol=_EAGER_TOL[out.dtype] * scale, rtol=0, msg=what)
    torch.testing.assert_close(out[finite].double(), ref[finite], atol=1e-6 * scale,
                               rtol=_ONE_ROUNDING[out.dtype], msg=what)


@contextlib.contextmanager
def _lowered_as(lowering):
    torch._dynamo.reset()
    autotune_was = fused_moe_ops.fusion.set_autotune(True)
    try:
        with autotune.forced_lowering(lowering):
            yield
    finally:
        fused_moe_ops.fusion.set_autotune(autotune_was)


LOWERED = {"op": "scatter_op", "unrolled": "scatter_decomposition"}


def _cross_product():
    """Every spelling under each lowering, static and dynamic; the fast set (not marked slow) has each
    spelling once, each lowering and each of static / dynamic three times."""
    params = []
    for i, name in enumerate(SPELLINGS):
        fast = (("op", "unrolled")[i % 2], (False, True)[(i // 2) % 2])
        for lowering in ("op", "unrolled"):
            for dynamic in (False, True):
                marks = () if (lowering, dynamic) == fast else (pytest.mark.slow,)
                params.append(pytest.param(name, lowering, dynamic, marks=marks, id=f"{name}-"
                              f"{'forced-op' if lowering == 'op' else 'forced-decomposition'}-"
                              f"{'dynamic' if dynamic else 'static'}"))
    return params


@pytest.mark.parametrize("name, lowering, dynamic", _cross_product())
def test_any_index_rewritten_into_the_scatter_form(name, lowering, dynamic):
    fn, dtype, negative, scale, rounding, addend, weighted = SPELLINGS[name]
    fused_moe_ops.reset_fusion_stats()
    with _lowered_as(lowering):
        compiled = torch.compile(fn, dynamic=dynamic)
        for m in ((M, M + 3) if dynamic else (M,)):
            y, tok, w, dest = _inputs(m, dtype, negative, seed=m)
            dest_before = dest.clone()
            out = compiled(y, tok, w, dest)
            assert torch.equal(dest, dest_before), "a caller tensor changed"
            eager = fn(y, tok, w, dest_before.clone())
            _check(out, eager, _reference(y, tok, w, dest_before, scale, rounding, addend, weighted),
                   f"{name} m={m} lowered {lowering}")
    stats = fused_moe_ops.fusion_stats()
    assert stats["by_pattern"] == {"scatter_mul_sum": 1}, stats
    assert stats["lowered"] == {LOWERED[lowering]: 1}, stats


# ---- errors: every entry eager refuses is refused, under each lowering


def _outcome(fn, *args):
    try:
        return fn(*args), None
    except Exception as e:  # noqa: BLE001 - compared with eager's
        return None, e


ENTRIES = [-1, -M, -M - 1, M, 2 * M + 1, 2 ** 63 - 1, -(2 ** 63)]


def _error_cases():
    params = []
    for name in ("megatron_scatter_add", "index_add_into_dest", "index_put_into_dest_unweighted"):
        for lowering, lid in (("op", "forced-op"), ("unrolled", "forced-decomposition"), (None, "inductor-chooses")):
            fast = name == "megatron_scatter_add" or lowering == "unrolled"
            params.append(pytest.param(name, lowering, marks=() if fast else (pytest.mark.slow,), id=f"{name}-{lid}"))
    return params


@pytest.mark.parametrize("name, lowering", _error_cases())
def test_every_entry_raises_where_eager_raises(name, lowering):
    """Each entry planted in turn (one compile): raises where eager raises (IndexError from the op,
    RuntimeError from a scatter), eager's value where eager returns. index_add is the exception eager
    itself makes: where Inductor decomposes it into index_put (a zeros destination), a negative entry
    -m <= t < 0 wraps, with or without the pass; there the compiled call raises or gives the wrapped
    result."""
    fn, dtype, _, scale, rounding, addend, weighted = SPELLINGS[name]
    y, tok, w, dest = _inputs(M, dtype, negative=False)
    with _lowered_as(lowering):
        compiled = torch.compile(fn)
        for entry in ENTRIES:
            t = tok.clone()
            t[2] = entry
            got, error = _outcome(compiled, y, t, w, dest.clone())
            e_value, e_error = _outcome(fn, y, t, w, dest.clone())
            what = f"{name} entry {entry} lowered {lowering}"
            if e_error is not None and name == "index_add_into_dest" and -M <= entry < 0 and error is None:
                e_value = _reference(y, t, w, dest, scale, rounding, addend, weighted).to(dtype)
            elif e_error is not None:
                assert error is not None, f"{what}: eager raised {e_error!r}, compiled returned"
                assert isinstance(error, (IndexError, RuntimeError)), f"{what}: {error!r}"
                continue
            assert error is None, f"{what}: eager returned, compiled raised {error!r}"
            _check(got, e_value, _reference(y, t, w, dest, scale, rounding, addend, weighted), what)
    stats = fused_moe_ops.fusion_stats()
    assert stats["by_pattern"] == {"scatter_mul_sum": 1}, stats
    if lowering is None:  # a decode-sized CPU combine: the decomposition, without a benchmark
        assert stats["lowered"] == {"scatter_decomposition": 1}, stats


def test_scatter_choice_rule():
    """policy.scatter_choice: the decomposition wherever the op is not shown faster (no native kernel, a
    symbolic size, a CPU decode size), else a benchmark (None)."""
    from fused_moe_ops.fusion import policy

    big = policy.CPU_NO_BENCHMARK_ELEMENTS
    assert policy.scatter_choice("cpu", 4096, 8192, 2048, torch.bfloat16, native_kernel=False) == "decomposition"
    assert policy.scatter_choice("cuda", 4096, 8192, 2048, torch.bfloat16, native_kernel=False) == "decomposition"
    assert policy.scatter_choice("cpu", None, 8192, 2048, torch.bfloat16, native_kernel=True) == "decomposition"
    assert policy.scatter_choice("cpu", 16, 8, big // 8, torch.bfloat16, native_kernel=True) == "decomposition"
    assert policy.scatter_choice("cpu", 16, 8, big // 8 + 1, torch.bfloat16, native_kernel=True) is None
    assert policy.scatter_choice("cuda", 16, 8, 16, torch.bfloat16, native_kernel=True) is None


def test_scatter_add_out_of_range_raises_at_a_parallel_size():
    """At a size Inductor runs in parallel, its own accumulating index_put kernel checks the range
    inside the parallel loop, where a failed check aborts the process. The decomposition of a
    scatter_add scatters with scatter_add, as the user's line does: ATen's kernel on a CPU with
    threads, a clean RuntimeError."""
    fn = SPELLINGS["megatron_scatter_add"][0]
    gen = torch.Generator().manual_seed(3)
    m, n, k = 256, 512, 512
    y, w, dest = torch.randn(n, k, generator=gen), torch.rand(n, generator=gen), torch.randn(m, k, generator=gen)
    tok = torch.randint(0, m, (n,), generator=gen)
    tok[100] = m
    with _lowered_as("unrolled"):
        with pytest.raises((IndexError, RuntimeError)):
            torch.compile(fn)(y, tok, w, dest)
    assert fused_moe_ops.fusion_stats()["lowered"] == {"scatter_decomposition": 1}


# ---- look-alikes of the proven form (an index not ``perm // topk``, a destination not zeros, alpha, no
# weights): the proven form leaves them, the scatter form takes them. Inputs: rows in expert order
# (m * topk, k) and router scores (m, 4).


def _sorted(logits):
    w, ids = route(logits)
    perm = ids.view(-1).argsort(stable=True)
    return w, ids, perm


def index_add_index_not_from_a_sort(y, logits):  # the expert ids themselves as token numbers
    w, ids = route(logits)
    zeros = torch.zeros(ids.shape[0], y.shape[1], dtype=y.dtype)
    return zeros.index_add(0, ids.view(-1), y * w.view(-1, 1))


def index_add_into_ones(y, logits):  # the destination is not zeros
    w, ids, perm = _sorted(logits)
    ones = torch.ones(ids.shape[0], y.shape[1], dtype=y.dtype)
    return ones.index_add(0, perm // TOPK, y * w.view(-1)[perm, None])


def index_add_alpha(y, logits):
    w, ids, perm = _sorted(logits)
    zeros = torch.zeros(ids.shape[0], y.shape[1], dtype=y.dtype)
    return zeros.index_add(0, perm // TOPK, y * w.view(-1)[perm, None], alpha=2)


def scatter_add_other_divisor(y, logits):  # perm // 3 with topk 2: not one token per topk rows
    w, ids, perm = _sorted(logits)
    tok = perm // (TOPK + 1)
    zeros = torch.zeros(ids.shape[0], y.shape[1], dtype=y.dtype)
    return zeros.scatter_add(0, tok[:, None].expand(-1, y.shape[1]), y * w.view(-1)[perm, None])


def scatter_add_per_token_sort(y, logits):  # each token's slots sorted: values in [0, topk), not a permutation
    w, ids = route(logits)
    perm = ids.sort(dim=1).indices.reshape(-1)
    zeros = torch.zeros(ids.shape[0], y.shape[1], dtype=y.dtype)
    return zeros.index_add(0, perm // TOPK, y * w.view(-1, 1))


def index_put_unweighted(y, logits):  # no weighting multiply
    w, ids, perm = _sorted(logits)
    zeros = torch.zeros(ids.shape[0], y.shape[1], dtype=y.dtype)
    return zeros.index_put((perm // TOPK,), y, accumulate=True)


NOT_PROVEN = [index_add_index_not_from_a_sort, index_add_into_ones, index_add_alpha, scatter_add_other_divisor,
              scatter_add_per_token_sort, index_put_unweighted]


def _not_proven_cases():
    params = []
    for i, fn in enumerate(NOT_PROVEN):
        for j, dtype in enumerate(DTYPES):
            for dynamic in (False, True):
                fast = j == i % 3 and dynamic == bool(i % 2)
                params.append(pytest.param(fn, dtype, dynamic, marks=() if fast else (pytest.mark.slow,),
                                           id=f"{fn.__name__}-{str(dtype)[6:]}-{'dynamic' if dynamic else 'static'}"))
    return params


@pytest.mark.parametrize("fn, dtype, dynamic", _not_proven_cases())
def test_not_proven_index_takes_the_scatter_form(fn, dtype, dynamic):
    gen = torch.Generator().manual_seed(0)
    m = 5
    y, logits = torch.randn(m * TOPK, K, generator=gen).to(dtype), torch.randn(m, 4, generator=gen).to(dtype)
    out = torch.compile(fn, dynamic=dynamic)(y, logits)
    eager = fn(y, logits)
    assert out.dtype == eager.dtype and out.shape == eager.shape
    scale = max(1.0, float(eager.abs().max()))
    torch.testing.assert_close(out, eager, atol=_EAGER_TOL[dtype] * scale, rtol=0)
    # Unweighted rows under dynamic shapes: nothing in the graph ties the rows' count to the index's
    # (index_put would broadcast a single row), so the combine stays Inductor's.
    expected = {} if fn is index_put_unweighted and dynamic else {"scatter_mul_sum": 1}
    assert fused_moe_ops.fusion_stats()["by_pattern"] == expected, fused_moe_ops.fusion_stats()
