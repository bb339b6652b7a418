"""The kernels' GPU machine code, compiled and checked without a GPU (docs/BENCHMARKS.md, "Machine
code"): the CUDA kernel through nvcc and ptxas (cuda.py), the Triton kernel through triton.compile
(triton.py), both read as PTX text and ptxas reports (ptx.py); blocks per SM from an occupancy model
(occupancy.py); the table and its comparison with a GPU (report.py, gpu.py).

    python -m fused_moe_ops.codegen                               # the table, and what is wrong
    python -m fused_moe_ops.codegen --write docs/BENCHMARKS.md    # regenerate the table there
    python -m fused_moe_ops.codegen --gpu-compare docs/BENCHMARKS.md   # on a GPU: driver vs table

Development tooling: `import fused_moe_ops` never imports it.
"""
