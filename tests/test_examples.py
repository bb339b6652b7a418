"""The examples run, as a new user runs them (subprocesses), at tiny sizes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HAS_CUDA = torch.cuda.is_available()
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
TINY_BLOCK = ["--tokens", "24", "--hidden", "64", "--ffn", "32", "--experts", "4", "--topk", "2", "--iters", "2"]


def run_example(script: str, *args: str, timeout: int = 600, extra_env: dict = None) -> str:
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if not HAS_CUDA:
        env.setdefault("FUSED_MOE_OPS_NO_CUDA", "1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("args", [
    pytest.param([], id="defaults"),
    pytest.param(["--dtype", "bfloat16", "--ep-ranks", "4", "--topk", "3", "--tokens", "33"], id="bf16-ep4"),
    pytest.param(["--dtype", "float16", "--experts", "6", "--ep-ranks", "3", "--topk", "1"], id="f16-ep3-top1"),
])
def test_explicit_op(args):
    out = run_example("explicit_op.py", "--device", "cpu", *args)
    assert "all checks passed" in out
    assert "MISMATCH" not in out
    ranks = int(args[args.index("--ep-ranks") + 1]) if "--ep-ranks" in args else 2
    # Every simulated rank used the .out form with some -1 entries.
    rank_lines = re.findall(r"\.out, rank (\d+)/(\d+) \((\d+) entries = -1\)", out)
    assert len(rank_lines) == ranks and all(int(n) > 0 for _, _, n in rank_lines), out
    assert "entry >= R raises" in out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_explicit_op_cuda(dtype):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    out = run_example("explicit_op.py", "--device", "cuda", "--dtype", dtype, "--tokens", "200")
    assert "all checks passed" in out and "MISMATCH" not in out


test_explicit_op_cuda = pytest.mark.cuda(test_explicit_op_cuda)


def _check_block_output(out: str, expect_op_call: bool = None) -> dict:
    m = re.search(r"fusion pass: fired (\d+) time\(s\)", out)
    assert m and int(m.group(1)) >= 1, f"the pass did not fire:\n{out}"
    assert "with the pass disabled: 0 rewrite(s)" in out, out
    calls = re.search(r"generated code calls our op \(moe._shuffle_mul_sum_fused\): fusion on: (yes|no), "
                      r"fusion off: no$", out, re.M)
    assert calls, out
    # Where Inductor chooses (custom-op autotuning), the report names its choice and the generated
    # code agrees with it: a call of our op exactly where our op was chosen.
    choice = re.search(r"^Inductor's choice for the rewritten combine: (.*)$", out, re.M)
    if choice is not None:
        assert (calls.group(1) == "yes") == ("our op" in choice.group(1)), out
    else:
        assert calls.group(1) == "yes", out
    if expect_op_call is not None:
        assert calls.group(1) == ("yes" if expect_op_call else "no"), out
    diffs = re.findall(r"max \|eager - compiled, fusion (off|on)\| = (\S+) .*  (ok|MISMATCH)", out)
    assert [(d[0], d[2]) for d in diffs] == [("off", "ok"), ("on", "ok")], out
    table = dict(re.findall(r"^(eager|compiled, fusion off|compiled, fusion on)\s+([0-9.]+)\s+[0-9.]+x$", out, re.M))
    assert set(table) == {"eager", "compiled, fusion off", "compiled, fusion on"}, out
    assert all(float(v) > 0 for v in table.values())
    return table


@pytest.mark.slow
def test_moe_block_cpu_with_plot(tmp_path):
    png = tmp_path / "timings.png"
    out = run_example("moe_block.py", "--device", "cpu", *TINY_BLOCK, "--plot", str(png))
    _check_block_output(out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_moe_block_cpu_bf16_autotuning_off_calls_the_op():
    out = run_example("moe_block.py", "--device", "cpu", "--dtype", "bfloat16", *TINY_BLOCK,
                      extra_env={"FUSED_MOE_OPS_AUTOTUNE": "0"})
    _check_block_output(out, expect_op_call=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_block_cuda(dtype):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    out = run_example("moe_block.py", "--device", "cuda", "--dtype", dtype, "--tokens", "512", "--hidden", "512",
                      "--ffn", "256", "--experts", "8", "--iters", "5")
    _check_block_output(out)
    assert "device=cuda (moe::shuffle_mul_sum kernel: cuda" in out or "kernel: triton" in out


test_moe_block_cuda = pytest.mark.cuda(test_moe_block_cuda)


def test_moe_block_rejects_bad_topk():
    proc = subprocess.run([sys.executable, str(EXAMPLES / "moe_block.py"), "--experts", "2", "--topk", "3"],
                          capture_output=True, text=True, cwd=str(ROOT),
                          env=dict(os.environ, PYTHONPATH=str(ROOT), FUSED_MOE_OPS_NO_CUDA="1"))
    assert proc.returncode == 2 and "--topk must be between 1 and --experts" in proc.stderr


def _readme_block(after: str, lang: str) -> str:
    """The first fenced block of language ``lang`` after the line ``after`` in README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text[start:], re.S | re.M):
        if m.group(1) == lang:
            return m.group(2)
    raise AssertionError(f"README.md has no ```{lang} block after {after!r}")


def _assert_readme_block_prints_what_the_readme_says(section: str, tmp_path) -> None:
    """The README's python block after ``section``, run as a user pastes it: its output is the plain
    block the README shows after it."""
    code, shown = _readme_block(section, "python"), _readme_block(section, "")
    script = tmp_path / "readme_block.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if not HAS_CUDA:
        env.setdefault("FUSED_MOE_OPS_NO_CUDA", "1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == shown, f"README shows:\n{shown}\nthe code printed:\n{proc.stdout}"


def test_readme_usage_prints_what_the_readme_says(tmp_path):
    _assert_readme_block_prints_what_the_readme_says("## Usage", tmp_path)


TINY_HF = ["--tokens", "24", "--hidden", "64", "--experts", "8", "--topk", "2", "--layers", "2", "--iters", "1"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_experts(dtype):
    pytest.importorskip("transformers", minversion="5.7")
    out = run_example("hf_experts.py", "--device", "cpu", "--dtype", dtype, *TINY_HF)
    assert "moe::shuffle_mul_sum calls per forward: grouped_mm: 0, fused_moe_ops: 2 (one per MoE layer)" in out, out
    diff = float(re.search(r"max \|logits difference\| / max \|logits\| = (\S+)", out).group(1))
    assert diff <= (1e-5 if dtype == "float32" else 5e-2), out
    assert re.search(r"^fused_moe_ops\s+[0-9.]+\s+[0-9.]+x$", out, re.M), out
    if dtype == "float32":  # bf16 logits may tie or flip an argmax between the two roundings
        assert "greedy: same tokens" in out, out


def test_readme_hf_section_prints_what_the_readme_says(tmp_path):
    pytest.importorskip("transformers", minversion="5.7")
    _assert_readme_block_prints_what_the_readme_says("## Use it from HF transformers", tmp_path)
