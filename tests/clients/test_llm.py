"""The offline LLM API runs the same engine, with its worker in a child process or on a thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pagedserve.clients.llm import ADMISSION_CHUNK, LLM, Prompt, SamplingParams
from pagedserve.contract.errors import InvalidArgumentError
from pagedserve.contract.model_dir import ModelDirError
from pagedserve.contract.model_format import Quantization
from pagedserve.control_plane.config import CacheConfig, SchedulerConfig, offline_step_budget
from pagedserve.control_plane.engine.model_len import MaxModelLenError
from pagedserve.control_plane.errors import ResourceExhaustedError
from pagedserve.control_plane.launch.worker_launcher import LocalWorkers, WorkerLaunchConfig
from pagedserve.control_plane.scheduling.request import FinishReason
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.worker import Worker


def test_offline_generate_reproduces_the_golden_greedy_tokens_for_every_prompt_in_a_batch(
    stories260k_dir: Path,
) -> None:
    golden = json.loads((stories260k_dir / "golden_greedy.json").read_text())
    cache = CacheConfig(kv_cache_memory_bytes=16 << 20, swap_space_bytes=0)
    with LLM(stories260k_dir, cache_config=cache) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=len(golden["greedy_new_ids"]))
        outputs = llm.generate([golden["prompt"], golden["prompt_ids"], "One day"], params)
    assert [o.outputs[0].token_ids for o in outputs[:2]] == [golden["greedy_new_ids"]] * 2
    assert golden["prompt"] + outputs[0].outputs[0].text == golden["greedy_text"]
    assert [o.outputs[0].finish_reason for o in outputs[:2]] == [FinishReason.LENGTH] * 2
    assert outputs[0].outputs[0].finish_reason == "length"  # as a vLLM script compares it
    assert outputs[1].prompt_token_ids == tuple(golden["prompt_ids"])


def test_a_batch_invariant_worker_process_reproduces_the_golden_greedy_tokens(stories260k_dir: Path) -> None:
    # Its own process, started with --batch-invariant: a flag the worker did not take would fail the constructor.
    golden = json.loads((stories260k_dir / "golden_greedy.json").read_text())
    cache = CacheConfig(kv_cache_memory_bytes=16 << 20, swap_space_bytes=0)
    with LLM(stories260k_dir, device="cpu", batch_invariant=True, cache_config=cache) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=len(golden["greedy_new_ids"]))
        (output,) = llm.generate([golden["prompt"]], params, use_tqdm=False)
    assert output.outputs[0].token_ids == golden["greedy_new_ids"]


def test_offline_builtin_model_gives_the_same_tokens_with_the_worker_in_a_process_or_on_a_thread() -> None:
    cache = CacheConfig(kv_cache_memory_bytes=16 << 20, swap_space_bytes=0)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with LLM(cache_config=cache) as first, LLM(cache_config=cache, worker_process=False) as second:
        a, b = first.generate(["hello world"], params), second.generate(["hello world"], params)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
    assert len(a[0].outputs[0].token_ids) == 12


def test_without_a_scheduler_config_prompts_are_prefilled_in_steps_of_the_offline_budget_not_the_servers() -> None:
    cache = CacheConfig(kv_cache_memory_bytes=32 << 20, swap_space_bytes=0)  # 8,192 tokens of the built-in model
    prompts = [[5 + i] * 1500 for i in range(3)]
    with LLM(cache_config=cache, worker_process=False) as llm:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
        first_step = llm.recent_steps()[0]
    # The CPU worker reports no device memory: 8,192 tokens a step, so one step holds all 4,500 prompt tokens
    # (the server's 2,048 would take three).
    assert (first_step.num_seqs, first_step.num_tokens) == (3, 4500)


@pytest.mark.parametrize(
    ("device_memory_gib", "budget"), [(0, 8192), (24, 8192), (69, 8192), (70, 16384), (141, 16384)]
)
def test_the_offline_step_budget_doubles_on_devices_of_70_gib_or_more(device_memory_gib: int, budget: int) -> None:
    assert offline_step_budget(device_memory_gib << 30) == budget


def test_a_worker_process_that_cannot_load_the_model_fails_the_constructor_instead_of_hanging(
    unloadable_model_dir: Path,
) -> None:
    with pytest.raises(RuntimeError, match="exited with code"):
        LLM(unloadable_model_dir, worker_start_timeout_s=120.0)


def _running_children() -> set[int]:
    """This process's child processes that have not exited (from /proc: a zombie has exited)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(") ", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue  # the process ended while we read
        if int(parent) == os.getpid() and state != "Z":
            children.add(int(stat.parent.name))
    return children


