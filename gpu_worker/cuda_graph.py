"""Decode forwards captured as CUDA graphs for padded batch sizes, replayed over inputs staged for each step."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import NamedTuple

import structlog
import torch

from pagedserve.gpu_worker.block_tables import BlockTableArray
from pagedserve.gpu_worker.decode_inputs import DecodeInputs
from pagedserve.gpu_worker.models.decoder import DecoderForCausalLM
from pagedserve.gpu_worker.models.layers import AttentionMetadata
from pagedserve.gpu_worker.sequence_state import ScheduledWork
from pagedserve.kernels.ops import KernelOps

log = structlog.get_logger()
_SMALL_SIZES = (1, 2, 4)
# Multiples of 8 up to 256 sequences, then of 32: past 256, padding 31 rows costs little next to the batch.
_SIZE_RUNS = ((8, 256), (32, None))
# Graphs of up to this many sequences compute the logits too: at these sizes the host's launches pace a step, and
# the logits stay small (16 rows of a 128,256-token vocabulary: 4 MiB in a 16-bit model dtype).
LOGITS_MAX_SIZE = 16


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


def capture_sizes(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, multiples of 8 up to 256, then multiples of 32, up to max_batch_size (itself always included)."""
    return padded_sizes(max_batch_size, _SMALL_SIZES, _SIZE_RUNS)


class DecodeOutput(NamedTuple):
    """A replay's [num_seqs, hidden] hidden states and, from graphs of up to LOGITS_MAX_SIZE sequences, their
    [num_seqs, vocab] logits in the model's dtype (else None). Both live in the graphs' memory pool, which later
    replays write: their readers must be queued on the stream before the next step's replay. Worker.launch sees to
    it: it queues the next step only once every earlier step's sampling, deferred or not, is queued."""

    hidden: torch.Tensor
    logits: torch.Tensor | None


class CudaGraphRunner:
    """Replays the model forward for decode steps: every sequence has exactly one query token.

    Invariant: the graphs read only the static buffers of `inputs` (decode_inputs.py), whose block tables each
    graph spreads first. A step of n sequences runs the graph of the smallest captured size >= n; its rows n.. are
    padding that changes no cache and whose hidden rows are ignored.
    """

    def __init__(self, model: DecoderForCausalLM, kv_cache: torch.Tensor, block_size: int, max_batch_size: int,
                 max_num_blocks_per_seq: int, ops: KernelOps) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.sizes = capture_sizes(max_batch_size)
        self.inputs = DecodeInputs(self.sizes[-1], max_num_blocks_per_seq, block_size, kv_cache.device, ops)
        self.max_seq_len = max_num_blocks_per_seq * block_size
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, DecodeOutput]] = {}
        self.num_replays = 0

    @torch.inference_mode()
    def capture(self, pool: torch.cuda._POOL_HANDLE) -> None:
        """Captures one graph per size, largest first, in pool (shared with other graphs that never run at the
        same time)."""
        # Capture inputs: each row a one-token sequence at position 0 reading block 0, writing nothing.
        self.inputs.query_start_loc.copy_(torch.arange(self.sizes[-1] + 1, dtype=torch.int32))
        self.inputs.seq_lens.fill_(1)
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: compiles kernels and settles the allocator outside the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                output = self._forward(size)
            self._graphs[size] = (graph, output)
        torch.cuda.synchronize(self.kv_cache.device)
        log.info("cuda_graphs_captured", num_graphs=len(self.sizes), max_batch_size=self.sizes[-1])

    def can_run(self, work: Sequence[ScheduledWork]) -> bool:
        """Whether the step is one the graphs take: one token for each of 1..max size sequences, whose tables fit."""
        return (
            0 < len(work) <= self.sizes[-1]
            and all(item.num_scheduled_tokens == 1 for item in work)
            and max(item.end for item in work) <= self.max_seq_len
        )

    def run(self, work: Sequence[ScheduledWork], tables: BlockTableArray, last_tokens: torch.Tensor) -> DecodeOutput:
        """The outputs of a decode step's num_seqs rows (can_run(work) must hold); a pending token is read from
        last_tokens at its sequence's table row. inputs.table_rows[:num_seqs] holds the work's table rows until the
        next run's copies, which are queued after everything queued before them."""
        num_seqs = len(work)
        size = self.sizes[bisect.bisect_left(self.sizes, num_seqs)]
        self.inputs.stage(work, tables, size, last_tokens)
        graph, output = self._graphs[size]
        graph.replay()
        self.num_replays += 1
        return DecodeOutput(output.hidden[:num_seqs], None if output.logits is None else output.logits[:num_seqs])

    def _forward(self, size: int) -> DecodeOutput:
        inputs = self.inputs
        inputs.spread_tables(size)
        meta = AttentionMetadata(
            slot_mapping=inputs.slot_mapping[:size],
            block_tables=inputs.block_tables[:size],
            seq_lens=inputs.seq_lens[:size],
            query_start_loc=inputs.query_start_loc[: size + 1],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
        )
        hidden = self.model(inputs.input_ids[:size], inputs.positions[:size], meta, self.kv_cache)
        return DecodeOutput(hidden, self.model.compute_logits(hidden) if size <= LOGITS_MAX_SIZE else None)
