"""``python main.py plan``: show the parallel layout the planner would choose for a recipe on a cluster.

Nothing is built or loaded but the model's config: this runs on a laptop for any cluster size. ``--verify`` adds a
fake-tensor simulation of the chosen plan's training step at full size (tens of seconds on a CPU, no GPU) and replaces
the choice if the simulation shows it does not fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from llama_ft.errors import ConfigError, PlanError
from llama_ft.parallel.planning.accelerators import accelerator_names
from llama_ft.parallel.planning.planner import PlanPins, PlanResult, plan_parallelism
from llama_ft.parallel.planning.report import format_plan_report, format_verification, plan_result_to_dict
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec, normalize_precision
from llama_ft.presets import load_llama_config
from llama_ft.recipe import load_recipe, section_value

PIN_KEYS = ("tp_size", "dp_shard_size", "dp_replicate_size", "activation_checkpointing", "micro_batch_size",
            "cpu_offload")
AUTO = ("auto", "none", "null", "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py plan",
        description="Predict memory and speed of every parallel layout for a recipe on a cluster and pick one.",
    )
    parser.add_argument("--config", help="recipe YAML (LightningCLI format)")
    parser.add_argument("--model", help="model preset name or LlamaConfig JSON / checkpoint directory")
    parser.add_argument("--nodes", type=int, help="number of nodes (default: trainer.num_nodes or 1)")
    parser.add_argument("--devices", type=int, help="devices per node (default: trainer.devices)")
    parser.add_argument("--gpu", help=f"accelerator: one of {accelerator_names()} (default: detect this machine's)")
    parser.add_argument("--gpu_memory_gib", type=float, help="memory of a device not in the table, GiB")
    parser.add_argument("--gpu_tflops", type=float, help="dense bf16 peak of a device not in the table, TFLOP/s")
    parser.add_argument("--seq_len", type=int, help="sequence length (default: data.max_length)")
    parser.add_argument("--global_batch_size", type=int, help="sequences per optimizer step")
    parser.add_argument("--precision", help="Lightning precision (default: trainer.precision)")
    parser.add_argument("--memory_fraction", type=float, help="usable share of device memory (default 0.9)")
    parser.add_argument("--tp_size", type=int, help="pin the tensor-parallel size")
    parser.add_argument("--dp_shard_size", type=int, help="pin the FSDP shard-group size")
    parser.add_argument("--dp_replicate_size", type=int, help="pin the number of replicas")
    parser.add_argument("--activation_checkpointing", choices=["none", "selective", "full"], help="pin checkpointing")
    parser.add_argument("--micro_batch_size", type=int, help="pin the micro-batch size")
    parser.add_argument("--cpu_offload", choices=["true", "false"], help="force or forbid CPU offload")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    parser.add_argument("--top", type=int, help="candidates to show (text default 10; JSON default all)")
    parser.add_argument("--verify", action="store_true",
                        help="simulate the chosen plan at full size on fake tensors (CPU, ~10-60 s) and print "
                             "predicted vs simulated peak memory; a plan that does not fit is replaced by the next "
                             "candidate that does")
    parser.add_argument("--verify_top", type=int, metavar="K",
                        help="simulate the K best candidates (implies --verify)")
    return parser


def _is_auto(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in AUTO)


def strategy_pins(recipe: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Pins the recipe's ``trainer.strategy`` implies, and whether it is the advanced (planning) strategy."""
    strategy = section_value(recipe, "trainer", "strategy")
    if isinstance(strategy, dict):
        class_path = str(strategy.get("class_path", ""))
        args = strategy.get("init_args") or {}
        pins = {k: args[k] for k in (*PIN_KEYS, "memory_fraction") if k in args and not _is_auto(args[k])}
        return pins, "advanced" in class_path.lower()
    name = str(strategy or "auto").lower()
    if name.startswith("ddp"):
        return {"dp_shard_size": 1, "tp_size": 1}, False
    if name.startswith("fsdp"):
        return {"dp_replicate_size": 1, "tp_size": 1}, False
    return {}, name == "advanced"


def _devices_from_recipe(recipe: dict[str, Any]) -> int | None:
    """An int, a digit string or a device list gives a count; "auto"/-1 leave it to the flag."""
    devices = section_value(recipe, "trainer", "devices")
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    return None


def resolve_model(args: argparse.Namespace, recipe: dict[str, Any], recipe_dir: Path | None
                  ) -> tuple[ModelSpec, LlamaConfig]:
    """Architecture from --model, else model_config, else a local model_name_or_path directory; the config too, which
    the simulation builds the model from."""
    source = args.model or section_value(recipe, "model", "model_config")
    if source is None:
        weights = section_value(recipe, "model", "model_name_or_path")
        if weights is not None and Path(str(weights)).is_dir():
            source = weights
        elif weights is not None:
            raise ConfigError(
                f"the recipe names weights {weights!r} but no model_config, and that is not a local directory; "
                "the hub cannot be read here. Pass --model with a preset name or a config.json path."
            )
    if source is None:
        raise ConfigError("no model: pass --model PRESET_OR_CONFIG_JSON, or --config with model.model_config.")
    text = str(source)
    if recipe_dir is not None and not Path(text).exists() and (recipe_dir / text).exists():
        text = str(recipe_dir / text)  # a path written relative to the recipe file
    name = text if "/" not in text and not text.endswith(".json") else Path(text).stem
    config = load_llama_config(text)
    return ModelSpec.from_llama_config(config, name=name), config


