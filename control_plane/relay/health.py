"""The pace of EngineService.WatchHealth, which carries the engine's health to the frontend's public health service."""

from __future__ import annotations

HEARTBEAT_S = 0.25  # the engine sends its health at least this often, besides at each change
# The frontend reports NOT_SERVING when the engine said nothing this long: its process is stuck or gone.
SILENCE_LIMIT_S = 0.75
