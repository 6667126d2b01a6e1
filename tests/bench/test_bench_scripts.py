"""The op-level benchmark scripts run end to end on tiny shapes (behaviour only, no timing claims).

``bench_ops.py`` runs with every backend of the device, Triton included (the interpreter on the CPU,
compiled kernels on CUDA), so the variants a GPU session will time have all run once here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark_script


def tiny_ops_args(device, out: Path) -> list[str]:
    args = ["--sizes", "96", "--width", "64", "--heads", "2", "--warmup", "0", "--repeats", "1"]
    args += ["--dtype", "fp16", "--device", device.type, "--out", str(out)]
    return args + (["--triton-interpreter"] if device.type == "cpu" else [])


def test_bench_ops_times_every_variant_after_its_check(triton_backends, tmp_path):
    bench_ops = load_benchmark_script("bench_ops")
    assert bench_ops.main(tiny_ops_args(triton_backends, tmp_path)) == 0
    report = json.loads((tmp_path / "bench_ops.json").read_text())
    variants = {row["variant"] for row in report["results"]}
    expected = {"cdist_topk", "knn_triton", "ngr_restore_triton", "ngr_restore_torch"}
    expected |= {f"{kind}_triton" for kind in ("kept", "full_then_discard", "kept_rotary", "full_rotary_then_discard")}
    assert expected <= variants
    assert report["check_failures"] == [] and report["errors"] == []
    assert all(row["median_ms"] > 0 for row in report["results"])
    for suffix in (".csv", ".md", "_knn.png", "_attention.png", "_restore.png"):
        assert (tmp_path / f"bench_ops{suffix}").is_file()


def test_bench_ops_host_overhead_records_every_part(tmp_path):
    bench_ops = load_benchmark_script("bench_ops")
    baseline = tmp_path / "baseline"
    tiny = ["--mode", "host-overhead", "--device", "cpu", "--calls", "2", "--host-repeats", "2", "--warmup", "1"]
    tiny += ["--tower-depth", "6", "--as-layers", "2", "--tower-width", "16"]
    assert bench_ops.main([*tiny, "--out", str(baseline), "--label", "before"]) == 0
    assert bench_ops.main([*tiny, "--out", str(tmp_path), "--baseline", str(baseline / "host_overhead_cpu.json")]) == 0
    report = json.loads((tmp_path / "host_overhead_cpu.json").read_text())
    assert {row["op"] for row in report["op_layer"]} == {"ngr_attention", "knn", "plan", "ngr_restore"}
    blocks = {row["block"] for row in report["tower"]["blocks"]}
    assert blocks == {"plan + stabilisation (block P)", "stabilisation", "pruned", "last (restored output)"}
    assert report["tower"]["host_reads_per_patched_forward"] > 0
    assert report["baseline"]["label"] == "before"
    markdown = (tmp_path / "host_overhead_cpu.md").read_text()
    assert "## before" in markdown and "## this checkout" in markdown


def test_bench_ops_failure_modes(triton_backends, tmp_path, monkeypatch):
    bench_ops = load_benchmark_script("bench_ops")

    def failing_check(*args, **kwargs):
        raise AssertionError("outputs differ")

    def failing_case(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bench_ops, "assert_close_to_reference", failing_check)
    with pytest.raises(AssertionError, match="outputs differ"):
        bench_ops.main(tiny_ops_args(triton_backends, tmp_path))

    # warn: every variant is still timed, each failure is listed; --keep-going: a case that raises
    # becomes an error row and the others still run. Either makes the exit status 1.
    monkeypatch.setattr(bench_ops, "restore_case", failing_case)
    argv = [*tiny_ops_args(triton_backends, tmp_path), "--on-check-failure", "warn", "--keep-going"]
    assert bench_ops.main(argv) == 1
    report = json.loads((tmp_path / "bench_ops.json").read_text())
    assert {row["group"] for row in report["results"]} == {"knn", "attention"}
    assert len(report["check_failures"]) == len(report["results"])
    assert report["errors"] == [{"group": "restore", "tokens": 96, "error": "RuntimeError: out of memory"}]
    assert "FAILED: knn_triton (n=96): outputs differ" in (tmp_path / "bench_ops.md").read_text()


def test_bench_plan_runs_on_tiny_batches(tmp_path, monkeypatch):
    bench_plan = load_benchmark_script("bench_plan")
    from ipcv_kernels.ops import cpp_backend

    if cpp_backend.UNAVAILABLE_REASON is not None:
        pytest.skip(cpp_backend.UNAVAILABLE_REASON)
    # No --out: the results go under the current directory, never into benchmarks/results.
    monkeypatch.chdir(tmp_path)
    argv = ["--batches", "2x40", "--knn-tokens", "300", "--width", "32", "--warmup", "0", "--repeats", "1"]
    argv += ["--knn-repeats", "1"]
    assert bench_plan.main(argv) == 0
    report = json.loads((tmp_path / "ipcv_results" / "plan" / "plan_cpu.json").read_text())
    assert [row["case"] for row in report["rows"]] == ["plan", "knn"]


@pytest.mark.parametrize(("name", "folder"), [("bench_ops", "ops"), ("bench_plan", "plan")])
def test_default_output_is_relative_to_the_current_directory(name, folder):
    assert load_benchmark_script(name).parse_args([]).out == Path("ipcv_results") / folder
