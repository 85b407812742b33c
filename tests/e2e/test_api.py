"""The public API's contract through real processes: reflection, health, Tokenize, errors, cancellation."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pagedserve.v1 import common_pb2, generation_service_pb2

pytestmark = pytest.mark.e2e


def _listed_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        # types-grpcio-reflection types ServerReflectionInfo as binascii.Incomplete (an exception class).
        replies = stub.ServerReflectionInfo(  # type: ignore[operator]
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        return {service.name for reply in replies for service in reply.list_services_response.service}


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        # types-grpcio-health-checking's HealthStub declares no Check.
        reply: health_pb2.HealthCheckResponse = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
            health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


def test_public_reflection_lists_the_services_and_health_is_serving_on_both_ports(stories_cluster) -> None:
    assert {"pagedserve.v1.GenerationService", "grpc.health.v1.Health"} <= _listed_services(stories_cluster.address)
    assert _health(stories_cluster.address) == health_pb2.HealthCheckResponse.SERVING
    assert _health(stories_cluster.worker_address) == health_pb2.HealthCheckResponse.SERVING


def test_tokenize_round_trips_through_generate_text(stub, golden) -> None:
    reply = stub.Tokenize(generation_service_pb2.TokenizeRequest(text=golden["prompt"]))
    assert list(reply.token_ids) == golden["prompt_ids"]
    assert len(reply.tokens) == len(reply.token_ids)
    no_bos = stub.Tokenize(generation_service_pb2.TokenizeRequest(text=golden["prompt"], add_special_tokens=False))
    assert list(no_bos.token_ids) == golden["prompt_ids"][1:]


def test_model_info_describes_the_served_model(stub) -> None:
    info = stub.GetModelInfo(generation_service_pb2.GetModelInfoRequest())
    assert (info.model, info.architecture, info.vocab_size, info.max_model_len) == (
        "stories260K", "LlamaForCausalLM", 512, 512)
    assert list(info.eos_token_ids) == [2] and info.block_size == 16 and info.num_gpu_blocks > 0


BAD_REQUESTS = {
    "prompt": generation_service_pb2.GenerateRequest(text=""),
    "max_tokens": generation_service_pb2.GenerateRequest(
        text="Hi", sampling_params=common_pb2.SamplingParams(max_tokens=0)),
    "max_tokens ": generation_service_pb2.GenerateRequest(
        text="Hi", sampling_params=common_pb2.SamplingParams(max_tokens=4_000_000_000)),
    "prompt  ": generation_service_pb2.GenerateRequest(token_ids=generation_service_pb2.TokenIds(ids=[1] * 600)),
    "prompt   ": generation_service_pb2.GenerateRequest(token_ids=generation_service_pb2.TokenIds(ids=[1, 512])),
    "temperature": generation_service_pb2.GenerateRequest(
        text="Hi", sampling_params=common_pb2.SamplingParams(temperature=-0.5)),
}


@pytest.mark.parametrize("field", sorted(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_naming_the_field_and_allocates_nothing(stub, field: str) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(BAD_REQUESTS[field], timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field.strip() in (raised.value.details() or "")
    status = stub.GetServerStatus(generation_service_pb2.GetServerStatusRequest())
    assert (status.num_used_blocks, status.num_requests_waiting, status.num_requests_running) == (0, 0, 0)
    ok = generation_service_pb2.GenerateRequest(text="Hi", sampling_params=common_pb2.SamplingParams(max_tokens=2))
    assert sum(len(c.token_ids) for c in stub.Generate(ok, timeout=30)) == 2


def _wait_idle(stub, timeout_s: float = 10.0) -> generation_service_pb2.GetServerStatusResponse:
    deadline = time.monotonic() + timeout_s
    while True:
        status: generation_service_pb2.GetServerStatusResponse = stub.GetServerStatus(
            generation_service_pb2.GetServerStatusRequest())
        if (status.num_requests_running, status.num_requests_waiting, status.num_used_blocks) == (0, 0, 0):
            return status
        assert time.monotonic() < deadline, f"not idle: {status}"
        time.sleep(0.05)


def test_cancelled_stream_frees_its_blocks(stub) -> None:
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    call = stub.Generate(generation_service_pb2.GenerateRequest(text="Once upon a time", sampling_params=params))
    first = next(call)
    assert len(first.token_ids) >= 1
    call.cancel()
    _wait_idle(stub)


def test_deadline_ends_the_request_and_frees_its_blocks(stub) -> None:
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=480, ignore_eos=True)
    request = generation_service_pb2.GenerateRequest(text="Once upon a time", sampling_params=params)
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request, timeout=0.3))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(stub)


def test_prometheus_endpoint_exports_vllm_metric_names_labelled_by_model(stories_cluster, stub) -> None:
    import urllib.request

    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=3)
    list(stub.Generate(generation_service_pb2.GenerateRequest(text="Hi", sampling_params=params), timeout=30))
    with urllib.request.urlopen(f"http://127.0.0.1:{stories_cluster.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for name in ("num_requests_running", "num_requests_waiting", "num_requests_swapped", "kv_cache_usage_perc",
                 "num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "prompt_tokens_total", "generation_tokens_total", "worker_alive"):
        assert f'pagedserve:{name}{{model_name="stories260K",worker_id="' in text, name
    for name in ("time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "request_queue_time_seconds_count",
                 "request_prefill_time_seconds_count", "request_decode_time_seconds_count",
                 "request_inference_time_seconds_count", "request_prompt_tokens_count",
                 "request_generation_tokens_count", "request_params_n_count", "request_params_max_tokens_count"):
        assert f'pagedserve:{name}{{model_name="stories260K"}}' in text, name
    assert 'pagedserve:cache_config_info{block_size="16",' in text
