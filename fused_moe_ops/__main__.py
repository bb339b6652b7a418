"""``python -m fused_moe_ops``: environment report.

Prints the versions that matter (Python, torch, Triton, CUDA toolkit and device), which kernel
serves ``moe::shuffle_mul_sum`` on CPU and on CUDA and why (build result, fallback reason),
where the build cache is, whether the Inductor fusion pass is installed and enabled, whether the HF
transformers experts backend is registered, and, for a
build that failed, the compiler's full message.

    python -m fused_moe_ops            # human-readable report
    python -m fused_moe_ops --json     # the same facts as JSON, plus where the dispatcher's kernels were registered

Importing the package is what loads (from the wheel or the cache) or builds the kernels, so the
report shows exactly what an ``import fused_moe_ops`` in this environment gets. The exit status is 0 even when
a build failed (the op still works on a fallback); ``--strict`` makes a failed build exit 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

ENV_VARS = (
    "FUSED_MOE_OPS_CACHE",
    "FUSED_MOE_OPS_NO_BUILD",
    "FUSED_MOE_OPS_NO_CUDA",
    "FUSED_MOE_OPS_BUILD_CUDA",
    "ATEN_CPU_CAPABILITY",
    "FUSED_MOE_OPS_CPU_PREFETCH",
    "FUSED_MOE_OPS_CUDA_BACKEND",
    "FUSED_MOE_OPS_DISABLE_FUSION",
    "CUDA_HOME",
    "TORCH_CUDA_ARCH_LIST",
    "CXX",
)


def _fusion_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {"available": False, "installed": False, "enabled": None, "stats": None, "error": None,
                            "slot": None}
    try:
        from . import fusion
    except Exception as e:  # noqa: BLE001 - report, never crash
        info["error"] = f"{type(e).__name__}: {e}"
        return info
    needed = ("fusion_enabled", "fusion_stats")
    missing = [n for n in needed if not hasattr(fusion, n)]
    if missing:
        info["error"] = f"fused_moe_ops.fusion lacks {', '.join(missing)} (not installed yet)"
        return info
    info["available"] = True
    # Installed = Inductor will run it: the pass sits in torch._inductor.config.post_grad_custom_post_pass.
    try:
        import torch._inductor.config as inductor_config
        from .fusion import _pass

        info["installed"] = bool(_pass.contains_fusion(inductor_config.post_grad_custom_post_pass))
        info["slot"] = repr(inductor_config.post_grad_custom_post_pass)
    except Exception as e:  # noqa: BLE001 - an older/newer fusion package layout: trust the API
        info["installed"] = True
        info["error"] = f"could not inspect the Inductor slot ({type(e).__name__}: {e})"
    try:
        info["enabled"] = bool(fusion.fusion_enabled())
        info["stats"] = fusion.fusion_stats()
    except Exception as e:  # noqa: BLE001
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def _hf_experts_info() -> Dict[str, Any]:
    """The HF transformers experts backend's state, without importing transformers."""
    from .integrations import transformers as hf

    return {"name": hf.NAME, **hf.state()}


def _dispatcher_registrations(op: str = "moe::shuffle_mul_sum") -> Dict[str, str]:
    """Where the dispatcher's CPU / CUDA kernels for the op were registered (file:line), as the
    dispatcher itself says: a csrc/ file for the native kernels, a Python file for the fallbacks."""
    import torch

    found: Dict[str, str] = {}
    try:
        dump = torch._C._dispatch_dump(op)
    except Exception:  # noqa: BLE001 - private API: best effort
        return found
    for line in dump.splitlines():
        key, sep, rest = line.partition(": registered at ")
        if sep and key in ("CPU", "CUDA"):
            found[key.lower()] = rest.split(" :: ")[0].strip()
    return found


