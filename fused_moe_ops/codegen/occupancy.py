"""How many blocks of a kernel fit on one SM, from its registers and shared memory: the CUDA
occupancy calculator's arithmetic with the per-architecture limits of the CUDA C++ Programming
Guide ("Compute Capabilities", technical specifications), for the architectures the kernels are
compiled for. A model: on a GPU, cudaOccupancyMaxActiveBlocksPerMultiprocessor gives the real
figure (scripts/gpu_check.sh compares the two).
"""
from __future__ import annotations

import dataclasses
from typing import Dict


@dataclasses.dataclass(frozen=True)
class SmLimits:
    max_threads: int = 2048       # resident threads per SM
    max_blocks: int = 32          # resident blocks per SM
    registers: int = 65536        # 32-bit registers per SM
    register_unit: int = 256      # registers are allocated per warp in units of this many
    shared: int = 228 * 1024      # shared memory per SM usable by blocks (largest carveout)
    shared_reserved: int = 1024   # shared memory the system takes per block (sm_80 and later)
    shared_unit: int = 128        # allocation granularity of a block's shared memory


SM_LIMITS: Dict[int, SmLimits] = {
    80: SmLimits(shared=164 * 1024),  # A100
    90: SmLimits(),                   # H100 / H200
    100: SmLimits(),                  # B200 / GB200
}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def blocks_per_sm(arch: int, threads: int, registers: int, shared: int) -> int:
    """Resident blocks per SM of a kernel using `registers` per thread and `shared` bytes of shared
    memory per block, launched with `threads` threads per block."""
    lim = SM_LIMITS[arch]
    warps = -(-threads // 32)
    by_threads = lim.max_threads // (warps * 32)
    per_warp = _round_up(max(registers, 1) * 32, lim.register_unit)
    by_registers = (lim.registers // per_warp) // warps
    per_block = _round_up(shared, lim.shared_unit) + lim.shared_reserved
    by_shared = lim.shared // per_block
    return max(0, min(lim.max_blocks, by_threads, by_registers, by_shared))


def resident_warps(arch: int, threads: int, registers: int, shared: int) -> int:
    return blocks_per_sm(arch, threads, registers, shared) * (-(-threads // 32))
