"""Whether a request can ever run on one worker, and whether it can run to its end there: its sequences' lengths
against the worker's KV pool, in blocks."""

from __future__ import annotations

from pagedserve.control_plane.errors import NeverFitsError
from pagedserve.control_plane.scheduling.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks a sequence of num_tokens tokens holds. Its last token is sampled, not yet computed, so it takes
    no slot:

        tokens  [0 ........................ num_tokens-2][num_tokens-1]
        KV      [ ceil((num_tokens - 1) / block_size) blocks ][ none  ]
    """
    return -(-(num_tokens - 1) // block_size)


def shortest_sequence(request: Request) -> int:
    """Tokens a sequence of the request must reach to end as asked: its prompt and min_tokens (at least one) new
    tokens. A pool that cannot hold them can never serve the request."""
    return request.num_prompt_tokens + max(request.sampling_params.min_tokens, 1)


def resumed_sequence(request: Request) -> int:
    """Tokens the longest unfinished sequence of a request whose worker failed must reach to go on elsewhere: its
    known tokens and one more (or its shortest, if min_tokens asks for more)."""
    known = max((len(seq.output_token_ids) for seq in request.unfinished_sequences), default=0)
    return max(shortest_sequence(request), request.num_prompt_tokens + known + 1)


def longest_sequence(request: Request, max_model_len: int | None) -> int:
    """Tokens of the request's longest possible sequence: its prompt plus max_tokens, capped by max_model_len;
    without max_tokens, max_model_len (without either, its shortest)."""
    max_tokens = request.sampling_params.max_tokens
    if max_tokens is None:
        return max_model_len or shortest_sequence(request)
    total = request.num_prompt_tokens + max_tokens
    return total if max_model_len is None else min(total, max_model_len)


def never_fits_error(request: Request, block_size: int, num_blocks: int) -> NeverFitsError:
    """The error for a request that no pool of num_blocks blocks (the largest there is) can ever serve."""
    min_tokens = request.sampling_params.min_tokens
    asked = (f"a prompt of {request.num_prompt_tokens} tokens and min_tokens {min_tokens} need" if min_tokens
             else f"a prompt of {request.num_prompt_tokens} tokens needs")
    return NeverFitsError(
        f"the request can never fit: {asked} {blocks_for(shortest_sequence(request), block_size)} KV blocks "
        f"of {block_size} tokens, and the largest worker's pool has {num_blocks}; shorten the prompt (retrying "
        "does not help)"
    )
