"""The pass's API: installation, composition with a user's pass, the off switches, the cache key,
the counters, the log line and the should_rewrite hook."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter

import torch
import torch._inductor.config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

import fused_moe_ops
from fused_moe_ops import fusion
from fusion_cases import BY_NAME, assert_fused, assert_not_fused, fusion_log, make_inputs

SEED = BY_NAME["seed"]


def _compile_seed(dtype=torch.float32):
    args = make_inputs(SEED, 5, dtype)
    out, codes = run_and_get_code(torch.compile(SEED.fn), *args)
    return out, "\n".join(codes)


class UserPass(CustomGraphPass):
    """Stands for a user's own post-grad pass: records what it saw."""

    def __init__(self, tag="v1"):
        self.tag = tag
        self.saw_fused_op = []

    def __call__(self, graph):
        self.saw_fused_op.append(
            any(n.target is torch.ops.moe._shuffle_mul_sum_fused.default for n in graph.nodes)
        )

    def uuid(self):
        return f"user-pass-{self.tag}"


def test_installed_by_import():
    assert fusion.contains_fusion(inductor_config.post_grad_custom_post_pass)
    assert fused_moe_ops.fusion_enabled()
    for name in ("disable_fusion", "enable_fusion", "fusion_enabled", "fusion_stats", "reset_fusion_stats"):
        assert callable(getattr(fused_moe_ops, name)), name


def test_install_is_idempotent():
    before = inductor_config.post_grad_custom_post_pass
    assert fusion.install() is before
    assert fusion.install() is before
    assert inductor_config.post_grad_custom_post_pass is before


def test_existing_user_pass_runs_after_ours():
    fusion.uninstall()
    user = UserPass()
    inductor_config.post_grad_custom_post_pass = user
    fusion.install()  # what `import fused_moe_ops` does when the slot is taken
    slot = inductor_config.post_grad_custom_post_pass
    assert isinstance(slot, fusion.ComposedPass) and slot.passes == [fusion.FUSION_PASS, user]
    _, code = _compile_seed()
    assert_fused(code)
    assert user.saw_fused_op == [True], "the user's pass must run, after ours"
    fusion.install()
    assert inductor_config.post_grad_custom_post_pass is slot, "re-installing must not nest"


def test_user_pass_set_later_composes_with_compose_with():
    user = UserPass()
    inductor_config.post_grad_custom_post_pass = user  # overwrites ours: only theirs runs ...
    _, code = _compile_seed()
    assert_not_fused(code)
    assert user.saw_fused_op == [False]
    torch._dynamo.reset()
    # ... until composed (or fusion.install() is called again)
    inductor_config.post_grad_custom_post_pass = fusion.compose_with(user)
    _, code = _compile_seed()
    assert_fused(code)
    assert user.saw_fused_op == [False, True]


def test_config_patch_with_compose_with():
    user = UserPass()
    outer = inductor_config.post_grad_custom_post_pass
    with inductor_config.patch(post_grad_custom_post_pass=fusion.compose_with(user)):
        _, code = _compile_seed()
    assert inductor_config.post_grad_custom_post_pass is outer
    assert_fused(code)
    assert user.saw_fused_op == [True]


def test_compose_with_is_flat_and_skips_ours():
    a, b = UserPass("a"), UserPass("b")
    assert fusion.compose_with(None) is fusion.FUSION_PASS
    assert fusion.compose_with(fusion.FUSION_PASS) is fusion.FUSION_PASS
    composed = fusion.compose_with([a, fusion.compose_with(b)])
    assert composed.passes == [fusion.FUSION_PASS, a, b]


def test_uuid_depends_on_switch_source_and_user_pass(monkeypatch):
    ours = fusion.FUSION_PASS.uuid()
    assert ours and ours == fusion.FUSION_PASS.uuid()
    with fused_moe_ops.disable_fusion():
        off = fusion.FUSION_PASS.uuid()
    assert off != ours
    # the source hash: a change to any module of the package changes the key
    from fused_moe_ops.fusion import _pass

    monkeypatch.setattr(_pass, "_source_hash", "something else")
    assert fusion.FUSION_PASS.uuid() not in (ours, off)
    monkeypatch.undo()
    assert fusion.FUSION_PASS.uuid() == ours
    # composed: both uuids count; a pass without a uuid turns caching off (None), as Inductor would
    u1 = fusion.compose_with(UserPass("v1")).uuid()
    u2 = fusion.compose_with(UserPass("v2")).uuid()
    assert u1 and u2 and u1 != u2
    assert fusion.compose_with(lambda graph: None).uuid() is None


def test_sources_digest_covers_every_module():
    from pathlib import Path

    from fused_moe_ops.fusion import _pass

    names = sorted(p.name for p in Path(_pass.__file__).parent.glob("*.py"))
    assert {"gather_mul_sum.py", "bmm_combine.py", "weighted_rows_sum.py", "policy.py", "_match.py"} <= set(names)


