"""The targets runner: each target read from the right run and compared the right way, on a real CPU server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import kernel_attention, serving, targets
from benchmarks.targets import GROUPS, Call, Group, Measure, Target


def _labels(call: Call) -> set[str]:
    """The run labels a call's record will hold, read from its argv the way the benchmarks parse it."""
    argv = list(call.argv)
    if call.benchmark == "attention":
        return {f"{call.name}/decode"}
    if call.benchmark == "serving":
        modes = argv[argv.index("--structured-output") + 1] if "--structured-output" in argv else "none"
        return {f"{call.name}/{mode}" for mode in modes.split(",")}
    backends = argv[argv.index("--hf-backends") + 1] if "--hf-backends" in argv else "hf-generate,hf-generate-batch"
    return {f"{call.name}/{name}" for name in ["pagedserve", *backends.split(",")] if name}


@pytest.mark.parametrize("name", list(GROUPS))
def test_every_target_reads_a_run_its_group_makes(name: str) -> None:
    group = GROUPS[name]
    labels = set().union(*(_labels(call) for call in group.calls))
    assert len({call.name for call in group.calls}) == len(group.calls)
    for target in group.targets:
        assert target.value.run in labels
        assert target.over is None or target.over.run in labels


def test_a_limit_is_met_on_its_side_only_and_a_ratio_divides_two_runs() -> None:
    runs = {"a/none": {"median_tpot_ms": 4.0}, "a/schema": {"median_tpot_ms": 5.0}}
    at_most = Target(18, "ratio", Measure("a/schema", "median_tpot_ms"), 1.10, at_most=True,
                     over=Measure("a/none", "median_tpot_ms"))
    at_least = Target(17, "tpot", Measure("a/none", "median_tpot_ms"), 4.5, at_most=False)

    assert at_most.measured(runs) == 1.25 and not at_most.is_met(1.25) and at_most.is_met(1.10)
    assert at_least.measured(runs) == 4.0 and not at_least.is_met(4.0) and at_least.is_met(4.5)


def test_runs_are_labelled_by_mode_for_serving_and_by_backend_for_throughput() -> None:
    served = {"runs": [{"structured_output": "none"}, {"structured_output": "schema"}]}
    offline = {"backends": [{"backend": "pagedserve"}, {"backend": "hf-generate-batch"}]}

    assert list(targets.labelled_runs(Call("bf16", "serving", ()), served)) == ["bf16/none", "bf16/schema"]
    assert list(targets.labelled_runs(Call("o", "throughput", ()), offline)) == ["o/pagedserve", "o/hf-generate-batch"]


def test_an_attention_record_gives_each_decode_launch_as_a_share_of_its_ceiling_and_the_least_at_scale() -> None:
    def launch(shape: str, batch: int, context: int, gbps: float) -> dict[str, object]:
        return {"shape": shape, "batch": batch, "context": context, "paged_gbps": gbps}

    record = {"ceiling": {"sum_read_gbps": 4000.0, "copy_read_write_gbps": 3800.0}, "decode": [
        launch("1b", 1, 8192, 400.0), launch("1b", 16, 512, 1000.0), launch("1b", 16, 2048, 3400.0),
        launch("8b", 256, 8192, 3800.0), launch("8b", 64, 2048, 3000.0)]}

    shares = targets.labelled_runs(Call("fp8", "attention", ()), record)["fp8/decode"]

    assert shares["1b 16x2048 % of ceiling"] == 85.0
    assert shares["1b 1x8192 % of ceiling"] == 10.0
    # batch 1 and context 512 are below the scale the FP8 target names; 3,000 of 4,000 GB/s is the least above it.
    assert shares[targets.LEAST_AT_SCALE] == 75.0


