"""``llama-ft plan``: the parallel layout the planner would choose for a recipe on a cluster you may not have.

Nothing is built or loaded but the model's config, so this runs on a laptop for any cluster size. The recipe is
parsed by the same classes as ``fit``; the flags below describe the cluster and override the recipe's sequence
length, global batch, precision and strategy pins. Without a recipe, ``fast_plan`` parses the same flags without
Lightning. ``--verify`` adds a fake-tensor simulation of the chosen plan's
training step at full size (tens of seconds on a CPU, no GPU) and replaces the choice if it does not fit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import PositiveFloat, PositiveInt, restricted_number_type

from llama_ft.data.lengths import expected_row_tokens
from llama_ft.errors import ConfigError
from llama_ft.parallel.planning.accelerators import accelerator_names
from llama_ft.parallel.planning.planner import DEFAULT_MEMORY_FRACTION, PlanPins, PlanResult, plan_parallelism
from llama_ft.parallel.planning.report import format_plan_report, format_verification, plan_result_to_dict
from llama_ft.parallel.planning.specs import ClusterSpec, LoraSpec, ModelSpec, TrainSpec, normalize_precision
from llama_ft.presets import llama_config_from_dict, resolve_config_dict

if TYPE_CHECKING:
    from transformers import LlamaConfig

DESCRIPTION = "Predict memory and speed of every parallel layout for a recipe on a cluster, and pick one."
PIN_KEYS = ("tp_size", "dp_shard_size", "dp_replicate_size", "activation_checkpointing", "micro_batch_size",
            "cpu_offload")
# ``--model NAME`` is the shorthand users expect; the recipe key it stands for is the one ``fit`` reads.
SHORTHANDS = {"--model": "--model.model_config"}
UsableFraction = restricted_number_type("UsableFraction", float, [(">", 0.0), ("<=", 1.0)])


def add_arguments(parser: ArgumentParser) -> None:
    """The cluster to plan for, overrides of the recipe, pins and output form (the subcommand's and the fast
    path's)."""
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--nodes", type=PositiveInt | None, help="nodes (default: trainer.num_nodes)")
    cluster.add_argument("--devices", type=PositiveInt | None, help="devices per node (default: trainer.devices)")
    cluster.add_argument("--gpu", type=str | None, help=f"one of {accelerator_names()} (default: this machine's)")
    cluster.add_argument("--gpu_memory_gib", type=PositiveFloat | None, help="memory of a device not in the table")
    cluster.add_argument("--gpu_tflops", type=PositiveFloat | None, help="dense bf16 peak of a device not in the table")
    cluster.add_argument("--inter_node_gbps", type=PositiveFloat | None,
                         help="NIC bandwidth of one node in Gb/s, all NICs together (e.g. 8 × 400 = 3200; default: "
                              "the device table's, one 400 Gb/s NIC per H100, 200 Gb/s per A100)")
    recipe = parser.add_argument_group("overrides of the recipe")
    recipe.add_argument("--seq_len", type=PositiveInt | None, help="sequence length (default: data.max_length)")
    recipe.add_argument("--global_batch_size", type=PositiveInt | None, help="default: data.global_batch_size")
    recipe.add_argument("--precision", type=str | None, help="default: trainer.precision")
    recipe.add_argument("--memory_fraction", type=UsableFraction | None,
                        help=f"usable share of device memory, in (0, 1] (default {DEFAULT_MEMORY_FRACTION})")
    recipe.add_argument("--tp_size", type=PositiveInt | None, help="pin the tensor-parallel size")
    recipe.add_argument("--dp_shard_size", type=PositiveInt | None, help="pin the FSDP shard-group size")
    recipe.add_argument("--dp_replicate_size", type=PositiveInt | None, help="pin the number of replicas")
    recipe.add_argument("--activation_checkpointing", type=Literal["none", "selective", "full"] | None,
                        help="pin activation checkpointing")
    recipe.add_argument("--micro_batch_size", type=PositiveInt | None, help="pin the micro-batch size")
    recipe.add_argument("--cpu_offload", type=bool | None, help="force (true) or forbid (false) CPU offload")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    output.add_argument("--plot", type=Path | None,
                        help="also draw memory by part and predicted tokens/s of the top candidates to this PNG")
    output.add_argument("--top", type=PositiveInt | None, help="candidates to show (text default 10; JSON all)")
    output.add_argument("--verify", action="store_true",
                        help="simulate the chosen plan at full size on fake tensors (CPU, ~10-60 s); a plan that "
                             "does not fit is replaced by the next candidate that does")
    output.add_argument("--verify_top", type=PositiveInt | None,
                        help="simulate the K best candidates (implies --verify)")


def _is_auto(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() == "auto")


def strategy_pins(strategy: Any) -> tuple[dict[str, Any], bool]:
    """The pins a parsed ``trainer.strategy`` implies, and whether that strategy runs the recipe's own micro-batch
    (a fixed strategy such as ``ddp`` or ``fsdp`` does; ``advanced`` and ``auto`` leave it to the plan)."""
    if isinstance(strategy, Namespace):
        args = strategy.get("init_args") or Namespace()
        pins = {k: args[k] for k in (*PIN_KEYS, "memory_fraction") if k in args and not _is_auto(args[k])}
        return pins, "advanced" not in str(strategy.get("class_path", "")).lower()
    name = str(strategy or "auto").lower()
    if name.startswith("ddp"):
        return {"dp_shard_size": 1, "tp_size": 1}, True
    if name.startswith("fsdp"):
        return {"dp_replicate_size": 1, "tp_size": 1}, True
    return {}, False


def resolve_model(config: Namespace) -> tuple[ModelSpec, dict[str, Any]]:
    """The architecture from the model section (``--model NAME`` is shorthand for ``--model.model_config``), and
    the config dict it came from."""
    source = config.model.model_config or config.model.model_name_or_path
    if source is None:
        raise ConfigError("no model: pass --model PRESET_OR_CONFIG_JSON, or --config with model.model_config.")
    llama = resolve_config_dict(config.model.model_config, config.model.model_name_or_path)
    text = str(source)
    name = text if "/" not in text and not text.endswith(".json") else Path(text).stem
    return ModelSpec.from_config_dict(llama, name=name), llama


def resolve_train(config: Namespace, cluster: ClusterSpec) -> TrainSpec:
    """The recipe's sizes; real tokens per row follow the data's batching mode (``llama_ft.data.lengths``); AdamW
    runs fused on GPUs and foreach on CPUs (as ``LlamaFineTuner`` configures it)."""
    precision = config.precision or config.trainer.precision  # None: the Trainer's default
    seq_len = config.seq_len or config.data.max_length
    rows = expected_row_tokens(str(config.data.dataset), str(config.data.batching), seq_len)
    lora = config.model.get("lora")  # a Namespace of LoraSettings' fields, or None (full fine-tuning)
    return TrainSpec(seq_len, config.global_batch_size or config.data.global_batch_size,
                     normalize_precision(precision), mean_tokens_per_row=rows.mean,
                     pads_to_max=rows.pads_to_max,
                     lora=None if lora is None else LoraSpec(lora.r, tuple(lora.target_modules), lora.dropout),
                     fused_optimizer=cluster.accelerator != "cpu")


def _devices(value: Any) -> int | None:
    """An int, a digit string or a device list gives a count; "auto"/-1 leave it to ``--devices``."""
    if isinstance(value, list):
        return len(value)
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str) and value.strip().isdigit() and int(value) > 0:
        return int(value)
    return None


