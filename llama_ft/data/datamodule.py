"""CNN/DailyMail 3.0.0 as a LightningDataModule: load, tokenize once (cached), batch by the chosen mode."""

from typing import Any

import datasets
import lightning as L
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from llama_ft.data.articles import check_articles_file, read_articles
from llama_ft.data.batching import (
    BATCHING_MODES,
    BatchingMode,
    Collator,
    LossOn,
    MicroBatchDataset,
    MicroBatchSampler,
)
from llama_ft.data.lengths import RowTokens, expected_row_tokens
from llama_ft.data.prompt import (
    DEFAULT_PROMPT,
    PromptFormat,
    choose_pad_token_id,
    summary_budget_error,
    template_tokens,
    tokenize_examples,
    tokenize_prompts,
)
from llama_ft.data.sources import load_splits, load_tokenizer
from llama_ft.errors import ConfigError, DataError
from llama_ft.global_batch import grad_accumulation
from llama_ft.ranges import NonNegativeInt, PositiveInt

_STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ("test",)}
# Bumped whenever tokenize_examples changes what it writes, so stale caches are never reused.
_TOKENIZATION_VERSION = "1"
_EARLY_CHECK_ROWS = 64
_USER_ARTICLES = "articles"  # the split name of ``predict_file``'s articles


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of a tokenizer's full definition (vocabulary, merges, normalizer, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return Hasher.hash(backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())))


