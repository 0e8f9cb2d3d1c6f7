"""LlamaFineTuner: the LightningModule around ``transformers.LlamaForCausalLM``."""

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from llama_ft.callbacks.watchdog import expect_silence
from llama_ft.checkpoint.hf_headers import check_weights_fit
from llama_ft.checkpoint.huggingface import architecture_shapes, load_sharded_weights, save_hf_directory
from llama_ft.checkpoint.lora_export import save_merged_hf_directory
from llama_ft.checkpoint.model_card import TrainingRecord
from llama_ft.data.prompt import DEFAULT_PROMPT, read_prompt_format
from llama_ft.errors import ConfigError
from llama_ft.lora import LoraSettings, base_key_map, initial_adapter_state, inject_lora, is_adapter_key
from llama_ft.loss import IGNORE_INDEX, causal_lm_loss, gathered_logits, install_loss_head
from llama_ft.presets import resolve_llama_config
from llama_ft.ranges import Fraction, NonNegativeFloat, NonNegativeInt, OpenFraction, PositiveFloat, PositiveInt
from llama_ft.rouge import ROUGE_KEYS, StemmedRouge

LrSchedule = Literal["constant", "cosine"]
# The attention kernels transformers' Llama accepts by name.
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"]


class MeanPerplexity(MeanMetric):
    """exp of the target-weighted mean loss: the perplexity, without holding the logits it is usually computed from."""

    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute())


def _on_meta_device() -> bool:
    return torch.get_default_device().type == "meta"