def test_the_group_runner_reads_the_record_the_attention_benchmark_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta = {"commit": "abc", "device": "a GPU", "command": "kernel_attention", "date": "2026-12-06",
            "kv_cache_dtype": "fp8", "repeats": 20, "graph_launch_us": 2.0, "host_us_per_decode_call": 30.0}
    launch = kernel_attention.DecodeResult("llama-3.2-1b", 16, 2048, bytes_moved=34_000_000, launches=8,
                                           paged_us=10.0, sdpa_us=20.0, gather_sdpa_us=30.0, paged_single_us=12.0,
                                           sdpa_single_us=22.0)

    def benchmark(argv: list[str]) -> dict[str, object]:
        folder = Path(argv[argv.index("--result-dir") + 1])
        ceiling = {"sum_read_gbps": 4000.0, "copy_read_write_gbps": 3800.0}
        return kernel_attention.write_reports(folder, meta, ceiling, [launch], [])[1]

    monkeypatch.setitem(targets.BENCHMARKS, "attention", benchmark)
    group = Group((Call("fp8", "attention", ()),), (
        Target(21, "least", Measure("fp8/decode", targets.LEAST_AT_SCALE), 80.0, at_most=False),))

    records, rows = targets.run_group("attention", group, tmp_path)

    assert records[0]["metadata"] == meta
    assert rows[0]["measured"] == pytest.approx(85.0)  # 34 MB in 10 us: 3,400 of 4,000 GB/s
    assert rows[0]["met"] is True


def test_the_attention_targets_name_launches_the_attention_benchmark_makes() -> None:
    made = {f"{shape} {batch}x{context} % of ceiling" for shape in kernel_attention.SHAPES
            for batch in kernel_attention.BATCHES for context in kernel_attention.CONTEXTS}
    for target in GROUPS["attention"].targets:
        assert target.value.metric in made | {targets.LEAST_AT_SCALE}


def test_a_group_runs_its_benchmarks_and_checks_each_target_on_their_records(
    stories260k_dir: Path, tmp_path: Path
) -> None:
    served = Call("cpu", "serving", (
        "--model", str(stories260k_dir), "--dtype", "float32", "--serve-args", "--device cpu --kv-cache-memory 0.01",
        "--num-prompts", "4", "--random-input-len", "12", "--random-output-len", "5", "--max-concurrency", "2"))
    offline = Call("offline", "throughput", (
        "--model", str(stories260k_dir), "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "0.01",
        "--num-prompts", "4", "--input-len", "8", "--output-len", "3", "--hf-backends", "hf-generate-batch",
        "--hf-num-prompts", "2", "--hf-batch-num-blocks", "8"))
    tpot = Measure("cpu/none", "median_tpot_ms")
    group = Group((served, offline), (
        Target(17, "TPOT within a minute", tpot, 60_000.0, at_most=True),
        Target(17, "TPOT of no time", tpot, 0.0, at_most=True),
        Target(17, "speed-up", Measure("offline/pagedserve", "output_tokens_per_s"), 1e9, at_most=False,
               over=Measure("offline/hf-generate-batch", "output_tokens_per_s")),
    ))

    result = targets.main(["--groups", "tiny", "--result-dir", str(tmp_path)], groups={"tiny": group})

    serving_record = json.loads(next((tmp_path / "tiny-cpu").glob("*-serving-cpu.json")).read_text())
    offline_record = json.loads(next((tmp_path / "tiny-offline").glob("*-throughput-cpu.json")).read_text())
    assert json.loads(next(tmp_path.glob("*-targets-cpu.json")).read_text()) == result
    rows = result["targets"]
    assert [(row["group"], row["target"], row["met"]) for row in rows] == [
        ("tiny", "TPOT within a minute", True), ("tiny", "TPOT of no time", False), ("tiny", "speed-up", False)]
    assert rows[0]["measured"] == serving_record["runs"][0]["median_tpot_ms"] > 0
    backends = {b["backend"]: b for b in offline_record["backends"]}
    assert rows[2]["measured"] == pytest.approx(
        backends["pagedserve"]["output_tokens_per_s"] / backends["hf-generate-batch"]["output_tokens_per_s"])
    assert [(r["group"], r["call"], r["benchmark"], r["folder"]) for r in result["records"]] == [
        ("tiny", "cpu", "serving", "tiny-cpu"), ("tiny", "offline", "throughput", "tiny-offline")]
    assert result["records"][0]["runs"] == {"cpu/none": serving_record["runs"][0]}
    assert "| 17 | TPOT of no time |" in next(tmp_path.glob("*-targets-cpu.md")).read_text()


