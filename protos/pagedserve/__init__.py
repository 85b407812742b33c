"""pagedserve: LLM serving with PagedAttention over gRPC.

`from pagedserve import LLM, SamplingParams` gives the offline API and the one sampling-parameters class that the
offline API, the Python client and the server share. Both load on first use, so `import pagedserve` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedserve.clients.llm import LLM
    from pagedserve.contract.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]

_HOMES = {"LLM": "pagedserve.clients.llm", "SamplingParams": "pagedserve.contract.sampling_params"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
