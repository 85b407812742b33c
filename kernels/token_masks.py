"""Launchers of token_masks.cu: structured output's token bitmasks applied to a batch's logits, in place or fused with
a greedy batch's argmax; without masks, the argmax of every greedy batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from pagedserve.kernels.launch_args import address, int32, int64, pointer, scalar_type_name

if TYPE_CHECKING:
    from pagedserve.kernels.module_cache import ModuleCache

SOURCE = "token_masks.cu"
VECTOR_BYTES = 16  # one load: 4 float32 or 8 16-bit logits
ARGMAX_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
APPLY_THREADS = 256
ARGMAX_THREADS = 1024  # one CTA a row: a row of a large vocabulary (128K logits) is read by every thread of it
# Fewer rows than ARGMAX_CTAS are split into runs, one CTA of SPLIT_THREADS each, until the grid has about that many
# CTAs (two an SM of a 132-SM device), each thread comparing at least MIN_RUN_VECTORS vectors: one CTA comparing a
# whole 128K-token row is bound by its own instructions: 14.9 us on an H100 against 4.4 us split
# (benchmarks/results/2026-12-05-decode-products-nvidia-h100-80gb-hbm3-aa9bbf7.md).
ARGMAX_CTAS = 264
SPLIT_THREADS = 256
MIN_RUN_VECTORS = 2


def argmax_kernel_name(dtype: torch.dtype, vec: int) -> str:
    return f"masked_argmax<{scalar_type_name(dtype)}, {vec}>"


def known_name_expressions() -> list[str]:
    return ["apply_token_masks", "argmax_of_splits"] + [
        argmax_kernel_name(dtype, vec) for dtype in ARGMAX_DTYPES for vec in (1, VECTOR_BYTES // dtype.itemsize)
    ]


def argmax_splits(num_rows: int, vocab_size: int, vec: int) -> int:
    """Runs each row's argmax is split into: 1 from ARGMAX_CTAS rows on."""
    if num_rows >= ARGMAX_CTAS:
        return 1
    most = vocab_size // (SPLIT_THREADS * vec * MIN_RUN_VECTORS)
    return max(1, min(-(-ARGMAX_CTAS // num_rows), most))


def scratch_words(num_rows: int, vocab_size: int) -> int:
    """int32 words masked_argmax_into needs as scratch for num_rows rows of vocab_size logits, whatever their dtype:
    a float32 best and an index per split run (most runs at one logit a vector)."""
    splits = argmax_splits(num_rows, vocab_size, 1)
    return 2 * num_rows * splits if splits > 1 else 0


class ArgmaxTargets(NamedTuple):
    """Where masked_argmax_into writes, all on the logits' device: tokens [rows] int64; scratch, at least
    scratch_words(rows, vocab) int32 (the split runs' bests; None where that is 0); kept and kept_index (both or
    neither): each row's token also written at kept[kept_index[row]] (int64; the rows' kept_index distinct)."""

    tokens: Tensor
    scratch: Tensor | None
    kept: Tensor | None = None
    kept_index: Tensor | None = None


def mask_words(vocab_size: int) -> int:
    """int32 words of one row's mask: one bit per token."""
    return -(-vocab_size // 32)


class TokenMaskKernels:
    """Equal to TorchReferenceOps' methods of the same names (pagedserve.kernels.reference), each one launch on torch's
    current stream, without a host sync.

    logits: [rows, vocab] CUDA, unit column stride (rows may be strided): float32, or for masked_argmax also float16
    or bfloat16; masks: [rows, ceil(vocab / 32)] int32, contiguous, on the logits' device; bit t % 32 of word t // 32
    set when token t is allowed.
    """

    def __init__(self, modules: ModuleCache) -> None:
        self._modules = modules

    def apply_token_masks(self, logits: Tensor, masks: Tensor) -> None:
        """logits[r, t] = -inf wherever bit t of masks[r] is clear, in place (float32 logits)."""
        _check_logits(logits, (torch.float32,))
        _check_masks(logits, masks)
        num_rows, vocab_size = logits.shape
        if num_rows == 0 or vocab_size == 0:
            return
        kernel = self._modules.kernel(SOURCE, "apply_token_masks")
        self._modules.launch(kernel, (num_rows, -(-vocab_size // APPLY_THREADS), 1), (APPLY_THREADS, 1, 1), (
            pointer(logits), pointer(masks), int32(vocab_size), int64(logits.stride(0)), int32(masks.shape[1]),
        ))

    def masked_argmax(self, logits: Tensor, masks: Tensor | None) -> Tensor:
        """New [rows] int64: the first index of each row's largest logit, tokens whose bit is clear taken as -inf (NaN
        the largest, as torch.argmax takes it), every token allowed without masks; the logits are not changed."""
        _check_logits(logits, ARGMAX_DTYPES)
        num_rows, vocab_size = logits.shape
        tokens = logits.new_empty((num_rows,), dtype=torch.int64)
        words = scratch_words(num_rows, vocab_size)
        scratch = logits.new_empty((words,), dtype=torch.int32) if words else None
        self.masked_argmax_into(logits, masks, ArgmaxTargets(tokens, scratch))
        return tokens

    def masked_argmax_into(self, logits: Tensor, masks: Tensor | None, targets: ArgmaxTargets) -> None:
        """masked_argmax into buffers allocated ahead (ArgmaxTargets): queues one or two launches and allocates
        nothing, so that no torch call on the way lets the interpreter lock go."""
        _check_logits(logits, ARGMAX_DTYPES)
        if masks is not None:
            _check_masks(logits, masks)
        num_rows, vocab_size = logits.shape
        if vocab_size == 0:
            raise ValueError("logits must have at least one column for an argmax")
        _check_targets(targets, num_rows, vocab_size)
        if num_rows == 0:
            return
        vec = VECTOR_BYTES // logits.itemsize
        if (vocab_size | logits.stride(0)) % vec or logits.data_ptr() % VECTOR_BYTES:
            vec = 1
        splits = argmax_splits(num_rows, vocab_size, vec)
        # The runs' float32 bests, then their indices: split rows only.
        scratch = targets.scratch.data_ptr() if targets.scratch is not None and splits > 1 else 0
        bests = address(scratch)
        indices = address(scratch + 4 * num_rows * splits if scratch else 0)
        kept = (address(0), address(0)) if targets.kept is None or targets.kept_index is None else (
            pointer(targets.kept), pointer(targets.kept_index))
        kernel = self._modules.kernel(SOURCE, argmax_kernel_name(logits.dtype, vec))
        threads = ARGMAX_THREADS if splits == 1 else SPLIT_THREADS
        self._modules.launch(kernel, (num_rows, splits, 1), (threads, 1, 1), (
            pointer(logits), address(0) if masks is None else pointer(masks), pointer(targets.tokens),
            int32(vocab_size), int64(logits.stride(0)), int32(0 if masks is None else masks.shape[1]), bests, indices,
            *kept,
        ))
        if splits > 1:
            self._modules.launch(self._modules.kernel(SOURCE, "argmax_of_splits"), (num_rows, 1, 1), (32, 1, 1),
                                 (bests, indices, pointer(targets.tokens), int32(splits), *kept))


def _check_logits(logits: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if logits.dim() != 2 or logits.dtype not in dtypes or not logits.is_cuda:
        names = " / ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
        raise ValueError(f"logits must be a CUDA [rows, vocab] {names} tensor, got {tuple(logits.shape)} "
                         f"{logits.dtype} on {logits.device}")
    if logits.stride(1) != 1 and logits.shape[1] > 1:
        raise ValueError(f"logits must have unit column stride, got strides {logits.stride()}")


def _check_targets(targets: ArgmaxTargets, num_rows: int, vocab_size: int) -> None:
    tokens, scratch, kept, kept_index = targets
    if tuple(tokens.shape) != (num_rows,) or tokens.dtype != torch.int64 or not tokens.is_cuda:
        raise ValueError(f"tokens must be a CUDA [{num_rows}] int64 tensor, got {tuple(tokens.shape)} {tokens.dtype}")
    words = scratch_words(num_rows, vocab_size)
    if words and (scratch is None or scratch.dtype != torch.int32 or not scratch.is_contiguous()
                  or scratch.numel() < words or not scratch.is_cuda):
        got = "None" if scratch is None else f"{tuple(scratch.shape)} {scratch.dtype}"
        raise ValueError(f"scratch must be a contiguous CUDA int32 tensor of at least {words} words, got {got}")
    if (kept is None) != (kept_index is None):
        raise ValueError("kept and kept_index come together")
    if kept is not None and kept_index is not None and (
        kept.dtype != torch.int64 or not kept.is_contiguous() or not kept.is_cuda
        or tuple(kept_index.shape) != (num_rows,) or kept_index.dtype != torch.int64 or not kept_index.is_cuda
    ):
        raise ValueError(f"kept must be a contiguous CUDA int64 tensor and kept_index a CUDA [{num_rows}] int64 one, "
                         f"got {kept.dtype} and {tuple(kept_index.shape)} {kept_index.dtype}")


def _check_masks(logits: Tensor, masks: Tensor) -> None:
    expected = (logits.shape[0], mask_words(logits.shape[1]))
    if tuple(masks.shape) != expected or masks.dtype != torch.int32 or masks.device != logits.device or (
        not masks.is_contiguous()
    ):
        raise ValueError(f"masks must be a contiguous {list(expected)} int32 tensor on {logits.device}, got "
                         f"{tuple(masks.shape)} {masks.dtype} on {masks.device}")
