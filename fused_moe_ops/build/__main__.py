"""``python -m fused_moe_ops.build``: compile (or find in the cache) the native kernels ahead of time."""
import sys

from fused_moe_ops.build import main

sys.exit(main())
