"""What the planner is told: the model's shape, the cluster's hardware, and the training recipe's sizes.

These are plain values so that the planner can run anywhere (a laptop, the ``plan`` command, rank 0 of a job)
without touching a GPU or building the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llama_ft.errors import ConfigError
from llama_ft.parallel.planning.accelerators import detect_accelerator_name, get_accelerator
from llama_ft.parallel.planning.units import GIGA, TERA, GiB, readable_count

# Share of a NIC's line rate ring collectives reach: 400 Gb/s InfiniBand gives ~45 GB/s of nccl-tests bus bandwidth.
NIC_EFFICIENCY = 0.9
# Model presets shipped as package data (LlamaConfig JSON), read here without transformers.
PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets" / "models"


@dataclass(frozen=True)
class ModelSpec:
    """A Llama decoder's dimensions and its parameter count by part (exact for ``LlamaForCausalLM``)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    name: str = "llama"

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                      "vocab_size"):
            if getattr(self, field) < 1:
                raise ConfigError(f"ModelSpec.{field} must be a positive integer, got {getattr(self, field)}.")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}; "
                "grouped-query attention needs whole groups."
            )

    @classmethod
    def from_llama_config(cls, config: Any, name: str | None = None) -> ModelSpec:
        """Read the sizes from a ``transformers.LlamaConfig`` (or anything with the same attributes)."""
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            num_layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            intermediate_size=int(config.intermediate_size),
            vocab_size=int(config.vocab_size),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            name=name or getattr(config, "name_or_path", None) or "llama",
        )

    @classmethod
    def from_preset(cls, name_or_path: str | Path) -> ModelSpec:
        """A preset name (``llama-3-8b``) or a LlamaConfig JSON file, read as JSON: no transformers import."""
        path = PRESETS_DIR / f"{name_or_path}.json"
        if not path.is_file():
            path = Path(name_or_path)
        if not path.is_file():
            known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
            raise ConfigError(f"model {name_or_path!r} is neither a preset ({known}) nor a config JSON file.")
        data = json.loads(path.read_text())
        if data.get("model_type") != "llama":
            raise ConfigError(f"{path} describes a {data.get('model_type')!r} model; the planner models Llama only.")
        return cls.from_config_dict(data, name=path.stem)

    @classmethod
    def from_config_dict(cls, data: dict[str, Any], name: str | None = None) -> ModelSpec:
        """Read the sizes from a LlamaConfig's dict (``config.json``), as ``from_llama_config`` reads the object."""
        return cls.from_llama_config(_Attributes(data), name=name)

    # --- dimensions the cost model reads -------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        """Width of the query projection (heads × head_dim); equals hidden_size in the Llama presets."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of the key and value projections (grouped-query attention makes it small)."""
        return self.num_kv_heads * self.head_dim

    # --- parameter counts ------------------------------------------------------------------------------------
    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def attention_params_per_layer(self) -> int:
        """q, k, v, o projections (and their biases when the config has them)."""
        h, q, kv = self.hidden_size, self.q_dim, self.kv_dim
        weights = h * q + 2 * h * kv + q * h
        biases = (q + 2 * kv + h) if self.attention_bias else 0
        return weights + biases

    @property
    def mlp_params_per_layer(self) -> int:
        """SwiGLU: gate and up (h → f) and down (f → h)."""
        h, f = self.hidden_size, self.intermediate_size
        return 3 * h * f + ((2 * f + h) if self.mlp_bias else 0)

    @property
    def norm_params_per_layer(self) -> int:
        """Two RMSNorm weight vectors per decoder layer."""
        return 2 * self.hidden_size

    @property
    def params_per_layer(self) -> int:
        return self.attention_params_per_layer + self.mlp_params_per_layer + self.norm_params_per_layer

    @property
    def final_norm_params(self) -> int:
        return self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Zero when the output projection reuses the embedding matrix."""
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        return self.embedding_params + self.num_layers * self.params_per_layer + self.final_norm_params + (
            self.lm_head_params
        )

    @property
    def non_embedding_params(self) -> int:
        """Everything but the input embedding table (an untied lm_head counts: it is a matmul)."""
        return self.total_params - self.embedding_params

    @property
    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: all layers' projections plus the output projection.

        A tied output projection still costs a matmul, so it is counted here even though it adds no parameters.
        """
        return self.num_layers * (self.attention_params_per_layer + self.mlp_params_per_layer) + (
            self.vocab_size * self.hidden_size
        )

    def describe(self) -> str:
        tied = ", tied embeddings" if self.tied_embeddings else ""
        return (
            f"{self.name}: {readable_count(self.total_params)} parameters, {self.num_layers} layers, hidden "
            f"{self.hidden_size}, {self.num_heads} heads / {self.num_kv_heads} KV heads, intermediate "
            f"{self.intermediate_size}, vocab {self.vocab_size}{tied}"
        )


