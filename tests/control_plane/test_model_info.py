"""GetModelInfo tells the pools as they are: a worker restarted with another KV pool changes num_gpu_blocks."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from pagedserve.clients.client import PagedServeClient
from pagedserve.control_plane.text.tokenizer import Tokenizer
from tests.control_plane.engine_fakes import _Transport, _until
from tests.control_plane.factories import make_scheduler, make_worker
from tests.control_plane.public_stack import BLOCK_SIZE, POOLS, Stack, run_stack


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_dir)


def test_model_info_counts_the_pool_a_restarted_worker_came_back_with(tokenizer: Tokenizer, tmp_path: Path) -> None:
    async def scenario(stack: Stack) -> tuple[int, int, list[MutableMapping[str, Any]]]:
        async with PagedServeClient(stack.address) as client:
            before = (await client.model_info()).num_gpu_blocks
            stack.transports["small"].end_stream()
            await _until(lambda: stack.engine.status().num_total_blocks == POOLS["large"])
            scheduler = make_scheduler(num_blocks=12, block_size=BLOCK_SIZE)
            with capture_logs() as logs:
                stack.engine.revive_lane("small", _Transport(make_worker(scheduler)), scheduler)
            after = (await client.model_info()).num_gpu_blocks
        return before, after, logs

    before, after, logs = run_stack(tokenizer, tmp_path, scenario)
    assert (before, after) == (8 + 16, 12 + 16)
    [warning] = [entry for entry in logs if entry["event"] == "revived_pool_below_max_model_len"]
    assert (warning["worker_id"], warning["num_gpu_blocks"], warning["max_model_len"]) == ("small", 12, 1024)
