"""Expert parallelism over torch.distributed: the MoE layer split over ranks, checked against one process.

    torchrun --nproc-per-node 4 examples/expert_parallel.py                  # CPU: gloo
    torchrun --nproc-per-node 8 examples/expert_parallel.py --dtype bf16 --compile   # GPUs: nccl
    python examples/expert_parallel.py                                         # one process, world size 1

Every rank builds ``fused_moe_ops.parallel.ExpertParallelMoE`` from the same seeded weights and
keeps its slice of the experts (contiguous ranges; uneven when the world size does not divide
--experts). Two schemes (--scheme):

* allreduce: every rank has the same --tokens tokens; each combines its experts' rows with -1 for
  the others' (moe::shuffle_mul_sum skips them) and all_reduce(SUM) adds the partial sums.
* alltoall: every rank has its own --tokens tokens; all_to_all_single sends each (token, slot) to
  the rank owning its expert and back; the combine's permutation puts the rows back in place.

Rank 0 prints one row per scheme, mode (eager, and compiled with --compile) and rank: the median
time of a forward on that rank, the largest difference from the single-process float64 result
for that rank's tokens, and how many combines the fusion pass rewrote in that rank's graphs
(fused_moe_ops.fusion_stats()). The exit code is 1 when any rank's error exceeds the tolerance or
when a compiled rank's pass did not fire.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

import fused_moe_ops
from fused_moe_ops.parallel import ExpertParallelMoE, expert_ranges, init_moe_weights, moe_reference, route

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
# max |result - float64 reference| / max |reference|: fp32 GEMMs round at ~1e-7, bf16 ones at ~4e-3
# per element; a missing or doubled (token, slot) contribution is of the order of 1.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}


def init_distributed(backend: str) -> torch.device:
    """Join the process group torchrun describes; without torchrun, a group of one process."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=5))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    return device


def time_forward(fn, x, w, ids, iters: int, device: torch.device):
    """(output, median ms): two warm-up calls (the compile happens there), then `iters` timed calls,
    each starting after a barrier so that every rank times the same step."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        out = fn(x, w, ids)
    times = []
    for _ in range(iters):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        out = fn(x, w, ids)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                   help="default: nccl when CUDA is available, else gloo")
    p.add_argument("--scheme", choices=["allreduce", "alltoall", "both"], default="both")
    p.add_argument("--compile", action="store_true", help="also run torch.compile(layer) (the pass fires per rank)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=256, help="expert intermediate size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    p.add_argument("--iters", type=int, default=10, help="timed calls per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per rank (torchrun sets 1 when it starts several ranks; on a busy "
                        "machine more threads than free cores make compiled CPU code wait for each other)")
    args = p.parse_args(argv)
    if not 1 <= args.topk <= args.experts:
        p.error("--topk must be between 1 and --experts")
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        p.error("--backend nccl needs CUDA (torch.cuda.is_available() is False); use --backend gloo")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = init_distributed(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype]
    # The expert loop slices by data-dependent counts: trace through .tolist() instead of breaking
    # the graph there; and compile for real in every rank (no FX graph cache hits between ranks),
    # so that each rank's pass runs and is counted.
    torch._dynamo.config.capture_scalar_outputs = True
    torch._inductor.config.fx_graph_cache = False

    weights = init_moe_weights(args.hidden, args.ffn, args.experts, seed=args.seed, dtype=dtype, device=device)
    schemes = ["allreduce", "alltoall"] if args.scheme == "both" else [args.scheme]
    if rank == 0:
        ranges = expert_ranges(args.experts, world)
        print(f"expert parallel: world size {world}, backend {backend}, device {device.type}, torch {torch.__version__}, "
              f"{platform.node() or '?'}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
        print(f"tokens={args.tokens} per rank, hidden={args.hidden}, ffn={args.ffn}, experts={args.experts}, "
              f"topk={args.topk}, dtype={dtype}; experts per rank: "
              + ", ".join(f"{r}:[{s},{e})" for r, (s, e) in enumerate(ranges)))
        print(f"\n{'scheme':10s} {'mode':9s} {'rank':>4s} {'tokens':>6s} {'median ms':>10s} {'max |err|':>10s} "
              f"{'rel err':>9s} {'rewrites':>8s}  status")
    failed = False
    for scheme in schemes:
        # allreduce: the same tokens on every rank; alltoall: each rank its own.
        g = torch.Generator().manual_seed(args.seed + 1 + (rank if scheme == "alltoall" else 0))
        x = torch.randn(args.tokens, args.hidden, generator=g).to(device=device, dtype=dtype)
        # Routing once, eagerly, and passed to every variant: a near-tie decided differently by a
        # compiled router would change the experts, not just round the result.
        w, ids = route(x, weights["router"], args.topk)
        ref = moe_reference(x, weights, w, ids)
        scale = ref.abs().max().item() or 1.0
        layer = ExpertParallelMoE.from_full_weights(weights, args.topk, scheme=scheme).eval()
        variants = [("eager", layer)]
        if args.compile:
            torch._dynamo.reset()
            variants.append(("compiled", torch.compile(layer)))
        for mode, fn in variants:
            fused_moe_ops.reset_fusion_stats()
            with torch.inference_mode():
                out, ms = time_forward(fn, x, w, ids, args.iters, device)
            err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
            rewrites = fused_moe_ops.fusion_stats()["rewrites"]
            ok = err <= REL_TOL[dtype] * scale and (mode == "eager" or rewrites >= 1)
            rows = [None] * world
            dist.all_gather_object(rows, (rank, x.shape[0], ms, err, err / scale, rewrites, ok))
            failed |= not all(r[-1] for r in rows)
            if rank == 0:
                for r, m, ms_r, err_r, rel_r, rw, ok_r in rows:
                    print(f"{scheme:10s} {mode:9s} {r:4d} {m:6d} {ms_r:10.3f} {err_r:10.2e} {rel_r:9.1e} {rw:8d}  "
                          f"{'ok' if ok_r else 'FAIL'}")
    if rank == 0:
        print(f"\n(median of {args.iters} calls per rank after 2 warm-up calls, {torch.get_num_threads()} CPU thread(s) per rank; err against the single-process "
              f"float64 result, rel = / max |result| (tolerance {REL_TOL[dtype]:g}); rewrites = combines the "
              f"fusion pass rewrote into our op in that rank's compiled graphs)")
        print("FAILED: a rank differs from the reference or its pass did not fire" if failed else "all ranks ok")
    dist.barrier()  # every rank tears gloo down together (a rank that did not was seen to abort)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
