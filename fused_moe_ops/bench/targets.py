"""The project's performance targets, evaluated on one run's rows (PASS / FAIL / N/A per target)."""
from __future__ import annotations

from typing import Dict, List, Sequence


def _target(name: str, ok, detail: str) -> Dict[str, object]:
    return {"target": name, "status": "N/A" if ok is None else ("PASS" if ok else "FAIL"), "detail": detail}


def evaluate_targets(rows, device: str, model_rows: Sequence[Dict[str, object]] = ()) -> List[Dict[str, object]]:
    out: List[Dict[str, object]] = []
    if rows:
        out.extend(_sweep_targets(rows, device))
    out.extend(model_targets(device, model_rows))
    return out


def _sweep_targets(rows, device: str) -> List[Dict[str, object]]:
    out: List[Dict[str, object]] = []

    def get(impl, m, k, topk=8):
        for r in rows:
            if r["impl"] == impl and r["M"] == m and r["K"] == k and r.get("topk", 8) == topk and "time_s" in r:
                return r
        return None

    add = lambda name, ok, detail: out.append(_target(name, ok, detail))  # noqa: E731
    if device == "cpu":
        r = get("op", 1024, 4096)
        if r and "x_eager" in r and "x_inductor" in r and "pct_copy" in r:
            add("CPU M1024 K4096: op >= 5x eager", r["x_eager"] >= 5, f"{r['x_eager']:.1f}x")
            add("CPU M1024 K4096: op >= 5x inductor", r["x_inductor"] >= 5, f"{r['x_inductor']:.1f}x")
            add("CPU M1024 K4096: op >= 40% of copy BW", r["pct_copy"] >= 40, f"{r['pct_copy']:.0f}%")
        else:
            add("CPU M1024 K4096 targets", None, "shape/impls not in this run")
        r = get("op", 1, 7168)
        add("CPU M1 K7168: op call < 20 us", None if r is None else r["time_s"] < 20e-6,
            "shape not in this run" if r is None else f"{r['time_s'] * 1e6:.1f} us")
    else:
        big = [r for r in rows if r["impl"] == "cuda" and r["M"] >= 4096 and "pct_copy" in r]
        add("CUDA M>=4096: cuda >= 85% of copy BW", (min(r["pct_copy"] for r in big) >= 85) if big else None,
            ", ".join(f"M{r['M']} K{r['K']} top{r.get('topk')}: {r['pct_copy']:.0f}%" for r in big) or "no rows")
        small = [r for r in rows if r["impl"] == "cuda" and r["M"] <= 64 and "time_s" in r]
        add("CUDA M<=64: cuda call (graph) <= 5 us",
            (max(r["time_s"] for r in small) <= 5e-6) if small else None,
            ", ".join(f"M{r['M']} K{r['K']} top{r.get('topk')}: {r['time_s'] * 1e6:.2f} us" for r in small)
            or "no rows")
        pairs = [(get("cuda", r["M"], r["K"], r.get("topk", 8)), r) for r in rows
                 if r["impl"] == "triton" and "time_s" in r]
        pairs = [(c, t) for c, t in pairs if c is not None]
        add("CUDA: cuda <= triton at every shape",
            all(c["time_s"] <= t["time_s"] for c, t in pairs) if pairs else None,
            ", ".join(f"M{c['M']} K{c['K']}: {t['time_s'] / c['time_s']:.2f}x" for c, t in pairs) or "no rows")
    passes = [r for r in rows if r["impl"] == "inductor+pass" and "x_inductor" in r]
    add(f"{device.upper()}: compiled-with-pass >= 0.98x compiled-without at every shape",
        (min(r["x_inductor"] for r in passes) >= 0.98) if passes else None,
        ", ".join(f"M{r['M']} K{r['K']} top{r.get('topk')}: {r['x_inductor']:.2f}" for r in passes) or "no rows")
    return out


def model_targets(device: str, model_rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """The compiled model with the pass is >= 0.98x as fast as without it at every token count."""
    out = []
    for name in dict.fromkeys(r.get("model", "tiny") for r in model_rows):
        mine = [r for r in model_rows if r.get("model", "tiny") == name]
        mr = [r for r in mine if "ratio_without_over_with" in r]
        ok = (min(r["ratio_without_over_with"] for r in mr) >= 0.98) if mr else None
        out.append(_target(f"{device.upper()} model {name}: with-pass >= 0.98x without at every M", ok,
                           ", ".join(f"M{r['M']}: {r['ratio_without_over_with']:.3f}" for r in mr) or "no rows"))
    return out
