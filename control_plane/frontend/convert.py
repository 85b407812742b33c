"""Protobuf <-> domain types of the public GenerationService's requests (the rest travel as the relay encodes them):
the bytes decoded strictly, the bounds checked before any expensive work, the prompt and the chat conversation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet  # type: ignore[import-not-found]  # no stub

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.control_plane.errors import InvalidArgumentError
from pagedserve.control_plane.text.chat_template import Conversation
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import generation_service_pb2

M = TypeVar("M", bound=Message)

# A request id is echoed in every chunk and bound to every log line of its request.
MAX_REQUEST_ID_CHARS = 256
# A chat's bounds, checked before its template runs: messages and tools (OpenAI's limit on tools), and the
# characters of all its JSON texts together (tool parameters, tool call arguments, template kwargs).
MAX_CHAT_MESSAGES = 1024
MAX_CHAT_TOOLS = 128
MAX_CHAT_JSON_CHARS = 1 << 20

_ROLE_NAMES = {
    generation_service_pb2.CHAT_ROLE_SYSTEM: "system",
    generation_service_pb2.CHAT_ROLE_USER: "user",
    generation_service_pb2.CHAT_ROLE_ASSISTANT: "assistant",
    generation_service_pb2.CHAT_ROLE_TOOL: "tool",
}


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


def check_chat_size(request: generation_service_pb2.ChatRequest, limits: RequestLimits) -> None:
    """A chat's size bounds, before its JSON is parsed or its template runs. Its messages' text is bounded as a
    prompt text is: a template that shows the messages renders at least their characters."""
    if len(request.messages) > MAX_CHAT_MESSAGES:
        raise InvalidArgumentError(
            "messages", f"must be at most {MAX_CHAT_MESSAGES} messages, got {len(request.messages)}"
        )
    if len(request.tools) > MAX_CHAT_TOOLS:
        raise InvalidArgumentError("tools", f"must be at most {MAX_CHAT_TOOLS} tools, got {len(request.tools)}")
    check_text_length("".join(m.content for m in request.messages), "messages", limits)
    json_chars = len(request.chat_template_kwargs_json) + sum(len(t.parameters_json) for t in request.tools) + sum(
        len(c.arguments_json) for m in request.messages for c in m.tool_calls
    )
    if json_chars > MAX_CHAT_JSON_CHARS:
        raise InvalidArgumentError(
            "tools", f"JSON texts of {json_chars} characters in all, more than the {MAX_CHAT_JSON_CHARS} allowed"
        )


def conversation_from_proto(request: generation_service_pb2.ChatRequest) -> Conversation:
    """The conversation as chat templates read it (OpenAI's message and tool dicts); InvalidArgumentError naming
    the field of a message with no known role, a tool call outside an assistant message, JSON that is not an
    object. add_generation_prompt, unset, is true unless continue_final_message."""
    add_generation_prompt = (
        request.add_generation_prompt if request.HasField("add_generation_prompt")
        else not request.continue_final_message
    )
    return Conversation(
        messages=tuple(_message_from_proto(m, f"messages[{i}]") for i, m in enumerate(request.messages)),
        tools=tuple(_tool_from_proto(t, f"tools[{i}]") for i, t in enumerate(request.tools)),
        add_generation_prompt=add_generation_prompt,
        continue_final_message=request.continue_final_message,
        template_kwargs=_json_object(request.chat_template_kwargs_json, "chat_template_kwargs_json"),
    )


def _message_from_proto(message: generation_service_pb2.ChatMessage, path: str) -> dict[str, Any]:
    role = _ROLE_NAMES.get(message.role)
    if role is None:
        what = "must be set" if message.role == 0 else f"unknown role {message.role}"
        raise InvalidArgumentError(f"{path}.role", f"{what} (system, user, assistant or tool)")
    result: dict[str, Any] = {"role": role, "content": message.content}
    if message.tool_call_id:
        if role != "tool":
            raise InvalidArgumentError(f"{path}.tool_call_id", "only a tool message answers a tool call")
        result["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        if role != "assistant":
            raise InvalidArgumentError(f"{path}.tool_calls", "only an assistant message calls tools")
        result["tool_calls"] = [_tool_call_from_proto(c, f"{path}.tool_calls[{i}]")
                                for i, c in enumerate(message.tool_calls)]
    return result


def _tool_call_from_proto(call: generation_service_pb2.ChatToolCall, path: str) -> dict[str, Any]:
    if not call.name:
        raise InvalidArgumentError(f"{path}.name", "must not be empty")
    function = {"name": call.name, "arguments": _json_object(call.arguments_json, f"{path}.arguments_json")}
    return {"id": call.id, "type": "function", "function": function}


def _tool_from_proto(tool: generation_service_pb2.ChatTool, path: str) -> dict[str, Any]:
    if not tool.name:
        raise InvalidArgumentError(f"{path}.name", "must not be empty")
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.parameters_json:
        function["parameters"] = _json_object(tool.parameters_json, f"{path}.parameters_json")
    return {"type": "function", "function": function}


def _json_object(text: str, field: str) -> dict[str, Any]:
    """text parsed as a JSON object; empty text is an empty object."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgumentError(field, f"is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(field, f"must be a JSON object, got a JSON {type(value).__name__}")
    return value


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
