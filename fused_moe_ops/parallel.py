"""Expert parallelism (EP) over ``torch.distributed``: an MoE layer whose experts are split over ranks.

    import torch.distributed as dist
    from fused_moe_ops.parallel import ExpertParallelMoE, init_moe_weights

    dist.init_process_group("nccl")                     # or "gloo" on CPU; torchrun sets the rest
    weights = init_moe_weights(hidden=1024, ffn=512, num_experts=8, seed=0)   # same on every rank
    layer = ExpertParallelMoE.from_full_weights(weights, topk=2, scheme="alltoall")
    out = layer(x)                                      # or torch.compile(layer)(x)

The ``E`` experts are split over the ``W`` ranks of ``group`` in contiguous ranges; when ``W`` does
not divide ``E`` the first ``E % W`` ranks hold one expert more (and with ``E < W`` some ranks hold
none). Two schemes, the two serving engines use:

``scheme="allreduce"``  Every rank sees every token (tensor-parallel attention in front). Each rank
    runs its experts on the (token, slot) pairs routed to them and combines with a permutation whose
    entries for other ranks' experts are -1 (the op's "no contribution" rule); ``all_reduce(SUM)``
    adds the ranks' partial sums. Input and output: the same (m, hidden) on every rank.

``scheme="alltoall"``  Each rank has its own tokens (data-parallel attention in front). The pairs are
    sorted by expert, which sorts them by owning rank; ``all_to_all_single`` sends each pair's token
    row to that rank (split sizes exchanged first, as per-expert counts), the rank runs its experts,
    ``all_to_all_single`` sends the rows back in the order they came, and the combine with
    ``permutation = order.argsort()`` puts each (token, slot) row back in place. Input and output:
    this rank's own (m_rank, hidden); m_rank may differ per rank and may be 0.

The combine. Eager calls ``torch.ops.moe.shuffle_mul_sum``. Under ``torch.compile`` the layer writes
the combine in the eager spelling ``(buf[perm].view(m, topk, k) * w.view(m, topk, 1).to(dtype)).sum(1)``
so that the fusion pass finds and rewrites it (``fused_moe_ops.fusion_stats()`` counts it per rank).
In that spelling ``buf[-1]`` is the *last row* (Python indexing), not "nothing", so the allreduce
scheme's expert output buffer always ends in one row of zeros: a -1 entry gathers zeros in eager
indexing and in the pass's replacement (which wraps -1 to row R-1) alike, and a rank with no local
rows still has a row to index. (The alltoall scheme's permutation has no -1 entries.)

Collectives run outside the compiled graphs (``torch.compiler.disable``): Dynamo breaks the graph at
each one and compiles the pieces in between; the combine is inside a compiled piece. The expert loop
slices rows by data-dependent counts (``.tolist()``): set ``torch._dynamo.config.capture_scalar_outputs
= True`` before compiling, or Dynamo breaks the graph there too and recompiles for new counts.

``moe_reference`` is the single-process float64 result the tests and the example compare against.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import fused_moe_ops  # noqa: F401  (defines torch.ops.moe.shuffle_mul_sum, installs the fusion pass)

SCHEMES = ("allreduce", "alltoall")


def expert_ranges(num_experts: int, world_size: int) -> List[Tuple[int, int]]:
    """[start, end) of the experts each rank holds: contiguous, the first E % W ranks one more."""
    if num_experts < 1 or world_size < 1:
        raise ValueError(f"expert_ranges: need num_experts >= 1 and world_size >= 1, got {num_experts}, {world_size}")
    base, extra = divmod(num_experts, world_size)
    ranges, start = [], 0
    for r in range(world_size):
        n = base + (r < extra)
        ranges.append((start, start + n))
        start += n
    return ranges


def init_moe_weights(hidden: int, ffn: int, num_experts: int, *, seed: int = 0,
                     dtype: torch.dtype = torch.float32, device="cpu") -> Dict[str, Tensor]:
    """Full (unsplit) weights from a seed, identical on every rank: router (E, hidden),
    w_up (E, hidden, 2*ffn) = gate | up of a SwiGLU, w_down (E, ffn, hidden)."""
    g = torch.Generator().manual_seed(seed)
    w = {
        "router": torch.randn(num_experts, hidden, generator=g) / hidden ** 0.5,
        "w_up": torch.randn(num_experts, hidden, 2 * ffn, generator=g) / hidden ** 0.5,
        "w_down": torch.randn(num_experts, ffn, hidden, generator=g) / ffn ** 0.5,
    }
    return {n: t.to(device=device, dtype=dtype) for n, t in w.items()}


def route(x: Tensor, router: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """Softmax (float32) over the router logits, top-k, renormalised: (weights (m, topk) float32, ids int64)."""
    probs = (x @ router.t()).softmax(dim=-1, dtype=torch.float32)
    topk_weights, topk_ids = probs.topk(topk, dim=-1)
    return topk_weights / topk_weights.sum(dim=-1, keepdim=True), topk_ids


def moe_reference(x: Tensor, weights: Dict[str, Tensor], topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
    """The single-process MoE result in float64 for the given routing: the ground truth for any scheme."""
    xd = x.double()
    w_up, w_down = weights["w_up"].double(), weights["w_down"].double()
    out = torch.zeros_like(xd)
    for e in range(w_up.shape[0]):                        # expert by expert: memory O(m * hidden)
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        gate, up = (xd[tok] @ w_up[e]).chunk(2, dim=-1)
        out.index_add_(0, tok, topk_weights[tok, slot].double().unsqueeze(-1) * ((F.silu(gate) * up) @ w_down[e]))
    return out


# ---- collectives (eager, outside compiled graphs) ---------------------------------------------

@torch.compiler.disable
def _all_reduce_sum(t: Tensor, group) -> Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


@torch.compiler.disable
def _all_to_all_rows(rows: Tensor, send_sizes: List[int], recv_sizes: List[int], group) -> Tensor:
    """Send ``send_sizes[r]`` consecutive rows to rank r, receive ``recv_sizes[r]`` rows from rank r."""
    out = rows.new_empty((sum(recv_sizes), rows.shape[1]))
    dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv_sizes,
                           input_split_sizes=send_sizes, group=group)
    return out


def _rank_sizes(expert_counts: Tensor, ranges) -> List[int]:
    return [sum(c) for c in (expert_counts.tolist()[s:e] for s, e in ranges)]


@torch.compiler.disable
def _dispatch(rows: Tensor, send_expert_counts: Tensor, ranges, group) -> Tuple[Tensor, Tensor]:
    """rows: this rank's (token, slot) rows sorted by expert; send_expert_counts (E,): rows per expert.

    Exchanges the per-expert counts first (an all_to_all_single of counts), then the rows. Returns
    (received rows, grouped by source rank and within a source by expert; counts (W, E_local):
    rows per local expert from each rank)."""
    world = len(ranges)
    lo, hi = ranges[dist.get_rank(group)]
    recv_counts = send_expert_counts.new_empty(world * (hi - lo))
    dist.all_to_all_single(recv_counts, send_expert_counts, output_split_sizes=[hi - lo] * world,
                           input_split_sizes=[e - s for s, e in ranges], group=group)
    recv_counts = recv_counts.view(world, hi - lo)
    recv = _all_to_all_rows(rows, _rank_sizes(send_expert_counts, ranges), recv_counts.sum(1).tolist(), group)
    return recv, recv_counts


@torch.compiler.disable
def _return(rows: Tensor, recv_counts: Tensor, send_expert_counts: Tensor, ranges, group) -> Tensor:
    """The inverse of _dispatch: each rank gets its rows back, in the order it sent them."""
    return _all_to_all_rows(rows, recv_counts.sum(1).tolist(), _rank_sizes(send_expert_counts, ranges), group)


def _count(ids: Tensor, n: int) -> Tensor:
    """bincount with a static length (bincount's data-dependent shape would break the compiled graph)."""
    return ids.new_zeros(n).scatter_add_(0, ids, torch.ones_like(ids))


# ---- the layer --------------------------------------------------------------------------------

def combine(buf: Tensor, perm: Tensor, topk_weights: Tensor) -> Tensor:
    """out[i] = sum_j w[i, j] * buf[perm[i*topk + j]]; -1 entries add nothing if ``buf``'s last row is zeros.

    Eager: the op. Compiled: the eager spelling, which the fusion pass rewrites into the op.
    """
    m, topk = topk_weights.shape
    if torch.compiler.is_compiling():
        return (buf[perm].view(m, topk, buf.shape[1]) * topk_weights.view(m, topk, 1).to(buf.dtype)).sum(dim=1)
    return torch.ops.moe.shuffle_mul_sum(buf, perm, topk_weights)


class ExpertParallelMoE(nn.Module):
    """Top-k routed SwiGLU experts split over the ranks of ``group``; see the module docstring.

    Parameters are this rank's slice: ``w_up`` (E_local, hidden, 2*ffn), ``w_down`` (E_local, ffn,
    hidden); the router (E, hidden) is replicated. ``forward(x, topk_weights=None, topk_ids=None)``
    routes with the router unless a routing is given (global expert ids).
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, topk: int, *, scheme: str = "allreduce",
                 group: Optional[dist.ProcessGroup] = None, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"ExpertParallelMoE: scheme must be one of {SCHEMES}, got {scheme!r}")
        if not 1 <= topk <= num_experts:
            raise ValueError(f"ExpertParallelMoE: topk must be in [1, num_experts={num_experts}], got {topk}")
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.scheme, self.num_experts, self.topk = scheme, num_experts, topk
        self.ranges = expert_ranges(num_experts, self.world_size)
        self.expert_start, self.expert_end = self.ranges[self.rank]
        n_local = self.expert_end - self.expert_start
        kw = dict(dtype=dtype, device=device)
        self.router = nn.Parameter(torch.empty(num_experts, hidden, **kw), requires_grad=False)
        self.w_up = nn.Parameter(torch.empty(n_local, hidden, 2 * ffn, **kw), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(n_local, ffn, hidden, **kw), requires_grad=False)

    @classmethod
    def from_full_weights(cls, weights: Dict[str, Tensor], topk: int, **kw) -> "ExpertParallelMoE":
        """Build the layer and copy this rank's slice of the full weights (``init_moe_weights``' layout)."""
        num_experts, hidden, two_ffn = weights["w_up"].shape
        kw.setdefault("dtype", weights["w_up"].dtype)
        kw.setdefault("device", weights["w_up"].device)
        layer = cls(hidden, two_ffn // 2, num_experts, topk, **kw)
        with torch.no_grad():
            layer.router.copy_(weights["router"])
            layer.w_up.copy_(weights["w_up"][layer.expert_start:layer.expert_end])
            layer.w_down.copy_(weights["w_down"][layer.expert_start:layer.expert_end])
        return layer

    def extra_repr(self) -> str:
        return (f"scheme={self.scheme}, rank={self.rank}/{self.world_size}, "
                f"experts=[{self.expert_start}, {self.expert_end}) of {self.num_experts}, topk={self.topk}")

    def _experts(self, rows: Tensor, counts: List[int]) -> List[Tensor]:
        """Local expert e on its contiguous slice of ``rows`` (sorted by local expert, counts[e] rows)."""
        outs, start = [], 0
        for e, n in enumerate(counts):
            torch._check(n >= 0)
            torch._check(n <= rows.shape[0])
            gate, up = (rows[start:start + n] @ self.w_up[e]).chunk(2, dim=-1)
            outs.append((F.silu(gate) * up) @ self.w_down[e])
            start = start + n
        return outs

    def forward(self, x: Tensor, topk_weights: Optional[Tensor] = None, topk_ids: Optional[Tensor] = None) -> Tensor:
        if topk_ids is None:
            topk_weights, topk_ids = route(x, self.router, self.topk)
        if self.scheme == "allreduce":
            return self._forward_allreduce(x, topk_weights, topk_ids)
        return self._forward_alltoall(x, topk_weights, topk_ids)

    def _forward_allreduce(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        n_local = self.expert_end - self.expert_start
        flat = topk_ids.reshape(-1)
        is_local = (flat >= self.expert_start) & (flat < self.expert_end)
        key = torch.where(is_local, flat - self.expert_start, n_local)          # remote pairs sort last
        order = key.argsort(stable=True)
        counts = _count(key, n_local + 1)[:n_local].tolist()
        rows = x[order[:sum(counts)] // self.topk]
        buf = torch.cat(self._experts(rows, counts) + [x.new_zeros(1, x.shape[1])])   # last row: zeros
        perm = torch.where(is_local, order.argsort(), -1)                       # pair -> its row, or -1
        return _all_reduce_sum(combine(buf, perm, topk_weights), self.group)

    def _forward_alltoall(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        flat = topk_ids.reshape(-1)
        order = flat.argsort(stable=True)                # by expert, hence by owning rank
        send_expert_counts = _count(flat, self.num_experts)
        recv, recv_expert_counts = _dispatch(x[order // self.topk], send_expert_counts, self.ranges, self.group)
        # Rows arrive grouped by source rank, within a source by local expert: regroup by expert.
        n_local = self.expert_end - self.expert_start
        # Segment (source, expert) of each arriving row; searchsorted, not repeat_interleave, whose
        # data-dependent shape would break the compiled graph.
        seg_ends = recv_expert_counts.reshape(-1).cumsum(0)
        seg = torch.searchsorted(seg_ends, torch.arange(recv.shape[0], device=x.device), right=True)
        by_expert = (seg % max(n_local, 1)).argsort(stable=True)
        outs = self._experts(recv[by_expert], recv_expert_counts.sum(dim=0).tolist())
        y = torch.cat(outs + [x.new_zeros(0, x.shape[1])])[by_expert.argsort()]   # back to arrival order
        back = _return(y, recv_expert_counts, send_expert_counts, self.ranges, self.group)  # row r: pair order[r]
        return combine(back, order.argsort(), topk_weights)               # every entry valid: no -1
