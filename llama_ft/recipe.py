"""Read a LightningCLI recipe YAML as plain data, for the commands that plan, submit or export without running it.

Recipes may spell a section as ``model: {key: v}`` or ``model: {init_args: {key: v}}``; both are accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llama_ft.errors import ConfigError


def load_recipe(path: str) -> dict[str, Any]:
    """Read a recipe YAML as plain data; nothing in it is executed."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"recipe {path!r} does not exist; pass a LightningCLI YAML such as configs/default.yaml.")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path!r} must be a YAML mapping with model/data/trainer sections.")
    return data


def section_value(recipe: dict[str, Any], section: str, key: str) -> Any:
    """``recipe[section][key]`` or ``recipe[section]["init_args"][key]``, whichever the YAML uses; None if neither."""
    block = recipe.get(section)
    if not isinstance(block, dict):
        return None
    if key in block:
        return block[key]
    init_args = block.get("init_args")
    return init_args.get(key) if isinstance(init_args, dict) else None
