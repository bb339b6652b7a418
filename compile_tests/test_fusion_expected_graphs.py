"""The post-pass graph of representative spellings, pinned with expecttest so that a
change in what the pass emits shows up as a readable diff.

To update after an intended change: EXPECTTEST_ACCEPT=1 python -m pytest compile_tests/test_fusion_expected_graphs.py
"""
from __future__ import annotations

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

import fused_moe_ops
from fusion_cases import BY_NAME, make_inputs

# An optional test dependency (pyproject's [test] extra): without it this module skips alone.
expecttest = pytest.importorskip("expecttest")


class _Capture(CustomGraphPass):
    """Runs after the fusion (composed with it) and keeps the graph's code."""

    def __init__(self) -> None:
        self.code = None

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.code = graph.python_code(root_module="self").src.strip()

    def uuid(self):
        return None  # never cache: the test needs the pass to run


def post_pass_graph(name: str, dtype=torch.float32, m: int = 5) -> str:
    sp = BY_NAME[name]
    capture = _Capture()
    with inductor_config.patch(post_grad_custom_post_pass=fused_moe_ops.fusion.compose_with(capture)):
        torch.compile(sp.fn)(*make_inputs(sp, m, dtype))
    assert fused_moe_ops.fusion_stats()["rewrites"] == 1
    return "\n".join(line.rstrip() for line in capture.code.splitlines())


_TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


# Node names and printing are torch-version details: pinned on the version CI runs (2.13 / 2.14).
@pytest.mark.skipif(_TORCH < (2, 13), reason="graphs pinned with torch 2.13/2.14; re-record with EXPECTTEST_ACCEPT=1")
class TestExpectedGraphs(expecttest.TestCase):
    def setUp(self):
        torch._dynamo.reset()
        fused_moe_ops.reset_fusion_stats()

    def test_seed_bf16(self):
        self.assertExpectedInline(post_pass_graph("seed", torch.bfloat16), """\
def forward(self, arg0_1, arg1_1, arg2_1):
    _shuffle_mul_sum_fused_default = torch.ops.moe._shuffle_mul_sum_fused.default(arg1_1, arg2_1, arg0_1, None, 1, 2);  arg1_1 = arg2_1 = arg0_1 = None
    return (_shuffle_mul_sum_fused_default,)""")

    def test_weights_before_gather(self):
        self.assertExpectedInline(post_pass_graph("weights_before_gather"), """\
def forward(self, arg0_1, arg1_1, arg2_1):
    view_default = torch.ops.aten.view.default(arg0_1, [-1, 2]);  arg0_1 = None
    _shuffle_mul_sum_fused_default = torch.ops.moe._shuffle_mul_sum_fused.default(arg1_1, view_default, arg2_1, None, 1);  arg1_1 = view_default = arg2_1 = None
    return (_shuffle_mul_sum_fused_default,)""")

    def test_einsum(self):
        self.assertExpectedInline(post_pass_graph("einsum"), """\
def forward(self, arg0_1, arg1_1, arg2_1):
    _shuffle_mul_sum_fused_default = torch.ops.moe._shuffle_mul_sum_fused.default(arg1_1, arg2_1, arg0_1, None, 1);  arg1_1 = arg2_1 = arg0_1 = None
    return (_shuffle_mul_sum_fused_default,)""")

    def test_upcast_bf16(self):
        self.assertExpectedInline(post_pass_graph("upcast", torch.bfloat16), """\
def forward(self, arg0_1, arg1_1, arg2_1):
    _shuffle_mul_sum_fused_default = torch.ops.moe._shuffle_mul_sum_fused.default(arg1_1, arg2_1, arg0_1, None, 1);  arg1_1 = arg2_1 = arg0_1 = None
    return (_shuffle_mul_sum_fused_default,)""")
