"""The mask chain benchmark: its legs from a worker's marks, its hooks against the code, and a real run."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import mask_chain
from benchmarks.mask_chain import HOOKS, chain_rows, masks_thread_windows, window_legs
from benchmarks.path_clock import Mark, check_hooks

MASKS, STEP = 2, 1  # thread identifiers


def _window(start_ns: int, reads_tokens: bool = True) -> list[Mark]:
    """One deferred sampling on the masks thread, its calls 1, 2, ... us after start_ns; the tokens it waits for
    (when reads_tokens) reach the host 2 us in."""
    events = ["Worker._token_masks:in"]
    if reads_tokens:
        events += ["PendingSample.result:in", "PendingSample.result:out"]
    events += ["SequenceRegistry.fill:in", "accept_tokens:in", "accept_tokens:out", "SequenceRegistry.fill:out",
               "RowsAtLaunch.current_rows:in", "RowsAtLaunch.current_rows:out", "fill_token_masks:in",
               "fill_token_masks:out", "Worker._token_masks:out", "Worker._sample_when_masked:in",
               "ModelRunner.sample_deferred:in", "ModelRunner.sample_deferred:out", "Worker._sample_when_masked:out"]
    return [(event, start_ns + index * 1_000, MASKS) for index, event in enumerate(events)]


def test_a_window_splits_into_the_legs_of_its_calls() -> None:
    legs = window_legs(_window(0))

    assert legs is not None
    assert legs["waiting for the earlier steps' tokens (where this thread read them)"] == 1.0
    assert legs["registry fill (writes tokens, feeds grammars)"] == 3.0
    assert legs["  of which the grammars' accept_tokens"] == 1.0
    assert legs["mask fill (fill_token_masks)"] == 1.0
    assert legs["masks filled -> sampling queue starts (task, lock)"] == 3.0
    assert legs["chain: tokens on the host -> sampling queued"] == 13.0
    assert legs["whole window"] == 15.0


def test_a_window_whose_tokens_another_thread_read_has_no_chain() -> None:
    legs = window_legs(_window(0, reads_tokens=False))

    assert legs is not None
    assert "chain: tokens on the host -> sampling queued" not in legs


def test_a_window_without_masks_is_left_out() -> None:
    assert window_legs([mark for mark in _window(0) if not mark[0].startswith("fill_token_masks")]) is None


def test_windows_follow_the_masks_thread_only_and_the_period_runs_between_queued_samplings() -> None:
    marks = sorted([*_window(0), *_window(100_000), ("Worker.launch:in", 5_000, STEP),
                    ("Worker.launch:out", 45_000, STEP)], key=lambda mark: mark[1])

    windows = masks_thread_windows(marks)
    rows = {row[0]: row[1:] for row in chain_rows(marks)}

    assert [len(window) for window in windows] == [len(_window(0))] * 2
    assert rows["period: one sampling queued to the next"] == [1, 100, 100]
    assert rows["step thread: Worker.launch"] == [1, 40, 40]


def test_every_hook_names_a_function_the_code_has() -> None:
    assert check_hooks(HOOKS) == []


def test_a_run_marks_the_chain_of_constrained_steps(stories260k_dir: Path, tmp_path: Path) -> None:
    result = mask_chain.main([
        "--model", str(stories260k_dir), "--dtype", "float32", "--load-format", "safetensors",
        "--serve-args", "--device cpu", "--random-input-len", "16", "--random-output-len", "12",
        "--max-concurrency", "4", "--num-prompts", "8", "--result-dir", str(tmp_path),
    ])

    assert [run["structured_output"] for run in result["runs"]] == ["schema"]
    legs = {leg["leg"]: leg for leg in result["legs"]}
    assert legs["mask fill (fill_token_masks)"]["windows"] >= 8
    assert legs["whole window"]["p50 us"] >= legs["mask fill (fill_token_masks)"]["p50 us"]
    written = json.loads(next(tmp_path.glob("*-mask-chain-cpu.json")).read_text())
    assert written == result