def recipe_cluster(strategy: Any) -> dict[str, Any]:
    """The device and network the recipe's advanced strategy describes (its ``accelerator_name``,
    ``device_memory_gib``, ``peak_tflops``, ``inter_node_gbps``), as ``fit`` would plan with them."""
    if not isinstance(strategy, Namespace) or "advanced" not in str(strategy.get("class_path", "")).lower():
        return {}
    args = strategy.get("init_args") or Namespace()
    keys = ("accelerator_name", "device_memory_gib", "peak_tflops", "inter_node_gbps")
    return {key: args[key] for key in keys if key in args and args[key] is not None}


def resolve_cluster(config: Namespace) -> ClusterSpec:
    """The cluster from the flags; where they name no device or network, the recipe's strategy description."""
    nodes = config.nodes or config.trainer.num_nodes
    devices = config.devices or _devices(config.trainer.devices)
    if devices is None:
        raise ConfigError(f"devices per node unknown (trainer.devices is {config.trainer.devices!r}): pass "
                          "--devices D.")
    recipe = recipe_cluster(config.trainer.strategy)
    gpu, memory, tflops = config.gpu, config.gpu_memory_gib, config.gpu_tflops
    if not (gpu or memory or tflops):  # no device flag: the one the recipe describes, if any
        gpu, memory, tflops = (recipe.get(k) for k in ("accelerator_name", "device_memory_gib", "peak_tflops"))
    if memory or tflops:
        if not (memory and tflops):
            raise ConfigError("a device not in the table needs both its memory and its peak: --gpu_memory_gib and "
                              "--gpu_tflops (or the strategy's device_memory_gib and peak_tflops).")
        cluster = ClusterSpec.describe_device(memory, tflops, nodes, devices, name=gpu or "custom")
    elif gpu:
        cluster = ClusterSpec.from_accelerator(gpu, nodes, devices)
    else:
        cluster = ClusterSpec.detect(nodes, devices)
    gbps = config.inter_node_gbps if config.inter_node_gbps is not None else recipe.get("inter_node_gbps")
    return cluster if gbps is None else cluster.with_node_network(gbps)


