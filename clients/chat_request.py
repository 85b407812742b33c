"""A ChatRequest built from OpenAI-shaped messages and tools (the dicts the openai SDK and vLLM's LLM.chat take)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pagedserve.contract.codec import sampling_params_to_proto
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.v1 import generation_service_pb2

pb = generation_service_pb2
ChatMessageLike = Mapping[str, Any] | pb.ChatMessage
ChatToolLike = Mapping[str, Any] | pb.ChatTool

_ROLES = {
    "system": pb.CHAT_ROLE_SYSTEM, "user": pb.CHAT_ROLE_USER, "assistant": pb.CHAT_ROLE_ASSISTANT,
    "tool": pb.CHAT_ROLE_TOOL,
}


def chat_request(
    messages: Sequence[ChatMessageLike],
    params: SamplingParams | None = None,
    *,
    tools: Sequence[ChatToolLike] = (),
    add_generation_prompt: bool | None = None,
    continue_final_message: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    request_id: str = "",
    priority: int = 0,
) -> pb.ChatRequest:
    """The request; ValueError for a message whose role is not system, user, assistant or tool.
    add_generation_prompt None: the server's default (true unless continue_final_message)."""
    request = pb.ChatRequest(
        request_id=request_id, priority=priority, continue_final_message=continue_final_message,
        messages=[_message(m) for m in messages], tools=[_tool(t) for t in tools],
        chat_template_kwargs_json=json.dumps(dict(chat_template_kwargs)) if chat_template_kwargs else "",
    )
    if add_generation_prompt is not None:
        request.add_generation_prompt = add_generation_prompt
    if params is not None:
        request.sampling_params.CopyFrom(sampling_params_to_proto(params))
    return request


def _message(message: ChatMessageLike) -> pb.ChatMessage:
    if isinstance(message, pb.ChatMessage):
        return message
    role = _ROLES.get(message.get("role", ""))
    if role is None:
        raise ValueError(f"message role must be one of {', '.join(_ROLES)}, got {message.get('role')!r}")
    calls = [
        pb.ChatToolCall(id=call.get("id", ""), name=call["function"]["name"],
                        arguments_json=_json_text(call["function"].get("arguments")))
        for call in message.get("tool_calls") or ()
    ]
    return pb.ChatMessage(role=role, content=message.get("content") or "",
                          tool_call_id=message.get("tool_call_id", ""), tool_calls=calls)


def _tool(tool: ChatToolLike) -> pb.ChatTool:
    if isinstance(tool, pb.ChatTool):
        return tool
    function = tool.get("function", tool)  # OpenAI's {"type": "function", "function": {...}}, or the function alone
    return pb.ChatTool(name=function["name"], description=function.get("description", ""),
                       parameters_json=_json_text(function.get("parameters")))


def _json_text(value: str | Mapping[str, Any] | None) -> str:
    """A JSON object as text: OpenAI sends tool call arguments as text, templates' examples as dicts."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(dict(value))
