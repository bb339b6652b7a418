"""Deployment without Python model code.

* ``torch.export`` of a model that calls ``moe.shuffle_mul_sum`` explicitly, token dimension dynamic:
  the op stays one node in the graph; ``torch.export.save`` / ``load`` round-trips; the loaded
  program runs in a fresh process (after ``import fused_moe_ops``) at token counts never traced.
* AOTInductor (``torch._inductor.aoti_compile_and_package``) of the exported *seed-spelling* MoE
  block (the model never mentions the op) with the fusion pass active: the pass fires, the
  generated wrapper calls ``moe::shuffle_mul_sum``, and the loaded package matches eager in a fresh
  process. A control compile with the pass disabled shows the check can tell the difference.

The MoE block is examples/moe_block.py's (data-dependent expert slices: unbacked sizes in export).
CUDA variants run when a GPU is present and skip otherwise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import fused_moe_ops

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from moe_block import make_block  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                           pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]
OP = torch.ops.moe.shuffle_mul_sum.default
# max |compiled - eager| / max |eager|; fp32 everywhere (CUDA: matmul algorithms differ between the
# eager and the compiled program, and Inductor may pick a Triton template).
REL_TOL = {"cpu": 1e-4, "cuda": 2e-3}
SIZES = dict(hidden=64, ffn=32, experts=4, topk=2)
TRACE_TOKENS = 16
RUN_TOKENS = (TRACE_TOKENS, 5, 37, 130)   # other token counts than the one traced


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "examples"), env.get("PYTHONPATH", "")])
    if not HAS_CUDA:
        env.setdefault("FUSED_MOE_OPS_NO_CUDA", "1")   # no point compiling CUDA in the child here
    return env


def _run_fresh(code: str, timeout: int = 600) -> dict:
    """Run `code` in a new interpreter; it prints one JSON line last. Returns that dict."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=_subprocess_env(), timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, f"fresh process failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dynamic_tokens():
    return ({0: torch.export.Dim("tokens", min=2, max=8192)},)


def _save_cases(block, device, path: Path, seed: int) -> None:
    """Fresh random inputs at several token counts and the eager outputs, for the fresh process."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, SIZES["hidden"], generator=g).to(device) for n in RUN_TOKENS]
    with torch.no_grad():
        ys = [block(x) for x in xs]
    torch.save({"x": [x.cpu() for x in xs], "y": [y.cpu() for y in ys]}, path)


COMPARE = """
    def compare(run, cases, device, tol):
        errs = []
        for x, y in zip(cases["x"], cases["y"]):
            got = run(x.to(device))
            if isinstance(got, (list, tuple)) and len(got) == 1:
                got = got[0]
            # torch < 2.12's AOTI proxy executor mis-decodes dtype arguments of custom ops
            # (pytorch/pytorch#169157), logs the op's error and returns None instead of raising.
            assert isinstance(got, torch.Tensor), f"the program returned {got!r}, not a tensor"
            got = got.cpu()
            assert got.shape == y.shape and got.dtype == y.dtype, (got.shape, y.shape, got.dtype, y.dtype)
            errs.append((got.double() - y.double()).abs().max().item() / max(y.abs().max().item(), 1e-30))
        return errs
