"""python -m fused_moe_ops.codegen: see fused_moe_ops/codegen/__init__.py."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_moe_ops.codegen",
                                     description="Compile both kernels for sm_80/90/100 and tabulate their machine code.")
    parser.add_argument("--write", metavar="FILE", help="replace the machine-code table in FILE (docs/BENCHMARKS.md)")
    parser.add_argument("--gpu-compare", metavar="FILE",
                        help="on a GPU: compare what the driver reports with the table in FILE; exit 1 on a difference")
    parser.add_argument("--json", metavar="FILE", help="with --gpu-compare: write the GPU's rows and the differences")
    args = parser.parse_args(argv)
    from ..build import find_cuda_home
    from . import report

    cuda_home = find_cuda_home()
    if args.gpu_compare:
        from . import gpu

        expected = report.parse_markdown(Path(args.gpu_compare).read_text())
        observed = gpu.observe(cuda_home)
        diffs = report.compare(expected, observed)
        if args.json:
            Path(args.json).write_text(json.dumps({"observed": observed, "differences": diffs}, indent=1))
        print(f"machine-code table vs GPU: {len(observed)} rows measured, {len(diffs)} differences")
        for d in diffs:
            print("  " + d)
        return 1 if diffs else 0
    start = time.time()
    cuda_rows, problems = report.cuda_rows(cuda_home=cuda_home)
    triton_rows, triton_problems = report.triton_rows(report.triton_compiled())
    table = report.markdown(cuda_rows + triton_rows)
    print(table)
    print(f"compiled in {time.time() - start:.0f} s", file=sys.stderr)
    for p in problems + triton_problems:
        print("PROBLEM: " + p, file=sys.stderr)
    if args.write:
        path = Path(args.write)
        path.write_text(report.replace_table(path.read_text(), table))
    return 1 if problems or triton_problems else 0


if __name__ == "__main__":
    sys.exit(main())
