#!/usr/bin/env bash
# The CPU kernel on another architecture, without a machine of it: kernel_probe.cpp (the kernel's own
# translation unit plus its checks, no torch) cross-compiled with the library's flags and run under
# qemu-user. On aarch64 the library runs its baseline copy (GCC vector extensions, compiled to NEON).
#
#   scripts/cross_arch/check.sh            # aarch64: needs g++-aarch64-linux-gnu and qemu-user (apt)
#   scripts/cross_arch/check.sh --host     # the same probe built and run natively (its own sanity check)
#
# Run from a venv with torch installed (for its headers). FMO_PROBE_THREADS=4 (the default here runs
# both 1 and 4) makes the kernel split K as it does under a multi-threaded torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python}
if [[ "${1:-}" == "--host" ]]; then
  cxx=${CXX:-g++}; cc=${CC:-gcc}; runner=(); arch=host
else
  cxx=${CXX:-aarch64-linux-gnu-g++}; cc=${CC:-aarch64-linux-gnu-gcc}; runner=(${QEMU:-qemu-aarch64}); arch=aarch64
fi
include=$("$python" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))" 2>/dev/null)
# The library's compile flags (stable ABI, target torch version), read without importing the package.
flags=$("$python" - <<'PY'
import importlib.util
spec = importlib.util.spec_from_file_location("spec", "fused_moe_ops/_kernel_spec.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
print(" ".join(m.CPU_FLAGS))
PY
)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$cxx" -std=c++17 $flags $include -Icsrc -c scripts/cross_arch/kernel_probe.cpp -o "$tmp/probe.o"
# Every other torch shim the object refers to: succeeds, does nothing (shim_stubs.c says why).
nm --undefined-only "$tmp/probe.o" 2>/dev/null | awk '{print $2}' | grep -E '^(aoti_torch_|torch_)' \
  | grep -vxE 'torch_get_num_threads|torch_parallel_for' \
  | sed 's/.*/int & (void) { return 0; }/' > "$tmp/generated_stubs.c"
"$cc" -O2 -c scripts/cross_arch/shim_stubs.c -o "$tmp/stubs.o"
"$cc" -O2 -c "$tmp/generated_stubs.c" -o "$tmp/generated_stubs.o"
"$cxx" -static "$tmp/probe.o" "$tmp/stubs.o" "$tmp/generated_stubs.o" -o "$tmp/probe"
echo "probe built for $arch with $("$cxx" --version | head -1) ($flags)"
if [[ $arch == aarch64 ]]; then
  echo "vector multiply-adds (fmla v...) in the binary: $(aarch64-linux-gnu-objdump -d "$tmp/probe" | grep -cE $'\tfmla\tv')"
fi
status=0
for threads in 1 4; do
  echo "--- FMO_PROBE_THREADS=$threads"
  FMO_PROBE_THREADS=$threads "${runner[@]}" "$tmp/probe" || status=1
done
exit $status