class _Attributes:
    """A config dict read as attributes (missing keys are None), as ``from_llama_config`` reads a LlamaConfig."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getattr__(self, key: str) -> Any:
        return self._data.get(key)


@dataclass(frozen=True)
class ClusterSpec:
    """The devices a job runs on: how many, how much memory, how fast they compute and talk."""

    nodes: int
    devices_per_node: int
    device_memory_bytes: int
    peak_flops: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    accelerator: str = "custom"
    memory_bandwidth: float = 0.0  # 0 means "unknown": derived from peak_flops below
    matmul_efficiency: float = 0.45  # achievable share of peak for wide models (``accelerators.MATMUL_EFFICIENCY``)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.devices_per_node < 1:
            raise ConfigError(
                f"a cluster needs at least 1 node and 1 device per node, got nodes={self.nodes}, "
                f"devices_per_node={self.devices_per_node}."
            )
        if self.device_memory_bytes <= 0 or self.peak_flops <= 0:
            raise ConfigError(
                f"device memory ({self.device_memory_bytes} bytes) and peak FLOP/s ({self.peak_flops}) must be > 0."
            )
        if self.intra_node_bandwidth <= 0 or self.inter_node_bandwidth <= 0:
            raise ConfigError("intra- and inter-node bandwidths must be > 0 bytes/s.")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def hbm_bandwidth(self) -> float:
        """Device memory bandwidth; when unknown, ~1 byte per 300 FLOP, the ratio of current datacenter GPUs."""
        return self.memory_bandwidth or self.peak_flops / 300

    @classmethod
    def from_accelerator(cls, name: str, nodes: int, devices_per_node: int) -> ClusterSpec:
        """A cluster of ``nodes × devices_per_node`` devices of a known kind (see ``accelerators.py``)."""
        acc = get_accelerator(name)
        return cls(
            nodes=nodes,
            devices_per_node=devices_per_node,
            device_memory_bytes=acc.memory_bytes,
            peak_flops=acc.peak_flops,
            intra_node_bandwidth=acc.intra_node_bandwidth,
            inter_node_bandwidth=acc.inter_node_bandwidth,
            accelerator=acc.name,
            memory_bandwidth=acc.memory_bandwidth,
            matmul_efficiency=acc.matmul_efficiency,
        )

    @property
    def node_network_bandwidth(self) -> float:
        """Bytes/s one node injects into the network: the per-device NIC share times the devices of a node."""
        return self.inter_node_bandwidth * self.devices_per_node

    def with_node_network(self, node_gbps: float) -> ClusterSpec:
        """This cluster with ``node_gbps`` gigabits/s of NICs per node (e.g. 8 × 400 = 3200), shared by its devices.

        Ring collectives reach about ``NIC_EFFICIENCY`` of the line rate (nccl-tests bus bandwidth over InfiniBand).
        """
        if node_gbps <= 0:
            raise ConfigError(f"inter-node bandwidth must be > 0 Gb/s per node, got {node_gbps}.")
        per_device = node_gbps / 8 * GIGA * NIC_EFFICIENCY / self.devices_per_node
        return replace(self, inter_node_bandwidth=per_device)

    @classmethod
    def describe_device(
        cls,
        memory_gib: float,
        peak_tflops: float,
        nodes: int = 1,
        devices_per_node: int = 1,
        intra_node_gbps: float = 20.0,
        inter_node_gbps: float = 11.0,
        name: str = "custom",
    ) -> ClusterSpec:
        """A cluster of a device not in the table; link defaults are PCIe-class, so give NVLink numbers if any.

        Bandwidths are in GB/s (1e9 bytes/s) per device per direction, as ``nccl-tests`` bus bandwidth.
        """
        if memory_gib <= 0 or peak_tflops <= 0:
            raise ConfigError(f"device memory ({memory_gib} GiB) and peak ({peak_tflops} TFLOP/s) must be > 0.")
        return cls(
            nodes=nodes,
            devices_per_node=devices_per_node,
            device_memory_bytes=int(memory_gib * GiB),
            peak_flops=peak_tflops * TERA,
            intra_node_bandwidth=intra_node_gbps * GIGA,
            inter_node_bandwidth=inter_node_gbps * GIGA,
            accelerator=name,
        )

    @classmethod
    def detect(cls, num_nodes: int, devices_per_node: int, accelerator_override: str | None = None) -> ClusterSpec:
        """The cluster this process runs on; node and device counts come from the launcher (SLURM, Lightning)."""
        name = accelerator_override or detect_accelerator_name()
        if name is not None:
            return cls.from_accelerator(name, num_nodes, devices_per_node)
        return _describe_unknown_cuda_device(num_nodes, devices_per_node)

    def describe(self) -> str:
        nodes = f"{self.nodes} node{'s' if self.nodes > 1 else ''}"
        across = (f"{self.node_network_bandwidth / GIGA:.0f} GB/s per node across nodes "
                  f"({self.inter_node_bandwidth / GIGA:.0f} per device)" if self.nodes > 1 else "one node")
        return (
            f"{nodes} × {self.devices_per_node} {self.accelerator} ({self.world_size} "
            f"device{'s' if self.world_size > 1 else ''}; "
            f"{self.device_memory_bytes / GiB:.1f} GiB, {self.peak_flops / TERA:.0f} TFLOP/s bf16 each; links "
            f"{self.intra_node_bandwidth / GIGA:.0f} GB/s in a node, {across})"
        )


# Rough dense bf16 peaks by CUDA compute capability, for GPUs missing from the table.
_PEAK_TFLOPS_BY_CAPABILITY = {(9, 0): 989.0, (8, 9): 362.0, (8, 6): 150.0, (8, 0): 312.0, (7, 0): 125.0}


def _describe_unknown_cuda_device(num_nodes: int, devices_per_node: int) -> ClusterSpec:
    """An unknown GPU: its real memory, a peak guessed from its compute capability, PCIe-class links."""
    import torch

    props = torch.cuda.get_device_properties(0)
    tflops = _PEAK_TFLOPS_BY_CAPABILITY.get((props.major, props.minor), 100.0)
    return ClusterSpec.describe_device(
        memory_gib=props.total_memory / GiB,
        peak_tflops=tflops,
        nodes=num_nodes,
        devices_per_node=devices_per_node,
        name=props.name,
    )


# Lightning's precision spellings and the aliases it accepts, mapped to the canonical form.
_PRECISION_ALIASES = {
    "bf16-mixed": "bf16-mixed",
    "bf16": "bf16-mixed",
    "16-mixed": "16-mixed",
    "16": "16-mixed",
    "bf16-true": "bf16-true",
    "16-true": "16-true",
    "32-true": "32-true",
    "32": "32-true",
}
TRAINER_PRECISION = "32-true"  # what a Lightning Trainer runs when its precision argument is None (a test checks)
OPTIMIZERS = ("adamw",)


def normalize_precision(precision: str | int | None) -> str:
    """Lightning's canonical precision string for any spelling it accepts; None means the Trainer's default."""
    if precision is None:
        return TRAINER_PRECISION
    key = str(precision).strip().lower()
    if key not in _PRECISION_ALIASES:
        raise ConfigError(
            f"precision {precision!r} is not one the planner models; use one of "
            f"{sorted(set(_PRECISION_ALIASES.values()))}."
        )
    return _PRECISION_ALIASES[key]


# Input and output widths of each Llama projection LoRA can adapt, from a ModelSpec.
_PROJECTION_SHAPES = {
    "q_proj": lambda m: (m.hidden_size, m.q_dim),
    "k_proj": lambda m: (m.hidden_size, m.kv_dim),
    "v_proj": lambda m: (m.hidden_size, m.kv_dim),
    "o_proj": lambda m: (m.q_dim, m.hidden_size),
    "gate_proj": lambda m: (m.hidden_size, m.intermediate_size),
    "up_proj": lambda m: (m.hidden_size, m.intermediate_size),
    "down_proj": lambda m: (m.intermediate_size, m.hidden_size),
}


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters of rank ``rank`` on ``target_modules`` of every decoder layer; the base is frozen."""

    rank: int
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.target_modules) - set(_PROJECTION_SHAPES))
        if self.rank < 1 or unknown or not self.target_modules:
            raise ConfigError(f"LoRA needs a rank >= 1 and target modules from {sorted(_PROJECTION_SHAPES)}; got "
                              f"rank {self.rank}, targets {list(self.target_modules)}.")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def shapes(self, model: ModelSpec) -> list[tuple[int, int]]:
        """(in, out) of every adapted projection of one layer."""
        return [_PROJECTION_SHAPES[name](model) for name in self.target_modules]

    def params_per_layer(self, model: ModelSpec) -> int:
        """A (r × in) plus B (out × r) per adapted projection."""
        return sum(self.rank * (fan_in + fan_out) for fan_in, fan_out in self.shapes(model))

    def trainable_params(self, model: ModelSpec) -> int:
        return model.num_layers * self.params_per_layer(model)

    def describe(self) -> str:
        return f"LoRA r={self.rank} on {', '.join(self.target_modules)}"


