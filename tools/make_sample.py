"""Build the bundled synthetic CNN/DailyMail sample and its Llama-3-style tokenizer.

Why this exists: the embedded default (``llama_ft/presets/default.yaml``) must fine-tune end to end on a laptop CPU with
no network, yet the real dataset (``abisee/cnn_dailymail``, about 1.3 GB) and Meta's Llama 3 tokenizer (gated)
cannot be fetched offline. This module writes a stand-in with the same shape: the Hugging Face hub layout of
CNN/DailyMail 3.0.0 (``article``, ``highlights``, ``id``) filled with made-up news stories, plus a byte-level BPE
tokenizer with Llama 3's special tokens and a 4,096-token vocabulary matching
``llama_ft/presets/models/llama-tiny.json``.

No real article is copied: the stories are composed from the small vocabularies and templates in
``tools/sample_words/`` (JSON, loaded at import). Each story's highlights are its key-fact sentences, written the way
CNN/DailyMail writes them (one per line, ending in `` .``), so a tiny model can visibly learn to pick them out within
a minute of CPU training.

Run ``python -m tools.make_sample`` (or ``python tools/make_sample.py``) to rebuild the shipped files; a fixed
seed makes the output identical byte for byte. ``--out-dir DIR`` writes the sample elsewhere instead, e.g. to compare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "llama_ft" / "data" / "sample"
SAMPLE_DATASET_DIR = SAMPLE_DIR / "cnn_dailymail"
SAMPLE_TOKENIZER_DIR = SAMPLE_DIR / "tokenizer"
SAMPLE_CONFIG_NAME = "3.0.0"

SEED = 20240418
SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train-00000-of-00003", "train-00001-of-00003", "train-00002-of-00003"),
    "validation": ("validation-00000-of-00001",),
    "test": ("test-00000-of-00001",),
}
SPLIT_ROWS = {"train": 3000, "validation": 300, "test": 300}
LONG_ARTICLE_PROBABILITY = 0.06

VOCAB_SIZE = 4096
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
SPECIAL_TOKENS = [
    BOS_TOKEN,
    EOS_TOKEN,
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(10)),
]
# The pre-tokenizer split pattern published with Llama 3 (tiktoken's cl100k-style regex).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
MODEL_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Topic:
    """One news section: its roles, organisations, slot words and sentence templates.

    ``ledes`` open the story and ``facts`` carry the other key facts; both end in a full stop and become the
    highlights. ``fillers`` are context sentences that pad the article.
    """

    section: str
    roles: tuple[str, ...]
    orgs: tuple[str, ...]
    slots: dict[str, tuple[str, ...]]
    ledes: tuple[str, ...]
    facts: tuple[str, ...]
    fillers: tuple[str, ...]


# --------------------------------------------------------------------------------------------------------------
# Vocabularies. Invented for this sample; people are random first/last name pairs. They live as data next to this
# script: ``sample_words/words.json`` (names, places, calendar words, generic filler sentences) and
# ``sample_words/topics.json`` (one entry per news section, in the order the generator draws from).
# Editing either file changes the generated sample: rebuild it and commit both.
# --------------------------------------------------------------------------------------------------------------

WORDS_DIR = Path(__file__).resolve().parent / "sample_words"


def _load_json(name: str) -> Any:
    return json.loads((WORDS_DIR / name).read_text(encoding="utf-8"))


def _load_topic(entry: dict[str, Any]) -> Topic:
    """A ``Topic`` from its JSON object; lists become tuples so the vocabularies stay immutable."""
    return Topic(
        section=entry["section"],
        roles=tuple(entry["roles"]),
        orgs=tuple(entry["orgs"]),
        slots={name: tuple(choices) for name, choices in entry["slots"].items()},
        ledes=tuple(entry["ledes"]),
        facts=tuple(entry["facts"]),
        fillers=tuple(entry["fillers"]),
    )


_WORDS: dict[str, list[Any]] = _load_json("words.json")
FIRST_NAMES: tuple[str, ...] = tuple(_WORDS["first_names"])
LAST_NAMES: tuple[str, ...] = tuple(_WORDS["last_names"])
PLACES: tuple[tuple[str, str], ...] = tuple((city, country) for city, country in _WORDS["places"])
DAYS: tuple[str, ...] = tuple(_WORDS["days"])
MONTHS: tuple[str, ...] = tuple(_WORDS["months"])
BUILDINGS: tuple[str, ...] = tuple(_WORDS["buildings"])
TIMES_OF_DAY: tuple[str, ...] = tuple(_WORDS["times_of_day"])
GENERIC_FILLERS: tuple[str, ...] = tuple(_WORDS["generic_fillers"])
TOPICS: tuple[Topic, ...] = tuple(_load_topic(entry) for entry in _load_json("topics.json"))


# --------------------------------------------------------------------------------------------------------------
# Story composition
# --------------------------------------------------------------------------------------------------------------


def _person(rng: random.Random) -> tuple[str, str]:
    """A made-up full name and its surname."""
    last = rng.choice(LAST_NAMES)
    return f"{rng.choice(FIRST_NAMES)} {last}", last


def _money(rng: random.Random) -> str:
    """An amount in pounds or dollars, written the way news copy writes it."""
    currency = rng.choice("£$")
    if rng.random() < 0.6:
        return f"{currency}{rng.randint(1, 99)}.{rng.randint(1, 9)} million"
    if rng.random() < 0.5:
        return f"{currency}{rng.randint(1, 9)}.{rng.randint(1, 9)} billion"
    return f"{currency}{rng.randint(10, 999) * 1000:,}"


def _story_slots(rng: random.Random, topic: Topic) -> dict[str, str]:
    """Every slot value one story uses, drawn once so names and places stay consistent through the story."""
    person, last = _person(rng)
    person2, last2 = _person(rng)
    person3, _ = _person(rng)
    (place, country), (place2, _) = rng.sample(PLACES, 2)
    org, org2 = rng.sample(topic.orgs, 2)
    year = rng.randint(2008, 2016)
    slots = {
        "person": person,
        "last": last,
        "person2": person2,
        "last2": last2,
        "person3": person3,
        "place": place,
        "place2": place2,
        "country": country,
        "org": org.format(place=place),
        "org2": org2.format(place=place2),
        "role": rng.choice(topic.roles),
        "day": rng.choice(DAYS),
        "day2": rng.choice(DAYS),
        "month": rng.choice(MONTHS),
        "year": str(year),
        "year_past": str(rng.randint(1952, year - 2)),
        "n": str(rng.randint(2, 12)),
        "n2": str(rng.randint(3, 40)),
        "n3": str(rng.randint(2, 90)),
        "score": str(rng.randint(2, 5)),
        "score2": str(rng.randint(0, 1)),
        "age": str(rng.randint(18, 74)),
        "hour": str(rng.randint(1, 12)),
        "temp": str(rng.randint(31, 44)),
        "big": f"{rng.randint(12, 980) * rng.choice((10, 100, 1000)):,}",
        "big2": f"{rng.randint(1, 999) * rng.choice((100, 1000)):,}",
        "money": _money(rng),
        "money2": _money(rng),
        "price": f"{rng.choice('£$')}{rng.randint(5, 950) * rng.choice((1, 10, 100)):,}",
        "pct": str(rng.randint(3, 68)),
        "pct2": str(rng.randint(12, 89)),
        "building": rng.choice(BUILDINGS),
        "time_of_day": rng.choice(TIMES_OF_DAY),
    }
    for name, choices in topic.slots.items():
        slots[name] = rng.choice(choices).format(**slots)
    return slots


def _dateline(rng: random.Random, slots: dict[str, str], publisher: str) -> str:
    """The story's opening credit line: CNN's city dateline or the Daily Mail's byline and timestamps."""
    if publisher == "cnn":
        return f"{slots['place'].upper()}, {slots['country']} (CNN) -- "
    reporter, _ = _person(rng)
    day, hour, minute = rng.randint(1, 28), rng.randint(0, 23), rng.randint(0, 59)
    date = f"{day} {slots['month']} {slots['year']}"
    return (
        f"By . {reporter} . PUBLISHED: . {hour:02d}:{minute:02d} EST, {date} . | . "
        f"UPDATED: . {(hour + 2) % 24:02d}:{minute:02d} EST, {date} . "
    )


