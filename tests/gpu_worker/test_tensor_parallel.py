"""A model sharded over 2 or 4 ranks (gloo on the CPU, NCCL on GPUs) generates exactly the greedy tokens of one rank
and of transformers, for every supported architecture: grouped KV heads split or replicated, biases, q/k norms, a
vocabulary the ranks do not divide evenly. Each rank's KV pool holds only its heads. (bfloat16 on two GPUs:
test_bf16_agreement.py.)"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PretrainedConfig, Qwen2Config

from pagedserve.contract.model_format import DeviceKind
from pagedserve.contract.worker_info import CacheRequest
from pagedserve.gpu_worker.errors import InvalidCacheRequestError, ModelLoadError
from pagedserve.gpu_worker.models.decoder import DecoderForCausalLM
from pagedserve.gpu_worker.models.model_config import ModelConfig
from pagedserve.gpu_worker.parallel.commands import FIRST_MESSAGE_BYTES, CommandChannel, CommandKind
from pagedserve.gpu_worker.parallel.config import TensorParallelConfig
from pagedserve.gpu_worker.parallel.group import ParallelGroup, join_group
from pagedserve.gpu_worker.parallel.sharding import ShardLayout
from pagedserve.gpu_worker.weights import iter_safetensors, safetensors_files
from pagedserve.kernels.reference import TorchReferenceOps
from pagedserve.runtime.port_check import free_loopback_port
from tests.gpu_marks import NEEDS_GPU
from tests.gpu_worker.harness import STORIES_DIR, WorkerDriver, make_sequences
from tests.gpu_worker.tensor_parallel_harness import leader_of_group
from tests.gpu_worker.test_models import (
    _TINY,
    BLOCK_SIZE,
    FIRST_CHUNKS,
    NUM_NEW_TOKENS,
    PROMPTS,
    _hf_greedy,
    _llama_gqa_tied,
    _mistral,
    _qwen3,
    _save_tiny_model,
)

NEEDS_TWO_GPUS = [*NEEDS_GPU, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]
DEVICES = [
    pytest.param(DeviceKind.CPU, id="cpu"),
    pytest.param(DeviceKind.CUDA, id="cuda", marks=NEEDS_TWO_GPUS),
]


def _qwen2_uneven_vocab() -> PretrainedConfig:
    """Qwen2 (q/k/v biases) with 126 tokens: 4 ranks hold 32, 32, 32 and 30 rows (2 of padding)."""
    return Qwen2Config(**{**_TINY, "vocab_size": 126})


ARCHITECTURES = {"llama-gqa-tied": _llama_gqa_tied, "mistral": _mistral, "qwen2-uneven-vocab": _qwen2_uneven_vocab,
                 "qwen3": _qwen3}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[list[int]]]]:
    """Per architecture: the saved tiny model and transformers' greedy tokens for PROMPTS, computed once."""
    models = {}
    for name, make_config in ARCHITECTURES.items():
        model_dir = _save_tiny_model(make_config(), tmp_path_factory.mktemp(name))
        models[name] = (model_dir, [_hf_greedy(model_dir, prompt) for prompt in PROMPTS])
    return models


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("device", DEVICES)
def test_batched_chunked_greedy_tokens_of_a_sharded_model_equal_transformers(
    tiny_models: dict[str, tuple[Path, list[list[int]]]], architecture: str, size: int, device: DeviceKind,
) -> None:
    if device is DeviceKind.CUDA and torch.cuda.device_count() < size:
        pytest.skip(f"needs {size} CUDA GPUs")
    model_dir, expected = tiny_models[architecture]
    with leader_of_group(model_dir, size, block_size=BLOCK_SIZE, device=device) as leader:
        driver = WorkerDriver(leader, BLOCK_SIZE, num_blocks=256)
        generated = driver.generate(make_sequences(PROMPTS, FIRST_CHUNKS), NUM_NEW_TOKENS)

    assert generated == expected


@pytest.mark.parametrize("size", [1, 2, 4])
def test_stories260k_on_1_2_and_4_ranks_gives_the_golden_greedy_tokens(size: int) -> None:
    golden = json.loads((STORIES_DIR / "golden_greedy.json").read_text())
    with leader_of_group(STORIES_DIR, size, block_size=BLOCK_SIZE, num_blocks=64) as leader:
        driver = WorkerDriver(leader, BLOCK_SIZE, num_blocks=64)
        generated = driver.generate(make_sequences([golden["prompt_ids"]], {0: 3}), len(golden["greedy_new_ids"]))

    assert generated == [golden["greedy_new_ids"]]


