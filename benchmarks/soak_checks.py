"""Soak checks: one streamed Generate request, and its tokens and sequence numbers checked against a reference."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc

_FINISH_OK = (generation_service_pb2.FINISH_REASON_LENGTH, generation_service_pb2.FINISH_REASON_STOP)
# A small record: every string and the array bounded, so that a random-weight or tiny model still closes it.
_SOAK_SCHEMA = json.dumps({
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0},
                   "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age"], "additionalProperties": False,
})
# What each kind of request adds to greedy decoding with ignore_eos. Every kind stays deterministic, so one reference
# per prompt holds whatever batch the request shares; the last two read earlier tokens on the worker's host, so
# their sampling takes the deferred path (the token masks and penalties computed beside the forward pass).
REQUEST_KINDS: dict[str, dict[str, Any]] = {
    "plain": {},
    "json": {"structured_output": common_pb2.StructuredOutput(json_schema=_SOAK_SCHEMA)},
    "penalty": {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.5},
}


def sampling_params(kind: str, max_tokens: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **REQUEST_KINDS[kind])


# ---------------------------------------------------------------------------------------------------------------
# One request and its checks


@dataclass(slots=True)
class RequestRecord:
    """One Generate call: what was asked, every chunk's tokens and sequence number, how it ended."""

    prompt_index: int
    kind: str  # of REQUEST_KINDS
    max_tokens: int
    abort_after_tokens: int | None  # cancel once this many tokens arrived (0: after abort_delay_s); None: never
    start_s: float
    tokens: list[int] = field(default_factory=list)
    sequence_numbers: list[int] = field(default_factory=list)
    finish_reasons: list[int] = field(default_factory=list)  # per chunk, 0 until the last
    usage_tokens: int | None = None
    outcome: str = "pending"  # ok | aborted | unavailable | failed | hang
    error: str = ""
    end_s: float = 0.0
    last_chunk_s: float = 0.0


def first_difference(received: Sequence[int], expected: Sequence[int]) -> int | None:
    for index, (a, b) in enumerate(zip(received, expected, strict=False)):
        if a != b:
            return index
    return None if len(received) == len(expected) else min(len(received), len(expected))


def classify_tokens(received: Sequence[int], expected: Sequence[int], complete: bool) -> str | None:
    """None when received is right: equal to expected when complete, else a prefix of it. Otherwise how it is
    wrong: "lost" (tokens of expected skipped), "duplicated" (tokens repeated), "short", "extra" or "diverged"."""
    index = first_difference(received, expected)
    if index is None or (index == len(received) and not complete):
        return None
    if index == len(received):
        return "short"
    if index == len(expected):
        return "extra"
    tail = received[index:]
    for shift in range(1, 9):
        skipped = expected[index + shift:index + shift + len(tail)]
        if skipped and tail[:len(skipped)] == skipped:
            return "lost"
        repeated = expected[index - shift:index - shift + len(tail)] if index >= shift else []
        if repeated and tail[:len(repeated)] == repeated:
            return "duplicated"
    return "diverged"


def check_record(record: RequestRecord, reference: Sequence[int]) -> dict[str, Any] | None:
    """The defects of one request's stream against its prompt's reference, None when it has none: sequence numbers
    0, 1, 2, ... without gap or repeat; a normally finished request has exactly reference[:max_tokens], one final
    chunk (the last) and usage counting its tokens; any other has a prefix of the reference."""
    problems = []
    if record.sequence_numbers != list(range(len(record.sequence_numbers))):
        numbers = record.sequence_numbers
        kind = "repeat" if len(set(numbers)) < len(numbers) else "gap"
        problems.append(f"sequence_number {kind}: {numbers[:64]}")
    complete = record.outcome == "ok"
    expected = reference[:record.max_tokens]
    token_problem = classify_tokens(record.tokens, expected, complete)
    if token_problem is not None:
        problems.append(f"tokens {token_problem} at {first_difference(record.tokens, expected)}")
    if complete:
        finals = [i for i, reason in enumerate(record.finish_reasons) if reason]
        if finals != [len(record.finish_reasons) - 1]:
            problems.append(f"final chunks at {finals} of {len(record.finish_reasons)}")
        if record.usage_tokens != len(record.tokens):
            problems.append(f"usage.completion_tokens {record.usage_tokens} != {len(record.tokens)} received")
    if not problems:
        return None
    return {"outcome": record.outcome, "prompt_index": record.prompt_index, "kind": record.kind,
            "max_tokens": record.max_tokens,
            "problems": problems, "token_problem": token_problem, "received": record.tokens[:160],
            "expected": list(expected[:160]), "sequence_numbers": record.sequence_numbers[:160]}


async def generate(stub: generation_service_pb2_grpc.GenerationServiceStub, prompt: Sequence[int],
                   record: RequestRecord, abort_delay_s: float) -> None:
    """Streams one greedy request of record.kind into record; cancels it as record.abort_after_tokens says."""
    message = generation_service_pb2.GenerateRequest(sampling_params=sampling_params(record.kind, record.max_tokens))
    message.token_ids.ids.extend(prompt)
    call = stub.Generate(message)

    def abort() -> bool:
        if call.cancel():  # False once the call has ended: then it is read to its end like any other
            record.outcome = "aborted"
        return record.outcome == "aborted"

    timer = asyncio.get_running_loop().call_later(abort_delay_s, abort) if record.abort_after_tokens == 0 else None
    try:
        async for chunk in call:
            record.last_chunk_s = time.monotonic()
            record.tokens.extend(chunk.token_ids)
            record.sequence_numbers.append(chunk.sequence_number)
            record.finish_reasons.append(chunk.finish_reason)
            if chunk.HasField("usage"):
                record.usage_tokens = chunk.usage.completion_tokens
            if (record.abort_after_tokens and not chunk.finish_reason
                    and len(record.tokens) >= record.abort_after_tokens and abort()):
                break
        if record.outcome == "pending":
            last = record.finish_reasons[-1] if record.finish_reasons else 0
            record.outcome = "ok" if last in _FINISH_OK else "failed"
            if record.outcome == "failed":
                record.error = f"stream ended OK with finish_reason {last}"
    except asyncio.CancelledError:
        if record.outcome != "aborted":
            raise  # the deadline's cancellation, not ours
    except grpc.aio.AioRpcError as error:
        if record.outcome != "aborted":  # our own cancel may also end the call with CANCELLED
            record.error = f"{error.code().name}: {error.details()}"
            record.outcome = "unavailable" if error.code() == grpc.StatusCode.UNAVAILABLE else "failed"
    finally:
        if timer is not None:
            timer.cancel()


async def run_one(stub: generation_service_pb2_grpc.GenerationServiceStub, prompt: Sequence[int],
                  record: RequestRecord, abort_delay_s: float, deadline_s: float) -> RequestRecord:
    try:
        await asyncio.wait_for(generate(stub, prompt, record, abort_delay_s), deadline_s)
    except asyncio.TimeoutError:
        record.outcome = "hang"
        record.error = (f"no end within {deadline_s} s: {len(record.tokens)} tokens, last chunk "
                        f"{time.monotonic() - (record.last_chunk_s or record.start_s):.1f} s before the deadline")
    record.end_s = time.monotonic()
    return record
