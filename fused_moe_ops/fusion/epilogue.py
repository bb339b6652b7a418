"""Fusion 4: the combine's consumer, folded into the op the other fusions emitted.

In models the combine feeds a scale (DeepSeek's ``routed_scaling_factor``) or an add (the residual,
a shared expert's output). Without the pass Inductor fuses those into its own combine kernel; after
the rewrite they would be one more launch reading the op's output again. So, on the post-grad graph
the other fusions left (this runs after them, on the ops they emitted)::

    mul.Tensor(OUT, s) | mul.Tensor(s, OUT)          s a Python number
        -> the op's scale *= s                       (only while it has no addend)
    add.Tensor(OUT, a) | add.Tensor(a, OUT)          a a tensor
        -> the op's addend = a                       (only while it has none)

    OUT = OP's (M, K) result, or a view of it (``out.reshape(b, s, h) + residual``)
    OP  = moe._shuffle_mul_sum_fused(...) with that single user

each only where the consumer's result has OP's dtype and OUT's shape (so the op's one rounding at
the end is what Inductor's fused kernel does too) and ``a`` is an addend the op takes: broadcastable
to (M, K), or exactly OUT's shape when OUT is a view ending in K. The op computes
``scale * sum + addend`` in float32 and rounds once. Folding edits the op node's arguments in place;
no node is added, so symbolic sizes need no handling.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Node

from . import _state
from ._common import RESHAPES, _OP
from ._match import (FLOAT_DTYPES, NoMatch, _reads_metadata_only, aten, log, require, same, same_shape,
                     single_user, tensor_val)

NAME_SCALE = "epilogue_scale"
NAME_ADD = "epilogue_add"

_ARGS = ("input", "permutation", "factors", "out_dtype", "negative_index", "factor_round", "scale", "addend",
         "row_mask")
_DEFAULTS = (None, 0, 0, 1.0, None, None)  # of out_dtype .. row_mask: a traced call leaves trailing defaults out


def _full_args(op: Node) -> list:
    args = list(op.args)
    return args + list(_DEFAULTS[len(args) - 3:])


def _trim(args: list) -> tuple:
    """The traced form: trailing defaults left out."""
    args = list(args)
    while len(args) > 3:
        default, last = _DEFAULTS[len(args) - 4], args[-1]
        if not (last is None if default is None else (not isinstance(last, Node) and last == default)):
            break
        args.pop()
    return tuple(args)


def _set_args(op: Node, args: list) -> None:
    """Write the arguments back, and the example values Inductor keeps beside them
    (``eager_input_vals``: it fixes the op's input layouts from them, argument by argument)."""
    op.args = _trim(args)
    if "eager_input_vals" in op.meta:
        _, fake_kwargs = op.meta["eager_input_vals"]
        op.meta["eager_input_vals"] = (
            tuple(a.meta["val"] if isinstance(a, Node) else a for a in op.args), fake_kwargs)


def _data_user(node: Node) -> Optional[Node]:
    """The one user that reads the data, if there is exactly one."""
    if not single_user(node):
        return None
    return next(u for u in node.users if not _reads_metadata_only(u))


def _other_operand(consumer: Node, produced: Node):
    require(consumer.op == "call_function" and len(consumer.args) == 2 and not consumer.kwargs,
            "not a plain binary op")
    a, b = consumer.args
    require(produced in (a, b) and a is not b, "the op's result is not one operand")
    return b if a is produced else a


def _fold_scale(op: Node, args: list, produced: Node, consumer: Node) -> None:
    s = _other_operand(consumer, produced)
    require(isinstance(s, (int, float)) and not isinstance(s, bool), f"scale {s!r} is not a Python number")
    args[_ARGS.index("scale")] = float(args[_ARGS.index("scale")]) * float(s)
    _set_args(op, args)


def _fold_add(op: Node, args: list, produced: Node, consumer: Node) -> None:
    a = _other_operand(consumer, produced)
    require(isinstance(a, Node), "the addend is not a tensor")
    av, ov = tensor_val(a), tensor_val(op)
    require(av.dtype in FLOAT_DTYPES and av.device == ov.device, f"addend {av.dtype} on {av.device}")
    m, k = ov.shape
    if produced is op:
        require(av.dim() <= 2 and all(same(d, want) or same(d, 1) for d, want in zip(reversed(av.shape), (k, m))),
                "the addend does not broadcast to (M, K)")
    else:
        pv = tensor_val(produced)
        require(pv.dim() > 2 and same_shape(av.shape, pv.shape) and same(pv.shape[-1], k),
                "the addend is not the viewed result's shape")
    if _after(a, op):
        # The addend is computed after the op (a shared expert): folding it moves the op, and its
        # view, down to just before the add. That pays only where the add would be a kernel of its
        # own. Where a pointwise op reads the sum (the residual add of a decoder layer), Inductor
        # computes the add inside that op's kernel anyway, and the move only reorders the graph, which
        # Inductor's fusion of unrelated kernels follows (Qwen2-MoE, 1 token: one kernel more).
        require(not _read_pointwise(consumer), "a pointwise op reads the sum")
        # Their inputs all come before the add; nothing else may read them in between.
        require(all(len(n.users) == 1 for n in {op, produced}), "the op's result has metadata users")
        consumer.prepend(op)
        if produced is not op:
            consumer.prepend(produced)
    args[_ARGS.index("addend")] = a
    _set_args(op, args)


def _read_pointwise(n: Node) -> bool:
    """Whether a pointwise op reads ``n``'s result, directly or through views."""
    for u in n.users:
        if u.op != "call_function":
            continue
        if u.target in RESHAPES and _read_pointwise(u):
            return True
        if torch.Tag.pointwise in getattr(u.target, "tags", ()):
            return True
    return False


def _after(a: Node, b: Node) -> bool:
    """Whether node ``a`` comes after node ``b`` in the graph."""
    for n in a.graph.nodes:
        if n is b:
            return True
        if n is a:
            return False
    return False


def _fold_one(op: Node) -> Optional[str]:
    """Fold the consumer of one op into it; return what was folded, or None."""
    args = _full_args(op)
    produced = op
    consumer = _data_user(op)
    if consumer is not None and consumer.target in RESHAPES:
        produced, consumer = consumer, _data_user(consumer)
    if consumer is None or consumer.target not in (aten.mul.Tensor, aten.add.Tensor):
        return None
    try:
        require(args[_ARGS.index("addend")] is None, "the op already has an addend")
        result, pv = tensor_val(consumer), tensor_val(produced)
        require(result.dtype == tensor_val(op).dtype, f"the consumer's result is {result.dtype}")
        require(same_shape(result.shape, pv.shape), "the consumer broadcasts the op's result")
        if consumer.target is aten.mul.Tensor:
            _fold_scale(op, args, produced, consumer)
            name = NAME_SCALE
        else:
            _fold_add(op, args, produced, consumer)
            name = NAME_ADD
    except NoMatch as e:
        log.debug("fused_moe_ops: %s not folded into the op: %s", consumer, e)
        return None
    consumer.replace_all_uses_with(produced)
    consumer.graph.erase_node(consumer)
    _state.count(name)
    log.info("fused_moe_ops: folded %s (%s) into %s", name, consumer.name, op.name)
    return name


def fold_epilogues(graph: torch.fx.Graph) -> int:
    """Fold every foldable consumer of the ops in ``graph``; return how many were folded. A scale
    folded in can expose an add behind it, so each op is tried until nothing more folds."""
    folded = 0
    for op in [n for n in graph.nodes if n.op == "call_function" and n.target is _OP]:
        while _fold_one(op):
            folded += 1
    return folded
