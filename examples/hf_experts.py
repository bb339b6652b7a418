"""An HF transformers MoE model, run eagerly, with its experts' combine on moe::shuffle_mul_sum.

    python examples/hf_experts.py                      # CPU (or CUDA when present), bfloat16
    python examples/hf_experts.py --tokens 1024 --threads 2

``import fused_moe_ops`` registers ``experts_implementation="fused_moe_ops"`` with transformers
(>= 5.7): load any MoE model with it, or switch a loaded one, no torch.compile needed. The script
builds a Qwen3-MoE-shaped model from transformers' own classes (random weights, nothing
downloaded), runs one prompt with transformers' default "grouped_mm" experts and with
"fused_moe_ops", and prints how many times our op ran per forward, how far apart the two outputs
are, their times (interleaved, median) and whether greedy generate() gives the same tokens.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import fused_moe_ops  # noqa: F401  (registers the experts backend when transformers is imported)

try:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
except ImportError:
    sys.exit("this example needs HF transformers >= 5.7: pip install 'transformers>=5.7'")


class CountOpCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts moe::shuffle_mul_sum calls (what the example wants to show runs)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.moe.shuffle_mul_sum.default
        return func(*args, **(kwargs or {}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256, help="prompt length")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--iters", type=int, default=5, help="timed forwards per implementation")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = p.parse_args(argv)
    if not 1 <= args.topk <= args.experts:
        p.error("--topk must be between 1 and --experts")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    cfg = Qwen3MoeConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=16,
                         num_key_value_heads=4, head_dim=args.hidden // 16, intermediate_size=3 * args.hidden,
                         moe_intermediate_size=3 * args.hidden // 4, num_experts=args.experts,
                         num_experts_per_tok=args.topk, vocab_size=1024)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), device=device)
    print(f"Qwen3-MoE-shaped model: {args.layers} layers, hidden {args.hidden}, {args.experts} experts, "
          f"top-{args.topk}, {args.dtype}, {device}; prompt of {args.tokens} tokens")

    logits, per_forward = {}, {}
    with torch.inference_mode():
        for impl in ("grouped_mm", "fused_moe_ops"):
            model.set_experts_implementation(impl)
            with CountOpCalls() as counter:
                logits[impl] = model(ids).logits.float()
            per_forward[impl] = counter.calls
        times = {impl: [] for impl in logits}
        for _ in range(args.iters):
            for impl in times:
                model.set_experts_implementation(impl)
                sync()
                t0 = time.perf_counter()
                model(ids)
                sync()
                times[impl].append(time.perf_counter() - t0)
        new = {}
        for impl in times:
            model.set_experts_implementation(impl)
            new[impl] = model.generate(ids[:, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)

    ref = logits["grouped_mm"]
    diff = ((logits["fused_moe_ops"] - ref).abs().max() / ref.abs().max()).item()
    print(f"moe::shuffle_mul_sum calls per forward: grouped_mm: {per_forward['grouped_mm']}, "
          f"fused_moe_ops: {per_forward['fused_moe_ops']} (one per MoE layer)")
    print(f"max |logits difference| / max |logits| = {diff:.2e}")
    t_ref = statistics.median(times["grouped_mm"])
    print(f"{'experts_implementation':24s} {'median ms':>10s} {'speed':>7s}")
    for impl, ts in times.items():
        t = statistics.median(ts)
        print(f"{impl:24s} {t * 1e3:10.2f} {t_ref / t:6.2f}x")
    same = torch.equal(new["grouped_mm"], new["fused_moe_ops"])
    print(f"generate(), 8 new tokens, greedy: {'same tokens' if same else 'DIFFERENT tokens'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
