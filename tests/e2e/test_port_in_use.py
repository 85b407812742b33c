"""serve and worker started on a port something already listens on exit at once with code 2, naming the flag, instead
of sharing the port with it (gRPC binds with SO_REUSEPORT) or, for the metrics port, failing once the workers are up."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(("command", "flag"), [("serve", "--port"), ("serve", "--metrics-port"),
                                               ("worker", "--listen")])
def test_a_port_in_use_ends_the_command_before_it_starts_anything(stories_dir: Path, busy_port: int,
                                                                   command: str, flag: str) -> None:
    port_args = [flag, f"127.0.0.1:{busy_port}" if flag == "--listen" else str(busy_port)]
    result = subprocess.run(["pagedserve", command, "--model", str(stories_dir), *port_args, "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"{flag}: cannot listen on 127.0.0.1:{busy_port}: Address already in use" in result.stderr
