"""The benchmark tool (python -m fused_moe_ops.bench) runs and reports what it measured, at tiny shapes.

What is tested is the tool (its flags, its JSON, its ratios, its interleaving), never performance:
the shapes are tiny and the timing budgets a few milliseconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_moe_ops.bench import cli, sweep, timing
from fused_moe_ops.bench.models import count_launches

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--budget", "0.002", "--min-rounds", "2", "--rotate-mb", "0.05"]


def run_benchmark(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("FUSED_MOE_OPS_NO_CUDA", "1")
    return subprocess.run([sys.executable, "-m", "fused_moe_ops.bench", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(ROOT))


def test_sweep_every_topk_and_shape_in_json(tmp_path):
    out = tmp_path / "s.json"
    proc = run_benchmark(*FAST, "--m", "1,3", "--k", "16", "--topk", "2,3", "--impls", "eager,op,copy",
                         "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["topk"], r["M"], r["impl"]) for r in rows} == {
        (t, m, i) for t in (2, 3) for m in (1, 3) for i in ("eager", "op", "copy")}
    assert all("time_s" in r and r["time_s"] > 0 and not r.get("mismatch") for r in rows), rows
    shapes = result["shapes"]
    assert [(s["topk"], s["M"]) for s in shapes] == [(2, 1), (2, 3), (3, 1), (3, 3)]
    for s in shapes:  # the raw per-shape times, side by side
        assert set(s["times_s"]) == {"eager", "op", "copy"}
    assert "MISMATCH" not in proc.stdout


def run_in_process(capsys, *args: str):
    """cli.main in this process (no second torch import: seconds faster); the global
    compile settings it changes are restored afterwards."""
    with torch._inductor.config.patch(fx_graph_cache=torch._inductor.config.fx_graph_cache), \
            torch._dynamo.config.patch(cache_size_limit=torch._dynamo.config.cache_size_limit):
        rc = cli.main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_sweep_pass_vs_no_pass_table(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc, stdout, stderr = run_in_process(capsys, *FAST, "--m", "2", "--k", "8", "--topk", "2",
                                        "--impls", "inductor,inductor+pass,op", "--json", str(out))
    assert rc == 0, stdout + stderr
    assert "# pass vs no pass" in stdout
    (s,) = json.loads(out.read_text())["shapes"]
    t = s["times_s"]
    assert s["with_over_without_speed"] == pytest.approx(t["inductor"] / t["inductor+pass"])
    assert s["op_over_inductor_speed"] == pytest.approx(t["inductor"] / t["op"])
    assert s["pass_rewrites"] == 1  # the seed line, rewritten once


def test_grid_pass_vs_inductor_shapes_and_settings():
    args = cli.parse_args(["--grid", "pass-vs-inductor"])
    cli.apply_defaults(args, "cpu")
    assert args.m == [1, 2, 4, 8, 16, 32, 64, 128, 512, 4096, 16384]
    assert sorted(args.k) == [4096, 7168] and sorted(args.topk) == [2, 8] and args.dtype == "bf16"
    assert {"inductor", "inductor+pass", "copy"} <= set(args.impls.split(","))
    assert args.graph_max_m >= max(args.m)  # every M as CUDA-graph replays
    explicit = cli.parse_args(["--grid", "pass-vs-inductor", "--m", "4", "--topk", "1"])
    cli.apply_defaults(explicit, "cpu")
    assert explicit.m == [4] and explicit.topk == [1]  # flags given explicitly win


@pytest.mark.parametrize("module", ["fused_moe_ops.bench", "fused_moe_ops.benchmark"])
def test_entry_points_help(module):
    """The CLI's home (python -m fused_moe_ops.bench) and its alias both answer --help with the grid named."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("FUSED_MOE_OPS_NO_CUDA", "1")
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("usage: python -m fused_moe_ops.bench") and "pass-vs-inductor" in proc.stdout


def test_bad_flags_exit_2_naming_the_flag(capsys):
    rc, _, err = run_in_process(capsys, "--device", "cpu", "--topk", "0", "--m", "1", "--k", "8")
    assert rc == 2 and "--topk" in err and "[0]" in err, err
    rc, _, err = run_in_process(capsys, "--device", "cpu", "--model", "--model-set", "tiny,nope")
    assert rc == 2 and "--model-set" in err and "'nope'" in err, err


