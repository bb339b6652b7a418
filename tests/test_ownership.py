"""The native kernels release every tensor they are given, and hand their result over whole.

The boxed kernels (csrc/shuffle_mul_sum.h, namespace boxed) unbox the dispatcher's stack by hand:
each tensor argument arrives as an owning handle, an optional one behind a heap-allocated stack
value, and the result leaves as one. A handle kept is a tensor (and its memory) that never dies;
a handle released twice is a use after free. Detected here through PyTorch's PyObject
preservation: a tensor whose C++ side is still referenced keeps its Python object, so a weak
reference to it survives the call. Every path that takes or creates a handle: each overload,
`permutation=None`, the optional tensors of the internal op, an error raised after the arguments
were taken, and the rare paths that make a dense copy (strided input, expanded addend, strided out).
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from _moe_testlib import DEVICES

import fused_moe_ops  # noqa: F401  (registers the op)

op = torch.ops.moe.shuffle_mul_sum
fused = torch.ops.moe._shuffle_mul_sum_fused


def _functional(dev):
    x, p, w = torch.randn(6, 8, device=dev), torch.tensor([0, 5, -1, 3], device=dev), torch.rand(2, 2, device=dev)
    return (x, p, w), lambda: op(x, p, w)


def _identity(dev):
    x, w = torch.randn(4, 8, device=dev), torch.rand(2, 2, device=dev)
    return (x, w), lambda: op(x, None, w, torch.bfloat16)


def _out(dev):
    x, p, w = torch.randn(6, 8, device=dev), torch.tensor([0, 5, -1, 3], device=dev), torch.rand(2, 2, device=dev)
    out = torch.empty(2, 8, device=dev)
    return (x, p, w, out), lambda: op.out(x, p, w, out=out)


def _out_strided(dev):  # written through a dense temporary, then copied
    x, p, w = torch.randn(6, 8, device=dev), torch.tensor([0, 5, -1, 3], device=dev), torch.rand(2, 2, device=dev)
    out = torch.empty(8, 2, device=dev).t()
    return (x, p, w, out), lambda: op.out(x, p, w, out=out)


def _strided_input(dev):  # made dense first
    x = torch.randn(8, 6, device=dev).t()
    p, w = torch.tensor([0, 5, -1, 3], device=dev), torch.rand(2, 2, device=dev)
    return (x, p, w), lambda: op(x, p, w)


def _fused_all_options(dev):
    x, p, w = torch.randn(6, 8, device=dev), torch.tensor([[0, 5], [-1, 3]], device=dev), torch.rand(2, 2, device=dev)
    addend, mask = torch.randn(2, 8, device=dev), torch.tensor([False, True, False, False, False, True], device=dev)
    return (x, p, w, addend, mask), lambda: fused(x, p, w, None, 1, 2, 0.5, addend, mask)


def _fused_addend(shape):  # an addend the kernel cannot read in place: expanded, or reshaped, first
    def make(dev):
        x, p = torch.randn(6, 8, device=dev), torch.tensor([[0, 5], [-1, 3]], device=dev)
        w, addend = torch.rand(2, 2, device=dev), torch.randn(*shape, device=dev)
        return (x, p, w, addend), lambda: fused(x, p, w, torch.float32, 0, 0, 1.0, addend, None)
    return make


def _error_after_unboxing(dev):  # IndexError from the range check, every handle already taken
    x, p, w = torch.randn(6, 8, device=dev), torch.tensor([0, 5, 6, 3], device=dev), torch.rand(2, 2, device=dev)
    return (x, p, w), lambda: op(x, p, w)


def _error_in_fused_checks(dev):
    x, p, w = torch.randn(6, 8, device=dev), torch.tensor([[0, 5], [1, 3]], device=dev), torch.rand(2, 2, device=dev)
    addend = torch.randn(3, 8, device=dev)  # does not broadcast to (2, 8)
    return (x, p, w, addend), lambda: fused(x, p, w, None, 0, 0, 1.0, addend, None)


scatter = torch.ops.moe.scatter_mul_sum
scatter_fused = torch.ops.moe._scatter_mul_sum_fused


def _scatter(dev):
    x, idx, w = torch.randn(6, 8, device=dev), torch.tensor([1, 0, -1, 1, 2, 0], device=dev), torch.rand(6, device=dev)
    return (x, idx, w), lambda: scatter(x, idx, w, 3)


def _scatter_no_factors(dev):  # the optional factors absent
    x, idx = torch.randn(6, 8, device=dev), torch.tensor([1, 0, -1, 1, 2, 0], device=dev)
    return (x, idx), lambda: scatter(x, idx, None, 3, torch.bfloat16)


def _scatter_fused_strided_input_expanded_addend(dev):  # input made dense, addend expanded: two new tensors
    x, idx = torch.randn(8, 6, device=dev).t(), torch.tensor([-3, 0, -1, 1, 2, 0], device=dev)
    w, addend = torch.rand(6, device=dev), torch.randn(3, 1, device=dev)
    return (x, idx, w, addend), lambda: scatter_fused(x, idx, w, 3, None, 1, 2, 0.5, addend)


def _scatter_error_after_unboxing(dev):  # IndexError from the range check, every handle already taken
    x, idx, w = torch.randn(6, 8, device=dev), torch.tensor([1, 0, 3, 1, 2, 0], device=dev), torch.rand(6, device=dev)
    addend = torch.randn(3, 8, device=dev)
    return (x, idx, w, addend), lambda: scatter_fused(x, idx, w, 3, None, 0, 0, 1.0, addend)


def _scatter_error_in_checks(dev):
    x, idx, w = torch.randn(6, 8, device=dev), torch.tensor([1, 0, 1, 1, 2, 0], device=dev), torch.rand(5, device=dev)
    return (x, idx, w), lambda: scatter(x, idx, w, 3)


CALLS = {
    "functional": _functional, "identity-None_out-dtype": _identity, "out": _out,
    "out-strided-temporary": _out_strided, "strided-input-made-dense": _strided_input,
    "fused-every-option": _fused_all_options, "fused-column-addend-expanded": _fused_addend((2, 1)),
    "fused-3d-addend-reshaped": _fused_addend((1, 2, 8)),
    "error-after-unboxing": _error_after_unboxing, "error-in-fused-checks": _error_in_fused_checks,
    "scatter": _scatter, "scatter-factors-None": _scatter_no_factors,
    "scatter-fused-strided-input-expanded-addend": _scatter_fused_strided_input_expanded_addend,
    "scatter-error-after-unboxing": _scatter_error_after_unboxing, "scatter-error-in-checks": _scatter_error_in_checks,
}


def _surviving(make, dev, mode):
    """Names of the call's tensors (arguments and result) still alive once the caller dropped them."""
    alive = {}

    def call_and_drop():
        with mode():
            tensors, call = make(dev)
            for i, t in enumerate(tensors):
                alive[f"argument {i}"] = weakref.ref(t)
            try:
                alive["result"] = weakref.ref(call())
            except (RuntimeError, IndexError):
                pass

    call_and_drop()
    gc.collect()
    return [name for name, ref in alive.items() if ref() is not None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
@pytest.mark.parametrize("name", list(CALLS))
def test_every_tensor_is_released(device, mode, name):
    assert _surviving(CALLS[name], device, mode) == []


def test_the_probe_sees_a_reference_held_in_cpp():
    """The detector itself: a tensor referenced only from C++ (an autograd node's saved tensor)
    survives its last Python reference, and dies with that node."""
    graph = []

    def make(dev):
        x, w = torch.randn(4, 8), torch.rand(4, 8, requires_grad=True)
        graph.append(x * w)  # MulBackward saves x
        return (x,), lambda: op(x, None, torch.rand(2, 2))

    assert _surviving(make, "cpu", torch.enable_grad) == ["argument 0"]
    graph.clear()
    gc.collect()
    assert _surviving(CALLS["functional"], "cpu", torch.enable_grad) == []
