"""On PYTHONPATH, makes torch, CuPy and safetensors look uninstalled to this interpreter and its children, as in
the control-plane image (docker/control-plane.Dockerfile), which has none of them."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

ABSENT = ("torch", "cupy", "safetensors")


class _Hiding:
    """Wraps a meta-path finder: finds nothing under the ABSENT packages, everything else as before."""

    def __init__(self, finder: Any) -> None:
        self._finder = finder

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if name.partition(".")[0] in ABSENT or not hasattr(self._finder, "find_spec"):
            return None
        spec: ModuleSpec | None = self._finder.find_spec(name, path, target)
        return spec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._finder, name)


sys.meta_path[:] = [_Hiding(finder) for finder in sys.meta_path]
