"""Structured output's token masks on logits: the torch reference against a token-by-token reading of the bitmask
(CPU), and TokenMaskKernels against the reference on fresh random inputs (GPU): vocabularies that end inside a mask
word or a vector, strided rows, ties, NaN, rows whose mask allows nothing, and the unmasked argmax of float32 and
16-bit logits against torch.argmax."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pagedserve.kernels.reference import TorchReferenceOps
from pagedserve.kernels.token_masks import (
    ARGMAX_CTAS,
    ArgmaxTargets,
    TokenMaskKernels,
    argmax_splits,
    mask_words,
    scratch_words,
)
from tests.gpu_marks import NEEDS_GPU

REFERENCE = TorchReferenceOps()
SHAPES = [(1, 1), (3, 31), (5, 33), (3, 100), (4, 510), (5, 1028), (64, 32000), (64, 128256), (7, 128257),
          (1, 128256), (2, 32000), (1, 128257), (300, 4096)]
KINDS = ["random", "ties_nan_inf", "strided", "strided_vectors"]


def _masks(num_rows: int, vocab_size: int, seed: int, device: str = "cpu") -> Tensor:
    """Random bitmasks, row r allowing about one token in 2 ** (r % 6): rows from dense to sparse; the bits past the
    vocabulary random too (they must be ignored)."""
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**31), 2**31, (num_rows, mask_words(vocab_size)), generator=gen, dtype=torch.int64)
    for row in range(num_rows):
        for _ in range(row % 6):
            words[row] &= torch.randint(-(2**31), 2**31, words[row].shape, generator=gen, dtype=torch.int64)
    return words.to(torch.int32).to(device)


def _logits(num_rows: int, vocab_size: int, seed: int, device: str = "cpu") -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab_size, generator=gen).to(device)


def _is_allowed(masks: Tensor, row: int, token: int) -> bool:
    return bool((int(masks[row, token // 32]) >> (token % 32)) & 1)


def test_reference_masks_exactly_the_tokens_whose_bit_is_clear() -> None:
    num_rows, vocab_size = 4, 70
    logits, masks = _logits(num_rows, vocab_size, seed=1), _masks(num_rows, vocab_size, seed=2)
    masked = logits.clone()
    REFERENCE.apply_token_masks(masked, masks)
    for row in range(num_rows):
        for token in range(vocab_size):
            expected = logits[row, token] if _is_allowed(masks, row, token) else float("-inf")
            assert masked[row, token] == expected


def test_reference_argmax_is_the_best_allowed_token_and_leaves_the_logits() -> None:
    num_rows, vocab_size = 6, 100
    logits, masks = _logits(num_rows, vocab_size, seed=3), _masks(num_rows, vocab_size, seed=4)
    before = logits.clone()
    tokens = REFERENCE.masked_argmax(logits, masks).tolist()
    for row in range(num_rows):
        allowed = [t for t in range(vocab_size) if _is_allowed(masks, row, t)]
        assert tokens[row] == max(allowed, key=lambda t: (float(logits[row, t]), -t))
    assert torch.equal(logits, before)


def test_rows_too_few_to_fill_the_device_are_split_into_runs_of_at_least_two_vectors_a_thread() -> None:
    assert argmax_splits(1, 128256, 8) == 31  # 128,256 bf16 logits: runs of 4,144, two 8-logit vectors a thread
    assert argmax_splits(64, 128256, 8) == 5
    assert argmax_splits(1, 128257, 1) == 250
    assert argmax_splits(ARGMAX_CTAS - 1, 128256, 8) == 2
    assert argmax_splits(ARGMAX_CTAS, 128256, 8) == 1
    assert argmax_splits(1, 4095, 8) == 1  # too short for two runs


NAN_COLUMNS = (0.3, 0.7)  # where the NaN rows hold their two NaNs, as fractions of the vocabulary


def _hard_logits(num_rows: int, vocab_size: int, seed: int) -> Tensor:
    """Whole numbers in [-3, 3] (many ties for the largest); every third row from the second two NaNs, every third
    from the third -inf over its first half."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 4, (num_rows, vocab_size), generator=gen).float()
    for fraction in NAN_COLUMNS:
        logits[1::3, int(fraction * vocab_size)] = float("nan")
    logits[2::3, : vocab_size // 2] = float("-inf")
    return logits


def _allow_the_nans(masks: Tensor, vocab_size: int) -> None:
    """Sets the bits of both NaNs of every NaN row, so that NaN against NaN is ordered (by index)."""
    for fraction in NAN_COLUMNS:
        token = int(fraction * vocab_size)
        bit = 1 << (token % 32)
        masks[1::3, token // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # as an int32


@pytest.fixture(scope="module")
def kernels() -> TokenMaskKernels:
    from pagedserve.kernels.module_cache import ModuleCache

    return TokenMaskKernels(ModuleCache(torch.device("cuda", torch.cuda.current_device())))


def _device_logits(num_rows: int, vocab_size: int, kind: str, dtype: torch.dtype = torch.float32) -> Tensor:
    seed = num_rows * 1000 + vocab_size
    if kind == "ties_nan_inf":
        return _hard_logits(num_rows, vocab_size, seed).to("cuda", dtype)
    if kind == "strided":  # rows of a wider tensor, which do not start on a 16-byte boundary
        return _logits(num_rows, vocab_size + 3, seed, "cuda").to(dtype)[:, 1 : vocab_size + 1]
    if kind == "strided_vectors":  # rows of a wider tensor, starting on 16-byte boundaries
        vector = 16 // dtype.itemsize
        return _logits(num_rows, vocab_size + 2 * vector, seed, "cuda").to(dtype)[:, vector : vocab_size + vector]
    return _logits(num_rows, vocab_size, seed, "cuda").to(dtype)


def _device_masks(num_rows: int, vocab_size: int, kind: str) -> Tensor:
    masks = _masks(num_rows, vocab_size, seed=vocab_size, device="cuda")
    if kind == "ties_nan_inf":
        _allow_the_nans(masks, vocab_size)
    return masks


def _assert_same(got: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.usefixtures("poisoned_outputs")
class TestKernelsMatchReference:
    pytestmark = NEEDS_GPU

    @pytest.mark.parametrize(("num_rows", "vocab_size"), SHAPES, ids=str)
    @pytest.mark.parametrize("kind", KINDS)
    def test_masked_argmax(self, kernels: TokenMaskKernels, num_rows: int, vocab_size: int, kind: str) -> None:
        logits = _device_logits(num_rows, vocab_size, kind)
        masks = _device_masks(num_rows, vocab_size, kind)
        if num_rows > 1:
            masks[-1] = 0  # allows nothing: every logit -inf, so token 0
        before = logits.clone()
        tokens = kernels.masked_argmax(logits, masks)
        assert tokens.tolist() == REFERENCE.masked_argmax(logits, masks).tolist()
        _assert_same(logits, before)

    @pytest.mark.parametrize(("num_rows", "vocab_size"), SHAPES, ids=str)
    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    def test_argmax_without_masks_is_torch_argmax_in_the_logits_dtype(
        self, kernels: TokenMaskKernels, num_rows: int, vocab_size: int, kind: str, dtype: torch.dtype
    ) -> None:
        logits = _device_logits(num_rows, vocab_size, kind, dtype)
        before = logits.clone()
        tokens = kernels.masked_argmax(logits, None)
        assert tokens.tolist() == logits.argmax(dim=-1).tolist()
        assert tokens.tolist() == logits.float().argmax(dim=-1).tolist()
        _assert_same(logits, before)

    @pytest.mark.parametrize(("num_rows", "vocab_size"), [(3, 100), (5, 1028), (64, 128256)], ids=str)
    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
    def test_masked_argmax_of_16_bit_logits_is_that_of_their_float32_values(
        self, kernels: TokenMaskKernels, num_rows: int, vocab_size: int, kind: str, dtype: torch.dtype
    ) -> None:
        logits = _device_logits(num_rows, vocab_size, kind, dtype)
        masks = _device_masks(num_rows, vocab_size, kind)
        tokens = kernels.masked_argmax(logits, masks)
        assert tokens.tolist() == REFERENCE.masked_argmax(logits.float(), masks).tolist()

    @pytest.mark.parametrize(("num_rows", "vocab_size"), SHAPES, ids=str)
    @pytest.mark.parametrize("kind", KINDS)
    def test_apply_token_masks(self, kernels: TokenMaskKernels, num_rows: int, vocab_size: int, kind: str) -> None:
        logits = _device_logits(num_rows, vocab_size, kind)
        masks = _device_masks(num_rows, vocab_size, kind)
        expected = logits.clone()
        REFERENCE.apply_token_masks(expected, masks)
        kernels.apply_token_masks(logits, masks)
        _assert_same(logits, expected)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
    def test_split_rows_keep_the_first_of_equal_bests_across_runs(
        self, kernels: TokenMaskKernels, dtype: torch.dtype, masked: bool
    ) -> None:
        vocab_size = 128256
        vec = 16 // dtype.itemsize
        splits = argmax_splits(5, vocab_size, vec)
        run = -(-vocab_size // vec // splits) * vec  # tokens of a run
        assert splits > 2
        logits = torch.zeros(5, vocab_size, dtype=dtype, device="cuda")
        logits[0, [run - 1, run, 2 * run + 5]] = 2.0  # equal bests at the end of run 0 and in runs 1 and 2
        logits[1, run] = 9.0
        logits[1, [2 * run + 1, 2 * run]] = float("nan")  # NaN above 9: the first NaN
        logits[2, vocab_size - 1] = 1.0  # the last token, in the last run
        logits[3, : run + 3] = -1.0  # row 3: equal bests from run 1 on; row 4: all equal
        masks = torch.full((5, mask_words(vocab_size)), -1, dtype=torch.int32, device="cuda") if masked else None
        expected = [run - 1, 2 * run, vocab_size - 1, run + 3, 0]
        if masks is not None:
            kept = 0xFFFFFFFF ^ (1 << (run - 1) % 32)  # bans token run - 1 alone: the best is now the first of run 1
            masks[0, (run - 1) // 32] = kept - (1 << 32) if kept >= 1 << 31 else kept
            masks[4] = 0  # every token banned: token 0
            expected[0] = run
        assert kernels.masked_argmax(logits, masks).tolist() == expected
        assert expected == REFERENCE.masked_argmax(logits.float(), masks).tolist()

    @pytest.mark.parametrize(("num_rows", "vocab_size"), [(1, 128256), (5, 1028), (64, 128256), (300, 4096)], ids=str)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_argmax_into_buffers_also_keeps_each_token_at_its_index(
        self, kernels: TokenMaskKernels, num_rows: int, vocab_size: int, dtype: torch.dtype
    ) -> None:
        logits = _device_logits(num_rows, vocab_size, "random", dtype)
        masks = _device_masks(num_rows, vocab_size, "random")
        tokens = torch.full((num_rows,), -7, dtype=torch.int64, device="cuda")
        scratch = torch.empty(scratch_words(num_rows, vocab_size), dtype=torch.int32, device="cuda")
        kept = torch.full((2 * num_rows + 3,), -1, dtype=torch.int64, device="cuda")
        index = torch.randperm(len(kept), generator=torch.Generator().manual_seed(num_rows))[:num_rows].cuda()
        targets = ArgmaxTargets(tokens, scratch if scratch.numel() else None, kept, index)
        kernels.masked_argmax_into(logits, masks, targets)
        expected = REFERENCE.masked_argmax(logits.float(), masks)
        assert tokens.tolist() == expected.tolist()
        expected_kept = torch.full_like(kept, -1).index_copy_(0, index, expected.cuda())
        assert kept.tolist() == expected_kept.tolist()

    def test_argmax_into_refuses_too_little_scratch_and_half_a_kept_pair(self, kernels: TokenMaskKernels) -> None:
        logits = _logits(2, 32000, seed=0, device="cuda")
        tokens = torch.empty(2, dtype=torch.int64, device="cuda")
        assert scratch_words(2, 32000) > 0
        with pytest.raises(ValueError, match="scratch must be a contiguous CUDA int32 tensor of at least"):
            kernels.masked_argmax_into(logits, None, ArgmaxTargets(tokens, None))
        scratch = torch.empty(scratch_words(2, 32000), dtype=torch.int32, device="cuda")
        with pytest.raises(ValueError, match="kept and kept_index come together"):
            kernels.masked_argmax_into(logits, None, ArgmaxTargets(tokens, scratch, tokens))

    def test_nan_rows_put_their_first_allowed_nan_first(self, kernels: TokenMaskKernels) -> None:
        vocab_size = 1028
        logits = _hard_logits(6, vocab_size, seed=1).cuda()
        masks = _device_masks(6, vocab_size, "ties_nan_inf")
        first_nan = int(NAN_COLUMNS[0] * vocab_size)
        assert kernels.masked_argmax(logits, masks)[1::3].tolist() == [first_nan, first_nan]

    def test_refuses_masks_of_another_shape_naming_them(self, kernels: TokenMaskKernels) -> None:
        logits = _logits(2, 64, seed=0, device="cuda")
        with pytest.raises(ValueError, match=r"masks must be a contiguous \[2, 2\] int32"):
            kernels.masked_argmax(logits, _masks(2, 96, seed=0, device="cuda"))
        with pytest.raises(ValueError, match="logits must be a CUDA .* float32 tensor"):
            kernels.apply_token_masks(logits.half(), _masks(2, 64, seed=0, device="cuda"))
        with pytest.raises(ValueError, match="logits must be a CUDA .* float32 / float16 / bfloat16 tensor"):
            kernels.masked_argmax(logits.double(), None)
