"""CompletionStream: a consumer that reads only the whole result gets the same text, detokenized once at the end."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import TokenLogprobs
from pagedserve.control_plane.scheduling.request import FinishReason, SequenceDelta
from pagedserve.control_plane.text.completion import CompletionChunk, CompletionStream
from pagedserve.control_plane.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llama2(llama2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_dir)


def _stream(tokenizer: Tokenizer, prompt: tuple[int, ...], output: list[int], params: SamplingParams,
            text_at_end: bool) -> list[CompletionChunk]:
    completion = CompletionStream("r", 0, tokenizer, prompt, params, text_at_end=text_at_end)
    chunks = []
    for position, token_id in enumerate(output):
        finish = FinishReason.LENGTH if position == len(output) - 1 else None
        chunk = completion.apply(SequenceDelta("r", 0, (token_id,), (), (), finish))
        if chunk is not None:
            chunks.append(chunk)
        if completion.is_finished:
            break
    return chunks


@pytest.mark.parametrize("seed", range(5))
def test_text_at_end_is_one_chunk_of_the_streamed_text_and_every_token(llama2: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    byte_ids = sorted(llama2.byte_token_ids)
    prompt = tuple(llama2.encode("Once upon a time", add_special_tokens=True))
    output = [rng.choice(byte_ids) if rng.random() < 0.3 else rng.randrange(llama2.vocab_size) for _ in range(60)]
    params = SamplingParams(max_tokens=len(output))

    streamed = _stream(llama2, prompt, output, params, text_at_end=False)
    at_end = _stream(llama2, prompt, output, params, text_at_end=True)

    (chunk,) = at_end
    assert chunk.text == "".join(c.text for c in streamed)
    assert list(chunk.token_ids) == output
    assert chunk.finish_reason is FinishReason.LENGTH


def test_text_at_end_gathers_the_log_probabilities_and_the_stop_token(llama2: Tokenizer) -> None:
    prompt_logprobs = (TokenLogprobs(450, -1.5, 2),)
    logprobs = [TokenLogprobs(token_id, -0.5 * token_id, 1) for token_id in (1701, 338, 2)]
    deltas = [SequenceDelta("r", 0, (1701,), (logprobs[0],), prompt_logprobs, None),
              SequenceDelta("r", 0, (338,), (logprobs[1],), (), None),
              SequenceDelta("r", 0, (2,), (logprobs[2],), (), FinishReason.STOP, stop_token_id=2)]
    streamed = CompletionStream("r", 0, llama2, (1, 450), SamplingParams(max_tokens=3))
    at_end = CompletionStream("r", 0, llama2, (1, 450), SamplingParams(max_tokens=3), text_at_end=True)

    streamed_chunks = [streamed.apply(delta) for delta in deltas]
    held = [at_end.apply(delta) for delta in deltas[:2]]
    last = at_end.apply(deltas[2])

    assert held == [None, None]
    assert last is not None
    assert (last.token_ids, last.logprobs, last.prompt_logprobs) == ((1701, 338, 2), tuple(logprobs), prompt_logprobs)
    assert last.text == "".join(c.text for c in streamed_chunks if c is not None) != ""
    assert (last.finish_reason, last.stop_reason, at_end.num_tokens) == (FinishReason.STOP, "2", 3)


def test_stop_strings_still_see_the_text_as_it_grows(llama2: Tokenizer) -> None:
    prompt = tuple(llama2.encode("Once upon a time", add_special_tokens=True))
    output = llama2.encode(" there was a little dog who liked to run", add_special_tokens=False)
    params = SamplingParams(max_tokens=len(output), stop=("little",))

    chunks = _stream(llama2, prompt, output, params, text_at_end=True)

    assert "".join(c.text for c in chunks) == " there was a "
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == (FinishReason.STOP, "little")
