"""In-place logits transforms of the sampler: bans, logit biases, penalties, top-k/top-p and min-p filtering."""

from __future__ import annotations

import array
from collections.abc import Mapping, Sequence

import torch

from pagedserve.gpu_worker.host_transfer import to_device


def token_id_tensor(token_ids: Sequence[int], vocab_size: int) -> torch.Tensor:
    """`token_ids` as a CPU [len] int64 tensor; ValueError if one lies outside [0, vocab_size).

    Checked on the host because an out-of-range index on a GPU is a device-side assert that
    poisons the whole CUDA context, not a catchable error.
    """
    ids = torch.tensor(token_ids, dtype=torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids


def flat_token_positions(
    token_ids_per_row: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Positions `row * vocab_size + token_id` of every listed token: [sum of lengths] int64 on `device`.

    Rows are addressed through flat positions rather than a padded [rows, longest] matrix so that
    one short and one long row cost their own lengths only. The host only concatenates (rows held
    as array('q') are copied as memory, lists element by element) and range-checks; tokens and row
    lengths cross to the device in one copy, where the row of each token is expanded.
    """
    lengths = [len(token_ids) for token_ids in token_ids_per_row]
    packed = array.array("q")
    for token_ids in token_ids_per_row:
        packed.extend(token_ids)
    num_tokens = len(packed)
    packed.extend(lengths)
    host = torch.frombuffer(packed, dtype=torch.int64)
    if num_tokens:
        low, high = (int(v) for v in torch.aminmax(host[:num_tokens]))
        if low < 0 or high >= vocab_size:
            raise ValueError(f"token id {low if low < 0 else high} is outside the vocabulary [0, {vocab_size})")
    on_device = host.to(device)
    tokens, row_lengths = on_device[:num_tokens], on_device[num_tokens:]
    rows = torch.arange(len(token_ids_per_row), device=device)
    # output_size keeps repeat_interleave from reading the total back from the device.
    return torch.repeat_interleave(rows, row_lengths, output_size=num_tokens) * vocab_size + tokens


def apply_bans(logits: torch.Tensor, banned_token_ids: Sequence[Sequence[int]]) -> None:
    """Sets `logits[r, t] = -inf` for every token t in `banned_token_ids[r]`.

    logits: [rows, vocab] float, contiguous (written in place); one entry of `banned_token_ids` per row.
    """
    positions = flat_token_positions(banned_token_ids, logits.shape[1], logits.device)
    logits.view(-1).index_fill_(0, positions, float("-inf"))


def apply_allowed(logits: torch.Tensor, allowed_token_ids: Sequence[Sequence[int]]) -> None:
    """Sets `logits[r, t] = -inf` for every token t not in `allowed_token_ids[r]`; a row with an empty list keeps
    every token.

    logits: [rows, vocab] float, contiguous (written in place); one entry of `allowed_token_ids` per row.
    """
    num_rows, vocab_size = logits.shape
    positions = flat_token_positions(allowed_token_ids, vocab_size, logits.device)
    keep = torch.zeros(num_rows * vocab_size, dtype=torch.bool, device=logits.device)
    keep[positions] = True
    keep = keep.view(num_rows, vocab_size)
    unlimited = [row for row, token_ids in enumerate(allowed_token_ids) if not token_ids]
    if unlimited:
        keep[to_device(torch.tensor(unlimited, dtype=torch.int64), logits.device)] = True
    logits.masked_fill_(~keep, float("-inf"))


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[Mapping[int, float]]) -> None:
    """Adds `biases[r][t]` to `logits[r, t]` for every listed token t.

    logits: [rows, vocab] float, contiguous (written in place); one mapping per row, empty for no bias.
    """
    positions = flat_token_positions([tuple(bias) for bias in biases], logits.shape[1], logits.device)
    values = torch.tensor([v for bias in biases for v in bias.values()], dtype=logits.dtype)
    logits.view(-1).index_add_(0, positions, to_device(values, logits.device))


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    repetition: Sequence[float],
    frequency: Sequence[float],
    presence: Sequence[float],
) -> None:
    """Applies repetition, then frequency and presence penalties to `logits` in place.

    logits: [rows, vocab] float; every other argument has one entry per row.
    - repetition: where a token occurs in the row's prompt or output, a positive logit is divided
      by the penalty and a negative one multiplied by it;
    - then `logit -= frequency * count + presence * (count > 0)`, count = occurrences in the output.
    A row whose repetition penalty is 1 may pass an empty prompt: the prompt then cannot matter.
    """
    num_rows, vocab_size = logits.shape
    has_repetition = any(value != 1.0 for value in repetition)
    # Output counts in plane 0 and, when a repetition penalty needs them, prompt counts in plane 1:
    # both planes are filled by a single scatter_add.
    num_planes = 2 if has_repetition else 1
    token_ids = [*output_token_ids, *prompt_token_ids] if has_repetition else output_token_ids
    positions = flat_token_positions(token_ids, vocab_size, logits.device)
    counts = torch.zeros(num_planes * num_rows * vocab_size, dtype=torch.int32, device=logits.device)
    counts.scatter_add_(0, positions, torch.ones_like(positions, dtype=torch.int32))
    planes = counts.view(num_planes, num_rows, vocab_size)
    output_counts = planes[0]
    factors = torch.tensor([repetition, frequency, presence], dtype=logits.dtype, device=logits.device)
    repetition_t, frequency_t, presence_t = factors.unsqueeze(-1).unbind(0)
    if has_repetition:
        seen = (output_counts > 0) | (planes[1] > 0)
        penalised = torch.where(logits > 0, logits / repetition_t, logits * repetition_t)
        logits.copy_(torch.where(seen, penalised, logits))
    if any(value != 0.0 for value in (*frequency, *presence)):
        logits -= frequency_t * output_counts + presence_t * (output_counts > 0)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, max_top_k: int) -> None:
    """Keeps each row's top-k tokens, then the smallest nucleus of them holding mass top_p; others -> -inf.

    logits: [rows, vocab] float, written in place. top_k: [rows] int64 in [1, vocab] (vocab = no limit).
    top_p: [rows] float in (0, 1] (1 = no limit), applied to the distribution renormalised over the
    top-k tokens. max_top_k: the largest entry of top_k, known on the host: only that many best
    logits are ranked, a partial top-k instead of a full sort when every row has a limit.
    A token is kept when the mass of the tokens ranked strictly above it is below top_p, so the
    best token always survives; tokens tied with the last kept one survive too.
    """
    if max_top_k < logits.shape[-1]:
        ranked = logits.topk(max_top_k, dim=-1).values
    else:
        ranked = logits.sort(dim=-1, descending=True).values
    positions = torch.arange(ranked.shape[-1], device=logits.device)
    within_k = positions < top_k.unsqueeze(-1)
    ranked.masked_fill_(~within_k, float("-inf"))
    probs = ranked.softmax(dim=-1)
    # Exclusive prefix sums by shifting an inclusive cumsum: it stays monotone under rounding, so the
    # kept set is a prefix of the ranked order and its length locates the threshold.
    mass_above = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
    # top_p == 1 must keep everything even where a float32 cumsum reaches 1.0 before the tail.
    within_p = (mass_above < top_p.unsqueeze(-1)) | (top_p >= 1.0).unsqueeze(-1)
    num_kept = (within_k & within_p).sum(dim=-1, keepdim=True)
    threshold = ranked.gather(1, num_kept - 1)
    logits.masked_fill_(logits < threshold, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drops tokens whose probability is below min_p times the row's highest probability (-> -inf).

    logits: [rows, vocab] float, written in place; min_p: [rows] float in [0, 1] (0 = no limit).
    p_i >= min_p * p_max is the same as logit_i >= logit_max + ln(min_p), which needs no softmax.
    """
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(-1)
    logits.masked_fill_(logits < threshold, float("-inf"))
