"""Real tokens per row after batching: the CNN/DailyMail length model the planner's step time uses."""

from __future__ import annotations

import pytest

from llama_ft.data.lengths import expected_cut_length, expected_row_tokens


def test_cut_length_matches_the_token_efficiency_benchmark_and_its_limits():
    assert expected_cut_length(1024) == pytest.approx(838, rel=0.01)  # benchmarks/results/token_efficiency.md
    assert 0.95 * 64 < expected_cut_length(64) <= 64  # nearly every example is cut
    assert expected_cut_length(16384) == pytest.approx(871 + 62 + 10, rel=0.01)  # none is


def test_row_tokens_follow_the_batching_mode():
    grouped = expected_row_tokens("abisee/cnn_dailymail", "length_grouped", 1024)
    padded = expected_row_tokens("abisee/cnn_dailymail", "pad_to_max", 1024)
    assert grouped.mean == padded.mean and not grouped.pads_to_max and padded.pads_to_max
    assert expected_row_tokens("abisee/cnn_dailymail", "packed", 1024).mean is None  # packed rows are full
    assert expected_row_tokens("sample", "length_grouped", 512).mean is None  # lengths not modelled: full rows