@dataclass(frozen=True)
class TrainSpec:
    """The recipe's sizes that decide memory and time: sequence, global batch, precision, optimizer, LoRA or full."""

    seq_len: int
    global_batch_size: int
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    # Real (non-padding) tokens per row after batching; None means full rows (packed data, or unknown).
    mean_tokens_per_row: float | None = None
    # True when every row is padded to seq_len (compute runs on full rows however few tokens are real).
    pads_to_max: bool = False
    lora: LoraSpec | None = None  # None: full fine-tuning
    # AdamW as the fine-tuner runs it: fused on CUDA (in place), foreach on CPU (a temporary copy of the parameters)
    fused_optimizer: bool = True

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.global_batch_size < 1:
            raise ConfigError(
                f"sequence length ({self.seq_len}) and global batch size ({self.global_batch_size}) must be >= 1."
            )
        if self.mean_tokens_per_row is not None and not 0 < self.mean_tokens_per_row <= self.seq_len:
            raise ConfigError(f"mean_tokens_per_row={self.mean_tokens_per_row} must be in (0, seq_len="
                              f"{self.seq_len}].")
        object.__setattr__(self, "precision", normalize_precision(self.precision))
        if self.optimizer.lower() not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is not modelled; the planner knows {list(OPTIMIZERS)}.")
        object.__setattr__(self, "optimizer", self.optimizer.lower())

    @property
    def real_tokens_per_row(self) -> float:
        return self.mean_tokens_per_row or float(self.seq_len)

    @property
    def computed_tokens_per_row(self) -> float:
        """Tokens the model runs per row: full rows when padded to the maximum, else the real ones."""
        return float(self.seq_len) if self.pads_to_max else self.real_tokens_per_row

    @property
    def tokens_per_step(self) -> float:
        """Real tokens per optimizer step: what tokens/s counts (padding never does)."""
        return self.real_tokens_per_row * self.global_batch_size

    def describe(self) -> str:
        rows = ""
        if self.mean_tokens_per_row is not None:
            padded = ", rows padded to the maximum" if self.pads_to_max else ""
            rows = f", {self.mean_tokens_per_row:,.0f} real tokens per row on average{padded}"
        return (
            f"sequence {self.seq_len}{rows}, global batch {self.global_batch_size} sequences "
            f"({self.tokens_per_step:,.0f} tokens/step), {self.precision}, {self.optimizer}"
            + (f", {self.lora.describe()}" if self.lora else ", full fine-tuning")
        )
