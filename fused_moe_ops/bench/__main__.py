"""``python -m fused_moe_ops.bench``: the benchmark tool (fused_moe_ops/bench/cli.py)."""
import sys

from fused_moe_ops.bench.cli import main

sys.exit(main())
