"""Turns a batch of logits into next tokens and log-probabilities, with vLLM's sampling semantics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import TokenLogprobs
from pagedserve.gpu_worker.bad_words import bad_word_bans
from pagedserve.gpu_worker.grammar import GrammarCompiler, SequenceGrammar, fill_token_masks
from pagedserve.gpu_worker.held_lock_argmax import ArgmaxInto, HeldLockArgmax
from pagedserve.gpu_worker.host_transfer import DeviceToHost, to_device
from pagedserve.gpu_worker.logits_processors import (
    apply_allowed,
    apply_bans,
    apply_logit_bias,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    token_id_tensor,
)
from pagedserve.kernels.ops import KernelOps, get_kernel_ops
from pagedserve.kernels.token_masks import mask_words

_MASK_64 = (1 << 64) - 1


class SamplingRow(NamedTuple):
    """One row of a sampling batch: a sequence's parameters, the tokens it may not sample yet, its tokens so far.

    A row built by `of` (the worker keeps one per sequence, over its live output list) also knows from how many
    outputs it is a plain argmax, so a batch of such rows skips the per-row plan; one built directly never does.
    """

    params: SamplingParams
    banned_token_ids: tuple[int, ...]  # unsampleable while fewer than params.min_tokens outputs exist
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # tokens generated so far
    sample_index: int = 0  # sibling index for n > 1
    grammar: SequenceGrammar | None = None  # structured output, having accepted output_token_ids
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # Outputs from which the row is an argmax of its logits (under its grammar's mask when it has one); None: never.
    greedy_from: int | None = None

    @classmethod
    def of(cls, params: SamplingParams, banned_token_ids: tuple[int, ...], prompt_token_ids: Sequence[int],
           output_token_ids: Sequence[int], sample_index: int = 0, grammar: SequenceGrammar | None = None,
           bad_words_token_ids: tuple[tuple[int, ...], ...] = ()) -> SamplingRow:
        """The row with greedy_from worked out: a greedy row that asks for no logprobs and changes no logit but by
        its grammar (no penalties, allowed ids, biases or bad words) is an argmax under its grammar's mask once its
        min-tokens bans are over."""
        is_argmax = params.is_greedy and params.logprobs is None and not (
            params.has_penalties or params.allowed_token_ids or params.logit_bias or bad_words_token_ids)
        greedy_from = (params.min_tokens if banned_token_ids else 0) if is_argmax else None
        return cls(params, banned_token_ids, prompt_token_ids, output_token_ids, sample_index, grammar,
                   bad_words_token_ids, greedy_from)


@dataclass(frozen=True, slots=True)
class SampleResult:
    """One token per row, and per row its logprobs when the row asked for them. A row in no_choice had every token
    excluded by its grammar, allowed ids and bans together: its token is the device's stand-in, not a sample."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    no_choice: frozenset[int] = frozenset()


def _stream_seed(seed: int, sample_index: int, num_output_tokens: int) -> int:
    """A 64-bit generator seed that depends only on the three arguments (splitmix64 chained over them)."""
    state = 0
    for value in (seed, sample_index, num_output_tokens):
        state = (state ^ value) & _MASK_64
        state = (state + 0x9E3779B97F4A7C15) & _MASK_64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK_64
        state ^= state >> 31
    return state


