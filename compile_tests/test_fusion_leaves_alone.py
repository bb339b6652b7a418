"""Look-alikes the pass must leave alone (no rewrite, same results as eager), in
float32, float16 and bfloat16, with static shapes and dynamic=True."""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fused_moe_ops
from fusion_cases import DTYPES, K, TOPK, assert_not_fused, fusion_log, make_index, route

M = 5


def sum_other_dim(x, idx, w):
    m, k = w.shape[0], x.shape[1]
    return (x[idx].view(m, TOPK, k) * w.unsqueeze(-1)).sum(dim=2)


def weights_per_token(x, idx, w):  # one weight per token, broadcast over the slots
    m, k = w.shape[0], x.shape[1]
    return (x[idx].view(m, TOPK, k) * w[:, :1].view(m, 1, 1)).sum(dim=1)


def weights_per_slot(x, idx, w):  # one weight per slot, broadcast over the tokens
    m, k = w.shape[0], x.shape[1]
    return (x[idx].view(m, TOPK, k) * w[:1].view(1, TOPK, 1)).sum(dim=1)


def weights_per_element(x, idx, w3):  # (m, topk, k) weights: not one scalar per (token, slot)
    m, k = w3.shape[0], x.shape[1]
    return (x[idx].view(m, TOPK, k) * w3).sum(dim=1)


def index_2d(x, idx, w):
    m = w.shape[0]
    return (x[idx.view(m, TOPK)] * w.unsqueeze(-1)).sum(dim=1)


def integer_input(x_int, idx, w):
    m, k = w.shape[0], x_int.shape[1]
    return (x_int[idx].view(m, TOPK, k) * w.unsqueeze(-1)).sum(dim=1)


def gathered_reused(x, idx, w):
    m, k = w.shape[0], x.shape[1]
    g = x[idx]
    return (g.view(m, TOPK, k) * w.unsqueeze(-1)).sum(dim=1), g * 2


def product_reused(x, idx, w):
    m, k = w.shape[0], x.shape[1]
    p = x[idx].view(m, TOPK, k) * w.unsqueeze(-1)
    return p.sum(dim=1), p.amax(dim=1)


def length_mismatch(x_half, idx, w):  # index of 2*m*topk half rows viewed as m*topk full rows
    m, k = w.shape[0], 2 * x_half.shape[1]
    return (x_half[idx].view(m, TOPK, k) * w.unsqueeze(-1)).sum(dim=1)


def rows_from_pointwise_chain(x, idx, w):
    """Expert outputs selected row by row with torch.where (the benchmark's TinyMoE): Inductor computes
    the selection inside its own combine kernel; the op would need the rows written out first."""
    m, k = w.shape[0], x.shape[1]
    rows = torch.zeros_like(x)
    for e in range(3):
        rows = torch.where((torch.arange(x.shape[0]) % 3 == e).unsqueeze(-1), x * (e + 1), rows)
    return (rows[idx].view(m, TOPK, k) * w.unsqueeze(-1)).sum(dim=1)


def rows_scaled_pointwise(x, idx, w):  # one pointwise op producing the rows is enough
    m, k = w.shape[0], x.shape[1]
    return ((x * 0.5)[idx].view(m, TOPK, k) * w.unsqueeze(-1)).sum(dim=1)


def bmm_cast_to_int(x, idx, w):  # the bmm's result cast to an integer type: not a result the op makes
    m, k = w.shape[0], x.shape[1]
    return torch.bmm(w.unsqueeze(1).float(), x[idx].view(m, TOPK, k).float()).to(torch.int32).squeeze(1)


def einsum_per_token_transposed(eo, w):  # the result is (k, m): the sum's output permuted
    return torch.einsum("tai,ta -> it", eo, w)


def einsum_per_token_broadcast_rows(y, w):  # one row per token broadcast over the slots (an expand)
    return torch.einsum("tai,ta -> ti", y[:, :1].expand(-1, TOPK, -1), w)


def einsum_per_token_pointwise_rows(eo, w):  # rows computed by a pointwise op Inductor fuses into its sum
    return torch.einsum("tai,ta -> ti", torch.relu(eo), w)


def einsum_per_token_sum_over_k(eo, w):  # contracts the hidden dimension, not the slots
    return torch.einsum("tai,ta -> ta", eo, w)


# ---- the scatter-add family: (y rows in expert order, router scores)


def _sorted(logits):
    w, ids = route(logits)
    perm = ids.view(-1).argsort(stable=True)
    return w, ids, perm


