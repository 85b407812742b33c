"""The prompt-attention step benchmark's FLOP count (CPU): causal rows over their cached context, decodes left out."""

from __future__ import annotations

from benchmarks.kernel_prefill_steps import STEPS, causal_flops


def test_a_chunk_counts_each_row_against_the_context_before_it_and_itself() -> None:
    # Two rows at positions 3 and 4 of a 5-token context see 4 and 5 keys: 4 * heads * head_dim * (4 + 5).
    assert causal_flops([(2, 5)], q_heads=2, head_dim=8) == 4 * 2 * 8 * 9


def test_whole_prompts_count_the_causal_triangle() -> None:
    offline = STEPS["offline: 16 prompts of 1,024"]
    assert causal_flops(offline, 32, 64) == 16 * 4 * 32 * 64 * 1024 * 1025 / 2


def test_decode_rows_count_nothing() -> None:
    assert causal_flops([(1, 1100), (1, 2048)], q_heads=32, head_dim=64) == 0.0


def test_the_decodes_first_shapes_are_their_counterparts_reordered() -> None:
    for first, last in (("c=256: 254 decodes first, chunks 1,024 + 776", "c=256: chunks 1,024 + 776, 254 decodes"),
                        ("c=64: 62 decodes first, chunks 1,024 + 960", "c=64: chunks 1,024 + 960, 62 decodes")):
        assert STEPS[first] != STEPS[last] and sorted(STEPS[first]) == sorted(STEPS[last])
        assert STEPS[first][0][0] == 1 and STEPS[last][0][0] > 1
