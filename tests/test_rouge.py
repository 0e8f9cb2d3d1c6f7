"""ROUGE as CNN/DailyMail papers report it: stemmed ROUGE-1/2/L and ROUGE-Lsum over newline-separated sentences."""

from __future__ import annotations

import socket

import pytest

from llama_ft.rouge import StemmedRouge

# Worked by hand. Tokens are lower-cased words, Porter-stemmed when longer than three letters:
#   prediction  [dog bark | the cat are run]      reference  [the cat run | dog bark loudli]
# ROUGE-1: 5 shared unigrams of 6 and 6 -> 5/6 (unstemmed only "the" and "dogs" match).
# ROUGE-2: bigrams shared: dog-bark, the-cat -> 2 of 5 and 5 -> 2/5.
# ROUGE-L: the longest common subsequence over the whole text is "the cat run" -> 3/6.
# ROUGE-Lsum: per reference sentence, the union of its LCS with each predicted sentence: "the cat run" + "dog bark"
#   -> 5 of 6 and 6 -> 5/6 (sentence order no longer matters).
PREDICTION = "Dogs bark.\nThe cats are running."
REFERENCE = "The cat runs.\nDogs barked loudly."
BY_HAND = {"rouge1": 5 / 6, "rouge2": 2 / 5, "rougeL": 3 / 6, "rougeLsum": 5 / 6}


def test_scores_match_values_worked_by_hand():
    metric = StemmedRouge()
    metric.update([PREDICTION], [REFERENCE])
    scores = metric.compute()
    assert {k: round(float(v), 6) for k, v in scores.items()} == {k: round(v, 6) for k, v in BY_HAND.items()}


def test_the_result_is_the_mean_over_examples_across_updates():
    metric = StemmedRouge()
    metric.update([PREDICTION], [REFERENCE])
    metric.update(["Same words here.\nAnd here."], ["Same words here.\nAnd here."])
    scores = metric.compute()
    for key, value in BY_HAND.items():
        assert float(scores[key]) == pytest.approx((value + 1.0) / 2, abs=1e-6)


def test_scoring_needs_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    metric = StemmedRouge()
    metric.update([PREDICTION], [REFERENCE])
    assert float(metric.compute()["rougeLsum"]) == pytest.approx(5 / 6)
