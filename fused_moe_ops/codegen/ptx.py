"""Reading compiler output as text: the global loads and stores of a PTX file with the source line
each comes from, and the register / spill / shared-memory figures of a `ptxas -v` log.

Plain text in, plain records out (no compiler run here), so the checks on them can be tested on
hand-written snippets.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional

# Bits of a PTX element type (the suffix of ld / st).
_TYPE_BITS = {f"{k}{n}": n for k in "bsuf" for n in (8, 16, 32, 64)}
_TYPE_BITS["b128"] = 128

_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+\d+")
_FUNC = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.(entry|func)\s+(?:\([^)]*\)\s*)?([\w$]+)")
_ACCESS = re.compile(r"^\s*(?:@!?%\w+\s+)?((ld|st)\.global[\w.:]*)\s")


@dataclasses.dataclass(frozen=True)
class Access:
    """One ld.global / st.global instruction."""

    function: str
    kind: str          # "ld" or "st"
    instruction: str   # e.g. "ld.global.v4.b32"
    bits: int          # bits moved per thread: vector length x element width
    file: str          # source file of the innermost .loc before it ("" if none)
    line: int


def access_bits(instruction: str) -> int:
    """ld.global.nc.v4.u32 -> 128; st.global.b16 -> 16."""
    vec, bits = 1, 0
    for part in instruction.split("."):
        if part in ("v2", "v4", "v8"):
            vec = int(part[1:])
        elif part in _TYPE_BITS:
            bits = _TYPE_BITS[part]
    if not bits:
        raise ValueError(f"no element type in {instruction!r}")
    return vec * bits


def global_accesses(ptx: str) -> List[Access]:
    """Every global load and store of a PTX module, in order, each with its function and the source
    line of the .loc directive that precedes it (with inlining, the inlined code's own line)."""
    files: Dict[int, str] = {}
    for line in ptx.splitlines():  # .file directives sit at the end of nvcc's PTX
        m = _FILE.match(line)
        if m:
            files[int(m.group(1))] = m.group(2)
    out: List[Access] = []
    function, loc = "", (0, 0)
    for line in ptx.splitlines():
        m = _FUNC.match(line)
        if m:
            function, loc = m.group(2), (0, 0)
            continue
        m = _LOC.match(line)
        if m:
            loc = (int(m.group(1)), int(m.group(2)))
            continue
        m = _ACCESS.match(line)
        if m:
            out.append(Access(function, m.group(2), m.group(1), access_bits(m.group(1)), files.get(loc[0], ""),
                              loc[1]))
    return out


def entries(ptx: str) -> List[str]:
    return [m.group(2) for m in map(_FUNC.match, ptx.splitlines()) if m and m.group(1) == "entry"]


@dataclasses.dataclass
class Resources:
    """What ptxas reports for one kernel."""

    registers: int = 0
    spill_stores: int = 0   # bytes
    spill_loads: int = 0    # bytes
    stack: int = 0          # bytes of stack frame (local memory: e.g. printf's argument buffer)
    shared: int = 0         # bytes of static shared memory

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


_COMPILING = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for ([\w$]+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_resources(log: str) -> Dict[str, Resources]:
    """Per entry function, from the output of `ptxas -v` (also `nvcc -Xptxas -v`)."""
    out: Dict[str, Resources] = {}
    current: Optional[Resources] = None
    for line in log.splitlines():
        m = _COMPILING.search(line) or _PROPERTIES.search(line)
        if m:
            current = out.setdefault(m.group(1), Resources())
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        m = _USED.search(line)
        if m:
            current.registers = int(m.group(1))
            s = _SMEM.search(line)
            current.shared = int(s.group(1)) if s else 0
    return out