@pytest.mark.parametrize("worker_process", [True, False])
def test_a_constructor_that_fails_after_its_worker_started_leaves_no_worker_nor_thread_behind(
    stories260k_dir: Path, worker_process: bool,
) -> None:
    children, threads = _running_children(), set(threading.enumerate())
    cache = CacheConfig(kv_cache_memory_bytes=16 << 20, swap_space_bytes=0)
    with pytest.raises(MaxModelLenError, match="max_position_embeddings 512"):
        LLM(stories260k_dir, scheduler_config=SchedulerConfig(max_model_len=100_000), cache_config=cache,
            worker_process=worker_process)
    assert _running_children() == children
    assert set(threading.enumerate()) == threads


def test_a_directory_that_is_no_model_fails_the_constructor_before_any_worker_starts(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ModelDirError, match="no config.json"):
        LLM(tmp_path)

    assert time.monotonic() - started < 1.0


def test_device_idle_time_leaves_out_the_wait_for_requests_between_generate_calls(stories260k_dir: Path) -> None:
    cache = CacheConfig(kv_cache_memory_bytes=16 << 20, swap_space_bytes=0)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with LLM(stories260k_dir, cache_config=cache, worker_process=False) as llm:
        llm.generate(["One day"], params)
        time.sleep(0.5)  # the worker waits for work, not for the engine
        llm.generate(["One day"], params)
        status = llm.status()
    assert status.num_steps >= 8
    assert status.worker_idle_time_s < 0.25


