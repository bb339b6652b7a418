"""The HF transformers experts backend: ``experts_implementation="fused_moe_ops"``.

Every causal-LM family of the installed transformers whose experts accept the switch (enumerated,
tests/_hf_tiny.py), tiny random models: logits as grouped_mm's (float32: within float32 rounding;
bfloat16: no farther from the float32 model than grouped_mm's own bfloat16 logits), the op called
once per experts call, through generate() too. Then the paths around it: grad mode, expert-parallel
placeholders, 1 to 64 tokens, torch.compile, and transformers absent or too old. It runs under any
transformers from 5.7 (scripts/transformers_versions.py runs it under each minor release): what a
release lacks (a family, the post-expert norm) skips, saying so.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.7")

import fused_moe_ops  # noqa: E402,F401
from fused_moe_ops.integrations import transformers as hf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _hf_tiny import SEQ, families, is_experts_module, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = families()
# Families whose tiny config this file cannot build (their config validation ties sub-models'
# widths together); strict xfail: when one builds, the mark must go.
NOT_BUILT = {"dots3_note": "multimodal config: the vision adapter's width must match the text width"}
# Families in every transformers the backend supports: their tiny model must build, never skip.
CLASSIC = {"qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss", "deepseek_v3", "olmoe"}
OP = torch.ops.moe.shuffle_mul_sum.default


class CountOp(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is OP:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def experts_modules(model):
    return [m for m in model.modules() if is_experts_module(m)]


def count_experts_calls(model):
    calls = [0]

    def hook(*_):
        calls[0] += 1

    handles = [m.register_forward_hook(hook) for m in experts_modules(model)]
    return calls, handles


def build(family, experts_implementation):
    """The family's tiny model. One that an older transformers cannot build from the shrunk config
    (a family the release has, with a config this file's shrinking breaks) skips, saying why: building
    runs no experts forward, so the backend is not what fails. The classic families must build."""
    try:
        return tiny_model(family, experts_implementation)
    except Exception as e:  # noqa: BLE001 (whatever the release's config or model code raises)
        if family in CLASSIC or family in NOT_BUILT:
            raise
        pytest.skip(f"{family}'s tiny model does not build under transformers {transformers.__version__}: "
                    f"{type(e).__name__}: {e}"[:300])


def grouped_mm_runs(family, run):
    """``run()``, grouped_mm's own forward or generate(). Where that fails too (a family that a release
    builds but cannot run from this config, e.g. nemotron_h's cache in transformers 5.14), the
    backend has nothing to match: skip, saying why. The classic families must run."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001
        if family in CLASSIC:
            raise
        pytest.skip(f"{family} does not run under transformers {transformers.__version__} with grouped_mm either: "
                    f"{type(e).__name__}: {e}"[:300])


def family_params():
    return [pytest.param(f, marks=pytest.mark.xfail(reason=NOT_BUILT[f], strict=True)) if f in NOT_BUILT else f
            for f in FAMILIES]


def test_families_are_enumerated():
    # transformers 5.25 has 53 such families, 5.7 has 28; every release >= 5.7 has the classic ones.
    assert CLASSIC <= set(FAMILIES), FAMILIES


def test_registered_in_the_interface_the_decorator_reads():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    assert hf.state()["registered"]
    assert ExpertsInterface._global_mapping[hf.NAME] is hf.experts_forward
    assert ALL_EXPERTS_FUNCTIONS.get_interface(hf.NAME, None) is hf.experts_forward


@pytest.mark.parametrize("family", family_params())
def test_logits_match_grouped_mm_and_op_runs_once_per_experts_call(family):
    model = build(family, "grouped_mm")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, SEQ), generator=g)  # 14 tokens: the grouped path
    with torch.inference_mode():
        ref32 = grouped_mm_runs(family, lambda: model(ids).logits)
        model.set_experts_implementation(hf.NAME)
        calls, handles = count_experts_calls(model)
        with CountOp() as counter:
            out32 = model(ids).logits
        for h in handles:
            h.remove()
        assert calls[0] >= 1 and counter.calls == calls[0], (counter.calls, calls[0])
        scale = ref32.abs().max().item()
        torch.testing.assert_close(out32, ref32, rtol=1e-5, atol=1e-5 * scale)

        model.to(torch.bfloat16)
        ours16 = model(ids).logits.float()
        model.set_experts_implementation("grouped_mm")
        theirs16 = model(ids).logits.float()
    err_ours = (ours16 - ref32).abs().max().item()
    err_theirs = (theirs16 - ref32).abs().max().item()
    # bf16 rounding differs (ours rounds once, grouped_mm also rounds each weighted row): no farther
    # from float32 than grouped_mm's own bf16 logits, with slack for where the roundings land.
    assert err_ours <= 1.5 * err_theirs + 2 ** -8 * scale, (err_ours, err_theirs, scale)


