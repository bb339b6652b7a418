"""Every index eager rejects is rejected, and every index it accepts reads eager's row, under each way
Inductor can lower a rewritten combine: the op's kernel, and each decomposition of it inlined as
Inductor IR (fusion/decompositions.py), forced in turn with ``autotune.forced_lowering``, and Inductor
choosing; static and dynamic token counts.

The trap: Inductor's indirect load wraps a negative index once before its bounds check, so an index a
decomposition leaves negative (an entry below -R, wrapped once by the decomposition) reads row
``p + 2R`` and passes the check: a silent wrong answer where eager raises.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import fused_moe_ops
from fused_moe_ops.fusion import autotune
from fused_moe_ops.ops import NEGATIVE_IS_ERROR, SKIP_NEGATIVE, WRAP_NEGATIVE
from fusion_cases import _TOL

needs_inliner = pytest.mark.skipif(autotune.available() is not None, reason="torch without custom-op autotuning")
# Inductor's choices are timed and its caches read here: an empty Inductor cache per test
# (conftest.py, _fresh_compile_state), not the kernel cache the other modules share.
FRESH_INDUCTOR_CACHE = True
LOWERINGS = [pytest.param(c, id=f"forced-{c}") for c in autotune.LOWERINGS] + [pytest.param(None, id="inductor-chooses")]


def seed_line(x, idx, w):
    m, topk = w.shape
    return (x[idx].view(m, topk, -1) * w.view(m, topk, 1)).sum(dim=1)


def index_select_line(x, idx, w):
    m, topk = w.shape
    return (x.index_select(0, idx).view(m, topk, -1) * w.view(m, topk, 1)).sum(dim=1)


def upcast_line(x, idx, w):
    m, topk = w.shape
    return (x[idx].float().view(m, topk, -1) * w.float().view(m, topk, 1)).sum(dim=1).to(x.dtype)


R = 13  # rows of x; M * topk = 12 slots

# (id, the entry planted at slot 2): eager raises for all but the in-range ones
ENTRIES = [
    pytest.param(-R - 1, id="minus-R-minus-1"),
    pytest.param(-2 * R + 1, id="minus-2R-plus-1"),
    pytest.param(-2 * R, id="minus-2R"),
    pytest.param(-3 * R - 5, id="far-below"),
    pytest.param(R, id="R"),
    pytest.param(2 * R - 1, id="2R-minus-1"),
    pytest.param(-(2 ** 31), id="int32-min"),
    pytest.param(2 ** 31 - 1, id="int32-max"),
    pytest.param(-(2 ** 63), id="int64-min"),
    pytest.param(2 ** 63 - 1, id="int64-max"),
    pytest.param(-R, id="minus-R-in-range"),
    pytest.param(-1, id="minus-1-in-range"),
    pytest.param(R - 1, id="R-minus-1-in-range"),
]


def _outcome(fn, *args):
    try:
        return fn(*args), None
    except Exception as e:  # noqa: BLE001 - compared with eager's
        return None, e


@contextlib.contextmanager
def _lowered_as(lowering):
    """Inside: a fresh Dynamo, Inductor's choice on (conftest turns it off) and ``lowering`` forced."""
    torch._dynamo.reset()
    autotune_was = fused_moe_ops.fusion.set_autotune(True)
    try:
        with autotune.forced_lowering(lowering):
            yield
    finally:
        fused_moe_ops.fusion.set_autotune(autotune_was)


def _assert_like_eager(got, eager, what):
    (value, error), (e_value, e_error) = got, eager
    if e_error is not None:
        assert error is not None, f"{what}: eager raised {type(e_error).__name__}, compiled returned a value"
        assert isinstance(error, (IndexError, RuntimeError)), f"{what}: {type(error).__name__}: {error}"
        return
    assert error is None, f"{what}: eager returned, compiled raised {type(error).__name__}: {error}"
    assert value.dtype == e_value.dtype and value.shape == e_value.shape, what
    torch.testing.assert_close(value, e_value, atol=_TOL[e_value.dtype] * 4, rtol=_TOL[e_value.dtype], msg=what)


@needs_inliner
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("spelling, dtype", [
    pytest.param(seed_line, torch.bfloat16, id="seed_line-bfloat16"),
    pytest.param(index_select_line, torch.float32, id="index_select_line-float32"),
    pytest.param(upcast_line, torch.bfloat16, id="upcast_line-bfloat16"),
])
def test_entry_below_minus_R_raises_under_every_lowering(spelling, dtype, lowering, dynamic):
    """The program that returned row 12 for an entry of -14 (R = 13) under both decompositions."""
    torch.manual_seed(0)
    x, w = torch.randn(R, 8).to(dtype), torch.rand(3, 4).to(dtype)
    idx = torch.randperm(12)
    idx[2] = -14
    eager = _outcome(spelling, x, idx, w)
    assert eager[1] is not None
    fused_moe_ops.reset_fusion_stats()
    with _lowered_as(lowering):
        got = _outcome(torch.compile(spelling, dynamic=dynamic), x, idx, w)
    stats = fused_moe_ops.fusion_stats()
    assert stats["rewrites"] >= 1, stats
    if lowering is not None:  # the forced lowering is the one that ran (unrolled needs a static topk)
        allowed = {"unrolled", "op"} if lowering == "unrolled" and dynamic else {lowering}
        assert stats["lowered"] and set(stats["lowered"]) <= allowed, stats
    _assert_like_eager(got, eager, f"{spelling.__name__} lowered as {stats['lowered']}")


