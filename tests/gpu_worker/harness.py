"""A minimal control plane for worker tests: allocates blocks, sends ExecuteRequest protobufs, collects tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pagedserve.contract import codec
from pagedserve.contract.model_format import DeviceKind, DType, KVCacheDType, LoadFormat, Quantization
from pagedserve.contract.step import StepResult
from pagedserve.contract.worker_info import CacheRequest
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.parallel.config import TensorParallelConfig
from pagedserve.gpu_worker.worker import Worker
from pagedserve.v1 import common_pb2
from pagedserve.v1 import worker_service_pb2 as pb
from tests.shared_data import stories260k_dir

STORIES_DIR = stories260k_dir()  # a module constant: test modules read its golden tokens at import


def load_worker(
    model_dir: Path, block_size: int = 4, num_blocks: int = 256, num_cpu_blocks: int = 0,
    dtype: DType = DType.FLOAT32, load_format: LoadFormat = LoadFormat.AUTO, seed: int = 0,
    device: DeviceKind = DeviceKind.CPU, enforce_eager: bool = False, dependent_launch: bool = True,
    tensor_parallel: TensorParallelConfig | None = None,
    kv_cache_dtype: KVCacheDType = KVCacheDType.AUTO, quantization: Quantization = Quantization.NONE,
    quantize_lm_head: bool = False,
) -> Worker:
    """A worker (CPU unless told) with its cache initialised to exactly num_blocks device blocks (the leader of a
    tensor-parallel group when tensor_parallel says so, whose other ranks must be loading too)."""
    config = WorkerConfig(model_dir=model_dir, dtype=dtype, device=device, load_format=load_format, seed=seed,
                          enforce_eager=enforce_eager, dependent_launch=dependent_launch,
                          tensor_parallel=tensor_parallel or TensorParallelConfig(),
                          kv_cache_dtype=kv_cache_dtype, quantization=quantization,
                          quantize_lm_head=quantize_lm_head)
    worker = Worker.load(config)
    bytes_per_block = worker.info().kv_bytes_per_token * block_size
    worker.init_cache(CacheRequest(block_size=block_size, num_gpu_blocks_override=num_blocks,
                                   swap_space_bytes=num_cpu_blocks * bytes_per_block, max_num_seqs=16))
    return worker


def greedy() -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0)


@dataclass
class DrivenSequence:
    """The driver's record of one sequence: its tokens, table and progress."""

    seq_id: int
    prompt: list[int]
    first_chunk: int  # tokens computed by the first step (the whole prompt when not chunked)
    outputs: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    is_sent: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.outputs)


class WorkerDriver:
    """Plays the control plane against a Worker through ExecuteRequest/ExecuteResponse protobufs.

    Blocks come from a free list in order; every sequence runs every step: its first prompt chunk, the
    rest of its prompt, then one decode token per step.
    """

    def __init__(self, worker: Worker, block_size: int, num_blocks: int) -> None:
        self.worker = worker
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks))
        self.step_id = 0

    def execute(self, request: pb.ExecuteRequest) -> StepResult:
        """Runs the step and returns its result as the control plane reads it, after both crossed the wire."""
        request.step_id = self.step_id
        self.step_id += 1
        wire = pb.ExecuteRequest.FromString(request.SerializeToString())
        result = codec.step_result_to_proto(self.worker.execute(codec.step_plan_from_proto(wire)))
        return codec.step_result_from_proto(pb.ExecuteResponse.FromString(result.SerializeToString()))

    def allocate(self, seq: DrivenSequence, num_tokens: int) -> list[int]:
        """Appends blocks so seq's table covers num_tokens; returns the new ones."""
        needed = -(-num_tokens // self.block_size) - len(seq.block_ids)
        new_blocks = [self.free_blocks.pop(0) for _ in range(max(needed, 0))]
        seq.block_ids.extend(new_blocks)
        return new_blocks

    def step(self, sequences: list[DrivenSequence], request: pb.ExecuteRequest | None = None) -> StepResult:
        """Schedules every sequence once in one step; records the sampled tokens."""
        request = request or pb.ExecuteRequest()
        scheduled_counts = {}
        for seq in sequences:
            num_scheduled = (seq.first_chunk if not seq.is_sent else seq.num_tokens - seq.num_computed)
            start_index = len(seq.block_ids)
            new_blocks = self.allocate(seq, seq.num_computed + num_scheduled)
            if not seq.is_sent:
                request.new_sequences.append(pb.NewSequence(
                    seq_id=seq.seq_id, prompt_token_ids=codec.token_ids_to_bytes(seq.prompt), sampling_params=greedy(),
                    block_ids=seq.block_ids, num_computed_tokens=0, num_scheduled_tokens=num_scheduled,
                ))
                seq.is_sent = True
            else:
                updates = [pb.BlockTableUpdate(start_index=start_index, block_ids=new_blocks)] if new_blocks else []
                request.scheduled_sequences.append(pb.ScheduledSequence(
                    seq_id=seq.seq_id, num_scheduled_tokens=num_scheduled, block_table_updates=updates))
            scheduled_counts[seq.seq_id] = num_scheduled
        response = self.execute(request)
        assert sorted(response.by_seq_id) == sorted(scheduled_counts)
        for seq in sequences:
            seq.num_computed += scheduled_counts[seq.seq_id]
            if (token_id := response.by_seq_id[seq.seq_id].token_id) is not None:
                seq.outputs.append(token_id)
        return response

    def generate(self, sequences: list[DrivenSequence], num_new_tokens: int) -> list[list[int]]:
        """Steps until every sequence has num_new_tokens outputs; returns them in order."""
        while any(len(seq.outputs) < num_new_tokens for seq in sequences):
            self.step(sequences)
        return [seq.outputs[:num_new_tokens] for seq in sequences]


def make_sequences(prompts: list[list[int]], first_chunks: dict[int, int] | None = None) -> list[DrivenSequence]:
    """One DrivenSequence per prompt, ids 0.., prefilled whole unless first_chunks[index] says otherwise."""
    chunks = first_chunks or {}
    return [DrivenSequence(i, list(p), chunks.get(i, len(p))) for i, p in enumerate(prompts)]


def prompt_top_tokens(driver: WorkerDriver, sequences: list[list[int]]) -> list[list[int]]:
    """The worker's top-1 token at every prompt position of each sequence, from one prefill step with prompt
    logprobs (teacher forcing); the sequences' blocks follow one another from block 0."""
    request = pb.ExecuteRequest()
    start = 0
    for seq_id, ids in enumerate(sequences):
        blocks = list(range(start, start + -(-len(ids) // driver.block_size)))
        start += len(blocks)
        sampling = common_pb2.SamplingParams(temperature=0.0, prompt_logprobs=1)
        request.new_sequences.append(pb.NewSequence(seq_id=seq_id, prompt_token_ids=codec.token_ids_to_bytes(ids),
                                                    sampling_params=sampling,
                                                    block_ids=blocks, num_scheduled_tokens=len(ids)))
    response = driver.execute(request)
    return [[lp.top_token_ids[0] for lp in response.by_seq_id[seq_id].prompt_logprobs]
            for seq_id in range(len(sequences))]
