"""Chat against a real server on a model directory that ships a chat template: its tokens equal Generate's on the
prompt transformers' apply_chat_template renders (the reference), through the gRPC stub, the client and the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from transformers import PreTrainedTokenizerFast

from pagedserve.clients.client import PagedServeClient
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
from tests.chat_model import ROLES_CHAT_TEMPLATE, with_chat_template
from tests.e2e.processes import Cluster, running_cluster

pb = generation_service_pb2
MESSAGES = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "Once upon a time"}]
GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def chat_model_dir(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_chat_template(stories_dir, tmp_path_factory.mktemp("stories-chat"), ROLES_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def chat_cluster(chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(chat_model_dir, tmp_path_factory.mktemp("chat-logs")) as cluster:
        yield cluster


def _reference_ids(model_dir: Path, messages: list[dict[str, Any]]) -> list[int]:
    hf = PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    return list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"])


def _joined(chunks: list[pb.GenerateResponse]) -> tuple[list[int], str, int]:
    ids = [i for c in chunks for i in c.token_ids]
    return ids, "".join(c.text for c in chunks), chunks[-1].usage.prompt_tokens


def test_chat_gives_the_tokens_generate_gives_on_the_prompt_transformers_renders(
    chat_cluster: Cluster, chat_model_dir: Path,
) -> None:
    reference = _reference_ids(chat_model_dir, MESSAGES)
    chat_request = pb.ChatRequest(sampling_params=GREEDY, messages=[
        pb.ChatMessage(role=pb.CHAT_ROLE_SYSTEM, content=MESSAGES[0]["content"]),
        pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=MESSAGES[1]["content"]),
    ])
    with grpc.insecure_channel(chat_cluster.address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        chat = _joined([r.chunk for r in stub.Chat(chat_request, timeout=60)])
        generate = _joined(list(stub.Generate(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=reference), sampling_params=GREEDY), timeout=60)))
    assert chat == generate
    assert len(chat[0]) == 24 and chat[2] == len(reference)


def test_the_client_and_the_cli_chat_as_the_server_does_and_the_cli_keeps_the_history(chat_cluster: Cluster) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8)

    async def replies() -> tuple[str, str]:
        async with PagedServeClient(chat_cluster.address) as client:
            first = (await client.chat([MESSAGES[1]], params))[0].text
            history = [MESSAGES[1], {"role": "assistant", "content": first}, {"role": "user", "content": "And?"}]
            return first, (await client.chat(history, params))[0].text

    first, second = asyncio.run(replies())
    cli = [sys.executable, "-m", "pagedserve.runtime.cli", "chat", "--server", chat_cluster.address,
           "--max-tokens", "8", "--temperature", "0"]
    one_shot = subprocess.run([*cli, "--message", MESSAGES[1]["content"]], capture_output=True, text=True,
                              timeout=60, check=True)
    repl = subprocess.run(cli, input=f"{MESSAGES[1]['content']}\nAnd?\n", capture_output=True, text=True,
                          timeout=60, check=True)
    assert one_shot.stdout == first + "\n"
    assert repl.stdout == first + "\n" + second + "\n"


def test_a_message_the_template_refuses_ends_the_cli_with_the_status(chat_cluster: Cluster) -> None:
    cli = [sys.executable, "-m", "pagedserve.runtime.cli", "chat", "--server", chat_cluster.address,
           "--message", "x" * 5000]
    result = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "error: INVALID_ARGUMENT: messages: text of 5000 characters cannot fit" in result.stderr
