"""Turn (article, highlights) pairs into token ids, cutting the article and never the summary.

Layout of one example: ``<bos>[SUMMARIZE] {article} [/SUMMARIZE]\\n{highlights}<eos>`` where ``<eos>`` is the
tokenizer's real end-of-sequence token. Only ``input_ids`` and the prompt length are stored; labels are derived at
batching time, so the ``loss_on`` choice never invalidates the tokenization cache.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from llama_ft.errors import ConfigError, DataError

PROMPT_OPEN = "[SUMMARIZE] "
PROMPT_CLOSE = " [/SUMMARIZE]\n"
# Written into every exported Hugging Face directory; ``predict`` on such a directory prompts as it says.
PROMPT_FILENAME = "llama_ft_prompt.json"
PROMPT_FILE_VERSION = 1


@dataclass(frozen=True)
class PromptFormat:
    """The text around an article: ``<bos>{prefix}{article}{suffix}`` and the model continues with the summary."""

    prefix: str = PROMPT_OPEN
    suffix: str = PROMPT_CLOSE

    def to_json(self, tokenizer: PreTrainedTokenizerBase | None) -> dict:
        """The machine-readable form stored beside an exported model (see ``read_prompt_format``)."""
        return {
            "llama_ft_prompt_version": PROMPT_FILE_VERSION,
            "task": "summarization",
            "template": "{bos}" + self.prefix + "{article}" + self.suffix,
            "prefix": self.prefix,
            "suffix": self.suffix,
            "bos_token": getattr(tokenizer, "bos_token", None),
            "eos_token": getattr(tokenizer, "eos_token", None),
            "article_leading_space": True,
            "summary_ends_with": "eos_token",
        }


DEFAULT_PROMPT = PromptFormat()


def read_prompt_format(directory: str | Path | None) -> PromptFormat | None:
    """The prompt an exported directory was trained with, or None when it holds no ``llama_ft_prompt.json``."""
    if directory is None or not (Path(directory).expanduser() / PROMPT_FILENAME).is_file():
        return None
    path = Path(directory).expanduser() / PROMPT_FILENAME
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not readable JSON ({err}); re-export the model or delete the file.") from None
    if not isinstance(content, dict) or content.get("llama_ft_prompt_version") != PROMPT_FILE_VERSION or not all(
        isinstance(content.get(key), str) for key in ("prefix", "suffix")
    ):
        raise ConfigError(f"{path} is not a version-{PROMPT_FILE_VERSION} llama_ft prompt (string 'prefix' and "
                          "'suffix' expected); re-export the model with this version of llama_ft.")
    return PromptFormat(prefix=content["prefix"], suffix=content["suffix"])


@dataclass(frozen=True)
class PromptTokens:
    """The fixed token pieces of the template, tokenized once."""

    head: list[int]  # bos (when the tokenizer adds one) + "[SUMMARIZE] "
    close: list[int]  # " [/SUMMARIZE]\n"
    eos: int

    @property
    def overhead(self) -> int:
        """Tokens the template costs beyond article and summary."""
        return len(self.head) + len(self.close) + 1


def template_tokens(tokenizer: PreTrainedTokenizerBase, prompt: PromptFormat = DEFAULT_PROMPT) -> PromptTokens:
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path!r} has no EOS token; the summary must end with the model's real "
            "end-of-sequence token. Use a tokenizer that defines eos_token."
        )
    # The prefix's trailing space goes with the article (" " + article), as when the whole prompt is one string.
    head = tokenizer(prompt.prefix.rstrip(" "), add_special_tokens=True)["input_ids"]
    close = tokenizer(prompt.suffix, add_special_tokens=False)["input_ids"]
    return PromptTokens(head=head, close=close, eos=tokenizer.eos_token_id)


def summary_budget_error(needed: int, max_length: int, example_id: str) -> DataError:
    return DataError(
        f"max_length={max_length} is too small: example {example_id!r} needs {needed} tokens for the prompt "
        f"template and its summary alone, before any article text. Raise data.max_length (CNN/DailyMail "
        f"highlights are about 62 Llama-3 tokens; 1024 is the recipe's value)."
    )


def tokenize_examples(
    batch: dict[str, Sequence[str]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    min_article_tokens: int,
    prompt: PromptFormat = DEFAULT_PROMPT,
) -> dict[str, list]:
    """Batched ``Dataset.map`` function: returns ``input_ids``, ``prompt_length`` and ``length``.

    Examples whose template and summary leave fewer than ``min_article_tokens`` for the article get length 0;
    the caller filters them out and reports how many.
    """
    pieces = template_tokens(tokenizer, prompt)
    # The article keeps its leading space so BPE merges match tokenizing the whole prompt as one string.
    articles = tokenizer([" " + a.strip() for a in batch["article"]], add_special_tokens=False)["input_ids"]
    summaries = tokenizer([h.strip() for h in batch["highlights"]], add_special_tokens=False)["input_ids"]
    input_ids, prompt_lengths, lengths = [], [], []
    for article, summary in zip(articles, summaries, strict=True):
        room = max_length - pieces.overhead - len(summary)
        if room < min_article_tokens:
            input_ids.append([])
            prompt_lengths.append(0)
            lengths.append(0)
            continue
        prompt = pieces.head + article[:room] + pieces.close
        input_ids.append(prompt + summary + [pieces.eos])
        prompt_lengths.append(len(prompt))
        lengths.append(len(prompt) + len(summary) + 1)
    return {"input_ids": input_ids, "prompt_length": prompt_lengths, "length": lengths}


def tokenize_prompts(
    batch: dict[str, Sequence[str]], tokenizer: PreTrainedTokenizerBase, max_length: int, prompt: PromptFormat
) -> dict[str, list]:
    """Prompts alone (articles to summarize, no reference): the article is cut so the prompt fits ``max_length``."""
    pieces = template_tokens(tokenizer, prompt)
    room = max_length - len(pieces.head) - len(pieces.close)
    if room < 1:
        raise ConfigError(f"data.max_length={max_length} leaves no room for an article in the prompt; raise it.")
    articles = tokenizer([" " + a.strip() for a in batch["article"]], add_special_tokens=False)["input_ids"]
    prompts = [pieces.head + article[:room] + pieces.close for article in articles]
    lengths = [len(p) for p in prompts]
    return {"input_ids": prompts, "prompt_length": lengths, "length": lengths}


def choose_pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad token, else a reserved special token, else EOS.

    Masks and labels are always built from lengths, so even EOS padding cannot leak into the loss; a plain text
    token (the tutorial's id 0, "!" in Llama 3) is never used.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    specials = {tok: tid for tok, tid in tokenizer.get_vocab().items() if tid in set(tokenizer.all_special_ids)}
    specials.update({t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special})
    for marker in ("pad", "reserved"):
        for token in sorted(specials, key=lambda t: specials[t]):
            if marker in token.lower():
                return specials[token]
    return tokenizer.eos_token_id