class CNNDailyMailDataModule(L.LightningDataModule):
    """Summarization data for causal-LM fine-tuning; the global batch stays fixed whatever the parallel layout.

    Accumulation = global batch / (micro-batch × data-parallel replicas); a parallel plan supplies the last two
    through ``apply_plan`` (the ``PlannableData`` protocol of the ``advanced`` strategy), otherwise they are the
    recipe's micro-batch and the strategy's replica count. The training position is part of the checkpoint
    (``state_dict``), so a resumed run sees exactly the data an uninterrupted one would.

    Args:
        dataset: hub id (``abisee/cnn_dailymail``), a local directory laid out like the hub repository, or
            ``sample`` for the bundled synthetic sample.
        tokenizer: hub id or local tokenizer directory (``sample`` = the bundled one).
        max_length: tokens per example; the article is cut so template and summary always fit.
        global_batch_size: examples per optimizer step over all replicas; accumulation follows from it.
        micro_batch_size: rows per forward pass on one replica (the ``advanced`` strategy chooses its own and
            passes it to ``apply_plan``).
        batching: ``pad_to_max`` (tutorial), ``length_grouped`` (default) or ``packed``.
        loss_on: ``summary`` trains on the summary and EOS only; ``all`` on the whole sequence (tutorial).
        val_every_n_steps: optimizer steps between validations (converted to Lightning's ``val_check_interval``).
        max_examples_per_split: cap on rows per split, for quick runs.
        min_article_tokens: examples whose summary leaves less room than this for the article are dropped.
        num_proc: processes for tokenization (``Dataset.map``).
        cache_dir: where ``datasets`` keeps Arrow files and the tokenization cache (default: its own).
        predict_file: the user's own articles for ``predict`` instead of the test split: JSON lines (``article``,
            optional ``id``) or text, one article per line (``llama_ft.data.articles``). Other commands ignore it.
    """

    def __init__(
        self,
        dataset: str = "abisee/cnn_dailymail",
        tokenizer: str = "meta-llama/Meta-Llama-3-8B",
        max_length: PositiveInt = 1024,
        global_batch_size: PositiveInt = 256,
        micro_batch_size: PositiveInt = 1,
        batching: BatchingMode = "length_grouped",
        loss_on: LossOn = "summary",
        val_every_n_steps: PositiveInt | None = None,
        max_examples_per_split: PositiveInt | None = None,
        min_article_tokens: NonNegativeInt = 16,
        num_workers: NonNegativeInt = 0,
        num_proc: PositiveInt | None = None,
        cache_dir: str | None = None,
        seed: int = 42,
        predict_file: str | None = None,
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
        if max_examples_per_split is not None and max_examples_per_split < 1:
            raise ConfigError(f"data.max_examples_per_split={max_examples_per_split} must be at least 1 (or unset).")
        if predict_file is not None:
            check_articles_file(predict_file)
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
        self.predict_file = predict_file
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._pad_token_id: int | None = None  # each computed once per tokenizer: seconds with a 128k vocabulary
        self._tokenizer_hash: str | None = None
        self.splits: dict[str, datasets.Dataset] = {}
        self._plan: tuple[int, int] | None = None  # (micro-batch, data-parallel size) from apply_plan
        self._train_sampler: MicroBatchSampler | None = None
        self._trained = (0, 0)  # (epoch, micro-batches of it this replica trained on)
        self._resume_at: tuple[int, int] | None = None  # the same, restored from a checkpoint

    # ------------------------------------------------------------------------------------------ parallel plan
    def apply_plan(self, micro_batch_size: int, data_parallel_size: int) -> None:
        """Batch by a parallel plan's micro-batch over its data-parallel replicas; the global batch stays the recipe's.

        The ``advanced`` strategy calls this once it has planned, before ``setup``; a size that cannot divide the
        global batch is refused here.
        """
        grad_accumulation(self.global_batch_size, micro_batch_size, data_parallel_size)
        self._plan = (micro_batch_size, data_parallel_size)

    def row_tokens(self) -> RowTokens:
        """Real tokens per row after batching, which the ``advanced`` strategy plans step time and tokens/s with."""
        return expected_row_tokens(self.dataset, self.batching, self.max_length)

    def teardown(self, stage: str) -> None:
        self._plan = None  # a plan belongs to one Trainer run; the next one plans again (or runs the recipe's)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
            self._check_model_accepts(self._tokenizer)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        if self._pad_token_id is None:
            self._pad_token_id = choose_pad_token_id(self.tokenizer)
        return self._pad_token_id

    @property
    def prompt_format(self) -> PromptFormat:
        """The attached model's prompt (an exported directory stores the one it was trained with), else the default."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(module, "prompt_format", None) or DEFAULT_PROMPT

    def _predicting_file(self) -> bool:
        return self.predict_file is not None and self.trainer is not None and self.trainer.state.fn == "predict"

    def _check_model_accepts(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Let the attached model refuse the tokenizer (e.g. too large a vocabulary) before any tokenizing."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        check = getattr(module, "validate_tokenizer", None)
        if check is not None:
            check(tokenizer)

    # ----------------------------------------------------------------------------------------------- loading
    def prepare_data(self) -> None:
        """Tokenize every split once on the first process of each node; the others then read the cache.

        Predicting the user's own articles needs none of the data set (it may not even be on this machine).
        """
        for split in () if self._predicting_file() else ("train", "validation", "test"):
            self._tokenized(split, announce=False)

    def setup(self, stage: str) -> None:
        if stage == "predict" and self.predict_file is not None:
            self.splits[_USER_ARTICLES] = self._tokenized_articles()
            return
        for split in _STAGE_SPLITS[stage]:
            self.splits[split] = self._tokenized(split, announce=True)
        if stage == "fit" and self.trainer is not None:
            self._hold_global_batch()

    def _tokenized(self, split: str, announce: bool) -> datasets.Dataset:
        raw = self._complete_rows(load_splits(self.dataset, (split,), self.cache_dir)[split], split, announce)
        if self.max_examples_per_split is not None:
            raw = raw.select(range(min(self.max_examples_per_split, len(raw))))
        self._check_budget(raw, split)
        fingerprint = Hasher.hash(
            (raw._fingerprint, self._tokenizer_identity(), self.max_length, self.min_article_tokens,
             _TOKENIZATION_VERSION, self.prompt_format)
        )
        tokenized = raw.map(
            tokenize_examples,
            batched=True,
            batch_size=1000,
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "max_length": self.max_length,
                "min_article_tokens": self.min_article_tokens,
                "prompt": self.prompt_format,
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

    def _complete_rows(self, raw: datasets.Dataset, split: str, announce: bool) -> datasets.Dataset:
        """Drop rows whose article or summary is missing or blank: nothing to learn from, nothing to score against."""
        kept = raw.filter(
            lambda articles, summaries: [bool(a and a.strip()) and bool(h and h.strip())
                                         for a, h in zip(articles, summaries, strict=True)],
            input_columns=["article", "highlights"],
            batched=True,
            new_fingerprint=Hasher.hash((raw._fingerprint, "complete rows")),
            desc=f"Dropping {split} rows without article or highlights",
        )
        if len(kept) == 0:
            raise DataError(f"every {split} row of {self.dataset!r} lacks an article or highlights (missing or blank); "
                            "the split needs at least one complete row.")
        if announce and len(kept) < len(raw):
            rank_zero_warn(f"{len(raw) - len(kept)} of {len(raw)} {split} rows of {self.dataset!r} dropped: their "
                           "article or highlights is missing or blank.")
        return kept
    def _tokenized_articles(self) -> datasets.Dataset:
        """The user's articles as prompts (small: tokenized in memory, never cached)."""
        rows = read_articles(self.predict_file)
        batch = {"article": [r["article"] for r in rows]}
        prompts = tokenize_prompts(batch, self.tokenizer, self.max_length, self.prompt_format)
        rank_zero_info(f"Summarizing {len(rows)} article(s) from {self.predict_file}")
        return datasets.Dataset.from_dict({"id": [r["id"] for r in rows], **prompts})

    def _tokenizer_identity(self) -> str:
        """A stable hash of the tokenizer's behaviour (its full definition), for the cache fingerprint; once per run."""
        if self._tokenizer_hash is None:
            self._tokenizer_hash = tokenizer_fingerprint(self.tokenizer)
        return self._tokenizer_hash

    def _check_budget(self, raw: datasets.Dataset, split: str) -> None:
        """Fail before tokenizing the split when max_length cannot hold template + summary of its first rows."""
        pieces = template_tokens(self.tokenizer, self.prompt_format)
        head = raw.select(range(min(_EARLY_CHECK_ROWS, len(raw))))
        summaries = self.tokenizer([h.strip() for h in head["highlights"]], add_special_tokens=False)["input_ids"]
        for example_id, summary in zip(head["id"], summaries, strict=True):
            needed = pieces.overhead + len(summary) + self.min_article_tokens
            if needed > self.max_length:
                raise summary_budget_error(needed, self.max_length, example_id)

    def _hold_global_batch(self) -> None:
        """Set the Trainer's accumulation so each optimizer step sees the recipe's global batch.

        Lightning takes accumulation (and the validation interval, counted in batches) as Trainer settings and has no
        hook through which a data module supplies them; they are set here, before the fit loop reads them, as
        Lightning's own ``GradientAccumulationScheduler`` sets ``accumulate_grad_batches``.
        """
        trainer = self.trainer
        examples = len(self.splits["train"])
        if self.global_batch_size > examples:  # Lightning would step at each epoch's end on fewer, silently
            raise ConfigError(
                f"data.global_batch_size={self.global_batch_size} is larger than the {examples} training examples of "
                f"{self.dataset!r}: no optimizer step could see a whole global batch. Use at most {examples}, or more "
                "data (data.max_examples_per_split, if set, limits it)."
            )
        micro_batch_size, replicas, _ = self._layout()
        accumulation = grad_accumulation(self.global_batch_size, micro_batch_size, replicas)
        trainer.accumulate_grad_batches = accumulation
        if self.val_every_n_steps is not None and not trainer.fast_dev_run:
            trainer.val_check_interval = self.val_every_n_steps * accumulation
        rank_zero_info(
            f"global batch {self.global_batch_size} = micro-batch {micro_batch_size} × "
            f"{replicas} data-parallel replica(s) × {accumulation} accumulation step(s)"
        )

    def _layout(self) -> tuple[int, int, int]:
        """(micro-batch, data-parallel replicas, this process's replica index).

        The replicas are the strategy's ``distributed_sampler_kwargs`` (what every Lightning strategy exposes for its
        sampler); a plan given to ``apply_plan`` must agree with them.
        """
        kwargs = (getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}) if self.trainer else {}
        replicas, rank = int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))
        if self._plan is None:
            return self.micro_batch_size, replicas, rank
        micro_batch_size, planned_replicas = self._plan
        if planned_replicas != replicas:
            raise ConfigError(
                f"the plan's data-parallel size {planned_replicas} differs from the {replicas} replica(s) the "
                f"strategy splits the data over; a strategy must pass apply_plan its sampler's num_replicas."
            )
        return micro_batch_size, replicas, rank

    # ---------------------------------------------------------------------------------------- resume position
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the micro-batches training consumed: the position a checkpoint taken now resumes from.

        Lightning calls this once per batch it trains on, after its prefetch. While a data module defines it, the
        LightningModule's hook of the same name is not called (Lightning warns when both do).
        """
        if self.trainer is not None and self.trainer.training and self._train_sampler is not None:
            epoch, done = self._trained
            self._trained = (epoch, done + 1) if epoch == self._train_sampler.epoch else (self._train_sampler.epoch, 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the data: (epoch, micro-batches of it each replica trained on).

        An epoch whose last batch was trained is saved as the start of the next one. The sampler builds an epoch's
        order when the loader is iterated, which Lightning does before it sets the resumed epoch, so the epoch must be
        the one the resumed run continues in.
        """
        if self._train_sampler is None:
            return {}
        epoch, done = self._trained
        if done >= self.trainer.num_training_batches:
            epoch, done = epoch + 1, 0
        sampler = self._train_sampler
        return {"epoch": epoch, "micro_batches_done": done, "micro_batch_size": sampler.micro_batch_size,
                "data_parallel_size": sampler.num_replicas}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training loader where the checkpoint's run stood (see ``state_dict``)."""
        if not state_dict:
            return
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["micro_batches_done"]))
        saved = (state_dict.get("micro_batch_size"), state_dict.get("data_parallel_size"))
        if saved != self._layout()[:2]:
            rank_zero_warn(
                f"resuming with micro-batch × replicas {self._layout()[:2]} where the checkpoint had {saved}: the "
                "resumed epoch's order is not the interrupted run's."
            )

    # ------------------------------------------------------------------------------------------- dataloaders
    def _loader(self, split: str, *, train: bool, generation: bool = False) -> DataLoader:
        data = self.splits.get(split)
        if data is None:
            data = self.splits[split] = self._tokenized(split, announce=True)
        micro_batch_size, num_replicas, rank = self._layout()
        sampler = MicroBatchSampler(
            data["length"],
            mode=self.batching,
            micro_batch_size=micro_batch_size,
            max_length=self.max_length,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=train,
            seed=self.seed,
            even_batches=train,
        )
        if train:
            if self._resume_at is not None:
                sampler.resume_at(*self._resume_at)
            self._trained, self._resume_at = (sampler.epoch, sampler.start_batch), None
            self._train_sampler = sampler
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
        split = _USER_ARTICLES if self.predict_file is not None else "test"
        return self._loader(split, train=False, generation=True)
