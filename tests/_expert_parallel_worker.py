"""One rank of tests/test_expert_parallel.py: runs every case, gathers each rank's error to rank 0.

Started once per rank by the test (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment):

    python tests/_expert_parallel_worker.py --cases a,b,... --compiled-cases c,... --out results.json

Each case builds a routing with one edge of expert parallelism (which experts each token picks is
set explicitly, so the edge is there whatever the random data), runs ExpertParallelMoE with both
schemes on the gloo group, and compares every rank's output with the single-process float64
result for that rank's tokens. Rank 0 writes {case/scheme: [per-rank result]} as JSON; any rank
whose result is off also makes its process exit 1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import zlib
from typing import Callable, Dict, Tuple

import torch
import torch.distributed as dist

import fused_moe_ops
from fused_moe_ops import parallel
from fused_moe_ops.parallel import ExpertParallelMoE, expert_ranges, init_moe_weights, moe_reference, route

HIDDEN, FFN = 32, 16
# max |result - float64 reference| / max |reference|; a missing or doubled contribution is O(1).
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2}


class Case:
    """experts(world) -> E; topk(world) -> topk; tokens(rank, world) -> this rank's token count (alltoall;
    allreduce uses rank 0's); pick(g, m, topk, ranges, rank) -> topk_ids or None (= the layer's router)."""

    def __init__(self, experts: Callable, topk: int, pick=None, tokens=None, dtype=torch.float32):
        self.experts, self.topk, self.pick, self.dtype = experts, topk, pick, dtype
        self.tokens = tokens or (lambda rank, world: 7 + 3 * rank)


def _random_ids(g, m, topk, candidates):
    """For each token, topk distinct experts drawn from `candidates` (a list of expert ids)."""
    c = torch.tensor(candidates)
    return torch.stack([c[torch.randperm(len(c), generator=g)[:topk]] for _ in range(m)]) if m else \
        torch.empty(0, topk, dtype=torch.int64)


def _pick_any(g, m, topk, ranges, rank):
    return _random_ids(g, m, topk, list(range(ranges[-1][1])))


def _pick_skip_last_rank(g, m, topk, ranges, rank):
    """No token picks the last rank's experts: that rank receives no rows."""
    return _random_ids(g, m, topk, list(range(ranges[-1][0])))


def _pick_one_rank_per_token(g, m, topk, ranges, rank):
    """All of a token's experts on one rank (cycled): for every other rank the token is all-remote."""
    rows = [_random_ids(g, 1, topk, list(range(*ranges[(i + rank) % len(ranges)]))) for i in range(m)]
    return torch.cat(rows) if rows else torch.empty(0, topk, dtype=torch.int64)


CASES: Dict[str, Case] = {
    "even-split-router": Case(lambda w: 2 * w, 2),
    "uneven-split": Case(lambda w: 2 * w - 1, 2, _pick_any),
    "rank-without-experts": Case(lambda w: max(w - 1, 1), 1, _pick_any),       # E < W: the last rank holds none
    "empty-rank-receives-nothing": Case(lambda w: 2 * w, 2, _pick_skip_last_rank),
    "all-remote-tokens": Case(lambda w: 2 * w, 2, _pick_one_rank_per_token),
    "topk-gt-experts-per-rank": Case(lambda w: w + 1, 3, _pick_any),            # several slots per rank
    "rank-without-tokens": Case(lambda w: 2 * w, 2, _pick_any, tokens=lambda r, w: 0 if r == 0 else 5 + r),
    "bf16-router": Case(lambda w: 2 * w + 1, 2, dtype=torch.bfloat16),
}


def run_case(name: str, scheme: str, compiled: bool, rank: int, world: int) -> Dict:
    case = CASES[name]
    experts, topk, dtype = case.experts(world), case.topk, case.dtype
    ranges = expert_ranges(experts, world)
    weights = init_moe_weights(HIDDEN, FFN, experts, seed=zlib.crc32(name.encode()), dtype=dtype)
    # allreduce: the same tokens and routing on every rank; alltoall: each rank its own.
    src = rank if scheme == "alltoall" else 0
    g = torch.Generator().manual_seed(1000 + src)
    m = case.tokens(src, world)
    x = torch.randn(m, HIDDEN, generator=g).to(dtype)
    layer = ExpertParallelMoE.from_full_weights(weights, topk, scheme=scheme).eval()
    fn = torch.compile(layer) if compiled else layer
    if case.pick is None:
        w, ids = route(x, weights["router"], topk)
        args: Tuple = (x,)                                   # the layer routes itself
    else:
        ids = case.pick(g, m, topk, ranges, src)
        w = torch.rand(m, topk, generator=g) + 0.1
        w = w / w.sum(-1, keepdim=True)
        args = (x, w, ids)
    fused_moe_ops.reset_fusion_stats()
    with torch.inference_mode():
        out = fn(*args)
        out = fn(*args)                                      # a second call: cached graphs, same answer
    ref = moe_reference(x, weights, w, ids)
    scale = ref.abs().max().item() if ref.numel() else 1.0
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    lo, hi = ranges[rank]
    return dict(rank=rank, tokens=m, shape=list(out.shape), err=err, scale=scale, tol=REL_TOL[dtype] * max(scale, 1e-6),
                rewrites=fused_moe_ops.fusion_stats()["rewrites"], experts_held=hi - lo,
                ok=list(out.shape) == list(x.shape) and err <= REL_TOL[dtype] * max(scale, 1e-6)
                and (not compiled or m == 0 or fused_moe_ops.fusion_stats()["rewrites"] >= 1))


def control_without_all_reduce(rank: int, world: int) -> Dict:
    """The check can fail: the allreduce scheme with its all_reduce skipped (each rank keeps its
    partial sum) must be reported far outside the tolerance on every rank."""
    real = parallel._all_reduce_sum
    parallel._all_reduce_sum = lambda t, group: t
    try:
        return run_case("even-split-router", "allreduce", False, rank, world)
    finally:
        parallel._all_reduce_sum = real


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", required=True, help="comma-separated case names to run eagerly, or 'all'")
    p.add_argument("--compiled-cases", default="", help="comma-separated case names to run under torch.compile")
    p.add_argument("--schemes", default="allreduce,alltoall")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch._dynamo.config.capture_scalar_outputs = True
    torch._inductor.config.fx_graph_cache = False           # every rank compiles, so its pass runs
    runs = [("eager", n) for n in (list(CASES) if args.cases == "all" else args.cases.split(","))]
    runs += [("compiled", n) for n in args.compiled_cases.split(",") if n]
    results, ok = {}, True
    for mode, name in runs:
        for scheme in args.schemes.split(","):
            torch._dynamo.reset()
            r = run_case(name, scheme, mode == "compiled", rank, world)
            ok &= r["ok"]
            gathered = [None] * world
            dist.all_gather_object(gathered, r)
            results[f"{mode}/{name}/{scheme}"] = gathered
    if world > 1:
        r = control_without_all_reduce(rank, world)
        gathered = [None] * world
        dist.all_gather_object(gathered, r)
        results["eager/control-without-all-reduce/allreduce"] = gathered
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    # Every rank reaches the teardown together: a rank tearing gloo down while its peer is still
    # inside a collective was seen to abort ("terminate called without an active exception", CI).
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