def resolve_local_checkpoint(name_or_path: str) -> Path:
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
        lora: LoRA adapters (``llama_ft.lora.LoraSettings``: r, alpha, dropout, target_modules); None trains every
            weight. With LoRA the base is frozen, only the adapters are optimized, checkpoints of a pretrained base
            hold only the adapters (``model_name_or_path`` names the base) and the exported model is merged.
    """

    def __init__(
        self,
        model_config: str | None = None,
        model_name_or_path: str | None = None,
        learning_rate: PositiveFloat = 1e-5,
        weight_decay: NonNegativeFloat = 0.0,
        betas: tuple[OpenFraction, OpenFraction] = (0.9, 0.999),
        lr_schedule: LrSchedule = "constant",
        warmup_steps: NonNegativeInt = 0,
        min_lr_ratio: Fraction = 0.1,
        max_new_tokens: PositiveInt = 128,
        attn_implementation: AttnImplementation = "sdpa",
        hf_export_dir: str | None = None,
        lora: LoraSettings | None = None,
    ) -> None:
        super().__init__()
        if model_config is None and model_name_or_path is None:
            raise ConfigError("set model.model_config (a preset or JSON) and/or model.model_name_or_path (weights).")
        if lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"model.lr_schedule={lr_schedule!r} must be 'constant' or 'cosine'.")
        self.lora = LoraSettings.parse(lora)
        if attn_implementation not in AttnImplementation.__args__:
            raise ConfigError(f"model.attn_implementation={attn_implementation!r} is not one of "
                              f"{list(AttnImplementation.__args__)}.")
        self.save_hyperparameters()
        self.hparams.lora = self.lora.as_dict() if self.lora else None  # plain values: checkpoints load weights-only
        # A LoRA checkpoint of a pretrained base holds only the adapters; the base comes from model_name_or_path.
        self.strict_loading = self.lora is None
        self.llama_config = resolve_llama_config(model_config, model_name_or_path)
        self.llama_config._attn_implementation = attn_implementation
        # An exported directory says how it was prompted; the data module prompts the same way (None: the default).
        self.prompt_format = read_prompt_format(model_name_or_path)
        self.model: LlamaForCausalLM | None = None
        self._base_dir: Path | None = None
        if model_name_or_path is not None and Path(model_name_or_path).expanduser().is_dir():
            self.base_checkpoint()  # a damaged or mismatched local checkpoint fails here, before any work
        self.val_loss = MeanMetric()
        self.val_perplexity = MeanPerplexity()
        self.test_loss = MeanMetric()
        self.rouge = StemmedRouge()
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

    def base_checkpoint(self) -> Path:
        """The base model's directory, its safetensors headers checked against the architecture (once): every loading
        path refuses a damaged, incomplete or mismatched checkpoint in one line before reading a weight."""
        if self._base_dir is None:
            directory = resolve_local_checkpoint(self.hparams.model_name_or_path)
            check_weights_fit(directory, architecture_shapes(self.llama_config), self.llama_config.num_hidden_layers)
            self._base_dir = directory
        return self._base_dir

    def configure_model(self) -> None:
        """Build the model here so a sharding strategy can create it on the meta device first."""
        if self.model is not None:
            return
        if _on_meta_device():
            self.model = LlamaForCausalLM(self.llama_config)  # shapes only; initialize_weights fills it later
        elif self.hparams.model_name_or_path is not None:
            self.model = LlamaForCausalLM.from_pretrained(
                self.base_checkpoint(),
                config=self.llama_config,
                dtype=torch.get_default_dtype(),
                use_safetensors=True,
            ).train()
        else:
            self.model = LlamaForCausalLM(self.llama_config)
        self.model.config.use_cache = False
        install_loss_head(self.model)
        if self.lora is not None:
            inject_lora(self.model, self.lora)
            if not _on_meta_device():
                self._load_initial_adapters()

    def _load_initial_adapters(self) -> None:
        """The same first adapter values on every layout (``llama_ft.lora.initial_adapter_state``)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = initial_adapter_state(self.model)
        if not any(isinstance(p, DTensor) for p in self.model.parameters()):
            self.model.load_state_dict(state, strict=False)
            return
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(self.model, state if torch.distributed.get_rank() == 0 else {}, options=options)

    def initialize_weights(self) -> None:
        """Fill a model that was built on the meta device and then materialized (and maybe sharded).

        Called by the ``advanced`` strategy after it applied its layout and materialized the model (which also
        recomputed the rotary tables); a checkpoint is loaded (each rank reads only its shards), else the Hugging Face
        initialization runs.
        """
        assert self.model is not None
        if self.hparams.model_name_or_path is not None:
            directory = self.base_checkpoint()
            with expect_silence(f"loading {directory}"):
                load_sharded_weights(self.model, directory, key_map=base_key_map(self.model))
        else:
            for module in self.model.modules():
                module.__dict__.pop("_is_hf_initialized", None)
                for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                    tensor.__dict__.pop("_is_hf_initialized", None)
            self.model.initialize_weights()
        self.model.tie_weights()
        if self.lora is not None:
            self._load_initial_adapters()

    # ------------------------------------------------------------------------------------------------ steps
    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """HF's causal-LM loss, computed without full fp32 logits (``llama_ft.loss``)."""
        return causal_lm_loss(self.model, batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                              batch.get("position_ids"))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.flops_per_batch = self.training_flops(batch["num_tokens"], batch["input_ids"].shape[1])
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def training_flops(self, tokens: int, seq_len: int) -> float:
        """Forward + backward FLOPs of ``tokens`` real tokens in rows of ``seq_len`` (PaLM: 6·N + 12·L·H·s), for MFU."""
        c = self.llama_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        non_embedding = self._parameter_count() - c.vocab_size * c.hidden_size
        attention = 12.0 * c.num_hidden_layers * c.num_attention_heads * head_dim * seq_len
        weights = 6.0 * non_embedding
        if self.lora is not None:  # a frozen weight computes no gradient of its own: 4 FLOPs, not 6
            adapters = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            weights = 4.0 * (non_embedding - adapters) + 6.0 * adapters
        return (weights + attention) * tokens

    def _parameter_count(self) -> int:
        """Unsharded parameter count (sharded DTensors report their global shape)."""
        if not hasattr(self, "_n_params"):
            self._n_params = sum(p.numel() for p in self.model.parameters())
        return self._n_params

    def _update_loss(self, metrics: tuple[MeanMetric, ...], batch: dict[str, Any]) -> None:
        loss = self._loss(batch)
        targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if targets:  # filler batches only keep sharded replicas in step
            for metric in metrics:
                metric.update(loss.detach().float(), weight=targets)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._update_loss((self.val_loss, self.val_perplexity), batch)
        self.log("val_loss", self.val_loss, prog_bar=True, on_epoch=True, on_step=False)
        self.log("val_perplexity", self.val_perplexity, on_epoch=True, on_step=False)

    def on_validation_end(self) -> None:
        """One line per validation, so a run's log shows the loss curve without a dashboard."""
        if self.trainer.sanity_checking or "val_loss" not in self.trainer.callback_metrics:
            return
        loss = float(self.trainer.callback_metrics["val_loss"])
        rank_zero_info(f"step {self.trainer.global_step}: val_loss {loss:.4f}")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._update_loss((self.test_loss,), batch)
        summaries = self.generate_summaries(batch)
        if not batch["filler"]:
            self.rouge.update(summaries, batch["references"])
        self.log("test_loss", self.test_loss, on_epoch=True, on_step=False)

    def on_test_epoch_end(self) -> None:
        scores = self.rouge.compute()
        self.log_dict({f"test_{key}": scores[key] for key in ROUGE_KEYS})
        self.rouge.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        summaries = self.generate_summaries(batch)
        if batch["filler"]:
            return []
        return [
            {"id": i, "summary": s} | ({} if r is None else {"reference": r})
            for i, s, r in zip(batch["ids"], summaries, batch["references"], strict=True)
        ]

    @torch.no_grad()
    def generate_summaries(self, batch: dict[str, Any]) -> list[str]:
        """Greedy decoding after each prompt, at most ``max_new_tokens`` tokens."""
        tokenizer = self.trainer.datamodule.tokenizer
        prompt = batch["prompt_ids"]
        with gathered_logits(self.model):
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
        """Leave a Hugging Face directory (model + tokenizer + model card) beside the checkpoints."""
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        out = self.hparams.hf_export_dir or str(Path(log_dir) / "hf_model")
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        with expect_silence(f"writing the Hugging Face model to {out}"):
            if self.lora is not None:  # adapters merged into the base as it streams out: a plain Llama checkpoint
                written = save_merged_hf_directory(self.model, self.lora, tokenizer, out, self.training_record(),
                                                   max_new_tokens=self.hparams.max_new_tokens)
            else:
                written = save_hf_directory(self.model, tokenizer, out, self.training_record(),
                                            max_new_tokens=self.hparams.max_new_tokens)
        if written is not None:
            rank_zero_info(f"Hugging Face model written to {out} (model card: {Path(out) / 'README.md'})")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With LoRA on a pretrained base, keep only what training changes: the adapters (their optimizer state is
        all the optimizer holds) and the base's name, from which ``fit --ckpt_path`` and ``export`` reload it."""
        if self.lora is None or self.hparams.model_name_or_path is None:
            return
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter_key(k)}
        checkpoint["lora_base"] = self.hparams.model_name_or_path

    def training_record(self) -> TrainingRecord:
        """What the model card says about this run: recipe, steps, last validation loss, precision and layout."""
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        plan_result = getattr(trainer.strategy, "plan_result", None)
        val_loss = trainer.callback_metrics.get("val_loss")
        extra = {"trainer.precision": trainer.precision}
        if plan_result is not None:
            extra["parallel layout"] = plan_result.chosen.describe()
        return TrainingRecord(
            model_hparams=dict(self.hparams),
            data_hparams=dict(getattr(datamodule, "hparams", {}) or {}),
            steps=trainer.global_step,
            val_loss=None if val_loss is None else float(val_loss),
            extra_settings=extra,
            prompt=self.prompt_format or DEFAULT_PROMPT,
        )
