"""A user's own articles to summarize (``predict --data.predict_file PATH``): JSON lines or plain text, no summaries.

- ``*.jsonl`` / ``*.json``: one JSON object per line with a string field ``article`` and optionally ``id``
  (any other fields are ignored);
- any other file: plain UTF-8 text, one article per line (blank lines are skipped). An article with paragraphs goes
  on one line, or into the JSON-lines form, where a string can hold ``\\n``.

Articles without an ``id`` are named after their line, ``line-<n>`` (1-based), so every summary can be traced back.
"""

from __future__ import annotations

import json
from pathlib import Path

from llama_ft.errors import DataError

JSON_LINES_SUFFIXES = (".jsonl", ".json")


def check_articles_file(path: str | Path) -> Path:
    """The file must exist and be a file; read later (``read_articles``) when predict sets up."""
    given = Path(path).expanduser()
    if not given.is_file():
        raise DataError(f"data.predict_file {str(path)!r} is not a file; give a JSON-lines file (field 'article', "
                        "optional 'id') or a text file with one article per line.")
    return given


def _json_line(line: str, number: int, path: Path) -> tuple[str, str]:
    where = f"{path}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where} is not valid JSON ({err.msg}); each line must be one object such as "
                        '{"id": "a1", "article": "..."}.') from None
    article = row.get("article") if isinstance(row, dict) else None
    if not isinstance(article, str) or not article.strip():
        raise DataError(f"{where} has no non-empty string field 'article'; each line needs one "
                        '(e.g. {"id": "a1", "article": "..."}).')
    raw_id = row.get("id", f"line-{number}")
    if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
        raise DataError(f"{where}: 'id' must be a string or an integer, got {type(raw_id).__name__}.")
    return str(raw_id), article.strip()


def read_articles(path: str | Path) -> list[dict[str, str]]:
    """``[{"id", "article"}]`` in file order; a malformed line or a repeated id is an error naming the line."""
    path = check_articles_file(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"data.predict_file {path} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    json_lines = path.suffix.lower() in JSON_LINES_SUFFIXES
    rows: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        article_id, article = _json_line(line, number, path) if json_lines else (f"line-{number}", line.strip())
        if article_id in seen:
            raise DataError(f"{path}:{number} repeats id {article_id!r} (first on line {seen[article_id]}); ids must "
                            "be unique so each summary can be traced to its article.")
        seen[article_id] = number
        rows.append({"id": article_id, "article": article})
    if not rows:
        raise DataError(f"data.predict_file {path} holds no articles; put one article per line.")
    return rows
