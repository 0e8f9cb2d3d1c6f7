"""The JSON form of recipe type hints (``llama_ft.cli.recipe_types``): encoded from the hints jsonargparse sees, and a
check that accepts only values jsonargparse accepts and keeps alike."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from jsonargparse import Namespace

from llama_ft.cli.recipe_types import accepts, as_parsed, encode, is_jsonable, takes_classes, takes_text
from llama_ft.lora import LoraSettings
from llama_ft.ranges import NonNegativeInt, OpenFraction, PositiveInt


@pytest.mark.parametrize(("hint", "form"), [
    (int, "int"),
    (str | None, {"union": ["str", "none"]}),
    (Path, "path"),
    (PositiveInt, {"bounded": "int", "gt": 0}),
    (NonNegativeInt | None, {"union": [{"bounded": "int", "ge": 0}, "none"]}),
    (Literal["a", 1], {"literal": ["a", 1]}),
    (list[int], {"list": "int"}),
    (tuple[float, float], {"tuple": ["float", "float"]}),
    (dict[str, int], "opaque"),
    (Namespace, "opaque"),
])
def test_encode(hint, form):
    assert encode(hint) == form


def test_encode_a_dataclass_with_its_defaults():
    fields = encode(LoraSettings | None)["union"][0]["dataclass"]
    assert fields["r"] == {"type": "int", "default": 8}
    assert fields["target_modules"] == {"type": {"list": "str"}, "default": ["q_proj", "v_proj"]}


@pytest.mark.parametrize(("hint", "value", "accepted"), [
    (int, 3, True), (int, True, False), (int, 3.0, False), (int, "3", False),
    (float, 3, True), (float, False, False),
    (PositiveInt, 1, True), (PositiveInt, 0, False),
    (OpenFraction, 1.0, False), (OpenFraction, 0.5, True),
    (Literal[1, "x"], True, False), (Literal[1, "x"], 1, True), (Literal[1, "x"], "y", False),
    (str | None, None, True), (str, 5, False),
    (list[int], [1, 2], True), (list[int], [1, "2"], False), (list[int], (1, 2), False),
    (tuple[float, float], [0, 0.5], True), (tuple[float, float], [0], False),
    (LoraSettings | None, {"r": 4}, True), (LoraSettings | None, {"rank": 4}, False),
    (LoraSettings | None, {"r": "4"}, False),
    (dict[str, int], {"anything": object()}, True),  # opaque: left to jsonargparse on the LightningCLI path
])
def test_accepts(hint, value, accepted):
    assert accepts(encode(hint), value) is accepted


def test_as_parsed_converts_as_jsonargparse_keeps_values():
    assert as_parsed(encode(tuple[float, float]), [0, 1]) == (0.0, 1.0)
    assert isinstance(as_parsed(encode(float | None), 2), float)
    assert as_parsed(encode(int | float), 2) == 2 and isinstance(as_parsed(encode(int | float), 2), int)
    lora = as_parsed(encode(LoraSettings | None), {"r": 4})
    assert lora == Namespace(r=4, alpha=16.0, dropout=0.05, target_modules=["q_proj", "v_proj"])


def test_is_jsonable():
    assert is_jsonable((0.9, 0.999)) and is_jsonable(None) and not is_jsonable(Path("x"))


@pytest.mark.parametrize(("hint", "text", "classes"), [
    (int | None, False, False),
    (PositiveInt, False, False),
    (Literal[64, 32, "bf16-mixed"] | None, True, False),  # Lightning's precision: "16" could stay text
    (list[int] | str | int, True, False),
    (Path | None, True, False),
    (LoraSettings | None, True, True),  # its target_modules are strings; the fields are a dataclass's
    (dict[str, int] | None, False, True),
])
def test_what_a_command_line_value_may_mean(hint, text, classes):
    """A value YAML would change is taken only where no text could be kept; classes are left to jsonargparse."""
    form = encode(hint)
    assert takes_text(form) is text and takes_classes(form) is classes
