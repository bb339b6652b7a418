"""Timing: CPU wall clock (interleaved rounds), CUDA events, CUDA-graph replay, buffer rotation.

Every timer takes ``call(i)``, a function that runs the thing once on its i-th input set, so the
caller decides how inputs rotate (and the timers never see the same buffers back to back when the
caller has several sets).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rotating_set_count(bytes_per_set: int, rotate_mb: float, max_sets: int) -> int:
    """How many input sets to rotate through so that one pass over them touches >= rotate_mb MiB:
    with fewer, the sets stay in the cache and the cache's speed is what gets measured."""
    return int(min(max_sets, max(2, math.ceil(rotate_mb * 2**20 / max(bytes_per_set, 1)))))


def time_cpu_interleaved(entries: Sequence[Tuple[Dict[str, object], Callable[[int], object], Callable]],
                         budget_s: float, min_rounds: int = 5, max_rounds: int = 400,
                         stat: str = "median") -> None:
    """CPU wall-clock timing, interleaved: each round runs one short batch of every entry in turn,
    in alternating order, so load from other processes on a shared machine hits them all alike and
    none always runs first (a with-pass vs without-pass comparison is only fair this way).

    entries: (row, call, ctx) with ctx() a context manager entered around every batch. Sets in row
    time_s (the chosen statistic of the per-call time over rounds), time_median_s, time_min_s,
    rounds, calls_per_batch, stat and timing="wall".
    """
    if not entries:
        return
    est = []
    for row, call, ctx in entries:
        with ctx():
            call(1)
            t0 = time.perf_counter()
            call(2)
            est.append(max(time.perf_counter() - t0, 1e-7))
    inner = [max(1, int(50e-6 / e)) for e in est]  # batches of >= 50 us: timer resolution, not preemption
    per_round = sum(e * n for e, n in zip(est, inner))
    rounds = int(min(max_rounds, max(min_rounds, budget_s * len(entries) / per_round)))
    times: List[List[float]] = [[] for _ in entries]
    c = 3
    order = list(range(len(entries)))
    for r in range(rounds):
        # Alternating order: whichever entry runs right after another finds the caches (and the
        # allocator) as that one left them; each gets both positions equally often.
        for idx in (order if r % 2 == 0 else order[::-1]):
            row, call, ctx = entries[idx]
            n = inner[idx]
            with ctx():
                t0 = time.perf_counter()
                for _ in range(n):
                    call(c)
                    c += 1
                times[idx].append((time.perf_counter() - t0) / n)
    for (row, _, _), ts, n in zip(entries, times, inner):
        row["time_median_s"] = statistics.median(ts)
        row["time_min_s"] = min(ts)
        row["time_s"] = row["time_min_s"] if stat == "min" else row["time_median_s"]
        row["stat"] = stat
        row["timing"] = "wall"
        row["rounds"] = len(ts)
        row["calls_per_batch"] = n


def time_cuda_events(call: Callable[[int], object], budget_s: float) -> float:
    """Median over calls of the CUDA-event time of one call (launch overhead included)."""
    call(0)
    call(1)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    call(2)
    e.record()
    e.synchronize()
    est = max(s.elapsed_time(e) / 1e3, 1e-6)
    reps = int(min(200, max(10, budget_s / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        starts[r].record()
        call(3 + r)
        ends[r].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends)) / 1e3


def capture_cuda_graph(call: Callable[[int], object], per_graph: int) -> "torch.cuda.CUDAGraph":
    """per_graph calls (call(0) .. call(per_graph - 1)) captured in one CUDA graph, after a warm-up
    (autotuning, lazy init) on a side stream as torch advises."""
    for i in range(3):
        call(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(0)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for i in range(per_graph):
            call(i)
    g.replay()
    torch.cuda.synchronize()
    return g


def time_graph_replays(graphs: Sequence["torch.cuda.CUDAGraph"], per_graph, replays: int = 30,
                       interleave: bool = True) -> List[float]:
    """Median replay time / per_graph of each graph (per_graph: one count, or one per graph). With
    several graphs the replays alternate (graph 0, graph 1, graph 0, ...), so clock and thermal
    drift hit them alike."""
    n = len(graphs)
    counts = list(per_graph) if isinstance(per_graph, (list, tuple)) else [per_graph] * n
    s = [[torch.cuda.Event(enable_timing=True) for _ in range(replays)] for _ in range(n)]
    e = [[torch.cuda.Event(enable_timing=True) for _ in range(replays)] for _ in range(n)]
    order = [(r, j) for r in range(replays) for j in range(n)] if interleave else \
        [(r, j) for j in range(n) for r in range(replays)]
    for r, j in order:
        s[j][r].record()
        graphs[j].replay()
        e[j][r].record()
    torch.cuda.synchronize()
    return [statistics.median(a.elapsed_time(b) for a, b in zip(s[j], e[j])) / 1e3 / counts[j] for j in range(n)]


def time_cuda_graph(call: Callable[[int], object], per_graph: int = 20, replays: int = 30) -> float:
    """Capture per_graph calls (each on another buffer set) in one CUDA graph; median replay / per_graph:
    what a graph-replayed serving step pays for one call."""
    g = capture_cuda_graph(call, per_graph)
    t = time_graph_replays([g], per_graph, replays)[0]
    del g
    return t
