"""A tiny Llama-architecture model directory written locally, so a server runs without any download."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BUILTIN_MODEL_NAME = "pagedserve-tiny-llama"
VOCAB_TARGET = 1000  # pieces, special tokens included
MAX_POSITION_EMBEDDINGS = 2048
UNK, BOS, EOS = "<unk>", "<s>", "</s>"  # ids 0, 1, 2, as in Llama

# Training text of the tokenizer: plain English prose, so common words become single pieces.
TRAINING_TEXT = """\
The harbour town woke slowly on winter mornings. Fishing boats came back before the sun was up, and \
the first light found the market already busy with crates of silver fish, baskets of bread and the \
smell of coffee from the small cafe by the water. Children ran along the stone wall on their way to \
school, and old men sat on the benches to watch the gulls argue over scraps.

In the middle of the town stood a library with a green door and tall windows. Anyone could walk in, \
take a book from the shelves and read it by the fire. The librarian kept a notebook where visitors \
wrote the names of the books they loved, and over the years the notebook grew into a long list of \
stories about sailors, travellers, gardens, machines, kings and ordinary people who did something brave.

A good engine turns a small amount of work into a steady stream of results. It keeps its parts busy, \
wastes little, and never waits when there is something useful to do. When a new request arrives, it \
is placed in a queue, given memory in fixed blocks, and served step by step together with the others. \
If memory runs short, the newest request steps aside and returns later, so that the older ones can finish.

Numbers are simple to write and easy to read: one, two, three, four, five, six, seven, eight, nine and \
ten. A year has twelve months and a day has twenty four hours. In the spring the river rises, in the \
summer the fields turn gold, in the autumn the leaves fall, and in the winter the hills are white with snow.

She opened the window and looked at the sky. "It will rain this afternoon," she said, "so we should \
leave early." He nodded, packed the map, the water and the apples, and they walked up the path through \
the forest until they reached the top of the hill, where the whole valley lay below them like a picture.

Cooking is a kind of patient chemistry. Onions soften in warm butter, garlic turns sweet, and a pot \
of soup improves when it is left alone for an hour. Good cooks taste as they go, write down what \
worked, and share their recipes with friends, neighbours and anyone who asks politely at the table.

Every computer program begins as a question. What should happen first, what comes next, and what \
must never happen at all? Engineers answer with careful tests, clear names and small functions, then \
measure the result, because a guess about speed is usually wrong until someone has checked it twice.

The museum kept a collection of clocks from many countries: brass clocks with painted faces, wooden \
cuckoo clocks, tiny pocket watches and a huge tower mechanism whose heavy wheels still turned every \
minute. Visitors could hear them ticking together, hundreds of voices counting the same quiet seconds.
"""

_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": BOS,
    "eos_token": EOS,
    "unk_token": UNK,
    "pad_token": None,
    "model_max_length": MAX_POSITION_EMBEDDINGS,
    "clean_up_tokenization_spaces": False,
    # A plain "role: content" template, so that Chat and `pagedserve chat` work on the built-in model too.
    "chat_template": (
        "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    ),
}


def build_builtin_tokenizer() -> Tokenizer:
    """Byte-level BPE trained on TRAINING_TEXT; the same pieces on every run and machine."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.split("\n\n"), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _model_config(tokenizer: Tokenizer) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tokenizer.token_to_id(BOS),
        "eos_token_id": tokenizer.token_to_id(EOS),
        "torch_dtype": "float32",
    }


def write_builtin_model(directory: Path) -> Path:
    """Writes config.json, generation_config.json, tokenizer.json and tokenizer_config.json (no weights:
    workers load the directory with --load-format dummy). Same bytes on every call; returns directory."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_builtin_tokenizer()
    generation_config = {
        "bos_token_id": tokenizer.token_to_id(BOS),
        "eos_token_id": tokenizer.token_to_id(EOS),
    }
    files = {
        "config.json": _to_json(_model_config(tokenizer)),
        "generation_config.json": _to_json(generation_config),
        "tokenizer.json": tokenizer.to_str(pretty=True) + "\n",
        "tokenizer_config.json": _to_json(_TOKENIZER_CONFIG),
    }
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def _to_json(value: Mapping[str, object]) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"
