"""How many real tokens a CNN/DailyMail row holds after batching, for the planner's step time and tokens/s.

Rows are rarely full: an example is article + highlights + template, cut to ``max_length``. Modelled as in
``benchmarks/token_efficiency.py``: article tokens normal(871, 370) (Llama 3 tokenizer, 3.0.0 train: mean ~870, about
a third over 1,024), highlights ~62, template ~10. The expected cut length E[min(X, L)] of a normal X has a closed
form; at L = 1,024 it gives 832 tokens, against 838 measured by that benchmark over 287,113 drawn examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EXAMPLE_MEAN_TOKENS = 871 + 62 + 10  # article + highlights + template
EXAMPLE_STD_TOKENS = 370
SAMPLE_DATASET = "sample"  # the bundled synthetic sample: its lengths are not CNN/DailyMail's


@dataclass(frozen=True)
class RowTokens:
    """Mean real tokens per row (None: full rows or unknown) and whether rows are padded to ``max_length``."""

    mean: float | None
    pads_to_max: bool
    source: str


def expected_cut_length(max_length: int, mean: float = EXAMPLE_MEAN_TOKENS, std: float = EXAMPLE_STD_TOKENS) -> float:
    """E[min(X, max_length)] for X ~ normal(mean, std): mean·Φ(z) − std·φ(z) + max_length·(1 − Φ(z))."""
    z = (max_length - mean) / std
    cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    pdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return min(float(max_length), mean * cdf - std * pdf + max_length * (1 - cdf))


def expected_row_tokens(dataset: str, batching: str, max_length: int) -> RowTokens:
    """Real tokens per row of the recipe's batching: packed rows are full; the others hold one cut example each."""
    pads = batching == "pad_to_max"
    if batching == "packed":
        return RowTokens(None, False, "packed rows are full")
    if dataset == SAMPLE_DATASET:
        return RowTokens(None, pads, "bundled sample: row lengths not modelled, full rows assumed")
    mean = expected_cut_length(max_length)
    return RowTokens(mean, pads, f"CNN/DailyMail length model: {mean:,.0f} of {max_length:,} tokens per row")
