"""Clock marks at the entry and exit of chosen functions (the hooks), in each pagedserve process that installs them:
a benchmark starts a server inside marks_for_children(), and every process of it marks the benchmark's hooks
(benchmarks/first_token_path.py: the functions a request's first token passes through; benchmarks/mask_chain.py:
those of a constrained decode step's sampling).

A mark is (event, time.perf_counter_ns(), thread), the clock the benchmark's client reads too (on Linux
CLOCK_MONOTONIC, one clock for all the processes of a host); an event is "<function>:in" or "<function>:out", and
thread the calling thread's identifier. Each process keeps its marks in memory and writes them to
<PATH_CLOCK_DIR>/<pid>.json as it exits.
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
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.report import REPO_ROOT

# Not PAGEDSERVE_*: serve hands none of those to its workers.
DIR_VARIABLE = "PATH_CLOCK_DIR"
HOOKS_VARIABLE = "PATH_CLOCK_HOOKS"  # the hooks, "module:attribute.path" joined by commas

Hook = tuple[str, str]  # (module, attribute path)
Mark = tuple[str, int, int]  # (event, nanoseconds, thread)


def resolve(module_name: str, path: str) -> tuple[Any, str, Callable[..., Any]]:
    """(owner, attribute, function) of a hook in an imported module; AttributeError when the code has no such
    function (it was renamed: HOOKS must follow)."""
    owner: Any = sys.modules[module_name]
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name, getattr(owner, name)


def wrap(event: str, function: Callable[..., Any], marks: list[Mark]) -> Callable[..., Any]:
    """function, noting event + ":in" and ":out" around each call (for a coroutine function: around its await)."""
    clock, thread = time.perf_counter_ns, threading.get_ident
    if inspect.iscoroutinefunction(function):
        @functools.wraps(function)
        async def timed_coroutine(*args: Any, **kwargs: Any) -> Any:
            marks.append((event + ":in", clock(), thread()))
            try:
                return await function(*args, **kwargs)
            finally:
                marks.append((event + ":out", clock(), thread()))
        return timed_coroutine

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        marks.append((event + ":in", clock(), thread()))
        try:
            return function(*args, **kwargs)
        finally:
            marks.append((event + ":out", clock(), thread()))
    return timed


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds a hooked module with the path finder (each is a submodule of an imported package) and wraps its hooks
    once the module has run."""

    def __init__(self, hooks: Sequence[Hook], marks: list[Mark]) -> None:
        self._marks = marks
        self._paths: dict[str, list[str]] = {}
        for module_name, path in hooks:
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


def install(directory: Path, hooks: Sequence[Hook]) -> None:
    """Wraps the hooks of this process as their modules are imported, and writes the marks when it exits."""
    marks: list[Mark] = []
    finder = _WrapOnImport(hooks, marks)
    finder.wrap_imported()
    sys.meta_path.insert(0, finder)

    def write() -> None:
        (directory / f"{os.getpid()}.json").write_text(json.dumps(marks))

    atexit.register(write)


def install_from_environment() -> None:
    """install() into the directory and with the hooks the environment names, if it names a directory (a
    sitecustomize calls this)."""
    directory = os.environ.get(DIR_VARIABLE)
    if directory:
        install(Path(directory), parse_hooks(os.environ.get(HOOKS_VARIABLE, "")))


def format_hooks(hooks: Sequence[Hook]) -> str:
    return ",".join(f"{module_name}:{path}" for module_name, path in hooks)


def parse_hooks(text: str) -> list[Hook]:
    return [(module_name, path) for module_name, _, path in (item.partition(":") for item in text.split(",") if item)]


@contextmanager
def marks_for_children(hooks: Sequence[Hook], scratch: Path) -> Iterator[Path]:
    """Every Python process started inside marks the hooks and writes its marks into the directory yielded, as it
    exits: a sitecustomize module put first on their PYTHONPATH (hiding any other sitecustomize of the
    interpreter) installs them. The environment is restored on exit."""
    marks_dir, hook_dir = scratch / "marks", scratch / "hooks"
    marks_dir.mkdir()
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(
        "from benchmarks.path_clock import install_from_environment\ninstall_from_environment()\n")
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", DIR_VARIABLE, HOOKS_VARIABLE)}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(hook_dir), str(REPO_ROOT), *filter(None, [saved["PYTHONPATH"]])])
    os.environ[DIR_VARIABLE] = str(marks_dir)
    os.environ[HOOKS_VARIABLE] = format_hooks(hooks)
    try:
        yield marks_dir
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def read_marks(directory: Path) -> list[list[Mark]]:
    """The marks each process wrote into directory, one list per process."""
    return [[(event, ns, thread) for event, ns, thread in json.loads(path.read_text())]
            for path in sorted(directory.glob("*.json"))]


def check_hooks(hooks: Sequence[Hook]) -> list[str]:
    """The hooks the code no longer has, each as "module:path" (imports every hooked module)."""
    missing = []
    for module_name, path in hooks:
        importlib.import_module(module_name)
        try:
            resolve(module_name, path)
        except AttributeError:
            missing.append(f"{module_name}:{path}")
    return missing
