"""The real gateway (`smg launch --backend vllm`) in front of a server whose only worker is killed mid-stream: the
`openai` SDK's stream goes on to its end with the text of a run without the kill, since the server waits for the
restarted worker and computes the request again there."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from benchmarks.gateway_process import running_gateway
from tests.e2e.test_faults_worker import serving_with_a_local_worker

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time, there was a little girl named Lily. She"
MAX_TOKENS = 300


def test_an_openai_stream_through_the_gateway_rides_through_the_kill_of_the_servers_worker(
    stories_dir: Path, tmp_path: Path,
) -> None:
    with (serving_with_a_local_worker(stories_dir, tmp_path) as serve,
          running_gateway([f"grpc://{serve.address}"], tmp_path / "smg.log") as base_url):
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id

        def texts(on_first_chunk: Callable[[], None] | None = None) -> tuple[list[str], list[str | None]]:
            stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            pieces: list[str] = []
            reasons: list[str | None] = []
            for chunk in stream:
                if chunk.choices:
                    pieces.append(chunk.choices[0].text)
                    reasons.append(chunk.choices[0].finish_reason)
                    if len(pieces) == 1 and on_first_chunk is not None:
                        on_first_chunk()
            return pieces, reasons

        reference, _ = texts()
        (worker_pid,) = serve.worker_pids()
        pieces, reasons = texts(lambda: os.kill(worker_pid, signal.SIGKILL))
        resumed = serve.events("request_resumed")

    assert len(pieces) > 1  # the kill came after the first of several chunks
    assert "".join(pieces) == "".join(reference)
    assert reasons[-1] == "length"
    assert [(event["failed_worker_id"], event["worker_id"]) for event in resumed] == [("worker-0", "worker-0")]
