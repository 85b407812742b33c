"""Protobuf <-> domain types of the public GenerationService's requests (the rest travel as the relay encodes them):
the bytes decoded strictly, the bounds checked before any expensive work, and the prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet  # type: ignore[import-not-found]  # no stub

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.control_plane.errors import InvalidArgumentError
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import generation_service_pb2

M = TypeVar("M", bound=Message)

# A request id is echoed in every chunk and bound to every log line of its request.
MAX_REQUEST_ID_CHARS = 256


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The bounds a public request meets before it costs anything (tokenizing, the engine's queue)."""

    vocab_size: int
    max_model_len: int  # prompt + output tokens
    max_chars_per_token: int | None  # the tokenizer's L; None: text length bounds nothing
    max_num_seqs: int | None = None  # the scheduler's; a request's n completions count against it

    @property
    def max_text_chars(self) -> int | None:
        """The longest text that could still fit max_model_len tokens: a text of C characters has at least
        ceil(C / L) tokens, so beyond max_model_len * L characters it cannot."""
        return None if self.max_chars_per_token is None else self.max_model_len * self.max_chars_per_token


def check_request_id(request_id: str) -> None:
    """InvalidArgumentError unless the id is short and printable; the id itself is never echoed in the error."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgumentError(
            "request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}"
        )
    if not request_id.isprintable():
        raise InvalidArgumentError("request_id", "must be printable (no control characters or line breaks)")


def check_text_length(text: str, field: str, limits: RequestLimits) -> None:
    """InvalidArgumentError when text has more characters than max_model_len tokens could hold: a check of its
    length alone, before any tokenizing."""
    max_chars = limits.max_text_chars
    if max_chars is not None and len(text) > max_chars:
        raise InvalidArgumentError(
            field,
            f"text of {len(text)} characters cannot fit the maximum model length of {limits.max_model_len} tokens "
            f"(at most {max_chars} characters: no token of this model stands for more than "
            f"{limits.max_chars_per_token})",
        )


def check_prompt_size(request: generation_service_pb2.GenerateRequest, limits: RequestLimits) -> None:
    """The prompt's size bounds, before it is tokenized or its ids are read."""
    which = request.WhichOneof("prompt")
    if which == "text":
        check_text_length(request.text, "prompt", limits)
    elif which == "token_ids" and len(request.token_ids.ids) > limits.max_model_len:
        raise InvalidArgumentError(
            "prompt",
            f"the prompt (length {len(request.token_ids.ids)}) is longer than the maximum model length of "
            f"{limits.max_model_len}",
        )


def check_n(params: SamplingParams, limits: RequestLimits) -> None:
    """n completions run at once on one worker, so n may not exceed the scheduler's max_num_seqs."""
    if limits.max_num_seqs is not None and params.n > limits.max_num_seqs:
        raise InvalidArgumentError(
            "n", f"must be at most max_num_seqs={limits.max_num_seqs} of this server, got {params.n}"
        )


def prompt_from_proto(request: generation_service_pb2.GenerateRequest, tokenizer: Tokenizer) -> tuple[int, ...]:
    """The prompt's token ids: given ones as they are, text through the tokenizer (BOS added)."""
    which = request.WhichOneof("prompt")
    if which == "text":
        if not request.text:
            raise InvalidArgumentError("prompt", "must not be empty")
        return tuple(tokenizer.encode(request.text))
    if which == "token_ids":
        return tuple(request.token_ids.ids)
    raise InvalidArgumentError("prompt", "must be set, as text or token_ids")


def decode_request(message_type: type[M], data: bytes) -> M:
    """The message, parsed; InvalidArgumentError naming the defect when the bytes are not a valid message of this
    type (broken wire format, invalid UTF-8 in a string) or carry a field this server does not know (a newer
    client's field would otherwise be ignored without a word)."""
    name = message_type.DESCRIPTOR.name
    try:
        message = message_type.FromString(data)
    except Exception:  # DecodeError, or whatever else the parser raises on hostile bytes
        # The stubs type DESCRIPTOR as the pure-Python or the upb class; both have the fields read here.
        defect = _wire_defect(cast(Descriptor, message_type.DESCRIPTOR), memoryview(data), "")
        raise InvalidArgumentError(f"malformed {name}", defect or "cannot be parsed") from None
    unknown = _unknown_field(message, "")
    if unknown is not None:
        raise InvalidArgumentError(f"unsupported {name}", unknown)
    return message


def _unknown_field(message: Message, path: str) -> str | None:
    """A description of the first field of message (or of a message inside it) that its type does not have."""
    for field in UnknownFieldSet(message):
        number = field.field_number
        known = message.DESCRIPTOR.fields_by_number.get(number)
        if known is not None:
            return (f"field {path}{known.name} ({number}) was sent with wire type {field.wire_type}, which does not "
                    "match its type")
        where = path.rstrip(".") or message.DESCRIPTOR.name
        full_name = message.DESCRIPTOR.full_name
        return f"unknown field number {number} in {where} ({full_name}), not supported by this server"
    for descriptor, value in message.ListFields():
        if descriptor.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        inner_path = f"{path}{descriptor.name}."
        if descriptor.message_type.GetOptions().map_entry:
            values = value.values() if descriptor.message_type.fields_by_name["value"].message_type else ()
        elif descriptor.is_repeated:
            values = value
        else:
            values = (value,)
        for inner in values:
            unknown = _unknown_field(inner, inner_path)
            if unknown is not None:
                return unknown
    return None


_VARINT_TYPES = frozenset({
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM,
})
_FIXED_SIZES = {1: 8, 5: 4}  # wire type -> bytes


class _Truncated(Exception):
    pass


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 70:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Truncated


def _wire_defect(descriptor: Descriptor, data: memoryview, path: str) -> str | None:
    """What makes data not a valid encoding of descriptor's message, named by field; None if nothing is found.
    Run only after the parser failed, so its cost falls on broken requests alone."""
    pos = 0
    while pos < len(data):
        start = pos
        try:
            tag, pos = _varint(data, pos)
        except _Truncated:
            return f"truncated field tag at byte {start}"
        number, wire_type = tag >> 3, tag & 7
        field = descriptor.fields_by_number.get(number)
        name = f"field {path}{field.name} ({number})" if field else f"field {path}<{number}>"
        if number == 0:
            return f"field number 0 at byte {start}"
        try:
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type in _FIXED_SIZES:
                pos += _FIXED_SIZES[wire_type]
                if pos > len(data):
                    raise _Truncated
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                if pos + length > len(data):
                    raise _Truncated
                defect = _value_defect(field, data[pos:pos + length], name, path)
                if defect is not None:
                    return defect
                pos += length
            else:
                return f"{name} has wire type {wire_type}, which proto3 messages do not use"
        except _Truncated:
            return f"{name} is truncated (at byte {start} of {len(data)})"
    return None


def _value_defect(field: FieldDescriptor | None, value: memoryview, name: str, path: str) -> str | None:
    if field is None:
        return None
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"{name} is not valid UTF-8 (byte {exc.start} of the string)"
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        return _wire_defect(field.message_type, value, f"{path}{field.name}.")
    elif field.is_repeated and field.type in _VARINT_TYPES:
        pos = 0
        while pos < len(value):
            try:
                _, pos = _varint(value, pos)
            except _Truncated:
                return f"{name} has a truncated packed value"
    return None
