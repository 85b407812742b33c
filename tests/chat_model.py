"""Model directories that ship a chat template: a copy of a shared one with chat_template added to its
tokenizer_config.json (weights linked, not copied)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Llama 2 chat's template as its tokenizer_config.json ships it: BOS before each user turn, roles must alternate.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# A plain template that shows every input it is given: tools, every role, the generation prompt, a kwarg.
ROLES_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}Tools: {{ tools | tojson }}{{ '\\n' }}{% endif %}"
    "{% if greeting is defined %}{{ greeting }}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['tool_calls'] is defined %} calls {{ m['tool_calls'] | tojson }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
# (transformers renders with trim_blocks: a line break right after a block tag is dropped, so they are written as
# expressions.)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def with_chat_template(source: Path, destination: Path, template: str) -> Path:
    """destination made a copy of the model (or tokenizer) directory source whose tokenizer_config.json has
    template as its chat_template; its other files are links to source's."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in _TOKENIZER_FILES:
            (destination / path.name).symlink_to(path.resolve())
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, destination / name)
    config_path = destination / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return destination
