"""Clock marks at the entry and exit of the functions a request's first token passes through, in each pagedserve
process that installs them (benchmarks/first_token_path.py has every process of the server it starts do so).

A mark is (event, time.perf_counter_ns()), the clock the benchmark's client reads too (on Linux CLOCK_MONOTONIC, one
clock for all the processes of a host); an event is "<function>:in" or "<function>:out". Each process keeps its marks
in memory and writes them to <PATH_CLOCK_DIR>/<pid>.json as it exits.
The functions are wrapped where their callers look them up, once their modules are imported: a thread polls for
them every POLL_S until QUIET_S have passed without a new one since the first (a process imports its modules as it
starts, and each process has only its own role's), so that no polling is left once requests are timed.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import inspect
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DIR_VARIABLE = "PATH_CLOCK_DIR"  # not PAGEDSERVE_*: serve hands none of those to its workers
POLL_S = 0.005
QUIET_S = 5.0

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


def install(directory: Path) -> None:
    """Starts wrapping the hooks of this process as their modules appear, and writes the marks when it exits."""
    marks: list[tuple[str, int]] = []

    def wrap_when_imported() -> None:
        pending = list(HOOKS)
        last_wrapped_s: float | None = None
        while pending and (last_wrapped_s is None or time.monotonic() - last_wrapped_s < QUIET_S):
            for hook in list(pending):
                module_name, path = hook
                if module_name not in sys.modules:
                    continue
                try:
                    owner, name, function = resolve(module_name, path)
                except AttributeError:  # the module is still being imported
                    continue
                setattr(owner, name, wrap(path, function, marks))
                pending.remove(hook)
                last_wrapped_s = time.monotonic()
            time.sleep(POLL_S)

    def write() -> None:
        (directory / f"{os.getpid()}.json").write_text(json.dumps(marks))

    atexit.register(write)
    threading.Thread(target=wrap_when_imported, name="path-clock", daemon=True).start()


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
