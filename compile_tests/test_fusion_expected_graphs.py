"""Issue 3, item 5: the post-pass graph of representative spellings, pinned with expecttest so that a
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
    view_1 = torch.ops.aten.reshape.default(arg0_1, [5, 2, 1]);  arg0_1 = None
    convert_element_type = torch.ops.prims.convert_element_type.default(view_1, torch.bfloat16);  view_1 = None
    lt_scalar = torch.ops.aten.lt.Scalar(arg2_1, 0)
    lt_scalar_1 = torch.ops.aten.lt.Scalar(arg2_1, -13)
    add_tensor = torch.ops.aten.add.Tensor(arg2_1, 13)
    scalar_tensor_default = torch.ops.aten.scalar_tensor.default(13, dtype = torch.int64, layout = torch.strided, device = device(type='cpu'))
    where_self = torch.ops.aten.where.self(lt_scalar_1, scalar_tensor_default, add_tensor);  lt_scalar_1 = scalar_tensor_default = add_tensor = None
    where_self_1 = torch.ops.aten.where.self(lt_scalar, where_self, arg2_1);  lt_scalar = where_self = arg2_1 = None
    view_default = torch.ops.aten.view.default(convert_element_type, [5, 2]);  convert_element_type = None
    shuffle_mul_sum_default = torch.ops.moe.shuffle_mul_sum.default(arg1_1, where_self_1, view_default);  arg1_1 = where_self_1 = view_default = None
    return (shuffle_mul_sum_default,)""")

    def test_weights_before_gather(self):
        self.assertExpectedInline(post_pass_graph("weights_before_gather"), """\
def forward(self, arg0_1, arg1_1, arg2_1):
    unsqueeze = torch.ops.aten.unsqueeze.default(arg2_1, -1);  arg2_1 = None
    lt_scalar = torch.ops.aten.lt.Scalar(arg0_1, 0)
    lt_scalar_1 = torch.ops.aten.lt.Scalar(arg0_1, -13)
    add_tensor = torch.ops.aten.add.Tensor(arg0_1, 13)
    scalar_tensor_default = torch.ops.aten.scalar_tensor.default(13, dtype = torch.int64, layout = torch.strided, device = device(type='cpu'))
    where_self = torch.ops.aten.where.self(lt_scalar_1, scalar_tensor_default, add_tensor);  lt_scalar_1 = scalar_tensor_default = add_tensor = None
    where_self_1 = torch.ops.aten.where.self(lt_scalar, where_self, arg0_1);  lt_scalar = where_self = arg0_1 = None
    view_default = torch.ops.aten.view.default(unsqueeze, [13]);  unsqueeze = None
    index_tensor = torch.ops.aten.index.Tensor(view_default, [where_self_1]);  view_default = None
    view_default_1 = torch.ops.aten.view.default(index_tensor, [5, 2]);  index_tensor = None
    shuffle_mul_sum_default = torch.ops.moe.shuffle_mul_sum.default(arg1_1, where_self_1, view_default_1);  arg1_1 = where_self_1 = view_default_1 = None
    return (shuffle_mul_sum_default,)""")

    def test_einsum(self):
        self.assertExpectedInline(post_pass_graph("einsum"), """\
def forward(self, arg0_1, arg1_1, arg2_1):
    unsqueeze = torch.ops.aten.unsqueeze.default(arg0_1, 2);  arg0_1 = None
    lt_scalar = torch.ops.aten.lt.Scalar(arg2_1, 0)
    lt_scalar_1 = torch.ops.aten.lt.Scalar(arg2_1, -13)
    add_tensor = torch.ops.aten.add.Tensor(arg2_1, 13)
    scalar_tensor_default = torch.ops.aten.scalar_tensor.default(13, dtype = torch.int64, layout = torch.strided, device = device(type='cpu'))
    where_self = torch.ops.aten.where.self(lt_scalar_1, scalar_tensor_default, add_tensor);  lt_scalar_1 = scalar_tensor_default = add_tensor = None
    where_self_1 = torch.ops.aten.where.self(lt_scalar, where_self, arg2_1);  lt_scalar = where_self = arg2_1 = None
    view_default = torch.ops.aten.view.default(unsqueeze, [5, 2]);  unsqueeze = None
    shuffle_mul_sum_default = torch.ops.moe.shuffle_mul_sum.default(arg1_1, where_self_1, view_default);  arg1_1 = where_self_1 = view_default = None
    return (shuffle_mul_sum_default,)""")

    def test_upcast_bf16(self):
        self.assertExpectedInline(post_pass_graph("upcast", torch.bfloat16), """\
def forward(self, arg0_1, arg1_1, arg2_1):
    unsqueeze = torch.ops.aten.unsqueeze.default(arg0_1, -1);  arg0_1 = None
    lt_scalar = torch.ops.aten.lt.Scalar(arg2_1, 0)
    lt_scalar_1 = torch.ops.aten.lt.Scalar(arg2_1, -13)
    add_tensor = torch.ops.aten.add.Tensor(arg2_1, 13)
    scalar_tensor_default = torch.ops.aten.scalar_tensor.default(13, dtype = torch.int64, layout = torch.strided, device = device(type='cpu'))
    where_self = torch.ops.aten.where.self(lt_scalar_1, scalar_tensor_default, add_tensor);  lt_scalar_1 = scalar_tensor_default = add_tensor = None
    where_self_1 = torch.ops.aten.where.self(lt_scalar, where_self, arg2_1);  lt_scalar = where_self = arg2_1 = None
    view_default = torch.ops.aten.view.default(unsqueeze, [5, 2]);  unsqueeze = None
    shuffle_mul_sum_default = torch.ops.moe.shuffle_mul_sum.default(arg1_1, where_self_1, view_default);  arg1_1 = where_self_1 = view_default = None
    return (shuffle_mul_sum_default,)""")
