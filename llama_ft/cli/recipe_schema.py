"""The recipe's keys, types and defaults as the LightningCLI parser has them, kept as JSON so ``plan`` can read a
recipe without importing Lightning or torch.

The class signatures stay the one source: ``python -m llama_ft.cli.recipe_schema --write`` derives
``presets/recipe_schema.json`` from the ``plan`` subcommand's parser (Trainer, ``LlamaFineTuner``,
``CNNDailyMailDataModule``, and the advanced strategy's arguments), and a test fails when the file differs from
what the installed classes give. The file is used only under the Lightning and jsonargparse versions it was derived
from (the Trainer's signature is Lightning's; how a signature becomes keys and types is jsonargparse's).

``read_recipe`` turns a recipe file into the sections the LightningCLI path would parse, or None where it cannot be
sure they would be the same (an unknown key, a value outside the plain types of ``recipe_types``, a class it does
not know): the caller then takes the LightningCLI path, which parses the recipe itself.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace, get_loader

from llama_ft.cli.recipe_types import accepts, as_parsed, encode, is_jsonable, takes_classes, takes_text

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "presets" / "recipe_schema.json"
WRITE_COMMAND = "python -m llama_ft.cli.recipe_schema --write"
DERIVED_FROM = ("lightning", "jsonargparse")  # the packages whose versions the schema holds for
STRATEGY_KEY = "trainer.strategy"  # the one class-valued key plan reads; its known classes are in "strategies"
Schema = dict[str, Any]


# --- reading (torch-free) ----------------------------------------------------------------------------------------

def load_schema(path: Path = SCHEMA_PATH) -> Schema | None:
    """The schema, if it was derived under the installed versions of the packages it depends on."""
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
        installed = _versions()
    except (OSError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    return schema if schema.get("versions") == installed else None


def _versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in DERIVED_FROM}


def defaults(schema: Schema) -> Namespace:
    """Every recipe key with its default, as LightningCLI fills a recipe that leaves it out."""
    config = Namespace()
    for key, entry in schema["keys"].items():
        if "default" in entry:
            config[key] = as_parsed(entry["type"], entry["default"])
    return config


def read_recipe(text: str, schema: Schema, base: Namespace) -> Namespace | None:
    """``base`` (``defaults(schema)`` or what earlier arguments set) with the recipe's values on top, or None where
    the LightningCLI path must decide."""
    try:
        recipe = get_loader("yaml")(text)
    except (yaml.YAMLError, ValueError):  # jsonargparse says what is wrong on the other path
        return None
    if not isinstance(recipe, dict):
        return None
    config = base.clone()
    for key, value in _flatten(recipe, schema):
        if key is None:
            return None
        form = schema["keys"][key]["type"]
        if key == STRATEGY_KEY:
            value = value if isinstance(value, str) else _strategy(value, schema)
            if value is None:
                return None
        elif accepts(form, value):
            value = as_parsed(form, value)
        else:
            return None
        config[key] = value
    return config


def read_option(key: str, text: str, schema: Schema, base: Namespace) -> Namespace | None:
    """``base`` with ``--KEY TEXT`` from the command line set, or None where the LightningCLI path must decide.

    jsonargparse reads ``TEXT`` as YAML, but a type that takes text may keep it as written; so a value YAML changes
    (``16``, ``null``, ``on``) is taken only for a type that cannot take text."""
    entry = schema["keys"].get(key)
    if entry is None or takes_classes(entry["type"]):
        return None
    try:
        value = get_loader("yaml")(text)
    except (yaml.YAMLError, ValueError):
        return None
    if (value != text and takes_text(entry["type"])) or not accepts(entry["type"], value):
        return None
    config = base.clone()
    config[key] = as_parsed(entry["type"], value)
    return config


def _flatten(recipe: dict[str, Any], schema: Schema) -> typing.Iterator[tuple[str | None, Any]]:
    """``(dotted key, value)`` for each value the recipe sets; ``(None, None)`` for one the schema lacks."""
    sections = schema["sections"]
    for name, value in recipe.items():
        if name in sections:
            if not isinstance(value, dict):  # a section given as a file name, or null
                yield None, None
                return
            for key, item in value.items():
                dotted = f"{name}.{key}"
                yield (dotted if dotted in schema["keys"] else None), item
        else:
            yield (name if name in schema["keys"] and "." not in name else None), value


def _strategy(value: Any, schema: Schema) -> Namespace | None:
    """A ``class_path``/``init_args`` strategy of a class the schema knows, as jsonargparse parses it; else None."""
    if not isinstance(value, dict) or not set(value) <= {"class_path", "init_args"}:
        return None
    for strategy in schema["strategies"].values():
        class_path = strategy["class_paths"].get(value.get("class_path"))
        if class_path is None:
            continue
        given, arguments = value.get("init_args") or {}, {"dataclass": strategy["init_args"]}  # fields, as a form
        return Namespace(class_path=class_path, init_args=as_parsed(arguments, given)) if accepts(
            arguments, given) else None
    return None


# --- deriving (imports Lightning) --------------------------------------------------------------------------------

def build_schema() -> Schema:
    """Derive the schema from the ``plan`` subcommand's parser and the advanced strategy's signature."""
    from jsonargparse._typehints import ActionTypeHint

    from llama_ft.cli import fast_plan
    from llama_ft.parallel.applying.strategy import AdvancedParallelStrategy

    parser = _plan_parser()
    own = {action.dest for action in fast_plan.build_parser()._actions}
    keys = {}
    for action in parser._actions:
        if isinstance(action, ActionTypeHint) and action.dest not in own:
            keys[action.dest] = _entry(action._typehint, action.default)
    sections = sorted({key.split(".")[0] for key in keys if "." in key})
    return {
        "generated_by": WRITE_COMMAND,
        "versions": _versions(),
        "sections": sections,
        "keys": keys,
        "strategies": {AdvancedParallelStrategy.__name__: _strategy_entry(AdvancedParallelStrategy)},
    }


def _entry(hint: Any, default: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": encode(hint)}
    if is_jsonable(default):
        entry["default"] = list(default) if isinstance(default, tuple) else default
    return entry


def _strategy_entry(cls: type) -> dict[str, Any]:
    """The class paths jsonargparse accepts for ``cls`` (each package that exports it; the bare name resolves to
    the shortest) and its ``__init__`` arguments."""
    homes = cls.__module__.split(".")
    paths = [f"{'.'.join(homes[:i])}.{cls.__name__}" for i in range(1, len(homes) + 1)
             if getattr(importlib.import_module(".".join(homes[:i])), cls.__name__, None) is cls]
    class_paths = {path: path for path in paths} | {cls.__name__: min(paths, key=len)}
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {"class_paths": class_paths,
            "init_args": {p.name: _entry(hints[p.name], p.default) for p in parameters}}


def _plan_parser() -> Any:
    """The ``plan`` subcommand's parser, built as the program builds it, without parsing anything."""
    from llama_ft.cli.lightning_cli import LlamaCLI

    class Built(Exception):
        pass

    class ParsersOnly(LlamaCLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            raise Built(self._subcommand_parsers["plan"])

    try:
        ParsersOnly(args=[])
    except Built as built:
        return built.args[0]
    raise RuntimeError("LlamaCLI parsed without building its parsers")


def schema_text(schema: Schema) -> str:
    return json.dumps(schema, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--write", action="store_true", help=f"write {SCHEMA_PATH.name} (else: say whether it is current)")
    args = cli.parse_args(argv)
    text = schema_text(build_schema())
    if args.write:
        SCHEMA_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {SCHEMA_PATH}")
        return 0
    current = SCHEMA_PATH.is_file() and SCHEMA_PATH.read_text(encoding="utf-8") == text
    print(f"{SCHEMA_PATH.name} is {'current' if current else 'out of date: run ' + WRITE_COMMAND}")
    return 0 if current else 1


if __name__ == "__main__":
    sys.exit(main())
