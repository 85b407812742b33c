"""The public request's bounds, checked before any expensive work: the text-length bound from the tokenizer's
longest piece, request ids, prompt sizes, n against max_num_seqs, stop lists, and strict decoding of the bytes."""

from __future__ import annotations

import asyncio
import json
import math
import random
import shutil
import time
from pathlib import Path

import pytest

from pagedserve.contract.sampling_params import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    validate_prompt,
)
from pagedserve.control_plane.errors import InvalidArgumentError
from pagedserve.control_plane.frontend.convert import (
    MAX_REQUEST_ID_CHARS,
    RequestLimits,
    check_n,
    check_prompt_size,
    check_request_id,
    check_text_length,
    decode_request,
)
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import common_pb2, generation_service_pb2

pb = generation_service_pb2
LIMITS = RequestLimits(vocab_size=512, max_model_len=512, max_chars_per_token=7, max_num_seqs=8)


@pytest.fixture(scope="module")
def stories(stories260k_dir: Path) -> Tokenizer:
    return Tokenizer(stories260k_dir)


@pytest.fixture(scope="module")
def llama2(llama2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_dir)


def _tokenizer_with(tmp_path: Path, source: Path, **changes: object) -> Tokenizer:
    """The tokenizer of source with top-level tokenizer.json entries replaced."""
    for path in source.iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            shutil.copy(path, tmp_path / path.name)
    config = json.loads((tmp_path / "tokenizer.json").read_text())
    config.update(changes)
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    return Tokenizer(tmp_path)


# --- the text-length bound ---------------------------------------------------------------------------------------


def test_longest_piece_counts_the_space_marker_as_one_character(stories: Tokenizer, llama2: Tokenizer) -> None:
    # stories260K's longest pieces are "▁little" and "▁friend"; Llama 2's are 16 characters. A byte piece such
    # as <0xE4> (6 characters) stands for one byte of text, at most one character.
    assert (stories.max_chars_per_token, llama2.max_chars_per_token) == (7, 16)


@pytest.mark.parametrize("name", ["stories", "llama2"])
def test_no_text_has_fewer_tokens_than_its_length_over_the_longest_piece(name: str, request) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(name)
    bound = tokenizer.max_chars_per_token
    assert bound is not None
    pieces = [p for p in tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size)) if p]
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(p.replace("▁", " ") for p in rng.choices(pieces, k=rng.randint(1, 40)))
        text += rng.choice(["", "é漢字\n\t  ", "  ", "<s></s>"])
        assert len(tokenizer.encode(text, add_special_tokens=False)) >= math.ceil(len(text) / bound), text


def test_a_normalizer_that_composes_characters_widens_the_bound(tmp_path: Path, stories260k_dir: Path) -> None:
    tokenizer = _tokenizer_with(tmp_path, stories260k_dir, normalizer={"type": "NFC"})
    assert tokenizer.max_chars_per_token == 7 * 4  # NFC composes up to 4 code points into one


@pytest.mark.parametrize("changes", [
    {"normalizer": {"type": "Strip", "strip_left": True, "strip_right": True}},
    {"normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": ""}},
    {"pre_tokenizer": {"type": "Whitespace"}},
    {"pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": False}},
], ids=["strip", "replace-by-nothing", "whitespace", "split-removed"])
def test_a_tokenizer_that_can_drop_characters_has_no_bound(
    tmp_path: Path, stories260k_dir: Path, changes: dict[str, object]
) -> None:
    assert _tokenizer_with(tmp_path, stories260k_dir, **changes).max_chars_per_token is None


def test_text_beyond_max_model_len_times_the_longest_piece_is_rejected_by_length_alone() -> None:
    check_text_length("x" * 512 * 7, "prompt", LIMITS)
    with pytest.raises(InvalidArgumentError) as info:
        check_text_length("x" * (512 * 7 + 1), "prompt", LIMITS)
    assert str(info.value) == (
        "prompt: text of 3585 characters cannot fit the maximum model length of 512 tokens (at most 3584 "
        "characters: no token of this model stands for more than 7)"
    )


def test_without_a_bound_any_text_length_passes_the_length_check() -> None:
    check_text_length("x" * 10_000_000, "text", RequestLimits(512, 512, max_chars_per_token=None))


def test_tokenizing_on_a_thread_leaves_the_event_loop_running(stories: Tokenizer) -> None:
    """encode() releases the interpreter lock: a long text tokenized on a thread does not stall the loop."""
    text = "Once upon a time there was a little dog. " * 60_000  # 2.5 MB: about a second of tokenizing

    async def longest_gap_while_tokenizing() -> float:
        task = asyncio.get_running_loop().run_in_executor(None, stories.encode, text)
        longest, last = 0.0, time.perf_counter()
        while not task.done():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        assert len(await task) > 100_000
        return longest

    assert asyncio.run(longest_gap_while_tokenizing()) < 0.25  # holding the lock, the gap was the whole encode


# --- request ids, prompt sizes, n ---------------------------------------------------------------------------------


def test_request_id_up_to_the_limit_is_accepted() -> None:
    check_request_id("r" * MAX_REQUEST_ID_CHARS)
    check_request_id("")


def test_an_oversized_request_id_is_rejected_without_being_echoed() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        check_request_id("secret-" * 150_000)
    assert str(info.value) == "request_id: must be at most 256 characters, got 1050000"


