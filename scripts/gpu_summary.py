"""Summary printed LAST by scripts/gpu_check.sh (also usable on its own), and the per-job log
readers gpu_check uses for its steps table.

    python scripts/gpu_summary.py OUT_DIR STEPS_TSV          # the summary (also written to OUT_DIR/summary.txt)
    python scripts/gpu_summary.py --detail pytest LOG        # one line: counts, failures, the test a crash hit
    python scripts/gpu_summary.py --detail sanitize LOG      # one line: sanitizer errors, cases ok

STEPS_TSV: one line per step or job, "name<TAB>status<TAB>seconds<TAB>detail" (written by
gpu_check.sh). Reads OUT_DIR/bench_gpu.json and OUT_DIR/model_gpu.json when present, and the env
step's log from OUT_DIR/gpu_check.log for the card and versions. Standard library only, so it
prints even where torch is broken.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from typing import Dict, List, Optional

PYTEST_STATUSES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
_RESULT = re.compile(r"^(\S+::\S+)\s+(" + "|".join(PYTEST_STATUSES) + r")\b")
_STARTED = re.compile(r"^(\S+::\S+)")


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def pytest_detail(text: str) -> str:
    """Counts per status from a `pytest -v` log, the failed tests, and the test that was running
    when the log ends without a result for it (a crash or a timeout)."""
    counts: Counter = Counter()
    failed: List[str] = []
    last_started: Optional[str] = None
    finished = set()
    for line in text.splitlines():
        m = _RESULT.match(line)
        if m:
            node, status = m.groups()
            counts[status] += 1
            finished.add(node)
            if status in ("FAILED", "ERROR") and node not in failed:
                failed.append(node)
            continue
        m = _STARTED.match(line)
        if m and "::" in m.group(1):
            last_started = m.group(1)
    parts = [f"{counts[s]} {s.lower()}" for s in PYTEST_STATUSES if counts[s]]
    if not parts:
        tail = re.findall(r"^=+ (.*(?:passed|failed|error|skipped|deselected|no tests ran).*?) =+$", text, re.M)
        parts = [tail[-1]] if tail else ["no test results"]
    out = ", ".join(parts)
    if failed:
        out += "; failed: " + ", ".join(n.split("::", 1)[1] for n in failed[:3]) + (" ..." if len(failed) > 3 else "")
    # What a crash or a timeout hit comes first: the summary table cuts long lines.
    first = []
    if last_started and last_started not in finished:
        first.append(f"DIED IN {os.path.basename(last_started.split('::', 1)[0])}::{last_started.split('::', 1)[1]}")
    fatal = re.search(r"Fatal Python error: ([^\n]+)", text)
    if fatal:
        frame = re.search(r"(?:Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):\n\s+File \"([^\"]+)\", "
                          r"line (\d+) in (\S+)", text[fatal.end():])
        first.append(fatal.group(1).strip() + (
            f" at {os.path.basename(frame.group(1))}:{frame.group(2)} {frame.group(3)}" if frame else ""))
    return "; ".join(first + [out])


def sanitize_detail(text: str) -> str:
    parts = []
    m = re.findall(r"ERROR SUMMARY: (\d+) errors?", text)
    if m:
        parts.append(f"sanitizer errors {m[-1]}")
    kinds = Counter(re.findall(r"=+ (Invalid __\w+__ \w+ of size \d+ bytes|\w[\w ]*hazard|Barrier error[^\n]*)", text))
    if kinds:
        parts.append("; ".join(f"{n}x {k}" for k, n in kinds.most_common(3)))
    s = re.findall(r"^sanitize_kernels: (\d+/\d+ cases ok.*)$", text, re.M)
    parts.append(s[-1][:160] if s else "the script printed no summary")
    fatal = re.search(r"(Fatal Python error: [^\n]+|Segmentation fault|Aborted)", text)
    if fatal:
        parts.append(fatal.group(1))
    return "; ".join(parts)


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _t(sec):
    if sec is None:
        return "-"
    return f"{sec * 1e6:.1f}us" if sec < 1e-3 else f"{sec * 1e3:.2f}ms"


def _machine_line(out_dir: str, bench) -> str:
    """Card, versions and date: from the bench JSON, else from the env step's output in the log."""
    if bench and bench.get("machine"):
        m = bench["machine"]
        return f"{m.get('gpu')} | torch {m.get('torch')} | triton {m.get('triton')} | {m.get('date_utc')}"
    log = _read(os.path.join(out_dir, "gpu_check.log"))

    def get(pattern: str) -> str:
        found = re.findall(pattern, log, re.M)
        return found[-1] if found else "?"

    gpu, torch_v, triton_v = get(r"^gpu (.+)$"), get(r"^torch (\S+)$"), get(r"^triton (\S+)$")
    python_v, date = get(r"^python (\S+)"), get(r"^gpu_check: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC)")
    return f"{gpu} | torch {torch_v} | triton {triton_v} | python {python_v} | {date}"


