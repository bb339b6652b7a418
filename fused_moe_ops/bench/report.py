"""Output of the benchmark: text tables, Markdown, JSON, the GB/s plot."""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, Optional, Sequence

from .sweep import ALL_IMPLS


def fmt_time(t: float) -> str:
    if t < 1e-3:
        return f"{t * 1e6:.2f} us"
    if t < 1:
        return f"{t * 1e3:.3f} ms"
    return f"{t:.2f} s"


def _has_several_topk(rows) -> bool:
    return len({r.get("topk") for r in rows}) > 1


def print_table(rows, file=sys.stdout) -> None:
    """The sweep, one line per implementation and shape; shapes separated by a blank line."""
    tk = _has_several_topk(rows)
    hdr = (f"{'impl':<14}{'topk':>5}" if tk else f"{'impl':<14}") + \
        f"{'M':>7}{'K':>6}{'time':>12}{'GB/s':>9}{'%copy':>7}{'x eager':>9}{'x ind':>8}  note"
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    last = None
    for r in rows:
        shape = (r.get("topk"), r["M"], r["K"])
        if last is not None and shape != last:
            print(file=file)
        last = shape
        lead = f"{r['impl']:<14}{r['topk']:>5}" if tk else f"{r['impl']:<14}"
        if "time_s" not in r:
            why = r.get("skipped") or r.get("error") or ""
            print(f"{lead}{r['M']:>7}{r['K']:>6}{'-':>12}{'-':>9}{'-':>7}{'-':>9}{'-':>8}  {why[:90]}", file=file)
            continue
        f = lambda key, spec: format(r[key], spec) if key in r else "-"  # noqa: E731
        note = r.get("note", "")
        if r.get("timing") and r["timing"] != "wall":
            note = (r["timing"] + " " + note).strip()
        print(f"{lead}{r['M']:>7}{r['K']:>6}{fmt_time(r['time_s']):>12}{f('gbps', '.1f'):>9}"
              f"{f('pct_copy', '.0f'):>7}{f('x_eager', '.2f'):>9}{f('x_inductor', '.2f'):>8}  {note}", file=file)


def print_pass_table(summaries, file=sys.stdout) -> None:
    """Pass vs no pass per shape: the compiled combine with and without the pass, the op
    called directly, and the share of copy bandwidth each reaches. with/without = inductor time /
    inductor+pass time (> 1: the pass made it faster)."""
    hdr = (f"{'topk':>5}{'K':>6}{'M':>7}{'inductor':>12}{'ind+pass':>12}{'with/without':>14}{'op':>12}"
           f"{'op/ind':>8}{'%copy ind':>10}{'%copy pass':>11}{'%copy op':>9}  rewrites")
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    last = None
    for s in summaries:
        if last is not None and (s["topk"], s["K"]) != last:
            print(file=file)
        last = (s["topk"], s["K"])
        t = s["times_s"]
        op_name = "cuda" if "cuda" in t else "op"
        g = lambda key, spec: format(s[key], spec) if key in s else "-"  # noqa: E731
        tt = lambda name: fmt_time(t[name]) if name in t else "-"  # noqa: E731
        print(f"{s['topk']:>5}{s['K']:>6}{s['M']:>7}{tt('inductor'):>12}{tt('inductor+pass'):>12}"
              f"{g('with_over_without_speed', '.2f'):>14}{tt(op_name):>12}{g('op_over_inductor_speed', '.2f'):>8}"
              f"{g('pct_copy_inductor', '.0f'):>10}{g('pct_copy_inductor+pass', '.0f'):>11}"
              f"{g('pct_copy_' + op_name, '.0f'):>9}  {s.get('pass_rewrites', '-')}", file=file)
    for (topk, k), ms in pass_slower_at(summaries).items():
        print(f"# topk {topk}, K {k}: with the pass slower (with/without < 1) at M = "
              f"{', '.join(map(str, ms)) if ms else 'none'}", file=file)


def pass_slower_at(summaries) -> Dict[tuple, list]:
    """Per (topk, K): the token counts where the compiled combine with the pass was slower than without."""
    out: Dict[tuple, list] = {}
    for s in summaries:
        if "with_over_without_speed" in s:
            out.setdefault((s["topk"], s["K"]), [])
            if s["with_over_without_speed"] < 1.0:
                out[(s["topk"], s["K"])].append(s["M"])
    return out


MODEL_HEADER = (f"{'model':<12}{'tokens':>7}{'without pass':>15}{'with pass':>15}{'with/without':>14}  "
                f"{'rewrites':>8}  {'launches w/o -> with':<21}outputs")


