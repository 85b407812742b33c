"""A stories260K model directory that ships a chat template, for the tests of the Shepherd Model Gateway (which
start it with benchmarks.gateway_process.running_gateway)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
