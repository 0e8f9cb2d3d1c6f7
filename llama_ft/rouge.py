"""ROUGE as CNN/DailyMail results are reported: Google's ``rouge-score`` with Porter stemming, and ROUGE-Lsum over the
newline-separated sentences of each summary (the highlights already hold one sentence per line, so no sentence
splitter model is needed and nothing is downloaded).

Each process scores its own examples; the per-key sums of F-measures and the example count are summed over processes
by torchmetrics, so the result is the mean F-measure over all examples whatever the layout.
"""

from __future__ import annotations

import torch
from rouge_score.rouge_scorer import RougeScorer
from torchmetrics import Metric

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class StemmedRouge(Metric):
    """Mean ROUGE-1/2/L/Lsum F-measure (stemmed) of generated summaries against references."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self._scorer = RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
        self.add_state("fmeasure_sum", default=torch.zeros(len(ROUGE_KEYS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("examples", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str]) -> None:
        for prediction, reference in zip(predictions, references, strict=True):
            scores = self._scorer.score(reference, prediction)
            self.fmeasure_sum += torch.tensor([scores[k].fmeasure for k in ROUGE_KEYS], dtype=torch.float64,
                                              device=self.fmeasure_sum.device)
            self.examples += 1

    def compute(self) -> dict[str, torch.Tensor]:
        means = self.fmeasure_sum / self.examples.clamp(min=1)
        return {key: means[i].float() for i, key in enumerate(ROUGE_KEYS)}
