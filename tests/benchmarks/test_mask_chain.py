"""The mask chain benchmark: its legs from a worker's marks, its hooks against the code, and a real run."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import mask_chain
from benchmarks.mask_chain import HOOKS, calls, chain_rows, masks_thread_windows, middle_marks, window_legs
from benchmarks.path_clock import Mark, check_hooks

MASKS, STEP, FINISH = 2, 1, 3  # thread identifiers


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


def _two_steps() -> list[Mark]:
    """Two windows 100 us apart; between them the step thread launches the second step (its wait ends 15 us in,
    it validates 20 us in and submits the masks 70 us in), and the finish thread runs from 10 us to 110 us."""
    return sorted([
        *_window(0), *_window(100_000),
        ("Worker.launch:in", 5_000, STEP), ("SequenceRegistry.validate:in", 35_000, STEP),
        ("Worker._start_token_masks:in", 85_000, STEP), ("Worker.launch:out", 95_000, STEP),
        ("Worker.finish:in", 10_000, FINISH), ("Worker.finish:out", 110_000, FINISH),
    ], key=lambda mark: mark[1])


def test_windows_follow_the_masks_thread_only_and_the_period_runs_between_queued_samplings() -> None:
    marks = _two_steps()

    windows = masks_thread_windows(marks)
    rows = {row[0]: row[1:] for row in chain_rows(marks)}

    assert [len(window) for window in windows] == [len(_window(0))] * 2
    assert rows["period: one sampling queued to the next"] == [1, 100, 100]
    assert rows["step thread: Worker.launch"] == [1, 90, 90]


def test_the_gap_between_windows_splits_at_the_next_launch_s_validate_and_masks_submission() -> None:
    rows = {row[0]: row[1:] for row in chain_rows(_two_steps())}

    assert rows["gap: sampling queued -> the next step's masks start"] == [1, 85, 85]  # 15 us -> 100 us
    assert rows["  launch: its wait and the worker's lock (to validate)"] == [1, 20, 20]
    assert rows["  launch: validate and apply (to the masks' submission)"] == [1, 50, 50]
    assert rows["  masks submitted -> their task starts"] == [1, 15, 15]
    # The finish call runs 10-110 us; the second window 100-115 us.
    assert rows["during the window: Worker.finish"] == [1, 10, 10]


def test_calls_pair_each_start_with_the_next_end_of_its_own_thread() -> None:
    marks: list[Mark] = [("Worker.finish:in", 1, STEP), ("Worker.finish:in", 2, FINISH),
                         ("Worker.finish:out", 3, FINISH), ("Worker.finish:out", 9, STEP)]

    assert calls(marks, "Worker.finish") == [(1, 9), (2, 3)]


def test_the_timeline_keeps_every_thread_s_marks_inside_the_middle_windows() -> None:
    marks = _two_steps()

    # One of two windows: the second (the middle one, rounding up), with the finish's end that falls inside it.
    assert middle_marks(marks, num_windows=1) == [mark for mark in marks if 100_000 <= mark[1] <= 115_000]
    assert ("Worker.finish:out", 110_000, FINISH) in middle_marks(marks, num_windows=1)
    assert middle_marks(marks, num_windows=2) == marks


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
