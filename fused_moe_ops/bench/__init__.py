"""The benchmark tool, ``python -m fused_moe_ops.bench``.

One concern per module:

    cli.py        the command line: flags, defaults, the two modes, the printed report
    timing.py     CPU wall clock in interleaved rounds, CUDA events, CUDA-graph capture and replay,
                  how many input sets to rotate through
    variants.py   compiling a function without and with the fusion pass, kept apart
    machine.py    what ran it (CPU, GPU, versions, backends)
    sweep.py      the op-level sweep: one shape, every implementation; named grids ("pass-vs-inductor")
    models.py     the model-level comparison (TinyMoE and the HF models), with vs without the pass
    hf_models.py  Qwen3-MoE / Qwen2-MoE from transformers' own classes, random weights
    hf_eager.py   eager HF model, experts_implementation grouped_mm vs fused_moe_ops
    scatter.py    the scatter form (moe::scatter_mul_sum) vs eager index_add_ vs Inductor, on CPU
    report.py     text tables, Markdown, JSON, the plot
    targets.py    the performance targets, evaluated on one run

A tool of its own: ``python -m fused_moe_ops.bench.engines`` (engines.py), what the engines' call
signatures (fused_moe_ops.apply_shuffle_mul_sum, fused_moe_ops.moe_sum) cost per call over the op.
"""
