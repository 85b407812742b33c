"""Command-line flags with PAGEDSERVE_<FLAG> environment variables: one rule for every pagedserve command.

Each option `--foo-bar` of a parser may also be given as PAGEDSERVE_FOO_BAR, parsed by the option's own type (a
boolean as true/false/1/0/yes/no, a repeatable flag as a comma-separated list); a flag on the command line wins over
its variable, and a variable that does not parse is a usage error naming it (exit code 2), never a silent default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

ENV_PREFIX = "PAGEDSERVE_"
# Said at the end of every command's --help.
EPILOG = ("Every option may also be given as an environment variable PAGEDSERVE_<OPTION> (--max-num-seqs: "
          "PAGEDSERVE_MAX_NUM_SEQS; booleans true/false); the command line wins. Table: docs/configuration.md.")
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_BOOLEAN_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)
_LIST_ACTIONS = (argparse._AppendAction, argparse._ExtendAction)


def env_name(action: argparse.Action) -> str:
    """PAGEDSERVE_ and the option's long name in capitals, dashes as underscores: --max-num-seqs ->
    PAGEDSERVE_MAX_NUM_SEQS."""
    long_name = next(s for s in action.option_strings if s.startswith("--"))
    return ENV_PREFIX + long_name[2:].replace("-", "_").upper()


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's options that take a variable: every one but --help and --version."""
    return [
        action for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction | argparse._VersionAction)
    ]


def is_boolean(action: argparse.Action) -> bool:
    return isinstance(action, _BOOLEAN_ACTIONS)


def is_repeatable(action: argparse.Action) -> bool:
    return isinstance(action, _LIST_ACTIONS)


def parse_bool(raw: str) -> bool:
    """true/false/1/0/yes/no, in any case; ValueError otherwise."""
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{raw!r} is not a boolean (true/false/1/0/yes/no)")


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, environ: Mapping[str, str],
) -> argparse.Namespace:
    """parser.parse_args(argv), with each option not given on the command line taken from its PAGEDSERVE_<FLAG>
    variable in environ when set. Exits with a usage error (code 2) naming a variable whose value does not parse."""
    from_env: dict[str, Any] = {}
    for action in options(parser):
        name = env_name(action)
        if name in environ:
            try:
                from_env[action.dest] = _convert(action, environ[name])
            except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
                usage_error(parser, f"environment variable {name}: {error}")
            action.required = False  # the variable stands in for a required flag
    # Scalars become defaults, so a flag still wins. Repeatable flags would add the command line's values to the
    # variable's: they take the variable only when the command line gave none.
    parser.set_defaults(**{dest: v for dest, v in from_env.items() if not _is_list_dest(parser, dest)})
    args = parser.parse_args(argv)
    for dest, value in from_env.items():
        if _is_list_dest(parser, dest) and not getattr(args, dest):
            setattr(args, dest, value)
    return args


def usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exits with code 2 and one line, `PROG: error: MESSAGE`: argparse's error without its usage, which for a
    command with dozens of options would bury the line that matters."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _is_list_dest(parser: argparse.ArgumentParser, dest: str) -> bool:
    return any(is_repeatable(a) for a in options(parser) if a.dest == dest)


def _convert(action: argparse.Action, raw: str) -> Any:
    if isinstance(action, argparse._StoreFalseAction):
        return not parse_bool(raw)
    if is_boolean(action):
        return parse_bool(raw)
    if isinstance(action, argparse._ExtendAction):  # its type splits the value itself (a comma-separated list)
        return list(_typed(action, raw)) if callable(action.type) else [i for i in raw.split(",") if i]
    if isinstance(action, argparse._AppendAction):
        return [_typed(action, item) for item in raw.split(",") if item]
    return _typed(action, raw)


def _typed(action: argparse.Action, raw: str) -> Any:
    # action.type may also be a registry name (a str); every pagedserve flag gives a converter, or none.
    value = action.type(raw) if callable(action.type) else raw
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(getattr(c, "value", str(c)) for c in action.choices)
        raise ValueError(f"{raw!r} is not one of: {choices}")
    return value