@needs_inliner
@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_every_entry_under_every_lowering(lowering, index_dtype):
    """Each entry across the whole index range (both sides of [-R, R), the integer extremes) planted in
    turn, the seed line compiled once (static shapes): raises where eager raises, eager's rows where it
    returns."""
    info = torch.iinfo(index_dtype)
    torch.manual_seed(1)
    x, w = torch.randn(R, 8), torch.rand(3, 4)
    with _lowered_as(lowering):
        compiled = torch.compile(seed_line)
        for entry in ENTRIES:
            entry = entry.values[0]
            if not info.min <= entry <= info.max:
                continue
            idx = torch.randperm(12).to(index_dtype)
            idx[2] = entry
            _assert_like_eager(_outcome(compiled, x, idx, w), _outcome(seed_line, x, idx, w), f"entry {entry}")


def _reference_fused(x, perm, f, mode, row_mask, per_row):
    """float64 eager of the internal op's semantics for one negative-index mode."""
    rows = x.shape[0]
    p = perm.reshape(-1).long()
    if (p >= rows).any():
        raise IndexError("entry >= R")
    if mode == NEGATIVE_IS_ERROR and (p < 0).any():
        raise IndexError("negative entry")
    if mode == WRAP_NEGATIVE and (p < -rows).any():
        raise IndexError("entry < -R")
    keep = p >= 0 if mode == SKIP_NEGATIVE else torch.ones_like(p, dtype=torch.bool)
    q = torch.where(p < 0, p + rows, p) if mode == WRAP_NEGATIVE else torch.where(keep, p, 0)
    xd = x.double()
    if row_mask is not None:
        xd = xd.masked_fill(row_mask[:, None], 0.0)
    fd = f.double()[q].view(perm.shape) if per_row else f.double()
    contrib = xd[q].view(*fd.shape, -1) * fd.unsqueeze(-1)
    contrib = torch.where(keep.view(*fd.shape, 1), contrib, 0.0)
    return contrib.sum(1)


@needs_inliner
@pytest.mark.parametrize("lowering", [pytest.param(c, id=c) for c in autotune.LOWERINGS])
@pytest.mark.parametrize("mode", [SKIP_NEGATIVE, WRAP_NEGATIVE, NEGATIVE_IS_ERROR], ids=["skip", "wrap", "error"])
@pytest.mark.parametrize("path", ["plain", "row-mask", "per-row-factors"])
def test_internal_op_lowerings_follow_each_negative_index_mode(lowering, mode, path):
    """The internal op compiled directly, each lowering forced: every negative-index mode, the row-mask
    and per-row-factor paths, an entry on each side of every boundary planted in turn, against float64."""
    autotune.ensure_registered()
    torch.manual_seed(2)
    x = torch.randn(R, 8)
    x[5] = float("nan")  # masked on the row-mask path (then 0 * factor), read as NaN otherwise
    per_row = path == "per-row-factors"
    f = torch.rand(R) if per_row else torch.rand(3, 4)
    row_mask = torch.zeros(R, dtype=torch.bool)
    row_mask[5] = True
    mask = row_mask if path == "row-mask" else None

    def call(x, perm, f, mask):
        return torch.ops.moe._shuffle_mul_sum_fused(x, perm, f, None, mode, 0, 1.0, None, mask)

    fused_moe_ops.reset_fusion_stats()
    with _lowered_as(lowering):
        compiled = torch.compile(call)
        for entry in (-R - 1, -R, -1, R, R - 1, -2 * R):
            perm = torch.randperm(R)[:12].view(3, 4)
            perm[0, 1] = perm[0, 2]  # a duplicate
            perm[1, 0] = entry
            expected = _outcome(_reference_fused, x, perm, f, mode, mask, per_row)
            got = _outcome(compiled, x, perm, f, mask)
            what = f"mode {mode}, {path}, entry {entry}, {lowering}"
            if expected[1] is None and got[1] is None:
                value = got[0].double()
                assert torch.equal(value.isnan(), expected[0].isnan()), (what, value, expected[0])
                torch.testing.assert_close(value, expected[0], atol=1e-5, rtol=1e-5, equal_nan=True, msg=what)
            else:
                _assert_like_eager(got, expected, what)
    assert fused_moe_ops.fusion_stats()["lowered"] == {lowering: 1}, fused_moe_ops.fusion_stats()
