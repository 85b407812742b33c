"""EngineService over gRPC: the engine process's side of the frontend relay (one stream, one message per step)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import grpc
import structlog

from pagedserve.contract.codec import sampling_params_from_proto, token_ids_from_bytes
from pagedserve.control_plane.engine.engine import Engine
from pagedserve.control_plane.engine.outputs import EngineOutput, RequestFailed
from pagedserve.control_plane.errors import PagedServeError
from pagedserve.control_plane.relay.convert import (
    add_generate_response,
    engine_status_to_proto,
    kv_event_batch_to_proto,
    request_error_to_proto,
    served_model_to_proto,
)
from pagedserve.control_plane.relay.health import HEARTBEAT_S
from pagedserve.control_plane.relay.item_channel import ItemChannel
from pagedserve.control_plane.scheduling.kv_events import KvEventLog, ReplayExpiredError
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.runtime.channel_options import INTERNAL_CHANNEL_OPTIONS
from pagedserve.v1 import engine_service_pb2 as pb
from pagedserve.v1 import engine_service_pb2_grpc

log = structlog.get_logger()


class EngineServicer(engine_service_pb2_grpc.EngineServiceServicer):
    """Admits the frontend's requests into the engine and relays their chunks back.

    Every request of one Relay stream shares one output channel, so its consumer wakes once per step and sends
    the step's chunks of all of them in one message: the engine loop spends no time per client stream.
    A request the stream added and has not seen end is aborted when the stream ends, however it ends.
    The engine's prefix-cache changes go to kv_events, which WatchKvEvents streams.
    """

    def __init__(self, engine: Engine, model: ServedModel, kv_events: KvEventLog | None = None) -> None:
        self._engine = engine
        self._model = model
        self._kv_events = kv_events or KvEventLog()
        engine.publish_kv_events(self._kv_events)

    async def Describe(  # noqa: N802 (gRPC method name)
        self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext[pb.DescribeRequest, pb.DescribeResponse]
    ) -> pb.DescribeResponse:
        model = dataclasses.replace(self._model, num_gpu_blocks=self._engine.num_gpu_blocks)  # after any restart
        return pb.DescribeResponse(model=served_model_to_proto(model))

    async def GetStatus(  # noqa: N802
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext[pb.GetStatusRequest, pb.GetStatusResponse]
    ) -> pb.GetStatusResponse:
        return pb.GetStatusResponse(status=engine_status_to_proto(self._engine.status()),
                                    is_serving=self._engine.is_serving)

    async def WatchHealth(  # noqa: N802
        self,
        request: pb.WatchHealthRequest,
        context: grpc.aio.ServicerContext[pb.WatchHealthRequest, pb.WatchHealthResponse],
    ) -> AsyncIterator[pb.WatchHealthResponse]:
        """The engine's health now, then at each change and at least every HEARTBEAT_S (a silence means trouble)."""
        while True:
            changed = self._engine.health_changed()
            yield pb.WatchHealthResponse(is_serving=self._engine.is_serving)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), HEARTBEAT_S)

    async def WatchKvEvents(  # noqa: N802
        self,
        request: pb.WatchKvEventsRequest,
        context: grpc.aio.ServicerContext[pb.WatchKvEventsRequest, pb.WatchKvEventsResponse],
    ) -> AsyncIterator[pb.WatchKvEventsResponse]:
        """From start_sequence_number (0: a snapshot, or the whole history while it is kept) every batch, in
        order, each message carrying what closed since the previous one. OUT_OF_RANGE when the start is no
        longer kept, DATA_LOSS when this caller fell behind by more than the kept batches."""
        events = self._kv_events
        start = request.start_sequence_number
        try:
            if start == 0 and not events.has_whole_history():
                batches = events.snapshot()
            else:
                batches = events.batches_from(max(start, 1))
        except ReplayExpiredError as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
        cursor = batches[-1].sequence_number + 1 if batches else max(start, events.oldest_sequence_number)
        log.info("kv_events_subscribed", start_sequence_number=start, first=batches[0].sequence_number
                 if batches else cursor, num_live_blocks=events.num_live_blocks)
        while True:
            if batches:
                yield pb.WatchKvEventsResponse(batches=[kv_event_batch_to_proto(batch) for batch in batches])
            changed = events.changed()
            if events.last_sequence_number < cursor:
                await changed.wait()
            try:
                batches = events.batches_from(cursor)
            except ReplayExpiredError:
                log.warning("kv_events_subscriber_behind", cursor=cursor, oldest=events.oldest_sequence_number)
                await context.abort(grpc.StatusCode.DATA_LOSS,
                                    f"fell behind: batch {cursor} is no longer kept; resubscribe from 0")
            cursor = events.last_sequence_number + 1

    async def Relay(  # noqa: N802
        self,
        request_iterator: AsyncIterator[pb.RelayRequest],
        context: grpc.aio.ServicerContext[pb.RelayRequest, pb.RelayResponse],
    ) -> AsyncIterator[pb.RelayResponse]:
        outputs: ItemChannel[EngineOutput] = ItemChannel()  # closed when the frontend ends its side
        live: set[str] = set()  # added by this stream, not yet ended
        reader = asyncio.create_task(self._apply_commands(request_iterator, outputs, live))
        try:
            while items := await outputs.take_all():
                response = pb.RelayResponse()
                for item in items:
                    if isinstance(item, RequestFailed):
                        live.discard(item.request_id)
                        response.errors.append(request_error_to_proto(item.request_id, item.error))
                    else:
                        if item.usage is not None:
                            live.discard(item.chunk.request_id)
                        add_generate_response(response.responses, item.chunk, item.usage)
                yield response
        finally:
            reader.cancel()
            for request_id in live:
                self._engine.abort(request_id)

    async def _apply_commands(
        self, request_iterator: AsyncIterator[pb.RelayRequest], outputs: ItemChannel[EngineOutput], live: set[str],
    ) -> None:
        try:
            async for message in request_iterator:
                for command in message.commands:
                    if command.WhichOneof("command") == "abort_request_id":
                        live.discard(command.abort_request_id)
                        self._engine.abort(command.abort_request_id)
                    else:
                        self._add(command.add, outputs, live)
        finally:
            outputs.close()

    def _add(self, add: pb.AddCommand, outputs: ItemChannel[EngineOutput], live: set[str]) -> None:
        """Admits one request; a failure ends that request's stream only."""
        try:
            params = sampling_params_from_proto(add.sampling_params)
            live.add(self._engine.add_request(
                token_ids_from_bytes(add.prompt_token_ids, "prompt_token_ids"), params, add.request_id, add.priority,
                outputs=outputs, arrival_time_s=add.arrival_time_s,
            ))
        except PagedServeError as error:
            outputs.put(RequestFailed(add.request_id, error))
        except Exception as exc:
            log.exception("add_request_failed", request_id=add.request_id)
            outputs.put(RequestFailed(add.request_id, PagedServeError(f"internal error: {type(exc).__name__}")))


async def build_engine_server(
    servicer: EngineServicer, address: str, interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
) -> grpc.aio.Server:
    """An aio server with only the engine service, for the frontend process on this host; interceptors: the
    cluster secret's check (runtime/auth.py), which serve always installs."""
    server = grpc.aio.server(options=INTERNAL_CHANNEL_OPTIONS, interceptors=interceptors)
    engine_service_pb2_grpc.add_EngineServiceServicer_to_server(servicer, server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    return server
