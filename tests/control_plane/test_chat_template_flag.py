"""`serve --chat-template FILE_OR_STRING`: checked before anything starts, and handed to the frontend process."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve.control_plane.engine.main import main as serve_main
from pagedserve.control_plane.frontend.main import _parser as frontend_parser
from pagedserve.control_plane.launch.frontend_launcher import _public_flags
from tests.chat_model import ROLES_CHAT_TEMPLATE
from tests.control_plane.test_serve_flags import _server


@pytest.mark.parametrize(("value", "message"), [
    ("templates/missing.jinja", "--chat-template: chat template 'templates/missing.jinja' looks like a path"),
    ("{% if %}", "--chat-template: chat template does not compile"),
])
def test_serve_stops_at_once_on_a_template_it_cannot_use(
    value: str, message: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as stopped:
        serve_main(["--chat-template", value, "--log-format", "console"])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_the_flag_and_its_variable_reach_the_frontends_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "chat.jinja"
    path.write_text(ROLES_CHAT_TEMPLATE, encoding="utf-8")
    monkeypatch.setenv("PAGEDSERVE_CHAT_TEMPLATE", ROLES_CHAT_TEMPLATE)
    from_variable, from_flag = _server([]), _server(["--chat-template", str(path)])
    assert _public_flags(from_variable, None) == ["--chat-template", ROLES_CHAT_TEMPLATE]
    flags = _public_flags(from_flag, None)
    assert flags == ["--chat-template", str(path)]
    args = frontend_parser().parse_args(["--engine", "unix:x", "--model", "m", "--listen", "127.0.0.1:0", *flags])
    assert args.chat_template == str(path)
