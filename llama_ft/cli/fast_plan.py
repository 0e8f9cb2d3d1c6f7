"""``llama-ft plan`` without Lightning or torch: the same plan as the LightningCLI path, in a fraction of the time.

``plan`` reads only a few recipe values; what LightningCLI would parse from a recipe and class keys (or fill in from
the classes' defaults) comes here from ``recipe_schema``, the recipe keys, types and defaults derived from the same
parser. A command line with at most one ``--config`` recipe, class keys (``--data.max_length 2048``), the ``--model
NAME`` shorthand and the plan's own options is answered here when every key is one the parser has and every value
passes its type; anything else (an unknown key or value, a class or dataclass given on the command line, a class
the schema does not know, several recipes, ``--help``, ``--verify``, which imports torch anyway, or a Lightning
other than the schema's) takes the LightningCLI path, which parses it itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from llama_ft.cli import plan, recipe_schema
from llama_ft.cli.usage import OneLineErrors, report
from llama_ft.errors import LlamaFTError

SLOW_OPTIONS = ("--verify", "--verify_top")  # the simulation imports torch: nothing to gain
CONFIG_FLAGS = ("--config", "-c")


class PlanParser(OneLineErrors, ArgumentParser):
    """The plan options alone, refusing bad values in one line as the LightningCLI subcommand does."""


def build_parser() -> ArgumentParser:
    """The plan subcommand's own options, under the prog name the LightningCLI subcommand has (same messages)."""
    parser = PlanParser(prog=f"{Path(sys.argv[0]).name} plan", description=plan.DESCRIPTION)
    plan.add_arguments(parser)
    return parser


def own_options(parser: ArgumentParser) -> set[str]:
    """The option strings ``plan.add_arguments`` defined, but the slow ones."""
    options = {s for action in parser._actions for s in action.option_strings}  # argparse's list of options
    return options - {"-h", "--help", *SLOW_OPTIONS}


def split(args: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """The recipe arguments in command-line order and the plan's own options: ``("--config", FILE)``, and
    ``(KEY, VALUE)`` for a class key (``--data.max_length 2048``) or the ``--model NAME`` shorthand."""
    recipe, rest = [], []
    items = iter(args)
    for arg in items:
        flag, eq, value = arg.partition("=")
        if flag in CONFIG_FLAGS or flag in plan.SHORTHANDS or (flag.startswith("--") and "." in flag):
            key = plan.SHORTHANDS.get(flag, flag).removeprefix("--")
            recipe.append(("--config" if flag in CONFIG_FLAGS else key, value if eq else next(items, "")))
        else:
            rest.append(arg)
    return recipe, rest


def handles(argv: list[str], parser: ArgumentParser) -> bool:
    """Whether ``argv`` is ``plan`` with the plan's own options, at most one ``--config``, class keys and the
    ``--model NAME`` shorthand (a YAML value there is the model section's recipe, so it is not)."""
    if not argv or argv[0] != "plan":
        return False
    recipe, rest = split(argv[1:])
    allowed = own_options(parser)
    section_files = [v for k, v in recipe if k == "model.model_config" and v.endswith((".yaml", ".yml"))]
    return (sum(key == "--config" for key, _ in recipe) <= 1 and not section_files
            and all(arg.partition("=")[0] in allowed for arg in rest if arg.startswith("-")))


def read_recipe(recipe: list[tuple[str, str]], schema: recipe_schema.Schema) -> Namespace | None:
    """The recipe sections LightningCLI would parse from these arguments, in their order; None where it must."""
    config: Namespace | None = recipe_schema.defaults(schema)
    for key, value in recipe:
        if config is None:
            return None
        if key != "--config":
            config = recipe_schema.read_option(key, value, schema, config)
            continue
        path = Path(value)
        try:  # a regular file only (jsonargparse also takes YAML text here, and a device would never end)
            text = path.read_text(encoding="utf-8") if path.is_file() else None
        except (OSError, ValueError):
            text = None
        config = None if text is None else recipe_schema.read_recipe(text, schema, config)
    return config


def parse(argv: list[str], parser: ArgumentParser, schema: recipe_schema.Schema) -> Namespace | None:
    """The plan options with the recipe's sections, as the LightningCLI path parses them; None where it must."""
    recipe, rest = split(argv[1:])
    sections = read_recipe(recipe, schema)
    if sections is None:
        return None
    config = parser.parse_args(rest)
    for name, value in vars(sections).items():  # the top-level keys: sections and recipe-wide settings
        config[name] = value
    return config


def main(argv: list[str]) -> int | None:
    """Plan ``argv`` here and return the exit status, or None when it needs the LightningCLI path."""
    parser = build_parser()
    schema = recipe_schema.load_schema()
    if schema is None or not handles(argv, parser):
        return None
    try:
        config = parse(argv, parser, schema)
        return None if config is None else plan.run(config, argv[1:])
    except LlamaFTError as err:
        return report(err)
