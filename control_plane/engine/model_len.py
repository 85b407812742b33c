"""The served context length (max_model_len): the flag checked against the model's limit and each worker's KV pool.

vLLM's rules: a --max-model-len above the model's max_position_embeddings is an error, never clamped in silence;
a pool that cannot hold one sequence of max_model_len tokens is an error when the operator asked for that length,
and when the length came from the model it shrinks to what the smallest pool holds, with a warning (as vLLM's
"auto" length fits the memory), so a small KV cache serves shorter contexts instead of cutting requests short.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from pagedserve.control_plane.errors import PagedServeError
from pagedserve.control_plane.scheduling.fit import blocks_for

log = structlog.get_logger()

_MORE_KV = "raise --gpu-memory-utilization (GPU workers), --kv-cache-memory or --num-gpu-blocks-override"


class MaxModelLenError(PagedServeError):
    """--max-model-len asks for more than the model or a worker's KV pool can hold (a start-up error)."""


def check_model_limit(requested: int | None, max_position_embeddings: int) -> int:
    """The context length asked for (the model's max_position_embeddings when requested is None); MaxModelLenError
    naming both numbers when requested exceeds the model's limit (positions past it were never trained; rope
    scaling that extends them is already in max_position_embeddings)."""
    if requested is None:
        return max_position_embeddings
    if requested > max_position_embeddings:
        raise MaxModelLenError(
            f"--max-model-len {requested} is more than the model's limit, max_position_embeddings "
            f"{max_position_embeddings}: pass --max-model-len {max_position_embeddings} or less, or leave it out"
        )
    return requested


def fit_to_pools(max_model_len: int, is_requested: bool, pools: Sequence[tuple[str, int]], block_size: int) -> int:
    """max_model_len if every pool ((worker id, KV blocks), of block_size tokens) holds one sequence that long.
    Otherwise MaxModelLenError naming both numbers and the flags when is_requested (the operator chose it), else
    the longest length the smallest pool holds, logged as a warning."""
    worker_id, num_blocks = min(pools, key=lambda pool: pool[1])
    if blocks_for(max_model_len, block_size) <= num_blocks:
        return max_model_len
    num_tokens = num_blocks * block_size  # a sequence of num_tokens + 1 fits: its last token takes no slot
    if is_requested or num_tokens < 2:
        raise MaxModelLenError(
            f"--max-model-len {max_model_len} needs {blocks_for(max_model_len, block_size)} KV blocks of {block_size} "
            f"tokens for one sequence, but worker {worker_id}'s pool has {num_blocks} ({num_tokens} tokens): "
            f"{_MORE_KV}, or pass --max-model-len {num_tokens} or less"
        )
    log.warning(
        "max_model_len_reduced", max_model_len=num_tokens, model_max_model_len=max_model_len, worker_id=worker_id,
        num_gpu_blocks=num_blocks, block_size=block_size,
        message=f"worker {worker_id}'s KV pool of {num_blocks} blocks ({num_tokens} tokens) cannot hold one sequence "
                f"of the model's {max_model_len} tokens: serving max_model_len {num_tokens}; {_MORE_KV} to serve "
                "longer ones, or pass --max-model-len to make this an error",
    )
    return num_tokens
