"""What a GPU reports for the kernels whose machine code docs/BENCHMARKS.md tabulates: the driver's
function attributes (registers, local memory, static shared memory) and its occupancy calculator
(cuOccupancyMaxActiveBlocksPerMultiprocessor), in the rows of report.py, to compare with the table.

The CUDA kernel: the image the library runs on this GPU (its cubin where the build has machine code
for the GPU's arch, else the driver's JIT of its PTX), compiled as cuda.py compiles it and loaded
with cuModuleLoadData. The Triton kernel: each autotune config compiled for this GPU and loaded by
Triton's runtime. Needs a GPU (scripts/gpu_check.sh runs it).
"""
from __future__ import annotations

import ctypes
from typing import Dict, List

_ATTR = {"registers": 4, "shared": 1, "local": 3}  # CU_FUNC_ATTRIBUTE_NUM_REGS, SHARED_SIZE_BYTES, LOCAL_SIZE_BYTES


def _cuda():
    lib = ctypes.CDLL("libcuda.so.1")

    def call(name, *args):
        rc = getattr(lib, name)(*args)
        if rc != 0:
            raise RuntimeError(f"{name} failed: CUresult {rc}")

    return call


def function_report(call, function: int, threads: int, dynamic_shared: int = 0) -> Dict[str, int]:
    out = {}
    for name, attr in _ATTR.items():
        value = ctypes.c_int()
        call("cuFuncGetAttribute", ctypes.byref(value), ctypes.c_int(attr), ctypes.c_void_p(function))
        out[name] = value.value
    blocks = ctypes.c_int()
    call("cuOccupancyMaxActiveBlocksPerMultiprocessor", ctypes.byref(blocks), ctypes.c_void_p(function),
         ctypes.c_int(threads), ctypes.c_size_t(dynamic_shared))
    out["blocks"] = blocks.value
    return out


def observe(cuda_home: str) -> List[Dict]:
    import torch

    from . import cuda, report, triton as tri

    torch.empty(1, device="cuda")  # the primary context, current
    major, minor = torch.cuda.get_device_capability()
    arch = major * 10 + minor
    call = _cuda()
    rows: List[Dict] = []
    cubin_arch, ptx_arch = cuda.library_image_arch(arch)
    kernels, ptx_text, cubin = cuda.compile_image(cuda_home, cubin_arch or ptx_arch, ptx_arch)
    image = cubin if cubin_arch else ptx_text.encode() + b"\0"
    module = ctypes.c_void_p()
    call("cuModuleLoadData", ctypes.byref(module), ctypes.c_char_p(image))
    for k in kernels:
        if k.kernel != cuda.COMBINE_KERNELS[0]:
            continue  # the table (report.py) tabulates the gather kernel
        function = ctypes.c_void_p()
        call("cuModuleGetFunction", ctypes.byref(function), module, k.symbol.encode())
        for threads in report.CUDA_THREADS:
            got = function_report(call, function.value, threads)
            rows.append(dict(kernel="cuda", arch=f"sm_{arch}", threads=threads, registers=got["registers"],
                             spills=got["local"] - k.resources.stack, shared=got["shared"], blocks=got["blocks"],
                             name=f"{report.SHORT[k.input]}->{report.SHORT[k.output]} x{k.vec}"))
    for v in tri.config_variants():
        c = tri.compile_variant(v, arch, keep=True)
        c.kernel._init_handles()
        threads = 32 * v.num_warps
        got = function_report(call, c.kernel.function, threads, c.kernel.metadata.shared)
        rows.append(dict(kernel="triton", arch=f"sm_{arch}", threads=threads, registers=c.kernel.n_regs,
                         spills=c.kernel.n_spills, blocks=got["blocks"],
                         name=f"{report.SHORT[v.input]} BLOCK_K {v.block_k}/{v.num_warps}w"))
    return rows
