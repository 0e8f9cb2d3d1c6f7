"""LlamaFineTuner: the LightningModule around ``transformers.LlamaForCausalLM``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity, ROUGEScore
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from llama_ft.callbacks.watchdog import expect_silence
from llama_ft.checkpoint.huggingface import load_sharded_weights, save_hf_directory
from llama_ft.errors import ConfigError
from llama_ft.presets import resolve_llama_config

LrSchedule = Literal["constant", "cosine"]
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def _on_meta_device() -> bool:
    return torch.get_default_device().type == "meta"


def _resolve_local_checkpoint(name_or_path: str) -> Path:
    """A local directory as is; a hub id through the Hub cache (downloads when online)."""
    if Path(name_or_path).expanduser().is_dir():
        return Path(name_or_path).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:
        raise ConfigError(
            f"cannot fetch checkpoint {name_or_path!r} ({type(err).__name__}). Download it on a machine with Hub "
            "access and set model.model_name_or_path to the local directory."
        ) from err


class LlamaFineTuner(L.LightningModule):
    """Causal-LM fine-tuning of a Llama checkpoint or a random-init Llama config.

    It is what the ``advanced`` strategy plans for (``PlannableModule``): ``llama_config`` is the architecture,
    ``configure_model`` builds ``self.model`` (on the meta device under that strategy), ``initialize_weights`` fills it
    once it is parallelized. Lightning's own strategies use it as any LightningModule.

    Args:
        model_config: architecture — a preset name (``llama_ft/presets/models/<name>.json``) or a LlamaConfig JSON path.
            Alone, the model starts from random weights.
        model_name_or_path: hub id or local directory of a checkpoint to fine-tune (``from_pretrained``). When both
            are given, the checkpoint's architecture must match ``model_config``.
        learning_rate: peak learning rate of AdamW.
        lr_schedule: ``constant`` (the tutorial) or ``cosine`` (linear warmup then cosine decay).
        warmup_steps: optimizer steps of linear warmup for ``cosine``.
        min_lr_ratio: final learning rate of ``cosine`` as a fraction of the peak.
        max_new_tokens: bound on generated summary length in test/predict.
        attn_implementation: Hugging Face attention kernel (``sdpa``, ``eager``, ``flash_attention_2``).
        hf_export_dir: where ``fit`` writes the Hugging Face directory; default ``<log dir>/hf_model``.
    """

    def __init__(
        self,
        model_config: str | None = None,
        model_name_or_path: str | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_schedule: LrSchedule = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        max_new_tokens: int = 128,
        attn_implementation: str = "sdpa",
        hf_export_dir: str | None = None,
    ) -> None:
        super().__init__()
        if model_config is None and model_name_or_path is None:
            raise ConfigError("set model.model_config (a preset or JSON) and/or model.model_name_or_path (weights).")
        if lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"model.lr_schedule={lr_schedule!r} must be 'constant' or 'cosine'.")
        self.save_hyperparameters()
        self.llama_config = resolve_llama_config(model_config, model_name_or_path)
        self.llama_config._attn_implementation = attn_implementation
        self.model: LlamaForCausalLM | None = None
        self.val_loss = MeanMetric()
        self.val_perplexity = Perplexity(ignore_index=-100)
        self.test_loss = MeanMetric()
        self.rouge = ROUGEScore(rouge_keys=ROUGE_KEYS)
        self.flops_per_batch = 0.0

    # ------------------------------------------------------------------------------------------ model build
    def validate_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Refuse a tokenizer whose ids the embedding table cannot hold (called before any tokenizing)."""
        if len(tokenizer) > self.llama_config.vocab_size:
            raise ConfigError(
                f"tokenizer {tokenizer.name_or_path!r} has {len(tokenizer)} tokens but the model's embedding has "
                f"{self.llama_config.vocab_size} rows; use the tokenizer that belongs to the model, or a model "
                f"config with vocab_size >= {len(tokenizer)}."
            )

    def configure_model(self) -> None:
        """Build the model here so a sharding strategy can create it on the meta device first."""
        if self.model is not None:
            return
        if _on_meta_device():
            self.model = LlamaForCausalLM(self.llama_config)  # shapes only; initialize_weights fills it later
        elif self.hparams.model_name_or_path is not None:
            self.model = LlamaForCausalLM.from_pretrained(
                _resolve_local_checkpoint(self.hparams.model_name_or_path),
                config=self.llama_config,
                dtype=torch.get_default_dtype(),
            ).train()
        else:
            self.model = LlamaForCausalLM(self.llama_config)
        self.model.config.use_cache = False

    def initialize_weights(self) -> None:
        """Fill a model that was built on the meta device and then materialized (and maybe sharded).

        Called by the ``advanced`` strategy after it applied its layout and materialized the model (which also
        recomputed the rotary tables); a checkpoint is loaded (each rank reads only its shards), else the Hugging Face
        initialization runs.
        """
        assert self.model is not None
        if self.hparams.model_name_or_path is not None:
            directory = _resolve_local_checkpoint(self.hparams.model_name_or_path)
            with expect_silence(f"loading {directory}"):
                load_sharded_weights(self.model, directory)
        else:
            for module in self.model.modules():
                module.__dict__.pop("_is_hf_initialized", None)
                for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                    tensor.__dict__.pop("_is_hf_initialized", None)
            self.model.initialize_weights()
        self.model.tie_weights()

    # ------------------------------------------------------------------------------------------------ steps
    def _forward(self, batch: dict[str, Any]) -> Any:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
        return self.model(**inputs, use_cache=False)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self._forward(batch)
        self.flops_per_batch = self.training_flops(batch["num_tokens"], batch["input_ids"].shape[1])
        self.log("train_loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return out.loss

    def training_flops(self, tokens: int, seq_len: int) -> float:
        """Forward + backward FLOPs of ``tokens`` real tokens in rows of ``seq_len`` (PaLM: 6·N + 12·L·H·s), for MFU."""
        c = self.llama_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        non_embedding = self._parameter_count() - c.vocab_size * c.hidden_size
        attention = 12.0 * c.num_hidden_layers * c.num_attention_heads * head_dim * seq_len
        return (6.0 * non_embedding + attention) * tokens

    def _parameter_count(self) -> int:
        """Unsharded parameter count (sharded DTensors report their global shape)."""
        if not hasattr(self, "_n_params"):
            self._n_params = sum(p.numel() for p in self.model.parameters())
        return self._n_params

    def _update_loss(self, metric: MeanMetric, batch: dict[str, Any]) -> Any:
        out = self._forward(batch)
        targets = int((batch["labels"][:, 1:] != -100).sum())
        if targets:  # filler batches only keep sharded replicas in step
            metric.update(out.loss.detach().float(), weight=targets)
        return out, targets

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out, targets = self._update_loss(self.val_loss, batch)
        if targets:
            self.val_perplexity.update(out.logits[:, :-1].float(), batch["labels"][:, 1:])
        self.log("val_loss", self.val_loss, prog_bar=True, on_epoch=True, on_step=False)
        self.log("val_perplexity", self.val_perplexity, on_epoch=True, on_step=False)

    def on_validation_end(self) -> None:
        """One line per validation, so a run's log shows the loss curve without a dashboard."""
        if self.trainer.sanity_checking or "val_loss" not in self.trainer.callback_metrics:
            return
        loss = float(self.trainer.callback_metrics["val_loss"])
        rank_zero_info(f"step {self.trainer.global_step}: val_loss {loss:.4f}")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._update_loss(self.test_loss, batch)
        summaries = self.generate_summaries(batch)
        if not batch["filler"]:
            self.rouge.update(summaries, batch["references"])
        self.log("test_loss", self.test_loss, on_epoch=True, on_step=False)

    def on_test_epoch_end(self) -> None:
        scores = self.rouge.compute()
        self.log_dict({f"test_{key}": scores[f"{key}_fmeasure"] for key in ROUGE_KEYS})
        self.rouge.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        summaries = self.generate_summaries(batch)
        if batch["filler"]:
            return []
        return [
            {"id": i, "summary": s, "reference": r}
            for i, s, r in zip(batch["ids"], summaries, batch["references"], strict=True)
        ]

    @torch.no_grad()
    def generate_summaries(self, batch: dict[str, Any]) -> list[str]:
        """Greedy decoding after each prompt, at most ``max_new_tokens`` tokens."""
        tokenizer = self.trainer.datamodule.tokenizer
        prompt = batch["prompt_ids"]
        output = self.model.generate(
            input_ids=prompt,
            attention_mask=batch["prompt_attention_mask"],
            max_new_tokens=self.hparams.max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=self.trainer.datamodule.pad_token_id,
            use_cache=True,
            # Sharded models run collectives in every forward: all ranks decode until the last one is done.
            synced_gpus=torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1,
        )
        return [t.strip() for t in tokenizer.batch_decode(output[:, prompt.shape[1] :], skip_special_tokens=True)]

    # ------------------------------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        on_cuda = all(p.device.type == "cuda" for p in params)
        optimizer = torch.optim.AdamW(
            params,
            lr=self.hparams.learning_rate,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
            fused=True if on_cuda else None,
            foreach=None if on_cuda else True,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        if self.hparams.lr_schedule == "constant":
            return 1.0
        warmup = self.hparams.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        total = max(warmup + 1, int(self.trainer.estimated_stepping_batches))
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        floor = self.hparams.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    # ----------------------------------------------------------------------------------------------- export
    def on_train_end(self) -> None:
        """Leave a Hugging Face directory (model + tokenizer) beside the checkpoints."""
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        out = self.hparams.hf_export_dir or str(Path(log_dir) / "hf_model")
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        with expect_silence(f"writing the Hugging Face model to {out}"):
            written = save_hf_directory(self.model, tokenizer, out)
        if written is not None:
            rank_zero_info(f"Hugging Face model written to {out}")
