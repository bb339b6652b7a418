"""Eager HF transformers: experts_implementation "grouped_mm" vs "fused_moe_ops", side by side.

A Qwen3-MoE-shaped base model from transformers' own classes (2 decoder layers, random weights, fed
``inputs_embeds``: no embedding and no lm_head): by default hidden 1024, 64 experts, top-8, expert
width 768 (Qwen3-30B-A3B's), 16 query / 4 key-value heads of 64. One model, its experts
implementation switched between the two; every call under ``torch.inference_mode()`` (how an eager
serving loop runs; the op skips its Python frame there, docs/BUILDING.md). Per token count: the two
outputs compared once (max abs difference over the output's max abs), then timed in interleaved
rounds (timing.py), median over rounds. Speed = grouped_mm time / fused_moe_ops time.

    python -m fused_moe_ops.bench --hf-eager --threads 2
    python -m fused_moe_ops.bench --hf-eager --hf-eager-tokens 1,16,256 --budget 0.5
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Sequence

import torch

from fused_moe_ops.bench.timing import sync, time_cpu_interleaved

DEFAULT_TOKENS = (1, 16, 256, 1024, 4096)
WIDTHS = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
              moe_intermediate_size=768, intermediate_size=3072, num_experts=64, num_experts_per_tok=8)
IMPLS = ("grouped_mm", "fused_moe_ops")
HEADER = f"{'tokens':>6}  {'grouped_mm':>12}  {'fused_moe_ops':>13}  {'speed':>6}  {'rounds':>6}  {'max diff':>9}"


def build(device: str, dtype: torch.dtype, layers: int = 2):
    import fused_moe_ops  # noqa: F401  (registers the backend)
    from transformers import Qwen3MoeConfig, Qwen3MoeModel

    cfg = Qwen3MoeConfig(num_hidden_layers=layers, vocab_size=1024, use_cache=False, norm_topk_prob=True,
                         tie_word_embeddings=False, experts_implementation="grouped_mm", **WIDTHS)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, cfg.initializer_range)
    return model.to(device=device, dtype=dtype).eval()


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.3f} s"


def bench(device: str, dtype: torch.dtype, tokens: Sequence[int], budget_s: float, min_rounds: int) -> List[Dict]:
    model = build(device, dtype)

    @contextlib.contextmanager
    def running(impl):
        model.set_experts_implementation(impl)
        with torch.inference_mode():
            yield

    rows = []
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    for m in tokens:
        g = torch.Generator(device=device).manual_seed(m)
        inputs = [torch.randn(1, m, WIDTHS["hidden_size"], generator=g, device=device).to(dtype) for _ in range(2)]
        outs = {}
        for impl in IMPLS:
            with running(impl):
                outs[impl] = model(inputs_embeds=inputs[0]).last_hidden_state.float()
        ref = outs["grouped_mm"]
        diff = ((outs["fused_moe_ops"] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        entries = []
        for impl in IMPLS:
            row = {"tokens": m, "impl": impl}

            def call(i, impl=impl):
                model(inputs_embeds=inputs[i % 2])
                sync(device)

            entries.append((row, call, lambda impl=impl: running(impl)))
        time_cpu_interleaved(entries, budget_s, min_rounds=min_rounds)
        ours, theirs = entries[1][0], entries[0][0]
        row = {"tokens": m, "grouped_mm_s": theirs["time_s"], "fused_moe_ops_s": ours["time_s"],
               "speed": theirs["time_s"] / ours["time_s"], "rounds": ours["rounds"], "max_rel_diff": diff}
        rows.append(row)
        print(f"{m:>6}  {_fmt(row['grouped_mm_s']):>12}  {_fmt(row['fused_moe_ops_s']):>13}  {row['speed']:>5.2f}x  "
              f"{row['rounds']:>6}  {diff:>9.2e}", flush=True)
    return rows


def markdown(rows: List[Dict], label: str) -> str:
    lines = [f"Eager HF Qwen3-MoE-shaped model ({label}): grouped_mm vs fused_moe_ops", "",
             "| tokens | grouped_mm | fused_moe_ops | speed |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['tokens']} | {_fmt(r['grouped_mm_s'])} | {_fmt(r['fused_moe_ops_s'])} | {r['speed']:.2f}x |"
              for r in rows]
    return "\n".join(lines) + "\n"
