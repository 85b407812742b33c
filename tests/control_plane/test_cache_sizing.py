"""Memory defaults follow the device: a CPU worker's KV pool holds what it needs (capped) and it does not swap;
a GPU worker keeps vLLM's swap space. serve and the offline LLM share them."""

from __future__ import annotations

import os

from pagedserve.control_plane.config import CPU_KV_CACHE_CAP_BYTES, GPU_SWAP_SPACE_BYTES, CacheConfig
from pagedserve.control_plane.engine.main import build_parser, configs_from_args
from pagedserve.runtime.cpu_threads import local_worker_threads
from pagedserve.runtime.flags import parse_args


def test_a_cpu_pool_holds_what_the_sequences_need_without_swap() -> None:
    cache = CacheConfig().for_worker("cpu", kv_bytes_per_token=4096, max_num_seqs=4, max_model_len=256)

    assert (cache.kv_cache_memory_bytes, cache.swap_space_bytes) == (4096 * 4 * 256, 0)


def test_a_cpu_pool_is_capped() -> None:
    cache = CacheConfig().for_worker("cpu", kv_bytes_per_token=4096, max_num_seqs=256, max_model_len=2048)

    assert (cache.kv_cache_memory_bytes, CPU_KV_CACHE_CAP_BYTES) == (256 << 20, 256 << 20)


def test_a_cpu_pool_holds_one_sequence_of_max_model_len_whatever_the_cap() -> None:
    cache = CacheConfig().for_worker("cpu", kv_bytes_per_token=12 << 10, max_num_seqs=256, max_model_len=32768)

    assert cache.kv_cache_memory_bytes == (12 << 10) * 32768  # 384 MiB: Qwen2.5-0.5B's full context in bfloat16


def test_a_gpu_worker_swaps_into_vllms_four_gib() -> None:
    cache = CacheConfig().for_worker("cuda:0", kv_bytes_per_token=4096, max_num_seqs=256, max_model_len=2048)

    assert (cache.kv_cache_memory_bytes, cache.swap_space_bytes) == (0, GPU_SWAP_SPACE_BYTES)


def test_sizes_given_are_kept() -> None:
    cache = CacheConfig(kv_cache_memory_bytes=1 << 30, swap_space_bytes=2 << 30).for_worker("cpu", 4096, 256, 2048)

    assert (cache.kv_cache_memory_bytes, cache.swap_space_bytes) == (1 << 30, 2 << 30)


def test_serve_defaults_are_the_configs_the_offline_api_uses() -> None:
    _, scheduler, cache, engine = configs_from_args(parse_args(build_parser(), [], os.environ))

    assert (cache, engine) == (CacheConfig(), engine.__class__())
    assert (scheduler.max_num_seqs, scheduler.max_num_batched_tokens, scheduler.max_model_len) == (256, 2048, None)


def test_local_workers_leave_a_core_to_the_control_plane() -> None:
    assert [local_worker_threads(1, cores) for cores in (1, 2, 16)] == [1, 1, 15]
    assert [local_worker_threads(4, cores) for cores in (2, 16)] == [1, 3]
