"""The frontend's side of EngineService: requests out on one Relay stream, each step's chunks back in one message."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence

import grpc
import structlog

from pagedserve.contract.codec import token_ids_to_bytes
from pagedserve.control_plane.errors import AlreadyExistsError, EngineUnavailableError, PagedServeError
from pagedserve.control_plane.relay.convert import request_error_from_proto, served_model_from_proto
from pagedserve.control_plane.relay.health import SILENCE_LIMIT_S
from pagedserve.control_plane.relay.item_channel import ItemChannel
from pagedserve.control_plane.scheduling.kv_events import ReplayExpiredError, SubscriberBehindError
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.runtime.auth import ClusterSecret, client_interceptors
from pagedserve.runtime.channel_options import INTERNAL_CHANNEL_OPTIONS
from pagedserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc, generation_service_pb2

log = structlog.get_logger()

GenerateResponse = generation_service_pb2.GenerateResponse


class RequestAbortedError(PagedServeError):
    """The request was aborted by id (abort()) while its stream was open: the stream ends with this error."""


class EngineClient:
    """The engine process as the frontend sees it: add_request() and stream() as on the in-process Engine.

    Commands (add, abort) queue on one channel and leave in one message per wake-up; the engine's chunks arrive
    in one message per step and are dealt to each request's channel. On the relay a request goes by an id of its
    own (the client's id, `@`, this frontend's index among the server's, `.`, a counter), never reused by this
    frontend nor used by another, so chunks still on their way for a request whose client left are dropped, not
    dealt to a later request that reuses the client's id. The client's ids are unique among this frontend's open
    streams (a live one is refused). When the relay ends (the engine process is gone), every open stream fails with
    EngineUnavailableError and `closed` is set.
    """

    def __init__(self, address: str, secret: ClusterSecret | None = None, frontend_index: int = 0) -> None:
        self.address = address
        self._frontend_index = frontend_index
        # Every call carries the engine's cluster secret (runtime/auth.py), when it has one.
        self._channel = grpc.aio.insecure_channel(address, options=INTERNAL_CHANNEL_OPTIONS,
                                                  interceptors=client_interceptors(secret))
        self._stub = engine_service_pb2_grpc.EngineServiceStub(self._channel)
        self._commands: ItemChannel[engine_service_pb2.RelayCommand] = ItemChannel()
        self._relay_ids: dict[str, str] = {}  # the client's request id -> the relay's, for each open stream
        self._streams: dict[str, ItemChannel[GenerateResponse | PagedServeError]] = {}  # by relay id
        self._ids = itertools.count()
        self._relay: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.is_serving = False  # the engine's health as follow_health last reported it

    async def describe(self, timeout_s: float) -> ServedModel:
        """The served model as it is now (its workers' pools may have changed with a restart); waits up to
        timeout_s for the engine process to answer, else EngineUnavailableError."""
        try:
            reply = await self._stub.Describe(engine_service_pb2.DescribeRequest(), timeout=timeout_s,
                                              wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            log.error("engine_describe_failed", engine=self.address, code=exc.code().name, details=exc.details())
            raise EngineUnavailableError("the engine process is unavailable") from exc
        return served_model_from_proto(reply.model)

    async def status(self) -> generation_service_pb2.GetServerStatusResponse:
        """The engine's queue lengths, KV cache usage and counters."""
        try:
            request = engine_service_pb2.GetStatusRequest()
            reply: engine_service_pb2.GetStatusResponse = await self._stub.GetStatus(request)
            return reply.status
        except grpc.aio.AioRpcError as exc:
            log.error("engine_status_failed", engine=self.address, code=exc.code().name, details=exc.details())
            raise EngineUnavailableError("the engine process is unavailable") from exc

    async def watch_kv_events(self, start_sequence_number: int) -> AsyncGenerator[engine_service_pb2.KvEventBatch]:
        """The engine's prefix-cache event batches from start_sequence_number on (0: its current state first), as
        EngineService.WatchKvEvents defines them; ReplayExpiredError or SubscriberBehindError when the engine
        no longer has the batches, EngineUnavailableError when it cannot be reached."""
        call = self._stub.WatchKvEvents(engine_service_pb2.WatchKvEventsRequest(
            start_sequence_number=start_sequence_number))
        try:
            async for message in call:
                for batch in message.batches:
                    yield batch
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                raise ReplayExpiredError(exc.details() or "") from exc
            if exc.code() == grpc.StatusCode.DATA_LOSS:
                raise SubscriberBehindError(exc.details() or "") from exc
            log.error("engine_kv_events_failed", engine=self.address, code=exc.code().name, details=exc.details())
            raise EngineUnavailableError("the engine process is unavailable") from exc
        finally:
            call.cancel()
        raise EngineUnavailableError("the engine process ended the KV event stream")

    async def follow_health(self, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        """Calls set_serving(is_serving) with the engine's first health report and at each change after it: False
        at once when the engine reports not serving, when its WatchHealth stream fails, or when it says nothing
        for SILENCE_LIMIT_S (its process is stuck); True again when it reports serving. Reconnects after a
        failure. Runs until cancelled."""
        reported: bool | None = None

        async def report(is_serving: bool, reason: str) -> None:
            nonlocal reported
            if is_serving != reported:
                reported = self.is_serving = is_serving
                log.info("engine_health_changed", engine=self.address, is_serving=is_serving, reason=reason)
                await set_serving(is_serving)

        while True:
            call = self._stub.WatchHealth(engine_service_pb2.WatchHealthRequest())
            try:
                while True:
                    message = await asyncio.wait_for(call.read(), SILENCE_LIMIT_S)
                    if message is grpc.aio.EOF:
                        reason = "the engine ended the health stream"
                        break
                    await report(message.is_serving, "the engine reported it")
            except asyncio.TimeoutError:
                reason = f"the engine said nothing for {SILENCE_LIMIT_S:g} s"
            except grpc.aio.AioRpcError as exc:
                reason = f"the engine is unreachable ({exc.code().name})"
            except Exception as exc:  # never end silently: the public health would freeze
                log.exception("engine_health_failed", engine=self.address)
                reason = f"internal error: {type(exc).__name__}"
            finally:
                call.cancel()
            await report(False, reason)
            await asyncio.sleep(SILENCE_LIMIT_S)

    def start(self) -> None:
        """Opens the Relay stream."""
        self._relay = asyncio.create_task(self._deal(self._stub.Relay(self._outgoing())), name="engine-relay")

    async def close(self) -> None:
        """Ends the relay (the engine aborts every request still open) and the channel."""
        if self._relay is not None:
            self._relay.cancel()
        await self._channel.close()

    def add_request(
        self, prompt_token_ids: Sequence[int], sampling_params: common_pb2.SamplingParams, request_id: str = "",
        priority: int = 0, arrival_time_s: float | None = None,
    ) -> str:
        """Sends a validated request to the engine; returns its id (a new one when request_id is empty).
        arrival_time_s: when this process received it (time.monotonic(); None: now), from which the engine counts
        its latencies. AlreadyExistsError when a request with this id has not ended yet (as vLLM, which rejects a
        live duplicate); once it ended the id may be used again."""
        if self.closed.is_set():
            raise EngineUnavailableError("the engine process is unavailable")
        if request_id in self._relay_ids:
            raise AlreadyExistsError(f"request_id: {request_id!r} is in use by a request that has not ended")
        while not request_id or request_id in self._relay_ids:
            request_id = f"req-{next(self._ids)}"
        relay_id = self._relay_ids[request_id] = f"{request_id}@{self._frontend_index}.{next(self._ids)}"
        self._streams[relay_id] = ItemChannel()
        self._commands.put(engine_service_pb2.RelayCommand(add=engine_service_pb2.AddCommand(
            request_id=relay_id, prompt_token_ids=token_ids_to_bytes(prompt_token_ids), sampling_params=sampling_params,
            priority=priority, arrival_time_s=time.monotonic() if arrival_time_s is None else arrival_time_s,
        )))
        return request_id

    def abort(self, request_id: str) -> bool:
        """Ends the open request of this id in the engine (its blocks freed) and its stream, which raises
        RequestAbortedError after the chunks already received. False when no request of this id is open."""
        relay_id = self._relay_ids.get(request_id)
        if relay_id is None:
            return False
        self._streams[relay_id].put(RequestAbortedError(f"request {request_id!r} was aborted"))
        self._commands.put(engine_service_pb2.RelayCommand(abort_request_id=relay_id))
        return True

    async def stream(self, request_id: str) -> AsyncGenerator[GenerateResponse, None]:
        """Yields the request's chunks, numbered per completion, until the last (which carries usage). Chunks that
        arrived together are sent as one per completion, so a client that fell behind gets fewer, larger
        messages. Leaving early aborts the request in the engine."""
        relay_id = self._relay_ids[request_id]
        channel = self._streams[relay_id]
        sequence_numbers: dict[int, int] = {}
        has_ended = False
        try:
            while not has_ended:
                items = await channel.take_all()
                chunks = [item for item in items if not isinstance(item, PagedServeError)]
                for chunk in merge_chunks(chunks):
                    chunk.request_id = request_id
                    chunk.sequence_number = sequence_numbers.get(chunk.index, 0)
                    sequence_numbers[chunk.index] = chunk.sequence_number + 1
                    has_ended = chunk.HasField("usage")
                    yield chunk
                if len(chunks) < len(items):
                    has_ended = True
                    raise next(item for item in items if isinstance(item, PagedServeError))
        finally:
            del self._relay_ids[request_id], self._streams[relay_id]
            if not has_ended:
                self._commands.put(engine_service_pb2.RelayCommand(abort_request_id=relay_id))

    async def _outgoing(self) -> AsyncIterator[engine_service_pb2.RelayRequest]:
        while True:
            yield engine_service_pb2.RelayRequest(commands=await self._commands.take_all())

    async def _deal(
        self, call: grpc.aio.StreamStreamCall[engine_service_pb2.RelayRequest, engine_service_pb2.RelayResponse]
    ) -> None:
        """Hands each chunk and failure to its request's stream until the relay ends, then fails them all."""
        try:
            async for message in call:
                for response in message.responses:
                    channel = self._streams.get(response.request_id)
                    if channel is not None:  # None: the client left and its abort is on the way
                        channel.put(response)
                for error in message.errors:
                    channel = self._streams.get(error.request_id)
                    if channel is not None:
                        channel.put(request_error_from_proto(error))
            log.error("engine_relay_ended", engine=self.address, details="the engine closed the relay")
        except grpc.aio.AioRpcError as exc:
            log.error("engine_relay_ended", engine=self.address, code=exc.code().name, details=exc.details())
        except Exception:
            log.exception("engine_relay_failed", engine=self.address)
        self.closed.set()
        for channel in self._streams.values():
            channel.put(EngineUnavailableError("the engine process is unavailable"))


def merge_chunks(chunks: Sequence[GenerateResponse]) -> list[GenerateResponse]:
    """One chunk per completion from consecutive chunks of one request, each completion's in order. Completions
    come out in the order of their last chunk, so the request's very last chunk (with usage) stays last."""
    merged: dict[int, GenerateResponse] = {}
    for chunk in chunks:
        into = merged.pop(chunk.index, None)
        if into is None:
            into = chunk
        else:
            into.token_ids.extend(chunk.token_ids)
            into.text += chunk.text
            into.logprobs.extend(chunk.logprobs)
            into.prompt_logprobs.extend(chunk.prompt_logprobs)
            into.finish_reason = chunk.finish_reason
            into.stop_reason = chunk.stop_reason
            if chunk.HasField("usage"):
                into.usage.CopyFrom(chunk.usage)
        merged[chunk.index] = into
    return list(merged.values())
