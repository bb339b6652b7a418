"""Inductor chooses between the op and its own code (fusion/autotune.py, torch >= 2.12).

* The decompositions compute exactly the op's semantics (every option, NaN/inf where it matters),
  against a float64 spec written slot by slot.
* Compiled with each choice forced (``test_configs.force_custom_op_decomposition``), every spelling
  followed by a residual add gives eager's result; the generated code shows the winner (the op's
  call, or Inductor's kernel and no call).
* Where Inductor cannot choose (autotuning off, deterministic mode) the op stays; with the token count
  dynamic, the static rule (policy.symbolic_size_choice) decides: on CPU the unrolled decomposition.
* A second process with a warm FX graph cache gets the first process's choice.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._inductor.utils import run_and_get_code

import fused_moe_ops
from fused_moe_ops.fusion import autotune
from fused_moe_ops.fusion.decompositions import DECOMPOSITIONS
from fused_moe_ops.ops import FACTOR_ROUND
from fusion_cases import FUSED_CALL, REWRITTEN, check_accuracy, generated_kernels, make_inputs, reference64

pytestmark = pytest.mark.skipif(autotune.available() is not None, reason=str(autotune.available()))

# Inductor's choices are timed and its caches read here: an empty Inductor cache per test
# (conftest.py, _fresh_compile_state), not the kernel cache the other modules share.
FRESH_INDUCTOR_CACHE = True
OP = torch.ops.moe._shuffle_mul_sum_fused.default
_ROUND = {code: dt for dt, code in FACTOR_ROUND.items() if dt is not None}


@pytest.fixture(autouse=True)
def _autotune_on(inductor_chooses):
    """Inductor chooses in every test here (conftest.py)."""


# ------------------------------------------------------------------ the decompositions, eagerly


def spec64(x, p, f, out_dtype, negative_index, factor_round, scale, addend, row_mask):
    """The op's result, slot by slot in float64 (ops.py: FUSED_SCHEMA; masked rows read as zeros and
    keep their factor, a skipped slot adds nothing)."""
    rows, k = x.shape
    m, topk = p.shape if f.dim() == 1 else f.shape
    out = torch.zeros(m, k, dtype=torch.float64)
    for i in range(m):
        for j in range(topk):
            q = i * topk + j if p is None else int(p.reshape(m, topk)[i, j])
            if q < 0 and negative_index == 0:
                continue
            q = q + rows if q < 0 else q
            fac = f[q] if f.dim() == 1 else f[i, j]
            if factor_round:
                fac = fac.to(_ROUND[factor_round])
            row = torch.zeros(k, dtype=torch.float64) if row_mask is not None and row_mask[q] else x[q].double()
            out[i] += fac.double() * row
    out = out * scale
    if addend is not None:
        out = out + (addend.reshape(m, k) if addend.dim() > 2 else addend.expand(m, k)).double()
    return out


def _case(kind, dtype, negative_index, gen, m=6, topk=3, k=8):
    rows = m * topk + 2
    x = torch.randn(rows, k, generator=gen).to(dtype)
    x[rows - 1, 0] = float("nan")   # a NaN row: read where a slot points at it, never where skipped
    low = -rows if negative_index == 1 else (-1 if negative_index == 0 else 0)
    p = torch.randint(low, rows - 1, (m, topk), generator=gen)
    p[0, 0] = p[0, 1]               # a duplicate
    p[2, 1] = 3                     # the row the mask cases mask
    if negative_index == 0:
        p[1, 0] = -1                # skipped ...
    if kind == "per_row":
        f = torch.rand(rows, generator=gen).to(dtype)
        if negative_index == 0:
            f[rows - 1] = float("inf")  # ... the wrapped meaning of -1 would read this row and factor
    else:
        f = torch.rand(m, topk, generator=gen).to(torch.float32)
        if negative_index == 0:
            f[1, 0] = float("nan")  # ... even with a NaN factor
    return x, p, f


@pytest.mark.parametrize("name", sorted(DECOMPOSITIONS))
@pytest.mark.parametrize("kind", ["per_slot", "per_row"])
@pytest.mark.parametrize("negative_index", [0, 1, 2], ids=["skip", "wrap", "error"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decomposition_is_the_op(name, kind, negative_index, dtype):
    gen = torch.Generator().manual_seed(negative_index + 10 * (kind == "per_row"))
    decomp = DECOMPOSITIONS[name]
    for option in ("plain", "round", "mask", "scale+addend", "addend_3d", "out_f32", "mask_nan_factor"):
        x, p, f = _case(kind, dtype, negative_index, gen)
        m, topk = p.shape
        k = x.shape[1]
        perm = p if kind == "per_row" else p.reshape(-1)
        args = dict(out_dtype=None, negative_index=negative_index, factor_round=0, scale=1.0, addend=None,
                    row_mask=None)
        if option == "round":
            args["factor_round"] = 2 if dtype == torch.float32 else 1
        if option in ("mask", "mask_nan_factor"):
            mask = torch.zeros(x.shape[0], dtype=torch.bool)
            mask[x.shape[0] - 1] = True          # the NaN row is masked: it reads as zeros
            mask[3] = True
            args["row_mask"] = mask
            if option == "mask_nan_factor":
                # a masked row keeps its factor: 0 * NaN is NaN (eager: masked_fill(mask, 0)[idx] * w)
                if kind == "per_row":
                    f[3] = float("nan")
                else:
                    f[2, 1] = float("nan")
        if option == "scale+addend":
            args.update(scale=0.5, addend=torch.randn(1, k, generator=gen).to(dtype))
        if option == "addend_3d":
            args["addend"] = torch.randn(2, m // 2, k, generator=gen)
        if option == "out_f32":
            args["out_dtype"] = torch.float32
        if negative_index == 2:
            perm = perm.clamp(min=0)
        tensors = [t for t in (x, perm, f, args["addend"], args["row_mask"]) if t is not None]
        scalars = {n: v for n, v in args.items() if not isinstance(v, torch.Tensor) and v is not None}
        scalars.update({n: None for n in ("addend", "row_mask") if args[n] is None})
        out = decomp(*tensors, **scalars)
        want_dtype = args["out_dtype"] or dtype
        assert out.dtype == want_dtype and out.shape == (m, k), option
        ref = spec64(x, perm if kind == "per_row" else perm.reshape(m, topk), f, *args.values())
        assert torch.equal(out.isnan(), ref.isnan()), (option, out, ref)
        if option == "mask_nan_factor":
            assert out.isnan().any(), "the masked row's NaN factor must propagate"
        tol = 1e-5 if want_dtype == torch.float32 and dtype == torch.float32 else 2e-2
        fin = ~ref.isnan()
        torch.testing.assert_close(out.double()[fin], ref[fin], atol=tol, rtol=tol, msg=option)
        # and the op itself agrees with the same spec (the decomposition is benchmarked against it)
        op_out = OP(x, perm, f, args["out_dtype"], negative_index, args["factor_round"], args["scale"],
                    args["addend"], args["row_mask"])
        assert torch.equal(op_out.isnan(), ref.isnan()), (option, op_out, ref)


# ------------------------------------------------------------------ compiled, each choice forced

M_DECODE = 4


def with_residual(sp):
    def fn(*args):
        *inputs, residual = args
        return residual + sp.fn(*inputs)
    return fn


def _compile_and_run(sp, dtype, force, dynamic=False, m=M_DECODE):
    inputs = make_inputs(sp, m, dtype)
    out_dtype = torch.float32 if sp.name == "seed_no_to" else dtype
    residual = torch.randn(sp.fn(*inputs).shape).to(out_dtype)  # the combine's (m, k), whatever the rows' shape
    fn = with_residual(sp)
    eager = fn(*inputs, residual)
    with inductor_config.patch({"test_configs.force_custom_op_decomposition": force}):
        out, codes = run_and_get_code(torch.compile(fn, dynamic=dynamic, fullgraph=True), *inputs, residual)
    ref = reference64(sp, inputs) + residual.double()
    return out, eager, ref, codes[-1]  # the graph's module (the ones before are the benchmarked choices)


SPELLINGS = [pytest.param(sp, id=sp.name) for sp in REWRITTEN]


@pytest.mark.parametrize("sp, force", [pytest.param(sp, True, id=f"decomposition-{sp.name}") for sp in REWRITTEN]
                         + [pytest.param(sp, False, id=f"op-{sp.name}") for sp in REWRITTEN
                            if sp.name in ("seed", "weights_before_gather", "bmm", "no_gather")])
def test_forced_choice_gives_eagers_result(sp, force):
    out, eager, ref, code = _compile_and_run(sp, torch.bfloat16, force)
    check_accuracy(out, eager, ref)
    assert fused_moe_ops.fusion_stats()["rewrites"] >= 1
    lowered = fused_moe_ops.fusion_stats()["lowered"]
    if force:  # every spelling, those without a permutation too (benchmarked through the identity twin)
        # Forced: the benchmarked decomposition (unrolled where topk <= 16, else reduction).
        assert len(lowered) == 1 and lowered.get("reduction", lowered.get("unrolled")) == 1, lowered
        assert FUSED_CALL not in code, "the decomposition won, yet the op is called"
        # The decomposition and the add are one Inductor kernel, beside the kernels the routing needs
        # with the op too (sp.generated: the scatter family's sigmoid and inverse permutation, of which
        # the inverse scatter fuses into the combine's kernel).
        assert len(generated_kernels(code)) == max(1, sp.generated), generated_kernels(code)
    else:
        assert lowered == {"op": 1}, lowered
        assert code.count(FUSED_CALL) == 1 and not generated_kernels(code), code


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("sp", [pytest.param(s, id=s.name) for s in REWRITTEN
                                if s.name in ("seed", "upcast", "weights_before_gather")])
def test_forced_decomposition_other_dtypes(sp, dtype):
    out, eager, ref, code = _compile_and_run(sp, dtype, True)
    check_accuracy(out, eager, ref)
    assert FUSED_CALL not in code


def test_forced_decomposition_fuses_add_and_rmsnorm():
    """At decode the point of the decomposition: combine, residual add and RMSNorm in one kernel."""
    sp = next(s for s in REWRITTEN if s.name == "seed")
    x, idx, w = make_inputs(sp, M_DECODE, torch.bfloat16)
    residual = torch.randn(M_DECODE, x.shape[1]).to(torch.bfloat16)
    gain = torch.rand(x.shape[1]).to(torch.bfloat16)

    def layer(x, idx, w, residual, gain):
        h = residual + sp.fn(x, idx, w)
        var = h.float().pow(2).mean(-1, keepdim=True)
        return h, (h.float() * torch.rsqrt(var + 1e-6)).to(h.dtype) * gain

    with inductor_config.patch({"test_configs.force_custom_op_decomposition": True}):
        out, codes = run_and_get_code(torch.compile(layer, fullgraph=True), x, idx, w, residual, gain)
    code = codes[-1]
    assert FUSED_CALL not in code and len(generated_kernels(code)) == 1, code
    for got, want in zip(out, layer(x, idx, w, residual, gain)):
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)


def test_out_of_range_index_still_raises_with_the_decomposition():
    sp = next(s for s in REWRITTEN if s.name == "seed")
    x, idx, w = make_inputs(sp, M_DECODE, torch.float32)
    residual = torch.randn(M_DECODE, x.shape[1])
    fn = torch.compile(with_residual(sp), fullgraph=True)
    with inductor_config.patch({"test_configs.force_custom_op_decomposition": True}):
        fn(x, idx, w, residual)
        bad = idx.clone()
        bad[3] = x.shape[0]
        with pytest.raises((IndexError, RuntimeError), match="out of bounds|out of range"):
            fn(x, bad, w, residual)


# ------------------------------------------------------------------ where Inductor does not choose


def _seed_code(**patches):
    sp = next(s for s in REWRITTEN if s.name == "seed")
    with inductor_config.patch({"test_configs.force_custom_op_decomposition": True, **patches}):
        return _compile_and_run(sp, torch.float32, True)


def test_switched_off_keeps_the_op():
    fused_moe_ops.fusion.set_autotune(False)
    out, eager, ref, code = _seed_code()
    check_accuracy(out, eager, ref)
    assert code.count(FUSED_CALL) == 1 and not generated_kernels(code)
    assert fused_moe_ops.fusion_stats()["lowered"] == {"op": 1}


def test_switch_and_preference_change_the_cache_key():
    keys = {fused_moe_ops.fusion.FUSION_PASS.uuid()}
    fused_moe_ops.fusion.set_autotune(False)
    keys.add(fused_moe_ops.fusion.FUSION_PASS.uuid())
    fused_moe_ops.fusion.set_autotune(True)
    previous = fused_moe_ops.fusion.set_decomposition_preference(3.0)
    try:
        keys.add(fused_moe_ops.fusion.FUSION_PASS.uuid())
    finally:
        fused_moe_ops.fusion.set_decomposition_preference(previous)
    assert len(keys) == 3
    with pytest.raises(ValueError, match="positive number"):
        fused_moe_ops.fusion.set_decomposition_preference(0)


def _dynamic_tokens(sp, ms=(6, 11), dtype=torch.bfloat16):
    """One compile with the token count dynamic, run at two token counts: (code, [(out, eager, ref)])."""
    fn = with_residual(sp)
    compiled = torch.compile(fn, fullgraph=True)
    code, runs = None, []
    for m in ms:
        inputs = make_inputs(sp, m, dtype)
        residual = torch.randn(sp.fn(*inputs).shape).to(dtype)
        for t in (*inputs, residual):
            torch._dynamo.mark_dynamic(t, 0)
        out, codes = run_and_get_code(compiled, *inputs, residual)
        code = code or codes[-1]
        runs.append((out, fn(*inputs, residual), reference64(sp, inputs) + residual.double()))
    return code, runs


@pytest.mark.parametrize("sp", [pytest.param(sp, id=sp.name) for sp in REWRITTEN
                                if sp.name in ("seed", "bmm", "scatter_add_floordiv")])
def test_dynamic_tokens_on_cpu_inline_the_unrolled_decomposition(sp):
    # policy.symbolic_size_choice: no benchmark at one size for all; on CPU Inductor's own (unrolled)
    # code, fused with the residual add, for every token count the compile serves.
    code, runs = _dynamic_tokens(sp)
    assert fused_moe_ops.fusion_stats()["rewrites"] >= 1
    assert FUSED_CALL not in code, "a symbolic token count on CPU, yet the op is called"
    assert set(fused_moe_ops.fusion_stats()["lowered"]) == {"unrolled"}, fused_moe_ops.fusion_stats()
    assert "ks0" in code or "s0" in code, "the compile was not dynamic"
    for out, eager, ref in runs:
        check_accuracy(out, eager, ref)


def test_dynamic_tokens_keep_the_op_where_the_decomposition_would_guard(capfd):
    # weights_before_gather's token count is R // topk: the decomposition's strides ask whether it is
    # below 2, a guard the compile may not add, so the op stays, quietly.
    sp = next(s for s in REWRITTEN if s.name == "weights_before_gather")
    code, runs = _dynamic_tokens(sp)
    assert code.count(FUSED_CALL) == 1, code
    assert set(fused_moe_ops.fusion_stats()["lowered"]) == {"op"}, fused_moe_ops.fusion_stats()
    for out, eager, ref in runs:
        check_accuracy(out, eager, ref)
    assert "evaluate_expr" not in capfd.readouterr().err


def test_dynamic_tokens_keep_the_op_where_the_rule_says_op(monkeypatch):
    from fused_moe_ops.fusion import policy

    monkeypatch.setattr(policy, "symbolic_size_choice", lambda *a: "op")
    sp = next(s for s in REWRITTEN if s.name == "seed")
    code, runs = _dynamic_tokens(sp, dtype=torch.float32)
    assert code.count(FUSED_CALL) == 1 and not generated_kernels(code), code
    assert set(fused_moe_ops.fusion_stats()["lowered"]) == {"op"}, fused_moe_ops.fusion_stats()
    for out, eager, ref in runs:
        check_accuracy(out, eager, ref)


def test_deterministic_mode_keeps_the_op():
    out, eager, ref, code = _seed_code(deterministic=True)
    check_accuracy(out, eager, ref)
    assert code.count(FUSED_CALL) == 1 and not generated_kernels(code)
    assert fused_moe_ops.fusion_stats()["lowered"] == {"op": 1}


# ------------------------------------------------------------------ FX graph cache across processes

_CHILD = textwrap.dedent(r"""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    import fused_moe_ops
    import torch._inductor.config as ic
    from torch._dynamo.utils import counters
    from fusion_cases import REWRITTEN, make_inputs, FUSED_CALL
    sp = next(s for s in REWRITTEN if s.name == "seed")
    torch.manual_seed(0)
    x, idx, w = make_inputs(sp, 4, torch.bfloat16)
    res = torch.randn(4, x.shape[1]).to(torch.bfloat16)
    fn = torch.compile(lambda x, idx, w, r: r + sp.fn(x, idx, w), fullgraph=True)
    with ic.patch({"test_configs.force_custom_op_decomposition": {"1": True, "0": False}[sys.argv[2]]}):
        out = fn(x, idx, w, res)
    print(json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"],
                      "stats": fused_moe_ops.fusion_stats(), "out": out.float().flatten().tolist()}))
