"""What ran the benchmark: CPU, GPU, versions, which kernel serves the op, load average."""
from __future__ import annotations

import datetime
import os
import platform
from typing import Dict

import torch

from fused_moe_ops import _registry

from .variants import fusion_api_reason


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    isa = ""
    try:
        from fused_moe_ops.build import cpu_isa

        isa = cpu_isa()
    except Exception:  # noqa: BLE001
        pass
    return f"{name}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads" + (
        f", {isa.upper()}" if isa and isa != "default" else "")


def machine(device: str) -> Dict[str, object]:
    info: Dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "backends": dict(_registry.ACTIVE),
        "fallback_reasons": dict(_registry.FALLBACK_REASONS),
        "fusion_api": fusion_api_reason() or "present",
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001 - optional; absent or broken both mean "no HF models"
        info["transformers"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
        info["gpu_l2_mb"] = getattr(p, "L2_cache_size", 0) / 2**20
    return info


def machine_label(info: Dict[str, object], device: str) -> str:
    if device == "cuda":
        return str(info.get("gpu", "GPU")).split(",")[0]
    n = torch.get_num_threads()
    return str(info["cpu"]).split(",")[0] + f" ({n} thread{'s' if n != 1 else ''})"
