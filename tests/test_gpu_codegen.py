"""The kernels' GPU machine code, compiled and checked without a GPU (fused_moe_ops/codegen;
docs/BENCHMARKS.md, "Machine code"): both kernels for sm_80, sm_90 and sm_100.

* The CUDA kernels: every instantiation of the combine kernels (the gather form's
  shuffle_mul_sum_kernel<in_t, out_t, VEC>, the scatter form's scatter_segment_sum_kernel<in_t, out_t,
  VEC>) and of the scatter form's scatter_keys_kernel<index_t>, through nvcc and ptxas, for each arch
  as the library runs it there (its sm_80 / sm_90 cubins; on sm_100 the driver's JIT of its
  compute_90 PTX, assembled here by ptxas): input rows and the addend read with one 128-bit load per
  thread in the 16-byte instantiations, no spill, registers and shared memory within the occupancy
  budget (test_cuda_fits_the_occupancy_budget says which and why). The scatter form's CUB sort is a
  translation unit of its own (csrc/scatter_sort_cuda.cu), not compiled here.
* The Triton kernel: every specialization the op launches (all dtype pairs, each flag and option,
  top-k blocks, every autotune config) compiled with the alignment hints Triton's runtime gives
  16-byte-aligned tensors: input rows, the addend and the output as wide as the layout allows
  (128 bits where a thread holds 16 bytes of a row), no local memory.
* The checks can fail: the CUDA kernel with its Pack unaligned, or squeezed into too few
  registers, and the Triton kernel misaligned or with column offsets it cannot prove contiguous,
  are each reported.

Needs nvcc (CUDA_HOME) and triton; without them it skips, except under CI=true, where it fails.
"""
import dataclasses
import os
import sys
from pathlib import Path

import pytest

from fused_moe_ops.build import find_cuda_home
from fused_moe_ops.codegen import cuda, occupancy, ptx, report
from fused_moe_ops.codegen import triton as tri

pytestmark = [pytest.mark.gpu_codegen, pytest.mark.xdist_group("gpu_codegen")]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parents[1]
ARCHS = report.ARCHS
ALL_DTYPES = ("float32", "float16", "bfloat16")


def _need(why_not):
    if why_not:
        if IN_CI:
            pytest.fail(f"CI must compile the kernels' machine code, but: {why_not}")
        pytest.skip(why_not)


@pytest.fixture(scope="module")
def cuda_home():
    home = find_cuda_home()
    _need(None if home else "no CUDA toolkit (nvcc) found; set CUDA_HOME")
    return home


@pytest.fixture(scope="module")
def triton_available():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        _need(f"triton is not importable: {e}")


