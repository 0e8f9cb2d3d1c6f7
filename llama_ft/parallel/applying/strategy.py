"""``strategy="advanced"``: plan the parallel layout for the world Lightning launched, then apply it.

What it needs from the LightningModule and the data module is the two Protocols of ``contract`` (``PlannableModule``,
``PlannableData``): it reads the architecture and the recipe's batch, and hands the plan's micro-batch and
data-parallel size to the data module in one ``apply_plan`` call. Device set-up, process group and checkpoint format
stay Lightning's ``ModelParallelStrategy``'s; clipping by norm goes through a Precision subclass (``clipping``).
"""

from __future__ import annotations

import json
from collections.abc import Generator
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info

from llama_ft.callbacks.watchdog import expect_silence
from llama_ft.checkpoint import atomic as checkpointing
from llama_ft.checkpoint.partial import load_partial_distributed_checkpoint
from llama_ft.errors import ConfigError
from llama_ft.loss import loss_backward_context
from llama_ft.parallel.applying.apply import apply_layout, build_device_mesh, materialize
from llama_ft.parallel.applying.clipping import MeshAwarePrecision, with_mesh_aware_clipping
from llama_ft.parallel.applying.contract import PlannableData, PlannableModule, require
from llama_ft.parallel.planning.planner import DEFAULT_MEMORY_FRACTION, PlanPins, PlanResult, plan_parallelism
from llama_ft.parallel.planning.report import format_plan_report, format_plan_summary, plan_result_to_dict
from llama_ft.parallel.planning.specs import ClusterSpec, LoraSpec, ModelSpec, TrainSpec

Auto = Literal["auto"]
PLAN_FILENAME = "plan.json"
PLAN_REPORT_FILENAME = "plan.txt"
PLOT_FILENAME = "plan.png"
LIGHTNING_METADATA = "meta.pt"  # Lightning's ModelParallelStrategy keeps the non-tensor state under this name

# FSDP2 mixed-precision policy per Lightning precision: (compute/param dtype, gradient reduce dtype).
_MIXED_PRECISION = {
    "bf16-mixed": (torch.bfloat16, torch.float32),
    "16-mixed": (torch.float16, torch.float32),
}


def _pin(value: Any) -> Any:
    return None if value == "auto" else value


