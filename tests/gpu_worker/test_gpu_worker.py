"""The worker on a CUDA device with the CuPy kernels: profiled pool sizing, golden tokens, swaps to pinned memory."""

from __future__ import annotations

import json

import pytest
import torch

from pagedserve.contract.codec import token_ids_to_bytes
from pagedserve.contract.model_format import DeviceKind
from pagedserve.contract.worker_info import CacheRequest
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.errors import InvalidCacheRequestError
from pagedserve.gpu_worker.worker import Worker
from pagedserve.v1 import worker_service_pb2 as pb
from tests.gpu_marks import NEEDS_GPU
from tests.gpu_worker.harness import STORIES_DIR, WorkerDriver, greedy, load_worker, make_sequences

pytestmark = NEEDS_GPU
GOLDEN = json.loads((STORIES_DIR / "golden_greedy.json").read_text())
BLOCK_SIZE = 16


def test_profiled_init_cache_sizes_the_pool_from_memory_left_after_weights_and_peak() -> None:
    worker = Worker.load(WorkerConfig(model_dir=STORIES_DIR, device=DeviceKind.CUDA))
    free_bytes, _ = torch.cuda.mem_get_info()
    info = worker.init_cache(CacheRequest(block_size=BLOCK_SIZE, gpu_memory_utilization=0.05,
                                          max_num_batched_tokens=4096, max_num_seqs=64))
    bytes_per_block = worker.info().kv_bytes_per_token * BLOCK_SIZE
    total_bytes = torch.cuda.get_device_properties(0).total_memory

    assert info.peak_activation_bytes > 0
    assert info.num_gpu_blocks * bytes_per_block <= 0.05 * total_bytes - info.peak_activation_bytes
    assert info.num_gpu_blocks * bytes_per_block <= free_bytes
    assert info.num_gpu_blocks * bytes_per_block > 0.02 * total_bytes


def test_weights_pool_graphs_and_the_eager_peak_fit_the_utilization_together() -> None:
    worker = Worker.load(WorkerConfig(model_dir=STORIES_DIR, device=DeviceKind.CUDA))
    torch.cuda.empty_cache()
    free_bytes, total_bytes = torch.cuda.mem_get_info()
    utilization = (total_bytes - free_bytes) / total_bytes + 0.05  # whatever else this process holds, + 5 %
    info = worker.init_cache(CacheRequest(block_size=BLOCK_SIZE, gpu_memory_utilization=utilization,
                                          max_num_batched_tokens=4096, max_num_seqs=256))
    assert worker.runner.graph_runner is not None and worker.runner.piece_runner is not None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # cached blocks no tensor holds are not in use
    free_bytes, _ = torch.cuda.mem_get_info()
    # The captured graphs' private pool is held from now on; an eager step of the largest size adds its peak.
    assert total_bytes - free_bytes + info.peak_activation_bytes <= utilization * total_bytes


def test_kv_cache_memory_bytes_size_the_pool_whatever_the_utilization() -> None:
    worker = Worker.load(WorkerConfig(model_dir=STORIES_DIR, device=DeviceKind.CUDA))
    bytes_per_block = worker.info().kv_bytes_per_token * BLOCK_SIZE
    info = worker.init_cache(CacheRequest(block_size=BLOCK_SIZE, gpu_memory_utilization=0.01,
                                          kv_cache_memory_bytes=1000 * bytes_per_block + bytes_per_block // 2,
                                          max_num_batched_tokens=4096, max_num_seqs=64))

    assert info.num_gpu_blocks == 1000
    assert worker.pool.num_gpu_blocks == 1000


