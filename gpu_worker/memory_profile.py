"""GPU pool sizing: measure the peak activation of a worst-case step, then give KV blocks what is left, or the bytes
asked for when they fit."""

from __future__ import annotations

import torch

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.gpu_worker.block_tables import BlockTableArray
from pagedserve.gpu_worker.errors import InvalidCacheRequestError
from pagedserve.gpu_worker.kv_pool import KVLayout
from pagedserve.gpu_worker.model_runner import build_batch
from pagedserve.gpu_worker.models.decoder import DecoderForCausalLM
from pagedserve.gpu_worker.sequence_state import ScheduledWork, SequenceState

ALLOCATION_PAGE_BYTES = 2 << 20  # torch's caching allocator rounds large segments up to 2 MiB


def _profiling_work(
    max_num_batched_tokens: int, max_num_seqs: int, block_size: int, tables: BlockTableArray
) -> tuple[list[ScheduledWork], int]:
    """max_num_batched_tokens prompt tokens spread over max_num_seqs sequences on consecutive scratch blocks."""
    num_seqs = max(1, min(max_num_seqs, max_num_batched_tokens))
    base, extra = divmod(max_num_batched_tokens, num_seqs)
    work, next_block = [], 0
    for seq_id in range(num_seqs):
        count = base + (1 if seq_id < extra else 0)
        num_blocks = -(-count // block_size)
        table = list(range(next_block, next_block + num_blocks))
        state = SequenceState(seq_id, [0] * count, [], SamplingParams(), (), tables.add(table), num_computed_tokens=0)
        work.append(ScheduledWork.of(state, count))
        next_block += num_blocks
    return work, next_block


@torch.inference_mode()
def profile_peak_activation_bytes(
    model: DecoderForCausalLM, layout: KVLayout, max_num_batched_tokens: int, max_num_seqs: int, device: torch.device
) -> int:
    """Bytes a forward pass of the largest allowed step allocates beyond the weights (the scratch KV excluded)."""
    tables = BlockTableArray()
    work, num_blocks = _profiling_work(max_num_batched_tokens, max_num_seqs, layout.block_size, tables)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    scratch = torch.zeros(layout.shape(num_blocks), dtype=layout.dtype, device=device)
    batch = build_batch(work, tables, layout.block_size, device)
    hidden = model(batch.input_ids, batch.positions, batch.meta, scratch)
    last_rows = torch.from_numpy(batch.query_start_loc[1:] - 1).to(device)
    # The sampler holds a few [num_seqs, vocab] float32 copies of the logits; softmax stands in for them.
    model.compute_logits(hidden[last_rows]).float().softmax(dim=-1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline - scratch.numel() * scratch.element_size()
    del scratch, batch, hidden
    torch.cuda.empty_cache()
    return max(peak, 0)


def gpu_blocks_for_budget(layout: KVLayout, gpu_memory_utilization: float, reserved_bytes: int,
                          device: torch.device) -> int:
    """Blocks fitting in utilization * total memory beside all the device holds now (weights, the CUDA context,
    CuPy modules, torch's cache, other processes) and reserved_bytes (the peak activation, the graphs)."""
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise InvalidCacheRequestError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    budget = int(gpu_memory_utilization * total_bytes) - (total_bytes - free_bytes) - reserved_bytes
    # torch's caching allocator takes a large tensor's memory in whole pages.
    num_blocks = layout.num_blocks_in(budget // ALLOCATION_PAGE_BYTES * ALLOCATION_PAGE_BYTES)
    if num_blocks <= 0:
        raise InvalidCacheRequestError(
            f"no memory left for KV blocks at gpu_memory_utilization {gpu_memory_utilization} "
            f"(reserved for activations and graphs: {reserved_bytes} bytes)"
        )
    return num_blocks


def gpu_blocks_for_bytes(layout: KVLayout, kv_cache_memory_bytes: int, reserved_bytes: int,
                         device: torch.device) -> int:
    """The blocks in kv_cache_memory_bytes (vLLM's --kv-cache-memory-bytes: gpu_memory_utilization does not apply),
    refused unless they fit in the device's free memory beside reserved_bytes (the peak activation, the graphs)."""
    num_blocks = blocks_in_bytes(layout, kv_cache_memory_bytes)
    free_bytes, _ = torch.cuda.mem_get_info(device)
    pool_bytes = -(-num_blocks * layout.bytes_per_block // ALLOCATION_PAGE_BYTES) * ALLOCATION_PAGE_BYTES
    if pool_bytes + reserved_bytes > free_bytes:
        raise InvalidCacheRequestError(
            f"kv_cache_memory_bytes {kv_cache_memory_bytes} does not fit on {device}: {free_bytes} bytes are free, "
            f"{reserved_bytes} of them reserved for activations and graphs"
        )
    return num_blocks


def blocks_in_bytes(layout: KVLayout, kv_cache_memory_bytes: int) -> int:
    """The whole blocks in kv_cache_memory_bytes, refused when there is none."""
    num_blocks = layout.num_blocks_in(kv_cache_memory_bytes)
    if num_blocks <= 0:
        raise InvalidCacheRequestError(f"kv_cache_memory_bytes {kv_cache_memory_bytes} holds no block of "
                                       f"{layout.bytes_per_block} bytes")
    return num_blocks
