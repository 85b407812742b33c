"""The ways the serving benchmark reaches the server: directly over our gRPC API, or through the Shepherd Model
Gateway's OpenAI endpoint in front of the same server."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from benchmarks.direct_client import Send, direct_sender
from benchmarks.gateway_client import gateway_sender


class ServingPath(enum.Enum):
    DIRECT = "direct"  # GenerationService.Generate over gRPC, prompt ids
    GATEWAY = "gateway"  # `smg launch --backend vllm` in front of the server, /v1/completions over HTTP, prompt text


def parse_paths(text: str) -> list[ServingPath]:
    """Comma-separated path names, each once, in the order given (each level runs them in that order)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    try:
        paths = [ServingPath(name) for name in names]
    except ValueError:
        raise ValueError(f"paths are {', '.join(p.value for p in ServingPath)}, got {text!r}") from None
    if not paths or len(set(paths)) != len(paths):
        raise ValueError(f"paths must name each path at most once and at least one, got {text!r}")
    return paths


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where each path sends: the server's gRPC address, and the gateway's base URL when one runs."""

    server_address: str
    gateway_url: str | None = None


@asynccontextmanager
async def path_sender(path: ServingPath, endpoints: Endpoints, ignore_eos: bool,
                      max_in_flight: int, connections: int = 1) -> AsyncIterator[Send]:
    """The Send of path, open while the context is; connections: the direct path's channels to the server."""
    if path is ServingPath.DIRECT:
        async with direct_sender(endpoints.server_address, ignore_eos, connections) as send:
            yield send
        return
    if endpoints.gateway_url is None:
        raise ValueError("the gateway path needs a running gateway")
    async with gateway_sender(endpoints.gateway_url, ignore_eos, max_in_flight) as send:
        yield send
