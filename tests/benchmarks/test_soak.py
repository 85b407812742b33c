"""The soak test: its token checks on made-up streams, and a short real soak on stories260K (CPU) with one worker
kill, plain, JSON-constrained and penalised requests, whose report must meet every target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import soak
from benchmarks.soak_checks import RequestRecord, check_record, classify_tokens

REFERENCE = [5, 6, 7, 8, 9, 10, 11, 12]


@pytest.mark.parametrize(("received", "complete", "expected"), [
    (REFERENCE[:5], True, None),
    (REFERENCE[:3], False, None),
    ([], False, None),
    ([5, 6, 8, 9, 10], True, "lost"),
    ([5, 6, 7, 7, 8], True, "duplicated"),
    ([5, 6, 7, 8], True, "short"),
    ([5, 6, 7, 8, 9, 10], True, "extra"),
    ([5, 6, 99, 98, 97], True, "diverged"),
    ([5, 7], False, "lost"),
    ([5, 6, 6], False, "duplicated"),
])
def test_tokens_are_classified_against_the_reference(received, complete, expected) -> None:
    assert classify_tokens(received, REFERENCE[:5] if complete else REFERENCE, complete) == expected


def _record(outcome: str, tokens: list[int], sequence_numbers: list[int], max_tokens: int = 4) -> RequestRecord:
    record = RequestRecord(prompt_index=0, kind="plain", max_tokens=max_tokens, abort_after_tokens=None, start_s=0.0)
    record.tokens, record.sequence_numbers, record.outcome = tokens, sequence_numbers, outcome
    record.finish_reasons = [0] * (len(sequence_numbers) - 1) + [2] if sequence_numbers else []
    record.usage_tokens = len(tokens)
    return record


def test_a_clean_stream_has_no_defect() -> None:
    assert check_record(_record("ok", [5, 6, 7, 8], [0, 1, 2]), REFERENCE) is None
    assert check_record(_record("unavailable", [5, 6], [0, 1]), REFERENCE) is None


def test_sequence_number_gaps_and_repeats_are_defects() -> None:
    gap = check_record(_record("ok", [5, 6, 7, 8], [0, 2, 3]), REFERENCE)
    repeat = check_record(_record("aborted", [5, 6], [0, 0]), REFERENCE)
    assert gap is not None and gap["problems"] == ["sequence_number gap: [0, 2, 3]"]
    assert repeat is not None and repeat["problems"] == ["sequence_number repeat: [0, 0]"]


def test_a_finished_stream_must_carry_every_token_and_its_usage() -> None:
    lost = check_record(_record("ok", [5, 6, 8, 9], [0, 1, 2]), REFERENCE)
    assert lost is not None and lost["token_problem"] == "lost"
    record = _record("ok", [5, 6, 7, 8], [0, 1])
    record.usage_tokens = 3
    defect = check_record(record, REFERENCE)
    assert defect is not None and defect["problems"] == ["usage.completion_tokens 3 != 4 received"]


def test_a_short_soak_with_one_kill_meets_every_target(
    stories260k_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One intra-op thread per process: on a small shared CPU the default thread pools of serve, its frontend and
    # its worker spin against each other and a batched step takes 30x longer (the soak checks faults, not speed).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = soak.main([
        "--model", str(stories260k_dir), "--duration-s", "14", "--kill-every-s", "7", "--concurrency", "8",
        "--num-distinct-prompts", "6", "--prompt-len", "1,48", "--max-tokens", "1,24", "--request-deadline-s", "30",
        "--recovery-timeout-s", "40", "--result-dir", str(tmp_path), "--log-file", str(tmp_path / "serve.log"),
    ])
    assert json.loads(next(tmp_path.glob("*-soak-cpu.json")).read_text()) == json.loads(json.dumps(result))
    summary = result["summary"]
    failed = {name: check for name, check in summary["checks"].items() if not check["passed"]}
    assert not failed, (failed, summary["defects"]["examples"][:3], summary["hangs"][:3], summary["errors"])
    assert summary["passed"]
    (kill,) = summary["kills"]
    assert kill["recovered"] and kill["back_to_serving_s"] is not None and kill["new_pids"] != [kill["killed_pid"]]
    requests = summary["requests"]
    assert requests["ok"] > 0 and requests["aborted"] > 0 and requests["hangs"] == 0
    # Each kind (plain greedy, under a JSON schema, with penalties) finished requests that matched its reference.
    assert {kind: outcomes.get("ok", 0) > 0 for kind, outcomes in summary["requests_by_kind"].items()} == {
        "plain": True, "json": True, "penalty": True}
    assert summary["leaked"] == {"num_used_blocks": 0, "num_requests_running": 0, "num_requests_waiting": 0,
                                 "num_requests_swapped": 0}
    assert (result["serve_exit_code"], result["orphans"]) == (0, [])
    assert next(tmp_path.glob("*-soak-cpu.md")).read_text().startswith("# Soak test: stories260K (passed)")