class AdvancedParallelStrategy(ModelParallelStrategy):
    """Chooses DDP / FSDP / HSDP / TP / FSDP×TP, activation checkpointing and micro-batch, then applies them.

    Every knob is ``"auto"`` unless pinned; a pin that cannot work fails at planning time with the values that
    would. Cluster overrides (``accelerator_name`` or ``device_memory_gib`` + ``peak_tflops``) describe devices the
    detection does not know.
    """

    strategy_name = "advanced"

    def __init__(
        self,
        tp_size: int | Auto = "auto",
        dp_shard_size: int | Auto = "auto",
        dp_replicate_size: int | Auto = "auto",
        activation_checkpointing: Literal["none", "selective", "full", "auto"] = "auto",
        micro_batch_size: int | Auto = "auto",
        cpu_offload: bool | Auto = "auto",
        memory_fraction: float = DEFAULT_MEMORY_FRACTION,
        accelerator_name: str | None = None,
        device_memory_gib: float | None = None,
        peak_tflops: float | None = None,
        inter_node_gbps: float | None = None,
        save_distributed_checkpoint: bool = True,
        async_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.pins = PlanPins(
            tp_size=_pin(tp_size),
            dp_shard_size=_pin(dp_shard_size),
            dp_replicate_size=_pin(dp_replicate_size),
            activation_checkpointing=_pin(activation_checkpointing),
            micro_batch_size=_pin(micro_batch_size),
            cpu_offload=_pin(cpu_offload),
        )
        self.memory_fraction = memory_fraction
        self.accelerator_name = accelerator_name
        self.device_memory_gib = device_memory_gib
        self.peak_tflops = peak_tflops
        self.inter_node_gbps = inter_node_gbps
        self.async_checkpoint = async_checkpoint
        self.plan_result: PlanResult | None = None
        self.plan_path: Path | None = None  # plan.json, on rank 0 once planned
        self._pending_save: Future[None] | None = None
        self._checkpoint_group: dist.ProcessGroup | None = None

    @property
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else MeshAwarePrecision()

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        """Lightning hands over the plugin it chose for the precision flag; keep it, with mesh-aware norm clipping."""
        self._precision_plugin = None if plugin is None else with_mesh_aware_clipping(plugin)

    # ------------------------------------------------------------------------------------------- planning
    def setup_environment(self) -> None:
        """Plan for the world Lightning launched and hand the plan to the data module.

        1. Lightning's set-up: this rank's device (``accelerator.setup_device``), world ranks, process group.
        2. Every rank plans (so a bad pin fails everywhere at once), then all adopt rank 0's plan, so floating-point
           near-ties can never split the ranks between two layouts.
        3. The mesh the plan needs becomes the LightningModule's ``device_mesh`` (as ``ModelParallelStrategy`` does).
        4. The data module gets the plan's micro-batch and data-parallel size (``PlannableData.apply_plan``).
        """
        self._setup_distributed()
        self.plan_result = self.broadcast(self.make_plan())
        plan = self.plan_result.chosen
        self._device_mesh = build_device_mesh(plan.layout, self.root_device.type)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh
        self._datamodule().apply_plan(micro_batch_size=plan.micro_batch_size, data_parallel_size=plan.layout.dp_size)
        self._report(self.plan_result)

    def make_plan(self) -> PlanResult:
        return plan_parallelism(
            ModelSpec.from_llama_config(self._module().llama_config),
            self.cluster_spec(),
            self.train_spec(),
            pins=self.pins,
            memory_fraction=self.memory_fraction,
        )

    def cluster_spec(self) -> ClusterSpec:
        """The detected cluster (or the described device); ``inter_node_gbps`` gives the node's NICs in Gb/s."""
        if self.device_memory_gib is not None or self.peak_tflops is not None:
            if self.device_memory_gib is None or self.peak_tflops is None:
                raise ConfigError("describe an unknown device with both device_memory_gib and peak_tflops.")
            cluster = ClusterSpec.describe_device(
                self.device_memory_gib, self.peak_tflops, nodes=self.num_nodes, devices_per_node=self.num_processes
            )
        else:
            cluster = ClusterSpec.detect(self.num_nodes, self.num_processes, accelerator_override=self.accelerator_name)
        return cluster if self.inter_node_gbps is None else cluster.with_node_network(self.inter_node_gbps)

    def train_spec(self) -> TrainSpec:
        """The recipe's sizes, with the data module's real tokens per row when it can say (``row_tokens()``)."""
        datamodule = self._datamodule()
        row_tokens = getattr(datamodule, "row_tokens", None)
        rows = row_tokens() if callable(row_tokens) else None
        lora = getattr(self._module(), "lora", None)  # optional: LoRA settings (r, target_modules, dropout)
        return TrainSpec(
            seq_len=datamodule.max_length,
            global_batch_size=datamodule.global_batch_size,
            precision=self.precision_plugin.precision,
            mean_tokens_per_row=getattr(rows, "mean", None),
            pads_to_max=bool(getattr(rows, "pads_to_max", False)),
            lora=None if lora is None else LoraSpec(lora.r, tuple(lora.target_modules), lora.dropout),
            fused_optimizer=self.root_device.type == "cuda",  # as LlamaFineTuner.configure_optimizers picks
        )

    def _module(self) -> PlannableModule:
        module = self.lightning_module
        require(module, PlannableModule, "LightningModule", "use LlamaFineTuner or add them")
        return module  # type: ignore[return-value]

    def _datamodule(self) -> PlannableData:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        datamodule = getattr(trainer, "datamodule", None)
        require(datamodule, PlannableData, "data module",
                "pass a data module such as CNNDailyMailDataModule (not bare dataloaders), or add them to yours")
        return datamodule

    def _report(self, result: PlanResult) -> None:
        """Rank 0 writes the full report (plan.txt) and plan.json beside the run's logs and logs a few lines."""
        trainer = self.lightning_module.trainer
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # collective: every rank asks
        if self.global_rank != 0:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self.plan_path = log_dir / PLAN_FILENAME
        self.plan_path.write_text(json.dumps(plan_result_to_dict(result), indent=2) + "\n")
        (log_dir / PLAN_REPORT_FILENAME).write_text(format_plan_report(result) + "\n")
        from llama_ft.parallel.planning.plot import plot_plan  # matplotlib: rank 0 only, once per run

        plot_plan(result, log_dir / PLOT_FILENAME)
        rank_zero_info(format_plan_summary(result, log_dir / PLAN_REPORT_FILENAME, self.plan_path,
                                           log_dir / PLOT_FILENAME))

    def record_measured(self, key: str, values: dict[str, Any]) -> Path | None:
        """Add what the run measured to plan.json under ``measured.<key>`` (rank 0, which wrote it); returns it."""
        if self.plan_path is None or not self.plan_path.is_file():
            return None
        content = json.loads(self.plan_path.read_text())
        content.setdefault("measured", {})[key] = values
        partial = self.plan_path.with_name(f".{PLAN_FILENAME}.partial")
        partial.write_text(json.dumps(content, indent=2) + "\n")
        partial.replace(self.plan_path)
        return self.plan_path

    # ------------------------------------------------------------------------------------------- applying
    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """Build on the meta device so no rank ever holds the unsharded model; ``setup`` materializes."""
        with torch.device("meta") if empty_init is not False else nullcontext(), \
                self.precision_plugin.tensor_init_context():
            yield

    def setup(self, trainer: L.Trainer) -> None:
        model = getattr(self.lightning_module, "model", None)
        if model is None:
            raise ConfigError(
                f"{type(self.lightning_module).__name__}.configure_model() must set `self.model` (a "
                "LlamaForCausalLM) for the advanced strategy to parallelize."
            )
        assert self.plan_result is not None
        param_dtype, reduce_dtype = _MIXED_PRECISION.get(self.precision_plugin.precision, (None, None))
        apply_layout(model, self.plan_result.chosen.layout, self.device_mesh, param_dtype=param_dtype,
                     reduce_dtype=reduce_dtype)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            materialize(model, self.root_device)
            self._module().initialize_weights()
        super().setup(trainer)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A distributed checkpoint of a LoRA run holds only the adapters (``strict_loading`` off): load the tensors
        it has and keep the base weights ``initialize_weights`` loaded; Lightning's loader asks for every tensor."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if self.lightning_module.strict_loading or not path.is_dir():
            return super().load_checkpoint(path, weights_only=weights_only)
        return load_partial_distributed_checkpoint(path, self.model, self.optimizers, weights_only)

    def backward(self, closure_loss: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Under TP the loss's backward runs under ``loss_parallel`` (vocabulary-sharded logits, ``llama_ft.loss``)."""
        assert self.plan_result is not None
        with loss_backward_context(self.plan_result.chosen.layout.tp > 1):
            return super().backward(closure_loss, *args, **kwargs)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="plans and applies the parallel layout (llama_ft)", override=True
        )

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Save beside ``filepath`` and swap the complete checkpoint in afterwards: Lightning rewrites ``last.ckpt``
        in place, so a crash mid-save would otherwise tear the only resumable checkpoint (llama_ft.checkpoint).

        With ``async_checkpoint`` (distributed checkpoints only) the shards are copied to host memory here and
        written by a background thread while training goes on; rank 0 publishes the directory once every rank's
        write has finished. A save waits for the one before it, so two never overlap.
        """
        self.wait_for_checkpoint()
        target = Path(self.broadcast(str(filepath)))
        partial = checkpointing.partial_path(target)
        if self.global_rank == 0:
            checkpointing.remove_stale_partials(target.parent)
        self.barrier()
        with expect_silence(f"saving {target}"):
            if self.async_checkpoint and self._save_distributed_checkpoint:
                self._pending_save = self._save_in_background(checkpoint, partial, target)
                return
            super().save_checkpoint(checkpoint, partial, storage_options=storage_options)
        self.barrier()
        if self.global_rank == 0:
            checkpointing.publish(partial, target)
        self.barrier()

    def _save_in_background(self, checkpoint: dict[str, Any], partial: Path, target: Path) -> Future[None]:
        """Lightning's distributed layout (``state_dict``, ``optimizer_<i>`` shards + ``meta.pt``) through
        ``dcp.async_save``. Its collectives run on a gloo group of their own, never on the one training uses."""
        if self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo")
        partial.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        if self.global_rank == 0:
            torch.save(checkpoint, partial / LIGHTNING_METADATA)
        written = dcp.async_save(state, checkpoint_id=partial, process_group=self._checkpoint_group)
        if self.global_rank != 0:
            return written
        published: Future[None] = Future()

        def publish(done: Any) -> None:
            try:
                done.result()
                checkpointing.publish(partial, target)
                published.set_result(None)
            except BaseException as err:  # surfaced by wait_for_checkpoint on the training thread
                published.set_exception(err)

        written.add_done_callback(publish)
        return published

    def wait_for_checkpoint(self) -> None:
        """Block until a background save has been written (and, on rank 0, published); raise its error if any."""
        pending, self._pending_save = self._pending_save, None
        if pending is not None:
            with expect_silence("finishing a background checkpoint save"):
                pending.result()

    def teardown(self) -> None:
        self.wait_for_checkpoint()
        super().teardown()


AdvancedParallelStrategy.register_strategies(StrategyRegistry)
