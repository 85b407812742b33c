"""serve and worker started on a port something already listens on exit at once with code 2, naming the flag, instead
of sharing the port with it (gRPC binds with SO_REUSEPORT)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_port_in_use_ends_the_command_before_it_starts_anything(stories_dir: Path, busy_port: int,
                                                                   command: str) -> None:
    flag, port_args = (("--port", ["--port", str(busy_port)]) if command == "serve"
                       else ("--listen", ["--listen", f"127.0.0.1:{busy_port}"]))
    result = subprocess.run(["pagedserve", command, "--model", str(stories_dir), *port_args, "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"{flag}: cannot listen on 127.0.0.1:{busy_port}: Address already in use" in result.stderr
