"""Calling ``moe::shuffle_mul_sum`` directly, the way a serving engine's eager MoE path does.

    python examples/explicit_op.py                     # CPU (CUDA too when present)
    python examples/explicit_op.py --device cuda --dtype bfloat16 --tokens 4096

A serving engine already has, after its grouped expert GEMMs:

    expert_out   (R, K)       the expert outputs, rows sorted by expert
    c_map        (M*topk,)    for token i's j-th choice, the row of expert_out holding it
    topk_weights (M, topk)    the router weights

and wants ``out[i] = sum_j topk_weights[i, j] * expert_out[c_map[i*topk + j]]``. With expert
parallelism some of token i's experts live on another rank (or the token was dropped by a
capacity limit): the engine marks those entries with -1 and the op skips them; the other
rank's partial sums are added by the all-reduce that follows.

The script shows the functional form, the ``.out`` form into a preallocated buffer (what a
CUDA-graph-captured decode step needs), ``out_dtype``, the ``permutation=None`` identity form,
and checks every result against a float64 reference.
"""
from __future__ import annotations

import argparse
import sys

import torch

import fused_moe_ops  # noqa: F401  (defines torch.ops.moe.shuffle_mul_sum and loads its kernels)
from fused_moe_ops import _registry
from fused_moe_ops.reference import shuffle_mul_sum_reference

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def route(tokens: int, experts: int, topk: int, hidden: int, generator: torch.Generator):
    """Router decisions and every (token, choice) pair's expert output, in (token, choice) order."""
    logits = torch.randn(tokens, experts, generator=generator)
    topk_weights, topk_ids = logits.softmax(-1).topk(topk, dim=-1)
    topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
    pair_out = torch.randn(tokens * topk, hidden, generator=generator)   # stand-in for the expert MLPs
    return topk_ids, topk_weights, pair_out


def rank_inputs(topk_ids, topk_weights, pair_out, dtype, device, *, experts: int, ep_ranks: int, rank: int):
    """What one expert-parallel rank holds: its experts' output rows sorted by expert, and c_map.

    Experts are split evenly over `ep_ranks` ranks; rank `rank` holds experts
    [rank*E/ep_ranks, (rank+1)*E/ep_ranks). Entries of c_map for other ranks' experts are -1.
    """
    tokens, topk = topk_ids.shape
    flat_ids = topk_ids.flatten()
    flat_local = (flat_ids // (experts // ep_ranks)) == rank          # this rank computes that pair
    # This rank's rows, sorted by expert (stable: token order within an expert).
    order = torch.argsort(torch.where(flat_local, flat_ids, experts), stable=True)[: int(flat_local.sum())]
    c_map = torch.full((tokens * topk,), -1, dtype=torch.int32)
    c_map[order] = torch.arange(order.numel(), dtype=torch.int32)
    expert_out = pair_out[order]                                      # the grouped GEMM's output layout
    return (expert_out.to(device=device, dtype=dtype), c_map.to(device),
            topk_weights.to(device=device, dtype=dtype))


def check(name: str, got: torch.Tensor, want: torch.Tensor, input_dtype=None) -> float:
    # Tolerance of the coarser of the inputs' and the result's dtype.
    rtol, atol = max(TOL[got.dtype], TOL[input_dtype or got.dtype])
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    ok = torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol)
    print(f"  {name:44s} shape={tuple(got.shape)} {str(got.dtype):15s} max|diff|={err:.2e}  {'ok' if ok else 'MISMATCH'}")
    if not ok:
        raise SystemExit(f"{name}: result differs from the float64 reference (max |diff| {err:.3e})")
    return err


def run(device: str, dtype: torch.dtype, tokens: int, hidden: int, experts: int, topk: int, ep_ranks: int) -> None:
    g = torch.Generator().manual_seed(0)
    print(f"device={device} (kernel: {_registry.ACTIVE.get(device.split(':')[0], '?')}) dtype={dtype} "
          f"tokens={tokens} hidden={hidden} experts={experts} topk={topk} ep_ranks={ep_ranks}")

    topk_ids, topk_weights, pair_out = route(tokens, experts, topk, hidden, g)

    # 1. Single rank: every entry is a real row.
    expert_out, c_map, w = rank_inputs(topk_ids, topk_weights, pair_out, dtype, device,
                                       experts=experts, ep_ranks=1, rank=0)
    want = shuffle_mul_sum_reference(expert_out, c_map, w, acc_dtype=torch.float64)
    out = torch.ops.moe.shuffle_mul_sum(expert_out, c_map, w)             # functional form
    check("torch.ops.moe.shuffle_mul_sum", out, want)
    # The eager spelling it replaces (a gather, a multiply and a reduction: three passes over memory).
    eager = (expert_out[c_map.long()].view(tokens, topk, hidden) * w.view(tokens, topk, 1)).sum(dim=1)
    check("eager spelling (for comparison)", eager, want)

    # 2. Expert parallel: each rank holds some experts; its -1 entries are skipped. The .out form
    #    writes into a preallocated float32 buffer; summing the ranks' buffers is the all-reduce.
    total = torch.zeros(tokens, hidden, device=device, dtype=torch.float32)
    for rank in range(ep_ranks):
        eo, cm, wr = rank_inputs(topk_ids, topk_weights, pair_out, dtype, device,
                                 experts=experts, ep_ranks=ep_ranks, rank=rank)
        buf = torch.empty(tokens, hidden, device=device, dtype=torch.float32)
        torch.ops.moe.shuffle_mul_sum.out(eo, cm, wr, out=buf)
        want_r = shuffle_mul_sum_reference(eo, cm, wr, torch.float32, acc_dtype=torch.float64)
        check(f".out, rank {rank}/{ep_ranks} ({int((cm < 0).sum())} entries = -1)", buf, want_r, dtype)
        total += buf
    want32 = shuffle_mul_sum_reference(expert_out, c_map, w, torch.float32, acc_dtype=torch.float64)
    check(f"sum over {ep_ranks} ranks == single-rank combine", total, want32, dtype)

    # 3. out_dtype: bf16/fp16 expert outputs, float32 result (an fp32 residual stream).
    out32 = fused_moe_ops.shuffle_mul_sum(expert_out, c_map, w, out_dtype=torch.float32)
    check("out_dtype=torch.float32", out32, want32, dtype)

    # 4. permutation=None: expert_out already in (token, choice) order, e.g. after an un-permute.
    ordered = expert_out[c_map.long()]
    check("permutation=None (identity)", torch.ops.moe.shuffle_mul_sum(ordered, None, w), want)

    # 5. A bad index is an error, not a silent read out of bounds.
    bad = c_map.clone()
    bad[0] = expert_out.shape[0]
    try:
        torch.ops.moe.shuffle_mul_sum(expert_out, bad, w)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    except (IndexError, RuntimeError) as e:
        print(f"  {'entry >= R raises':44s} {type(e).__name__}: {str(e).splitlines()[0][:90]}")
    else:
        raise SystemExit("an out-of-range permutation entry did not raise")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--ep-ranks", type=int, default=2, help="expert-parallel ranks to simulate (divides --experts)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="cpu, cuda, or both when omitted and a GPU is present")
    args = p.parse_args(argv)
    if args.experts % args.ep_ranks:
        p.error("--ep-ranks must divide --experts")
    devices = [args.device] if args.device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for device in devices:
        run(device, getattr(torch, args.dtype), args.tokens, args.hidden, args.experts, args.topk, args.ep_ranks)
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
