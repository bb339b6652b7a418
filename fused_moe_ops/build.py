"""``python -m fused_moe_ops.build``: compile (or find in the cache) the native kernels ahead of time."""
import sys

from ._build import main

if __name__ == "__main__":
    sys.exit(main())
