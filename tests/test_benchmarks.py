"""The benchmark scripts' bookkeeping (not their timings): results rewritten after every row, failures reported,
and the issues' targets judged from the rows."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from benchmarks import bench_e2e, bench_ops, bench_train
from benchmarks.common import (
    OtherLoad,
    Results,
    arch_name,
    failure,
    measure,
    nearest_rank,
    other_load_note,
    tail_cell,
    targets_markdown,
)
from denseclip_fast import ops

from .conftest import spy_launches, spy_score_plans


def test_results_are_rewritten_after_every_row(tmp_path):
    env = {"gpu": False, "device": "cpu"}
    results = Results(str(tmp_path), "x", "t", env, {"args": {"a": 1}}, lambda e, rows: f"{len(rows)} rows\n")
    results.add({"v": 1})
    assert json.loads((tmp_path / "x_t.json").read_text())["rows"] == [{"v": 1}]
    results.add({"v": 2})
    data = json.loads((tmp_path / "x_t.json").read_text())
    assert data["rows"] == [{"v": 1}, {"v": 2}] and data["args"] == {"a": 1} and data["environment"] == env
    assert (tmp_path / "x_t.md").read_text() == "2 rows\n"


def test_results_are_replaced_whole(tmp_path, monkeypatch):
    """A write that fails halfway (a SIGINT from a time budget) leaves the previous files as they were and no
    temporary file behind."""
    import pytest

    results = Results(str(tmp_path), "x", "t", {"gpu": False, "device": "cpu"}, {}, lambda e, rows: f"{rows}\n")
    results.add({"v": 1})
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert sorted(before) == ["x_t.json", "x_t.md"]
    umask = os.umask(0o022)
    os.umask(umask)
    for p in tmp_path.iterdir():  # as open() makes them (the temporary file's were owner-only: 0600)
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, (p.name, oct(p.stat().st_mode))

    def interrupted(obj, f, **kwargs):
        f.write('{"environment": {"gpu": fa')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        results.add({"v": 2})
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_measure_keeps_the_first_output_before_a_later_call_overwrites_it(monkeypatch):
    """A function that returns the same buffer each call and changes it in place (as a CUDA graph's replay or
    torch.compile's CUDA graph trees do to an earlier output): measure's logits are the first call's values. Its
    host time is the call's alone, before the wait for the device."""
    import time

    import torch

    buffer = torch.zeros(2, 3)
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        buffer.fill_(len(calls))
        return buffer

    r = measure(fn, torch.zeros(1), 4, torch.device("cpu"))
    assert len(calls) == 1 + 1 + 4  # first, warm-up, timed
    assert torch.equal(r["logits"], torch.ones(2, 3)) and r["logits"].dtype == torch.float32
    assert r["samples"] == 4 and r["max_ms"] >= r["p50_ms"] and r["peak_memory_gib"] is None
    assert 0 < r["host_p50_ms"] <= r["p50_ms"]
    import benchmarks.common as common

    monkeypatch.setattr(common, "sync", lambda device: time.sleep(0.02))  # the wait for a device, after the call
    waited = measure(fn, torch.zeros(1), 3, torch.device("cpu"))
    assert waited["host_p50_ms"] < 10 <= waited["p50_ms"]
    assert r["first_calls_peak_memory_gib"] is None
    bf16 = measure(lambda x: x.to(torch.bfloat16), torch.full((2,), 1.5), 1, torch.device("cpu"))
    assert bf16["logits"].dtype == torch.float32 and bf16["logits"].tolist() == [1.5, 1.5]


def test_other_load_is_the_machines_busy_time_less_this_processs_own(monkeypatch):
    """OtherLoad's arithmetic on made-up counters: the machine's busy share of its ticks times its CPUs, less this
    process's CPU seconds per wall second; never below 0; None without /proc/stat or without ticks between."""
    import benchmarks.common as common

    ticks = iter([(100, 1000, 4), (100 + 300, 1000 + 400, 4)])  # 3 of 4 cores busy over the window
    clocks = {"process_time": iter([5.0, 6.0]), "perf_counter": iter([10.0, 12.0])}  # 0.5 of a core our own
    monkeypatch.setattr(common, "_cpu_ticks", lambda: next(ticks))
    monkeypatch.setattr(common.time, "process_time", lambda: next(clocks["process_time"]))
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clocks["perf_counter"]))
    assert OtherLoad().start().cores() == pytest.approx(3.0 - 0.5)
    ticks = iter([(0, 0, 2), (10, 100, 2)])  # 0.2 cores busy in all, the process ran 1.0 core: 0, not -0.8
    clocks = {"process_time": iter([0.0, 1.0]), "perf_counter": iter([0.0, 1.0])}
    assert OtherLoad().start().cores() == 0.0
    for first, last in (((0, 0, 2), None), ((0, 0, 2), (0, 0, 2))):  # no /proc/stat; no tick between
        ticks = iter([first, last])
        clocks = {"process_time": iter([0.0, 1.0]), "perf_counter": iter([0.0, 1.0])}
        assert OtherLoad().start().cores() is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="OtherLoad reads /proc/stat (Linux)")
def test_other_load_sees_another_process_spinning():
    """A process spinning beside the window keeps about one core busy, and measure's rows say so."""
    import subprocess
    import sys
    import time

    import torch

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        load = OtherLoad().start()
        time.sleep(1.0)
        assert load.cores() >= 0.5
        r = measure(lambda x: time.sleep(0.1) or x, torch.zeros(1), 8, torch.device("cpu"))
        assert r["other_cpu_cores"] >= 0.5
    finally:
        spinner.kill()
        spinner.wait()


def test_other_load_note_names_the_rows_timed_beside_busy_processes():
    rows = [{"name": "a", "other_cpu_cores": 0.1}, {"name": "b", "other_cpu_cores": 1.26}, {"name": "c"},
            {"name": "d", "other_cpu_cores": None}]  # fmt: skip
    note = other_load_note(rows, lambda r: r["name"])
    assert note.startswith("Other processes kept at most 1.3 CPU cores busy") and ": b 1.3 (" in note
    assert "0.1" not in note
    assert other_load_note(rows[:1], lambda r: r["name"]).endswith("(other_cpu_cores in the JSON).")
    assert other_load_note(rows[2:], lambda r: r["name"]) == ""


def test_measure_times_as_many_calls_as_fill_its_budget():
    """Without a count: at least min_repeats, then calls until budget_s of timed calls or max_repeats."""
    import time

    import torch

    cpu = torch.device("cpu")
    fast = measure(lambda x: x + 1, torch.zeros(1), None, cpu, budget_s=0.02, min_repeats=5, max_repeats=40)
    assert fast["samples"] == 40  # microseconds a call: the ceiling
    slow = measure(lambda x: time.sleep(0.004) or x, torch.zeros(1), None, cpu, budget_s=0.03, min_repeats=3,
                   max_repeats=1000)  # fmt: skip
    assert 3 <= slow["samples"] <= 9  # ~0.03 s / 4+ ms
    floor = measure(lambda x: time.sleep(0.004) or x, torch.zeros(1), None, cpu, budget_s=0.001, min_repeats=3)
    assert floor["samples"] == 3


def test_percentiles_need_enough_samples():
    """Nearest rank: a p99 of fewer than 100 samples, or a p90 of fewer than 10, would be the maximum: None, and
    the markdown says "max"."""
    times = [float(i) for i in range(1, 101)]
    assert nearest_rank(times, 0.99) == 99.0 and nearest_rank(times, 0.9) == 90.0
    assert nearest_rank(times[:99], 0.99) is None and nearest_rank(times[:99], 0.9) == 90.0
    assert nearest_rank(times[:10], 0.9) == 9.0 and nearest_rank(times[:9], 0.9) is None
    assert tail_cell({"p99_ms": 1.234, "max_ms": 2.0}, "p99_ms") == "1.23"
    assert tail_cell({"p99_ms": None, "max_ms": 2.0}, "p99_ms") == "max 2.00"


