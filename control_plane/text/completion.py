"""Turns one completion's token deltas into stream chunks: detokenize, hold back and match stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import TokenLogprobs
from pagedserve.control_plane.scheduling.request import FinishReason, SequenceDelta
from pagedserve.control_plane.text.detokenizer import IncrementalDetokenizer
from pagedserve.control_plane.text.stop_strings import StopStringMatcher
from pagedserve.control_plane.text.tokenizer import Tokenizer


class CompletionChunk(NamedTuple):
    """One message of one completion's stream (the frontend numbers the messages it sends)."""

    request_id: str
    completion_index: int  # which of the request's n completions (not `index`: tuple.index)
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprobs, ...] = ()
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()
    finish_reason: FinishReason | None = None
    stop_reason: str = ""


class CompletionStream:
    """State of one completion (one of a request's n): the text so far is exactly what its tokens add to the
    prompt's decode (so a first word keeps its leading space), minus whatever a stop string cut off.
    Emits nothing after it finished.

    text_at_end: the consumer only reads the whole result, so when no stop string needs the text as it grows,
    the completion is held until it ends and then emitted as one chunk: every token, log-probability and prompt
    log-probability, and the text, detokenized once (the same text the streamed chunks would add up to).
    """

    __slots__ = ("request_id", "index", "_detokenizer", "_stops", "_held", "num_tokens", "finish_reason")

    def __init__(
        self, request_id: str, index: int, tokenizer: Tokenizer, prompt_token_ids: tuple[int, ...],
        params: SamplingParams, text_at_end: bool = False,
    ) -> None:
        self.request_id = request_id
        self.index = index
        self._detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, params.skip_special_tokens, params.spaces_between_special_tokens
        )
        self._stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self._held = _Held() if text_at_end and not params.stop else None
        self.num_tokens = 0
        self.finish_reason: FinishReason | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, delta: SequenceDelta) -> CompletionChunk | None:
        """Folds one delta in; returns the chunk to stream, or None when there is nothing to say.

        A matched stop string finishes the completion with STOP; the caller must then tell the scheduler.
        """
        if self.is_finished:
            return None
        self.num_tokens += len(delta.new_token_ids)
        held = self._held
        if held is not None:
            if delta.finish_reason is None and not delta.logprobs and not delta.prompt_logprobs:
                held.token_ids += delta.new_token_ids  # a decode step of an offline request: nothing else to do
                return None
            return self._hold(delta, held)
        text, matched_stop = self._stops.feed(self._detokenizer.add_tokens(delta.new_token_ids))
        finish_reason, stop_reason = delta.finish_reason, ""
        if matched_stop is not None:
            finish_reason, stop_reason = FinishReason.STOP, matched_stop
        elif finish_reason is not None:
            text += self._stops.feed(self._detokenizer.finish())[0] + self._stops.flush()
            if delta.stop_token_id is not None:
                stop_reason = str(delta.stop_token_id)
        self.finish_reason = finish_reason
        if not (text or delta.new_token_ids or finish_reason or delta.prompt_logprobs):
            return None
        return CompletionChunk(
            request_id=self.request_id,
            completion_index=self.index,
            token_ids=delta.new_token_ids,
            text=text,
            logprobs=delta.logprobs,
            prompt_logprobs=delta.prompt_logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
        )

    def _hold(self, delta: SequenceDelta, held: _Held) -> CompletionChunk | None:
        held.token_ids += delta.new_token_ids
        if delta.logprobs:
            held.logprobs += delta.logprobs
        if delta.prompt_logprobs:
            held.prompt_logprobs += delta.prompt_logprobs
        if delta.finish_reason is None:
            return None
        self.finish_reason = delta.finish_reason
        return CompletionChunk(
            request_id=self.request_id,
            completion_index=self.index,
            token_ids=tuple(held.token_ids),
            text=self._detokenizer.add_tokens(held.token_ids) + self._detokenizer.finish(),
            logprobs=tuple(held.logprobs),
            prompt_logprobs=tuple(held.prompt_logprobs),
            finish_reason=delta.finish_reason,
            stop_reason="" if delta.stop_token_id is None else str(delta.stop_token_id),
        )


@dataclass(slots=True)
class _Held:
    """What a completion emitted at its end has gathered so far."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
