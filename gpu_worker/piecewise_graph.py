"""Prefill and mixed forwards as CUDA graphs captured piece by piece, with attention run eagerly between pieces.

A step that is not a pure decode has sequences of different query lengths, so its attention (grid, splits,
kernels) depends on the step; everything else in the forward pass works row by row on the step's tokens. Those
parts, between two attentions, are captured once per padded token count and replayed, which turns ~12 host
launches per layer into one replay plus the attention's own launches.
"""

from __future__ import annotations

import bisect
import time

import structlog
import torch

from pagedserve.gpu_worker.cuda_graph import padded_sizes
from pagedserve.gpu_worker.model_runner import FlatBatch
from pagedserve.gpu_worker.models.decoder import DecoderForCausalLM, ForwardPieces
from pagedserve.gpu_worker.models.layers import AttentionBuffers

log = structlog.get_logger()
# Past this many tokens a step's device time dwarfs the host's launches (a 2,048-token step of a 1B model
# computes for about 8 ms), so larger steps run eagerly and need no activation memory for graphs.
MAX_PIECEWISE_TOKENS = 2048
_SMALL_SIZES = (16, 32, 64)
_SIZE_RUNS = ((128, None),)


def piece_sizes(max_tokens: int) -> tuple[int, ...]:
    """16, 32, 64, then multiples of 128, up to max_tokens (itself always included)."""
    return padded_sizes(max_tokens, _SMALL_SIZES, _SIZE_RUNS)


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


class PiecewiseGraphRunner:
    """Runs steps of up to sizes[-1] tokens as captured pieces and eager attentions.

    Invariant: the pieces read only the static buffers below. A step of t tokens runs the pieces of the
    smallest captured size >= t; rows t.. are padding: slot -1 (no K/V written), and attention covers only
    rows < t while every other operation works row by row, so padding never reaches a real row and its hidden
    rows are ignored. The hidden states run() returns live in a static buffer that the next run (and any graph
    of the shared pool) overwrites: their readers are queued on the same stream before it, as
    ModelRunner.launch queues logits and sampling.
    """

    def __init__(self, model: DecoderForCausalLM, kv_cache: torch.Tensor, max_tokens: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = piece_sizes(max_tokens)
        size, device = self.sizes[-1], kv_cache.device
        config, dtype = model.config, model.embed_tokens.dtype  # the model's, not the cache's (FP8 caches)
        self.tokens = StaticTokens(size, device)
        shape = (size, config.num_heads, config.head_dim)
        self.buffers = AttentionBuffers(torch.zeros(shape, dtype=dtype, device=device),
                                        torch.zeros(shape, dtype=dtype, device=device))
        self.hidden = torch.zeros(size, config.hidden_size, dtype=dtype, device=device)
        # Each layer's attention and pools, as views made once rather than at every layer of every step.
        self._layer_attention = [model.layer_attention(kv_cache, layer) for layer in range(len(model.layers))]
        # Per size: graphs[i] runs up to layer i's attention; the last one ends the forward pass into self.hidden.
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.num_replays = 0

    @torch.inference_mode()
    def capture(self, pool: torch.cuda._POOL_HANDLE) -> None:
        """Captures every size's pieces, largest first, in pool (shared with other graphs that never run at the
        same time)."""
        started = time.perf_counter()
        for size in reversed(self.sizes):
            # Warm-up, uncaptured and without attention: compiles kernels and settles the allocator.
            for _ in self._pieces(size):
                pass
            pieces = self._pieces(size)
            graphs: list[torch.cuda.CUDAGraph] = []
            is_finished = False
            while not is_finished:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    try:
                        next(pieces)
                    except StopIteration as finished:
                        self.hidden[:size].copy_(finished.value)
                        is_finished = True
                graphs.append(graph)
            self._graphs[size] = graphs
        torch.cuda.synchronize(self.kv_cache.device)
        log.info("piecewise_graphs_captured", num_sizes=len(self.sizes), max_tokens=self.sizes[-1],
                 num_graphs=sum(len(g) for g in self._graphs.values()), seconds=round(time.perf_counter() - started, 2))

    def can_run(self, batch: FlatBatch) -> bool:
        return 0 < batch.num_tokens <= self.sizes[-1]

    def run(self, batch: FlatBatch) -> torch.Tensor:
        """[num_tokens, hidden] hidden states of the batch (can_run(batch) must hold)."""
        num_tokens = batch.num_tokens
        size = self.sizes[bisect.bisect_left(self.sizes, num_tokens)]
        self.tokens.load(batch, size)
        query, out = self.buffers.query[:num_tokens], self.buffers.out[:num_tokens]
        graphs = self._graphs[size]
        for (attention, key_cache, value_cache), graph in zip(self._layer_attention, graphs[:-1], strict=True):
            graph.replay()
            attention.attend(out, query, batch.meta, key_cache, value_cache)
        graphs[-1].replay()
        self.num_replays += 1
        return self.hidden[:num_tokens]

    def _pieces(self, size: int) -> ForwardPieces:
        """The forward pass of size padded tokens over the static buffers, cut at each attention."""
        buffers = AttentionBuffers(self.buffers.query[:size], self.buffers.out[:size])
        tokens = self.tokens
        return self.model.pieces(tokens.input_ids[:size], tokens.positions[:size], tokens.slot_mapping[:size],
                                 self.kv_cache, buffers)
