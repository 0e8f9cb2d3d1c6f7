"""Micro-batches: which examples go together (sampler) and how they become tensors (collate).

Three modes. ``pad_to_max`` pads every row to ``max_length`` (the tutorial's way). ``length_grouped`` batches
examples of similar length and pads to the longest. ``packed`` puts several examples in one row; position ids
restart per example, which makes Hugging Face Llama build a block-diagonal causal mask, so no example attends
to another. Packed rows are then grouped by length like examples in ``length_grouped`` and padded to the longest
row of their micro-batch: at CNN/DailyMail lengths most examples exceed half of ``max_length``, so many rows hold
one example that no other fits beside, and padding those rows to ``max_length`` would waste ~7% of the compute.

The sampler yields whole micro-batches (a tuple of rows, each a tuple of example indices). The order of
micro-batches is the same whatever the number of data-parallel replicas; replica ``r`` takes every ``R``-th one.
So a run on R replicas with accumulation A/R sees exactly the data of one process with accumulation A.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, DistributedSampler

BatchingMode = Literal["pad_to_max", "length_grouped", "packed"]
BATCHING_MODES: tuple[BatchingMode, ...] = ("pad_to_max", "length_grouped", "packed")
LossOn = Literal["summary", "all"]
IGNORE_INDEX = -100
# length_grouped and packed sort rows by length within windows of this many micro-batches, then shuffle the
# micro-batches, so consecutive steps still mix lengths. Padding waste falls about as 1/window: 512 keeps it under
# 0.1% (packed) and 0.2% (length_grouped) on CNN/DailyMail lengths (benchmarks/token_efficiency.py); 64 left 0.3%
# and 0.7%.
GROUPING_WINDOW = 512


@dataclass(frozen=True)
class MicroBatchSpec:
    """One micro-batch: rows of example indices. ``filler`` marks a repeat that only keeps replicas in step."""

    rows: tuple[tuple[int, ...], ...]
    filler: bool = False


def padded_width(mode: BatchingMode, row_lengths: Sequence[int], max_length: int) -> int:
    """Width of a micro-batch's tensors: ``max_length`` for ``pad_to_max``, else the longest row's tokens."""
    return max_length if mode == "pad_to_max" else max(row_lengths)


def pack_rows(lengths: Sequence[int], max_length: int) -> list[tuple[int, ...]]:
    """Best-fit-decreasing bin packing of examples into rows of at most ``max_length`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row id), sorted
    for i in order:
        need = lengths[i]
        pos = bisect.bisect_left(free, (need, -1))
        if pos == len(free):
            rows.append([i])
            row_id, left = len(rows) - 1, max_length - need
        else:
            left, row_id = free.pop(pos)
            rows[row_id].append(i)
            left -= need
        if left > 0:
            bisect.insort(free, (left, row_id))
    return [tuple(r) for r in rows]


class MicroBatchSampler(DistributedSampler):
    """Yields this replica's micro-batches as ``MicroBatchSpec``.

    Subclassing ``DistributedSampler`` tells Lightning the data are already split across replicas, so it does
    not inject its own shuffling sampler. ``start_batch`` skips micro-batches of the current epoch that a resumed
    run already trained on (see ``resume_at``).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        mode: BatchingMode,
        micro_batch_size: int,
        max_length: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        even_batches: bool = True,
    ) -> None:
        # Deliberately not calling DistributedSampler.__init__: it needs an initialized process group.
        self.lengths = list(lengths)
        self.mode = mode
        self.micro_batch_size = micro_batch_size
        self.max_length = max_length
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.even_batches = even_batches
        self.epoch = 0
        self.start_batch = 0
        self._rows = pack_rows(self.lengths, max_length) if mode == "packed" else [(i,) for i in range(len(lengths))]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_batch = 0  # a resume offset belongs to the epoch it was set for
        self.epoch = epoch

    def resume_at(self, epoch: int, start_batch: int) -> None:
        """Continue ``epoch`` after this replica's first ``start_batch`` micro-batches (a mid-epoch resume).

        The epoch's order does not depend on where it is resumed, so the rest is exactly what an uninterrupted run
        would have seen. ``len()`` stays the whole epoch's length, as Lightning's restored progress counts it.
        """
        self.epoch = epoch
        self.start_batch = max(0, start_batch)

    def global_batches(self) -> list[tuple[tuple[int, ...], ...]]:
        """All micro-batches of this epoch, over all replicas, in the order they are consumed."""
        rows = list(self._rows)
        rng = random.Random(self.seed + self.epoch)
        if self.shuffle:
            rng.shuffle(rows)
        b = self.micro_batch_size
        if self.mode in ("length_grouped", "packed"):
            window = b * GROUPING_WINDOW
            grouped = []
            for start in range(0, len(rows), window):
                chunk = sorted(rows[start : start + window], key=lambda r: -self._row_length(r))
                grouped.extend(chunk)
            rows = grouped
        batches = [tuple(rows[i : i + b]) for i in range(0, len(rows), b)]
        if self.mode in ("length_grouped", "packed") and self.shuffle:
            rng.shuffle(batches)
        return batches

    def _row_length(self, row: tuple[int, ...]) -> int:
        return sum(self.lengths[i] for i in row)

    def _replica_batches(self) -> list[MicroBatchSpec]:
        batches = self.global_batches()
        per_replica, rest = divmod(len(batches), self.num_replicas)
        if self.even_batches:
            # Training drops the ragged tail so every replica takes the same number of steps.
            batches = batches[: per_replica * self.num_replicas]
            specs = [MicroBatchSpec(rows) for rows in batches[self.rank :: self.num_replicas]]
        else:
            # Evaluation keeps every example; short replicas repeat a batch as filler so sharded
            # models still run the same number of collective forwards.
            specs = [MicroBatchSpec(rows) for rows in batches[self.rank :: self.num_replicas]]
            if rest and self.rank >= rest and batches:
                specs.append(MicroBatchSpec(batches[0], filler=True))
        return specs

    def __iter__(self) -> Iterator[MicroBatchSpec]:  # type: ignore[override]
        return iter(self._replica_batches()[self.start_batch :])

    def __len__(self) -> int:
        return len(self._replica_batches())


class MicroBatchDataset(Dataset):
    """Fetches a whole ``MicroBatchSpec`` at once from a tokenized Hugging Face dataset (one Arrow read)."""

    def __init__(self, tokenized: Any) -> None:
        self.tokenized = tokenized

    def __len__(self) -> int:
        return len(self.tokenized)

    def __getitem__(self, spec: MicroBatchSpec) -> tuple[list[list[dict[str, Any]]], bool]:
        flat = [i for row in spec.rows for i in row]
        columns = self.tokenized[flat]
        examples = [{key: columns[key][j] for key in columns} for j in range(len(flat))]
        grouped, pos = [], 0
        for row in spec.rows:
            grouped.append(examples[pos : pos + len(row)])
            pos += len(row)
        return grouped, spec.filler


@dataclass
class Collator:
    """Builds model inputs from a fetched micro-batch.

    Labels are ``IGNORE_INDEX`` on padding always, on the prompt when ``loss_on == "summary"``, and on the first
    token of each packed example (it would otherwise be predicted from the previous example's end).
    """

    pad_token_id: int
    mode: BatchingMode
    max_length: int
    loss_on: LossOn = "summary"
    with_generation_inputs: bool = False

    def __call__(self, fetched: tuple[list[list[dict[str, Any]]], bool]) -> dict[str, Any]:
        rows, filler = fetched
        width = padded_width(self.mode, [sum(len(ex["input_ids"]) for ex in row) for row in rows], self.max_length)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        for r, row in enumerate(rows):
            pos = 0
            for ex in row:
                ids = torch.tensor(ex["input_ids"], dtype=torch.long)
                end = pos + len(ids)
                input_ids[r, pos:end] = ids
                attention_mask[r, pos:end] = 1
                position_ids[r, pos:end] = torch.arange(len(ids))
                first_target = ex["prompt_length"] if self.loss_on == "summary" else 1
                labels[r, pos + first_target : end] = ids[first_target:]
                pos = end
            # Padding continues as its own "sequence" so it never joins the last example's attention block.
            position_ids[r, pos:] = torch.arange(width - pos)
        if filler:
            labels.fill_(IGNORE_INDEX)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            # Tokens that are real work (not padding): what throughput counts.
            "num_tokens": int(attention_mask.sum()),
        }
        if self.mode == "packed":
            batch["position_ids"] = position_ids  # no attention mask: the model derives blocks from positions
        else:
            batch["attention_mask"] = attention_mask
        if self.with_generation_inputs:
            batch.update(self._generation_inputs(rows, filler))
        return batch

    def _generation_inputs(self, rows: list[list[dict[str, Any]]], filler: bool) -> dict[str, Any]:
        """Left-padded prompts for ``generate`` plus ids and reference summaries."""
        examples = [ex for row in rows for ex in row]
        prompts = [ex["input_ids"][: ex["prompt_length"]] for ex in examples]
        width = max(len(p) for p in prompts)
        prompt_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            prompt_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            prompt_mask[i, width - len(p) :] = 1
        return {
            "prompt_ids": prompt_ids,
            "prompt_attention_mask": prompt_mask,
            "ids": [ex["id"] for ex in examples],
            # A user's own articles (predict_file) come without reference summaries.
            "references": [ex["highlights"].strip() if "highlights" in ex else None for ex in examples],
            "filler": filler,
        }
