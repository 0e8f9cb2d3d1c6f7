"""A JSON form of the recipe's type hints, and a strict check of YAML values against it (no torch, no Lightning).

``recipe_schema`` writes each key's type hint in this form; ``fast_plan`` checks a recipe's values with it. The check
is deliberately narrower than jsonargparse's: a value it accepts is one jsonargparse accepts and keeps as it is
(or, for a float, converts exactly); anything else is left to jsonargparse (the LightningCLI path), which either
accepts it or says what is wrong. Types that are classes (callbacks, loggers, plugins) are ``"opaque"``: they are
not checked here, because checking them means importing them.

Forms: ``"none"``, ``"bool"``, ``"int"``, ``"float"``, ``"str"``, ``"path"``, ``"opaque"``, ``{"literal": [...]}``,
``{"union": [...]}``, ``{"list": FORM}``, ``{"tuple": [FORM, ...]}``, ``{"bounded": "int"|"float", "gt"|"ge"|"lt"|"le":
number}``, ``{"dataclass": {field: {"type": FORM, "default": value}}}``.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import pathlib
import types
import typing
from typing import Any

from jsonargparse import Namespace

TypeForm = str | dict[str, Any]
_PLAIN = {type(None): "none", bool: "bool", int: "int", float: "float", str: "str", pathlib.Path: "path"}
_BOUNDS = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}


def encode(hint: Any) -> TypeForm:
    """The form of a type hint as jsonargparse sees it (``Annotated`` bounds from annotated_types included)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and hint in _PLAIN:
        return _PLAIN[hint]
    if origin is typing.Literal and all(_is_json_scalar(a) for a in args):
        return {"literal": list(args)}
    if origin in (typing.Union, types.UnionType):
        return {"union": [encode(a) for a in args]}
    if origin is typing.Annotated:
        return _bounded(args[0], args[1:])
    if origin is list and len(args) == 1:
        return {"list": encode(args[0])}
    if origin is tuple and args and Ellipsis not in args:
        return {"tuple": [encode(a) for a in args]}
    if dataclasses.is_dataclass(hint):
        return {"dataclass": encode_fields(hint)}
    return "opaque"


def encode_fields(cls: type) -> dict[str, dict[str, Any]]:
    """A dataclass's fields: each one's form and default (from ``default_factory`` when it has one)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {}
    for field in dataclasses.fields(cls):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        fields[field.name] = {"type": encode(hints[field.name]), "default": default}
    return fields


def _bounded(base: Any, metadata: tuple[Any, ...]) -> TypeForm:
    """``Annotated[int | float, Gt(...), ...]`` with annotated_types bounds; anything else is opaque."""
    if base not in (int, float):
        return "opaque"
    form: dict[str, Any] = {"bounded": _PLAIN[base]}
    for item in metadata:
        bounds = {name: getattr(item, name, None) for name in _BOUNDS}
        if not any(value is not None for value in bounds.values()):
            return "opaque"  # a constraint other than a bound
        form.update({name: value for name, value in bounds.items() if value is not None})
    return form


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _kind(form: dict[str, Any]) -> tuple[str, Any]:
    """A dict form's kind and argument (a bounded form also holds its bounds)."""
    kind = next(k for k in ("literal", "union", "list", "tuple", "bounded", "dataclass") if k in form)
    return kind, form[kind]


def is_jsonable(value: Any) -> bool:
    """Whether a default survives a JSON round trip unchanged (tuples become lists, which YAML gives anyway)."""
    try:
        return json.loads(json.dumps(value)) == (list(value) if isinstance(value, tuple) else value)
    except (TypeError, ValueError):
        return False


def accepts(form: TypeForm, value: Any) -> bool:
    """Whether ``value`` (as YAML loaded it) surely passes jsonargparse's check of the hint ``form`` stands for;
    ``"opaque"`` is not checked here and always passes."""
    if isinstance(form, str):
        return _accepts_plain(form, value)
    kind, arg = _kind(form)
    if kind == "literal":
        return any(type(value) is type(choice) and value == choice for choice in arg)
    if kind == "union":
        return any(accepts(member, value) for member in arg)
    if kind == "list":
        return isinstance(value, list) and all(accepts(arg, item) for item in value)
    if kind == "tuple":
        return isinstance(value, list) and len(value) == len(arg) and all(map(accepts, arg, value))
    if kind == "bounded":
        return _accepts_plain(arg, value) and all(
            _BOUNDS[name](value, bound) for name, bound in form.items() if name in _BOUNDS
        )
    if kind == "dataclass":
        return isinstance(value, dict) and all(
            key in arg and accepts(arg[key]["type"], item) for key, item in value.items()
        )
    raise ValueError(f"unknown type form {form!r}")


def as_parsed(form: TypeForm, value: Any) -> Any:
    """An accepted value as jsonargparse keeps it: floats as floats, tuples as tuples, a dataclass (or a class's
    ``init_args``) as a Namespace of its fields, defaults filled; a union converts as its first member that accepts
    the value."""
    if form == "float" or (isinstance(form, dict) and form.get("bounded") == "float"):
        return float(value)
    if not isinstance(form, dict):
        return value
    kind, arg = _kind(form)
    if kind == "union":
        return as_parsed(next(member for member in arg if accepts(member, value)), value)
    if kind == "list":
        return [as_parsed(arg, item) for item in value]
    if kind == "tuple":
        return tuple(map(as_parsed, arg, value))
    if kind == "dataclass":  # a field without a JSON default (and not given) is left out
        return Namespace(**{name: as_parsed(field["type"], value[name] if name in value else field["default"])
                            for name, field in arg.items() if name in value or "default" in field})
    return value


def members(form: TypeForm) -> list[TypeForm]:
    """The form and every form inside it (union members, list items, tuple items, dataclass fields)."""
    found = [form]
    if isinstance(form, dict):
        kind, arg = _kind(form)
        inner = {"union": lambda: arg, "list": lambda: [arg], "tuple": lambda: arg,
                 "dataclass": lambda: [field["type"] for field in arg.values()]}.get(kind, lambda: [])()
        for item in inner:
            found += members(item)
    return found


def takes_text(form: TypeForm) -> bool:
    """Whether a string may be kept as written (``str``, a path, or a literal string)."""
    return any(m in ("str", "path") or (isinstance(m, dict) and any(isinstance(c, str) for c in m.get("literal", [])))
               for m in members(form))


def takes_classes(form: TypeForm) -> bool:
    """Whether the type names classes or a dataclass, whose spellings (``class_path``, nested keys) are
    jsonargparse's."""
    return any(m == "opaque" or (isinstance(m, dict) and "dataclass" in m) for m in members(form))


def _accepts_plain(name: str, value: Any) -> bool:
    if name == "opaque":
        return True
    if name == "none":
        return value is None
    if name == "bool":
        return isinstance(value, bool)
    if name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in ("str", "path"):
        return isinstance(value, str)
    raise ValueError(f"unknown type form {name!r}")
