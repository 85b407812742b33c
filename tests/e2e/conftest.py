"""Fixtures that run real processes: a worker and a control plane on loopback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pagedserve.v1 import generation_service_pb2_grpc
from tests import shared_data
from tests.e2e.processes import Cluster, running_cluster


@pytest.fixture(scope="session")
def stories_dir(stories260k_dir: Path) -> Path:
    return stories260k_dir


@pytest.fixture(scope="session")
def golden(stories_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((stories_dir / "golden_greedy.json").read_text())
    return data


@pytest.fixture(scope="module")
def stories_cluster(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(stories_dir, tmp_path_factory.mktemp("stories-logs")) as cluster:
        yield cluster


@pytest.fixture()
def stub(stories_cluster: Cluster) -> Iterator[generation_service_pb2_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(stories_cluster.address) as channel:
        yield generation_service_pb2_grpc.GenerationServiceStub(channel)


def copy_tokenizer(destination: Path) -> None:
    """Puts the stories260K tokenizer (vocabulary 512) beside a test model's weights."""
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(shared_data.stories260k_dir() / name, destination / name)
