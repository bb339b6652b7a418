"""Summary table printed LAST by scripts/gpu_check.sh (also usable on its own).

    python scripts/gpu_summary.py OUT_DIR STEPS_TSV

STEPS_TSV: one line per step, "name<TAB>status<TAB>seconds<TAB>detail" (written by gpu_check.sh).
Reads OUT_DIR/bench_gpu.json and OUT_DIR/model_gpu.json when present. Standard library only, so
it prints even where torch is broken.
"""
from __future__ import annotations

import json
import os
import sys


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _t(sec):
    if sec is None:
        return "-"
    return f"{sec * 1e6:.2f} us" if sec < 1e-3 else f"{sec * 1e3:.3f} ms"


def main(argv):
    out_dir, steps_tsv = argv[1], argv[2]
    lines = []
    p = lines.append
    p("=" * 78)
    p("gpu_check summary")
    p("=" * 78)
    try:
        with open(steps_tsv) as f:
            steps = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
    except OSError:
        steps = []
    p(f"{'step':<18}{'status':<10}{'secs':>6}  detail")
    for s in steps:
        s += [""] * (4 - len(s))
        p(f"{s[0]:<18}{s[1]:<10}{s[2]:>6}  {s[3][:60]}")

    bench = _load(os.path.join(out_dir, "bench_gpu.json"))
    if bench:
        m = bench.get("machine", {})
        p("")
        p(f"machine: {m.get('gpu')} | torch {m.get('torch')} | triton {m.get('triton')} | {m.get('date_utc')}"
          + ("  [PARTIAL: sweep timed out]" if bench.get("partial") else ""))
        p(f"backends: {m.get('backends')}  fusion pass: {m.get('fusion_api')}")
        rows = bench.get("rows", [])
        shapes = sorted({(r.get("topk", 8), r["K"], r["M"]) for r in rows})
        impls = [i for i in ["cuda", "triton", "inductor", "inductor+pass", "eager", "copy"]
                 if any(r["impl"] == i for r in rows)]
        p(f"{'topk':>5}{'K':>6}{'M':>7}" + "".join(f"{i:>14}" for i in impls) + f"{'with/without':>13}{'cuda %copy':>11}")
        for topk, k, mm in shapes:
            by = {r["impl"]: r for r in rows if r.get("topk", 8) == topk and r["K"] == k and r["M"] == mm}
            cells = []
            for i in impls:
                r = by.get(i)
                cells.append(f"{_t(r.get('time_s')) if r else '-':>14}" if not (r and r.get("mismatch"))
                             else f"{'MISMATCH':>14}")
            ww = by.get("inductor+pass", {}).get("x_inductor")
            pc = by.get("cuda", {}).get("pct_copy")
            p(f"{topk:>5}{k:>6}{mm:>7}" + "".join(cells) + f"{(f'{ww:.2f}' if ww is not None else '-'):>13}"
              f"{(f'{pc:.0f}%' if pc is not None else '-'):>11}")
        for t in bench.get("targets", []):
            p(f"  {t['status']:<5} {t['target']}: {t['detail']}"[:200])
    else:
        p("")
        p("bench_gpu.json: none (sweep did not run or wrote nothing)")

    model = _load(os.path.join(out_dir, "model_gpu.json"))
    if model:
        p("")
        p("compiled models, without vs with the pass (ratio = without / with time: > 1 means the pass helps):")
        for r in model.get("model_rows", []):
            if "build_error" in r:
                p(f"  {r.get('model', '?')}: could not build: {r['build_error'][:100]}")
                continue
            ratio = r.get("ratio_without_over_with")
            p(f"  {r.get('model', 'tiny'):<10} M={r['M']:<6} without {_t(r.get('without_pass_s')):>12}  with {_t(r.get('with_pass_s')):>12}  "
              f"ratio {ratio if ratio is None else format(ratio, '.2f')}  rewrites {r.get('with_pass_rewrites', '-') if r.get('with_pass_compiled_here', True) else 'n/a (compile reused)'}"
              f"  {'outputs close' if r.get('outputs_close') else ('OUTPUTS DIFFER' if 'outputs_close' in r else '')}"
              + (f"  err: {r.get('with_pass_error') or r.get('without_pass_error')}"
                 if (r.get('with_pass_error') or r.get('without_pass_error')) else ""))
        for t in model.get("targets", []):
            p(f"  {t['status']:<5} {t['target']}: {t['detail']}"[:200])
    p("=" * 78)
    text = "\n".join(lines)
    print(text)
    try:
        with open(os.path.join(out_dir, "summary.txt"), "w") as f:
            f.write(text + "\n")
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
