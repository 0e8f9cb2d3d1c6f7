"""What an exported Hugging Face directory says about itself: a model card, generation settings and the prompt.

- ``README.md``: base model, data, recipe settings, steps, final validation loss (and ROUGE where measured), the
  prompt format and a few lines of ``transformers`` code that summarize an article;
- ``generation_config.json``: greedy decoding with the tokenizer's real EOS and pad ids, so ``generate`` stops
  where training taught the model to stop;
- ``llama_ft_prompt.json``: the prompt in machine-readable form (``llama_ft.data.prompt``), which ``predict``
  reads back when ``model.model_name_or_path`` is this directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from llama_ft.data.prompt import DEFAULT_PROMPT, PROMPT_FILENAME, PromptFormat, choose_pad_token_id

CARD_FILENAME = "README.md"
DIRECTORY_PLACEHOLDER = "path/to/this/directory"
# Recipe keys the card lists, in this order: (hyper-parameter section, key).
_RECIPE_KEYS = (
    ("model", "model_config"), ("model", "learning_rate"), ("model", "lr_schedule"), ("model", "warmup_steps"),
    ("model", "weight_decay"), ("model", "betas"), ("data", "max_length"), ("data", "global_batch_size"),
    ("data", "micro_batch_size"), ("data", "batching"), ("data", "loss_on"), ("data", "max_examples_per_split"),
)


@dataclass
class TrainingRecord:
    """The run behind the weights, as far as it is known (``fit`` knows all; a bare checkpoint less)."""

    model_hparams: dict[str, Any] = field(default_factory=dict)
    data_hparams: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    val_loss: float | None = None
    rouge: dict[str, float] | None = None
    extra_settings: dict[str, Any] = field(default_factory=dict)  # e.g. precision, parallel layout
    prompt: PromptFormat = DEFAULT_PROMPT

    def settings(self) -> dict[str, Any]:
        sections = {"model": self.model_hparams, "data": self.data_hparams}
        found = {f"{s}.{k}": sections[s][k] for s, k in _RECIPE_KEYS if sections[s].get(k) is not None}
        return found | self.extra_settings


def _hub_id(name: Any) -> str | None:
    """``owner/name`` when it names a Hub repository rather than a local path (for the card's YAML header)."""
    text = str(name or "")
    return text if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not Path(text).expanduser().exists() else None


def _generation_ids(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, int | None]:
    if tokenizer is None or tokenizer.eos_token_id is None:
        return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                "pad_token_id": config.eos_token_id}
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": choose_pad_token_id(tokenizer)}


def _data_line(data: dict[str, Any]) -> str:
    dataset = data.get("dataset")
    if dataset is None:
        return "not recorded in the checkpoint"
    if dataset == "sample":
        return "`sample`: llama_ft's bundled synthetic CNN/DailyMail-format sample (made-up words, a smoke test)"
    return f"`{dataset}` (CNN/DailyMail 3.0.0 layout: article → highlights)"


def _results_lines(record: TrainingRecord) -> list[str]:
    steps = "not recorded" if record.steps is None else f"{record.steps} optimizer steps"
    loss = ("not measured (no validation ran)" if record.val_loss is None
            else f"{record.val_loss:.4f} (mean token cross-entropy on the validation split, at the last validation)")
    rouge = ("not measured in this run; `llama-ft test --ckpt_path CHECKPOINT` scores ROUGE-1/2/L"
             if not record.rouge else ", ".join(f"{k} {v:.4f}" for k, v in record.rouge.items()))
    return [f"| training | {steps} |", f"| final validation loss | {loss} |", f"| ROUGE | {rouge} |"]


def model_card_text(record: TrainingRecord, ids: dict[str, int | None], tokenizer: PreTrainedTokenizerBase | None,
                    max_new_tokens: int) -> str:
    """The README.md of an exported directory (Markdown with the Hub's YAML header)."""
    model, data = record.model_hparams, record.data_hparams
    base = model.get("model_name_or_path")
    base_line = f"`{base}`" if base else f"random initialization, architecture `{model.get('model_config')}`"
    header = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [llama, summarization]"]
    if _hub_id(base):
        header.append(f"base_model: {base}")
    if _hub_id(data.get("dataset")):
        header.append(f"datasets: [{data['dataset']}]")
    header.append("---")
    prompt = record.prompt
    template = "{bos}" + prompt.prefix + "{article}" + prompt.suffix
    eos = getattr(tokenizer, "eos_token", None)
    settings = [f"- `{k}`: {v}" for k, v in record.settings().items()] or ["- not recorded in the checkpoint"]
    return "\n".join([
        *header,
        "",
        "# Llama summarizer (llama_ft)",
        "",
        "A Llama causal language model fine-tuned with llama_ft (PyTorch Lightning) to write the highlights of a "
        "news article, CNN/DailyMail style.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base_line} |",
        f"| data | {_data_line(data)} |",
        *_results_lines(record),
        "",
        "## Recipe",
        "",
        *settings,
        "",
        "## Prompt",
        "",
        f"The model continues the prompt below with the summary and ends it with EOS (`{eos}`, id "
        f"{ids['eos_token_id']}); `{{bos}}` is the tokenizer's BOS, which it adds itself. The article keeps its own "
        "text; training cut long articles at the end so the summary always fitted.",
        "",
        "```text",
        template.replace("\n", "\\n"),
        "```",
        "",
        f"The same in machine-readable form: `{PROMPT_FILENAME}`. `llama-ft predict --model.model_name_or_path "
        f"THIS_DIRECTORY --data.tokenizer THIS_DIRECTORY --data.predict_file ARTICLES` prompts with it. "
        f"`generation_config.json` holds greedy decoding, at most {max_new_tokens} new tokens, EOS id "
        f"{ids['eos_token_id']}, pad id {ids['pad_token_id']}.",
        "",
        "## Generate a summary",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'directory = "{DIRECTORY_PLACEHOLDER}"',
        "tokenizer = AutoTokenizer.from_pretrained(directory)",
        "model = AutoModelForCausalLM.from_pretrained(directory)",
        'article = "The city council voted on Tuesday to build a new bridge over the river."',
        f"inputs = tokenizer({prompt.prefix!r} + article.strip() + {prompt.suffix!r}, return_tensors=\"pt\")",
        "output = model.generate(**inputs)  # greedy, stops at EOS: generation_config.json",
        'summary = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)',
        "print(summary)",
        "```",
        "",
    ])


def write_model_card(out: Path, model_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None,
                     record: TrainingRecord, max_new_tokens: int) -> None:
    """Write README.md, generation_config.json and llama_ft_prompt.json into the export directory ``out``."""
    ids = _generation_ids(model_config, tokenizer)
    GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, **ids).save_pretrained(out)
    (out / PROMPT_FILENAME).write_text(json.dumps(record.prompt.to_json(tokenizer), indent=2) + "\n")
    (out / CARD_FILENAME).write_text(model_card_text(record, ids, tokenizer, max_new_tokens))
