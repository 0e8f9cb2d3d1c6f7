"""Find the data set and tokenizer a recipe names — a hub id or a local directory, one code path — and
refuse unusable ones with a message that says how to fix them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llama_ft.errors import DataError

SAMPLE_ALIAS = "sample"
SAMPLE_ROOT = Path(__file__).resolve().parent / "sample"
REQUIRED_COLUMNS = ("article", "highlights", "id")
DATASET_CONFIG = "3.0.0"


def resolve_dataset_source(name: str) -> str:
    """Map the ``sample`` alias to the bundled folder; check that a local-looking path exists."""
    if name == SAMPLE_ALIAS:
        return str(SAMPLE_ROOT / "cnn_dailymail")
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise DataError(
            f"dataset path {name!r} does not exist. Point data.dataset at a directory laid out like the hub "
            f"repository (README.md + {DATASET_CONFIG}/*.parquet), at the hub id 'abisee/cnn_dailymail', or use "
            f"'{SAMPLE_ALIAS}' for the bundled sample."
        )
    return str(Path(name).expanduser()) if _looks_local(name) else name


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).exists()


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_local_parquet(root: Path, splits: tuple[str, ...]) -> None:
    """Read only parquet footers: a missing, empty or wrongly shaped split fails before anything is converted.

    Every split present is checked, not just the requested ones, because ``load_dataset`` converts them all.
    """
    present = {f.name.split("-")[0] for f in (root / DATASET_CONFIG).glob("*.parquet")}
    for split in sorted(present | set(splits)):
        files = sorted((root / DATASET_CONFIG).glob(f"{split}-*.parquet"))
        if not files:
            raise DataError(
                f"{root} has no {DATASET_CONFIG}/{split}-*.parquet files; a folder laid out like the hub repository "
                f"has one or more per split (train, validation, test)."
            )
        metadata = [_read_footer(f) for f in files]
        schema = metadata[0].schema.to_arrow_schema()
        _check_columns(schema.names, split, str(root))
        for column in REQUIRED_COLUMNS:
            if not pa.types.is_string(schema.field(column).type) and not pa.types.is_large_string(
                    schema.field(column).type):
                raise DataError(f"column {column!r} of {files[0]} holds {schema.field(column).type}, not text; "
                                "CNN/DailyMail rows are strings (article, highlights, id).")
        if sum(m.num_rows for m in metadata) == 0:
            raise _empty_split(split, str(root))


def _read_footer(path: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path} is not a readable parquet file ({err}); it may be truncated: download or copy it "
                        "again.") from err


def _check_columns(columns: list[str], split: str, source: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"split {split!r} of {source!r} lacks column(s) {missing}; found {columns}. CNN/DailyMail "
            f"{DATASET_CONFIG} rows need {list(REQUIRED_COLUMNS)}."
        )


def _empty_split(split: str, source: str) -> DataError:
    return DataError(f"split {split!r} of {source!r} is empty; it needs at least one (article, highlights) row.")


def local_data_files(root: Path) -> dict[str, list[str]]:
    """The parquet files of each split of a hub-layout folder (``3.0.0/<split>-*.parquet``)."""
    files: dict[str, list[str]] = {}
    for path in sorted((root / DATASET_CONFIG).glob("*.parquet")):
        files.setdefault(path.name.split("-")[0], []).append(str(path.resolve()))
    return files


def content_fingerprint(files: dict[str, list[str]]) -> str:
    """A cache key from each data file's path, size, modification and status-change times and inode: ``datasets``
    keys a local folder by its name, so another folder of the same name, or one edited in place, would return the
    rows cached before. (The change time and inode catch a file replaced with its old modification time kept.)"""
    digest = hashlib.sha256()
    for split, paths in sorted(files.items()):
        for path in paths:
            stat = os.stat(path)
            fields = (split, path, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
            digest.update("\0".join(map(str, fields)).encode() + b"\n")
    return f"{DATASET_CONFIG}-{digest.hexdigest()[:16]}"


def load_splits(name: str, splits: tuple[str, ...], cache_dir: str | None = None) -> datasets.DatasetDict:
    """Load CNN/DailyMail 3.0.0 (or a folder shaped like it) and check columns and emptiness."""
    source = resolve_dataset_source(name)
    local_parquet = _looks_local(source) and (Path(source) / DATASET_CONFIG).is_dir()
    if local_parquet:
        check_local_parquet(Path(source), splits)
    try:
        if local_parquet:
            files = local_data_files(Path(source))
            loaded = datasets.load_dataset("parquet", name=content_fingerprint(files), data_files=files,
                                           cache_dir=cache_dir)
        else:
            loaded = datasets.load_dataset(source, DATASET_CONFIG, cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as err:
        if _looks_local(source):
            raise DataError(
                f"could not load {source!r} as CNN/DailyMail {DATASET_CONFIG}: {err}. The folder needs a README.md "
                f"whose YAML 'configs:' names {DATASET_CONFIG}, and {DATASET_CONFIG}/<split>-*.parquet files."
            ) from err
        where = "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if _offline() else "the Hub is unreachable"
        raise DataError(
            f"cannot load dataset {source!r}: {where} ({type(err).__name__}). Download the repository on a "
            f"machine with access (e.g. `huggingface-cli download {source} --repo-type dataset --local-dir DIR`) "
            f"and set data.dataset=DIR, or use data.dataset={SAMPLE_ALIAS} for the bundled sample."
        ) from err
    missing_splits = [s for s in splits if s not in loaded]
    if missing_splits:
        raise DataError(f"dataset {source!r} has no split(s) {missing_splits}; it has {list(loaded)}.")
    for split in splits:
        _check_columns(loaded[split].column_names, split, source)
        if len(loaded[split]) == 0:
            raise _empty_split(split, source)
    return loaded


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a hub id or local directory (``sample`` = the bundled one); never runs remote code."""
    source = str(SAMPLE_ROOT / "tokenizer") if name == SAMPLE_ALIAS else name
    if _looks_local(source) and not Path(source).expanduser().exists():
        raise DataError(f"tokenizer path {source!r} does not exist; set data.tokenizer to a tokenizer directory.")
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as err:
        raise DataError(
            f"cannot load tokenizer {source!r} ({type(err).__name__}: {err}). Use a local tokenizer directory "
            f"or '{SAMPLE_ALIAS}' for the bundled one."
        ) from err