def _bench_lines(bench) -> List[str]:
    lines = []
    rows = [r for r in bench.get("rows", []) if r.get("impl")]
    if bench.get("partial"):
        lines.append("  [PARTIAL: the sweep was cut short]")
    shapes = sorted({(r.get("topk", 0), r["K"], r["M"]) for r in rows})
    by = {(r.get("topk", 0), r["K"], r["M"], r["impl"]): r for r in rows}
    bad = [f"{r['impl']} topk{r.get('topk')} K{r['K']} M{r['M']}" for r in rows if r.get("mismatch") or r.get("error")]
    if len(shapes) <= 12:
        impls = ["cuda", "triton", "inductor", "inductor+pass", "eager", "copy"]
        lines.append(f"{'topk':>4}{'K':>6}{'M':>7}" + "".join(f"{i:>14}" for i in impls) + f"{'cuda %copy':>11}")
        for topk, k, m in shapes:
            cells = "".join(f"{_t(by[(topk, k, m, i)].get('time_s')) if (topk, k, m, i) in by else '-':>14}"
                            for i in impls)
            pc = by.get((topk, k, m, "cuda"), {}).get("pct_copy")
            lines.append(f"{topk:>4}{k:>6}{m:>7}{cells}{(f'{pc:.0f}%' if pc is not None else '-'):>11}")
    else:  # a big grid: per (topk, K), the CUDA kernel's % of copy bandwidth and speed-up over Inductor by M
        for topk, k in sorted({(t, k) for t, k, _ in shapes}):
            ms = sorted(m for t, kk, m in shapes if (t, kk) == (topk, k))
            pct = " ".join(f"{m}:{by[(topk, k, m, 'cuda')]['pct_copy']:.0f}%" if by.get((topk, k, m, "cuda"), {})
                           .get("pct_copy") is not None else f"{m}:-" for m in ms)
            xi = " ".join(f"{m}:{by[(topk, k, m, 'cuda')]['x_inductor']:.1f}" if by.get((topk, k, m, "cuda"), {})
                          .get("x_inductor") is not None else f"{m}:-" for m in ms)
            ww = " ".join(f"{m}:{by[(topk, k, m, 'inductor+pass')]['x_inductor']:.2f}"
                          if by.get((topk, k, m, "inductor+pass"), {}).get("x_inductor") is not None else f"{m}:-"
                          for m in ms)
            lines.append(f"  topk {topk} K {k}  cuda %copy by M: {pct}")
            lines.append(f"  topk {topk} K {k}  cuda x inductor:  {xi}")
            lines.append(f"  topk {topk} K {k}  with/without pass (inductor / inductor+pass time): {ww}")
    if bad:
        lines.append(f"  MISMATCH/ERROR rows: {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}")
    for t in bench.get("targets", []):
        lines.append(f"  {t['status']:<5} {t['target']}: {t['detail']}"[:160])
    return lines


def _model_lines(model) -> List[str]:
    lines = []
    for r in model.get("model_rows", []):
        if "build_error" in r:
            lines.append(f"  {str(r.get('model', '?'))[:18]:<18} could not build: {str(r['build_error'])[:90]}")
            continue
        ratio = r.get("ratio_without_over_with")
        err = r.get("with_pass_error") or r.get("without_pass_error")
        lines.append(
            f"  {str(r.get('model', 'TinyMoE'))[:18]:<18} M={r.get('M', '?'):<6} without {_t(r.get('without_pass_s')):>9}"
            f"  with {_t(r.get('with_pass_s')):>9}  ratio {'-' if ratio is None else format(ratio, '.2f')}"
            f"  rewrites {r.get('with_pass_rewrites', '-')}"
            + ("" if "outputs_close" not in r else ("" if r["outputs_close"] else "  OUTPUTS DIFFER"))
            + (f"  err: {str(err)[:60]}" if err else ""))
    for t in model.get("targets", []):
        lines.append(f"  {t['status']:<5} {t['target']}: {t['detail']}"[:160])
    return lines


def summary(out_dir: str, steps_tsv: str) -> str:
    lines: List[str] = []
    p = lines.append
    bench = _load(os.path.join(out_dir, "bench_gpu.json"))
    model = _load(os.path.join(out_dir, "model_gpu.json"))
    p("=" * 100)
    p("gpu_check summary: " + _machine_line(out_dir, bench))
    p("=" * 100)
    steps = [ln.rstrip("\n").split("\t") for ln in _read(steps_tsv).splitlines() if ln.strip()]
    p(f"{'step / job':<30}{'status':<14}{'secs':>5}  detail (in full: the '### name' lines of gpu_check.log)")
    for s in steps:
        s += [""] * (4 - len(s))
        p(f"{s[0][:29]:<30}{s[1][:13]:<14}{s[2]:>5}  {s[3][:100]}")
    bad = [s[0] for s in steps if s[1].startswith(("FAIL", "CRASH", "TIMEOUT"))]
    p(f"not ok: {', '.join(bad)}" if bad else "every step that ran is ok")
    if bench:
        p("")
        p("bench (bench_gpu.json):")
        lines.extend(_bench_lines(bench))
    if model:
        p("")
        p("compiled models, without vs with the pass (model_gpu.json):")
        lines.extend(_model_lines(model))
    p("=" * 100)
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    if len(argv) >= 4 and argv[1] == "--detail":
        text = _read(argv[3])
        print(pytest_detail(text) if argv[2] == "pytest" else sanitize_detail(text) if argv[2] == "sanitize"
              else (text.strip().splitlines() or [""])[-1][:150])
        return 0
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    text = summary(argv[1], argv[2])
    print(text)
    try:
        with open(os.path.join(argv[1], "summary.txt"), "w") as f:
            f.write(text + "\n")
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