def scatter_add_narrow_index(y, logits):  # the index covers half the columns: the rest stays zero
    w, ids, perm = _sorted(logits)
    zeros = torch.zeros(ids.shape[0], y.shape[1], dtype=y.dtype)
    return zeros.scatter_add(0, (perm // TOPK)[:, None].expand(-1, y.shape[1] // 2), y * w.view(-1)[perm, None])


def scatter_add_over_dim_1(y, logits):  # tokens along the columns: not a row scatter
    w, ids = route(logits)
    zeros = torch.zeros(y.shape[1], ids.shape[0], dtype=y.dtype)
    return zeros.scatter_add(1, ids.view(1, -1).expand(y.shape[1], -1), (y * w.view(-1, 1)).t())


def scatter_add_index_not_a_column(y, logits):  # a 2-D index that varies along the row: scatters elements
    w, ids = route(logits)
    idx = (ids.view(-1, 1) + torch.arange(y.shape[1])) % ids.shape[0]
    zeros = torch.zeros(ids.shape[0], y.shape[1], dtype=y.dtype)
    return zeros.scatter_add(0, idx, y * w.view(-1, 1))


def index_put_without_accumulate(y, logits):  # a write, not a sum (here each row has a place of its own)
    w, ids, perm = _sorted(logits)
    zeros = torch.zeros(ids.numel(), y.shape[1], dtype=y.dtype)
    return zeros.index_put((perm,), y * w.view(-1, 1))


def index_put_two_indices(y, logits):  # (token, column) pairs: one element each
    w, ids = route(logits)
    zeros = torch.zeros(ids.shape[0], y.shape[1], dtype=y.dtype)
    cols = torch.arange(ids.numel()) % y.shape[1]
    return zeros.index_put((ids.view(-1), cols), (y * w.view(-1, 1)).sum(1), accumulate=True)


def index_put_row_broadcast(y, logits):  # one value per index entry broadcast along the row: not rows
    w, ids = route(logits)
    zeros = torch.zeros(ids.shape[0], y.shape[1], dtype=y.dtype)
    return zeros.index_put((ids.view(-1),), (y[:, :1] * w.view(-1, 1)), accumulate=True)


def index_put_3d_destination(y, logits):  # a (m, 1, k) destination: the result is not (m, k)
    w, ids = route(logits)
    zeros = torch.zeros(ids.shape[0], 1, y.shape[1], dtype=y.dtype)
    return zeros.index_put((ids.view(-1),), (y * w.view(-1, 1)).unsqueeze(1), accumulate=True)


class Case(NamedTuple):
    fn: Callable
    x_cols: int = K
    index_len: int = TOPK        # per token
    weights: str = "mt"          # mt: (m, topk) | mtk: (m, topk, k)
    int_input: bool = False
    seen: bool = True            # the pattern matches and the analysis says no (logged at DEBUG)
    per_token: bool = False      # inputs (expert outputs (m, topk, k), weights), no index
    scatter: bool = False        # inputs (rows in expert order (m * topk, k), router scores (m, 4))


CASES = {
    "sum_other_dim": Case(sum_other_dim),
    "weights_per_token": Case(weights_per_token),
    "weights_per_slot": Case(weights_per_slot),
    "weights_per_element": Case(weights_per_element, weights="mtk"),
    "index_2d": Case(index_2d),
    "integer_input": Case(integer_input, int_input=True),
    "gathered_reused": Case(gathered_reused),
    "product_reused": Case(product_reused, seen=False),  # the matcher itself refuses a 2-user product
    "length_mismatch": Case(length_mismatch, x_cols=K // 2, index_len=2 * TOPK),
    "rows_from_pointwise_chain": Case(rows_from_pointwise_chain),
    "rows_scaled_pointwise": Case(rows_scaled_pointwise),
    "bmm_cast_to_int": Case(bmm_cast_to_int),
    "einsum_per_token_transposed": Case(einsum_per_token_transposed, per_token=True),
    "einsum_per_token_broadcast_rows": Case(einsum_per_token_broadcast_rows, per_token=True),
    "einsum_per_token_pointwise_rows": Case(einsum_per_token_pointwise_rows, per_token=True),
    "einsum_per_token_sum_over_k": Case(einsum_per_token_sum_over_k, per_token=True, seen=False),
    "scatter_add_narrow_index": Case(scatter_add_narrow_index, scatter=True),
    "scatter_add_over_dim_1": Case(scatter_add_over_dim_1, scatter=True),
    "scatter_add_index_not_a_column": Case(scatter_add_index_not_a_column, scatter=True),
    "index_put_without_accumulate": Case(index_put_without_accumulate, scatter=True, seen=False),
    "index_put_two_indices": Case(index_put_two_indices, scatter=True),
    "index_put_row_broadcast": Case(index_put_row_broadcast, scatter=True),
    "index_put_3d_destination": Case(index_put_3d_destination, scatter=True),
}


def _inputs(case: Case, dtype, m=M):
    gen = torch.Generator().manual_seed(0)
    rows = m * TOPK + 3
    if case.int_input:
        x = torch.randint(-8, 8, (rows, case.x_cols), generator=gen, dtype=torch.int32)
    else:
        x = torch.randn(rows, case.x_cols, generator=gen).to(dtype)
    if case.scatter:
        return x[: m * TOPK], torch.randn(m, 4, generator=gen).to(dtype)
    if case.per_token:
        return x[: m * TOPK].reshape(m, TOPK, case.x_cols), (torch.rand(m, TOPK, generator=gen) + 0.1).to(dtype)
    idx = make_index(m * case.index_len, rows, negative=True, gen=gen)
    shape = (m, TOPK) if case.weights == "mt" else (m, TOPK, K)
    w = (torch.rand(*shape, generator=gen) + 0.1).to(dtype)
    return x, idx, w


def _close(out, expected, dtype):
    outs = out if isinstance(out, tuple) else (out,)
    exps = expected if isinstance(expected, tuple) else (expected,)
    for o, e in zip(outs, exps):
        assert o.dtype == e.dtype and o.shape == e.shape
        scale = max(1.0, float(e.abs().max()))
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * scale
        torch.testing.assert_close(o, e, atol=tol, rtol=0)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_left_alone(name, dtype, dynamic):
    case = CASES[name]
    args = _inputs(case, dtype)
    with fusion_log(logging.DEBUG) as messages:
        out, codes = run_and_get_code(torch.compile(case.fn, dynamic=dynamic), *args)
    if case.seen:  # the checks were exercised, not just a pattern that never matched
        assert any("left alone" in msg for msg in messages), messages
    stats = fused_moe_ops.fusion_stats()
    assert stats["rewrites"] == 0, stats
    assert_not_fused("\n".join(codes))
    _close(out, case.fn(*args), dtype)
