"""Clock marks at the entry and exit of the functions a request's first token passes through, in each pagedserve
process that installs them (benchmarks/first_token_path.py has every process of the server it starts do so).

A mark is (event, time.perf_counter_ns()), the clock the benchmark's client reads too (on Linux CLOCK_MONOTONIC, one
clock for all the processes of a host); an event is "<function>:in" or "<function>:out". Each process keeps its marks
in memory and writes them to <PATH_CLOCK_DIR>/<pid>.json as it exits.
The functions are wrapped where their callers look them up, as soon as their module has run (an import hook on
sys.meta_path), so that a caller's `from module import function` binds the wrapped one, however late the process
imports it (a GPU worker's engine, for one, imports some modules only once the worker is up).
"""

from __future__ import annotations

import atexit
import functools
import importlib
import importlib.abc
import importlib.machinery
import inspect
import json
import os
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

DIR_VARIABLE = "PATH_CLOCK_DIR"  # not PAGEDSERVE_*: serve hands none of those to its workers

# (module, attribute path): the functions wrapped, in the order a first token meets them.
HOOKS: tuple[tuple[str, str], ...] = (
    ("pagedserve.control_plane.frontend.service", "GenerationServicer._admit"),
    ("pagedserve.control_plane.frontend.engine_client", "EngineClient.add_request"),
    ("pagedserve.control_plane.engine.service", "EngineServicer._add"),
    ("pagedserve.control_plane.scheduling.scheduler", "Scheduler.schedule"),
    ("pagedserve.control_plane.engine.worker_client", "GrpcWorkerClient.send"),
    ("pagedserve.contract.codec", "step_plan_from_proto"),
    ("pagedserve.gpu_worker.worker", "Worker.launch"),
    ("pagedserve.gpu_worker.model_runner", "ModelRunner.launch"),
    ("pagedserve.gpu_worker.worker", "Worker.finish"),
    ("pagedserve.contract.codec", "step_result_to_proto"),
    ("pagedserve.control_plane.engine.worker_client", "GrpcWorkerClient.receive"),
    ("pagedserve.control_plane.relay.item_channel", "ItemChannel.put"),
)


def resolve(module_name: str, path: str) -> tuple[Any, str, Callable[..., Any]]:
    """(owner, attribute, function) of a hook in an imported module; AttributeError when the code has no such
    function (it was renamed: HOOKS must follow)."""
    owner: Any = sys.modules[module_name]
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name, getattr(owner, name)


def wrap(event: str, function: Callable[..., Any], marks: list[tuple[str, int]]) -> Callable[..., Any]:
    """function, noting event + ":in" and ":out" around each call (for a coroutine function: around its await)."""
    clock = time.perf_counter_ns
    if inspect.iscoroutinefunction(function):
        @functools.wraps(function)
        async def timed_coroutine(*args: Any, **kwargs: Any) -> Any:
            marks.append((event + ":in", clock()))
            try:
                return await function(*args, **kwargs)
            finally:
                marks.append((event + ":out", clock()))
        return timed_coroutine

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        marks.append((event + ":in", clock()))
        try:
            return function(*args, **kwargs)
        finally:
            marks.append((event + ":out", clock()))
    return timed


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds a hooked module with the path finder (each is a submodule of an imported package) and wraps its hooks
    once the module has run."""

    def __init__(self, marks: list[tuple[str, int]]) -> None:
        self._marks = marks
        self._paths: dict[str, list[str]] = {}
        for module_name, path in HOOKS:
            self._paths.setdefault(module_name, []).append(path)

    def find_spec(self, fullname: str, path: Any, target: types.ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._paths:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            run_module(module)
            self._wrap_hooks_of(fullname)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec

    def wrap_imported(self) -> None:
        """Wraps the hooks of the modules imported before this finder was installed."""
        for module_name in self._paths:
            if module_name in sys.modules:
                self._wrap_hooks_of(module_name)

    def _wrap_hooks_of(self, module_name: str) -> None:
        for path in self._paths[module_name]:
            owner, name, function = resolve(module_name, path)
            setattr(owner, name, wrap(path, function, self._marks))


def install(directory: Path) -> None:
    """Wraps the hooks of this process as their modules are imported, and writes the marks when it exits."""
    marks: list[tuple[str, int]] = []
    finder = _WrapOnImport(marks)
    finder.wrap_imported()
    sys.meta_path.insert(0, finder)

    def write() -> None:
        (directory / f"{os.getpid()}.json").write_text(json.dumps(marks))

    atexit.register(write)


def install_from_environment() -> None:
    """install() into the directory the environment names, if it names one (a sitecustomize calls this)."""
    directory = os.environ.get(DIR_VARIABLE)
    if directory:
        install(Path(directory))


def check_hooks() -> list[str]:
    """The hooks the code no longer has, each as "module:path" (imports every hooked module)."""
    missing = []
    for module_name, path in HOOKS:
        importlib.import_module(module_name)
        try:
            resolve(module_name, path)
        except AttributeError:
            missing.append(f"{module_name}:{path}")
    return missing
