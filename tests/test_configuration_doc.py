"""docs/configuration.md is the table of every command's flags and variables, rendered from the parsers themselves:
this test fails when they drift. `python -m tests.test_configuration_doc` rewrites the page."""

from __future__ import annotations

import argparse
import enum
from pathlib import Path

from pagedserve.clients.health_check import build_parser as health_check_parser
from pagedserve.control_plane.engine.main import build_parser as serve_parser
from pagedserve.gpu_worker.main import build_parser as worker_parser
from pagedserve.runtime.auth import SECRET_ENV
from pagedserve.runtime.cli import chat_parser, generate_parser
from pagedserve.runtime.flags import env_name, is_boolean, is_repeatable, options

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
COMMANDS = {"serve": serve_parser, "worker": worker_parser, "generate": generate_parser, "chat": chat_parser,
            "health_check": health_check_parser}

HEADER = f"""# Configuration

Every option of `pagedserve serve`, `pagedserve worker`, `pagedserve generate`, `pagedserve chat` and
`python -m pagedserve.clients.health_check` may also be given as an environment variable: `PAGEDSERVE_` and the
option's name in capitals, dashes as underscores (`--max-num-seqs` is `PAGEDSERVE_MAX_NUM_SEQS`). An option on the
command line wins over its variable; for a repeatable option, the command line's values replace the variable's.
Variables are parsed by the option's type: a boolean takes `true`, `false`, `1`, `0`, `yes` or `no` (any case), a
repeatable option a comma-separated list; anything that does not parse stops the command with exit code 2 and a
message naming the variable. A variable that several commands read (`PAGEDSERVE_SEED`, `PAGEDSERVE_API_KEY`,
`PAGEDSERVE_MODEL`, ...) sets the option of each command run where it is set. `serve` hands its local workers
flags, never its `PAGEDSERVE_*` variables. Besides the options, `{SECRET_ENV}` holds the cluster secret itself
(instead of `--cluster-secret-file`), read by `serve` and `worker`. `pagedserve --version` prints the version.

This page is generated from the parsers (`python -m tests.test_configuration_doc`); a test fails when they drift.

| command | option | variable | type | default | meaning |
|---|---|---|---|---|---|
"""


def _type(action: argparse.Action) -> str:
    if is_boolean(action):
        return "boolean"
    if action.choices is not None:
        return " \\| ".join(getattr(c, "value", str(c)) for c in action.choices)
    kind = {"int": "integer", "float": "number", "Path": "path"}.get(getattr(action.type, "__name__", ""), "string")
    return "comma-separated list" if is_repeatable(action) else kind


def _default(action: argparse.Action) -> str:
    value = action.default
    if value is None or value == [] or value is argparse.SUPPRESS:
        return ""
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def _row(command: str, action: argparse.Action) -> str:
    flag = " / ".join(f"`{s}`" for s in action.option_strings if s.startswith("--"))
    if isinstance(action, argparse.BooleanOptionalAction):
        flag = f"`{action.option_strings[0]}` / `{action.option_strings[1]}`"
    meaning = " ".join((action.help or "").split()).replace("%(default)s", str(action.default)).replace("|", "\\|")
    return f"| {command} | {flag} | `{env_name(action)}` | {_type(action)} | {_default(action)} | {meaning} |"


def render() -> str:
    rows = [_row(command, action) for command, build in COMMANDS.items() for action in options(build())]
    return HEADER + "\n".join(rows) + "\n"


def test_configuration_page_matches_the_parsers() -> None:
    assert DOC.read_text() == render(), "docs/configuration.md is stale: python -m tests.test_configuration_doc"


def test_every_option_has_help_text() -> None:
    missing = [f"{command} {action.option_strings[0]}" for command, build in COMMANDS.items()
               for action in options(build()) if not action.help]

    assert missing == []


if __name__ == "__main__":
    DOC.write_text(render())
