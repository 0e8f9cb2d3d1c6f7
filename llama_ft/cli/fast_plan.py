"""``llama-ft plan`` for a cluster named on the command line alone: the same plan, without Lightning or torch.

With no recipe (no ``--config``, no class key such as ``--trainer.precision``), everything ``plan`` reads from the
LightningCLI parser is a class default; ``llama_ft.defaults`` holds those, so this path parses the plan's own options
(``plan.add_arguments``, the subcommand's definitions) with a plain jsonargparse parser and prints what the
LightningCLI path would, in a fraction of the time. Anything else (a recipe, a class key, ``--help``, ``--verify``,
which imports torch anyway) takes the LightningCLI path.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from llama_ft import defaults
from llama_ft.cli import plan
from llama_ft.cli.usage import OneLineErrors, report
from llama_ft.errors import LlamaFTError

SLOW_OPTIONS = ("--verify", "--verify_top")  # the simulation imports torch: nothing to gain


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


def handles(argv: list[str], parser: ArgumentParser) -> bool:
    """Whether ``argv`` is ``plan`` with only the plan's own options and the ``--model NAME`` shorthand (a YAML
    value there is the model section's recipe, so it is not)."""
    if not argv or argv[0] != "plan":
        return False
    allowed = own_options(parser)
    args = argv[1:]
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            continue  # a value
        flag, eq, value = arg.partition("=")
        if flag in plan.SHORTHANDS:
            value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            if value.endswith((".yaml", ".yml")):
                return False
        elif flag not in allowed:
            return False
    return True


def with_recipe_defaults(config: Namespace, model: str | None) -> Namespace:
    """Add the sections ``plan`` reads from a recipe, as LightningCLI fills them with no recipe: class defaults."""
    config.model = Namespace(model_config=model, model_name_or_path=None, lora=None)
    config.data = Namespace(dataset=defaults.DATASET, max_length=defaults.MAX_LENGTH,
                            global_batch_size=defaults.GLOBAL_BATCH_SIZE, micro_batch_size=defaults.MICRO_BATCH_SIZE,
                            batching=defaults.BATCHING)
    config.trainer = Namespace(**defaults.TRAINER_ARGUMENTS)
    return config


def parse(argv: list[str], parser: ArgumentParser) -> Namespace:
    """The plan options, and ``--model NAME`` as the model section's ``model_config``."""
    model, rest = None, []
    args = iter(argv[1:])
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in plan.SHORTHANDS:
            model = value if eq else next(args, None)
        else:
            rest.append(arg)
    return with_recipe_defaults(parser.parse_args(rest), model)


def main(argv: list[str]) -> int | None:
    """Plan ``argv`` here and return the exit status, or None when it needs the LightningCLI path."""
    parser = build_parser()
    if not handles(argv, parser):
        return None
    try:
        return plan.run(parse(argv, parser), argv[1:])
    except LlamaFTError as err:
        return report(err)