"""


def _mk(device, explicit_op: bool, seed: int):
    block = make_block(**SIZES, dtype=torch.float32, device=device, seed=seed, explicit_op=explicit_op)
    x = torch.randn(TRACE_TOKENS, SIZES["hidden"], device=device)
    return block, x


# ------------------------------------------------------------------------------------------------
# torch.export of a model that calls the op explicitly
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_export_explicit_op_keeps_op_and_dynamic_tokens(device, tmp_path):
    seed = 1234 + (device == "cuda")
    block, x = _mk(device, explicit_op=True, seed=seed)
    with torch.no_grad():
        ep = torch.export.export(block, (x,), dynamic_shapes=_dynamic_tokens())
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(OP) == 1, f"expected one moe.shuffle_mul_sum node, graph has: {ep.graph}"
    # The combine was not decomposed: the op's result is what the program returns.
    (ret,) = [n for n in ep.graph.nodes if n.op == "output"][0].args[0]
    assert ret.target is OP, f"the program returns {ret.format_node()}, not the op's result"
    # The token dimension is symbolic, not specialised to the traced 16.
    in_shape = [n for n in ep.graph.nodes if n.op == "placeholder"][-1].meta["val"].shape
    assert isinstance(in_shape[0], torch.SymInt), f"token dim was specialised: {in_shape}"

    # In process, at other token counts.
    mod = ep.module()
    for n in RUN_TOKENS:
        xn = torch.randn(n, SIZES["hidden"], device=device)
        with torch.no_grad():
            want = block(xn)
        got = mod(xn)
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert err <= REL_TOL[device], f"tokens={n}: rel err {err:.3g}"

    # Saved program, loaded and run in a fresh process.
    pt2 = tmp_path / "explicit_op.pt2"
    torch.export.save(ep, str(pt2))
    cases = tmp_path / "cases.pt"
    _save_cases(block, device, cases, seed)
    res = _run_fresh(f"""
        import json, torch
        import fused_moe_ops  # registers moe::shuffle_mul_sum for the loader
        {textwrap.dedent(COMPARE).strip().replace(chr(10), chr(10) + ' ' * 8)}
        ep = torch.export.load({str(pt2)!r})
        n_ops = sum(1 for n in ep.graph.nodes if n.target is torch.ops.moe.shuffle_mul_sum.default)
        errs = compare(ep.module(), torch.load({str(cases)!r}), {device!r}, None)
        print(json.dumps({{"n_ops": n_ops, "errs": errs}}))
    """)
    assert res["n_ops"] == 1
    assert len(res["errs"]) == len(RUN_TOKENS)
    assert max(res["errs"]) <= REL_TOL[device], res


def test_export_explicit_op_matches_seed_spelling():
    """The explicit-op block and the seed-spelling block are the same function (fp32)."""
    a, x = _mk("cpu", explicit_op=True, seed=7)
    b, _ = _mk("cpu", explicit_op=False, seed=7)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert (ya - yb).abs().max().item() <= 1e-5 * yb.abs().max().item()


# ------------------------------------------------------------------------------------------------
# AOTInductor of the seed-spelling block, pass active
# ------------------------------------------------------------------------------------------------

def _generated_calls(package: str) -> int:
    """How often the package's generated wrapper (C++ and its extern-kernel JSON) names the op."""
    hits = 0
    with zipfile.ZipFile(package) as z:
        for name in z.namelist():
            if name.endswith((".cpp", ".h", ".json")) and "aotinductor" in name:
                text = z.read(name).decode("utf-8", "replace")
                hits += sum(text.count(f"moe{sep}{op}") for sep in ("::", ".")
                            for op in ("shuffle_mul_sum", "_shuffle_mul_sum_fused"))
    return hits