def collect() -> Dict[str, Any]:
    """Everything the report prints, as plain data."""
    import torch

    import fused_moe_ops
    from fused_moe_ops import _kernel_spec as spec, _registry, build as _build

    try:
        import triton

        triton_version: Optional[str] = triton.__version__
    except Exception as e:  # noqa: BLE001
        triton_version = None
        triton_error = f"{type(e).__name__}: {e}"
    else:
        triton_error = None

    cuda_home = _build.find_cuda_home() if torch.version.cuda else None
    device: Dict[str, Any] = {"available": False}
    try:
        if torch.cuda.is_available():
            idx = torch.cuda.current_device()
            cap = torch.cuda.get_device_capability(idx)
            device = {
                "available": True,
                "count": torch.cuda.device_count(),
                "name": torch.cuda.get_device_name(idx),
                "capability": f"sm_{cap[0]}{cap[1]}",
            }
    except Exception as e:  # noqa: BLE001
        device = {"available": False, "error": f"{type(e).__name__}: {e}"}

    builds: Dict[str, Any] = {}
    for kind in ("cpu", "cuda"):
        r = _build.RESULTS.get(kind)
        if r is None:
            builds[kind] = {"state": "not attempted"}
            continue
        state = "ok" if r.ok else ("skipped" if r.skipped else "failed")
        builds[kind] = {
            "state": state,
            "skipped": r.skipped,
            "error": r.error,
            "library": r.library,
            "build_dir": r.build_dir,
            "built_now": r.built_now,
            "origin": r.origin,
            "isa": r.isa,
            "row_prefetch": r.row_prefetch,
            "note": r.note,
            "flags": list(r.flags),
        }

    return {
        "package": {"version": fused_moe_ops.__version__, "path": str(Path(fused_moe_ops.__file__).parent)},
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_error": triton_error,
        "cuda_toolkit": {"home": cuda_home, "nvcc": spec.toolkit_cuda_version(cuda_home)},
        "cuda_device": device,
        "cpu_isa": _build.cpu_isa(),
        "cache": {"root": str(_build.cache_root()), "from_env": "FUSED_MOE_OPS_CACHE" in os.environ},
        "active": dict(_registry.ACTIVE),
        "active_scatter": dict(_registry.SCATTER_ACTIVE),
        "fallback_reasons": dict(_registry.FALLBACK_REASONS),
        "dispatcher": _dispatcher_registrations(),
        "dispatcher_scatter": _dispatcher_registrations("moe::scatter_mul_sum"),
        "builds": builds,
        "fusion": _fusion_info(),
        "hf_experts": _hf_experts_info(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def _headline(error: Optional[str]) -> str:
    """The line of a build error worth reading first: the compiler's first "error" line if any."""
    lines = [line.strip() for line in (error or "").strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    for line in lines[1:]:
        if "error" in line.lower() and not line.startswith("ninja:"):
            return line
    return lines[0]


def _build_line(b: Dict[str, Any]) -> str:
    if b["state"] == "ok":
        origin = {"wheel": "from the wheel", "cache": "from cache", "compiled": "compiled now"}.get(b["origin"], "")
        isa = f", {b['isa']}" if b.get("isa") else ""
        if b.get("row_prefetch") is False:
            isa += ", no row prefetch"
        return f"ok ({origin}{isa})  {b['library']}"
    if b["state"] == "skipped":
        return f"skipped: {b['skipped']}"
    if b["state"] == "failed":
        return f"FAILED: {_headline(b['error'])[:200]}  (full message below)"
    return b["state"]


def render(info: Dict[str, Any]) -> str:
    lines: List[str] = []
    add = lines.append
    add(f"fused_moe_ops {info['package']['version']}  ({info['package']['path']})")
    add("")
    add("Versions")
    add(f"  python        {info['python']}  ({info['platform']})")
    add(f"  torch         {info['torch']}  ({'CUDA ' + info['torch_cuda'] if info['torch_cuda'] else 'CPU-only build'})")
    add(f"  triton        {info['triton'] or 'not available (' + str(info['triton_error']) + ')'}")
    tk = info["cuda_toolkit"]
    if tk["home"]:
        add(f"  CUDA toolkit  {tk['home']}  (nvcc {tk['nvcc'] or '?'})")
    else:
        add("  CUDA toolkit  not found" + ("" if info["torch_cuda"] else " (not needed: torch is CPU-only)"))
    dev = info["cuda_device"]
    if dev.get("available"):
        add(f"  CUDA device   {dev['name']} ({dev['capability']}), {dev['count']} visible")
    else:
        add("  CUDA device   none" + (f" ({dev['error']})" if dev.get("error") else ""))
    add(f"  CPU ISA       {info['cpu_isa']}")
    add("")
    cache = info["cache"]
    add(f"Build cache     {cache['root']}" + ("  (FUSED_MOE_OPS_CACHE)" if cache["from_env"] else "  (default; set FUSED_MOE_OPS_CACHE to move it)"))
    add("")
    add("Kernels for moe::shuffle_mul_sum")
    add(f"  {'device':7s} {'active':10s} build")
    for kind in ("cpu", "cuda"):
        active = info["active"].get(kind, "-")
        add(f"  {kind:7s} {active:10s} {_build_line(info['builds'][kind])}")
    for kind, why in info["fallback_reasons"].items():
        skipped = info["builds"].get(kind, {}).get("skipped")
        if skipped and why == f"CUDA kernel not built: {skipped}":
            continue  # the build row above already says why
        add(f"  {kind} fallback because: {why}")
    for kind in ("cpu", "cuda"):
        if info["builds"][kind].get("note"):
            add(f"  {kind}: {info['builds'][kind]['note']}")
    scatter = info["active_scatter"]
    add("Kernels for moe::scatter_mul_sum: "
        + ", ".join(f"{kind} {scatter.get(kind, '-')}" for kind in ("cpu", "cuda")))
    add("")
    fu = info["fusion"]
    if fu["installed"]:
        stats = fu["stats"] or {}
        state = "enabled" if fu["enabled"] else "DISABLED (fused_moe_ops.disable_fusion() / enable_fusion())"
        add(f"Fusion pass     installed in torch._inductor.config.post_grad_custom_post_pass, {state}")
        from_cache = f" ({stats['from_cache']} from Inductor's FX graph cache)" if stats.get("from_cache") else ""
        add(f"                rewrites in this process so far: {stats.get('rewrites', '?')}{from_cache}")
    elif fu["available"]:
        why = ("FUSED_MOE_OPS_DISABLE_FUSION is set" if info["env"].get("FUSED_MOE_OPS_DISABLE_FUSION")
               else "the Inductor slot does not hold it")
        add(f"Fusion pass     available but NOT installed ({why}); fused_moe_ops.enable_fusion() installs it")
    else:
        add(f"Fusion pass     NOT available ({fu['error']})")
    if fu["available"] and fu["error"]:
        add(f"                ({fu['error']})")
    add("")
    hf = info["hf_experts"]
    if hf["registered"]:
        add(f'HF experts backend  experts_implementation="{hf["name"]}" {hf["reason"]}')
    elif hf.get("will_register"):
        add(f'HF experts backend  experts_implementation="{hf["name"]}" available: {hf["reason"]}')
    else:
        add(f'HF experts backend  experts_implementation="{hf["name"]}" not registered: {hf["reason"]}')
    add("")
    if info["env"]:
        add("Environment")
        for k, v in info["env"].items():
            add(f"  {k}={v}")
        add("")
    failed = [(k, b) for k, b in info["builds"].items() if b["state"] == "failed"]
    for kind, b in failed:
        add(f"Build error ({kind}), build dir {b['build_dir']}:")
        add("-" * 72)
        add((b["error"] or "").rstrip())
        add("-" * 72)
        add("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_moe_ops", description="Environment report of fused_moe_ops: versions, kernels built and active, build cache, fusion pass, build errors.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--json-out", metavar="PATH", help="also write the JSON report to PATH")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a kernel build failed")
    args = parser.parse_args(argv)
    info = collect()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(info, indent=2, default=str))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        sys.stdout.write(render(info))
    if args.strict and any(b["state"] == "failed" for b in info["builds"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
