"""The benchmark's gateway path: the Shepherd Model Gateway's OpenAI /v1/completions, streamed over httpx2 (the
HTTP client the openai SDK and huggingface_hub are built on), from prompt text.

The gateway takes no token-id prompts on /v1/completions, so each request carries the prompt as text that our
tokenizer turns into the very ids the direct path sends (benchmarks/text_prompts.py); the usage the gateway reports
at the end of the stream must give that prompt length back, else the request counts as failed. The stream carries
text only, one chunk per token whose text is complete: a chunk with text is one token, and the tokens the usage counts
beyond the chunks (held back mid-character, then sent with a later chunk) are added to the last chunk and reported
as late tokens, so output counts, TPOT and throughput are exact and only an ITL around such a token is shared
differently (vLLM's own benchmark counts OpenAI chunks the same way).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2

from benchmarks.direct_client import Send
from benchmarks.random_dataset import BenchRequest
from benchmarks.serving_metrics import RequestRecord
from pagedserve.v1 import common_pb2


def completion_body(model: str, request: BenchRequest, ignore_eos: bool) -> dict[str, Any]:
    """The /v1/completions request: greedy, streamed, with the usage in a last chunk."""
    if request.prompt_text is None:
        raise ValueError("the gateway path needs text prompts (BenchRequest.prompt_text)")
    return {"model": model, "prompt": request.prompt_text, "max_tokens": request.output_len, "temperature": 0.0,
            "ignore_eos": ignore_eos, "stream": True, "stream_options": {"include_usage": True}}


def _close(record: RequestRecord, usage: dict[str, Any] | None, expected_prompt_len: int) -> None:
    """Checks the usage against what was seen and asked; sets record.error on a mismatch."""
    if usage is None:
        record.error = "the stream ended without usage"
        return
    late = int(usage["completion_tokens"]) - len(record.chunk_times_s)
    if usage["prompt_tokens"] != expected_prompt_len:
        record.error = f"the gateway tokenized the prompt to {usage['prompt_tokens']} ids, not {expected_prompt_len}"
    elif late < 0:
        record.error = f"{len(record.chunk_times_s)} chunks of text for {usage['completion_tokens']} tokens"
    elif late > 0 and record.chunk_num_tokens:
        record.chunk_num_tokens[-1] += late
        record.num_late_tokens = late


async def stream_completion(client: httpx2.AsyncClient, model: str, request: BenchRequest, ignore_eos: bool,
                            ) -> RequestRecord:
    """Streams one completion of request and records when each chunk of text came; a failure (an HTTP status, an
    error event, a usage that disagrees with the prompt or the chunks) is the record's error, never raised."""
    body = completion_body(model, request, ignore_eos)
    record = RequestRecord(prompt_len=len(request.prompt_token_ids), start_s=time.perf_counter())
    texts: list[str] = []
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:500]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    record.error = f"stream error: {event['error']}"
                    return record
                for choice in event.get("choices", []):
                    if choice["text"]:
                        record.chunk_times_s.append(time.perf_counter())
                        record.chunk_num_tokens.append(1)
                        texts.append(choice["text"])
                usage = event.get("usage") or usage
    except httpx2.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}"
        return record
    record.output_text = "".join(texts)
    _close(record, usage, len(request.prompt_token_ids))
    return record


@asynccontextmanager
async def gateway_sender(base_url: str, ignore_eos: bool, max_connections: int) -> AsyncIterator[Send]:
    """A Send to the gateway at base_url (its first listed model), over a pool of max_connections kept-alive
    connections (at least the requests in flight, so none waits for a connection), open while the context is."""
    limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    async with httpx2.AsyncClient(base_url=base_url, timeout=None, limits=limits, trust_env=False) as client:
        listed = await client.get("/v1/models")
        listed.raise_for_status()
        model = str(listed.json()["data"][0]["id"])

        async def send(request: BenchRequest, constraint: common_pb2.StructuredOutput | None) -> RequestRecord:
            if constraint is not None:
                raise ValueError("the gateway path runs without structured output")
            return await stream_completion(client, model, request, ignore_eos)

        yield send
