"""Decode forwards captured as CUDA graphs for padded batch sizes, replayed with each step's inputs copied in."""

from __future__ import annotations

import bisect

import structlog
import torch

from pagedserve.gpu_worker.model_runner import FlatBatch
from pagedserve.gpu_worker.models.decoder import DecoderForCausalLM
from pagedserve.gpu_worker.models.layers import AttentionMetadata

log = structlog.get_logger()
_SMALL_SIZES = (1, 2, 4)
# Multiples of 8 up to 256 sequences, then of 32: past 256, padding 31 rows costs little next to the batch.
_SIZE_RUNS = ((8, 256), (32, None))


def padded_sizes(limit: int, small: tuple[int, ...], runs: tuple[tuple[int, int | None], ...]) -> tuple[int, ...]:
    """The sizes graphs are captured for: the small ones, then each run's multiples of its step from where the
    previous run ended up to its end (None: the limit), all up to limit, which is always included."""
    sizes = {s for s in small if s <= limit}
    start = 0
    for step, end in runs:
        end = limit if end is None else min(end, limit)
        sizes.update(range(start + step, end + 1, step))
        start = end
    sizes.add(limit)
    return tuple(sorted(sizes))


class StaticTokens:
    """The per-token inputs a captured graph reads, for up to `size` rows: token ids, positions and KV slots.
    Rows past a batch are padding, with slot -1: they write no K/V."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, device=device)

    def load(self, batch: FlatBatch, size: int) -> None:
        """Copies the batch's rows in; rows batch.num_tokens .. size - 1 become padding."""
        num_tokens = batch.num_tokens
        self.input_ids[:num_tokens].copy_(batch.input_ids)
        self.positions[:num_tokens].copy_(batch.positions)
        self.slot_mapping[:num_tokens].copy_(batch.meta.slot_mapping)
        self.slot_mapping[num_tokens:size].fill_(-1)


def capture_sizes(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, multiples of 8 up to 256, then multiples of 32, up to max_batch_size (itself always included)."""
    return padded_sizes(max_batch_size, _SMALL_SIZES, _SIZE_RUNS)


class CudaGraphRunner:
    """Replays the model forward for decode batches: every sequence has exactly one query token.

    Invariant: the graphs read only the static buffers below. A batch of n sequences runs the graph of the
    smallest captured size >= n; rows n.. are padding: slot -1 (no K/V written) and zero query rows
    (nothing attended), so they change no cache and their hidden rows are ignored.
    """

    def __init__(self, model: DecoderForCausalLM, kv_cache: torch.Tensor, block_size: int, max_batch_size: int,
                 max_num_blocks_per_seq: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = capture_sizes(max_batch_size)
        size, device = self.sizes[-1], kv_cache.device
        self.tokens = StaticTokens(size, device)
        self.block_tables = torch.zeros(size, max_num_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=device)
        self.query_start_loc = torch.zeros(size + 1, dtype=torch.int32, device=device)
        self.max_seq_len = max_num_blocks_per_seq * block_size
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replays = 0

    @torch.inference_mode()
    def capture(self, pool: torch.cuda._POOL_HANDLE) -> None:
        """Captures one graph per size, largest first, in pool (shared with other graphs that never run at the
        same time)."""
        # Capture inputs: each row a one-token sequence at position 0 reading block 0, writing nothing.
        self.query_start_loc.copy_(torch.arange(self.sizes[-1] + 1, dtype=torch.int32))
        self.seq_lens.fill_(1)
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: compiles kernels and settles the allocator outside the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(size)
            self._graphs[size] = (graph, hidden)
        torch.cuda.synchronize(self.kv_cache.device)
        log.info("cuda_graphs_captured", num_graphs=len(self.sizes), max_batch_size=self.sizes[-1])

    def can_run(self, batch: FlatBatch) -> bool:
        num_seqs = len(batch.query_start_loc) - 1
        return (
            0 < num_seqs <= self.sizes[-1]
            and batch.is_decode
            and batch.meta.block_tables.shape[1] <= self.block_tables.shape[1]
        )

    def run(self, batch: FlatBatch) -> torch.Tensor:
        """[num_seqs, hidden] hidden states of a decode batch (can_run(batch) must hold)."""
        num_seqs = batch.num_tokens
        size = self.sizes[bisect.bisect_left(self.sizes, num_seqs)]
        meta = batch.meta
        self.tokens.load(batch, size)
        self.block_tables[:num_seqs, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens)
        self.seq_lens[num_seqs:size].zero_()
        self.query_start_loc[: num_seqs + 1].copy_(meta.query_start_loc)
        self.query_start_loc[num_seqs + 1 : size + 1].fill_(num_seqs)
        graph, hidden = self._graphs[size]
        graph.replay()
        self.num_replays += 1
        return hidden[:num_seqs]

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.tokens.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
        )
        return self.model(self.tokens.input_ids[:size], self.tokens.positions[:size], meta, self.kv_cache)
