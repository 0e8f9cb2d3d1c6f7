"""Batching modes: what goes together, what the model sees, and that packing changes no example's loss."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from llama_ft.data.batching import IGNORE_INDEX, Collator, MicroBatchSampler, pack_rows, padded_width
from tests.helpers import tiny_llama_config


def _examples(n: int, seed: int = 0, max_len: int = 60) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(8, max_len)
        prompt = rng.randint(2, length - 2)
        out.append({"input_ids": [rng.randint(20, 4000) for _ in range(length)], "prompt_length": prompt,
                    "id": str(i), "highlights": "h"})
    return out


def test_pack_rows_keeps_every_example_once_and_respects_max_length():
    lengths = [random.Random(1).randint(1, 100) for _ in range(500)]
    rows = pack_rows(lengths, 128)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert sum(lengths) / (len(rows) * 128) > 0.97


@pytest.mark.parametrize("mode", ["pad_to_max", "length_grouped", "packed"])
def test_replicas_split_one_global_order(mode):
    lengths = [random.Random(2).randint(5, 100) for _ in range(203)]
    kwargs = dict(mode=mode, micro_batch_size=4, max_length=128, shuffle=True, seed=3)
    single = MicroBatchSampler(lengths, **kwargs)
    replicas = [MicroBatchSampler(lengths, num_replicas=2, rank=r, **kwargs) for r in range(2)]
    global_order = [spec.rows for spec in single]
    per_rank = [[spec.rows for spec in s] for s in replicas]
    assert len(per_rank[0]) == len(per_rank[1]) == len(global_order) // 2
    interleaved = [b for pair in zip(*per_rank, strict=True) for b in pair]
    assert interleaved == global_order[: len(interleaved)]


def test_shuffle_changes_with_epoch_and_is_reproducible():
    lengths = list(range(1, 101))
    a = MicroBatchSampler(lengths, mode="length_grouped", micro_batch_size=4, max_length=128, seed=1)
    b = MicroBatchSampler(lengths, mode="length_grouped", micro_batch_size=4, max_length=128, seed=1)
    first = [s.rows for s in a]
    assert first == [s.rows for s in b]
    a.set_epoch(1)
    assert [s.rows for s in a] != first


def test_length_grouped_batches_have_similar_lengths():
    lengths = [random.Random(4).randint(10, 1000) for _ in range(2000)]
    sampler = MicroBatchSampler(lengths, mode="length_grouped", micro_batch_size=8, max_length=1024)
    real = sum(lengths[r[0]] for spec in sampler for r in spec.rows)
    computed = sum(len(spec.rows) * max(lengths[r[0]] for r in spec.rows) for spec in sampler)
    assert real / computed > 0.95


def test_packed_rows_are_grouped_by_length_and_padded_to_the_longest_row():
    # Most examples longer than half a row: packing alone leaves many rows part-empty, so rows are length-grouped
    # and a micro-batch is only as wide as its longest row (padding each row to max_length wasted ~13% here).
    lengths = [random.Random(6).randint(300, 1024) for _ in range(4000)]
    sampler = MicroBatchSampler(lengths, mode="packed", micro_batch_size=8, max_length=1024)
    real = computed = 0
    for spec in sampler:
        rows = [sum(lengths[i] for i in row) for row in spec.rows]
        real += sum(rows)
        computed += len(rows) * padded_width("packed", rows, 1024)
    assert real / computed > 0.99
    ex = _examples(3)
    batch = Collator(pad_token_id=5, mode="packed", max_length=128)(([[ex[0], ex[1]], [ex[2]]], False))
    longest = max(len(ex[0]["input_ids"]) + len(ex[1]["input_ids"]), len(ex[2]["input_ids"]))
    assert batch["input_ids"].shape[1] == longest


def test_evaluation_keeps_every_example_and_evens_out_replicas_with_fillers():
    lengths = [10] * 10
    samplers = [MicroBatchSampler(lengths, mode="pad_to_max", micro_batch_size=3, max_length=16, num_replicas=3,
                                  rank=r, shuffle=False, even_batches=False) for r in range(3)]
    specs = [list(s) for s in samplers]
    assert {len(s) for s in specs} == {2}
    real = sorted(i for s in specs for spec in s if not spec.filler for row in spec.rows for i in row)
    assert real == list(range(10))
    assert sum(spec.filler for s in specs for spec in s) == 2


def test_filler_batches_carry_no_targets():
    ex = _examples(2)
    batch = Collator(pad_token_id=5, mode="length_grouped", max_length=64)(([[ex[0]], [ex[1]]], True))
    assert torch.all(batch["labels"] == IGNORE_INDEX)


def test_pad_to_max_pads_every_row_to_max_length():
    ex = _examples(3)
    batch = Collator(pad_token_id=5, mode="pad_to_max", max_length=64)(([[e] for e in ex], False))
    assert batch["input_ids"].shape == (3, 64)
    assert batch["num_tokens"] == sum(len(e["input_ids"]) for e in ex)


def _per_example_losses(logits: torch.Tensor, labels: torch.Tensor, spans: list[tuple[int, int, int]]) -> list:
    """Mean next-token loss of each (row, start, end) span, computed HF's way (shift by one)."""
    out = []
    for row, start, end in spans:
        target = labels[row, start + 1 : end]
        keep = target != IGNORE_INDEX
        loss = F.cross_entropy(logits[row, start : end - 1][keep].float(), target[keep])
        out.append(loss.item())
    return out


@pytest.mark.parametrize("loss_on", ["summary", "all"])
def test_packed_batch_gives_each_example_its_unpacked_loss(loss_on):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    examples = _examples(6, seed=5, max_len=40)
    lengths = [len(e["input_ids"]) for e in examples]
    rows = pack_rows(lengths, 96)
    assert any(len(r) > 1 for r in rows)
    packed = Collator(pad_token_id=5, mode="packed", max_length=96, loss_on=loss_on)(
        ([[examples[i] for i in row] for row in rows], False)
    )
    assert "attention_mask" not in packed
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    spans, order = [], []
    for r, row in enumerate(rows):
        pos = 0
        for i in row:
            spans.append((r, pos, pos + lengths[i]))
            order.append(i)
            pos += lengths[i]
    packed_losses = _per_example_losses(logits, packed["labels"], spans)
    for i, packed_loss in zip(order, packed_losses, strict=True):
        alone = Collator(pad_token_id=5, mode="length_grouped", max_length=96, loss_on=loss_on)(
            ([[examples[i]]], False)
        )
        with torch.no_grad():
            single = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"], use_cache=False).logits
        (expected,) = _per_example_losses(single, alone["labels"], [(0, 0, lengths[i])])
        assert packed_loss == pytest.approx(expected, abs=1e-5)
