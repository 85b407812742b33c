"""One request's chunks (GenerationService's GenerateResponse) -> vLLM's GenerateResponse messages: streamed deltas
(GenerateStreamChunk) and one GenerateComplete per completion, as vLLM's engine protocol defines them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from smg_grpc_proto.generated import vllm_engine_pb2 as vllm

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.v1 import common_pb2
from pagedserve.v1 import generation_service_pb2 as pb

_FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


@dataclass(slots=True)
class _Completion:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)
    finish_reason: str = ""
    stop_reason: str = ""
    has_streamed: bool = False


class VllmResponses:
    """The vLLM messages of one request, built from its chunks in order.

    stream: every chunk with tokens becomes a GenerateStreamChunk (delta tokens, their logprobs, completion_tokens
    the delta's count); the first of each completion also carries the prompt's logprobs. Not streamed: nothing
    until the end. Either way each completion ends with one GenerateComplete (all its tokens, finish reason,
    matched stop, token counts), all sent when the request's last chunk brings its usage, so that cached_tokens
    is exact in each; a stream's chunks carry cached_tokens 0 (the engine reports the cache hit with the usage).
    """

    def __init__(self, prompt_token_ids: Sequence[int], params: SamplingParams, stream: bool) -> None:
        self._prompt_token_ids = prompt_token_ids
        self._params = params
        self._stream = stream
        self._completions = [_Completion() for _ in range(params.n)]
        self._prompt_logprobs: list[common_pb2.TokenLogprobs] = []

    def feed(self, chunk: pb.GenerateResponse) -> list[vllm.GenerateResponse]:
        """The messages chunk adds (the request's last chunk, with usage, adds the GenerateComplete ones)."""
        completion = self._completions[chunk.index]
        self._prompt_logprobs.extend(chunk.prompt_logprobs)
        completion.token_ids.extend(chunk.token_ids)
        completion.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason:
            completion.finish_reason = _FINISH_REASONS[chunk.finish_reason]
            completion.stop_reason = chunk.stop_reason
        messages = []
        if self._stream and chunk.token_ids:
            messages.append(vllm.GenerateResponse(chunk=vllm.GenerateStreamChunk(
                token_ids=chunk.token_ids, prompt_tokens=len(self._prompt_token_ids),
                completion_tokens=len(chunk.token_ids), output_logprobs=self._output_logprobs(chunk.logprobs),
                input_logprobs=None if completion.has_streamed else self._input_logprobs(), index=chunk.index,
            )))
            completion.has_streamed = True
        if chunk.HasField("usage"):
            messages.extend(self._completes(chunk.usage.cached_prompt_tokens))
        return messages

    def aborted(self) -> list[vllm.GenerateResponse]:
        """The GenerateComplete messages of a request aborted from outside (Abort): every completion that had not
        finished ends with finish reason "abort" and the tokens it had."""
        for completion in self._completions:
            completion.finish_reason = completion.finish_reason or "abort"
        return self._completes(cached_tokens=0)

    def _completes(self, cached_tokens: int) -> list[vllm.GenerateResponse]:
        messages = []
        for index, completion in enumerate(self._completions):
            complete = vllm.GenerateComplete(
                output_ids=completion.token_ids, finish_reason=completion.finish_reason,
                prompt_tokens=len(self._prompt_token_ids), completion_tokens=len(completion.token_ids),
                cached_tokens=cached_tokens, index=index,
            )
            output_logprobs, input_logprobs = self._output_logprobs(completion.logprobs), self._input_logprobs()
            if not self._stream and output_logprobs is not None:
                complete.output_logprobs.CopyFrom(output_logprobs)
            if not self._stream and input_logprobs is not None:
                complete.input_logprobs.CopyFrom(input_logprobs)
            self._set_matched_stop(complete, completion)
            messages.append(vllm.GenerateResponse(complete=complete))
        return messages

    def _set_matched_stop(self, complete: vllm.GenerateComplete, completion: _Completion) -> None:
        """vLLM's stop_reason: the stop string or the stop token id that ended the completion (not EOS)."""
        reason = completion.stop_reason
        if completion.finish_reason != "stop" or not reason:
            return
        if reason in self._params.stop:
            complete.matched_stop_str = reason
        elif reason.isdigit() and int(reason) in self._params.stop_token_ids:
            complete.matched_token_id = int(reason)

    def _output_logprobs(self, logprobs: Iterable[common_pb2.TokenLogprobs]) -> vllm.OutputLogProbs | None:
        if self._params.logprobs is None:
            return None
        result = vllm.OutputLogProbs()
        for entry in logprobs:
            result.token_ids.append(entry.token_id)
            result.token_logprobs.append(entry.logprob)
            if self._params.logprobs:
                result.top_logprobs.append(_top(entry))
        return result

    def _input_logprobs(self) -> vllm.InputLogProbs | None:
        """One entry per prompt token, the first without a value (nothing precedes it)."""
        if self._params.prompt_logprobs is None or not self._prompt_logprobs:
            return None
        result = vllm.InputLogProbs(token_ids=self._prompt_token_ids[:1], token_logprobs=[vllm.InputTokenLogProb()])
        if self._params.prompt_logprobs:
            result.top_logprobs.append(vllm.TopLogProbs())
        for entry in self._prompt_logprobs:
            result.token_ids.append(entry.token_id)
            result.token_logprobs.append(vllm.InputTokenLogProb(value=entry.logprob))
            if self._params.prompt_logprobs:
                result.top_logprobs.append(_top(entry))
        return result


def _top(entry: common_pb2.TokenLogprobs) -> vllm.TopLogProbs:
    return vllm.TopLogProbs(values=entry.top_logprobs, token_ids=entry.top_token_ids)