def test_shape_summaries_ratios():
    rows = [{"impl": i, "M": 4, "K": 8, "topk": 2, "dtype": "bfloat16", "bytes": 96, "time_s": t, "gbps": 96 / t / 1e9}
            for i, t in (("inductor", 4.0), ("inductor+pass", 2.0), ("op", 1.0), ("copy", 0.5))]
    sweep.add_ratios(rows)
    (s,) = sweep.shape_summaries(rows)
    assert s["with_over_without_speed"] == 2.0 and s["op_over_inductor_speed"] == 4.0
    assert s["pct_copy_op"] == pytest.approx(50.0) and s["pct_copy_inductor"] == pytest.approx(12.5)


def test_cpu_timing_interleaves_the_entries():
    order = []
    entries = [({}, (lambda i, n=n: order.append(n)), __import__("contextlib").nullcontext) for n in "ab"]
    timing.time_cpu_interleaved(entries, budget_s=0.0, min_rounds=4, max_rounds=4)
    timed = order[4:]  # after the two warm-up calls of each
    # every round runs one batch of each, in alternating order (a b, b a, a b, b a): neither always first
    per_batch = {n: row["calls_per_batch"] for n, (row, _, _) in zip("ab", entries)}
    pos = 0
    for name in ["a", "b", "b", "a"] * 2:
        assert timed[pos:pos + per_batch[name]] == [name] * per_batch[name], (name, pos, timed)
        pos += per_batch[name]
    assert pos == len(timed)
    assert all(row["rounds"] == 4 and row["time_s"] > 0 for row, _, _ in entries)


def test_count_launches():
    code = ("def call(args):\n    buf0 = empty()\n    cpp_fused_add_0(a, b)\n"
            "    buf1 = torch.ops.moe.shuffle_mul_sum.default(x, y, z, out_dtype=None)\n"
            "    extern_kernels.mm(a, b, out=c)\n    triton_poi_fused_1.run(a, b)\n")
    assert count_launches([code]) == {"generated": 2, "extern": 2}
    assert count_launches([]) is None


def test_model_mode_tiny(tmp_path, capsys):
    out = tmp_path / "m.json"
    rc, stdout, stderr = run_in_process(capsys, *FAST, "--model", "--model-set", "tiny", "--model-m", "8,4",
                                        "--model-hidden", "16", "--model-inter", "8", "--model-experts", "2",
                                        "--model-topk", "2", "--dtype", "f32", "--json", str(out))
    assert rc == 0, stdout + stderr
    rows = json.loads(out.read_text())["model_rows"]
    assert [(r["model"], r["M"]) for r in rows] == [("tiny", 8), ("tiny", 4)]
    for row in rows:
        assert row["without_pass_s"] > 0 and row["with_pass_s"] > 0
        assert row["ratio_without_over_with"] == pytest.approx(row["without_pass_s"] / row["with_pass_s"])
        assert row["outputs_close"]
    first, second = rows
    # one compile per variant, token count dynamic, traced at the largest M ...
    assert first["with_pass_compiled_here"] and first["without_pass_compiled_here"]
    # (whether the pass rewrites TinyMoE's combine is the pass's policy, not the tool's business:
    # its rows are a chain of torch.where, which the pass may leave to Inductor)
    assert first["without_pass_rewrites"] == 0 and first["with_pass_rewrites"] in (0, 1)
    assert first["without_pass_launches"] > 0 and first["with_pass_launches"] > 0
    # ... reused at the next M by both variants (neither variant's compile was thrown away)
    assert not second["with_pass_compiled_here"] and not second["without_pass_compiled_here"]


def test_hf_models_build_from_transformers_classes():
    pytest.importorskip("transformers")
    from fused_moe_ops.bench.hf_models import build_hf_model

    for name, topk in (("qwen3_moe", 8), ("qwen2_moe", 4)):
        forward, make_input, token_dim, desc = build_hf_model(name, "cpu", torch.float32)
        assert desc["layers"] == 2 and desc["topk"] == topk and desc["experts_implementation"] == "grouped_mm"
        x = make_input(3, 0)
        assert x.shape[token_dim] == 3
        with torch.no_grad():
            y = forward(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="layout"):
        build_hf_model("qwen3_moe", "cpu", torch.float32, layout="diagonal")
    # the expert-parallel sentinel path (transformers <= 5.17's graph): same weights, same result
    plain, make_input, _, _ = build_hf_model("qwen3_moe", "cpu", torch.float32)
    masked, _, _, desc = build_hf_model("qwen3_moe", "cpu", torch.float32, sentinel_mask=True)
    assert desc["sentinel_mask"]
    with torch.no_grad():
        x = make_input(5, 1)
        torch.testing.assert_close(masked(x), plain(x))


