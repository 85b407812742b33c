"""Turns one completion's token deltas into stream chunks: detokenize, hold back and match stop strings."""

from __future__ import annotations

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
    the tokens are detokenized once, when the completion ends (the chunks' texts concatenate to the same text).
    """

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
        self._held_token_ids: list[int] | None = [] if text_at_end and not params.stop else None
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
        text, matched_stop = self._stops.feed(self._new_text(delta))
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

    def _new_text(self, delta: SequenceDelta) -> str:
        if self._held_token_ids is None:
            return self._detokenizer.add_tokens(delta.new_token_ids)
        self._held_token_ids.extend(delta.new_token_ids)
        if delta.finish_reason is None:
            return ""
        return self._detokenizer.add_tokens(self._held_token_ids)
