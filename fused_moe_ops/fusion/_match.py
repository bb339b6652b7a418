"""Graph-reading helpers shared by the fusions (post-grad ATen FX graphs).

Everything here only *reads* the graph. Shapes come from ``node.meta["val"]`` (FakeTensors, possibly
with symbolic sizes) and are compared with ``statically_known_true`` so a check never adds a guard:
a comparison that cannot be decided for every value of the symbols counts as "no" and the
pattern is left alone.
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ops import FLOAT_DTYPES, INDEX_DTYPES

log = logging.getLogger("fused_moe_ops")

aten = torch.ops.aten
prims = torch.ops.prims

# Ops that keep the row-major (logical) order of the elements: x.op(...).reshape(s) == x.reshape(s).
ORDER_PRESERVING = (
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.default,
)
if hasattr(aten.squeeze, "dims"):
    ORDER_PRESERVING = ORDER_PRESERVING + (aten.squeeze.dims,)

CONVERT = prims.convert_element_type.default
GATHERS = (aten.index.Tensor, aten.index_select.default)


class NoMatch(Exception):
    """Raised by the analysis helpers: the subgraph is not (safely) the combine step."""


def require(cond: Any, why: str) -> None:
    if not cond:
        raise NoMatch(why)


def val(node: Any) -> Any:
    if isinstance(node, Node):
        return node.meta.get("val")
    return None


def tensor_val(node: Any) -> torch.Tensor:
    v = val(node)
    require(isinstance(v, torch.Tensor), f"no tensor metadata on {node}")
    return v


def same(a: Any, b: Any) -> bool:
    """a == b for every value of the shape symbols (never guards)."""
    return bool(statically_known_true(a == b))


def same_shape(shape: Sequence[Any], expected: Sequence[Any]) -> bool:
    return len(shape) == len(expected) and all(same(a, b) for a, b in zip(shape, expected))


_METADATA_OPS = tuple(
    op for op in (
        getattr(aten.sym_size, "int", None),
        getattr(aten.sym_stride, "int", None),
        getattr(aten.sym_numel, "default", None),
        getattr(aten.sym_storage_offset, "default", None),
    ) if op is not None
)


def _reads_metadata_only(user: Node) -> bool:
    return user.op == "call_function" and user.target in _METADATA_OPS


def single_user(node: Node) -> bool:
    """Exactly one user reads the data (dynamic-shape graphs keep sym_size queries of intermediates)."""
    return sum(1 for u in node.users if not _reads_metadata_only(u)) == 1


def static_int(x: Any) -> Optional[int]:
    """x as a Python int when it is one for every value of the symbols, else None."""
    if isinstance(x, int):
        return x
    try:
        expr = x.node.expr
    except AttributeError:
        return None
    return int(expr) if getattr(expr, "is_number", False) else None


def is_identity_permute(node: Node) -> bool:
    return node.target is aten.permute.default and list(node.args[1]) == list(range(len(node.args[1])))


def moves_only_unit_dims(node: Node) -> bool:
    """A permute that keeps the row-major order of the elements: the dimensions it moves past each other
    are (statically) of size 1, e.g. (m, topk, 1, k).permute(0, 1, 3, 2) in an einsum's lowering."""
    if node.target is not aten.permute.default:
        return False
    src = val(node.args[0])
    if not isinstance(src, torch.Tensor):
        return False
    perm = [p % src.dim() for p in node.args[1]] if src.dim() else []
    kept = [p for p in perm if not same(src.shape[p], 1)]
    return kept == sorted(kept)


def permute_chain_keeps_order(node: Node) -> int:
    """How many consecutive permutes, from ``node`` up, together keep the row-major order of the
    elements (each alone may not: einsum's lowering at one token transposes (1, 16, 3) to (3, 16, 1)
    after a (1, 3, 16) -> (1, 16, 3) permute); 0 if none does. Every permute but the last walked must
    have a single user."""
    perm = None
    chain = 0
    best = 0
    while isinstance(node, Node) and node.op == "call_function" and node.target is aten.permute.default:
        src = val(node.args[0])
        if not isinstance(src, torch.Tensor):
            break
        inner = [p % src.dim() for p in node.args[1]] if src.dim() else []
        perm = inner if perm is None else [inner[p] for p in perm]
        chain += 1
        kept = [p for p in perm if not same(src.shape[p], 1)]
        if kept == sorted(kept):
            best = chain
        node = node.args[0]
        if not single_user(node):
            break
    return best