@pytest.mark.parametrize("family", family_params())
def test_generate_keeps_the_backend(family):
    model = build(family, hf.NAME)
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    calls, handles = count_experts_calls(model)
    try:
        with CountOp() as counter:
            ours = model.generate(ids, **kwargs)
    except Exception:
        model.set_experts_implementation("grouped_mm")
        grouped_mm_runs(family, lambda: model.generate(ids, **kwargs))  # skips if grouped_mm fails too
        raise
    for h in handles:
        h.remove()
    assert model.config._experts_implementation == hf.NAME
    assert calls[0] >= 3 and counter.calls == calls[0], (counter.calls, calls[0])  # prefill and decode steps
    model.set_experts_implementation("grouped_mm")
    theirs = model.generate(ids, **kwargs)
    assert torch.equal(ours, theirs)


@pytest.fixture
def qwen_experts():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=4)
    experts = Qwen3MoeExperts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return experts


def routing(tokens, topk, num_experts, g, ids_high=None):
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:topk] for _ in range(tokens)])
    weights = torch.rand(tokens, topk, generator=g).softmax(-1)
    return ids, weights


def float64_reference(experts, hidden, ids, weights):
    """Each slot's expert on its token in float64, weighted and summed; ids >= num_experts skipped."""
    e = experts.double()
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            x = int(ids[t, j])
            if x >= e.num_experts:
                continue
            gate, up = torch.nn.functional.linear(hidden[t].double(), e.gate_up_proj[x]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(e.act_fn(gate) * up, e.down_proj[x])
            out[t] += weights[t, j].double() * y
    experts.float()
    return out


@pytest.mark.parametrize("placeholder_weight", [0.0, float("nan")], ids=["weight_0", "weight_nan"])
@pytest.mark.parametrize("tokens", [2, 40], ids=["2_tokens", "40_tokens"])
def test_expert_parallel_placeholders_are_skipped(qwen_experts, tokens, placeholder_weight):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(tokens, 32, generator=g)
    ids, weights = routing(tokens, 4, 8, g)
    # Placeholders as transformers' EP dispatch makes them: an id past the local experts, weight 0.
    # With a NaN weight there, only a slot that is really skipped (never read) leaves the output finite.
    placed = torch.rand(tokens, 4, generator=g) < 0.4
    ids = ids.masked_fill(placed, 8)
    weights = weights.masked_fill(placed, placeholder_weight)
    ids_before, weights_before = ids.clone(), weights.clone()
    # transformers >= 5.18 marks expert-parallel modules (its grouped_mm masks placeholders only in
    # those); before, there is no mark and every call masks them: then the module is left unmarked.
    if hasattr(qwen_experts, "_is_expert_parallel"):
        qwen_experts._is_expert_parallel = True
    with torch.inference_mode():
        ours = hf.experts_forward(qwen_experts, hidden, ids, weights)
        theirs = hf._grouped_mm_forward(qwen_experts, hidden, ids, weights)
    assert torch.equal(ids, ids_before) and torch.allclose(weights, weights_before, equal_nan=True)  # untouched
    ref = float64_reference(qwen_experts, hidden, ids, weights)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    if placeholder_weight == 0.0:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_experts_module_without_the_newer_attributes(qwen_experts):
    # As transformers 5.7 to 5.17 build experts modules: no _is_expert_parallel (their grouped_mm
    # masks placeholders in every call) and no has_post_expert_norm (no such step). Under any release
    # the backend reads a missing attribute that way, never as an AttributeError.
    for name in ("_is_expert_parallel", "has_post_expert_norm"):
        if hasattr(qwen_experts, name):
            delattr(qwen_experts, name)
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(12, 32, generator=g)
    ids, weights = routing(12, 4, 8, g)
    placed = torch.rand(12, 4, generator=g) < 0.4
    ids, weights = ids.masked_fill(placed, 8), weights.masked_fill(placed, float("nan"))
    with torch.inference_mode(), CountOp() as counter:
        ours = hf.experts_forward(qwen_experts, hidden, ids, weights)
    assert counter.calls == 1
    ref = float64_reference(qwen_experts, hidden, ids, weights)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 4, 5, 64], ids=["1_token", "4_tokens", "5_tokens", "64_tokens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_token_counts_match_float64(qwen_experts, tokens, dtype):
    g = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, 32, generator=g).to(dtype)
    ids, weights = routing(tokens, 4, 8, g)
    ids[0, 1] = ids[0, 0]  # routers give distinct ids; the backend must not rely on it
    experts = qwen_experts.to(dtype)
    with torch.inference_mode():
        ours = hf.experts_forward(experts, hidden, ids, weights)
    ref = float64_reference(experts.float(), hidden, ids, weights)
    experts.to(dtype)
    assert ours.dtype == dtype
    # float32: float32 rounding. bfloat16: the GEMMs' bf16 rounding of their inputs and outputs
    # (the combine itself is float32): 2^-6 relative to the output's scale.
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("tokens", [3, 40], ids=["3_tokens", "40_tokens"])
def test_post_expert_norm_experts(tokens):
    # The one family with a post-expert norm (MuseSpark) is not a causal LM: its experts alone.
    import inspect

    from transformers.integrations.moe import use_experts_implementation

    if "has_post_expert_norm" not in inspect.signature(use_experts_implementation).parameters:
        pytest.skip(f"transformers {transformers.__version__} has no post-expert norm (it came in 5.20)")
    from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig
    from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts

    cfg = MuseSparkTextConfig(moe_hidden_size=32, moe_intermediate_size=24, num_local_experts=8, hidden_size=32,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(6)
    experts = MuseSparkExperts(cfg)
    assert experts.has_post_expert_norm
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.3)
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(tokens, 32, generator=g)
    ids, weights = routing(tokens, 4, 8, g)
    with torch.inference_mode():
        ours = hf.experts_forward(experts, hidden, ids, weights)
        theirs = hf._grouped_mm_forward(experts, hidden, ids, weights)
        experts.has_post_expert_norm = False
        unnormed = hf._grouped_mm_forward(experts, hidden, ids, weights)
    assert not torch.allclose(unnormed, theirs, rtol=1e-3, atol=1e-3)  # the norm matters to this check
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_grad_mode_falls_back_to_grouped_mm_and_says_so_once(qwen_experts, caplog, monkeypatch):
    monkeypatch.setattr(hf, "_warned_grad", False)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(24, 32, generator=g, requires_grad=True)
    ids, weights = routing(24, 4, 8, g)
    with caplog.at_level(logging.WARNING, logger="fused_moe_ops"), CountOp() as counter:
        out = hf.experts_forward(qwen_experts, hidden, ids, weights)
        hf.experts_forward(qwen_experts, hidden, ids, weights)
    assert counter.calls == 0
    assert sum("has no backward" in r.getMessage() for r in caplog.records) == 1
    out.sum().backward()  # grouped_mm's graph: backward works
    assert hidden.grad is not None and qwen_experts.down_proj.grad is not None
    with torch.no_grad(), CountOp() as counter:
        hf.experts_forward(qwen_experts, hidden, ids, weights)
    assert counter.calls == 1  # no_grad: the op