def _story_url(rng: random.Random, slots: dict[str, str], topic: Topic, publisher: str, index: int) -> str:
    """A made-up story URL; its sha1 becomes the row ``id`` as in the real dataset."""
    words = f"{slots['last']} {slots['place']} {topic.section}".lower().split()
    if publisher == "cnn":
        month = rng.randint(1, 12)
        day = rng.randint(1, 28)
        return (
            f"http://edition.cnn.com/{slots['year']}/{month:02d}/{day:02d}/{topic.section}/{'.'.join(words)}/index.html"
        )
    article_number = 1_000_000 + 7 * index + rng.randint(0, 6)
    return f"http://www.dailymail.co.uk/news/article-{article_number}/{'-'.join(w.title() for w in words)}.html"


def _highlight_line(sentence: str) -> str:
    """Write a key sentence as a CNN/DailyMail highlight: final full stop detached as `` .``."""
    return sentence[:-1] + " ."


def compose_story(rng: random.Random, index: int) -> dict[str, str]:
    """One synthetic row: an article whose key sentences (lede + 1-2 facts) reappear as its highlights."""
    topic = rng.choice(TOPICS)
    publisher = "cnn" if rng.random() < 0.6 else "dailymail"
    slots = _story_slots(rng, topic)
    lede = rng.choice(topic.ledes).format(**slots)
    facts = [template.format(**slots) for template in rng.sample(topic.facts, rng.choice((1, 1, 2)))]
    long_article = rng.random() < LONG_ARTICLE_PROBABILITY
    filler_count = rng.randint(36, 48) if long_article else rng.randint(2, 15)
    filler_pool = topic.fillers + GENERIC_FILLERS
    fillers = [template.format(**slots) for template in rng.sample(filler_pool, filler_count)]
    # Key facts sit among the fillers in reading order, mostly early, as in news writing.
    positions = sorted(rng.sample(range(min(len(fillers), 8) + 1), len(facts)))
    body = list(fillers)
    for offset, (position, fact) in enumerate(zip(positions, facts, strict=True)):
        body.insert(position + offset, fact)
    article = _dateline(rng, slots, publisher) + " ".join([lede, *body])
    highlights = "\n".join(_highlight_line(sentence) for sentence in [lede, *facts])
    url = _story_url(rng, slots, topic, publisher, index)
    return {"article": article, "highlights": highlights, "id": hashlib.sha1(url.encode()).hexdigest()}


