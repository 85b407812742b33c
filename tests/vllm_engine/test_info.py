"""VllmEngine's HealthCheck, GetModelInfo, GetServerInfo, GetLoads, GetTokenizer and the methods pagedserve does not
have, against a real stories260K server: true figures, a tokenizer the transformers library loads, UNIMPLEMENTED."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import zipfile
from pathlib import Path

import grpc
import pytest
import transformers
from smg_grpc_proto.generated import common_pb2 as smg
from smg_grpc_proto.generated import vllm_engine_pb2 as vllm
from smg_grpc_proto.generated import vllm_engine_pb2_grpc

from pagedserve.v1 import generation_service_pb2 as pb
from pagedserve.v1 import generation_service_pb2_grpc
from tests.e2e.processes import Cluster
from tests.vllm_engine.conftest import BLOCK_SIZE, MAX_NUM_SEQS, NUM_GPU_BLOCKS, run_against

pytestmark = pytest.mark.e2e

VllmStub = vllm_engine_pb2_grpc.VllmEngineStub
OursStub = generation_service_pb2_grpc.GenerationServiceStub


def test_health_and_model_info_are_the_models(server: Cluster, stories260k_dir: Path) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> tuple[vllm.HealthCheckResponse, vllm.GetModelInfoResponse]:
        return await stub.HealthCheck(vllm.HealthCheckRequest()), await stub.GetModelInfo(vllm.GetModelInfoRequest())

    health, info = run_against(server.address, scenario)
    config = json.loads((stories260k_dir / "config.json").read_text())
    assert health.healthy
    assert (info.max_context_length, info.vocab_size) == (config["max_position_embeddings"], config["vocab_size"])
    assert (info.max_req_input_len, info.served_model_name) == (config["max_position_embeddings"] - 1, "stories260K")
    assert list(info.architectures) == config["architectures"]
    assert (info.model_type, list(info.eos_token_ids), info.bos_token_id) == ("llama", [2], 1)
    assert info.is_generation and not info.supports_vision


def test_server_info_and_loads_report_the_engines_figures(server: Cluster) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> tuple[vllm.GetServerInfoResponse, vllm.GetLoadsResponse,
                                                                  pb.GetServerStatusResponse]:
        params = vllm.SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
        call = stub.Generate(vllm.GenerateRequest(request_id="busy", text="Once upon a time", sampling_params=params,
                                                  stream=True))
        await call.read()  # running now
        info = await stub.GetServerInfo(vllm.GetServerInfoRequest())
        loads = await stub.GetLoads(vllm.GetLoadsRequest(include=["core"]))
        status = await ours.GetServerStatus(pb.GetServerStatusRequest())
        call.cancel()
        return info, loads, status

    info, loads, status = run_against(server.address, scenario)
    assert (info.block_size, info.max_num_seqs, info.data_parallel_size) == (BLOCK_SIZE, MAX_NUM_SEQS, 1)
    assert info.active_requests == 1 and info.uptime_seconds > 0 and info.last_receive_timestamp > 0
    (load,) = loads.loads
    assert loads.dp_rank_count == 1
    assert (load.num_running_reqs, load.num_waiting_reqs, load.num_total_reqs) == (1, 0, 1)
    assert load.max_total_num_tokens == NUM_GPU_BLOCKS * BLOCK_SIZE
    assert load.max_running_requests == MAX_NUM_SEQS
    # The request grows between the two calls: it holds at least as many blocks as the earlier reading saw.
    assert 0 < load.num_used_tokens <= status.num_used_blocks * BLOCK_SIZE
    assert load.token_usage == pytest.approx(load.num_used_tokens / load.max_total_num_tokens)


def test_loads_of_another_rank_are_invalid_argument(server: Cluster) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetLoads(vllm.GetLoadsRequest(dp_rank=1))
        return caught.value

    error = run_against(server.address, scenario)
    assert (error.code(), (error.details() or "").split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "dp_rank")


def test_tokenizer_bundle_rebuilds_the_models_tokenizer(server: Cluster, stories260k_dir: Path,
                                                        tmp_path: Path) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> list[smg.GetTokenizerChunk]:
        return [chunk async for chunk in stub.GetTokenizer(smg.GetTokenizerRequest())]

    chunks = run_against(server.address, scenario)
    data = b"".join(chunk.data for chunk in chunks)
    assert [bool(chunk.sha256) for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert "model.safetensors" not in archive.namelist()
        archive.extractall(tmp_path)
    rebuilt = transformers.AutoTokenizer.from_pretrained(tmp_path)
    original = transformers.AutoTokenizer.from_pretrained(stories260k_dir)
    text = "Once upon a time, there was a little girl."
    assert rebuilt.encode(text) == original.encode(text)


@pytest.mark.parametrize(("method", "request_message"), [
    ("Embed", vllm.EmbedRequest(request_id="e")),
    ("FlushCache", smg.FlushCacheRequest()),
    ("StartProfile", smg.StartProfileRequest()),
    ("StopProfile", smg.StopProfileRequest()),
])
def test_what_pagedserve_does_not_do_is_unimplemented(server: Cluster, method: str, request_message: object) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await getattr(stub, method)(request_message)
        return caught.value

    error = run_against(server.address, scenario)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "not supported" in (error.details() or "")


def test_unknown_field_is_invalid_argument_not_ignored(server: Cluster) -> None:
    # GetLoadsRequest with field number 9, which this version of the protocol does not have.
    async def scenario(stub: VllmStub, ours: OursStub) -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/vllm.grpc.engine.VllmEngine/GetLoads")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(call(bytes([0x48, 0x01])), 10)
        return caught.value

    error = run_against(server.address, scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown field number 9" in (error.details() or "")