def test_an_unknown_group_is_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        targets.main(["--groups", "1b-c1,nope", "--result-dir", str(tmp_path)])
    assert "nope" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_run_with_failed_requests_is_no_measurement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = {"runs": [{"structured_output": "none", "failed": 2, "num_prompts": 64, "errors": ["UNAVAILABLE"],
                        "median_tpot_ms": 1.0}]}
    monkeypatch.setitem(targets.BENCHMARKS, "serving", lambda argv: record)
    group = Group((Call("bf16", "serving", ()),), (Target(17, "tpot", Measure("bf16/none", "median_tpot_ms"), 2.0,
                                                          at_most=True),))

    with pytest.raises(RuntimeError, match="bf16/none: 2 of 64 requests failed"):
        targets.run_group("g", group, tmp_path)


def test_a_failed_group_is_recorded_and_the_next_group_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def benchmark(argv: list[str]) -> dict[str, object]:
        if "broken" in argv:
            raise RuntimeError("the server exited with status 1")
        return {"metadata": {"date": "2026-12-06T00:00:00+00:00"},
                "runs": [{"structured_output": "none", "failed": 0, "median_tpot_ms": 1.5}]}

    monkeypatch.setitem(targets.BENCHMARKS, "serving", benchmark)
    tpot = Target(17, "tpot", Measure("bf16/none", "median_tpot_ms"), 2.0, at_most=True)
    groups = {"broken": Group((Call("bf16", "serving", ("broken",)),), (tpot,)),
              "fine": Group((Call("bf16", "serving", ()),), (tpot,))}

    result = targets.main(["--groups", "broken,fine", "--result-dir", str(tmp_path)], groups=groups)

    assert result["failures"] == [{"group": "broken", "error": "RuntimeError: the server exited with status 1"}]
    assert [(row["group"], row["measured"], row["met"]) for row in result["targets"]] == [("fine", 1.5, True)]
    written = next(tmp_path.glob("*-targets-*.md")).read_text()
    assert "- broken: RuntimeError: the server exited with status 1" in written


def test_the_1b_c256_runs_both_serve_through_four_frontends_and_four_client_processes() -> None:
    calls = GROUPS["1b-c256"].calls
    assert [call.name for call in calls] == ["bf16", "fp8"]
    for call in calls:
        args = serving.parse_args(call.argv)
        assert "--frontend-processes 4" in args.serve_args
        assert (args.client_processes, args.connections, args.max_concurrency) == (4, 4, 256)
    assert "--frontend-processes" not in serving.parse_args(GROUPS["8b-c64"].calls[0].argv).serve_args


def test_rounds_run_every_call_again_and_each_target_is_the_median_of_its_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema_tpots = iter([4.4, 3.3, 3.9])  # against 3.0 with no schema: ratios 1.467, 1.1, 1.3 in rounds 1-3
    folders = []

    def benchmark(argv: list[str]) -> dict[str, object]:
        folders.append(Path(argv[argv.index("--result-dir") + 1]).name)
        return {"metadata": {"date": "2026-12-07T00:00:00+00:00"},
                "runs": [{"structured_output": "none", "failed": 0, "median_tpot_ms": 3.0},
                         {"structured_output": "schema", "failed": 0, "median_tpot_ms": next(schema_tpots)}]}

    monkeypatch.setitem(targets.BENCHMARKS, "serving", benchmark)
    ratio = Target(18, "ratio", Measure("bf16/schema", "median_tpot_ms"), 1.35, at_most=True,
                   over=Measure("bf16/none", "median_tpot_ms"))
    groups = {"pair": Group((Call("bf16", "serving", ()),), (ratio,))}

    result = targets.main(["--groups", "pair", "--rounds", "3", "--result-dir", str(tmp_path)], groups=groups)

    assert folders == ["pair-bf16-r1", "pair-bf16-r2", "pair-bf16-r3"]
    [row] = result["targets"]
    assert row["rounds"] == pytest.approx([4.4 / 3, 1.1, 1.3])
    assert row["measured"] == pytest.approx(1.3)  # the median, met; round 1 alone would not have met it
    assert row["met"] is True
    assert [record["round"] for record in result["records"]] == [1, 2, 3]
    assert "| 18 | ratio | 1.3 | <= 1.35 | yes | 1.467, 1.1, 1.3 |" in next(tmp_path.glob("*-targets-*.md")).read_text()


def test_no_rounds_is_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    groups = {"g": Group((Call("bf16", "serving", ()),), ())}
    with pytest.raises(SystemExit):
        targets.main(["--groups", "g", "--rounds", "0", "--result-dir", str(tmp_path)], groups=groups)
    assert "--rounds" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