class PendingSample:
    """A batch's sampled tokens: on the device at once, on the host (with their logprobs) once `result()` is called.

    The next step can read `tokens` on the device before the host has them.
    """

    def __init__(self, tokens: torch.Tensor, packed: torch.Tensor | DeviceToHost, logprob_ks: list[tuple[int, int]],
                 has_choice_flags: bool = False) -> None:
        self.tokens = tokens  # [rows] int64, on the device
        # The tokens (then the flags and logprobs) on their way to the host, or a copy of them already queued.
        self._transfer = packed if isinstance(packed, DeviceToHost) else DeviceToHost.start(packed)
        self._logprob_ks = logprob_ks  # (row, k) of each row that asked for logprobs; packed after the tokens
        self._has_choice_flags = has_choice_flags  # packed after the tokens: 1 per row left without a token

    def result(self) -> SampleResult:
        values = self._transfer.tolist()
        num_rows = self.tokens.shape[0]
        logprobs: list[TokenLogprobs | None] = [None] * num_rows
        if not self._logprob_ks and not self._has_choice_flags:
            return SampleResult(values, logprobs)
        no_choice: frozenset[int] = frozenset()
        if self._has_choice_flags:
            no_choice = frozenset(row for row, flag in enumerate(values[num_rows:2 * num_rows]) if flag)
            values = values[:num_rows] + values[2 * num_rows:]
        if self._logprob_ks:
            ks = [k for _, k in self._logprob_ks]
            for (row, _), entry in zip(self._logprob_ks, _unpack_logprobs(values[num_rows:], ks, max(ks)),
                                       strict=True):
                logprobs[row] = entry
        return SampleResult([int(t) for t in values[:num_rows]], logprobs, no_choice)


@dataclass(slots=True)
class _BatchPlan:
    """What one batch needs, decided on the host before any device work is queued."""

    # Per row: temperature, top_k, top_p, min_p, is_greedy.
    params: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    banned: list[Sequence[int]] = field(default_factory=list)
    has_bans: bool = False
    allowed: list[Sequence[int]] = field(default_factory=list)  # empty: every token
    has_allowed: bool = False
    has_grammar: bool = False
    biases: list[Mapping[int, float]] = field(default_factory=list)
    has_biases: bool = False
    num_greedy: int = 0
    has_top_k_top_p: bool = False
    max_top_k: int = 1  # over the rows that sample
    has_min_p: bool = False
    penalty_rows: list[int] = field(default_factory=list)
    seeded_rows: list[tuple[int, int]] = field(default_factory=list)  # (row, stream seed)
    logprob_rows: list[int] = field(default_factory=list)

    @property
    def num_random(self) -> int:
        return len(self.params) - self.num_greedy

    @property
    def has_logit_changes(self) -> bool:
        return bool(self.has_bans or self.has_biases or self.penalty_rows or self.has_allowed or self.has_grammar)

    @property
    def can_exclude_every_token(self) -> bool:
        """Whether a row's grammar, allowed ids and bans (the changes that exclude tokens) may leave it none."""
        return self.has_bans or self.has_allowed or self.has_grammar