def resolve_train(args: argparse.Namespace, recipe: dict[str, Any]) -> TrainSpec:
    seq_len = args.seq_len or section_value(recipe, "data", "max_length")
    global_batch = args.global_batch_size or section_value(recipe, "data", "global_batch_size")
    if seq_len is None or global_batch is None:
        raise ConfigError(
            "sequence length and global batch size are needed: set data.max_length and data.global_batch_size in "
            "the recipe, or pass --seq_len and --global_batch_size."
        )
    precision = args.precision or section_value(recipe, "trainer", "precision")
    if precision is None:  # Lightning's own default is 32-true; without a recipe assume the usual bf16-mixed
        precision = "32-true" if recipe.get("trainer") else "bf16-mixed"
    return TrainSpec(int(seq_len), int(global_batch), normalize_precision(precision))


def resolve_cluster(args: argparse.Namespace, recipe: dict[str, Any]) -> ClusterSpec:
    nodes = args.nodes or section_value(recipe, "trainer", "num_nodes") or 1
    devices = args.devices or _devices_from_recipe(recipe)
    if devices is None:
        raise ConfigError("devices per node unknown: pass --devices D (or set trainer.devices to a number).")
    if args.gpu_memory_gib or args.gpu_tflops:
        if not (args.gpu_memory_gib and args.gpu_tflops):
            raise ConfigError("a device not in the table needs both --gpu_memory_gib and --gpu_tflops.")
        return ClusterSpec.describe_device(args.gpu_memory_gib, args.gpu_tflops, int(nodes), devices,
                                           name=args.gpu or "custom")
    if args.gpu:
        return ClusterSpec.from_accelerator(args.gpu, int(nodes), devices)
    return ClusterSpec.detect(int(nodes), devices)


def resolve_pins(args: argparse.Namespace, recipe: dict[str, Any]) -> tuple[PlanPins, float]:
    """Strategy pins from the recipe, then flags on top; plus the memory fraction."""
    pins, advanced = strategy_pins(recipe)
    recipe_micro_batch = section_value(recipe, "data", "micro_batch_size")
    if not advanced and isinstance(recipe_micro_batch, int) and "micro_batch_size" not in pins:
        pins["micro_batch_size"] = recipe_micro_batch  # a fixed strategy runs the recipe's micro-batch as written
    for key in PIN_KEYS:
        value = getattr(args, key)
        if value is not None:
            pins[key] = value
    if isinstance(pins.get("cpu_offload"), str):
        pins["cpu_offload"] = pins["cpu_offload"].strip().lower() == "true"
    if isinstance(pins.get("activation_checkpointing"), bool):  # YAML true/false: full or none
        pins["activation_checkpointing"] = "full" if pins["activation_checkpointing"] else "none"
    fraction = args.memory_fraction or pins.pop("memory_fraction", None) or 0.9
    return PlanPins(**{k: pins[k] for k in PIN_KEYS if k in pins}), float(fraction)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        recipe = load_recipe(args.config) if args.config else {}
        recipe_dir = Path(args.config).resolve().parent if args.config else None
        if not args.config and not args.model:
            raise ConfigError("pass --config RECIPE.yaml or --model PRESET_OR_CONFIG_JSON.")
        if args.verify_top is not None and args.verify_top < 1:
            raise ConfigError(f"--verify_top must be >= 1, got {args.verify_top}.")
        model, config = resolve_model(args, recipe, recipe_dir)
        train = resolve_train(args, recipe)
        cluster = resolve_cluster(args, recipe)
        pins, fraction = resolve_pins(args, recipe)
        result = plan_parallelism(model, cluster, train, pins, memory_fraction=fraction)
    except (PlanError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.verify or args.verify_top:
        return print_verified(result, config, args)
    if args.json:
        print(json.dumps(plan_result_to_dict(result, max_candidates=args.top), indent=2))
    else:
        print(format_plan_report(result, top=args.top or 10))
    return 0


def print_verified(result: PlanResult, config: LlamaConfig, args: argparse.Namespace) -> int:
    """Simulate, replace the choice if it does not fit, print; exit 1 when no simulated candidate fits."""
    from llama_ft.parallel.planning.verify import verification_to_dict, verify_plan  # imports torch: only when asked

    verified = verify_plan(result, config, top_k=args.verify_top or 1)
    if args.json:
        data = plan_result_to_dict(verified.result, max_candidates=args.top)
        data["verification"] = verification_to_dict(verified)
        print(json.dumps(data, indent=2))
    else:
        print(format_plan_report(verified.result, top=args.top or 10))
        print()
        print(format_verification(verified))
    refuted = all(check.fits is False for check in verified.verifications)
    return 1 if refuted else 0