def test_an_init_cache_refused_on_every_rank_leaves_the_group_serving() -> None:
    golden = json.loads((STORIES_DIR / "golden_greedy.json").read_text())
    with leader_of_group(STORIES_DIR, 2, block_size=BLOCK_SIZE, num_blocks=64) as leader:
        with pytest.raises(InvalidCacheRequestError, match="kv_cache_memory_bytes 1 holds no block"):
            leader.init_cache(CacheRequest(block_size=BLOCK_SIZE, kv_cache_memory_bytes=1, max_num_seqs=4))
        info = leader.init_cache(CacheRequest(block_size=BLOCK_SIZE, num_gpu_blocks_override=64, max_num_seqs=4))
        driver = WorkerDriver(leader, BLOCK_SIZE, num_blocks=64)
        generated = driver.generate(make_sequences([golden["prompt_ids"]]), len(golden["greedy_new_ids"]))

    assert info.num_gpu_blocks == 64
    assert generated == [golden["greedy_new_ids"]]


def test_each_rank_holds_the_kv_of_its_own_heads_only() -> None:
    """stories260K has 4 KV heads: 2 per rank of 2, 1 per rank of 4, and still 1 per rank of 8 (each held twice)."""
    per_token = []
    for size in (1, 2, 4):
        with leader_of_group(STORIES_DIR, size, num_blocks=8) as leader:
            per_token.append(leader.info().kv_bytes_per_token)

    assert per_token == [per_token[0], per_token[0] // 2, per_token[0] // 4]
    assert ShardLayout(_stories_config(intermediate_size=176), rank=5, size=8).num_kv_heads == 1


def test_a_group_size_that_does_not_divide_the_heads_is_refused_naming_them() -> None:
    with pytest.raises(ModelLoadError, match="tensor parallel size 3 does not divide the 8 attention heads"):
        ShardLayout(_stories_config(), rank=0, size=3)


def test_replicated_kv_heads_go_to_the_ranks_whose_query_heads_read_them() -> None:
    """8 query heads over 4 KV heads on 8 ranks: rank r has query head r, which reads KV head r // 2."""
    config = _stories_config(intermediate_size=176)
    assert [ShardLayout(config, rank, 8).first_kv_head for rank in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_a_command_longer_than_one_broadcast_reaches_the_follower_whole_and_in_order() -> None:
    rendezvous = f"127.0.0.1:{free_loopback_port()}"
    payload = bytes(range(256)) * (3 * FIRST_MESSAGE_BYTES // 256)
    received: list[Any] = []

    def follow() -> None:
        channel = CommandChannel(join_group(TensorParallelConfig(1, 2, rendezvous, 30.0), torch.device("cpu")))
        received.extend([channel.receive(), channel.receive()])

    follower = threading.Thread(target=follow)
    follower.start()
    leader = CommandChannel(join_group(TensorParallelConfig(0, 2, rendezvous, 30.0), torch.device("cpu")))
    leader.send(CommandKind.STEP, payload)
    leader.send(CommandKind.HEARTBEAT)
    follower.join()

    assert received == [(CommandKind.STEP, payload), (CommandKind.HEARTBEAT, b"")]


def test_a_rank_reads_only_its_slice_of_each_weight_from_the_files() -> None:
    """Rank 1 of 2 of stories260K (8 heads of 8, 4 KV heads, 172 MLP columns, 512 tokens) reads the second half."""
    full = dict(iter_safetensors(safetensors_files(STORIES_DIR), _decoder(ParallelGroup(0, 1))))
    second = dict(iter_safetensors(safetensors_files(STORIES_DIR), _decoder(ParallelGroup(1, 2))))
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."

    assert set(second) == set(full)
    assert torch.equal(second[f"{attn}q_proj.weight"], full[f"{attn}q_proj.weight"][32:])
    assert torch.equal(second[f"{attn}k_proj.weight"], full[f"{attn}k_proj.weight"][16:])
    assert torch.equal(second[f"{attn}o_proj.weight"], full[f"{attn}o_proj.weight"][:, 32:])
    assert torch.equal(second[f"{mlp}up_proj.weight"], full[f"{mlp}up_proj.weight"][86:])
    assert torch.equal(second[f"{mlp}down_proj.weight"], full[f"{mlp}down_proj.weight"][:, 86:])
    assert torch.equal(second["model.embed_tokens.weight"], full["model.embed_tokens.weight"][256:])
    assert torch.equal(second["model.norm.weight"], full["model.norm.weight"])


def _decoder(group: ParallelGroup) -> DecoderForCausalLM:
    """stories260K's decoder for a rank of group, unloaded (loading needs no collective)."""
    return DecoderForCausalLM(_stories_config(), TorchReferenceOps(), torch.device("cpu"), torch.float32, group)


def _stories_config(**changes: Any) -> ModelConfig:
    """stories260K's config (8 query heads, 4 KV heads, intermediate size 172), with changes."""
    return ModelConfig.from_hf_config({**json.loads((STORIES_DIR / "config.json").read_text()), **changes})
