"""CNN/DailyMail 3.0.0 as a LightningDataModule: load, tokenize once (cached), batch by the chosen mode."""

from __future__ import annotations

import datasets
import lightning as L
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from llama_ft.data.batching import (
    BATCHING_MODES,
    BatchingMode,
    Collator,
    LossOn,
    MicroBatchDataset,
    MicroBatchSampler,
)
from llama_ft.data.prompt import choose_pad_token_id, summary_budget_error, template_tokens, tokenize_examples
from llama_ft.data.sources import load_splits, load_tokenizer
from llama_ft.errors import ConfigError
from llama_ft.global_batch import grad_accumulation

_STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ("test",)}
# Bumped whenever tokenize_examples changes what it writes, so stale caches are never reused.
_TOKENIZATION_VERSION = "1"
_EARLY_CHECK_ROWS = 64


class CNNDailyMailDataModule(L.LightningDataModule):
    """Summarization data for causal-LM fine-tuning.

    Args:
        dataset: hub id (``abisee/cnn_dailymail``), a local directory laid out like the hub repository, or
            ``sample`` for the bundled synthetic sample.
        tokenizer: hub id or local tokenizer directory (``sample`` = the bundled one).
        max_length: tokens per example; the article is cut so template and summary always fit.
        global_batch_size: examples per optimizer step over all replicas; accumulation follows from it.
        micro_batch_size: rows per forward pass on one replica (the ``advanced`` strategy may choose it).
        batching: ``pad_to_max`` (tutorial), ``length_grouped`` (default) or ``packed``.
        loss_on: ``summary`` trains on the summary and EOS only; ``all`` on the whole sequence (tutorial).
        val_every_n_steps: optimizer steps between validations (converted to Lightning's ``val_check_interval``).
        max_examples_per_split: cap on rows per split, for quick runs.
        min_article_tokens: examples whose summary leaves less room than this for the article are dropped.
        num_proc: processes for tokenization (``Dataset.map``).
        cache_dir: where ``datasets`` keeps Arrow files and the tokenization cache (default: its own).
    """

    def __init__(
        self,
        dataset: str = "abisee/cnn_dailymail",
        tokenizer: str = "meta-llama/Meta-Llama-3-8B",
        max_length: int = 1024,
        global_batch_size: int = 256,
        micro_batch_size: int = 1,
        batching: BatchingMode = "length_grouped",
        loss_on: LossOn = "summary",
        val_every_n_steps: int | None = None,
        max_examples_per_split: int | None = None,
        min_article_tokens: int = 16,
        num_workers: int = 0,
        num_proc: int | None = None,
        cache_dir: str | None = None,
        seed: int = 42,
    ) -> None:
        super().__init__()
        if batching not in BATCHING_MODES:
            raise ConfigError(f"data.batching={batching!r} is not one of {list(BATCHING_MODES)}.")
        if loss_on not in ("summary", "all"):
            raise ConfigError(f"data.loss_on={loss_on!r} must be 'summary' or 'all'.")
        if max_length < 8:
            raise ConfigError(f"data.max_length={max_length} is too small to hold a prompt; use e.g. 1024.")
        if micro_batch_size < 1 or global_batch_size < 1:
            raise ConfigError("data.micro_batch_size and data.global_batch_size must be positive.")
        self.save_hyperparameters()
        self.dataset = dataset
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.batching = batching
        self.loss_on = loss_on
        self.val_every_n_steps = val_every_n_steps
        self.max_examples_per_split = max_examples_per_split
        self.min_article_tokens = min_article_tokens
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.cache_dir = cache_dir
        self.seed = seed
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.splits: dict[str, datasets.Dataset] = {}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
            self._check_model_accepts(self._tokenizer)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        return choose_pad_token_id(self.tokenizer)

    def _check_model_accepts(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Let the attached model refuse the tokenizer (e.g. too large a vocabulary) before any tokenizing."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        check = getattr(module, "validate_tokenizer", None)
        if check is not None:
            check(tokenizer)

    # ----------------------------------------------------------------------------------------------- loading
    def prepare_data(self) -> None:
        """Tokenize every split once on the first process of each node; the others then read the cache."""
        for split in ("train", "validation", "test"):
            self._tokenized(split, announce=False)

    def setup(self, stage: str) -> None:
        for split in _STAGE_SPLITS[stage]:
            self.splits[split] = self._tokenized(split, announce=True)
        if stage == "fit" and self.trainer is not None:
            self._apply_global_batch()

    def _tokenized(self, split: str, announce: bool) -> datasets.Dataset:
        raw = load_splits(self.dataset, (split,), self.cache_dir)[split]
        if self.max_examples_per_split is not None:
            raw = raw.select(range(min(self.max_examples_per_split, len(raw))))
        self._check_budget(raw, split)
        fingerprint = Hasher.hash(
            (raw._fingerprint, self._tokenizer_identity(), self.max_length, self.min_article_tokens,
             _TOKENIZATION_VERSION)
        )
        tokenized = raw.map(
            tokenize_examples,
            batched=True,
            batch_size=1000,
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "max_length": self.max_length,
                "min_article_tokens": self.min_article_tokens,
            },
            remove_columns=["article"],
            new_fingerprint=fingerprint,
            num_proc=self.num_proc,
            desc=f"Tokenizing {split}",
        )
        kept = tokenized.filter(
            lambda lengths: [n > 0 for n in lengths],
            input_columns="length",
            batched=True,
            new_fingerprint=Hasher.hash((fingerprint, "nonempty")),
            desc=f"Dropping {split} examples whose summary does not fit",
        )
        dropped = len(tokenized) - len(kept)
        if announce and dropped:
            rank_zero_warn(
                f"{dropped} of {len(tokenized)} {split} examples dropped: their summary leaves fewer than "
                f"{self.min_article_tokens} tokens of article within max_length={self.max_length}."
            )
        if len(kept) == 0:
            raise summary_budget_error(int(max(tokenized["length"], default=0)), self.max_length, split)
        return kept

    def _tokenizer_identity(self) -> str:
        """A stable hash of the tokenizer's behaviour (its full definition), for the cache fingerprint."""
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        return Hasher.hash(backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items())))

    def _check_budget(self, raw: datasets.Dataset, split: str) -> None:
        """Fail before tokenizing the split when max_length cannot hold template + summary of its first rows."""
        pieces = template_tokens(self.tokenizer)
        head = raw.select(range(min(_EARLY_CHECK_ROWS, len(raw))))
        summaries = self.tokenizer([h.strip() for h in head["highlights"]], add_special_tokens=False)["input_ids"]
        for example_id, summary in zip(head["id"], summaries, strict=True):
            needed = pieces.overhead + len(summary) + self.min_article_tokens
            if needed > self.max_length:
                raise summary_budget_error(needed, self.max_length, example_id)

    def _apply_global_batch(self) -> None:
        """Hold the recipe's global batch fixed: accumulation = global / (micro-batch × data-parallel size)."""
        trainer = self.trainer
        accumulation = grad_accumulation(self.global_batch_size, self.micro_batch_size, self._replicas()[0])
        trainer.accumulate_grad_batches = accumulation
        if self.val_every_n_steps is not None and not trainer.fast_dev_run:
            trainer.val_check_interval = self.val_every_n_steps * accumulation
        rank_zero_info(
            f"global batch {self.global_batch_size} = micro-batch {self.micro_batch_size} × "
            f"{self._replicas()[0]} data-parallel replica(s) × {accumulation} accumulation step(s)"
        )

    def _replicas(self) -> tuple[int, int]:
        """(number of data-parallel replicas, this process's replica index), as the strategy defines them."""
        if self.trainer is None:
            return 1, 0
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))

    def _resume_position(self, epoch_length: int) -> tuple[int, int]:
        """(epoch, micro-batches of it this replica already trained on) when ``fit`` resumes from a checkpoint.

        Lightning restores its loop progress before it asks for the train loader, and iterates the loader it gets
        without asking again when it continues an epoch (or starts the next one right after a checkpoint taken at the
        end of an epoch). Starting the sampler where that progress says makes a resumed run see exactly the data an
        uninterrupted one would (same epoch, same order), so it ends with the same weights. A fresh run: (0, 0).
        """
        trainer = self.trainer
        loop = getattr(trainer, "fit_loop", None) if trainer is not None else None
        if loop is None or not loop.restarting:
            return 0, 0
        epochs = loop.epoch_progress.current
        consumed = loop.epoch_loop.batch_progress.current.ready
        limit = trainer.limit_train_batches  # as Lightning counts an epoch's batches
        batches = min(epoch_length, limit) if isinstance(limit, int) else int(epoch_length * (limit or 1.0))
        if consumed < batches:
            return epochs.processed, consumed
        # Saved after the epoch's last batch: the next epoch, from its start. ``processed`` already counts the
        # finished epoch when the checkpoint was taken in the epoch-end hooks, not when it was taken before them.
        return (epochs.processed if epochs.processed > epochs.completed else epochs.processed + 1), 0

    # ------------------------------------------------------------------------------------------- dataloaders
    def _loader(self, split: str, *, train: bool, generation: bool = False) -> DataLoader:
        data = self.splits.get(split)
        if data is None:
            data = self.splits[split] = self._tokenized(split, announce=True)
        num_replicas, rank = self._replicas()
        sampler = MicroBatchSampler(
            data["length"],
            mode=self.batching,
            micro_batch_size=self.micro_batch_size,
            max_length=self.max_length,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=train,
            seed=self.seed,
            even_batches=train,
        )
        if train:
            sampler.resume_at(*self._resume_position(len(sampler)))
        collate = Collator(
            pad_token_id=self.pad_token_id,
            mode=self.batching,
            max_length=self.max_length,
            loss_on=self.loss_on,
            with_generation_inputs=generation,
        )
        return DataLoader(
            MicroBatchDataset(data),
            sampler=sampler,
            batch_size=None,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False, generation=True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False, generation=True)