def test_disable_fusion_plain_call_and_context_manager():
    fused_moe_ops.disable_fusion()
    try:
        assert not fused_moe_ops.fusion_enabled()
        _, code = _compile_seed()
        assert_not_fused(code)
        assert fused_moe_ops.fusion_stats()["rewrites"] == 0
    finally:
        fused_moe_ops.enable_fusion()
    assert fused_moe_ops.fusion_enabled()
    torch._dynamo.reset()
    with fused_moe_ops.disable_fusion():
        assert not fused_moe_ops.fusion_enabled()
        with fused_moe_ops.disable_fusion():  # nests
            pass
        assert not fused_moe_ops.fusion_enabled()
    assert fused_moe_ops.fusion_enabled()
    _, code = _compile_seed()
    assert_fused(code)


def test_env_var_disables_at_import():
    script = textwrap.dedent(
        """
        import torch, fused_moe_ops
        import torch._inductor.config as c
        print(fused_moe_ops.fusion_enabled(), c.post_grad_custom_post_pass is None)
        fused_moe_ops.enable_fusion()
        print(fused_moe_ops.fusion_enabled(), fused_moe_ops.fusion.contains_fusion(c.post_grad_custom_post_pass))
        """
    )
    env = dict(os.environ, FUSED_MOE_OPS_DISABLE_FUSION="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["False", "True", "True", "True"], res.stdout


def test_stats_and_reset():
    _compile_seed()
    _compile_seed(torch.bfloat16)
    stats = fused_moe_ops.fusion_stats()
    assert stats["rewrites"] == 2 and stats["by_pattern"] == {"gather_mul_sum": 2}
    assert fusion.FUSION_PASS.matched_count == 1  # the last graph
    fused_moe_ops.reset_fusion_stats()
    assert fused_moe_ops.fusion_stats()["rewrites"] == 0
    assert fused_moe_ops.fusion_stats()["by_pattern"] == {}


def test_stats_count_what_inductor_replays_from_its_cache():
    """A cache hit runs no pass: Inductor adds the counts the storing compile left in its counters.
    fusion_stats() takes those as rewrites (from_cache), never twice, and keeps its own counts when
    someone clears torch's counters. (A real hit in a fresh process: test_fusion_autotune.py.)"""
    from torch._dynamo.utils import counters

    _compile_seed()
    key = "fused_moe_ops.rewrite.gather_mul_sum"
    assert counters["inductor"][key] >= 1  # the compile left its count where Inductor caches it
    compiled = fused_moe_ops.fusion_stats()
    assert compiled["from_cache"] == 0
    counters["inductor"] += Counter({key: 2, "fused_moe_ops.lowered.op": 2})  # what a hit of a 2-rewrite graph does
    stats = fused_moe_ops.fusion_stats()
    lowered = {"op": compiled["lowered"].get("op", 0) + 2}
    assert stats == dict(stats, rewrites=3, by_pattern={"gather_mul_sum": 3}, lowered=lowered, from_cache=2), stats
    assert fused_moe_ops.fusion_stats() == stats  # read twice, counted once
    counters.clear()
    _compile_seed(torch.bfloat16)
    stats = fused_moe_ops.fusion_stats()
    assert stats == dict(stats, rewrites=4, by_pattern={"gather_mul_sum": 4}, from_cache=2), stats
    fused_moe_ops.reset_fusion_stats()
    assert fused_moe_ops.fusion_stats() == dict(stats, rewrites=0, by_pattern={}, lowered={}, from_cache=0)


def test_each_rewrite_is_logged_with_shapes():
    with fusion_log() as messages:
        _compile_seed(torch.float16)
    assert len(messages) == 1, messages
    msg = messages[0]
    for part in ("gather_mul_sum", "moe._shuffle_mul_sum_fused", "input (13, 16):float16", "permutation (10,):int64",
                 "m=5", "topk=2", "k=16", "out float16"):
        assert part in msg, (part, msg)


def test_should_rewrite_hook(monkeypatch):
    calls = []

    def never(device_type, m, topk, k, dtype):
        calls.append((device_type, m, topk, k, dtype))
        return False

    monkeypatch.setattr(fusion, "should_rewrite", never)
    _, code = _compile_seed(torch.bfloat16)
    assert_not_fused(code)
    assert calls == [("cpu", 5, 2, 16, torch.bfloat16)]
    assert fused_moe_ops.fusion_stats()["rewrites"] == 0
    assert fusion.should_rewrite("cpu", None, 2, 16, torch.float32) is not None


def test_policy_rewrites_any_topk_on_every_device():
    # Every kernel takes any topk (the CUDA kernel stages slots in chunks), so the default rule has no
    # hard limit: a symbolic topk (dynamic=True) is rewritten on CUDA too.
    from fused_moe_ops.fusion.policy import should_rewrite

    for device in ("cpu", "cuda"):
        for topk in (1, 8, 257, 4096, None):
            assert should_rewrite(device, None, topk, 4096, torch.bfloat16), (device, topk)