def test_compiled_backend_gets_the_fusion_pass(qwen_experts):
    import inspect

    import torch._inductor.config as inductor_config
    from transformers.integrations.moe import grouped_mm_experts_forward

    # Under torch.compile the backend traces grouped_mm's forward, whose combine the pass rewrites
    # (and Inductor then chooses between the op and its own code): the same graph as grouped_mm's.
    # transformers 5.7 to 5.16 zero the placeholder rows after the weight multiply, in every call (a
    # masked_fill of the weighted rows): a combine the pass leaves to Inductor there.
    rewritable = "weighted_out.masked_fill_" not in inspect.getsource(grouped_mm_experts_forward)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(24, 32, generator=g)
    ids, weights = routing(24, 4, 8, g)
    fused_moe_ops.reset_fusion_stats()
    compiled = torch.compile(lambda h, i, w: hf.experts_forward(qwen_experts, h, i, w), fullgraph=True)
    # A compile served from the FX graph cache runs no pass and counts no rewrite.
    with torch.inference_mode(), inductor_config.patch(fx_graph_cache=False):
        out = compiled(hidden, ids, weights)
        ref = hf._grouped_mm_forward(qwen_experts, hidden, ids, weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    rewrites = fused_moe_ops.fusion_stats()["by_pattern"].get("weighted_rows_sum", 0)
    if not rewritable:
        assert rewrites == 0, fused_moe_ops.fusion_stats()  # when the pass learns that form, say so here
        pytest.skip(f"transformers {transformers.__version__}'s grouped_mm masks the weighted rows: not rewritten")
    assert rewrites >= 1, fused_moe_ops.fusion_stats()


# --- transformers absent, too old, imported before or after ----------------------------------------

def _run(code: str, tmp_path=None, pythonpath=()) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, cwd=str(ROOT), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


REPORT = """
    import json, sys
    {before}
    import fused_moe_ops
    from fused_moe_ops.integrations import transformers as hf
    loaded = sys.modules.get("transformers") is not None
    {after}
    from fused_moe_ops.__main__ import collect, render
    print(json.dumps({{"loaded_by_import": loaded, "state": hf.state(), "report": render(collect()),
                      "absent": globals().get("absent")}}))
"""


def test_absent_then_imported_later_registers_on_the_import():
    # One interpreter, two facts: with transformers unimportable the import registers nothing and
    # fails nothing (the report says so); once transformers' experts interface is imported, the
    # backend is registered in it.
    info = _run(REPORT.format(before="sys.modules['transformers'] = None  # as if not installed", after="""
    try:
        import transformers
    except ImportError:
        pass
    from fused_moe_ops.__main__ import collect, render
    absent = {"state": hf.state(), "report": render(collect())}
    del sys.modules["transformers"]
    from transformers.integrations.moe import ExpertsInterface
    assert ExpertsInterface._global_mapping["fused_moe_ops"] is hf.experts_forward"""))
    assert not info["loaded_by_import"]
    absent = info["absent"]
    assert not absent["state"]["registered"] and absent["state"]["reason"] == "transformers is not installed", absent
    assert "not registered: transformers is not installed" in absent["report"]
    assert info["state"]["registered"] and not info["state"]["pending"], info["state"]
    assert 'experts_implementation="fused_moe_ops" registered' in info["report"]


def test_registers_at_once_when_transformers_was_imported_first():
    info = _run(REPORT.format(before="import transformers.integrations.moe", after=""))
    assert info["state"]["registered"], info["state"]


def test_old_transformers_registers_nothing_and_fails_nothing(tmp_path):
    pkg = tmp_path / "transformers"
    (pkg / "integrations").mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "5.6.0"\n')
    (pkg / "integrations" / "__init__.py").write_text("")
    (pkg / "integrations" / "moe.py").write_text(
        "class ExpertsInterface:\n    _global_mapping = {}\n"
        "    @classmethod\n    def register(cls, k, v):\n        cls._global_mapping[k] = v\n")
    info = _run(REPORT.format(before="", after="""
    from transformers.integrations.moe import ExpertsInterface
    assert ExpertsInterface._global_mapping == {}"""), pythonpath=[tmp_path])
    assert not info["state"]["registered"] and "5.6.0 < 5.7" in info["state"]["reason"], info["state"]
    assert "5.6.0 < 5.7" in info["report"]