def test_kv_cache_memory_bytes_beyond_the_free_memory_are_refused_by_name() -> None:
    worker = Worker.load(WorkerConfig(model_dir=STORIES_DIR, device=DeviceKind.CUDA))
    _, total_bytes = torch.cuda.mem_get_info()

    with pytest.raises(InvalidCacheRequestError, match=f"kv_cache_memory_bytes {total_bytes} does not fit"):
        worker.init_cache(CacheRequest(block_size=BLOCK_SIZE, kv_cache_memory_bytes=total_bytes,
                                       max_num_batched_tokens=4096, max_num_seqs=64))
    # Nothing was kept: the worker still takes a pool that fits.
    assert worker.init_cache(CacheRequest(block_size=BLOCK_SIZE, num_gpu_blocks_override=8)).num_gpu_blocks == 8


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_greedy_tokens_on_cuda_equal_the_golden_reference(enforce_eager: bool) -> None:
    worker = load_worker(STORIES_DIR, BLOCK_SIZE, num_blocks=64, device=DeviceKind.CUDA, enforce_eager=enforce_eager)
    driver = WorkerDriver(worker, BLOCK_SIZE, num_blocks=64)
    prompts = [GOLDEN["prompt_ids"]] * 3  # 3 decode rows replay the graph of size 4, one padding row

    generated = driver.generate(make_sequences(prompts, {1: 2, 2: 4}), len(GOLDEN["greedy_new_ids"]))

    graph_runner, piece_runner = worker.runner.graph_runner, worker.runner.piece_runner
    assert generated == [GOLDEN["greedy_new_ids"]] * 3
    assert (graph_runner is None) == (piece_runner is None) == enforce_eager
    # Every step after the prefills (which finish by step 2) is a decode step of 3 sequences; the prefill steps
    # before run as captured pieces.
    assert graph_runner is None or graph_runner.num_replays == len(GOLDEN["greedy_new_ids"]) - 1
    assert piece_runner is None or (
        graph_runner is not None and piece_runner.num_replays == driver.step_id - graph_runner.num_replays > 0)


def test_plain_launches_give_the_golden_tokens_too() -> None:
    worker = load_worker(STORIES_DIR, BLOCK_SIZE, num_blocks=64, device=DeviceKind.CUDA, dependent_launch=False)
    driver = WorkerDriver(worker, BLOCK_SIZE, num_blocks=64)

    generated = driver.generate(make_sequences([GOLDEN["prompt_ids"]] * 3, {}), len(GOLDEN["greedy_new_ids"]))

    from pagedserve.kernels.cuda_ops import CudaKernelOps

    assert generated == [GOLDEN["greedy_new_ids"]] * 3
    assert isinstance(worker.ops, CudaKernelOps) and worker.ops.dependent_launches is False


def test_graphs_are_captured_for_small_sizes_then_multiples_of_eight() -> None:
    worker = load_worker(STORIES_DIR, BLOCK_SIZE, num_blocks=64, device=DeviceKind.CUDA)

    graph_runner, piece_runner = worker.runner.graph_runner, worker.runner.piece_runner
    assert graph_runner is not None and piece_runner is not None
    assert graph_runner.sizes == (1, 2, 4, 8, 16)
    assert piece_runner.sizes == (16, 32, 64, *range(128, 2049, 128))  # max_num_batched_tokens 2048


def test_swap_through_pinned_memory_keeps_the_tokens() -> None:
    worker = load_worker(STORIES_DIR, BLOCK_SIZE, num_blocks=4, num_cpu_blocks=2, device=DeviceKind.CUDA)
    driver = WorkerDriver(worker, BLOCK_SIZE, num_blocks=4)
    new = pb.NewSequence(seq_id=1, prompt_token_ids=token_ids_to_bytes(GOLDEN["prompt_ids"]),
                         sampling_params=greedy(), block_ids=[0],
                         num_computed_tokens=0, num_scheduled_tokens=len(GOLDEN["prompt_ids"]))
    tokens = [driver.execute(pb.ExecuteRequest(new_sequences=[new])).outputs[0].token_id]
    driver.execute(pb.ExecuteRequest(swap_out=[pb.BlockMapping(src_block_id=0, dst_block_id=1)]))
    worker.pool.gpu_cache.zero_()  # anything left on the device is gone
    resumed = pb.ScheduledSequence(seq_id=1, num_scheduled_tokens=1,
                                   block_table_updates=[pb.BlockTableUpdate(start_index=0, block_ids=[3])])
    swap_in = [pb.BlockMapping(src_block_id=1, dst_block_id=3)]
    tokens.append(driver.execute(pb.ExecuteRequest(swap_in=swap_in, scheduled_sequences=[resumed])).outputs[0].token_id)

    assert worker.pool.cpu_cache.is_pinned()
    assert tokens == GOLDEN["greedy_new_ids"][:2]
