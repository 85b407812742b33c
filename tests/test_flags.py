"""PAGEDSERVE_<FLAG> variables: parsed by each option's type, a flag on the command line wins, a bad value is a
usage error naming the variable."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pagedserve.runtime.cli import main as cli_main
from pagedserve.runtime.cli import pagedserve_version
from pagedserve.runtime.flags import env_name, parse_args, parse_bool


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="test")
    p.add_argument("--model", type=Path, required=True, help="m")
    p.add_argument("--max-num-seqs", type=int, default=256, help="n")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True, help="c")
    p.add_argument("--enforce-eager", action="store_true", help="e")
    p.add_argument("--worker", action="append", default=[], help="w")
    p.add_argument("--mode", choices=["a", "b"], default="a", help="mode")
    return p


@pytest.mark.parametrize(("raw", "expected"), [("false", False), ("FALSE", False), ("0", False), ("no", False),
                                                ("true", True), ("1", True), ("Yes", True)])
def test_a_boolean_variable_is_parsed_as_a_boolean(raw: str, expected: bool) -> None:
    args = parse_args(_parser(), ["--model", "m"], {"PAGEDSERVE_ENABLE_PREFIX_CACHING": raw,
                                                    "PAGEDSERVE_ENFORCE_EAGER": raw})

    assert (args.enable_prefix_caching, args.enforce_eager) == (expected, expected)


@pytest.mark.parametrize(("name", "raw"), [("PAGEDSERVE_ENABLE_PREFIX_CACHING", "off"),
                                           ("PAGEDSERVE_MAX_NUM_SEQS", "many"), ("PAGEDSERVE_MODE", "c")])
def test_a_variable_that_does_not_parse_is_a_usage_error_naming_it(
    name: str, raw: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(_parser(), ["--model", "m"], {name: raw})

    assert (exit_info.value.code, f"environment variable {name}" in capsys.readouterr().err) == (2, True)


def test_a_flag_wins_over_its_variable_repeatable_ones_included() -> None:
    environ = {"PAGEDSERVE_MAX_NUM_SEQS": "8", "PAGEDSERVE_WORKER": "a:1,b:2", "PAGEDSERVE_ENABLE_PREFIX_CACHING": "no"}

    from_env = parse_args(_parser(), ["--model", "m"], environ)
    from_flags = parse_args(_parser(), ["--model", "m", "--max-num-seqs", "4", "--worker", "c:3",
                                        "--enable-prefix-caching"], environ)

    assert (from_env.max_num_seqs, from_env.worker, from_env.enable_prefix_caching) == (8, ["a:1", "b:2"], False)
    assert (from_flags.max_num_seqs, from_flags.worker, from_flags.enable_prefix_caching) == (4, ["c:3"], True)


def test_a_variable_stands_in_for_a_required_flag() -> None:
    assert parse_args(_parser(), [], {"PAGEDSERVE_MODEL": "/models/m"}).model == Path("/models/m")


def test_variable_names_follow_the_long_option() -> None:
    names = [env_name(a) for a in _parser()._actions if a.option_strings and a.dest != "help"]

    assert names == ["PAGEDSERVE_MODEL", "PAGEDSERVE_MAX_NUM_SEQS", "PAGEDSERVE_ENABLE_PREFIX_CACHING",
                     "PAGEDSERVE_ENFORCE_EAGER", "PAGEDSERVE_WORKER", "PAGEDSERVE_MODE"]


def test_parse_bool_refuses_other_words() -> None:
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool("enabled")


def test_version_prints_the_installed_distribution_version(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["--version"])

    assert (code, capsys.readouterr().out) == (0, f"pagedserve {pagedserve_version()}\n")
    assert pagedserve_version()[0].isdigit()
