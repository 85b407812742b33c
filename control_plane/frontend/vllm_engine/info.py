"""pagedserve's model and engine status -> vLLM's GetModelInfo, GetServerInfo and GetLoads replies."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from smg_grpc_proto.generated import vllm_engine_pb2 as vllm

from pagedserve.control_plane.frontend.vllm_engine.model_files import ModelConfigFacts
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.v1 import generation_service_pb2 as pb

SERVER_TYPE = "pagedserve-grpc"


def model_info(model: ServedModel, model_dir: Path, facts: ModelConfigFacts) -> vllm.GetModelInfoResponse:
    """The served model. A prompt leaves room for at least one token, so the longest input is max_model_len - 1;
    no default sampling parameters are reported because this server applies none from generation_config.json."""
    return vllm.GetModelInfoResponse(
        model_path=str(model_dir.resolve()), is_generation=True, max_context_length=model.max_model_len,
        vocab_size=model.vocab_size, supports_vision=False, served_model_name=model.name,
        tokenizer_path=str(model_dir.resolve()), model_type=facts.model_type, architectures=[model.architecture],
        eos_token_ids=model.eos_token_ids, pad_token_id=facts.pad_token_id, bos_token_id=facts.bos_token_id,
        max_req_input_len=model.max_model_len - 1,
    )


def server_info(
    model: ServedModel, status: pb.GetServerStatusResponse, max_num_seqs: int | None, started_s: float,
    last_receive_s: float,
) -> vllm.GetServerInfoResponse:
    """The server: requests in the engine now, uptime, KV block size, dtype and the running window. One
    data-parallel rank: the engine spreads requests over its workers itself."""
    return vllm.GetServerInfoResponse(
        active_requests=status.num_requests_running + status.num_requests_waiting + status.num_requests_swapped,
        is_paused=False, last_receive_timestamp=last_receive_s, uptime_seconds=time.time() - started_s,
        server_type=SERVER_TYPE, data_parallel_size=1, kv_cache_dtype="auto", block_size=model.block_size,
        model_dtype=model.dtype, max_num_seqs=_max_running(model, max_num_seqs),
    )


@dataclass(slots=True)
class LoadReporter:
    """GetLoads replies. gen_throughput is the rate of generated tokens between this reply and the previous one
    (0 on the first), since the engine counts tokens, not rates."""

    model: ServedModel
    max_num_seqs: int | None
    _last: tuple[float, int] | None = field(default=None)  # (time.monotonic(), generation_tokens)

    def loads(self, status: pb.GetServerStatusResponse) -> vllm.GetLoadsResponse:
        now = time.monotonic()
        throughput = 0.0
        if self._last is not None and now > self._last[0]:
            throughput = (status.generation_tokens - self._last[1]) / (now - self._last[0])
        self._last = (now, status.generation_tokens)
        block_size = self.model.block_size
        max_running = _max_running(self.model, self.max_num_seqs)
        queries = status.prefix_cache_queries
        load = vllm.SchedulerLoad(
            dp_rank=0, num_running_reqs=status.num_requests_running,
            num_waiting_reqs=status.num_requests_waiting + status.num_requests_swapped,
            num_total_reqs=status.num_requests_running + status.num_requests_waiting + status.num_requests_swapped,
            num_used_tokens=status.num_used_blocks * block_size,
            max_total_num_tokens=status.num_total_blocks * block_size,
            token_usage=status.kv_cache_usage, gen_throughput=throughput,
            cache_hit_rate=status.prefix_cache_hits / queries if queries else 0.0,
            utilization=min(1.0, status.num_requests_running / max_running) if max_running else 0.0,
            max_running_requests=max_running,
        )
        return vllm.GetLoadsResponse(
            timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(), version=_version(), dp_rank_count=1,
            loads=[load],
        )


def _max_running(model: ServedModel, max_num_seqs: int | None) -> int:
    """Requests the server runs at once: max_num_seqs per worker; 0 when the frontend was not told it."""
    return (max_num_seqs or 0) * model.num_workers


def _version() -> str:
    try:
        return metadata.version("pagedserve")
    except metadata.PackageNotFoundError:
        return ""
