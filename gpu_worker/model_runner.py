"""Turns one step's scheduled sequences into a flat batch, queues the model and the sampling of the next tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from pagedserve.contract.step import SequenceFailure, SequenceOutput, TokenLogprobs
from pagedserve.gpu_worker.block_tables import BlockTableArray
from pagedserve.gpu_worker.host_transfer import to_device
from pagedserve.gpu_worker.kv_pool import KVPool
from pagedserve.gpu_worker.models.decoder import DecoderForCausalLM
from pagedserve.gpu_worker.models.layers import AttentionMetadata
from pagedserve.gpu_worker.sampler import PendingSample, Sampler, SampleResult, SamplingRow
from pagedserve.gpu_worker.sequence_state import PENDING_TOKEN, ScheduledWork, SequenceState

if TYPE_CHECKING:
    from pagedserve.gpu_worker.cuda_graph import CudaGraphRunner
    from pagedserve.gpu_worker.piecewise_graph import PiecewiseGraphRunner


@dataclass(frozen=True, slots=True)
class FlatBatch:
    """The step's tokens of every sequence, concatenated in work order.

    Sequence s owns rows query_start_loc[s] : query_start_loc[s + 1] (a host copy is kept for indexing).
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    query_start_loc: np.ndarray  # [S + 1] int64, host
    is_decode: bool  # exactly one token per sequence (or no sequence)

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc[-1])