def _once_per_run(tmp_path_factory, name, compute):
    """compute() once per test run: under pytest-xdist the workers running this module's tests share
    the result through a file (the first computes it under a lock, the others wait and load it), so
    the kernels compile once however the tests are spread over the workers."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        return compute()
    import pickle

    from fused_moe_ops.build import build_lock

    directory = tmp_path_factory.getbasetemp().parent / f"gpu_codegen_{run}"
    with build_lock(directory):
        path = directory / f"{name}.pickle"
        if path.exists():
            return pickle.loads(path.read_bytes())
        value = compute()
        path.write_bytes(pickle.dumps(value))
        return value


def _compile_cuda_images(cuda_home):
    from concurrent.futures import ProcessPoolExecutor

    ptx_archs = [cuda.library_image_arch(a)[1] for a in ARCHS]
    with ProcessPoolExecutor(max_workers=min(len(ARCHS), os.cpu_count() or 1)) as pool:
        images = list(pool.map(cuda.compile_image, [cuda_home] * len(ARCHS), ARCHS, ptx_archs))
    return {arch: (kernels, ptx_text) for arch, (kernels, ptx_text, _) in zip(ARCHS, images)}


@pytest.fixture(scope="module")
def cuda_images(cuda_home, tmp_path_factory):
    """arch -> (instantiations, PTX text) as the library runs them there; compiled in parallel."""
    return _once_per_run(tmp_path_factory, "cuda_images", lambda: _compile_cuda_images(cuda_home))


@pytest.fixture(scope="module")
def triton_compiled(triton_available, tmp_path_factory):
    return _once_per_run(tmp_path_factory, "triton_compiled", report.triton_compiled)


# --- the CUDA kernel --------------------------------------------------------------------------------

def test_cuda_every_instantiation_compiles_for_each_arch(cuda_images):
    want = {(a, b, v) for a in ALL_DTYPES for b in ALL_DTYPES for v in (1, 16 // (4 if a == "float32" else 2))}
    for arch in ARCHS:
        kernels, _ = cuda_images[arch]
        for kernel in cuda.COMBINE_KERNELS:
            got = [(k.input, k.output, k.vec) for k in kernels if k.kernel == kernel]
            assert len(got) == len(want) and set(got) == want, (arch, kernel, sorted(set(got) ^ want))
        assert sorted(k.input for k in kernels if k.kernel == cuda.KEYS_KERNEL) == ["int32", "int64"], arch
        assert len(kernels) == 2 * len(want) + 2, (arch, [k.name for k in kernels])
        assert all(k.arch == f"sm_{arch}" for k in kernels)


def test_cuda_row_loads_are_128_bit_and_nothing_spills(cuda_images):
    problems = [p for arch in ARCHS for k in cuda_images[arch][0] for p in cuda.problems(k)]
    assert problems == []
    for arch in ARCHS:
        for k in cuda_images[arch][0]:
            if k.combine and k.vectorised:  # the unrolled step's four loads and the tail's, at least
                assert k.widths["row"].count(128) >= 5, (arch, k.name, k.widths)


def test_cuda_fits_the_occupancy_budget(cuda_images):
    """The budget: 0 spill bytes; static shared memory no more than the staging arrays (<= 4 KiB);
    <= 64 registers per thread, so that >= 8 blocks of 128 threads (32 warps, half the SM) are
    resident on every target, and >= 4 blocks of the 32-thread decode shape. Why: the kernel is
    bandwidth-bound; each thread keeps four 16-byte row loads in flight, 2 KiB per warp, and
    covering a B200's bandwidth-latency product (~8 TB/s x ~0.6 us over 148 SMs, ~32 KiB per SM)
    takes ~16 warps: 32 is twice that. choose_launch spreads decode over ~2 to 4 blocks per SM, all
    of which must be resident at once."""
    for arch in ARCHS:
        for k in cuda_images[arch][0]:
            r = k.resources
            assert r.spills == 0 and r.registers <= 64 and r.shared <= 4096, (arch, k.name, r)
            assert occupancy.blocks_per_sm(arch, 128, r.registers, r.shared) >= 8, (arch, k.name, r)
            assert occupancy.blocks_per_sm(arch, 32, r.registers, r.shared) >= 4, (arch, k.name, r)


def test_cuda_check_fails_without_the_aligned_pack(cuda_home, tmp_path):
    """PLANT_PACK_UNALIGNED drops Pack's alignas: nvcc then splits every row load, and the check
    says so for every 16-byte instantiation."""
    kernels = cuda.compile_arch(cuda_home, 90, defines=["PLANT_PACK_UNALIGNED"], workdir=tmp_path)
    for k in kernels:
        problems = cuda.problems(k)
        if k.vectorised:
            assert any("row loads of" in p and "not 128" in p for p in problems), (k.name, problems)
            assert 128 not in k.widths["row"], k.widths
        else:
            assert problems == [], problems


def test_cuda_check_fails_on_a_spill(cuda_home, cuda_images, tmp_path):
    """The same PTX with each kernel capped at 24 registers (`.maxnreg`: ptxas's --maxrregcount
    yields to the kernel's __launch_bounds__) spills, and the check says so for every instantiation."""
    import re

    capped = re.sub(r"^(\s*\.maxntid[^\n]*)$", r"\1\n.maxnreg 24", cuda_images[90][1], flags=re.M)
    assert capped.count(".maxnreg 24") == len(ptx.entries(capped)) == 38
    ptx_file = tmp_path / "kernel.ptx"
    ptx_file.write_text(capped)
    log = cuda.assemble(cuda_home, ptx_file, 90)
    kernels = cuda.instantiations(capped, log, 90, 90)
    for k in kernels:
        assert k.resources.registers <= 24, (k.name, k.resources)
        if k.combine:  # the keys kernel fits in 24 registers
            assert any("spills" in p for p in cuda.problems(k)), (k.name, k.resources)


# --- the Triton kernel ------------------------------------------------------------------------------

def test_triton_every_specialization_compiles_for_each_arch(triton_compiled):
    variants = set(tri.op_variants()) | set(tri.config_variants())
    got = {(c.variant, c.arch) for c in triton_compiled}
    assert got == {(v, a) for v in variants for a in ARCHS}
    # Each axis of triton_kernel._launch is covered.
    assert {(v.input, v.output) for v in variants} == {(a, b) for a in ALL_DTYPES for b in ALL_DTYPES}
    assert {v.factors for v in variants} == set(ALL_DTYPES)
    from fused_moe_ops.triton_kernel import GPU_CONFIGS

    assert {(v.block_k, v.num_warps) for v in variants} == set(GPU_CONFIGS)
    assert {min(v.topk, 16) for v in variants} >= {1, 2, 3, 8, 16} and max(v.topk for v in variants) > 16
    for field in ("has_addend", "has_row_mask", "factors_per_row"):
        assert {getattr(v, field) for v in variants} == {False, True}, field
    assert {v.negative_index for v in variants} == {0, 1, 2} and {v.factor_round for v in variants} == {0, 1, 2}
    assert any(not v.has_perm for v in variants) and any(v.scale != 1.0 for v in variants)


def test_triton_accesses_are_as_wide_as_alignment_allows_and_nothing_spills(triton_compiled):
    problems = [p for c in triton_compiled for p in tri.problems(c)]
    assert problems == []
    # bf16, top-k 8, BLOCK_K 1024 (4 warps): each slot's row in one 128-bit load per thread.
    c = next(c for c in triton_compiled if c.variant == tri.Variant() and c.arch == 90)
    assert c.widths["row"] == [128] * 8, c.widths


def test_triton_fits_the_occupancy_budget(triton_compiled):
    """>= 16 resident warps per SM for every specialization (the bandwidth-latency estimate of
    test_cuda_fits_the_occupancy_budget), and no more shared memory than its reduction needs (<= 16 KiB)."""
    for c in triton_compiled:
        threads = 32 * c.variant.num_warps
        warps = occupancy.resident_warps(c.arch, threads, c.resources.registers, c.shared)
        assert warps >= 16 and c.shared <= 16384, (c.arch, c.variant.name, c.resources, c.shared)


def test_triton_check_fails_on_a_misaligned_input(triton_available):
    """An input one element off its 16-byte boundary gets no divisibility hint: its rows are read one
    element at a time, and checked as if aligned that is reported."""
    c = tri.compile_variant(tri.Variant(misalign=True), 90)
    assert set(c.widths["row"]) == {16}, c.widths
    assert tri.problems(c) == []  # as expected for a misaligned input
    as_if_aligned = dataclasses.replace(c, variant=dataclasses.replace(c.variant, misalign=False))
    assert any("row accesses of [16] bits, not 128" in p for p in tri.problems(as_if_aligned))


def test_triton_check_fails_when_columns_are_not_provably_contiguous(triton_available, tmp_path, monkeypatch):
    """The kernel with its column offsets computed so that Triton cannot prove them contiguous
    (the same values, through a division by a runtime stride): rows, addend and output go
    scalar, and the check reports each."""
    source = (ROOT / "fused_moe_ops" / "triton_kernel.py").read_text()
    line = "        cols = kb * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)\n"
    assert line in source
    planted = source.replace(line, "        cols = (kb * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)) * stride_in // stride_in\n")
    planted = planted.replace("from .ops import", "from fused_moe_ops.ops import")
    (tmp_path / "planted_triton_kernel.py").write_text(planted)
    monkeypatch.syspath_prepend(str(tmp_path))
    import planted_triton_kernel

    try:
        c = tri.compile_variant(tri.Variant(has_addend=True), 90, fn=planted_triton_kernel._shuffle_mul_sum_kernel.fn)
    finally:
        sys.modules.pop("planted_triton_kernel", None)
    problems = tri.problems(c)
    for which in ("row", "addend", "store"):
        assert any(f"{which} accesses of [16] bits, not 128" in p for p in problems), problems


# --- the readers, the model and the table (no compiler) ----------------------------------------------

PTX_SNIPPET = """
.visible .entry kern(
	.param .u64 p
)
{
	.loc	1 10 3
	@%p1 ld.global.v4.b32 	{ %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	.loc	1 11 5, function_name $L__info_string0, inlined_at 1 20 3
	ld.global.nc.u16 	%rs1, [%rd2];
	.loc	2 7 1
	st.global.v2.f32 	[%rd3], {%f1, %f2};
	ld.shared.u32 	%r5, [%r6];
}
	.file	1 "/src/kernel.cuh"
	.file	2 "/src/other.h"
"""


def test_ptx_reader_finds_each_global_access_with_its_source_line():
    got = [(a.function, a.kind, a.bits, a.file, a.line) for a in ptx.global_accesses(PTX_SNIPPET)]
    assert got == [("kern", "ld", 128, "/src/kernel.cuh", 10), ("kern", "ld", 16, "/src/kernel.cuh", 11),
                   ("kern", "st", 64, "/src/other.h", 7)]
    assert ptx.entries(PTX_SNIPPET) == ["kern"]


def test_ptxas_report_reader():
    log = """ptxas info    : 396 bytes gmem
ptxas info    : Compiling entry function 'kern_a' for 'sm_90'
ptxas info    : Function properties for kern_a
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 38 registers, used 1 barriers, 24 bytes cumulative stack size, 3128 bytes smem
ptxas info    : Compiling entry function 'kern_b' for 'sm_90'
ptxas info    : Function properties for kern_b
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 400 bytes cmem[0]
"""
    r = ptx.ptxas_resources(log)
    assert r["kern_a"] == ptx.Resources(38, 8, 12, 24, 3128) and r["kern_a"].spills == 20
    assert r["kern_b"] == ptx.Resources(40, 0, 0, 0, 0)


def test_cuda_symbols_decode_to_their_template_arguments():
    assert cuda.decode_symbol("_ZN13fused_moe_ops11cuda_kernel22shuffle_mul_sum_kernelIN3c108BFloat16ES3_Li8EEEvNS0_6ParamsE") == ("bfloat16", "bfloat16", 8)
    assert cuda.decode_symbol("_ZN13fused_moe_ops11cuda_kernel22shuffle_mul_sum_kernelIN3c108BFloat16ENS2_4HalfELi1EEEvNS0_6ParamsE") == ("bfloat16", "float16", 1)
    assert cuda.decode_symbol("_ZN13fused_moe_ops11cuda_kernel22shuffle_mul_sum_kernelIfN3c104HalfELi4EEEvNS0_6ParamsE") == ("float32", "float16", 4)
    assert cuda.decode_symbol("_ZN13fused_moe_ops11cuda_kernel22shuffle_mul_sum_kernelIffLi4EEEvNS0_6ParamsE") == ("float32", "float32", 4)
    segment_sum = "_ZN13fused_moe_ops11cuda_kernel26scatter_segment_sum_kernel"
    bf16_to_f32 = f"{segment_sum}IN3c108BFloat16EfLi8EEEvNS0_16SegmentSumParamsE"
    assert cuda.decode_symbol(bf16_to_f32) == ("bfloat16", "float32", 8)
    assert cuda.kernel_of(f"{segment_sum}IffLi1EEEvNS0_16SegmentSumParamsE") == "scatter_segment_sum_kernel"
    keys = "_ZN13fused_moe_ops11cuda_kernel19scatter_keys_kernel"
    assert cuda.decode_keys_symbol(f"{keys}IlEEvNS0_17ScatterKeysParamsE") == "int64"
    with pytest.raises(ValueError):
        cuda.kernel_of("_ZN3cub6detail11some_kernelIiEEvv")


def test_the_checked_lines_are_found_in_the_sources():
    lines = cuda.access_lines((ROOT / "csrc" / cuda.DEVICE_HEADER).read_text())
    assert len(lines["row"]) >= 2 and lines["addend"] and lines["store"], lines
    import inspect
    import textwrap

    from fused_moe_ops import triton_kernel

    src, first = inspect.getsourcelines(triton_kernel._shuffle_mul_sum_kernel.fn.fn)
    calls = tri.access_calls(textwrap.dedent("".join(src)), first)
    assert sorted(name for _, _, name in calls if name) == ["addend", "row", "store"], calls


def test_occupancy_model():
    # 48 registers x 128 threads: 1536 registers per warp, 42 warps of registers: 10 blocks.
    assert occupancy.blocks_per_sm(90, 128, 48, 3128) == 10
    assert occupancy.blocks_per_sm(90, 128, 32, 0) == 16      # the thread limit (2048)
    assert occupancy.blocks_per_sm(90, 32, 32, 0) == 32       # the block limit
    assert occupancy.blocks_per_sm(90, 256, 255, 0) == 1      # 255 -> 256 registers: one 8-warp block
    assert occupancy.blocks_per_sm(80, 128, 32, 48 * 1024) == 3   # 164 KiB / 49 KiB
    assert occupancy.blocks_per_sm(90, 128, 32, 48 * 1024) == 4   # 228 KiB / 49 KiB


def test_table_round_trips_and_compares_with_a_gpu_report():
    rows = [report.Row("cuda", "sm_90", "bf16->bf16 x8", 48, 0, 24, 3128, "128", "128", "32/16", 128, 10),
            report.Row("cuda", "sm_90", "f16->f16 x8", 48, 0, 24, 3128, "128", "128", "32/16", 128, 10),
            report.Row("triton", "sm_90", "bf16 BLOCK_K 1024/4w", 48, 0, 0, 0, "128", "128", "128", 128, 10)]
    text = "before\n" + report.BEGIN + "\nold\n" + report.END + "\nafter\n"
    text = report.replace_table(text, report.markdown(rows))
    assert text.startswith("before\n") and text.endswith("after\n")
    assert text.count("bf16->bf16 x8, f16->f16 x8") == 1  # identical figures share a line
    assert report.parse_markdown(text) == rows
    same = [dict(kernel="cuda", arch="sm_90", name="bf16->bf16 x8", threads=128, registers=48, spills=0,
                 shared=3128, blocks=10)]
    assert report.compare(rows, same) == []
    fake = [dict(same[0], registers=56, blocks=8), dict(kernel="triton", arch="sm_90", name="bf16 BLOCK_K 1024/4w",
                                                         threads=128, spills=16),
            dict(kernel="cuda", arch="sm_100", name="bf16->bf16 x8", threads=128, registers=48)]
    diffs = report.compare(rows, fake)
    assert any("registers 56 on the GPU, 48 in the table" in d for d in diffs)
    assert any("blocks 8 on the GPU, 10 in the table" in d for d in diffs)
    assert any("spills 16 on the GPU, 0 in the table" in d for d in diffs)
    assert any("sm_100" in d and "not in the table" in d for d in diffs)
    assert len(diffs) == 4, diffs


def test_the_table_in_benchmarks_md_covers_every_arch_kernel_and_config():
    rows = report.parse_markdown((ROOT / "docs" / "BENCHMARKS.md").read_text())
    from fused_moe_ops.triton_kernel import GPU_CONFIGS

    for arch in ARCHS:
        cuda_names = {(r.name, r.threads) for r in rows if r.kernel == "cuda" and r.arch == f"sm_{arch}"}
        assert len(cuda_names) == 18 * len(report.CUDA_THREADS), (arch, cuda_names)
        configs = {r.name for r in rows if r.kernel == "triton" and r.arch == f"sm_{arch}"}
        assert len(configs) == 3 * len(GPU_CONFIGS), (arch, configs)


def test_gpu_compare_command_on_a_fake_gpu_report(monkeypatch, tmp_path, capsys):
    """`python -m fused_moe_ops.codegen --gpu-compare FILE` (what scripts/gpu_check.sh runs on a GPU)
    with the driver's report replaced by a fake: exit 0 when it matches the table, 1 and each
    difference printed (and in --json) when it does not."""
    from fused_moe_ops.codegen import __main__ as cli, gpu

    doc = ROOT / "docs" / "BENCHMARKS.md"
    row = next(r for r in report.parse_markdown(doc.read_text()) if r.kernel == "cuda" and r.arch == "sm_90")
    same = dict(kernel="cuda", arch="sm_90", name=row.name, threads=row.threads, registers=row.registers,
                spills=row.spills, shared=row.shared, blocks=row.blocks)
    monkeypatch.setattr(gpu, "observe", lambda cuda_home: [same])
    assert cli.main(["--gpu-compare", str(doc)]) == 0
    monkeypatch.setattr(gpu, "observe", lambda cuda_home: [dict(same, registers=row.registers + 8)])
    out = tmp_path / "codegen_gpu.json"
    assert cli.main(["--gpu-compare", str(doc), "--json", str(out)]) == 1
    assert f"registers {row.registers + 8} on the GPU, {row.registers} in the table" in capsys.readouterr().out
    import json

    assert len(json.loads(out.read_text())["differences"]) == 1


def test_gpu_check_script_runs_the_comparison():
    import shutil
    import subprocess

    script = ROOT / "scripts" / "gpu_check.sh"
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "-m fused_moe_ops.codegen --gpu-compare \"$ROOT/docs/BENCHMARKS.md\"" in text
    assert ",codegen," in text.split("STEPS_WANTED=", 1)[1].splitlines()[0]


def test_library_image_per_arch():
    """sm_80 / sm_90 run the library's cubins; a newer GPU the driver's JIT of its newest PTX."""
    from fused_moe_ops import _kernel_spec as spec

    assert spec.DEFAULT_CUDA_ARCH_LIST == "8.0;9.0+PTX"
    assert cuda.library_image_arch(80) == (80, 80) and cuda.library_image_arch(90) == (90, 90)
    assert cuda.library_image_arch(100) == (None, 90) and cuda.library_image_arch(120) == (None, 90)