def test_failure_is_one_line():
    assert failure(RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")) == "RuntimeError: CUDA out of memory."
    assert failure(KeyError()) == "KeyError: "


def _op(op, shape, direction, contestant, ms, dtype="bfloat16", floor_ms=0.01):
    return {"op": op, "shape": shape, "dtype": dtype, "direction": direction, "contestant": contestant, "median_ms": ms,
            "fraction_of_floor": floor_ms / ms}  # fmt: skip


def _verdicts(checks):
    return {target: ok for target, _, ok in checks}


def _checks(rows):
    return {target: (measured, ok) for target, measured, ok in bench_ops.targets(rows)}


def test_operator_contestants_with_and_without_torch_compile(monkeypatch):
    """--compile no leaves torch.compile out (a GPU session measures it last); --compile only keeps it and the eager
    baselines, without the fused backends."""
    import torch

    monkeypatch.setenv("BENCH_COMPILE", "1")
    cpu = torch.device("cpu")
    every = set(bench_ops._contestants("attention", cpu, torch.float32, 64))
    assert {"cpu", "sdpa", "eager einsum (official)", "torch.compile(reference)"} <= every
    without = set(bench_ops._contestants("attention", cpu, torch.float32, 64, "no"))
    assert without == every - {"torch.compile(reference)"}
    only = set(bench_ops._contestants("score", cpu, torch.float32, compile_mode="only"))
    assert only == {"eager", "torch.compile(reference)"}
    # the score's baselines are the official code's F.normalize (reference.normalize's where is not its cost), with
    # the reference's values, bit for bit, zero and tiny vectors included
    visual, text, feature = torch.randn(2, 8, 3, 5), torch.randn(4, 8), torch.randn(2, 3, 3, 5)
    visual[0, :, 1, 1], text[2] = 0, text[2] * 1e-14
    assert torch.equal(bench_ops.official_score(visual, text, 0.7), ops.reference.pixel_text_score(visual, text, 0.7))
    assert torch.equal(bench_ops.official_concat(feature, visual, text),
                       ops.reference.score_concat(feature, visual, text))  # fmt: skip


def test_operator_targets():
    large, rn50 = "B32 C1024 128x128 K171", "B16 C1024 16x16 K150"
    att = "B16 H4 K150 x N257 D64"
    score, attention = "pixel_text_score", "context_attention"
    rows = [_op(score, large, "forward", "eager", 2.0), _op(score, large, "forward", "cuda", 0.4),
            _op(score, large, "forward", "triton", 0.3, floor_ms=0.26),
            _op(score, large, "backward", "triton", 0.9, floor_ms=0.49),
            _op(score, rn50, "forward", "cuda", 0.02),
            _op(attention, att, "forward", "sdpa", 0.05), _op(attention, att, "forward", "cuda", 0.04),
            _op(attention, att, "backward", "cuda", 0.09)]  # fmt: skip
    v = _verdicts(bench_ops.targets(rows))
    assert v["score B32 C1024 128x128 K171 bf16 forward <= 0.33 ms"] is True  # the best fused backend counts
    assert v["score B16 C1024 16x16 K150 bf16 forward <= 15 us"] is False
    assert v[f"attention {att} forward faster than SDPA"] is True
    assert v[f"pixel_text_score {large} bfloat16 triton: backward <= 2.5x forward"] is False  # 3.0x
    assert v[f"context_attention {att} bfloat16 cuda: backward <= 2.5x forward"] is True
    text = targets_markdown(bench_ops.targets(rows), "NVIDIA H200")
    assert "| NO |" in text and "| yes |" in text
    measured = {label: value for label, value, _ in bench_ops.targets(rows)}
    assert measured[f"{score} {large} bfloat16 triton: backward <= 2.5x forward"] == (
        "3.00x (forward 87%, backward 54% of floor)"
    )


def test_targets_on_another_gpu_say_whose_verdicts_they_are():
    """The targets are an H200's; a run on the H100 that the device tool's plain first call may start says so above its
    verdicts (which it still gives), and an H200 run does not."""
    checks = [("score forward <= 0.33 ms", "0.30 ms", True), ("attention faster than SDPA", "-", None)]
    on_h100, on_h200 = targets_markdown(checks, "NVIDIA H100 80GB HBM3"), targets_markdown(checks, "NVIDIA H200")
    assert "this run's GPU is NVIDIA H100 80GB HBM3" in on_h100 and "not whether the H200's targets" in on_h100
    assert "run's GPU" not in on_h200
    for text in (on_h100, on_h200):
        assert "| score forward <= 0.33 ms | 0.30 ms | yes |" in text and "| - | not measured |" in text
    assert targets_markdown([], "NVIDIA H100 80GB HBM3") == ""


def test_operator_floor_uses_the_dtypes_compute_peak():
    """float32 kernels compute in IEEE float32 (no tensor cores): their floor is FLOPs / 67 TFLOP/s, the 16-bit
    ones' FLOPs / 790 TFLOP/s."""
    row = lambda dtype, flops: bench_ops.Row("op", "s", dtype, "forward", "triton", 1.0, 1.0, 1.0, 0.0, flops)  # noqa: E731
    assert abs(row("float32", 67e9).floor_ms - 1.0) < 1e-9
    assert abs(row("bfloat16", 790e9).floor_ms - 1.0) < 1e-9 and abs(row("float16", 790e9).floor_ms - 1.0) < 1e-9
    assert row("float32", 67e9).summary()["fraction_of_floor"] == 1.0


def test_official_concat_baseline_gets_nchw_inputs():
    """score_concat's official eager row runs on NCHW inputs (the official model's layout), the other eager row and
    the fused backends on the channels_last ones; every row records the engine's backend."""
    import torch

    cpu = torch.device("cpu")
    names = set(bench_ops._contestants("concat", cpu, torch.float32, compile_mode="no"))
    assert {bench_ops.CONCAT_OFFICIAL, bench_ops.CONCAT_CHANNELS_LAST} <= names
    feature = torch.randn(1, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    visual = torch.randn(1, 5, 3, 3).contiguous(memory_format=torch.channels_last)
    text = torch.randn(2, 5)
    nchw = (feature.contiguous(), visual.contiguous(), text)
    seen = {}

    def record(name):
        def fn(f, v, t):
            seen[name] = (f.is_contiguous(), v.is_contiguous())
            return torch.cat([f, torch.einsum("bchw,kc->bkhw", v, t)], dim=1)

        return fn

    one = bench_ops._timed("score_concat", "s", torch.float32, (feature, visual, text), cpu, True, (1.0, 1.0),
                           (1.0, 1.0), {bench_ops.CONCAT_OFFICIAL: nchw})  # fmt: skip
    rows = one(bench_ops.CONCAT_OFFICIAL, record("official")) + one("cpu", record("fused"))
    assert seen == {"official": (True, True), "fused": (False, False)}
    engine = bench_ops.engine_backend("score_concat", cpu, torch.float32)
    assert engine in ("cpu", "reference") and all(r.engine_backend == engine for r in rows)
    assert f"score_concat float32: {engine}" in bench_ops.markdown(
        {"gpu": False, "device": "cpu", "date": "d", "torch": "t", "triton": "t", "threads": 2},
        [r.summary() for r in rows])  # fmt: skip


def test_triton_score_plans_are_forward_only_contestants(monkeypatch):
    """bench_ops.TRITON_PLANS: the Triton score forward with another plan (score.ROWS_FROM, score.TEXT_NORMS_FROM,
    score.SPLIT_C_PER_SM) for the length of each call, its kernels as planned, the defaults back after; timed forward
    only (no backward row: the backward is the triton row's); off until adopted, a plan's row meets no target by
    itself."""
    import torch

    from denseclip_fast import ops
    from denseclip_fast.ops import backends

    if backends.triton_available() is not None:
        pytest.skip(backends.triton_available())
    from denseclip_fast.ops.triton import score

    kernels = spy_launches(monkeypatch, score)
    triton = lambda v, t: ops.pixel_text_score(v, t, backend="triton")  # noqa: E731
    visual = torch.randn(1, 64, 3, 3).to(torch.float16).contiguous(memory_format=torch.channels_last)
    text = torch.randn(5, 64).to(torch.float16)  # the plans are for 16-bit maps; 64 channels, 2 steps: a split
    expected = triton(visual, text)
    launched = {}
    for name, plan in bench_ops.TRITON_PLANS.items():
        kernels.clear()
        torch.testing.assert_close(bench_ops._triton_plan(triton, *plan)(visual, text), expected)
        launched[name] = list(kernels)
        assert (score.ROWS_FROM, score.TEXT_NORMS_FROM, score.SPLIT_C_PER_SM) == (None, None, None)
    assert launched == {"triton text norms": ["_text_norm_kernel", "_score_fwd_kernel"],
                        "triton rows": ["_text_norm_kernel", "_score_fwd_rows_kernel"],
                        "triton split-C": ["_score_fwd_split_kernel"]}  # fmt: skip
    cpu = torch.device("cpu")
    one = bench_ops._timed("pixel_text_score", "s", torch.float16, (visual, text), cpu, True, (1.0, 1.0), (1.0, 1.0))
    rows_plan = bench_ops._triton_plan(triton, *bench_ops.TRITON_PLANS["triton rows"])
    rows = one("triton", triton) + one("triton rows", rows_plan)
    assert [(r.contestant, r.direction) for r in rows] == [("triton", "forward"), ("triton", "backward"),
                                                          ("triton rows", "forward")]  # fmt: skip
    large = "B32 C1024 128x128 K171"
    verdicts = _checks([_op("pixel_text_score", large, "forward", "triton", 0.5),
                        _op("pixel_text_score", large, "forward", "triton rows", 0.3)])  # fmt: skip
    measured, ok = verdicts[f"score {large} bf16 forward <= 0.33 ms"]
    assert ok is False and "triton rows" not in measured, measured


def test_operator_targets_judge_the_engines_backend():
    """Where the rows say which backend the engine resolves, that one is judged, with the best fused beside it."""
    large = "B32 C1024 128x128 K171"
    rows = [{**_op("pixel_text_score", large, "forward", "cuda", 0.30), "engine_backend": "triton"},
            {**_op("pixel_text_score", large, "forward", "triton", 0.40), "engine_backend": "triton"},
            {**_op("pixel_text_score", large, "backward", "triton", 0.80), "engine_backend": "triton"}]  # fmt: skip
    checks = _checks(rows)
    measured, ok = checks["score B32 C1024 128x128 K171 bf16 forward <= 0.33 ms"]
    assert ok is False and measured == "400.0 us (triton, the engine's choice); best fused 300.0 us (cuda)"
    assert checks[f"pixel_text_score {large} bfloat16 triton: backward <= 2.5x forward"][0].endswith(
        "; the engine's choice)"
    )
    rows[1]["contestant"] = "eager"  # the engine's choice not measured: the best fused, said so
    measured, ok = _checks(rows)["score B32 C1024 128x128 K171 bf16 forward <= 0.33 ms"]
    assert ok is True and "best fused; the engine's choice, triton, not measured" in measured


def test_operator_forward_targets_use_the_cuda_graph_time_where_measured():
    """A forward row with a CUDA-graph time (its kernels alone) is judged on it, and says so; without one, on its
    median. The rows' markdown shows the graph column ("-" where not measured)."""
    rn50, att = "B16 C1024 16x16 K150", "B16 H4 K150 x N257 D64"
    rows = [{**_op("pixel_text_score", rn50, "forward", "triton", 0.45), "graph_ms": 0.012, "engine_backend": "triton"},
            {**_op("context_attention", att, "forward", "triton", 0.2), "graph_ms": 0.010},
            {**_op("context_attention", att, "forward", "sdpa", 0.012), "graph_ms": 0.011}]  # fmt: skip
    checks = _checks(rows)
    assert checks["score B16 C1024 16x16 K150 bf16 forward <= 15 us"] == (
        "12.0 us in a CUDA graph (triton, the engine's choice)", True)
    measured, ok = checks[f"attention {att} forward faster than SDPA"]
    assert ok is True and measured == "10.0 us in a CUDA graph (triton, best fused) vs SDPA 11.0 us in a CUDA graph"
    del rows[0]["graph_ms"]
    assert _checks(rows)["score B16 C1024 16x16 K150 bf16 forward <= 15 us"] == (
        "450.0 us (triton, the engine's choice)", False)
    full = [{**r, "min_ms": r["median_ms"], "max_ms": r["median_ms"], "achieved_tb_per_s": 1.0,
             "achieved_tflop_per_s": 1.0} for r in rows]  # fmt: skip
    text = bench_ops.markdown({"gpu": False, "device": "cpu", "date": "d", "torch": "t", "triton": "t", "threads": 2},
                              full)  # fmt: skip
    assert "| 0.4500 | 0.4500 | 0.4500 | - |" in text and "| 0.2000 | 0.2000 | 0.2000 | 0.0100 |" in text


def test_engine_targets():
    def row(contestant, batch, p50, err):
        return {"arch": "RN50", "mode": "whole", "shape": [batch, 3, 512, 512], "contestant": contestant,
                "p50_ms": p50, "images_per_s": batch / (p50 / 1e3), "rel_error_vs_official": err}  # fmt: skip

    rows = [row("engine-bf16", 1, 0.9, 1e-2), row("engine-bf16", 16, 6.0, 3e-2), row("engine-fp32", 1, 3.0, 2e-6)]
    v = _verdicts(bench_e2e.targets(rows))
    assert v["RN50 512x512 batch 1, engine-bf16: p50 <= 1.0 ms"] is True
    assert v["RN50 512x512 batch 16, engine-bf16: >= 3000 images/s"] is False  # 2667 images/s
    assert v["engine-fp32 logits within 0.0001 of official (every configuration)"] is True
    assert v["engine-bf16 logits within 0.02 of official (every configuration)"] is False  # the worst one counts
    missing = _verdicts(bench_e2e.targets([{"arch": "RN50", "contestant": "engine-fp32", "error": "OOM"}]))
    assert set(missing.values()) == {None, False}
    assert missing["engine-fp32 logits within 0.0001 of official (every configuration)"] is False  # failed there
    assert missing["RN50 512x512 batch 1, engine-bf16: p50 <= 1.0 ms"] is None
    # NaN logits in one configuration, after one within the bound (max() kept the first: "yes"), and a configuration
    # the contestant failed in (left out: "yes" for "every configuration")
    nan = [row("engine-bf16", 1, 0.9, 1e-3), row("engine-bf16", 16, 4.0, float("nan")),
           row("engine-fp32", 1, 3.0, 1e-6), {**row("engine-fp32", 16, 3.0, None), "error": "OOM"}]  # fmt: skip
    checks = {target: (measured, ok) for target, measured, ok in bench_e2e.targets(nan)}
    assert checks["engine-bf16 logits within 0.02 of official (every configuration)"] == ("worst nan over 2", False)
    assert checks["engine-fp32 logits within 0.0001 of official (every configuration)"] == (
        "worst 1.0e-06 over 1; 1 failed", False)


def test_relative_errors_compare_outputs_of_one_shape():
    import math

    import pytest
    import torch

    from benchmarks.common import rel_err

    assert rel_err(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert abs(rel_err(torch.tensor([3.0, 5.0]), torch.tensor([3.0, 4.0])) - 0.2) < 1e-12
    with pytest.raises(ValueError, match=r"differ in shape: \(1, 2\) and \(2,\)"):
        rel_err(torch.ones(1, 2), torch.ones(2))  # broadcast, it was a number
    # summed a chunk at a time (7 does not divide 5 x 6 x 11) as over the whole, in float64, for any layout
    a, b = torch.randn(5, 6, 11), torch.randn(5, 11, 6).transpose(1, 2)
    whole = ((a.double() - b.double()).norm() / b.double().norm()).item()
    assert abs(rel_err(a, b, chunk=7) - whole) <= 1e-12 * whole
    assert abs(rel_err(a.half(), b.bfloat16(), chunk=7) - rel_err(a.half(), b.bfloat16())) <= 1e-12
    assert rel_err(torch.ones(3), torch.zeros(3)) == float("inf")
    assert math.isnan(rel_err(torch.zeros(3), torch.zeros(3)))


def test_results_name_the_code_that_made_them(tmp_path, monkeypatch):
    """Every result's environment has a hash of setup.py, csrc/, denseclip_fast/ and benchmarks/ (the GPU machine
    has no git history): it changes with any of their sources, not with caches or other files."""
    import torch

    from benchmarks import common

    for name in ("setup.py", "csrc/cuda/a.cu", "denseclip_fast/x.py", "benchmarks/y.py", "README.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    monkeypatch.setattr(common, "ROOT", str(tmp_path))
    first = common.code_hash()
    assert len(first) == 16 and int(first, 16) >= 0
    (tmp_path / "README.md").write_text("other words")
    (tmp_path / "denseclip_fast" / "__pycache__").mkdir()
    (tmp_path / "denseclip_fast" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    assert common.code_hash() == first
    (tmp_path / "csrc" / "cuda" / "a.cu").write_text("a change")
    assert common.code_hash() != first
    monkeypatch.undo()
    env = common.environment(torch.device("cpu"))
    assert env["code"] == common.code_hash() and env["time_utc"].count(":") == 2


def test_environment_names_the_cpus_instruction_sets(monkeypatch, tmp_path):
    """Results record the CPU's AVX/AMX flags (a bfloat16 engine's speed depends on them), read from /proc/cpuinfo."""
    import builtins

    import torch

    from benchmarks import common

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 amx_bf16 avx512f amx_tile\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k))
    assert common.cpu_features() == ["avx2", "avx512f", "amx_tile", "amx_bf16"]  # CPU_FEATURES' order
    env = common.environment(torch.device("cpu"))
    assert env["cpu_features"] == ["avx2", "avx512f", "amx_tile", "amx_bf16"] and env["device"] == "Some CPU"
    cpuinfo.write_text("processor\t: 0\n")
    assert common.cpu_features() is None


def test_results_name_the_environment_variables_that_shaped_them(monkeypatch, tmp_path):
    """A run's tuning variables (THP_MEM_ALLOC_ENABLE, OMP_NUM_THREADS, the library's switches) are recorded in its
    JSON and named at the end of its markdown; others, and secret-looking names under those prefixes, are not."""
    import json
    import os
    from pathlib import Path

    import torch

    from benchmarks import common

    for name in list(os.environ):
        if name.startswith(common.TUNING_VARIABLES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SOME_OTHER_SETTING", "1")
    env = common.environment(torch.device("cpu"))
    assert env["environment_variables"] == {}
    stem = common.write_results(str(tmp_path), "plain", "t", env, {"rows": []}, "# Title\n\n| a |\n")
    assert Path(f"{stem}.md").read_text() == "# Title\n\n| a |\n"  # unchanged without variables

    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("DENSECLIP_FAST_CRC32", "zlib")
    monkeypatch.setenv("TORCH_HUB_TOKEN", "hidden")
    env = common.environment(torch.device("cpu"))
    assert env["environment_variables"] == {"DENSECLIP_FAST_CRC32": "zlib", "OMP_NUM_THREADS": "2",
                                            "THP_MEM_ALLOC_ENABLE": "1"}  # fmt: skip
    assert list(env["environment_variables"]) == sorted(env["environment_variables"])
    stem = common.write_results(str(tmp_path), "set", "t", env, {"rows": []}, "# Title\n\n| a |\n\n")
    text = Path(f"{stem}.md").read_text()
    assert text == ("# Title\n\n| a |\n\nEnvironment variables set for this run: `DENSECLIP_FAST_CRC32=zlib`, "
                    "`OMP_NUM_THREADS=2`, `THP_MEM_ALLOC_ENABLE=1`.\n")  # fmt: skip
    saved = Path(f"{stem}.json").read_text()
    assert "hidden" not in text and "hidden" not in saved
    assert json.loads(saved)["environment"]["environment_variables"]["THP_MEM_ALLOC_ENABLE"] == "1"


def test_tf32_settings_resolve_none_through_the_backend_and_generic_settings():
    """An operator's "none" takes its backend's fp32_precision, then torch.backends.fp32_precision; "none"
    throughout is IEEE. Read through the fp32_precision settings only (the legacy flags raise once these are set)."""
    import torch

    from benchmarks.common import tf32_settings

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (torch.backends.fp32_precision, cudnn.fp32_precision, cudnn.conv.fp32_precision, matmul.fp32_precision)

    def put(generic: str, backend: str, conv: str, mm: str) -> None:
        torch.backends.fp32_precision = generic
        cudnn.fp32_precision, cudnn.conv.fp32_precision, matmul.fp32_precision = backend, conv, mm

    try:
        put("none", "none", "none", "none")
        assert tf32_settings() == {"cudnn_conv": "ieee", "cuda_matmul": "ieee"}
        put("tf32", "none", "none", "none")
        assert tf32_settings() == {"cudnn_conv": "tf32", "cuda_matmul": "tf32"}
        put("tf32", "ieee", "none", "ieee")  # the backend's setting comes before the generic one
        assert tf32_settings() == {"cudnn_conv": "ieee", "cuda_matmul": "ieee"}
        put("ieee", "ieee", "tf32", "none")  # the operator's own before both
        assert tf32_settings() == {"cudnn_conv": "tf32", "cuda_matmul": "ieee"}
    finally:
        put(*saved)


def test_engine_table_labels_precision_tails_and_image_path_flops():
    """bench_e2e's rows say what each contestant computes in (the official one at PyTorch's TF32 defaults on CUDA),
    p90/p99 read "max" where too few calls were timed, and the FLOP-rate column is the image path's."""
    import torch

    from benchmarks.common import tf32_settings

    cuda = torch.device("cuda")
    defaults = {"cudnn_conv": "tf32", "cuda_matmul": "ieee"}
    assert bench_e2e.precision("official", cuda, defaults) == "fp32, PyTorch defaults: TF32 convolutions, IEEE matmuls"
    assert bench_e2e.precision("official", torch.device("cpu"), defaults) == "fp32"
    assert bench_e2e.precision("engine-fp32", cuda, defaults) == "fp32, IEEE (TF32 off)"
    assert "no freezing" in bench_e2e.precision("compile-ro", cuda, defaults)
    assert [bench_e2e.runs_official(n) for n in bench_e2e.ALL] == [False, False, True, True, True, True, False, False,
                                                                   False, False, False, False, False, False]
    assert set(tf32_settings().values()) <= {"tf32", "ieee"}
    row = {"arch": "RN50", "mode": "whole", "shape": [1, 3, 512, 512], "contestant": "official",
           "precision": bench_e2e.precision("official", cuda, defaults), "p50_ms": 10.0, "p90_ms": 11.0,
           "p99_ms": None, "max_ms": 12.5, "samples": 40, "images_per_s": 100.0, "first_call_s": 1.0,
           "peak_memory_gib": 1.5, "first_calls_peak_memory_gib": 2.25, "rel_error_vs_official": 1e-3,
           "image_path_fraction_of_peak": 0.01}  # fmt: skip
    env = {"gpu": True, "device": "H200", "date": "d", "torch": "t", "triton": "t", "threads": 16, "tf32": defaults,
           "cudnn_benchmark": True}  # fmt: skip
    text = bench_e2e.table(env, [row, {**row, "contestant": "engine-bf16", "error": "OOM"}], 150)
    label = "fp32, PyTorch defaults: TF32 convolutions, IEEE matmuls"
    assert f"| official | {label} | 10.00 | - | 11.00 | max 12.50 | 40 | 100.0 | 1.0 | 1.50 (2.25) | 1.0e-03 |" in text
    hosted = bench_e2e.table(env, [{**row, "host_p50_ms": 9.5}], 150)  # bound by its launches: near the p50
    assert f"| official | {label} | 10.00 | 9.50 | 11.00 | max 12.50 |" in hosted and "| host ms |" in hosted
    assert "image path, of 790 TFLOP/s" in text and "cuDNN benchmark mode on" in text
    assert f"| engine-bf16 | {label} | failed: OOM |" in text
    header, failed = (next(line for line in text.splitlines() if line.startswith(start))
                      for start in ("| arch |", "| RN50 | whole | 1x3x512x512 | engine-bf16"))  # fmt: skip
    assert failed.count("|") == header.count("|")  # a failed row has every column
    # a contestant meant to replay CUDA graphs that ran without them says so beside its precision
    ro = {**row, "contestant": "compile-ro", "precision": "ro", "cudagraph_skips": 2}
    eager = {**row, "contestant": "engine-bf16", "precision": "bf16", "cuda_graphs_captured": 0}
    text = bench_e2e.table(env, [ro, eager, {**eager, "cuda_graphs_captured": 1}], 150)
    assert "| compile-ro | ro; CUDA graphs skipped (cudagraph_skips=2) | 10.00 |" in text
    assert "| engine-bf16 | bf16; no CUDA graph captured (ran eagerly) | 10.00 |" in text
    assert "| engine-bf16 | bf16 | 10.00 |" in text
    assert bench_e2e.windows(512, 2048, 512, 341) == 6 and bench_e2e.windows(256, 256, 512, 341) == 1


def test_switched_off_engine_contestants_build_and_call_their_segmenter_so(monkeypatch):
    """engine-bf16-plain-conv: a bfloat16 Segmenter built and called with DENSECLIP_FAST_CUDNN_FUSION=0 (PyTorch's
    convolutions; read when it is built); engine-bf16-aten-resample: with DENSECLIP_FAST_TRITON_RESAMPLE=0 (read at
    each call); the variables restored afterwards; engine-bf16 builds and runs with the caller's settings."""
    import torch

    variables = ("DENSECLIP_FAST_CUDNN_FUSION", "DENSECLIP_FAST_TRITON_RESAMPLE", "DENSECLIP_FAST_FUSED_QKV",
                 "DENSECLIP_FAST_TRITON_ADD_LN", "DENSECLIP_FAST_NATIVE_LN", "DENSECLIP_FAST_SILU_MLP",
                 "DENSECLIP_FAST_GEMM_CONVT", "DENSECLIP_FAST_GROUP_NORM")
    seen = []

    class Recorder:
        def __init__(self, model, **kwargs):
            seen.append(("built", kwargs["dtype"], *(os.environ.get(v) for v in variables)))
            self.logits = lambda x: seen.append(("called", *(os.environ.get(v) for v in variables))) or x

    monkeypatch.setattr(bench_e2e.dcf, "Segmenter", Recorder)
    for variable in variables:
        monkeypatch.delenv(variable, raising=False)
    official = argparse.Namespace(texts=torch.zeros(1))
    names = ("engine-bf16-plain-conv", "engine-bf16-aten-resample", "engine-bf16-separate-qkv",
             "engine-bf16-aten-add-ln", "engine-bf16-fp32-ln", "engine-bf16-quick-gelu", "engine-bf16-cudnn-convt",
             "engine-bf16-aten-group-norm", "engine-bf16")
    for name in names:
        bench_e2e.contestant(name, None, official, torch.device("cpu"), "whole", 512, 341)(torch.zeros(1))
    expected = []
    for i in range(len(names)):  # each switched-off contestant sets its own variable alone; engine-bf16 none
        values = tuple("0" if j == i else None for j in range(len(variables)))
        expected += [("built", torch.bfloat16, *values), ("called", *values)]
    assert seen == expected
    assert not any(v in os.environ for v in variables)
    assert bench_e2e.precision("engine-bf16-plain-conv", torch.device("cuda"), {}) == "bf16, PyTorch's convolutions"
    assert set(bench_e2e.SWITCHED_OFF) <= set(bench_e2e.ALL)


def test_the_vit_only_contestants_are_not_run_on_a_resnet():
    import denseclip_fast as dcf

    resnet, vit = dcf.preset("RN50"), dcf.preset("ViT-B/16")
    for name in bench_e2e.ALL:
        assert bench_e2e.runs_on(name, vit)
        assert bench_e2e.runs_on(name, resnet) is (name not in bench_e2e.VIT_ONLY)
    assert len(bench_e2e.VIT_ONLY) == 4 and set(bench_e2e.VIT_ONLY) <= set(bench_e2e.SWITCHED_OFF)


def test_arch_options_take_the_aliases_and_name_the_choices(capsys):
    """--archs takes ViT-B-16 (its config file's and open_clip's spelling) as ViT-B/16; an unknown name is refused
    with argparse's message listing the accepted ones."""
    assert arch_name("ViT-B-16") == "ViT-B/16" and arch_name("RN101") == "RN101" and arch_name("rn50") == "rn50"
    with pytest.raises(SystemExit) as exc:
        bench_e2e.main(["--archs", "RN18"])
    assert exc.value.code == 2
    assert "invalid choice: 'RN18' (choose from" in capsys.readouterr().err


def test_training_target():
    rows = [{"contestant": "official-fp32", "images_per_s": 10.0}, {"contestant": "trainer-bf16", "images_per_s": 31.0}]
    assert _verdicts(bench_train.targets(rows)) == {"trainer-bf16 >= 3x official-fp32 images/s": True}
    rows[1]["images_per_s"] = 29.0
    assert _verdicts(bench_train.targets(rows)) == {"trainer-bf16 >= 3x official-fp32 images/s": False}
    assert _verdicts(bench_train.targets(rows[:1])) == {"trainer-bf16 >= 3x official-fp32 images/s": None}


def test_training_table_with_a_failed_baseline():
    env = {"gpu": True, "date": "d", "device": "H200", "torch": "t", "triton": "t"}
    args = argparse.Namespace(arch="RN50", size=512, batch=16, classes=150)
    rows = [{"contestant": "official-fp32", "error": "OutOfMemoryError: CUDA out of memory."},
            {"contestant": "trainer-bf16", "ms_per_step": 50.0, "images_per_s": 320.0, "peak_memory_gib": 20.0,
             "first_calls_peak_memory_gib": 24.5}]
    text = bench_train.table(env, rows, args)
    assert "| official-fp32 | failed: OutOfMemoryError" in text
    assert "| trainer-bf16 | 50.0 | 320.0 | 20.0 (24.5) |  |" in text
    assert "| not measured |" in text  # the 3x target without its baseline


def test_data_benchmark_reports_the_pipeline(tmp_path):
    """bench_data on a tiny synthetic set: the one-process split and a row per worker count, in JSON and markdown."""
    from benchmarks import bench_data

    args = ["--images", "3", "--height", "40", "--width", "56", "--crop", "32", "--samples", "2", "--batch", "2",
            "--batches", "1", "--workers", "0", "--out", str(tmp_path), "--tag", "t"]  # fmt: skip
    assert bench_data.main(args) == 0
    rows = json.loads((tmp_path / "data_t.json").read_text())["rows"]
    assert rows[0]["sample_ms"] >= rows[0]["read_ms"] > 0 and rows[1]["workers"] == 0 and rows[1]["samples_per_s"] > 0
    assert "| 0 |" in (tmp_path / "data_t.md").read_text()


def test_profiles_say_where_the_time_goes():
    """profile_kernels: per-call times of the largest operators (CPU here, GPU kernels on CUDA) and the rest summed;
    the markdown of the e2e and training benchmarks shows them, or says why there is none."""
    import torch

    from benchmarks.common import profile_kernels, profile_markdown

    x = torch.randn(96, 96)
    prof = profile_kernels(lambda t: (t @ t).relu().sum(), x, torch.device("cpu"), calls=2)
    names = [k["name"] for k in prof["kernels"]]
    assert prof["unit"] == "CPU self time" and prof["total_us"] > 0 and "aten::mm" in names
    assert abs(sum(k["share"] for k in prof["kernels"]) - 1) < 1e-6
    assert next(k for k in prof["kernels"] if k["name"] == "aten::mm")["count"] == 1  # per call, not per run
    short = profile_kernels(lambda t: (t @ t).relu().sum(), x, torch.device("cpu"), calls=1, top=1)
    assert len(short["kernels"]) == 2 and short["kernels"][1]["name"].endswith("others)")
    assert short["every_kernel"][0] == short["kernels"][0] and len(short["every_kernel"]) > 2  # none summed
    assert abs(sum(k["share"] for k in short["every_kernel"]) - 1) < 1e-6
    assert "| `aten::mm` | 1 |" in profile_markdown("t", prof)
    assert "recorded no kernels" in profile_markdown("t", {"unit": "GPU kernel time", "total_us": 0, "kernels": []})
    row = {"contestant": "engine-bf16", "arch": "RN50", "mode": "whole", "shape": [1, 3, 64, 64], "profile": prof,
           "profile_no_graphs": prof}  # fmt: skip
    text = bench_e2e.profiles_markdown([row, {**row, "profile_error": "RuntimeError: x"}])
    assert text.count("### Where the time goes: engine-bf16, RN50 whole 1x3x64x64") == 4 and "CUDA graphs off" in text
    assert "profiling failed: RuntimeError: x" in text


def test_call_sites_name_the_projects_innermost_frame():
    """common.call_site: the innermost frame in the project's packages, from the package on, with the builtin the
    call left Python through (a Tensor method as such, an extension's function by its name, the object's address
    dropped); None for a stack without such a frame."""
    from benchmarks.common import call_site

    stack = ["<built-in method contiguous of Tensor object at 0x7f5871d850e0>",
             "/x/site-packages/torch/nn/functional.py(4012): interpolate",
             "/repo/denseclip_fast/model/decoder.py(64): merge", "/repo/denseclip_fast/model/decoder.py(99): forward",
             "bench.py(3): <module>"]  # fmt: skip
    assert call_site(stack) == "denseclip_fast/model/decoder.py:64 merge (Tensor.contiguous)"
    assert call_site(stack[1:]) == "denseclip_fast/model/decoder.py:64 merge"
    extension = "<built-in method resize_bilinear of pybind11_builtins.pybind11_detail_function_record object at 0xab>"
    assert call_site([extension, *stack[2:]]) == "denseclip_fast/model/decoder.py:64 merge (resize_bilinear)"
    assert call_site(["<built-in function cat>", "/r/benchmarks/official/model.py(7): f"]) == (
        "benchmarks/official/model.py:7 f (cat)")
    assert call_site(["<built-in function cat>", "bench.py(3): <module>"]) is None
    assert call_site([]) is None
    # in the fused operators' code: after the caller outside it
    launcher = ["/r/denseclip_fast/ops/triton/attention.py(290): attention_forward",
                "/r/denseclip_fast/ops/__init__.py(140): context_attention", *stack[2:]]  # fmt: skip
    assert call_site(launcher) == ("denseclip_fast/model/decoder.py:64 merge > "
                                   "denseclip_fast/ops/triton/attention.py:290 attention_forward")
    assert call_site([stack[0], *launcher[:2]]) == "denseclip_fast/ops/triton/attention.py:290 attention_forward " \
        "(Tensor.contiguous)"  # no caller outside: the innermost alone


def test_profiles_by_call_site(monkeypatch):
    """profile_kernels(sites=N): the operators' time by the line that called them, per call, the largest first, shares
    of all the time; on CUDA the operators' own kernels (not the kernel events again) with the longest one's name."""
    from types import SimpleNamespace

    import torch
    from torch.autograd import DeviceType

    from benchmarks import common

    monkeypatch.setattr(common, "SITE_PACKAGES", ("tests/", "denseclip_fast/"))
    x = torch.randn(96, 96)

    def work(t):
        return (t @ t).relu()  # the matmul's line

    # which operator's self time is the largest is the machine's business (torch 2.11 gave matmul's profiling
    # overhead more than mm's own; under load relu's took 6 ms): each row is found by its operator
    prof = common.profile_kernels(work, x, torch.device("cpu"), calls=2, sites=20)
    rows = {row["operator"]: row for row in prof["sites"]}
    assert {"aten::mm", "aten::clamp_min"} <= set(rows), prof["sites"]
    assert rows["aten::mm"]["count"] == 1 and rows["aten::mm"]["site"].startswith("tests/test_benchmarks.py:")
    assert rows["aten::mm"]["site"].endswith(" work") and rows["aten::clamp_min"]["site"].endswith("work (Tensor.relu)")
    top = prof["sites"][0]
    assert prof["sites"] == sorted(prof["sites"], key=lambda k: -k["us"]) and 0 < top["share"] <= 1
    assert len(common.profile_kernels(work, x, torch.device("cpu"), calls=2, sites=1)["sites"]) == 1
    assert "By call site: the" in common.profile_markdown("t", prof)
    assert "sites" not in common.profile_kernels(work, x, torch.device("cpu"), calls=1)

    frames = ["/r/denseclip_fast/model/decoder.py(64): merge"]
    kernels = [SimpleNamespace(name="short_copy", duration=1.0),
               SimpleNamespace(name="direct_copy_kernel", duration=2.0)]
    events = [SimpleNamespace(name="aten::copy_", device_type=DeviceType.CPU, self_device_time_total=3.0,
                              stack=frames, kernels=kernels),
              SimpleNamespace(name="direct_copy_kernel", device_type=DeviceType.CUDA, self_device_time_total=2.0,
                              stack=[], kernels=[]),
              SimpleNamespace(name="aten::add", device_type=DeviceType.CPU, self_device_time_total=1.0, stack=[],
                              kernels=[SimpleNamespace(name="add_kernel", duration=1.0)]),
              SimpleNamespace(name="nn.Module: Conv2d_0", device_type=DeviceType.CPU, self_device_time_total=9.0,
                              stack=[], kernels=[], is_python_function=True)]  # fmt: skip
    # 5 us and 4 kernels a call in all: 1 us in a kernel no operator launched (a Triton launch)
    sites = common._by_call_site(events, True, 1, 5, 5.0, 4)
    assert sites == [{"site": "denseclip_fast/model/decoder.py:64 merge", "operator": "aten::copy_", "count": 1,
                      "us": 3.0, "kernel": "direct_copy_kernel", "share": 0.6},
                     {"site": "(outside this project's code)", "operator": "aten::add", "count": 1, "us": 1.0,
                      "kernel": "add_kernel", "share": 0.2},
                     {"site": common.UNLAUNCHED, "operator": "-", "count": 1, "us": 1.0, "share": 0.2}]  # fmt: skip
    assert common._by_call_site(events, True, 1, 5, 4.0, 3)[-1]["site"] != common.UNLAUNCHED  # all launched


def test_a_profiled_triton_launch_is_an_event_at_its_call_site(monkeypatch):
    """While torch.profiler records, each launch through ops/triton/common.launch or .profiled is a "triton::<kernel>"
    event (the profiler links a GPU's kernels to it), placed by the call site table at the line that called the
    operator and the launcher's line; unprofiled, launch() and profiled() hand back the plain launcher."""
    import torch

    from benchmarks import common
    from denseclip_fast import ops
    from denseclip_fast.ops.triton import attention
    from denseclip_fast.ops.triton import common as triton_common

    monkeypatch.setattr(common, "SITE_PACKAGES", ("tests/", "denseclip_fast/"))
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)

    def attend(t):
        return ops.context_attention(t, k, v, backend="triton")  # the caller's line

    prof = common.profile_kernels(attend, q, torch.device("cpu"), calls=1, sites=100)
    (row,) = [r for r in prof["sites"] if r["operator"] == "triton::_attn_fwd_kernel"]
    assert row["count"] == 1 and row["site"].startswith("tests/test_benchmarks.py:"), row
    assert " attend > denseclip_fast/ops/triton/attention.py:" in row["site"], row
    assert not isinstance(triton_common.launch(attention._attn_fwd_kernel), triton_common._Profiled)
    # a kernel launched as it is (no triton_op) goes through profiled(), which makes it an event the same way (a
    # profile of the interpreted resize with stacks would take minutes: its launch is checked, not profiled)
    from denseclip_fast.ops.triton import resample

    assert triton_common.profiled(resample._bilinear_kernel) is resample._bilinear_kernel  # unprofiled: as it is
    seen = []
    monkeypatch.setattr(resample, "profiled", lambda kernel: seen.append(kernel) or kernel)
    resample.bilinear(torch.randn(1, 3, 4, 5), (8, 9))
    assert seen == [resample._bilinear_kernel]


def test_bench_train_switches_a_contestant_off_around_its_steps(monkeypatch):
    """trainer-bf16-aten: the switches are 0 while its step runs (where the kernels read them) and as they were
    after, a step that raises included."""
    seen = []
    names = ("DENSECLIP_FAST_TRITON_RESAMPLE", "DENSECLIP_FAST_TRITON_LOSS")

    def step(x, label):
        seen.append(tuple(os.environ.get(name) for name in names))
        if label == "boom":
            raise RuntimeError("boom")
        return 1.5

    monkeypatch.setenv(names[0], "1")
    monkeypatch.delenv(names[1], raising=False)
    off = bench_train.switched_off(step, *names)
    assert off(None, None) == 1.5 and os.environ[names[0]] == "1" and names[1] not in os.environ
    monkeypatch.delenv(names[0])
    with pytest.raises(RuntimeError, match="boom"):
        off(None, "boom")
    assert seen == [("0", "0"), ("0", "0")] and not any(name in os.environ for name in names)
    assert {"trainer-bf16-aten", "trainer-bf16-unfused-loss"} <= set(bench_train.ALL)


def test_score_tuning_sweep_tries_each_variant_and_restores_the_defaults(tmp_path, monkeypatch):
    """benchmarks/tune_score.py under Triton's interpreter: each variant runs with its blocks (a block of 48
    channels, not a power of two, fails and is reported, the sweep goes on), agrees with the default's results, and
    the defaults are back afterwards."""
    from benchmarks import tune_score
    from denseclip_fast.ops import backends

    if backends.triton_available() is not None:
        import pytest

        pytest.skip(backends.triton_available())
    from denseclip_fast.ops.triton import score

    before = (score._blocks, {k: dict(v) for k, v in score.FUSED_BLOCKS.items()}, score.BWD_WARPS,
              dict(score.FUSED_BLOCKS_NHWC), score.TEXT_NORMS_FROM, score.ROWS_FROM, score.ROWS_BLOCKS,
              score.SPLIT_C_PER_SM, score.MAX_SPLITS, score.ROWS_TAIL_K)  # fmt: skip
    monkeypatch.setattr(tune_score, "FORWARD", [(64, 64, 8), (64, 48, 8)])
    monkeypatch.setattr(tune_score, "NORMS_FORWARD", [(32, 32, 8)])
    monkeypatch.setattr(tune_score, "ROWS_FORWARD", [(32, 16, 4)])
    # 4 programs of 32 pixels on the interpreter's 4 "SMs": 2 a SM splits 2 ways, 1 a SM not at all (not timed)
    monkeypatch.setattr(tune_score, "SPLIT_FORWARD", [(2, 8), (1, 8)])
    monkeypatch.setattr(tune_score, "ROWS_TAIL_FORWARD", [(32, 16, 4)])  # 19 classes take no tail: not timed
    monkeypatch.setattr(tune_score, "BACKWARD", [(32, 64, 8, 1), (16, 48, 8, 2)])
    monkeypatch.setattr(tune_score, "QUICK_SHAPES", [(2, 40, 5, 7, 19)])
    assert tune_score.main(["--quick", "--out", str(tmp_path), "--tag", "t"]) == 0
    rows = json.loads((tmp_path / "tune_score_t.json").read_text())["rows"]
    assert [(r["direction"], r["variant"]) for r in rows] == [
        ("forward", "default"), ("backward", "default"), ("forward", "P64 C64 w8"), ("forward", "P64 C48 w8"),
        ("forward", "norms P32 C32 w8"), ("forward", "rows P32 C16 w4"), ("forward", "split-C 2/SM x8"),
        ("backward", "P32 C64 w8 1/SM"), ("backward", "P16 C48 w8 2/SM")]  # fmt: skip
    failed = {r["variant"] for r in rows if "error" in r}
    assert failed == {"P64 C48 w8", "P16 C48 w8 2/SM"}, rows
    assert all(r["rel_err_vs_default"] < 1e-5 for r in rows if "error" not in r)
    assert (score._blocks, score.FUSED_BLOCKS, score.BWD_WARPS, score.FUSED_BLOCKS_NHWC, score.TEXT_NORMS_FROM,
            score.ROWS_FROM, score.ROWS_BLOCKS, score.SPLIT_C_PER_SM, score.MAX_SPLITS,
            score.ROWS_TAIL_K) == before  # fmt: skip
    md = (tmp_path / "tune_score_t.md").read_text()
    assert "P16 C48 w8 2/SM | failed" in md and "| variant | graph | median |" in md
    forward_graphs = [r["graph_ms"] for r in rows if r["direction"] == "forward" and "error" not in r]
    assert forward_graphs == [None] * 5  # a CPU
    monkeypatch.setattr(tune_score, "FORWARD", [])
    assert tune_score.main(["--quick", "--out", str(tmp_path), "--tag", "f", "--directions", "forward"]) == 0
    rows = json.loads((tmp_path / "tune_score_f.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["default", "norms P32 C32 w8", "rows P32 C16 w4", "split-C 2/SM x8"], rows


@pytest.mark.parametrize("text_norms, rows, kernels", [
    (False, False, ["_score_fwd_kernel"]), (True, False, ["_text_norm_kernel", "_score_fwd_kernel"]),
    (True, True, ["_text_norm_kernel", "_score_fwd_rows_kernel"])])  # fmt: skip
def test_score_tuning_variants_launch_what_their_labels_say(monkeypatch, text_norms, rows, kernels):
    """tune_score.forward_blocks: a variant's blocks and plan are the ones launched (spied on the launcher), for the
    default kernel, with the text norms' launch, and the rows kernel (16-bit maps); all back after."""
    import torch

    from benchmarks import tune_score
    from denseclip_fast import ops
    from denseclip_fast.ops import backends

    if backends.triton_available() is not None:
        pytest.skip(backends.triton_available())
    from denseclip_fast.ops.triton import score

    blocks = score.ROWS_BLOCKS
    launched, plans = spy_launches(monkeypatch, score), spy_score_plans(monkeypatch)
    visual = torch.randn(1, 8, 5, 7).to(torch.float16)
    text = torch.randn(40, 8).to(torch.float16)  # 40 classes could take a tail (32 + 16): these variants take none
    with tune_score.forward_blocks(16, 32, 4, text_norms, rows):
        ops.pixel_text_score(visual, text, backend="triton")
    assert launched == kernels
    (plan,) = plans
    assert (plan.constexprs["BLOCK_P"], plan.constexprs["BLOCK_C"], plan.warps) == (16, 32, 4)
    assert (plan.constexprs["BLOCK_K"], plan.constexprs.get("BLOCK_K2", 0)) == (64, 0)
    assert (score.ROWS_FROM, score.TEXT_NORMS_FROM, score.ROWS_BLOCKS) == (None, None, blocks)


def test_score_tuning_tail_variant_launches_the_rows_kernel_with_a_tail(monkeypatch):
    """tune_score's "rows tail" variant: the rows kernel at its blocks with the classes as a block and a tail (40
    classes: 32 + 16), the scores the default's; tune_score.same_as_without says it differs at 40 classes, not at 19;
    the switches back after."""
    import functools

    import torch

    from benchmarks import tune_score
    from denseclip_fast import ops
    from denseclip_fast.ops import backends

    if backends.triton_available() is not None:
        pytest.skip(backends.triton_available())
    from denseclip_fast.ops.triton import score

    visual = torch.randn(1, 8, 5, 7).to(torch.float16)
    text = torch.randn(40, 8).to(torch.float16)
    expected = ops.pixel_text_score(visual, text, backend="triton")
    variant = functools.partial(tune_score.forward_blocks, 16, 32, 4, True, True, True)
    launched, plans = spy_launches(monkeypatch, score), spy_score_plans(monkeypatch)
    with variant():
        out = ops.pixel_text_score(visual, text, backend="triton")
    assert launched == ["_text_norm_kernel", "_score_fwd_rows_kernel"]
    assert (plans[-1].constexprs["BLOCK_K"], plans[-1].constexprs["BLOCK_K2"], plans[-1].warps) == (32, 16, 4)
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
    assert (score.ROWS_TAIL_K, score.ROWS_FROM, score.TEXT_NORMS_FROM) == (False, None, None)
    cpu = torch.device("cpu")
    assert not tune_score.same_as_without(variant, (1, 8, 5, 7, 40), cpu)
    assert tune_score.same_as_without(variant, (1, 8, 5, 7, 19), cpu)


@pytest.mark.parametrize("max_splits", [8, 3])
def test_score_tuning_split_variants_launch_the_splits_tune_score_counts(monkeypatch, max_splits):
    """tune_score.forward_split: the split kernel, in as many splits as tune_score.splits counts for the shape (at
    most max_splits), the scores the default's; the switches back after."""
    import torch

    from benchmarks import tune_score
    from denseclip_fast import ops
    from denseclip_fast.ops import backends

    if backends.triton_available() is not None:
        pytest.skip(backends.triton_available())
    from denseclip_fast.ops.triton import score

    launched, plans = spy_launches(monkeypatch, score), spy_score_plans(monkeypatch)
    visual = torch.randn(1, 64, 5, 7).to(torch.bfloat16)
    text = torch.randn(3, 64).to(torch.bfloat16)
    expected = ops.pixel_text_score(visual, text, backend="triton")
    launched.clear()
    with tune_score.forward_split(2, max_splits):
        out = ops.pixel_text_score(visual, text, backend="triton")
    assert launched == ["_score_fwd_split_kernel"]
    wanted = tune_score.splits((1, 64, 5, 7, 3), 2, max_splits, visual.device)
    assert plans[-1].splits == wanted and 1 < wanted <= max_splits
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    assert (score.SPLIT_C_PER_SM, score.MAX_SPLITS) == (None, 8)


def test_triton_nchw_probe_judges_each_specialisation(tmp_path, monkeypatch):
    """benchmarks/triton_nchw_probe.py under Triton's interpreter (which computes every variant right): the forward
    kernel launched directly on an NCHW map and the backward with the NHWC copy off are judged right; a forward made
    1% off is judged wrong in float16 and not in bfloat16 (its tolerance 2e-2); the copy's switch is back after."""
    from benchmarks import triton_nchw_probe as probe
    from denseclip_fast.ops import backends

    if backends.triton_available() is not None:
        import pytest

        pytest.skip(backends.triton_available())
    from denseclip_fast.ops.triton import score

    before = score.NHWC_ONLY_16BIT
    assert probe.main(["--quick", "--out", str(tmp_path), "--tag", "t"]) == 0
    rows = json.loads((tmp_path / "triton_nchw_probe_t.json").read_text())["rows"]
    kernels = list(probe.KERNELS)
    assert [(r["pass"], r.get("kernel"), r["dtype"]) for r in rows] == [
        *(("forward", kernel, "float16") for kernel in kernels), ("backward", None, "float16"),
        *(("forward", kernel, "bfloat16") for kernel in kernels), ("backward", None, "bfloat16")]  # fmt: skip
    assert not any(r["wrong"] for r in rows) and score.NHWC_ONLY_16BIT == before
    assert (score.ROWS_FROM, score.TEXT_NORMS_FROM) == (None, None)  # each kernel's plan undone
    assert [r.get("repeatable") for r in rows] == [True, True, True, None] * 2
    real = probe.forward
    monkeypatch.setattr(probe, "forward", lambda *a: (real(*a).double() * 1.01).to(a[0].dtype))
    assert probe.main(["--quick", "--out", str(tmp_path), "--tag", "t"]) == 0
    rows = json.loads((tmp_path / "triton_nchw_probe_t.json").read_text())["rows"]
    assert [r["wrong"] for r in rows if r["pass"] == "forward"] == [True] * 3 + [False] * 3
    assert "| forward | rows | NCHW, H x W = 256 | 150 | float16 | launcher's | 1 | 1.0e-02 | yes | WRONG |" in (
        tmp_path / "triton_nchw_probe_t.md").read_text()


def test_host_time_benchmark_measures_every_path_and_restores_the_launcher(tmp_path, monkeypatch):
    """benchmarks/bench_host.py times each host path (no timing is asserted here) with the Triton launches stubbed
    out, and puts the real launcher back."""
    from benchmarks import bench_host
    from denseclip_fast.ops import backends

    if backends.triton_available() is not None:
        import pytest

        pytest.skip(backends.triton_available())
    from denseclip_fast.ops.triton import score

    launch = score.launch
    monkeypatch.setattr(bench_host, "SECONDS", 0.01)
    assert bench_host.main(["--out", str(tmp_path), "--tag", "t"]) == 0
    rows = json.loads((tmp_path / "host_t.json").read_text())["rows"]
    assert [r for r in rows if "error" in r] == []
    paths = {r["path"] for r in rows}
    assert paths >= {"pixel_text_score, eager (Triton)", "autograd.grad through the Triton operator"}
    assert all(r["median_us"] > 0 for r in rows)
    assert score.launch is launch


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_linear_benchmark_times_both_paths_and_restores_the_probe(tmp_path, monkeypatch, dtype):
    """benchmarks/bench_cpu_linear.py times construction, set_classes and logits with the BLAS and with oneDNN (no
    timing is asserted here) in an engine of either dtype, the logits of both agree (within bfloat16's error in a
    bfloat16 engine, whose MLPs' weights are scaled), and the oneDNN probe is the real one afterwards."""
    import torch

    from benchmarks import bench_cpu_linear
    from denseclip_fast import DenseCLIP
    from denseclip_fast.engine import cpu_linear

    from .conftest import randomized, tiny_config

    def tiny(arch: str, names: list[str]) -> DenseCLIP:
        torch.manual_seed(0)
        return randomized(DenseCLIP(tiny_config("vit" if arch.startswith("ViT") else "resnet"), names)).eval()

    probe = cpu_linear.onednn_linear_usable
    monkeypatch.setattr(bench_cpu_linear, "build", tiny)
    # ViT-B-16: the alias, reported by its name
    args = ["--archs", "RN50", "ViT-B-16", "--size", "64", "--repeats", "1", "--out", str(tmp_path), "--tag", "t",
            "--dtype", dtype]  # fmt: skip
    assert bench_cpu_linear.main(args) == 0
    assert cpu_linear.onednn_linear_usable is probe
    if not probe():
        return  # nothing compared, nothing written
    rows = json.loads((tmp_path / "cpu_linear_t.json").read_text())["rows"]
    assert {(r["arch"], r["what"], r["path"]) for r in rows} == {
        (arch, what, path) for arch in ("RN50", "ViT-B/16") for what in ("Segmenter(...)", "set_classes(150)", "logits")
        for path in ("blas", "onednn")
    }  # fmt: skip
    errors = [r["rel_error_vs_blas"] for r in rows if r["rel_error_vs_blas"] is not None]
    assert len(errors) == 2 and all(e < (1e-5 if dtype == "float32" else 2e-2) for e in errors)
    assert {r["dtype"] for r in rows} == {dtype}
    text = (tmp_path / "cpu_linear_t.md").read_text()
    assert "| ViT-B/16 | 64 | logits |" in text and f"; {dtype}, 150 classes" in text


def test_text_benchmark_times_both_paths_and_compares_them(tmp_path, monkeypatch):
    """benchmarks/bench_text.py times the shared start and the whole prompts on each vocabulary and mode (no timing
    asserted here), and their embeddings and gradients agree."""
    from benchmarks import bench_text
    from denseclip_fast import ADE20K_CLASSES, DenseCLIP

    from .conftest import randomized, tiny_config

    monkeypatch.setattr(bench_text.dcf.DenseCLIP, "from_arch", lambda arch: DenseCLIP(tiny_config(), ADE20K_CLASSES))
    monkeypatch.setattr(bench_text, "randomize_", randomized)
    assert bench_text.main(["--repeats", "1", "--out", str(tmp_path), "--tag", "t"]) == 0
    rows = json.loads((tmp_path / "text_encoder_t.json").read_text())["rows"]
    assert [(r["vocabulary"], r["classes"], r["span"], r["mode"]) for r in rows] == [
        ("ade20k", 150, 5, "embed"), ("ade20k", 150, 5, "train"), ("one-token", 119, 3, "embed"),
        ("one-token", 119, 3, "train"),
    ]  # fmt: skip
    assert all(r["rel_error"] < 1e-5 and r["whole_median_ms"] > 0 < r["shared_median_ms"] for r in rows)
    assert [r["grad_rel_error"] is None for r in rows] == [True, False, True, False]
    assert all(r["grad_rel_error"] < 1e-4 for r in rows if r["grad_rel_error"] is not None)
    assert "| cpu | float32 | one-token | 119 | 3 | train |" in (tmp_path / "text_encoder_t.md").read_text()


def test_text_benchmark_onnx_mode_compares_the_exported_graphs(tmp_path, monkeypatch):
    """--modes onnx times the ONNX text graph as to_onnx writes it against the same graph exported with every prompt
    whole, in ONNX Runtime; both give the class embeddings (error between them small)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from benchmarks import bench_text
    from denseclip_fast import ADE20K_CLASSES, DenseCLIP

    from .conftest import randomized, tiny_config

    monkeypatch.setattr(bench_text.dcf.DenseCLIP, "from_arch", lambda arch: DenseCLIP(tiny_config(), ADE20K_CLASSES))
    monkeypatch.setattr(bench_text, "randomize_", randomized)
    args = ["--modes", "onnx", "--vocabularies", "one-token", "--repeats", "1", "--out", str(tmp_path), "--tag", "t"]
    assert bench_text.main(args) == 0
    data = json.loads((tmp_path / "text_encoder_t.json").read_text())
    (row,) = data["rows"]
    assert (row["device"], row["classes"], row["span"], row["mode"]) == ("cpu (onnxruntime)", 119, 5, "onnx")
    assert row["rel_error"] < 1e-5 and row["whole_median_ms"] > 0 < row["shared_median_ms"]
    assert data["environment"]["onnxruntime"]
    table = (tmp_path / "text_encoder_t.md").read_text()
    assert "| cpu (onnxruntime) | float32 | one-token | 119 | 5 | onnx |" in table and "onnxruntime 1." in table


def test_label_benchmark_times_each_contestant_and_checks_their_labels(tmp_path, monkeypatch):
    """benchmarks/bench_labels.py times labels() against the argmax and the chunking before it on small cases made
    to take several chunks (no timing asserted); a contestant whose labels differ fails the run."""
    from benchmarks import bench_labels
    from denseclip_fast.engine import segmenter

    # "fused": a size whose sides add up past cpu_labels.MIN_SIDES, which labels resizes and reduces in one pass
    cases = {"small": ((9, 11), (37, 45)), "wide": ((5, 17), (20, 70)), "fused": ((6, 7), (140, 130))}
    monkeypatch.setattr(bench_labels, "CASES", cases)
    monkeypatch.setattr(bench_labels, "CHUNK_BEFORE", 3 * 37 * 45)
    monkeypatch.setattr(segmenter, "LABEL_CACHED", 4 * 37 * 45)
    monkeypatch.setattr(segmenter, "LABEL_CLASSES", 2)
    args = ["--classes", "10", "--repeats", "1", "--out", str(tmp_path), "--tag", "t"]
    assert bench_labels.main(args) == 0
    rows = json.loads((tmp_path / "labels_t.json").read_text())["rows"]
    assert [(r["case"], r["scores"], r["size"]) for r in rows] == [
        ("small", [1, 10, 9, 11], [37, 45]), ("wide", [1, 10, 5, 17], [20, 70]), ("fused", [1, 10, 6, 7], [140, 130])
    ]  # fmt: skip
    assert all(r[f"{n}_median_ms"] > 0 for r in rows for n in bench_labels.CONTESTANTS)
    assert "| small | 1x10x9x11 | 37x45 |" in (tmp_path / "labels_t.md").read_text()
    monkeypatch.setitem(bench_labels.CONTESTANTS, "labels", lambda s, size: segmenter.labels(s, size).flip(-1))
    with pytest.raises(AssertionError, match=r"labels's labels differ from the argmax's \(small\)"):
        bench_labels.main(args)


def test_logits_resize_benchmark_times_both_and_checks_their_values(tmp_path, monkeypatch):
    """benchmarks/bench_logits_resize.py times F.interpolate's per-plane resizes against the extension's kernel on
    small cases (one resize, a chain; no timing asserted); a kernel whose values differ fails the run, and a case
    the kernel does not serve is named."""
    from benchmarks import bench_logits_resize
    from denseclip_fast.engine import cpu_labels

    if not cpu_labels.fused_labels_usable():
        pytest.skip("the extension's resize kernel does not serve this torch or CPU")
    cases = {"one": ((9, 11), ((137, 145),)), "chain": ((5, 17), ((120, 170), (200, 90)))}
    monkeypatch.setattr(bench_logits_resize, "CASES", cases)
    args = ["--classes", "3", "--repeats", "1", "--out", str(tmp_path), "--tag", "t"]
    assert bench_logits_resize.main(args) == 0
    rows = json.loads((tmp_path / "logits_resize_t.json").read_text())["rows"]
    assert [(r["case"], r["scores"], r["sizes"]) for r in rows] == [
        ("one", [1, 3, 9, 11], [[137, 145]]), ("chain", [1, 3, 5, 17], [[120, 170], [200, 90]])]  # fmt: skip
    assert all(r[f"{n}_median_ms"] > 0 for r in rows for n in bench_logits_resize.CONTESTANTS)
    assert "| chain | 1x3x5x17 | 120x170 -> 200x90 |" in (tmp_path / "logits_resize_t.md").read_text()
    monkeypatch.setattr(bench_logits_resize, "kernel", lambda s, sizes: cpu_labels.resize(s, sizes).flip(-1))
    with pytest.raises(AssertionError, match=r"the kernel's resize differs from F.interpolate's \(one\)"):
        bench_logits_resize.main(args)
    monkeypatch.setattr(bench_logits_resize, "CASES", {"tiny": ((9, 11), ((37, 45),))})
    with pytest.raises(SystemExit, match="does not serve tiny"):
        bench_logits_resize.main(args)


def test_predict_benchmark_times_logits_and_predict_on_images(tmp_path, monkeypatch, capsys):
    """benchmarks/bench_predict.py runs logits and predict on uint8 images and a float batch per dtype (no timing
    asserted), records the process's memory and allocator policy, and fails a run whose labels are not the logits'
    argmax."""
    from benchmarks import bench_predict
    from denseclip_fast import ADE20K_CLASSES, DenseCLIP, Segmenter
    from denseclip_fast.engine import host_memory

    from .conftest import randomized, tiny_config

    monkeypatch.setattr(bench_predict.dcf.DenseCLIP, "from_arch", lambda arch: DenseCLIP(tiny_config(), ADE20K_CLASSES))
    monkeypatch.setattr(bench_predict, "randomize_", randomized)
    monkeypatch.setattr(bench_predict, "INPUTS", {"ade": (64, 85), "photo": (96, 128), "float": (64, 64)})
    args = ["--repeats", "1", "--out", str(tmp_path), "--tag", "t"]
    assert bench_predict.main([*args, "--modes", "whole", "slide"]) == 0
    rows = json.loads((tmp_path / "predict_t.json").read_text())["rows"]
    assert [(r["dtype"], r["mode"], r["input"]) for r in rows] == [
        (d, m, i) for d in ("float32", "bfloat16") for m in ("whole", "slide") for i in ("ade", "photo", "float")
    ]  # fmt: skip
    assert all(r[f"{c}_median_ms"] > 0 for r in rows for c in bench_predict.CALLS)
    assert all(0 < r["rss_gib"] <= r["peak_rss_gib"] for r in rows)
    assert "| RN50 | bfloat16 | slide | photo | 128x96 |" in (tmp_path / "predict_t.md").read_text()
    # --retain-memory, with retain_freed_memory stood in for (the real one would stay in effect in this process)
    monkeypatch.setattr(host_memory, "allocator_chosen", lambda: "MALLOC_MMAP_MAX_")
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: False)
    with pytest.raises(SystemExit):
        bench_predict.main([*args, "--retain-memory"])
    assert "--retain-memory: not in effect here (chosen: MALLOC_MMAP_MAX_)" in capsys.readouterr().err
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: monkeypatch.setattr(host_memory, "_retained", True)
                        or True)  # fmt: skip
    assert bench_predict.main([*args, "--retain-memory", "--dtypes", "float32", "--inputs", "ade"]) == 0
    assert "; host memory retained." in (tmp_path / "predict_t.md").read_text()
    monkeypatch.setattr(Segmenter, "predict", lambda self, images: self.logits(images).argmin(dim=1))
    with pytest.raises(AssertionError, match="RN50 float32 ade: predict's labels differ from the logits' argmax"):
        bench_predict.main([*args, "--dtypes", "float32", "--inputs", "ade"])


def test_upstream_parity_names_a_missing_checkout(tmp_path, capsys):
    """benchmarks/upstream_parity.py needs a checkout of raoyongming/DenseCLIP (which CI does not have, so the check
    itself is not run here): a directory without segmentation/denseclip/models.py, or no directory at all, exits 2
    with one line naming --upstream and what it expected, before anything is built or written."""
    from benchmarks import upstream_parity

    (tmp_path / "segmentation" / "configs").mkdir(parents=True)
    out = tmp_path / "out"
    for upstream in (tmp_path, tmp_path / "nowhere"):
        assert upstream_parity.main(["--upstream", str(upstream), "--archs", "RN50", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("upstream_parity.py: error: --upstream ")
        assert "raoyongming/DenseCLIP" in err and "segmentation/denseclip/models.py" in err
    (tmp_path / "segmentation" / "denseclip").mkdir()
    (tmp_path / "segmentation" / "denseclip" / "models.py").write_text("")  # the rest of the checkout missing
    assert upstream_parity.main(["--upstream", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--upstream" in err and "bpe_simple_vocab_16e6.txt.gz" in err
    assert not out.exists()


def test_weighed_score_channels_make_the_logits_see_the_text_path():
    """The benchmarks' fidelity figures compare logits; with random weights the score channels barely reach them,
    so weigh_score_channels_ scales their FPN weights. After it, zeroing gamma (dropping the context decoder's
    contribution to the class embeddings) moves the logits at least 10x more than before, for the oracle and for
    denseclip_fast's model, which get the same gain from the same weights."""
    import torch

    import denseclip_fast as dcf
    from benchmarks.official import OfficialDenseCLIP, randomize_, weigh_score_channels_

    from .conftest import NAMES, official_cfg, rel_err, tiny_config

    def text_sensitivity(model: torch.nn.Module, x: torch.Tensor) -> float:
        with torch.no_grad():
            reference, gamma = model(x), model.gamma.clone()
            model.gamma.zero_()
            moved = model(x)
            model.gamma.copy_(gamma)
        return rel_err(moved, reference)

    x = torch.randn(1, 3, 64, 64)
    for kind in ("resnet", "vit"):
        official = randomize_(OfficialDenseCLIP(official_cfg(tiny_config(kind)), NAMES)).eval()
        ours = dcf.DenseCLIP(tiny_config(kind), NAMES).eval()
        ours.load_state_dict(official.state_dict())
        before = text_sensitivity(official, x)
        gain = weigh_score_channels_(official, size=64)
        assert gain > 10 and text_sensitivity(official, x) > 10 * before, (kind, gain, before)
        assert abs(weigh_score_channels_(ours, size=64) / gain - 1) < 1e-4
        torch.testing.assert_close(ours.state_dict(), official.state_dict())  # the same weights, weighed alike


def test_startup_benchmark_times_each_stage_in_fresh_processes(tmp_path, monkeypatch):
    """benchmarks/bench_startup.py writes a checkpoint per format and times a fresh process's stages up to the first
    logits (no timing is asserted here); the child processes use this checkout's package."""
    from benchmarks import bench_startup
    from denseclip_fast import ADE20K_CLASSES, DenseCLIP

    from .conftest import randomized, tiny_config

    monkeypatch.setattr(bench_startup, "build", lambda arch: randomized(DenseCLIP(tiny_config(), ADE20K_CLASSES)))
    args = ["--formats", "pth", "safetensors", "--size", "64", "--repeats", "1", "--out", str(tmp_path), "--tag", "t"]
    assert bench_startup.main(args) == 0
    rows = json.loads((tmp_path / "startup_t.json").read_text())["rows"]
    assert [(r["arch"], r["format"], r["processes"]) for r in rows] == [("RN50", "pth", 1), ("RN50", "safetensors", 1)]
    for r in rows:
        assert list(r["stages_s"]) == list(bench_startup.STAGES) and all(s > 0 for s in r["stages_s"].values())
        assert abs(sum(r["stages_s"].values()) - r["total_s"]) < 1e-9 and r["process_wall_s"][0] >= r["total_s"]
        peaks = list(r["samples_peak_mib"][0].values())
        assert list(r["samples_peak_mib"][0]) == list(bench_startup.STAGES) and peaks == sorted(peaks) and peaks[0] > 10
        assert r["peak_mib"] == {s: r["samples_peak_mib"][0][s] for s in bench_startup.PEAKS}
    assert "| RN50 | safetensors | cpu, float32 | 64x64 |" in (tmp_path / "startup_t.md").read_text()


def test_checkpoint_read_benchmark_times_each_stage_of_each_format(tmp_path, monkeypatch):
    """benchmarks/bench_checkpoint_read.py writes a checkpoint per format and times read_weight_file's stages (the
    zip file's index and CRC-32s for a zip file only), the whole read, load_checkpoint and a bare torch.load (no
    timing is asserted here); it times the CPU alone."""
    from benchmarks import bench_checkpoint_read
    from denseclip_fast import ADE20K_CLASSES, DenseCLIP

    from .conftest import randomized, tiny_config

    tiny = randomized(DenseCLIP(tiny_config(), ADE20K_CLASSES))
    monkeypatch.setattr(bench_checkpoint_read, "build", lambda arch: tiny)
    args = ["--formats", "zip", "legacy", "--repeats", "2", "--out", str(tmp_path), "--tag", "t"]
    assert bench_checkpoint_read.main(args) == 0
    rows = json.loads((tmp_path / "checkpoint_read_t.json").read_text())["rows"]
    assert [(r["arch"], r["format"], r["rounds"]) for r in rows] == [("RN50", "zip", 2), ("RN50", "legacy", 2)]
    for r in rows:
        timed = [stage for stage, formats in bench_checkpoint_read.STAGES if r["format"] in formats]
        for name in [*timed, *bench_checkpoint_read.WHOLE]:
            assert len(r["samples_ms"][name]) == 2 and r[f"{name}_median_ms"] > 0, name
        assert set(r["samples_ms"]) == {*timed, *bench_checkpoint_read.WHOLE}
    text = (tmp_path / "checkpoint_read_t.md").read_text()
    assert "| RN50 | zip |" in text and "| RN50 | legacy |" in text and " | - | - | " in text
    with pytest.raises(SystemExit):
        bench_checkpoint_read.main(["--device", "cuda", "--out", str(tmp_path)])


def test_crc_benchmark_times_both_crcs_and_compares_them(tmp_path, monkeypatch):
    """benchmarks/bench_crc.py times zlib's CRC-32 and the extension's on each buffer size (no timing asserted), a
    small buffer checksummed again and again in a timed call; a round whose two CRCs differ fails the run; it times
    the CPU alone."""
    from benchmarks import bench_crc
    from denseclip_fast.ops.extension import extension_module

    if extension_module() is None:
        pytest.skip("the extension is not built")
    monkeypatch.setattr(bench_crc, "PER_CALL", 1 << 16)
    assert bench_crc.main(["--sizes", "100", "70000", "--repeats", "2", "--out", str(tmp_path), "--tag", "t"]) == 0
    rows = json.loads((tmp_path / "crc_t.json").read_text())["rows"]
    assert [(r["bytes"], r["calls_a_round"], r["rounds"]) for r in rows] == [(100, 655, 2), (70000, 1, 2)]
    for r in rows:
        assert all(len(r["samples_ms"][name]) == 2 and r[f"{name}_gbs"] > 0 for name in bench_crc.CONTESTANTS)
    assert "| 100 | 655 |" in (tmp_path / "crc_t.md").read_text()
    wrong = type("Wrong", (), {"crc32": staticmethod(lambda data: 0), "CRC32_CLMUL": 1})
    monkeypatch.setattr(bench_crc, "extension_module", lambda: wrong)
    with pytest.raises(AssertionError, match="the CRC-32s of 100 bytes differ"):
        bench_crc.main(["--sizes", "100", "--repeats", "1", "--out", str(tmp_path), "--tag", "t"])
    with pytest.raises(SystemExit):
        bench_crc.main(["--device", "cuda", "--out", str(tmp_path)])


def test_bench_pyramid_times_each_case_with_the_engines_code(tmp_path, monkeypatch):
    """benchmarks/bench_pyramid.py's CPU smoke run (small shapes, the rewrites given the CPU; one timing a call):
    every case's contestants give the same result within bfloat16's rounding, the engine's rows run the rewrites'
    own computation (no native_group_norm, no convolution), none failed, the markdown says them; the device lists
    it set are given back by the test."""
    import torch

    from benchmarks import bench_pyramid
    from denseclip_fast.engine import cuda_convt, cuda_group_norm

    monkeypatch.setattr(cuda_convt, "GEMM_CONVT_DEVICES", cuda_convt.GEMM_CONVT_DEVICES)
    monkeypatch.setattr(cuda_group_norm, "GROUP_NORM_DEVICES", cuda_group_norm.GROUP_NORM_DEVICES)
    outputs, ops = [], []

    def timed(fn, device):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            outputs.append(fn().float().clone())
        ops.append({event.name for event in prof.events()})
        return 1.0, 1.0, 1.0

    monkeypatch.setattr(bench_pyramid, "_time", timed)
    assert bench_pyramid.main(["--out", str(tmp_path), "--tag", "t", "--batches", "2"]) == 0
    rows = json.loads((tmp_path / "pyramid_t.json").read_text())["rows"]
    assert [r["case"][:9] for r in rows] == ["GroupNorm"] * 2 + ["ConvTrans"] * 8 + ["fpn1 (Gro"] * 2
    assert not any("error" in r for r in rows) and all(r["bytes"] > 0 for r in rows)
    assert all((r["flops"] > 0) is r["case"].startswith(("ConvTranspose2d", "fpn1")) for r in rows)
    for r, names in zip(rows, ops):
        engine = "cuda_" in r["contestant"]
        assert ("aten::native_group_norm" in names) is (r["case"].startswith(("GroupNorm", "fpn1")) and not engine)
        assert any("convolution" in n for n in names) is (not engine and not r["case"].startswith("GroupNorm"))
    for case in dict.fromkeys(r["case"] for r in rows):
        results = [out for r, out in zip(rows, outputs) if r["case"] == case]
        assert all(torch.allclose(out, results[0], rtol=2e-2, atol=2e-2) for out in results[1:])
    md = (tmp_path / "pyramid_t.md").read_text()
    assert "| GEMM, NCHW input (cuda_convt) |" in md and "| whole-map statistics (cuda_group_norm) |" in md


def test_bench_resample_times_each_case_against_aten(tmp_path, monkeypatch):
    """benchmarks/bench_resample.py's CPU smoke run (tiny shapes, Triton's interpreter; one timing a call): every case
    has its ATen row and its Triton rows, none failed, the markdown says them; the Triton rows' results equal ATen's
    (what is timed is the kernel the engine runs, not another)."""
    import torch

    from benchmarks import bench_resample

    outputs: list[torch.Tensor] = []  # what each timed call returned, in the rows' order (a copy: the 'into a
    # buffer' contestants write one tensor); the interpreter's calls are slow, so they are checked, not made again

    def timed(fn, device):
        outputs.append(fn().float().clone())
        return 1.0, 1.0, 1.0

    monkeypatch.setattr(bench_resample, "_time", timed)
    assert bench_resample.main(["--out", str(tmp_path), "--tag", "t", "--batches", "1"]) == 0
    rows = json.loads((tmp_path / "resample_t.json").read_text())["rows"]
    assert len(outputs) == len(rows)
    assert [r["case"] for r in rows] == ["logits resize"] * 9 + ["predict's labels (resize, argmax)"] * 4 + [
        "loss resize gradient"] * 3 + [
        "loss cross-entropy, forward and backward"] * 3 + [
        "loss resize and cross-entropy, forward and backward"] * 3 + [
        "FPN 2x upsampling"] * 2 + [
        "average pooling 2x2"] * 2 + ["FPN top-down step"] * 2 + ["FPN head sum"] * 3  # fmt: skip
    assert not any("error" in r for r in rows) and all(r["bytes"] > 0 for r in rows)
    md = (tmp_path / "resample_t.md").read_text()
    assert "| FPN top-down step |" in md and "| FPN head sum |" in md
    assert "| triton into a buffer, 4 rows x 4 ch x 64 col, 8 warps |" in md
    for case, _, _, fns in bench_resample.cases(1, torch.device("cpu"), small=True):
        if case == "FPN top-down step":
            continue  # in place: each call adds again (the head sum's fused row is its last, so it is checked)
        results = [out for row, out in zip(rows, outputs)
                   if row["case"] == case and not row["contestant"].startswith("write floor")]  # fmt: skip
        assert len(results) == len(fns) - (case == "logits resize")
        assert all(torch.allclose(r.reshape(results[0].shape), results[0], rtol=2e-2, atol=2e-2) for r in results)
        if case.startswith("predict's labels"):  # the same labels, exactly
            assert all(torch.equal(r, results[0]) for r in results)


def test_e2e_contestant_with_logits_of_another_shape_is_a_failed_row(tmp_path, monkeypatch):
    """A contestant whose logits differ in shape from the official ones (another class count or size) is a failed
    row with rel_err's reason, and the contestants after it are still measured (it raised out of run())."""
    import torch

    import denseclip_fast as dcf

    class Official:
        def to(self, device):
            return self

    model = argparse.Namespace(config=dcf.preset("RN50"))
    monkeypatch.setattr(bench_e2e, "build", lambda arch, classes, device: (model, Official()))
    monkeypatch.setattr(bench_e2e, "text_encoder_flops", lambda official, device: 1.0)
    monkeypatch.setattr(bench_e2e, "count_flops", lambda *args: 2.0)
    monkeypatch.setattr(bench_e2e, "official_fp32", lambda official, x, *args: torch.ones(x.shape[0], 3, *x.shape[2:]))
    monkeypatch.setattr(bench_e2e, "release", lambda device: None)

    def measured(name, args, model, official, device, mode, crop, stride, x):
        classes = 2 if name == "engine-fp32" else 3  # one contestant computes fewer classes
        return {"p50_ms": 1.0, "logits": torch.ones(x.shape[0], classes, *x.shape[2:])}

    monkeypatch.setattr(bench_e2e, "measure_contestant", measured)
    args = argparse.Namespace(archs=["RN50"], modes=["whole"], batches=[1], size=32, slide_height=32, classes=3,
                              contestants=["engine-fp32", "official"], profile=[], repeats=1)  # fmt: skip
    env = {"gpu": False, "device": "cpu", "tf32": {"cudnn_conv": "tf32", "cuda_matmul": "ieee"}}
    results = Results(str(tmp_path), "e2e", "t", env, {}, lambda env, rows: "")
    bench_e2e.run(args, torch.device("cpu"), results)
    failed, official = results.rows
    assert failed["contestant"] == "engine-fp32" and "differ in shape" in failed["error"]
    assert "p50_ms" not in failed
    assert official["contestant"] == "official" and official["rel_error_vs_official"] == 0.0


def test_e2e_rows_report_each_contestants_construction_beside_its_first_call(monkeypatch):
    """A Segmenter does its one-off work (weight rewrites, class embeddings) when it is built, before its first call;
    torch.compile when first called: build_s is reported beside first_call_s, so that the two are compared whole."""
    import time

    import torch

    def built_slowly(*args, **kwargs):
        time.sleep(0.2)
        return lambda x: x + 1

    monkeypatch.setattr(bench_e2e, "contestant", built_slowly)
    args = argparse.Namespace(repeats=1)
    row = bench_e2e.measure_contestant("engine-bf16", args, None, None, torch.device("cpu"), "whole", 512, 341,
                                       torch.zeros(1))  # fmt: skip
    assert row["build_s"] >= 0.2 > row["first_call_s"]
    row.update(arch="RN50", mode="whole", shape=[1, 3, 64, 64], contestant="engine-bf16", precision="bf16",
               images_per_s=1.0, rel_error_vs_official=0.0, image_path_fraction_of_peak=0.0)  # fmt: skip
    env = {"gpu": False, "device": "cpu", "date": "d", "torch": "t", "triton": "t", "threads": 2}
    assert f"| {row['first_call_s']:.1f} (+{row['build_s']:.1f} build) |" in bench_e2e.table(env, [row], 150)


def test_operator_backward_that_fails_keeps_the_forwards_row(monkeypatch):
    """A contestant whose backward raises (out of memory, no derivative) keeps its measured forward row; the
    backward is listed as not measured, by pass."""
    import torch

    monkeypatch.setattr(bench_ops, "NOT_MEASURED", [])
    visual, text = torch.randn(1, 4, 2, 2), torch.randn(3, 4)
    one = bench_ops._timed("pixel_text_score", "B1 C4 2x2 K3", torch.float32, (visual, text), torch.device("cpu"),
                           True, (1.0, 1.0), (1.0, 1.0))  # fmt: skip
    rows = one("no backward", lambda v, t: torch.einsum("bchw,kc->bkhw", v, t).detach())
    assert [(r.contestant, r.direction) for r in rows] == [("no backward", "forward")]
    assert [m["what"] for m in bench_ops.NOT_MEASURED] == ["no backward backward on B1 C4 2x2 K3"]
    both = one("eager", lambda v, t: torch.einsum("bchw,kc->bkhw", v, t))
    assert [r.direction for r in both] == ["forward", "backward"] and len(bench_ops.NOT_MEASURED) == 1
