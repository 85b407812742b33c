"""The first-token path benchmark: its legs from the processes' marks, its hooks against the code, and a real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import first_token_path, report
from benchmarks.first_token_path import HOOKS, PATH, ClientRecord, legs, role_of
from benchmarks.path_clock import Mark, check_hooks


def _marks_of_one_request(start_ns: int, step_ns: int) -> dict[str, list[Mark]]:
    """Every mark of PATH, step_ns apart from start_ns + step_ns on, each in its process's list."""
    by_role: dict[str, list[Mark]] = {}
    for index, (role, event) in enumerate(PATH, start=1):
        by_role.setdefault(role, []).append((event, start_ns + index * step_ns, 1))
    return by_role


def test_each_leg_runs_from_a_mark_to_the_first_of_the_next_after_it() -> None:
    marks = _marks_of_one_request(start_ns=1_000_000, step_ns=2_000)
    marks["engine"].append(("Scheduler.schedule:in", 500_000, 1))  # an earlier request's planning: before this one
    first_token_ns = 1_000_000 + (len(PATH) + 1) * 2_000

    rows, num_complete = legs([ClientRecord(1_000_000, first_token_ns)], marks)

    assert num_complete == 1
    assert [row[0] for row in rows][:2] == ["client: request sent", "frontend: GenerationServicer._admit:in"]
    assert rows[-1][1] == "client: first token"
    assert [us for _, _, (us,) in rows] == [2.0] * (len(PATH) + 1)


def test_a_request_that_missed_a_mark_before_its_first_token_is_left_out() -> None:
    marks = _marks_of_one_request(start_ns=1_000_000, step_ns=2_000)
    marks["worker"] = [mark for mark in marks["worker"] if mark[0] != "Worker.finish:in"]

    rows, num_complete = legs([ClientRecord(1_000_000, 1_000_000 + (len(PATH) + 1) * 2_000)], marks)

    assert num_complete == 0
    assert all(not us for _, _, us in rows)


def test_a_file_of_marks_is_named_by_the_process_that_wrote_it() -> None:
    assert role_of([("ItemChannel.put:in", 1, 1), ("GenerationServicer._admit:in", 2, 1)]) == "frontend"
    assert role_of([("ItemChannel.put:in", 1, 1), ("EngineServicer._add:in", 2, 1)]) == "engine"
    assert role_of([("Worker.launch:in", 1, 1)]) == "worker"
    assert role_of([]) is None


def test_every_hook_names_a_function_the_code_has_and_every_mark_of_the_path_one_of_the_hooks() -> None:
    assert check_hooks(HOOKS) == []
    assert {event.rpartition(":")[0] for _, event in PATH} <= {path for _, path in HOOKS}


def test_a_module_imported_after_the_hooks_went_in_is_marked_through_a_from_import_too(
        tmp_path: Path) -> None:
    # A fresh interpreter: the hooked modules are not imported yet when the hooks go in, as in a server's process.
    script = f"""
import time
from pathlib import Path
from benchmarks.path_clock import install
install(Path({str(tmp_path)!r}), [("pagedserve.contract.codec", "step_plan_from_proto")])
time.sleep(0.2)  # long after the process started: a late import, as an engine's of its worker client
from pagedserve.contract.codec import step_plan_from_proto, step_plan_to_proto
from pagedserve.contract.step import StepPlan
step_plan_from_proto(step_plan_to_proto(StepPlan(step_id=7)))
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=report.REPO_ROOT, timeout=60)

    (marks_file,) = tmp_path.glob("*.json")
    assert [event for event, _, _ in json.loads(marks_file.read_text())] == [
        "step_plan_from_proto:in", "step_plan_from_proto:out"]


def test_a_run_marks_every_leg_of_every_request(stories260k_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "one-layer"
    model_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        (model_dir / name).write_bytes((stories260k_dir / name).read_bytes())
    config = json.loads((stories260k_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))

    result = first_token_path.main([
        "--model", str(model_dir), "--dtype", "float32", "--load-format", "dummy", "--serve-args", "--device cpu",
        "--input-len", "8", "--num-prompts", "3", "--num-warmups", "1", "--result-dir", str(tmp_path / "results"),
    ])

    assert (result["num_requests"], result["num_complete"]) == (3, 3)
    assert len(result["legs"]) == len(PATH) + 1
    assert sum(leg["p50 us"] for leg in result["legs"]) <= result["ttft_p50_us"] * 1.5
    written = json.loads(next((tmp_path / "results").glob("*-first-token-path-cpu.json")).read_text())
    assert written == result
