"""A cheap import: `import fused_moe_ops` loads the kernels and nothing heavy.

Inductor and Dynamo (about a second), Triton, setuptools (via torch.utils.cpp_extension) and HF
transformers (its experts backend registers when transformers is imported) stay out of an eager
user's process; the fusion pass is still in place before the first torch.compile,
because it is installed when torch._inductor is imported. Checked on sys.modules in fresh
interpreters (robust), not on timings (docs/BUILDING.md has those numbers).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("torch._inductor", "torch._dynamo", "triton", "setuptools", "torch.utils.cpp_extension",
                 "transformers")


def _run(code: str, **env) -> dict:
    full_env = dict(os.environ)
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=900, cwd=str(ROOT), env=full_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_pulls_no_heavy_module():
    if torch.cuda.device_count() > 0:
        pytest.skip("with a GPU the import may load Triton (the CUDA fallback)")
    info = _run("""
        import json, sys
        before = set(sys.modules)
        import fused_moe_ops
        from fused_moe_ops import build as _build
        r = _build.RESULTS["cpu"]
        print(json.dumps({"heavy": [m for m in %r if m in sys.modules], "cpu_ok": r.ok, "built_now": r.built_now,
                          "pending": fused_moe_ops.fusion.install_pending(),
                          "stats": fused_moe_ops.fusion_stats()}))
    """ % (HEAVY_MODULES,))
    assert info["cpu_ok"] and not info["built_now"], info  # the session's import built it already
    assert info["heavy"] == [], f"import fused_moe_ops imported {info['heavy']}"
    assert info["pending"], "the fusion pass should wait for torch._inductor"
    assert info["stats"]["rewrites"] == 0 and info["stats"]["enabled"]


INSTALLED = """
    import json, sys
    {before}
    import fused_moe_ops
    after_import = "torch._inductor" in sys.modules
    import torch._inductor.config as config
    from fused_moe_ops.fusion import contains_fusion
    print(json.dumps({{"inductor_after_import": after_import,
                      "installed": contains_fusion(config.post_grad_custom_post_pass),
                      "slot": repr(config.post_grad_custom_post_pass),
                      "hook_left": any(getattr(f, "module_name", None) == "torch._inductor" for f in sys.meta_path),
                      "loader": type(sys.modules["torch._inductor"].__loader__).__name__}}))
"""


def test_pass_installed_when_inductor_is_imported_later():
    info = _run(INSTALLED.format(before=""))
    assert not info["inductor_after_import"]
    assert info["installed"], info["slot"]
    assert not info["hook_left"]  # one-shot
    assert info["loader"] != "_CallAfterExec"  # the real loader is back in place


def test_pass_installed_at_once_when_inductor_was_imported_first():
    info = _run(INSTALLED.format(before="import torch._inductor.config"))
    assert info["inductor_after_import"] and info["installed"], info
    assert not info["hook_left"]


def test_pass_composes_with_a_pass_set_before_inductor_loads_it():
    # A user pass set before fused_moe_ops is imported stays, after ours.
    info = _run("""
        import json
        import torch._inductor.config as config
        def mine(graph):
            pass
        config.post_grad_custom_post_pass = mine
        import fused_moe_ops
        from fused_moe_ops.fusion import ComposedPass, FUSION_PASS
        slot = config.post_grad_custom_post_pass
        print(json.dumps({"composed": isinstance(slot, ComposedPass) and slot.passes[0] is FUSION_PASS
                          and slot.passes[1] is mine}))
    """)
    assert info["composed"]


def test_disabled_by_env_never_installs():
    info = _run(INSTALLED.format(before=""), FUSED_MOE_OPS_DISABLE_FUSION="1")
    assert not info["installed"] and not info["hook_left"], info


@pytest.mark.slow
def test_first_torch_compile_after_a_cheap_import_is_fused():
    # The whole path an eager-then-compile user takes: the import leaves Inductor alone, the first
    # torch.compile imports it, the hook installs the pass, the seed line is rewritten.
    info = _run("""
        import json, sys, torch
        import fused_moe_ops
        before = "torch._inductor" in sys.modules
        def combine(c2, c_map, w):
            m, topk, k = w.shape[0], w.shape[1], c2.shape[1]
            return (c2[c_map].view(m, topk, k) * w.view(m, topk, 1).to(c2.dtype)).sum(dim=1)
        g = torch.Generator().manual_seed(0)
        c2 = torch.randn(24, 32, generator=g)
        c_map = torch.randint(0, 24, (16,), generator=g)
        w = torch.rand(8, 2, generator=g)
        out = torch.compile(combine, fullgraph=True)(c2, c_map, w)
        ref = combine(c2.double(), c_map, w.double())
        print(json.dumps({"before": before, "rewrites": fused_moe_ops.fusion_stats()["rewrites"],
                          "close": bool(torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5))}))
    """, TORCHINDUCTOR_FX_GRAPH_CACHE="0")
    assert not info["before"]
    assert info["rewrites"] >= 1, info
    assert info["close"]