def lossless_to_fp32(src: torch.dtype, dst: torch.dtype) -> bool:
    """Converting src -> dst is exact and the op's float32 accumulation makes it redundant."""
    return src in FLOAT_DTYPES and (dst == src or dst == torch.float32)


def peel_rows(node: Node) -> Tuple[Node, List[Node]]:
    """Walk up from a rows-like tensor through order-preserving views, permutes that only move unit
    dimensions and lossless upcasts to float32. Returns (base, chain) where chain is the list of nodes walked over (nearest first).
    """
    chain: List[Node] = []
    while isinstance(node, Node) and node.op == "call_function":
        if node.target in ORDER_PRESERVING or moves_only_unit_dims(node):
            pass
        elif node.target is aten.permute.default and permute_chain_keeps_order(node):
            for _ in range(permute_chain_keeps_order(node) - 1):
                chain.append(node)
                node = node.args[0]
        elif node.target is CONVERT:
            src = val(node.args[0])
            if not isinstance(src, torch.Tensor) or not lossless_to_fp32(src.dtype, node.args[1]):
                break
        else:
            break
        chain.append(node)
        node = node.args[0]
    return node, chain


def peel_upcast(node: Node) -> Tuple[Node, List[Node]]:
    """Only the lossless upcasts (x.float() on a float tensor)."""
    chain: List[Node] = []
    while isinstance(node, Node) and node.op == "call_function" and node.target is CONVERT:
        src = val(node.args[0])
        if not isinstance(src, torch.Tensor) or not lossless_to_fp32(src.dtype, node.args[1]):
            break
        chain.append(node)
        node = node.args[0]
    return node, chain


def non_unit_dims(shape: Sequence[Any]) -> List[int]:
    """Positions of the dimensions that are not statically 1."""
    return [d for d, size in enumerate(shape) if not same(size, 1)]


def peel_factors(node: Node, layout: Sequence[Any]) -> Tuple[Node, Optional[torch.dtype], List[int], List[Node]]:
    """The factors' source: walk up from the weights operand through order-preserving views and float
    converts, as far as the source still holds the factors in ``layout`` order (its dimensions other
    than 1s are exactly ``layout``, e.g. (m, topk) or (R,)) and at most one convert rounds.

    Returns (source, rounding dtype or None, the source's dimensions that make up the entries of
    ``layout`` that are not 1, the nodes walked over, nearest first). The op
    then reads the source and rounds each factor in registers, so no kernel materialises the
    converted weights (``w.view(m, topk, 1).to(bf16)`` in the seed line).
    """
    wanted = [size for size in layout if not same(size, 1)]
    best = None
    rounding: Optional[torch.dtype] = None
    chain: List[Node] = []
    while True:
        v = val(node)
        if not isinstance(v, torch.Tensor) or v.dtype not in FLOAT_DTYPES:
            break
        dims = non_unit_dims(v.shape)
        if len(dims) == len(wanted) and all(same(v.shape[d], size) for d, size in zip(dims, wanted)):
            best = (node, rounding, dims, list(chain))
        if not (isinstance(node, Node) and node.op == "call_function"):
            break
        if node.target is CONVERT:
            src = val(node.args[0])
            if not isinstance(src, torch.Tensor) or src.dtype not in FLOAT_DTYPES:
                break
            if not lossless_to_fp32(src.dtype, node.args[1]):
                if rounding is not None:
                    break  # a second rounding: keep the node after it
                rounding = node.args[1]
        elif node.target not in ORDER_PRESERVING:
            break
        chain.append(node)
        node = node.args[0]
    require(best is not None, "weights do not hold the factors in order")
    return best


def reshape_like(t: torch.Tensor, layout: Sequence[Any], dims: Sequence[int]) -> torch.Tensor:
    """``t`` (a source found by peel_factors) reshaped to ``layout``, its sizes read from ``t`` itself so
    that a traced replacement stays symbolic."""
    sizes = iter(dims)
    return t.reshape([1 if same(size, 1) else t.shape[next(sizes)] for size in layout])