""")


def _child(cache_dir: Path, force: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), TORCHINDUCTOR_FX_GRAPH_CACHE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(fused_moe_ops.__file__).parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).parent), force], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_warm_fx_cache_gives_the_same_choice(tmp_path):
    """The first process's choice (forced: the decomposition) is what a second process is served
    from the FX graph cache, bit for bit, even where it would choose the op (forced the other way):
    the forced setting is part of Inductor's key, so the second compile must not be a hit with the
    other choice; with the same setting it is a hit and gives the same bits."""
    first = _child(tmp_path, "1")
    assert first["hit"] == 0
    rewritten = {"gather_mul_sum": 1, "epilogue_add": 1}
    assert first["stats"] == dict(first["stats"], rewrites=2, by_pattern=rewritten, from_cache=0), first["stats"]
    assert len(first["stats"]["lowered"]) == 1 and first["stats"]["lowered"] != {"op": 1}, first["stats"]
    again = _child(tmp_path, "1")
    assert again["hit"] == 1 and again["out"] == first["out"]
    # fusion_stats() of the process served from the cache says what the compile did, and where it came from.
    assert again["stats"] == dict(first["stats"], from_cache=2), (first["stats"], again["stats"])
    other = _child(tmp_path, "0")
    assert other["hit"] == 0, "a graph compiled with the other choice was served from the cache"
    assert other["stats"] == dict(first["stats"], lowered={"op": 1}), other["stats"]