def compose_splits(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """All rows of every split, from one seeded generator so the output never changes."""
    rng = random.Random(seed)
    splits: dict[str, list[dict[str, str]]] = {}
    index = 0
    for split, count in SPLIT_ROWS.items():
        splits[split] = [compose_story(rng, index + i) for i in range(count)]
        index += count
    ids = [row["id"] for rows in splits.values() for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"seed {seed} produced {len(ids) - len(set(ids))} duplicate ids; choose another SEED")
    return splits


# --------------------------------------------------------------------------------------------------------------
# Writing: parquet in the hub layout, README with the config, tokenizer
# --------------------------------------------------------------------------------------------------------------

DATASET_README = """\
---
language:
- en
license: apache-2.0
pretty_name: Synthetic CNN/DailyMail sample
task_categories:
- summarization
dataset_info:
- config_name: 3.0.0
  features:
  - name: article
    dtype: string
  - name: highlights
    dtype: string
  - name: id
    dtype: string
configs:
- config_name: 3.0.0
  data_files:
  - split: train
    path: 3.0.0/train-*
  - split: validation
    path: 3.0.0/validation-*
  - split: test
    path: 3.0.0/test-*
---

# Synthetic CNN/DailyMail sample

Made-up news stories in the layout and format of the Hugging Face `abisee/cnn_dailymail` dataset (config
`3.0.0`; columns `article`, `highlights`, `id`), small enough to ship with `llama_ft` and train on a CPU.
No real article is included: every story is composed from invented names and sentence templates, and each
highlight line is a key sentence of its article.

Splits: {counts}.

Regenerate (deterministic, byte for byte) with `python -m tools.make_sample`.
"""

PARQUET_SCHEMA = pa.schema([("article", pa.string()), ("highlights", pa.string()), ("id", pa.string())])


def _write_parquet(rows: Sequence[dict[str, str]], path: Path) -> None:
    """Write rows with a fixed schema and codec so the bytes depend only on the rows."""
    columns = {name: [row[name] for row in rows] for name in PARQUET_SCHEMA.names}
    table = pa.table(columns, schema=PARQUET_SCHEMA)
    pq.write_table(table, path, compression="zstd", compression_level=9)


def write_dataset(splits: dict[str, list[dict[str, str]]], dataset_dir: Path) -> None:
    """Lay the splits out as the hub repo does: ``3.0.0/<split>-0000i-of-0000n.parquet`` plus README."""
    config_dir = dataset_dir / SAMPLE_CONFIG_NAME
    config_dir.mkdir(parents=True, exist_ok=True)
    for split, file_stems in SPLIT_FILES.items():
        rows = splits[split]
        shard = -(-len(rows) // len(file_stems))
        for i, stem in enumerate(file_stems):
            _write_parquet(rows[i * shard : (i + 1) * shard], config_dir / f"{stem}.parquet")
    counts = ", ".join(f"{split} {len(rows):,} rows" for split, rows in splits.items())
    (dataset_dir / "README.md").write_text(DATASET_README.format(counts=counts), encoding="utf-8")


def train_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer shaped like Llama 3's: same split regex, special tokens, BOS-only template.

    As with Llama 3, encoding prepends ``<|begin_of_text|>``, appends no EOS, and no pad token is set.
    """
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise ValueError(
            f"trained vocabulary has {tokenizer.get_vocab_size()} tokens, need {VOCAB_SIZE}: the sample text is "
            "too uniform for that many merges; enlarge the vocabularies in tools/sample_words/"
        )
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, SPECIAL_TOKENS.index(BOS_TOKEN))],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
    )


def write_sample(out_dir: Path) -> None:
    """Write the dataset (``out_dir/cnn_dailymail``) and tokenizer (``out_dir/tokenizer``), deterministically."""
    splits = compose_splits()
    write_dataset(splits, out_dir / SAMPLE_DATASET_DIR.name)
    texts = (text for row in splits["train"] for text in (row["article"], row["highlights"]))
    tokenizer_dir = out_dir / SAMPLE_TOKENIZER_DIR.name
    train_tokenizer(texts).save_pretrained(tokenizer_dir)
    # Name the class as Meta's Llama 3 files do: transformers 4.x has no "TokenizersBackend" (5.x's name).
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _percentiles(values: Sequence[int]) -> str:
    """mean / p50 / p95 / max of a list of lengths, for the CLI summary."""
    ordered = sorted(values)
    p50, p95 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.95)]
    return f"mean {sum(ordered) / len(ordered):.0f}, p50 {p50}, p95 {p95}, max {ordered[-1]}"


def main(argv: Sequence[str] | None = None) -> None:
    """Rebuild the sample (by default the shipped one, in place) and print what was written."""
    parser = argparse.ArgumentParser(
        description="Build the synthetic CNN/DailyMail sample and its tokenizer (deterministic, byte for byte)."
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=SAMPLE_DIR,
        help=f"where to write cnn_dailymail/ and tokenizer/ (default: the shipped sample, {SAMPLE_DIR})",
    )
    out_dir: Path = parser.parse_args(argv).out_dir
    dataset_dir, tokenizer_dir = out_dir / SAMPLE_DATASET_DIR.name, out_dir / SAMPLE_TOKENIZER_DIR.name
    write_sample(out_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    summary = {}
    for path in sorted((dataset_dir / SAMPLE_CONFIG_NAME).glob("*.parquet")):
        table = pq.read_table(path)
        summary[path.name] = f"{table.num_rows} rows, {path.stat().st_size:,} bytes"
    print(json.dumps(summary, indent=2))
    train = compose_splits()["train"]
    for column in ("article", "highlights"):
        lengths = [len(ids) for ids in tokenizer([row[column] for row in train])["input_ids"]]
        long_share = sum(length > 600 for length in lengths) / len(lengths)
        print(f"train {column} tokens: {_percentiles(lengths)}, over 600: {long_share:.1%}")
    print(f"wrote {dataset_dir} and {tokenizer_dir}")


if __name__ == "__main__":
    main()