def _aoti_compile(ep, path: Path) -> str:
    # fx_graph_cache off: a cache hit would skip the pass (and its counter) on a second test run.
    with torch._inductor.config.patch(fx_graph_cache=False):
        return torch._inductor.aoti_compile_and_package(ep, package_path=str(path))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_aoti_seed_block_calls_fused_op_and_runs_in_fresh_process(device, tmp_path):
    if not fused_moe_ops.fusion_enabled():
        pytest.skip("fusion disabled in this environment (FUSED_MOE_OPS_DISABLE_FUSION)")
    seed = 4321 + (device == "cuda")
    block, x = _mk(device, explicit_op=False, seed=seed)
    with torch.no_grad():
        ep = torch.export.export(block, (x,), dynamic_shapes=_dynamic_tokens())
    # Export itself leaves the seed spelling alone: the op appears only through the Inductor pass.
    assert all(n.target is not OP for n in ep.graph.nodes)

    fused_moe_ops.reset_fusion_stats()
    package = _aoti_compile(ep, tmp_path / "moe_block.pt2")
    stats = fused_moe_ops.fusion_stats()
    assert stats["rewrites"] >= 1, f"the fusion pass did not fire under AOTInductor: {stats}"
    assert _generated_calls(package) >= 1, "the AOTInductor wrapper does not call moe::shuffle_mul_sum"

    cases = tmp_path / "cases.pt"
    _save_cases(block, device, cases, seed)
    res = _run_fresh(f"""
        import json, torch
        import fused_moe_ops
        {textwrap.dedent(COMPARE).strip().replace(chr(10), chr(10) + ' ' * 8)}
        runner = torch._inductor.aoti_load_package({package!r})
        errs = compare(runner, torch.load({str(cases)!r}), {device!r}, None)
        print(json.dumps({{"errs": errs}}))
    """)
    assert len(res["errs"]) == len(RUN_TOKENS)
    assert max(res["errs"]) <= REL_TOL[device], res


@pytest.mark.slow
def test_aoti_control_without_fusion_has_no_op_call(tmp_path):
    """Negative control for the check above: with the pass disabled, the same block's wrapper does
    not call the op, so `_generated_calls` really detects the rewrite."""
    block, x = _mk("cpu", explicit_op=False, seed=99)
    with torch.no_grad():
        ep = torch.export.export(block, (x,), dynamic_shapes=_dynamic_tokens())
    fused_moe_ops.reset_fusion_stats()
    with fused_moe_ops.disable_fusion():
        package = _aoti_compile(ep, tmp_path / "unfused.pt2")
    assert fused_moe_ops.fusion_stats()["rewrites"] == 0
    assert _generated_calls(package) == 0
    runner = torch._inductor.aoti_load_package(package)
    xn = torch.randn(23, SIZES["hidden"])
    with torch.no_grad():
        want = block(xn)
    assert (runner(xn) - want).abs().max().item() <= REL_TOL["cpu"] * want.abs().max().item()


class _MixedDtypeCombine(torch.nn.Module):
    """bf16 expert rows, float32 router weights, no .to(): eager's product and result are float32."""

    def forward(self, rows, idx, w):
        m, topk = w.shape
        return (rows[idx].view(m, topk, rows.shape[1]) * w.view(m, topk, 1)).sum(dim=1)


@pytest.mark.slow
def test_aoti_mixed_dtype_combine_is_correct_on_every_torch(tmp_path):
    """The combine whose result dtype differs from the rows' needs the op's out_dtype argument, which
    AOTInductor before torch 2.12 passes wrongly (pytorch/pytorch#169157): there the pass must leave it
    to Inductor; from 2.12 on it rewrites it. Either way the package must match eager."""
    from fused_moe_ops.fusion._common import AOTI_MISREADS_DTYPE_ARGS

    g = torch.Generator().manual_seed(5)
    m, topk, k, rows_n = 12, 4, 40, 30
    rows = torch.randn(rows_n, k, generator=g).to(torch.bfloat16)
    idx = torch.randint(-1, rows_n, (m * topk,), generator=g)
    w = torch.rand(m, topk, generator=g)
    model = _MixedDtypeCombine()
    ep = torch.export.export(model, (rows, idx, w))
    fused_moe_ops.reset_fusion_stats()
    package = _aoti_compile(ep, tmp_path / "mixed.pt2")
    rewrites = fused_moe_ops.fusion_stats()["rewrites"]
    assert rewrites == (0 if AOTI_MISREADS_DTYPE_ARGS else 1), (torch.__version__, rewrites)
    assert (_generated_calls(package) > 0) == (rewrites > 0)
    got = torch._inductor.aoti_load_package(package)(rows, idx, w)
    want = model(rows, idx, w)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
