"""The Shepherd Model Gateway (`smg launch --backend vllm`, PyPI `smg`) in a child process in front of pagedserve
servers on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from benchmarks.child_process import stop
from pagedserve.runtime.port_check import free_loopback_port


@contextmanager
def running_gateway(worker_urls: Sequence[str], log_path: Path, extra: Sequence[str] = (),
                    timeout_s: float = 60.0) -> Iterator[str]:
    """`smg launch` on a free loopback port (its Prometheus port too, so that gateways side by side never clash on
    the default 29000) in front of worker_urls (grpc://HOST:PORT); yields its base URL once it lists a model, and
    stops it (SIGTERM, then SIGKILL after 15 s) on exit."""
    port = free_loopback_port()
    command = [sys.executable, "-m", "smg", "launch", "--backend", "vllm", "--host", "127.0.0.1", "--port", str(port),
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_loopback_port()),
               "--worker-urls", *worker_urls, *extra]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _lists_a_model(base_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield base_url
    finally:
        stop(process, grace_s=15)


def _lists_a_model(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=1) as response:
            return bool(json.loads(response.read())["data"])
    except OSError:
        return False
