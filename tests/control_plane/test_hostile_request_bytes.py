"""Hostile bytes where a public request should be: random bytes, and valid requests with bytes flipped, cut or
inserted. The strict decoder returns the message or raises InvalidArgumentError naming the defect; nothing else
may come out of it (an exception of another type would reach the client as INTERNAL)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.control_plane.errors import InvalidArgumentError
from pagedserve.control_plane.frontend.convert import decode_request
from pagedserve.v1 import common_pb2, generation_service_pb2

pb = generation_service_pb2
RequestType = type[pb.GenerateRequest] | type[pb.ChatRequest]
VALID: list[pb.GenerateRequest | pb.ChatRequest] = [
    pb.GenerateRequest(text="Once upon a time", request_id="r1", sampling_params=common_pb2.SamplingParams(
        n=2, temperature=0.5, stop=["end"], logit_bias={3: 1.5}, max_tokens=8,
        structured_output=common_pb2.StructuredOutput(choice=common_pb2.ChoiceConstraint(choices=["a", "b"])))),
    pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 300, 2**31 - 1])),
    pb.ChatRequest(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="hi"),
                             pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT, tool_calls=[
                                 pb.ChatToolCall(id="c", name="f", arguments_json='{"x": 1}')])],
                   tools=[pb.ChatTool(name="f", parameters_json='{"type": "object"}')]),
]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[RequestType, bytes]:
    """A valid request's bytes with up to four edits: a byte replaced, a run cut out, or bytes inserted."""
    message = draw(st.sampled_from(VALID))
    data = bytearray(message.SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["replace", "cut", "insert"]))
        if edit == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif edit == "cut":
            del data[at:at + draw(st.integers(1, 8))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
    message_type: RequestType = pb.GenerateRequest if isinstance(message, pb.GenerateRequest) else pb.ChatRequest
    return message_type, bytes(data)


def _decodes_or_names_the_defect(message_type: RequestType, data: bytes) -> None:
    try:
        message = decode_request(message_type, data)
    except InvalidArgumentError as error:
        assert error.field.startswith(("malformed ", "unsupported ")) and error.message, error
    else:
        assert isinstance(message, message_type)


@settings(max_examples=600, deadline=None, derandomize=True)
@given(case=mutated())
def test_a_valid_request_with_bytes_flipped_cut_or_inserted_decodes_or_names_its_defect(
    case: tuple[RequestType, bytes],
) -> None:
    _decodes_or_names_the_defect(*case)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(message_type=st.sampled_from([pb.GenerateRequest, pb.ChatRequest]), data=st.binary(max_size=120))
def test_random_bytes_decode_or_name_their_defect(
    message_type: RequestType, data: bytes,
) -> None:
    _decodes_or_names_the_defect(message_type, data)