def print_model(rows, file=sys.stdout, header: bool = True) -> None:
    """The model-level comparison: one line per model and token count. with/without = without-pass
    time / with-pass time (> 1: the pass made the model faster)."""
    if header:
        print(MODEL_HEADER, file=file)
        print("-" * len(MODEL_HEADER), file=file)
    for r in rows:
        if "build_error" in r:
            print(f"{r['model']:<12}{'-':>7}  could not build: {r['build_error'][:100]}", file=file)
            continue
        a = fmt_time(r["without_pass_s"]) if "without_pass_s" in r else (r.get("without_pass_error") or "-")[:14]
        b = fmt_time(r["with_pass_s"]) if "with_pass_s" in r else (
            r.get("with_pass_error") or r.get("with_pass_skipped") or "-")[:14]
        ratio = f"{r['ratio_without_over_with']:.3f}" if "ratio_without_over_with" in r else "-"
        rw = r.get("with_pass_rewrites", "-") if r.get("with_pass_compiled_here", True) else "reused"
        la, lb = r.get("without_pass_launches"), r.get("with_pass_launches")
        launches = f"{la} -> {lb}" if la is not None and lb is not None else "-"
        out = "close" if r.get("outputs_close") else ("DIFFER" if "outputs_close" in r else "-")
        print(f"{r['model']:<12}{r['M']:>7}{a:>15}{b:>15}{ratio:>14}  {str(rw):>8}  {launches:<21}{out}", file=file)


def markdown_table(rows, machine_name: str) -> str:
    """The sweep as a Markdown table (docs/BENCHMARKS.md, the README performance section)."""
    tk = _has_several_topk(rows)
    out = ["| machine | impl |" + (" topk |" if tk else "") + " M | K | time | GB/s | % of copy | x eager | x inductor |",
           "|---|---|" + ("---:|" if tk else "") + "---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "time_s" not in r:
            continue
        f = lambda key, spec: format(r[key], spec) if key in r else "-"  # noqa: E731
        out.append(f"| {machine_name} | {r['impl']} |" + (f" {r['topk']} |" if tk else "") +
                   f" {r['M']} | {r['K']} | {fmt_time(r['time_s'])} | "
                   f"{f('gbps', '.1f')} | {f('pct_copy', '.0f')}% | {f('x_eager', '.1f')} | {f('x_inductor', '.1f')} |")
    return "\n".join(out) + "\n"


def markdown_model_table(rows, machine_name: str) -> str:
    """The model comparison as a Markdown table; on CPU also the ratio of the least-disturbed rounds."""
    with_min = any("without_pass_time_min_s" in r for r in rows)
    out = ["| machine | model | tokens | without pass | with pass | with/without speed |"
           + (" same, min-round times |" if with_min else "") + " rewrites | launches w/o -> with |",
           "|---|---|---:|---:|---:|---:|" + ("---:|" if with_min else "") + "---:|---|"]
    for r in rows:
        if "without_pass_s" not in r or "with_pass_s" not in r:
            continue
        rw = r.get("with_pass_rewrites", "-") if r.get("with_pass_compiled_here", True) else "reused"
        mn = ""
        if with_min:
            a, b = r.get("without_pass_time_min_s"), r.get("with_pass_time_min_s")
            mn = f" {a / b:.3f} |" if a and b else " - |"
        la, lb = r.get("without_pass_launches"), r.get("with_pass_launches")
        out.append(f"| {machine_name} | {r['model']} | {r['M']} | {fmt_time(r['without_pass_s'])} | "
                   f"{fmt_time(r['with_pass_s'])} | {r['ratio_without_over_with']:.3f} |{mn} {rw} | "
                   f"{f'{la} -> {lb}' if la is not None and lb is not None else '-'} |")
    return "\n".join(out) + "\n"


def plot(rows, path: str, title: str) -> Optional[str]:
    """GB/s against M, one panel per (K, top-k); None on success, else why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: {e}"
    panels = sorted({(r["K"], r.get("topk")) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (k, topk) in zip(axes[0], panels):
        for impl in ALL_IMPLS:
            pts = sorted((r["M"], r["gbps"]) for r in rows
                         if r["K"] == k and r.get("topk") == topk and r["impl"] == impl and "gbps" in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="--" if impl == "copy" else "-", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens M")
        ax.set_ylabel("effective GB/s (input rows read + output written)")
        ax.set_title(f"K={k}, topk={topk}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def write_json(path: str, result) -> None:
    """Atomically (a run killed mid-write leaves the previous, complete file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


def print_targets(targets: Sequence[Dict[str, object]], file=sys.stdout) -> None:
    for t in targets:
        print(f"  {t['status']:<5} {t['target']}: {t['detail']}", file=file)