def is_zero_fill(node: Any) -> bool:
    """A scalar 0 as a where() branch: the literal, or the 0-d ``full([], 0)`` that post-grad graphs hold."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return node == 0
    return (isinstance(node, Node) and node.op == "call_function" and node.target is aten.full.default
            and list(node.args[0]) == [] and node.args[1] == 0)


def peel_row_mask(rows: Node) -> Tuple[Node, Optional[Node], List[Node]]:
    """``where(mask, 0, z)`` with a per-row bool mask (R, 1) (``z.masked_fill(mask, 0)``: how HF
    transformers zeroes its sentinel rows) -> (z, mask, walked); else (rows, None, []). The op reads a
    masked row as zeros (``0 * factor``: NaN for a NaN/inf factor, as eager's multiply gives), so the
    masked tensor is never materialised. Lossless upcasts of z are peeled too."""
    if not (isinstance(rows, Node) and rows.op == "call_function" and rows.target is aten.where.self):
        return rows, None, []
    cond, fill, z = rows.args
    cv, rv, zv = val(cond), tensor_val(rows), val(z)
    # z must already be the where's full (R, k) result: a z that broadcasts (``where(mask, 0, x[:1])``)
    # has fewer rows than the mask, and the op would read it with the mask's row count.
    if not (isinstance(cv, torch.Tensor) and cv.dtype == torch.bool and is_zero_fill(fill)
            and same_shape(cv.shape, (rv.shape[0], 1))
            and isinstance(zv, torch.Tensor) and zv.dtype == rv.dtype and same_shape(zv.shape, rv.shape)):
        return rows, None, []
    base, upcasts = peel_upcast(z)
    return base, cond, [rows] + upcasts


def fused_into_consumer_by_inductor(rows: Node) -> bool:
    """Whether ``rows`` is a pointwise result read only by the combine (through views), which
    Inductor computes inside its own combine kernel (e.g. a ``torch.where`` chain selecting expert
    outputs). Our op would need it written out first: a full extra write and read of the rows."""
    node = rows
    while isinstance(node, Node) and node.op == "call_function" and node.target in ORDER_PRESERVING:
        if not single_user(node):
            return False
        node = node.args[0]
    if not (isinstance(node, Node) and node.op == "call_function" and single_user(node)):
        return False
    return torch.Tag.pointwise in getattr(node.target, "tags", ())


def as_gather(node: Node) -> Optional[Tuple[Node, Node, bool]]:
    """(source, index, wraps) if node is ``source[index]`` (wraps=True: negative entries count from the
    end) or ``source.index_select(0, index)`` (wraps=False: negative entries are an error), else None."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target in GATHERS):
        return None
    if node.target is aten.index.Tensor:
        src, indices = node.args[0], node.args[1]
        if len(indices) != 1 or indices[0] is None:
            return None
        return src, indices[0], True
    src, dim, index = node.args[0], node.args[1], node.args[2]
    src_val = val(src)
    if not isinstance(src_val, torch.Tensor) or dim not in (0, -src_val.dim()):
        return None
    return src, index, False


def check_index(index: Node, length: Any, k: Any) -> None:
    """A 1-D int32/int64 index of m * topk entries.

    Called once the gathered rows are known to have length k and to reach (m, topk, k) through
    numel-preserving views, which already implies length == m * topk when k != 0; that is what is
    checked when the symbolic sizes cannot prove the equality directly (e.g. view(-1, topk, k)).
    """
    iv = tensor_val(index)
    require(iv.dtype in INDEX_DTYPES, f"index dtype {iv.dtype} (needs int32/int64)")
    require(iv.dim() == 1, f"{iv.dim()}-D index")
    require(same(iv.shape[0], length) or bool(statically_known_true(k != 0)), "index length != m * topk")


def check_float_rows(rows: Node, nrows: Optional[Any], k: Any) -> torch.Tensor:
    v = tensor_val(rows)
    require(v.dtype in FLOAT_DTYPES, f"input dtype {v.dtype}")
    require(v.dim() == 2, f"{v.dim()}-D input")
    require(same(v.shape[1], k), "input row length != k")
    if nrows is not None:
        require(same(v.shape[0], nrows), "input rows != m * topk")
    return v


def split_weighted_rows(product: Node, nrows: Any, k: Any) -> Tuple[Node, Node, List[Node]]:
    """``rows * weights`` in either order, rows (nrows, k) of a float dtype (lossless upcasts peeled)
    and one float weight per row, (nrows, 1) -> (rows, weights, the peeled upcasts with one user)."""
    why = "no operand pair is (rows, k) rows times (rows, 1) weights"
    for y, w in ((product.args[0], product.args[1]), (product.args[1], product.args[0])):
        try:
            yv, wv = tensor_val(y), tensor_val(w)
            require(same_shape(yv.shape, (nrows, k)), "rows broadcast")
            require(same_shape(wv.shape, (nrows, 1)), f"weights of shape {tuple(wv.shape)} broadcast")
            require(wv.dtype in FLOAT_DTYPES, f"weights dtype {wv.dtype}")
            x, upcasts = peel_upcast(y)
            check_float_rows(x, nrows, k)
        except NoMatch as e:
            why = str(e)
            continue
        return x, w, [u for u in upcasts if single_user(u)]
    raise NoMatch(why)


# Views that reorder or repeat elements: rows reached through one would be copied out for the op.
_REORDERING_VIEWS = (aten.expand.default, aten.permute.default, aten.transpose.int, aten.t.default,
                     aten.slice.Tensor, aten.select.int, aten.as_strided.default)


def check_flat_rows(rows: Node, nrows: Any, k: Any) -> torch.Tensor:
    """Float rows of any dimension whose elements in row-major order are (nrows, k) rows: last dimension
    k, the others multiplying to nrows (the op reads them as ``rows.reshape(-1, k)``, a view of a
    computed tensor such as a bmm's (m*topk, 1, k) result; rows that are an expand or a permute would
    need a copy first, so those are refused)."""
    v = tensor_val(rows)
    if v.dim() == 2:
        return check_float_rows(rows, nrows, k)
    require(not (isinstance(rows, Node) and rows.op == "call_function" and rows.target in _REORDERING_VIEWS),
            f"{v.dim()}-D input is a {getattr(rows.target, '__name__', rows.target)} view")
    require(v.dtype in FLOAT_DTYPES, f"input dtype {v.dtype}")
    require(v.dim() >= 1 and same(v.shape[-1], k), "input row length != k")
    lead = 1
    for size in v.shape[:-1]:
        lead = lead * size
    require(same(lead, nrows), "input rows != m * topk")
    return v


def check_reduce_dim1(node: Node) -> None:
    """node is aten.sum.dim_IntList over dim 1 of a 3-D tensor, keepdim=False."""
    src = tensor_val(node.args[0])
    require(src.dim() == 3, "sum of a non-3-D tensor")
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    require(dims is not None and len(dims) == 1 and dims[0] in (1, -2), f"sum over dims {dims}")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    require(not keepdim, "keepdim=True")


def out_dtype_of(node: Node) -> torch.dtype:
    dt = tensor_val(node).dtype
    require(dt in FLOAT_DTYPES, f"result dtype {dt}")
    return dt


def absorbable_downcast(convert: Node) -> bool:
    """``acc.to(dtype)`` after a float32 reduction: fold it into the op's out_dtype."""
    src = val(convert.args[0])
    return (
        isinstance(src, torch.Tensor)
        and src.dtype == torch.float32
        and convert.args[1] in FLOAT_DTYPES
    )


def device_type(node: Node) -> str:
    return tensor_val(node).device.type


def erase_dead(graph: torch.fx.Graph, nodes: Sequence[Node]) -> None:
    """Erase the walked-over nodes the rewrite left without users (nearest-to-output first)."""
    for n in nodes:
        if n._erased or n.op != "call_function":
            continue
        for u in list(n.users):
            if _reads_metadata_only(u) and len(u.users) == 0:
                graph.erase_node(u)
        if len(n.users) == 0:
            graph.erase_node(n)


def shape_str(node: Any) -> str:
    v = val(node)
    if isinstance(v, torch.Tensor):
        return f"{tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}"
    return "None"