def _keep(tokens: torch.Tensor, kept: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """kept's tokens[index[row]] = tokens[row] (Sampler.start's kept)."""
    if kept is not None:
        kept[0].index_copy_(0, kept[1], tokens)


def _is_greedy(rows: Sequence[SamplingRow]) -> bool:
    """Whether every row is an argmax now (of its raw logits, or under its grammar's mask), as greedy_from tells."""
    for row in rows:
        greedy_from = row.greedy_from
        if greedy_from is None or len(row.output_token_ids) < greedy_from:
            return False
    return True


def _plan(rows: Sequence[SamplingRow], vocab_size: int) -> _BatchPlan:
    plan = _BatchPlan()
    for index, row in enumerate(rows):
        options = row.params
        num_output = len(row.output_token_ids)
        banned = list(row.banned_token_ids) if num_output < options.min_tokens else []
        if row.bad_words_token_ids:
            banned += bad_word_bans(row.bad_words_token_ids, row.output_token_ids)
        plan.banned.append(banned)
        plan.has_bans |= bool(banned)
        plan.allowed.append(options.allowed_token_ids)
        plan.has_allowed |= bool(options.allowed_token_ids)
        plan.has_grammar |= row.grammar is not None
        plan.biases.append(options.logit_bias)
        plan.has_biases |= bool(options.logit_bias)
        if options.has_penalties:
            plan.penalty_rows.append(index)
        if options.logprobs is not None:
            plan.logprob_rows.append(index)
        if options.is_greedy:
            plan.num_greedy += 1
            # A greedy row's sample is discarded; top_k 1 keeps it from forcing a full sort.
            plan.params.append((1.0, 1, 1.0, 0.0, 1.0))
            continue
        top_k = options.top_k if 0 < options.top_k < vocab_size else vocab_size
        plan.params.append((options.temperature, top_k, options.top_p, options.min_p, 0.0))
        plan.has_top_k_top_p |= top_k < vocab_size or options.top_p < 1.0
        plan.max_top_k = max(plan.max_top_k, top_k)
        plan.has_min_p |= options.min_p > 0.0
        if options.seed is not None:
            plan.seeded_rows.append((index, _stream_seed(options.seed, row.sample_index, num_output)))
    return plan


class Sampler:
    """Samples one token per row of a logits batch; stateless apart from its shared generator.

    Invariants: the input logits are never modified; a seeded row's token depends only on its own
    logits, options, sample_index and number of output tokens; each batch makes exactly one
    device-to-host transfer of its results, which waits for nothing queued after it.
    """

    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0,
                 grammars: GrammarCompiler | None = None, ops: KernelOps | None = None,
                 logits_dtype: torch.dtype = torch.float32) -> None:
        self._vocab_size = vocab_size
        self._device = device
        self._grammars = grammars
        self._ops = ops if ops is not None else get_kernel_ops(device)
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        self._compile_ops(logits_dtype)
        # A deferred greedy batch under grammar masks is queued without letting the interpreter lock go (CUDA).
        self._held = HeldLockArgmax(vocab_size, device, self._ops) if (
            device.type == "cuda" and grammars is not None and isinstance(self._ops, ArgmaxInto)) else None

    def _compile_ops(self, logits_dtype: torch.dtype) -> None:
        """Runs the argmax of a greedy batch (masked or not: one kernel) on logits of the model's dtype once, and
        with a grammar compiler the masking of float32 logits, so that their kernels are compiled before the first
        step that needs them."""
        self._ops.masked_argmax(torch.zeros((1, self._vocab_size), dtype=logits_dtype, device=self._device), None)
        if self._grammars is not None:
            masks = torch.full((1, mask_words(self._vocab_size)), -1, dtype=torch.int32, device=self._device)
            self._ops.apply_token_masks(torch.zeros((1, self._vocab_size), device=self._device), masks)

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
        """Next token per row. logits: [len(rows), vocab] float32 or the model's dtype, on the sampler's device."""
        return self.start(logits, rows).result()

    def start(self, logits: torch.Tensor, rows: Sequence[SamplingRow], token_masks: torch.Tensor | None = None,
              kept: tuple[torch.Tensor, torch.Tensor] | None = None) -> PendingSample:
        """Queues the sampling of one token per row on the device; the host reads rows only during this call.
        token_masks: the rows' masks (token_masks(rows)) when computed ahead, else computed here. kept: (tokens,
        index), each row's token also written at tokens[index[row]] on the device. A greedy batch reads the logits
        in their own dtype (its argmax is the same); the rest of the sampling is float32."""
        self._check_logits(logits, len(rows))
        if _is_greedy(rows):  # the usual greedy batch, constrained or not: no per-row plan
            if token_masks is not None and self._held is not None and self._held.owns(token_masks):
                tokens, transfer = self._held.start(logits, token_masks, kept)
                return PendingSample(tokens, transfer, [])
            tokens = self._ops.masked_argmax(logits, self._device_masks(rows, token_masks))
            _keep(tokens, kept)
            return PendingSample(tokens, tokens, [])
        logits = logits.float()
        plan = _plan(rows, self._vocab_size)
        processed = self._processed(logits, rows, plan, token_masks)
        tokens = self._choose(processed, plan)
        _keep(tokens, kept)
        # A row whose every logit is -inf has no token to sample: its stand-in (a valid id, which the next step may
        # read on the device) is flagged, so that the host ends its sequence rather than report the stand-in.
        no_choice = (processed == -torch.inf).all(dim=-1) if plan.can_exclude_every_token else None
        if not plan.logprob_rows:
            packed = tokens if no_choice is None else torch.cat([tokens, no_choice.long()])
            return PendingSample(tokens, packed, [], no_choice is not None)
        return self._with_logprobs(logits, tokens, rows, plan, no_choice)

    def prompt_logprobs(
        self, logits: torch.Tensor, target_token_ids: Sequence[int], k: int
    ) -> list[TokenLogprobs]:
        """Logprob, rank and top-k of each target under raw logits. logits: [P, vocab] (float32 or the model's
        dtype, computed in float32) at the prompt positions; target i is the token that follows position i."""
        self._check_logits(logits, len(target_token_ids))
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        targets = token_id_tensor(target_token_ids, self._vocab_size).to(logits.device)
        k = min(k, self._vocab_size)
        table = _logprob_table(logits.log_softmax(dim=-1, dtype=torch.float32), targets, k)
        return _unpack_logprobs(table.flatten().tolist(), [k] * len(target_token_ids), k)

    def _check_logits(self, logits: torch.Tensor, num_rows: int) -> None:
        if logits.dim() != 2 or logits.shape[0] != num_rows or logits.shape[1] != self._vocab_size:
            raise ValueError(
                f"logits must have shape [{num_rows}, {self._vocab_size}], got {list(logits.shape)}"
            )

    def token_masks(self, rows: Sequence[SamplingRow], deferred: bool = False) -> torch.Tensor | None:
        """The rows' bitmasks on the host (a row without a grammar allows every token), None when no row has a
        grammar; waits for a grammar still compiling. The host work of a grammar row's sampling, which start() then
        needs no more. deferred: for a sampling queued later from the same thread, one at a time (the worker's masks
        thread): a greedy batch's masks then go into the held-lock argmax's buffers when they are free."""
        grammars = [row.grammar for row in rows]
        if all(grammar is None for grammar in grammars):
            return None
        if self._grammars is None:
            raise RuntimeError("a row has a grammar but the sampler has no grammar compiler")
        out = self._held.host_masks(len(rows)) if deferred and self._held is not None and _is_greedy(rows) else None
        return fill_token_masks(self._grammars, grammars, self._vocab_size, pin_memory=self._device.type == "cuda",
                                out=out)

    def _device_masks(self, rows: Sequence[SamplingRow], token_masks: torch.Tensor | None) -> torch.Tensor | None:
        """The rows' bitmasks (token_masks when computed ahead) on the device; None when no row has a grammar."""
        masks = token_masks if token_masks is not None else self.token_masks(rows)
        return None if masks is None else to_device(masks, self._device)

    def _processed(self, logits: torch.Tensor, rows: Sequence[SamplingRow], plan: _BatchPlan,
                   token_masks: torch.Tensor | None) -> torch.Tensor:
        """The logits after grammar masks, allowed tokens, bans, logit biases and penalties (vLLM's order): a copy
        when one applies, else `logits` itself."""
        if not plan.has_logit_changes:
            return logits
        work = logits.clone(memory_format=torch.contiguous_format)  # bans and biases write through a flat view
        masks = self._device_masks(rows, token_masks) if plan.has_grammar else None
        if masks is not None:
            self._ops.apply_token_masks(work, masks)
        if plan.has_allowed:
            apply_allowed(work, plan.allowed)
        if plan.has_bans:
            apply_bans(work, plan.banned)
        if plan.has_biases:
            apply_logit_bias(work, plan.biases)
        if plan.penalty_rows:
            is_whole_batch = len(plan.penalty_rows) == len(rows)
            index = None if is_whole_batch else torch.tensor(plan.penalty_rows, device=logits.device)
            subset = work if index is None else work[index]
            _penalise(subset, [rows[i] for i in plan.penalty_rows])
            if index is not None:
                work[index] = subset
        return work

    def _choose(self, logits: torch.Tensor, plan: _BatchPlan) -> torch.Tensor:
        """[rows] int64: argmax for greedy rows, a filtered sample for the others."""
        greedy_tokens = logits.argmax(dim=-1) if plan.num_greedy else None
        if greedy_tokens is not None and not plan.num_random:
            return greedy_tokens
        params = to_device(torch.tensor(plan.params, dtype=torch.float32), logits.device)
        scaled = logits / params[:, 0:1]
        if plan.has_top_k_top_p:
            apply_top_k_top_p(scaled, params[:, 1].long(), params[:, 2], plan.max_top_k)
        if plan.has_min_p:
            apply_min_p(scaled, params[:, 3])
        probs = scaled.softmax(dim=-1)
        # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks token i with probability p_i,
        # without multinomial's cumulative sum and without a host sync.
        sampled = probs.div_(self._exponential_noise(probs, plan)).argmax(dim=-1)
        if greedy_tokens is None:
            return sampled
        return torch.where(params[:, 4] > 0.0, greedy_tokens, sampled)

    def _exponential_noise(self, probs: torch.Tensor, plan: _BatchPlan) -> torch.Tensor:
        noise = torch.empty_like(probs)
        if len(plan.seeded_rows) < probs.shape[0]:
            noise.exponential_(generator=self._generator)
        for row, seed in plan.seeded_rows:
            # A fresh generator per seeded row and step: its noise cannot depend on the batch or history.
            generator = torch.Generator(device=probs.device)
            generator.manual_seed(seed)
            noise[row].exponential_(generator=generator)
        # A zero draw would turn p / E into inf (or nan where p == 0).
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _with_logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, rows: Sequence[SamplingRow], plan: _BatchPlan,
        no_choice: torch.Tensor | None,
    ) -> PendingSample:
        """Packs tokens, the rows left without a token (when flagged) and logprob tables into one tensor so one
        transfer brings them all back."""
        is_whole_batch = len(plan.logprob_rows) == len(rows)
        index = None if is_whole_batch else to_device(torch.tensor(plan.logprob_rows), logits.device)
        raw = logits if index is None else logits[index]
        chosen = tokens if index is None else tokens[index]
        ks = [min(rows[i].params.logprobs or 0, self._vocab_size) for i in plan.logprob_rows]
        table = _logprob_table(raw.log_softmax(dim=-1), chosen, max(ks))
        flags = [] if no_choice is None else [no_choice.double()]
        packed = torch.cat([tokens.double(), *flags, table.flatten()])
        return PendingSample(tokens, packed, list(zip(plan.logprob_rows, ks, strict=True)), no_choice is not None)