def build_batch(
    work: list[ScheduledWork], tables: BlockTableArray, block_size: int, device: torch.device,
    last_tokens: torch.Tensor | None = None,
) -> FlatBatch:
    """Vectorised batch build: positions, slots and block tables come from numpy, not per-token Python.

    Everything travels to the device in two copies (one int64, one int32 buffer, pinned on CUDA hosts).
    An input that is a PENDING_TOKEN is read on the device from last_tokens at its sequence's table row.
    """
    num_seqs = len(work)
    counts = np.array([w.num_scheduled_tokens for w in work], dtype=np.int64)
    ends = np.array([w.end for w in work], dtype=np.int64)
    rows = np.array([w.state.table_row for w in work], dtype=np.int64)
    starts = ends - counts
    max_query_len = int(counts.max(initial=0))
    num_tokens = int(counts.sum())
    is_decode = max_query_len <= 1 and num_tokens == num_seqs  # one token each (or no sequence)
    if is_decode:  # the batch's rows are its sequences: no repeats
        query_start_loc = np.arange(num_seqs + 1, dtype=np.int64)
        positions = starts
        seq_index = np.arange(num_seqs)
    else:
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start_loc[1:])
        # Row r of sequence s sits at position starts[s] + (r - query_start_loc[s]).
        positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(query_start_loc[:-1] - starts, counts)
        seq_index = np.repeat(np.arange(num_seqs), counts)
    block_tables = tables.gather(rows, max(int((-(-ends // block_size)).max(initial=0)), 1))
    slots = block_tables[seq_index, positions // block_size].astype(np.int64) * block_size + positions % block_size
    input_ids = np.array(_input_ids(work, starts, ends, is_decode), dtype=np.int64)
    pending_rows = np.flatnonzero(input_ids == PENDING_TOKEN)
    num_pending = len(pending_rows)

    is_pinned = device.type == "cuda"
    longs = torch.empty(3 * num_tokens, dtype=torch.int64, pin_memory=is_pinned)
    longs_host = longs.numpy()
    longs_host[:num_tokens] = input_ids
    longs_host[num_tokens : 2 * num_tokens] = positions
    longs_host[2 * num_tokens :] = slots
    table_size = block_tables.size
    pending_start = table_size + 2 * num_seqs + 1
    ints = torch.empty(pending_start + 2 * num_pending, dtype=torch.int32, pin_memory=is_pinned)
    ints_host = ints.numpy()
    ints_host[:table_size] = block_tables.reshape(-1)
    ints_host[table_size : table_size + num_seqs] = ends
    ints_host[table_size + num_seqs : pending_start] = query_start_loc
    ints_host[pending_start : pending_start + num_pending] = pending_rows
    ints_host[pending_start + num_pending :] = rows[seq_index[pending_rows]]
    longs_device = longs.to(device, non_blocking=True)
    ints_device = ints.to(device, non_blocking=True)
    if num_pending:
        if last_tokens is None:
            raise RuntimeError("a step reads tokens still on the device, but no last-token buffer was given")
        pending = ints_device[pending_start:].view(2, num_pending)
        longs_device[pending[0]] = last_tokens[pending[1]]
    meta = AttentionMetadata(
        slot_mapping=longs_device[2 * num_tokens :],
        block_tables=ints_device[:table_size].view(block_tables.shape),
        seq_lens=ints_device[table_size : table_size + num_seqs],
        query_start_loc=ints_device[table_size + num_seqs : pending_start],
        max_query_len=max_query_len,
        max_seq_len=int(ends.max(initial=0)),
    )
    return FlatBatch(longs_device[:num_tokens], longs_device[num_tokens : 2 * num_tokens], meta, query_start_loc,
                     is_decode)


def _input_ids(work: list[ScheduledWork], starts: np.ndarray, ends: np.ndarray, is_decode: bool) -> list[int]:
    """The step's token ids in batch order; decode steps (one token each) skip the per-sequence slicing."""
    if is_decode:
        return [item.state.token_id(start) for item, start in zip(work, starts.tolist(), strict=True)]
    return [t for item, start, end in zip(work, starts.tolist(), ends.tolist(), strict=True)
            for t in item.state.token_ids(start, end)]


def sampling_rows(work: list[ScheduledWork]) -> tuple[list[SamplingRow], list[int]]:
    """One row per sampling sequence and per pending sibling, in work order, and the index in work of each row's
    item. A sequence's row is the one it keeps; a sibling's differs by its sample index."""
    rows, items = [], []
    for index, (state, _, _, is_sampling) in enumerate(work):
        if is_sampling:
            row = state.sampling_row
            rows.append(row)
            items.append(index)
            if state.forks:
                rows.extend(row._replace(sample_index=fork.sample_index) for fork in state.forks)
                items.extend([index] * len(state.forks))
    return rows, items


@dataclass(frozen=True, slots=True)
class RowsAtLaunch:
    """A step's sampling rows as they are when it is launched, for a sampling that reads them later (grammars,
    penalties, bad words): the rows' output lists are live, so each row sees only the outputs it had then, whatever
    was reserved since."""

    rows: list[SamplingRow]
    items: list[int]  # per row: the index of its work item
    num_outputs: list[int]  # per row: len(output_token_ids) at launch

    @classmethod
    def of(cls, work: list[ScheduledWork]) -> RowsAtLaunch:
        rows, items = sampling_rows(work)
        return cls(rows, items, [len(row.output_token_ids) for row in rows])

    def current_rows(self) -> list[SamplingRow]:
        """The rows with the outputs they had at launch. A row that is an argmax from its first output on
        (greedy_from 0) reads neither its outputs nor their number, so it is passed as it is: copying a row costs
        about 3 us on a GPU host, on the path from one step's tokens to the next step's sampling."""
        return [row if row.greedy_from == 0 else row._replace(output_token_ids=row.output_token_ids[:count])
                for row, count in zip(self.rows, self.num_outputs, strict=True)]


class MaskedRows(NamedTuple):
    """A deferred sampling's rows as they are once the tokens they read are on the host (RowsAtLaunch.current_rows),
    and their token masks (Sampler.token_masks; None without a grammar): what the sampling needs from the host."""

    rows: list[SamplingRow]
    token_masks: torch.Tensor | None


@dataclass(slots=True, eq=False)
class LaunchedRun:
    """A step's forward pass and sampling, queued on the device; its results are read once they reach the host.
    A deferred run has its forward pass queued and its sampling still to queue (ModelRunner.sample_deferred)."""

    work: list[ScheduledWork]
    sampled_seq_ids: list[tuple[int, ...]]  # per work item: the sequence and its siblings when it samples, else ()
    prompt_logprobs: list[tuple[TokenLogprobs, ...]]  # per work item
    sample: PendingSample | None  # None when nothing samples, or until a deferred sampling is queued
    # A deferred run's logits, kept until its sampling is queued. After a graph run they live in the graphs' pool,
    # which later replays write: the sampling must be queued before the next step is (Worker.launch waits).
    deferred_logits: torch.Tensor | None = None
    # A decode graph run's work items' table rows, on the device in work order: the graphs' input buffer, valid until
    # the next graph run stages its inputs, so read only by what is queued before that (keep_last_tokens).
    table_rows: torch.Tensor | None = None

    def results(self, sample: SampleResult | None) -> list[SequenceOutput]:
        """One result per work item in order, each sampling item followed by its newly forked siblings. A sequence
        whose grammar has no matcher gets its failure instead of the token sampled under its stand-in mask, and so
        do the siblings it forked in this step (their request shares the constraint); so does a row whose
        constraints left it no token (SampleResult.no_choice)."""
        sampled = enumerate(zip(sample.token_ids, sample.logprobs, strict=True)) if sample is not None else iter(())
        no_choice = sample.no_choice if sample is not None else frozenset()
        results = []
        for item, seq_ids, prompt_logprobs in zip(self.work, self.sampled_seq_ids, self.prompt_logprobs, strict=True):
            if not seq_ids:
                results.append(SequenceOutput(item.state.seq_id, None, None, prompt_logprobs))
                continue
            grammar = item.state.grammar
            compile_failure = grammar.failure if grammar is not None else None
            for index, seq_id in enumerate(seq_ids):
                row, (token, logprobs) = next(sampled)
                failure = compile_failure or (no_token_allowed(item.state) if row in no_choice else None)
                if failure is not None:
                    results.append(SequenceOutput(seq_id, None, None, (), failure))
                else:
                    results.append(SequenceOutput(seq_id, token, logprobs, prompt_logprobs if index == 0 else ()))
        return results


def no_token_allowed(state: SequenceState) -> SequenceFailure:
    """The failure of a sequence whose grammar, allowed token ids and bans (bad words, and the end-of-sequence and
    stop tokens before min_tokens) together excluded every token: named by the first of those its request set."""
    params = state.sampling_params
    causes = [name for name, is_set in (
        ("structured_output", state.grammar is not None), ("allowed_token_ids", bool(params.allowed_token_ids)),
        ("bad_words", bool(state.bad_words_token_ids)),
        ("min_tokens", params.min_tokens > 0 and bool(state.banned_token_ids)),
    ) if is_set]
    return SequenceFailure(causes[0] if causes else "sampling_params",
                           f"no token satisfies {' and '.join(causes) or 'the constraints'} at once: every token "
                           "was excluded")


class ModelRunner:
    """Queues steps of one model over one KV pool; never changes sequence state (the registry records steps).

    Keeps each sequence's latest sampled token on the device, at its table row, so that the next step can be
    queued before the host has read this one's tokens.
    """

    def __init__(self, model: DecoderForCausalLM, pool: KVPool, tables: BlockTableArray, sampler: Sampler,
                 graph_runner: CudaGraphRunner | None = None, piece_runner: PiecewiseGraphRunner | None = None) -> None:
        self.model = model
        self.pool = pool
        self.tables = tables
        self.sampler = sampler
        self.graph_runner = graph_runner
        self.piece_runner = piece_runner
        self._last_tokens = torch.zeros(tables.table.shape[0], dtype=torch.int64, device=pool.device)

    @torch.inference_mode()
    def launch(self, work: list[ScheduledWork], deferred_rows: RowsAtLaunch | None = None) -> LaunchedRun:
        """Queues the forward pass and the sampling (only the forward pass when deferred_rows, the work's rows, are
        given: sample_deferred queues the sampling later); the host reads the sequences' state only during this
        call."""
        sampled_seq_ids = [
            ((state.seq_id, *(fork.seq_id for fork in state.forks)) if state.forks else (state.seq_id,))
            if is_sampling else ()
            for state, _, _, is_sampling in work
        ]
        graph_runner, table_rows, all_logits = self.graph_runner, None, None
        if graph_runner is not None and graph_runner.can_run(work):
            hidden, all_logits = graph_runner.run(work, self.tables, self._last_tokens)
            query_start_loc = np.arange(len(work) + 1, dtype=np.int64)
            table_rows = graph_runner.inputs.table_rows[: len(work)]
        else:
            batch = build_batch(work, self.tables, self.pool.block_size, self.pool.device, self._last_tokens)
            if batch.num_tokens == 0:
                return LaunchedRun(work, sampled_seq_ids, [() for _ in work], None)
            if self.piece_runner is not None and self.piece_runner.can_run(batch):
                hidden = self.piece_runner.run(batch)
            else:
                hidden = self.model(batch.input_ids, batch.positions, batch.meta, self.pool.gpu_cache)
            query_start_loc = batch.query_start_loc
        rows, items = (deferred_rows.rows, deferred_rows.items) if deferred_rows is not None else sampling_rows(work)
        logits = self._sampling_logits(query_start_loc, hidden, items, all_logits) if rows else None
        prompt_logprobs = [
            self._prompt_logprobs(item, int(query_start_loc[index]), hidden)
            if item.state.sampling_params.prompt_logprobs is not None else ()
            for index, item in enumerate(work)
        ]
        if logits is None:
            return LaunchedRun(work, sampled_seq_ids, prompt_logprobs, None, table_rows=table_rows)
        if deferred_rows is not None:
            return LaunchedRun(work, sampled_seq_ids, prompt_logprobs, None, logits, table_rows)
        return LaunchedRun(work, sampled_seq_ids, prompt_logprobs, self.sampler.start(logits, rows),
                           table_rows=table_rows)

    @torch.inference_mode()
    def sample_deferred(self, run: LaunchedRun, masked: MaskedRows, index: torch.Tensor | None) -> None:
        """Queues a deferred run's sampling of its rows as they are now, with their token masks, and stores its
        tokens at their table rows (index: last_token_index's; None: nothing samples), as keep_last_tokens does."""
        if run.deferred_logits is None:
            raise RuntimeError("the run's sampling is not deferred")
        kept = None if index is None else (self._kept_tokens(), index)
        run.sample = self.sampler.start(run.deferred_logits, masked.rows, masked.token_masks, kept)
        run.deferred_logits = None

    def last_token_index(self, run: LaunchedRun, table_rows: list[int]) -> torch.Tensor | None:
        """Where keep_last_tokens stores a run's tokens: table_rows, those of the sequences that sample them
        (reserve()'s order), on the device; None when nothing samples. Made at launch, so that a deferred sampling's
        thread has a copy less to queue. A decode graph run whose every item samples, without siblings, has them on
        the device already."""
        if not table_rows:
            return None
        if run.table_rows is not None and table_rows == [item.state.table_row for item in run.work]:
            return run.table_rows
        return to_device(torch.tensor(table_rows, dtype=torch.int64), self._last_tokens.device)

    def keep_last_tokens(self, run: LaunchedRun, index: torch.Tensor | None) -> None:
        """Stores the run's sampled tokens at their table rows (index: last_token_index's; None: nothing samples)."""
        if index is None:
            return
        if run.sample is None:
            raise RuntimeError("the run's sampling is not queued")
        self._kept_tokens().index_copy_(0, index, run.sample.tokens)

    def _kept_tokens(self) -> torch.Tensor:
        """Each table row's last sampled token on the device, first grown to the table's rows."""
        if len(self._last_tokens) < self.tables.table.shape[0]:
            grown = torch.zeros(self.tables.table.shape[0], dtype=torch.int64, device=self._last_tokens.device)
            grown[: len(self._last_tokens)] = self._last_tokens
            self._last_tokens = grown
        return self._last_tokens

    def _sampling_logits(self, query_start_loc: np.ndarray, hidden: torch.Tensor, items: list[int],
                         all_logits: torch.Tensor | None) -> torch.Tensor:
        """Logits of the sampling rows whose work items are `items` (sampling_rows): each item's last row, where
        query_start_loc (as FlatBatch's) places the items' rows. all_logits: every row's, when a graph computed them."""
        hidden_rows = query_start_loc[1:][items] - 1
        num_rows = int(query_start_loc[-1])
        if len(items) == num_rows and (hidden_rows == np.arange(num_rows)).all():  # every row samples, once
            if all_logits is not None:
                return all_logits
            sampled_hidden = hidden
        else:
            sampled_hidden = hidden[to_device(torch.from_numpy(hidden_rows), hidden.device)]
        return self.model.compute_logits(sampled_hidden)

    def _prompt_logprobs(self, item: ScheduledWork, first_row: int, hidden: torch.Tensor) -> tuple[TokenLogprobs, ...]:
        """Log-probabilities of the prompt tokens that follow this step's prompt positions, when asked.

        Position p predicts prompt token p + 1, so positions [start, min(end, num_prompt - 1)) count.
        """
        state = item.state
        k = state.sampling_params.prompt_logprobs
        start = state.num_computed_tokens
        stop = min(item.end, len(state.prompt_token_ids) - 1)
        if k is None or stop <= start:
            return ()
        rows = torch.arange(first_row, first_row + stop - start, device=hidden.device)
        targets = state.prompt_token_ids[start + 1 : stop + 1]
        return tuple(self.sampler.prompt_logprobs(self.model.compute_logits(hidden[rows]), targets, k))