@pytest.mark.parametrize("request_id", ["a\nb", "a\x00b", "\x1b[31m"])
def test_a_request_id_with_control_characters_is_rejected(request_id: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        check_request_id(request_id)
    assert str(info.value) == "request_id: must be printable (no control characters or line breaks)"


def test_a_token_id_prompt_longer_than_the_context_is_rejected_before_its_ids_are_read() -> None:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[600] * 513))
    with pytest.raises(InvalidArgumentError) as info:
        check_prompt_size(request, LIMITS)
    assert str(info.value) == "prompt: the prompt (length 513) is longer than the maximum model length of 512"


def test_validate_prompt_checks_the_length_before_the_ids() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_prompt([10**9] * 513, vocab_size=512, max_model_len=512)
    assert "longer than the maximum model length" in str(info.value)


def test_n_may_not_exceed_the_servers_max_num_seqs() -> None:
    check_n(SamplingParams(n=8), LIMITS)
    with pytest.raises(InvalidArgumentError) as info:
        check_n(SamplingParams(n=9), LIMITS)
    assert str(info.value) == "n: must be at most max_num_seqs=8 of this server, got 9"


# --- stop lists and logit_bias ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"stop": ("x",) * (MAX_STOP_STRINGS + 1)}, "stop: at most 64 strings, got 65"),
    ({"stop": ("x" * (MAX_STOP_STRING_CHARS + 1),)}, "stop: each string at most 1024 characters, got one of 1025"),
    ({"stop_token_ids": (5,) * (MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids: at most 1024 ids, got 1025"),
])
def test_stop_lists_are_bounded(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_stop_lists_at_their_limits_are_accepted() -> None:
    SamplingParams(stop=("x" * MAX_STOP_STRING_CHARS,) * MAX_STOP_STRINGS, stop_token_ids=(5,) * MAX_STOP_TOKEN_IDS)


def test_logit_bias_has_at_most_one_entry_per_vocabulary_id() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(logit_bias={i: 1.0 for i in range(513)}).validate(512, 512, 4)
    assert str(info.value) == "logit_bias: at most one entry per vocabulary id (512), got 513"


# --- strict decoding ----------------------------------------------------------------------------------------------


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return bytes([number << 3 | wire_type]) + payload


def _decode_error(data: bytes, message_type: type = pb.GenerateRequest) -> str:
    with pytest.raises(InvalidArgumentError) as info:
        decode_request(message_type, data)
    return str(info.value)


def test_a_valid_request_decodes_as_the_parser_reads_it() -> None:
    request = pb.GenerateRequest(text="Hi", sampling_params=common_pb2.SamplingParams(n=2, logit_bias={3: 1.0}))
    assert decode_request(pb.GenerateRequest, request.SerializeToString()) == request


def test_an_unknown_top_level_field_is_rejected_naming_its_number() -> None:
    data = pb.GenerateRequest(text="Hi").SerializeToString() + _field(6, 0, b"\x05")
    assert _decode_error(data) == ("unsupported GenerateRequest: unknown field number 6 in GenerateRequest "
                                   "(pagedserve.v1.GenerateRequest), not supported by this server")


def test_a_newer_clients_sampling_field_is_rejected_not_ignored() -> None:
    params = common_pb2.SamplingParams(n=2).SerializeToString() + bytes([0x98, 0x06, 4])  # field 99 = 4
    data = _field(4, 2, bytes([len(params)]) + params)
    assert _decode_error(data) == ("unsupported GenerateRequest: unknown field number 99 in sampling_params "
                                   "(pagedserve.v1.SamplingParams), not supported by this server")


def test_a_known_field_with_the_wrong_wire_type_is_rejected() -> None:
    assert _decode_error(_field(2, 0, b"\x05")) == (
        "unsupported GenerateRequest: field text (2) was sent with wire type 0, which does not match its type")


@pytest.mark.parametrize(("data", "message"), [
    (_field(2, 2, b"\x02\xff\xfe"),
     "malformed GenerateRequest: field text (2) is not valid UTF-8 (byte 0 of the string)"),
    (_field(1, 2, b"\x03ab\xc3"),
     "malformed GenerateRequest: field request_id (1) is not valid UTF-8 (byte 2 of the string)"),
    (_field(4, 2, b"\x04" + _field(10, 2, b"\x02\xc3\x28")),
     "malformed GenerateRequest: field sampling_params.stop (10) is not valid UTF-8 (byte 0 of the string)"),
    (b"\xff\xff\xff", "malformed GenerateRequest: truncated field tag at byte 0"),
    (_field(2, 2, b"\x10abc"), "malformed GenerateRequest: field text (2) is truncated (at byte 0 of 5)"),
    (_field(3, 2, b"\x03" + _field(1, 2, b"\x05\x01")),
     "malformed GenerateRequest: field token_ids.ids (1) is truncated (at byte 0 of 3)"),
    (b"\x02\x00", "malformed GenerateRequest: field number 0 at byte 0"),
    (_field(1, 7, b""), "malformed GenerateRequest: field request_id (1) has wire type 7, which proto3 messages do "
                        "not use"),
], ids=["text-utf8", "request-id-utf8", "stop-utf8", "garbage", "truncated-string", "truncated-nested", "field-0",
        "wire-type-7"])
def test_malformed_bytes_are_rejected_naming_the_defect(data: bytes, message: str) -> None:
    assert _decode_error(data) == message


def test_every_public_request_type_rejects_unknown_fields() -> None:
    for message_type in (pb.TokenizeRequest, pb.GetModelInfoRequest, pb.GetServerStatusRequest):
        assert "unknown field number 9" in _decode_error(_field(9, 0, b"\x01"), message_type)