def _penalise(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Applies each row's penalties to its logits row in place; logits: [len(rows), vocab]."""
    options = [row.params for row in rows]
    apply_penalties(
        logits,
        # The prompt only matters to the repetition penalty; skipping it saves the longest transfer.
        [row.prompt_token_ids if o.repetition_penalty != 1.0 else () for row, o in zip(rows, options, strict=True)],
        [row.output_token_ids for row in rows],
        [o.repetition_penalty for o in options],
        [o.frequency_penalty for o in options],
        [o.presence_penalty for o in options],
    )


def _logprob_table(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> torch.Tensor:
    """[rows, 3 + 2k] float64: token id, its logprob, its rank, k top logprobs, k top ids.

    logprobs: [rows, vocab] float32 log-softmax; token_ids: [rows] int64. float64 holds every id,
    rank and float32 logprob exactly, so one tensor can carry them all.
    """
    chosen = logprobs.gather(1, token_ids.unsqueeze(-1))
    rank = (logprobs > chosen).sum(dim=-1, keepdim=True) + 1
    top = logprobs.topk(k, dim=-1)
    columns = (token_ids.unsqueeze(-1), chosen, rank, top.values, top.indices)
    return torch.cat([column.double() for column in columns], dim=1)


def _unpack_logprobs(values: list[float], ks: Sequence[int], k_max: int) -> list[TokenLogprobs]:
    """Reads the rows of a flattened `_logprob_table` of width 3 + 2 * k_max, keeping ks[r] top entries."""
    width = 3 + 2 * k_max
    result = []
    for row, k in enumerate(ks):
        entry = values[row * width : (row + 1) * width]
        top_ids = entry[3 + k_max : 3 + k_max + k]
        top_token_ids = tuple(int(t) for t in top_ids)
        result.append(TokenLogprobs(int(entry[0]), entry[1], int(entry[2]), top_token_ids, tuple(entry[3 : 3 + k])))
    return result
