"""A constraint the worker cannot compile (its tokenizer lacks a special token the frontend's has) fails that one
request with INVALID_ARGUMENT naming structured_output, through the offline API: the requests running beside it on
the same lane get the tokens they get without it, every block comes back, and the lane stays up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from pagedserve.clients.llm import LLM, RequestOutput, SamplingParams
from pagedserve.contract.errors import InvalidArgumentError
from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput
from pagedserve.control_plane.config import CacheConfig
from tests.structured.mismatched_tokenizer import MARKED, MARKER, write_marked_tokenizer

PROMPTS = ["Once upon a time", "One day, a little girl", "The cat"]
# Long enough to be still running when the failing request arrives and fails beside them.
BESIDE = [
    SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=11, max_tokens=96, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=5, max_tokens=96, structured_output=StructuredOutput(
        ConstraintKind.REGEX, "[a-z ]{96,200}")),
]
FAILING = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, structured_output=MARKED)
CACHE = CacheConfig(kv_cache_memory_bytes=16 << 20, swap_space_bytes=0)


@pytest.fixture(scope="module")
def llm(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    tokenizer_dir = write_marked_tokenizer(stories260k_dir, tmp_path_factory.mktemp("marked"))
    with LLM(stories260k_dir, tokenizer=tokenizer_dir, cache_config=CACHE, worker_process=False) as served:
        yield served


def _tokens(outputs: list[RequestOutput]) -> list[list[int]]:
    return [completion.token_ids for output in outputs for completion in output.outputs]


def _wait_until_running(llm: LLM, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while llm.status().num_requests_running == 0:
        assert time.monotonic() < deadline, "the requests beside never started"
        time.sleep(0.002)


def test_the_failing_request_ends_alone_and_the_requests_beside_it_go_on(llm: LLM) -> None:
    alone = _tokens(llm.generate(PROMPTS, BESIDE, use_tqdm=False))
    total_blocks = llm.status().num_total_blocks
    with capture_logs() as logs, ThreadPoolExecutor(1) as pool:
        beside = pool.submit(llm.generate, PROMPTS, BESIDE, use_tqdm=False)
        _wait_until_running(llm)
        with pytest.raises(InvalidArgumentError) as failed:
            llm.generate(["Once"], FAILING, use_tqdm=False)
        still_running = llm.status().num_requests_running
        together = _tokens(beside.result(timeout=120))
    status = llm.status()

    assert failed.value.field == "structured_output.grammar"
    assert failed.value.message.startswith("cannot be compiled: ") and f'unknown special token: "{MARKER}"' in str(
        failed.value)
    assert still_running == len(PROMPTS)  # the failure came while they ran
    assert together == alone
    assert (status.num_used_blocks, status.num_total_blocks) == (0, total_blocks)  # every block back, the lane live
    events = [entry["event"] for entry in logs]
    assert (events.count("grammar_compile_failed"), events.count("request_failed_on_worker")) == (1, 1)
    assert not {"lane_failed", "worker_failed"} & set(events)


def test_a_batch_with_a_failing_request_raises_its_error_and_leaves_nothing_running(llm: LLM) -> None:
    with pytest.raises(InvalidArgumentError, match="structured_output.grammar: cannot be compiled: "):
        llm.generate(["Once", *PROMPTS], [FAILING, *BESIDE], use_tqdm=False)
    status = llm.status()
    assert (status.num_requests_running, status.num_requests_waiting, status.num_used_blocks) == (0, 0, 0)
    (after,) = llm.generate(["Once"], BESIDE[0], use_tqdm=False)  # the same lane serves on
    assert len(after.outputs[0].token_ids) == 96
