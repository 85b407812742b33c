"""gRPC options of the internal streams: control plane to workers, and frontend to engine."""

from __future__ import annotations

# A step, or a batch of relayed adds, carries whole prompts of new sequences: room for many of a long-context model.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
INTERNAL_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