def test_sweep_dynamic_compile_reused_across_token_counts(tmp_path, capsys):
    out = tmp_path / "d.json"
    rc, stdout, stderr = run_in_process(capsys, *FAST, "--m", "4,9", "--k", "8", "--topk", "2", "--compile", "dynamic",
                                        "--impls", "inductor,inductor+pass", "--json", str(out))
    assert rc == 0, stdout + stderr
    passes = [r for r in json.loads(out.read_text())["rows"] if r["impl"] == "inductor+pass"]
    assert [r["M"] for r in passes] == [4, 9]
    assert passes[0]["rewrites"] == 1  # one compile with the token count dynamic ...
    assert "rewrites" not in passes[1] and "compile reused" in passes[1]["note"]  # ... serves the next M
    assert all(r["compile"] == "dynamic" and r["time_s"] > 0 for r in passes)


def test_cuda_timing_branches_without_a_gpu(monkeypatch):
    """The CUDA-only timing paths' bookkeeping, with the CUDA calls replaced (no GPU in CI): graphs
    replayed together when every variant captures; events for all when one cannot."""
    import contextlib
    import types

    from fused_moe_ops.bench import models

    def capture(call, per_graph):
        if getattr(call, "fails", False):
            raise RuntimeError("capture failed")
        return ("graph", call.name)

    monkeypatch.setattr(models, "capture_cuda_graph", capture)
    monkeypatch.setattr(models, "time_graph_replays", lambda graphs, per_graph, replays: [1.0 + i for i in
                                                                                         range(len(graphs))])
    monkeypatch.setattr(models, "time_cuda_events", lambda call, budget: 5.0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def variant(name, fails=False):
        call = types.SimpleNamespace(name=name, fails=fails)
        return (name, call, contextlib.nullcontext)

    args = types.SimpleNamespace(graph_max_m=64, budget=0.0, replays=None)
    times, row = {"without_pass": {}, "with_pass": {}}, {}
    models._time_cuda([variant("without_pass"), variant("with_pass")], times, 8, row, args)
    assert times == {"without_pass": {"time_s": 1.0}, "with_pass": {"time_s": 2.0}} and "graph" in row["timing"]
    times, row = {"without_pass": {}, "with_pass": {}}, {}
    models._time_cuda([variant("without_pass"), variant("with_pass", fails=True)], times, 8, row, args)
    assert times == {"without_pass": {"time_s": 5.0}, "with_pass": {"time_s": 5.0}}
    assert "with_pass_graph_error" in row and "events" in row["timing"]
    times, row = {"without_pass": {}, "with_pass": {}}, {}
    models._time_cuda([variant("without_pass"), variant("with_pass")], times, 128, row, args)  # above graph_max_m
    assert times == {"without_pass": {"time_s": 5.0}, "with_pass": {"time_s": 5.0}} and row["timing"] == "CUDA events"

    monkeypatch.setattr(sweep, "capture_cuda_graph", capture)
    monkeypatch.setattr(sweep, "time_graph_replays", lambda graphs, counts, replays: [float(c) for c in counts])
    monkeypatch.setattr(sweep, "time_cuda_events", lambda call, budget: 7.0)
    rows = [{}, {}, {}]
    calls = [types.SimpleNamespace(name="a", n_data=40), types.SimpleNamespace(name="b", n_data=3),
             types.SimpleNamespace(name="c", fails=True)]
    sweep._time_cuda_graphs_interleaved([(r, c, contextlib.nullcontext) for r, c in zip(rows, calls)], args)
    assert [r["time_s"] for r in rows] == [40.0, 20.0, 7.0]  # >= 20 calls per graph, one per buffer set
    assert rows[0]["timing"] == "graph x40" and rows[2]["timing"].startswith("events (graph capture failed")


def test_scatter_mode_tiny(tmp_path, capsys):
    """--scatter: op, eager index_add_ and Inductor (pass off) timed per shape, their ratios, each checked
    against the float64 reference."""
    out = tmp_path / "sc.json"
    rc, stdout, stderr = run_in_process(capsys, *FAST, "--scatter", "--dtype", "bf16", "--m", "3", "--k", "16",
                                        "--topk", "2", "--json", str(out))
    assert rc == 0, stdout + stderr
    rows = json.loads(out.read_text())["scatter_rows"]
    assert [(r["M"], r["topk"], r["K"]) for r in rows] == [(3, 2, 16)]
    for r in rows:
        assert r["eager_over_op"] == pytest.approx(r["eager_s"] / r["op_s"])
        assert r["inductor_over_op"] == pytest.approx(r["inductor_s"] / r["op_s"])
        assert r["max_err_op"] < 2 ** -8 and r["max_err_eager"] < 2 ** -6 and r["max_err_inductor"] < 2 ** -6, r
    assert "eager/op" in stdout and "ind/op" in stdout
