"""How the gateway path reads a streamed /v1/completions answer: a chunk of text is one token, the usage's tokens
beyond the chunks join the last chunk, and a usage that disagrees with the prompt, or an HTTP error, fails the
request with a reason."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx2

from benchmarks.gateway_client import stream_completion
from benchmarks.random_dataset import BenchRequest
from benchmarks.serving_metrics import RequestRecord

REQUEST = BenchRequest(prompt_token_ids=(5, 6, 7), output_len=4, prompt_text="abc")


def _choice(text: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {"choices": [{"text": text, "index": 0, "finish_reason": finish_reason}]}


def _record(status: int, events: list[dict[str, Any]]) -> tuple[RequestRecord, list[dict[str, Any]]]:
    bodies: list[dict[str, Any]] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        bodies.append(json.loads(request.content))
        stream = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
        return httpx2.Response(status, text=stream if status == 200 else '{"error": "bad max_tokens"}')

    async def run() -> RequestRecord:
        async with httpx2.AsyncClient(base_url="http://gateway", transport=httpx2.MockTransport(answer)) as client:
            return await stream_completion(client, "m", REQUEST, ignore_eos=True)

    return asyncio.run(run()), bodies


def test_tokens_the_usage_counts_beyond_the_chunks_join_the_last_chunk() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    record, bodies = _record(200, [_choice("Once"), _choice(" upon"), _choice("é"), _choice("", "length"), usage])
    assert bodies == [{"model": "m", "prompt": "abc", "max_tokens": 4, "temperature": 0.0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}]
    assert record.error is None
    assert (record.chunk_num_tokens, record.num_late_tokens, record.output_len) == ([1, 1, 2], 1, 4)
    assert record.output_text == "Once uponé"


def test_a_usage_that_disagrees_with_the_prompt_or_is_missing_fails_the_request() -> None:
    other_prompt = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}
    assert _record(200, [_choice("a"), other_prompt])[0].error == "the gateway tokenized the prompt to 4 ids, not 3"
    assert _record(200, [_choice("a")])[0].error == "the stream ended without usage"


def test_an_http_error_fails_the_request_with_its_status_and_body() -> None:
    record, _ = _record(400, [])
    assert record.error == 'HTTP 400: {"error": "bad max_tokens"}' and not record.is_success