def test_generate_shows_a_progress_bar_unless_told_not_to(
    stories260k_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with LLM(stories260k_dir, worker_process=False) as llm:
        capsys.readouterr()
        llm.generate(["One day", "Once upon a time"], params)
        shown = capsys.readouterr().err
        llm.generate(["One day", "Once upon a time"], params, use_tqdm=False)
        hidden = capsys.readouterr().err

    # Only the bar is checked in hidden: a test before this one may have left the engine's log lines on stderr.
    bar = ("Processed prompts", "it/s", "output:")
    assert ("Processed prompts: 100%" in shown, "2/2" in shown, "output:" in shown) == (True, True, True)
    assert [part for part in bar if part in hidden] == []


def test_a_tokenizer_from_another_directory_gives_the_golden_text(stories260k_dir: Path, tmp_path: Path) -> None:
    golden = json.loads((stories260k_dir / "golden_greedy.json").read_text())
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(stories260k_dir / name)  # the model without its tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=len(golden["greedy_new_ids"]))
    with pytest.raises(ModelDirError, match="no tokenizer.json"):
        LLM(tmp_path, worker_process=False)
    with LLM(tmp_path, tokenizer=stories260k_dir, worker_process=False) as llm:
        (output,) = llm.generate([golden["prompt"]], params, use_tqdm=False)

    assert golden["prompt"] + output.outputs[0].text == golden["greedy_text"]


@pytest.mark.parametrize(("scheduler", "refused"), [
    (SchedulerConfig(max_num_seqs=2), SamplingParams(n=3, max_tokens=4)),  # n above max_num_seqs
    (SchedulerConfig(max_num_waiting=2), SamplingParams(max_tokens=4)),  # the third prompt finds the queue full
])
def test_a_prompt_the_engine_refuses_fails_the_call_and_takes_back_the_prompts_admitted_before_it(
    scheduler: SchedulerConfig, refused: SamplingParams,
) -> None:
    cache = CacheConfig(kv_cache_memory_bytes=16 << 20, swap_space_bytes=0)
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    with LLM(cache_config=cache, scheduler_config=scheduler, worker_process=False) as llm:
        with pytest.raises(ResourceExhaustedError):
            llm.generate(["one", "two", "three"], [long, long, refused], use_tqdm=False)
        status = llm.status()
        assert (status.num_requests_running, status.num_requests_waiting, status.num_used_blocks) == (0, 0, 0)
        (output,) = llm.generate(["four"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                                 use_tqdm=False)
        # Only the call that was served generated anything: the 400 tokens of the two taken back never ran.
        assert llm.status().num_generation_tokens - status.num_generation_tokens == 5
        assert status.num_generation_tokens == 0
    assert len(output.outputs[0].token_ids) == 5


def test_a_refusal_after_the_first_admissions_were_planned_aborts_them_all() -> None:
    # Prompts are admitted in chunks between turns of the engine's loop, so the first ones are running by the time
    # the last is refused; they end with the call.
    cache = CacheConfig(kv_cache_memory_bytes=16 << 20, swap_space_bytes=0)
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    num_admitted = 3 * ADMISSION_CHUNK
    with LLM(cache_config=cache, scheduler_config=SchedulerConfig(max_num_seqs=2), worker_process=False) as llm:
        with pytest.raises(ResourceExhaustedError, match="n=3 sequences exceed max_num_seqs 2"):
            llm.generate([[5 + i % 50] * 8 for i in range(num_admitted + 1)],
                         [long] * num_admitted + [SamplingParams(n=3)], use_tqdm=False)
        status = llm.status()
        assert status.control_plane_step_time_s > 0  # a step was planned before the refusal
        assert (status.num_requests_running, status.num_requests_waiting, status.num_used_blocks) == (0, 0, 0)
        (output,) = llm.generate(["four"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                                 use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 5


def test_an_application_that_configured_no_logging_gets_a_clean_stdout_and_no_line_per_request() -> None:
    # A fresh interpreter, as a user's script is: structlog unconfigured, whose default would print to stdout.
    script = ("from pagedserve.clients.llm import LLM, SamplingParams\n"
              "with LLM(worker_process=False) as llm:\n"
              "    outputs = llm.generate(['hello'] * 3, SamplingParams(max_tokens=2), use_tqdm=False)\n"
              "print('outputs', len(outputs))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout == "outputs 3\n"
    assert '"model_loaded"' in done.stderr  # the engine's and worker's own lines, on stderr
    assert "request_admitted" not in done.stderr and "request_finished" not in done.stderr


def test_a_prompt_alone_or_in_vllms_dict_forms_is_the_same_prompt_as_in_a_list() -> None:
    cache = CacheConfig(kv_cache_memory_bytes=16 << 20, swap_space_bytes=0)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with LLM(cache_config=cache, worker_process=False) as llm:
        (reference,) = llm.generate(["hello world"], params, use_tqdm=False)
        ids = list(reference.prompt_token_ids)
        both: list[Prompt] = [{"prompt": "hello world"}, {"prompt_token_ids": ids}]
        forms: list[Prompt | list[Prompt]] = ["hello world", both[0], ids, both[1], both]
        outputs = [llm.generate(form, params, use_tqdm=False) for form in forms]
        unknown_key: list[Prompt] = ["fine", {"prompt": "hi", "multi_modal_data": None}]
        with pytest.raises(InvalidArgumentError, match=r"^prompts\[1\]: a dict prompt holds either 'prompt'"):
            llm.generate(unknown_key, params, use_tqdm=False)
        with pytest.raises(InvalidArgumentError, match=r"^prompts\[0\]: a prompt is text, token ids or a dict"):
            llm.generate([3.5], params, use_tqdm=False)  # type: ignore[arg-type]
    assert [len(batch) for batch in outputs] == [1, 1, 1, 1, 2]
    assert [output.prompt for batch in outputs for output in batch] == ["hello world", "hello world", None, None,
                                                                         "hello world", None]
    for batch in outputs:
        for output in batch:
            assert output.prompt_token_ids == reference.prompt_token_ids
            assert output.outputs[0].token_ids == reference.outputs[0].token_ids


def test_options_that_would_be_ignored_are_refused() -> None:
    with pytest.raises(ValueError, match="cpu_threads sets the worker process's threads"):
        LLM(cpu_threads=2, worker_process=False)
    with pytest.raises(ModelDirError, match="tokenizer needs model"):
        LLM(tokenizer="/models/tokenizer")


@pytest.mark.parametrize("options", [{"dependent_launch": True}, {"dependent_launch": False},
                                     {"quantization": Quantization.FP8, "quantize_lm_head": True}])
def test_worker_options_reach_the_worker_on_a_thread_and_in_a_process(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any],
) -> None:
    from pagedserve.clients import llm as llm_module

    configs: list[WorkerConfig | WorkerLaunchConfig] = []
    real_load = Worker.load

    def load(config: WorkerConfig) -> Worker:
        configs.append(config)
        return real_load(config)

    def workers(config: WorkerLaunchConfig) -> LocalWorkers:
        configs.append(config)
        return LocalWorkers(config)

    monkeypatch.setattr(Worker, "load", load)
    monkeypatch.setattr(llm_module, "LocalWorkers", workers)
    cache = CacheConfig(kv_cache_memory_bytes=16 << 20, swap_space_bytes=0)
    for worker_process in (False, True):
        with LLM(cache_config=cache, worker_process=worker_process, **options) as llm:
            assert llm.generate([[5, 6]], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    assert [type(c).__name__ for c in configs] == ["WorkerConfig", "WorkerLaunchConfig"]
    assert [{name: getattr(c, name) for name in options} for c in configs] == [options] * 2
