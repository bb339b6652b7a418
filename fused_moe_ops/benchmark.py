"""``python -m fused_moe_ops.benchmark``: an alias of ``python -m fused_moe_ops.bench``."""
import sys

from fused_moe_ops.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
