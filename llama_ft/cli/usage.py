"""Command-line mistakes as one line: jsonargparse reports a bad option with the whole usage block and a nested,
multi-line explanation; the user needs the key, the value and what it must be."""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

from jsonargparse import ArgumentParser

from llama_ft.errors import ConfigError

_KEY = re.compile(r'Parser key "([^"]+)"')
_VALUE = re.compile(r"(?:Got value|Given value): (.*)$", re.MULTILINE)
_BOUND = re.compile(r"\b(?:gt|ge|lt|le)=([-\w.]+)\)")
_NOISE = ("For further information", "Subtypes:", "Errors:", "Given value", "Got value", "Does not validate",
          "Expected a <class 'NoneType'>")


class UsageError(ConfigError):
    """A command line or recipe the parser refuses (wrong type, out of range, unknown key)."""


def one_line(message: str, prog: str) -> str:
    """``--key=value: reason``, then where to look up the accepted values."""
    key = _KEY.search(message)
    value = _VALUE.findall(message)
    reasons = [
        line.strip(" -") for line in message.splitlines()[1:]
        if line.strip() and not line.strip(" -").startswith(_NOISE) and "validation error for" not in line
    ]
    if key is None:
        head = " ".join(message.split())
    elif not reasons:  # a one-line report, e.g. 'Parser key "config": File does not exist: ...'
        head = f"--{key.group(1)}: {' '.join(message[key.end():].lstrip(': ').split())}".rstrip(".")
    else:
        reason = re.sub(r"\s*\[type=.*?\]", "", reasons[0]).split(". Got value:")[0]
        reason = re.sub(r"<class '(\w+)'>", r"\1", reason)
        reason = re.sub(r"Expected a typing\.Literal\[(.*)\]", r"expected one of \1", reason)
        reason = re.sub(r"Expected a (\w+)$", r"expected type \1", reason)
        bound = _BOUND.search(message)
        if reason.endswith((" than", " to")) and bound:  # inside a Union, jsonargparse drops the bound from the text
            reason += f" {bound.group(1)}"
        head = f"--{key.group(1)}={value[-1].strip() if value else '?'}: {reason.rstrip('.')}"
    return f"{head}. Run `{prog} --help` for the accepted options and values."


class OneLineErrors:
    """Mixed into the program's parsers: a refused command line ends as a ``UsageError`` (one line, exit 2 in
    ``main``).

    Parsers that jsonargparse uses internally to try alternatives (``exit_on_error=False``) keep raising its own
    ``ArgumentError``, which it catches; ``--help`` is not an error and is untouched.
    """

    exit_on_error: bool
    prog: str

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            ArgumentParser.error(self, message, ex)  # type: ignore[arg-type]
        prog = getattr(ex, "subcommand_parser", None) or self
        raise UsageError(one_line(message, prog.prog.replace(" [options]", ""))) from ex


def report(err: Exception, speak: bool = True) -> int:
    """Exit status 2 for input that cannot work, with ``error: <message>`` on stderr where ``speak`` (one process of
    many says it); LLAMA_FT_DEBUG=1 re-raises instead, for the traceback."""
    if os.environ.get("LLAMA_FT_DEBUG") == "1":
        raise err
    if speak:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2