def resolve_pins(config: Namespace) -> tuple[PlanPins, float | None]:
    """Strategy pins from the recipe, then flags on top; plus the memory fraction if one is given."""
    pins, fixed_micro_batch = strategy_pins(config.trainer.strategy)
    if fixed_micro_batch and "micro_batch_size" not in pins:
        pins["micro_batch_size"] = config.data.micro_batch_size  # a fixed strategy runs the recipe's micro-batch
    pins.update({key: config[key] for key in PIN_KEYS if config[key] is not None})
    if isinstance(pins.get("activation_checkpointing"), bool):  # YAML true/false: full or none
        pins["activation_checkpointing"] = "full" if pins["activation_checkpointing"] else "none"
    fraction = config.memory_fraction or pins.pop("memory_fraction", None)
    return PlanPins(**{k: pins[k] for k in PIN_KEYS if k in pins}), fraction


def run(config: Namespace, argv: list[str]) -> int:
    """Plan and print; exit 1 when ``--verify`` refutes every candidate (input that cannot work raises)."""
    if config.plot:
        from llama_ft.parallel.planning.plot import check_plot_path  # matplotlib only when a picture is asked for

        check_plot_path(config.plot)
    model, llama = resolve_model(config)
    pins, fraction = resolve_pins(config)
    fraction_kwargs = {} if fraction is None else {"memory_fraction": float(fraction)}
    cluster = resolve_cluster(config)
    result = plan_parallelism(model, cluster, resolve_train(config, cluster), pins, **fraction_kwargs)
    if config.verify or config.verify_top:
        status, result = print_verified(result, llama_config_from_dict(llama), config)
    elif config.json:
        print(json.dumps(plan_result_to_dict(result, max_candidates=config.top), indent=2))
        status = 0
    else:
        print(format_plan_report(result, top=config.top or 10))
        status = 0
    if config.plot:
        from llama_ft.parallel.planning.plot import plot_plan

        plot_plan(result, config.plot)
    return status


def print_verified(result: PlanResult, llama: LlamaConfig, config: Namespace) -> tuple[int, PlanResult]:
    """Simulate, replace the choice if it does not fit, print; exit status 1 when no simulated candidate fits, and
    the result as verification left it (the plot draws that one)."""
    from llama_ft.parallel.planning.verify import verification_to_dict, verify_plan  # imports torch: only when asked

    verified = verify_plan(result, llama, top_k=config.verify_top or 1)
    if config.json:
        data = plan_result_to_dict(verified.result, max_candidates=config.top)
        data["verification"] = verification_to_dict(verified)
        print(json.dumps(data, indent=2))
    else:
        print(format_plan_report(verified.result, top=config.top or 10))
        print()
        print(format_verification(verified))
    refuted = all(check.fits is False for check in verified.verifications)
    return (1 if refuted else 0), verified.result
