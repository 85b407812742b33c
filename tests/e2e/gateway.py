"""The Shepherd Model Gateway (`smg launch --backend vllm`, from the dev extra) in front of pagedserve servers on
loopback, and a stories260K model directory that ships a chat template."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pagedserve.control_plane.launch.worker_launcher import free_loopback_port
from tests.e2e.processes import has_exited_within

# A template of the shape chat models ship (role, content, generation prompt), for a model that has none.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def model_with_chat_template(source: Path, destination: Path) -> Path:
    """A copy of the model directory whose tokenizer_config.json has CHAT_TEMPLATE."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name != "tokenizer_config.json":
            shutil.copy(path, destination / path.name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (destination / "tokenizer_config.json").write_text(json.dumps(config))
    return destination


@contextmanager
def running_gateway(worker_urls: Sequence[str], log_path: Path, extra: Sequence[str] = (),
                    timeout_s: float = 60.0) -> Iterator[str]:
    """`smg launch` on a free loopback port in front of worker_urls (grpc://HOST:PORT); yields its base URL once
    it lists a model, stops it on exit."""
    port = free_loopback_port()
    command = ["smg", "launch", "--backend", "vllm", "--host", "127.0.0.1", "--port", str(port),
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
        process.terminate()
        if not has_exited_within(process.pid, 15):
            process.kill()
        process.wait()


def _lists_a_model(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=1) as response:
            return bool(json.loads(response.read())["data"])
    except OSError:
        return False
