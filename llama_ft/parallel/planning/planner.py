"""Choose the parallel layout: enumerate every layout the cluster allows, drop those that do not fit, rank the rest.

The enumeration is small (divisor splits of the world × 3 checkpointing modes × a few micro-batches), so it is
exhaustive pure Python; the cost model's predictions decide, and near-ties go to the simpler layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llama_ft.errors import PlanError
from llama_ft.global_batch import valid_micro_batch_sizes
from llama_ft.parallel.layout import AC_MODES, Layout
from llama_ft.parallel.planning.coefficients import DEFAULT_COEFFICIENTS, CostCoefficients
from llama_ft.parallel.planning.memory import MemoryBreakdown, estimate_memory
from llama_ft.parallel.planning.shapes import layout_shapes, tp_problems, valid_tp_sizes
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec
from llama_ft.parallel.planning.step_time import StepTime, estimate_step_time, model_flops_per_step
from llama_ft.parallel.planning.units import GiB, readable_count

# Share of device memory a plan may fill: the rest is left to what neither the cost model nor the simulation sees
# (the CUDA context, NCCL's own buffers, the allocator's reserve beyond live tensors). Evidence for the size:
# torchtitan's published max_reserved memory ran 10-13% above this model's prediction of its step (tensors +
# allowance; benchmarks/results/planner_vs_published.md, the two rows with memory), so a tenth is held back.
DEFAULT_MEMORY_FRACTION = 0.9
MAX_SEARCH_NODES = 16_384  # the smallest-cluster search stops here: 131,072 devices of 8 per node
ENDLESS_SHARDS = 2**40  # a shard group so large that sharded states round to nothing
MAX_MICRO_BATCH = 64  # beyond this, throughput no longer improves and memory never fits for real models
NEAR_TIE = 0.03  # plans within 3% of the best predicted tokens/s count as equally fast
KIND_ORDER = {"single": 0, "DDP": 1, "FSDP": 2, "HSDP": 3, "TP": 4, "2D": 5}
AC_ORDER = {mode: i for i, mode in enumerate(AC_MODES)}


class NothingFitsError(PlanError):
    """No layout fits this cluster; ``smallest_cluster`` is the fewest whole nodes that would (None if none)."""

    def __init__(self, message: str, smallest_cluster: ClusterSpec | None) -> None:
        super().__init__(message)
        self.smallest_cluster = smallest_cluster


@dataclass(frozen=True)
class PlanPins:
    """Choices the user fixed; None leaves a choice to the planner."""

    tp_size: int | None = None
    dp_shard_size: int | None = None
    dp_replicate_size: int | None = None
    activation_checkpointing: str | None = None
    micro_batch_size: int | None = None
    cpu_offload: bool | None = None

    def describe(self) -> str:
        pinned = [f"{k}={v}" for k, v in self.__dict__.items() if v is not None]
        return ", ".join(pinned) if pinned else "none"


@dataclass(frozen=True)
class Plan:
    """One feasible layout with its micro-batch and the cost model's predictions."""

    layout: Layout
    micro_batch_size: int
    grad_accumulation: int
    memory: MemoryBreakdown
    time: StepTime
    peak_bytes: float
    step_time_s: float
    tokens_per_s_per_device: float
    mfu: float

    def describe(self) -> str:
        return (f"{self.layout.describe()}, micro-batch {self.micro_batch_size} × accumulation "
                f"{self.grad_accumulation}")


@dataclass(frozen=True)
class Rejection:
    """A layout (or a layout with a micro-batch) that cannot run, and why."""

    layout: Layout | None
    reason: str
    micro_batch_size: int | None = None
    needed_bytes: float | None = None  # set when the reason is memory
    partial: bool = False  # smaller micro-batches of this layout fit; only this one and larger do not

    @property
    def description(self) -> str:
        return self.layout.describe() if self.layout else "any layout"


@dataclass(frozen=True)
class PlanResult:
    """The chosen plan, every feasible plan ranked (chosen first), and what was rejected."""

    chosen: Plan
    candidates: tuple[Plan, ...]
    rejected: tuple[Rejection, ...]
    model: ModelSpec
    cluster: ClusterSpec
    train: TrainSpec
    memory_fraction: float
    pins: PlanPins


# =============================================================================================================
# Which layouts pins and batches allow (the shapes a cluster allows are ``shapes.py``'s)
# =============================================================================================================


def _shape_matches(shape: tuple[int, int, int], pins: PlanPins) -> bool:
    replicate, shard, tp = shape
    return ((pins.tp_size is None or pins.tp_size == tp)
            and (pins.dp_shard_size is None or pins.dp_shard_size == shard)
            and (pins.dp_replicate_size is None or pins.dp_replicate_size == replicate))


def can_offload(replicate: int, shard: int, coeffs: CostCoefficients) -> bool:
    """CPU offload is FSDP2's: torch DDP cannot offload, but DDP built as one-rank-shard HSDP can."""
    return coeffs.fsdp_for_every_layout or shard > 1 or replicate == 1


def micro_batch_sizes(global_batch: int, dp: int, pinned: int | None = None) -> list[int]:
    """Micro-batches that keep the global batch exact: the pinned one if it does, else all up to the cap."""
    if pinned is not None:
        return [pinned] if pinned >= 1 and global_batch % (pinned * dp) == 0 else []
    return valid_micro_batch_sizes(global_batch, dp, up_to=MAX_MICRO_BATCH)


# =============================================================================================================
# Pins that cannot work fail at once, with what would
# =============================================================================================================


def lora_excludes(train: TrainSpec, tp: int) -> bool:
    """LoRA's adapter layers (peft) have no tensor-parallel plan in ``apply.py``: LoRA runs data-parallel only."""
    return train.lora is not None and tp > 1


LORA_TP_REASON = "LoRA adapters have no tensor-parallel plan; LoRA runs with tp 1 (DDP, FSDP or HSDP)"


def validate_pins(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, pins: PlanPins) -> None:
    """Raise ``PlanError`` for a pinned value that no layout on this cluster can take, naming values that can."""
    if pins.tp_size is not None and lora_excludes(train, pins.tp_size):
        raise PlanError(f"tp_size={pins.tp_size} with model.lora: {LORA_TP_REASON}; pin tp_size 1 or leave it auto.")
    shapes = layout_shapes(model, cluster)
    if pins.tp_size is not None:
        problems = tp_problems(model, cluster, pins.tp_size) if pins.tp_size >= 1 else ["must be >= 1"]
        if problems:
            raise PlanError(
                f"tp_size={pins.tp_size} {' and '.join(problems)}; valid tp sizes on this cluster "
                f"({cluster.nodes} × {cluster.devices_per_node} devices): {valid_tp_sizes(model, cluster)}."
            )
    _check_dim_pin(shapes, pins, "dp_shard_size", 1, replace(pins, dp_shard_size=None, dp_replicate_size=None),
                   cluster)
    _check_dim_pin(shapes, pins, "dp_replicate_size", 0, replace(pins, dp_replicate_size=None), cluster)
    if pins.activation_checkpointing is not None and pins.activation_checkpointing not in AC_MODES:
        raise PlanError(f"activation_checkpointing={pins.activation_checkpointing!r} is not one of {list(AC_MODES)}.")
    if pins.micro_batch_size is not None:
        _check_micro_batch_pin(shapes, pins, train)


def _check_dim_pin(shapes: list[tuple[int, int, int]], pins: PlanPins, name: str, index: int,
                   without: PlanPins, cluster: ClusterSpec) -> None:
    """A pinned data-parallel size must be one some remaining shape has; say which sizes would do."""
    value = getattr(pins, name)
    if value is None:
        return
    allowed = sorted({s[index] for s in shapes if _shape_matches(s, without)})
    if value not in allowed:
        raise PlanError(
            f"{name}={value} does not fit a world of {cluster.world_size} devices with the other pins "
            f"({without.describe()}): dp_replicate × dp_shard × tp must equal {cluster.world_size}; valid "
            f"{name} values: {allowed}."
        )


def _check_micro_batch_pin(shapes: list[tuple[int, int, int]], pins: PlanPins, train: TrainSpec) -> None:
    """A pinned micro-batch must divide the global batch across some allowed data-parallel size."""
    b = pins.micro_batch_size
    dps = sorted({r * s for r, s, t in shapes if _shape_matches((r, s, t), pins)})
    if b is not None and b >= 1 and any(train.global_batch_size % (b * dp) == 0 for dp in dps):
        return
    valid = sorted({m for dp in dps for m in valid_micro_batch_sizes(train.global_batch_size, dp, MAX_MICRO_BATCH)})
    raise PlanError(
        f"micro_batch_size={b} does not divide the global batch {train.global_batch_size} for any allowed "
        f"data-parallel size {dps} (global batch must be a multiple of micro-batch × data-parallel size); valid "
        f"micro-batch sizes: {valid or 'none — raise the global batch to a multiple of the data-parallel size'}."
    )


# =============================================================================================================
# Evaluate and rank
# =============================================================================================================


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f} GiB"


def memory_reason(memory: MemoryBreakdown, usable: float, micro_batch: int, smallest: bool) -> str:
    """'needs X GiB > Y GiB usable', with the micro-batch and the two terms that weigh most."""
    terms = ", ".join(f"{name.replace('_', ' ')} {value / GiB:.1f}" for name, value in memory.largest_terms())
    at = f"at micro-batch {micro_batch}" if smallest else f"at micro-batch >= {micro_batch}"
    return f"needs {_gib(memory.total)} > {_gib(usable)} usable {at} (largest: {terms} GiB)"


def _make_plan(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, layout: Layout, b: int,
               memory: MemoryBreakdown, coeffs: CostCoefficients) -> Plan:
    accumulation = train.global_batch_size // (b * layout.dp_size)
    time = estimate_step_time(model, cluster, train, layout, b, accumulation, coeffs)
    step = time.total_s
    return Plan(
        layout=layout,
        micro_batch_size=b,
        grad_accumulation=accumulation,
        memory=memory,
        time=time,
        peak_bytes=memory.total,
        step_time_s=step,
        tokens_per_s_per_device=train.tokens_per_step / (step * cluster.world_size),
        mfu=model_flops_per_step(model, train) / (step * cluster.world_size * cluster.peak_flops),
    )


def _evaluate(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, pins: PlanPins, usable: float, offload: bool,
    coeffs: CostCoefficients,
) -> tuple[list[Plan], list[Rejection]]:
    """Every layout shape × checkpointing mode × micro-batch with or without offload: plans and rejections."""
    plans: list[Plan] = []
    rejected: list[Rejection] = []
    modes = [pins.activation_checkpointing] if pins.activation_checkpointing else list(AC_MODES)
    for shape in layout_shapes(model, cluster):
        replicate, shard, tp = shape
        if not _shape_matches(shape, pins) or (offload and not can_offload(replicate, shard, coeffs)):
            continue
        if lora_excludes(train, tp):
            rejected.append(Rejection(Layout(replicate, shard, tp, cpu_offload=offload), LORA_TP_REASON))
            continue
        sizes = micro_batch_sizes(train.global_batch_size, replicate * shard, pins.micro_batch_size)
        for mode in modes:
            layout = Layout(replicate, shard, tp, mode, offload)
            if not sizes:
                rejected.append(Rejection(layout, _no_micro_batch_reason(train, replicate * shard, pins)))
                continue
            if offload:
                host = estimate_memory(model, train, layout, sizes[0], coeffs).host_bytes
                if host > coeffs.host_memory_per_device_bytes:
                    rejected.append(Rejection(layout, f"CPU offload needs {_gib(host)} of host memory per device > "
                                                      f"{_gib(coeffs.host_memory_per_device_bytes)} assumed"))
                    continue
            for b in sizes:  # memory grows with b: the first that does not fit ends the scan
                memory = estimate_memory(model, train, layout, b, coeffs)
                if memory.total > usable:
                    rejected.append(
                        Rejection(layout, memory_reason(memory, usable, b, b == sizes[0]), b, memory.total,
                                  partial=b != sizes[0]))
                    break
                plans.append(_make_plan(model, cluster, train, layout, b, memory, coeffs))
    return plans, rejected


def _no_micro_batch_reason(train: TrainSpec, dp: int, pins: PlanPins) -> str:
    if pins.micro_batch_size is not None:
        return (f"global batch {train.global_batch_size} is not a multiple of micro-batch "
                f"{pins.micro_batch_size} × {dp} data-parallel ranks")
    return (f"global batch {train.global_batch_size} cannot be split over {dp} data-parallel ranks "
            f"(needs a multiple of {dp}, micro-batch <= {MAX_MICRO_BATCH})")


def simplicity_key(plan: Plan) -> tuple[int, int, int, int, float]:
    """Simpler first: fewer parallelism kinds, no offload, less checkpointing, then larger micro-batch."""
    layout = plan.layout
    return (int(layout.cpu_offload), KIND_ORDER[layout.kind], AC_ORDER[layout.activation_checkpointing],
            -plan.micro_batch_size, -plan.tokens_per_s_per_device)


def rank_plans(plans: list[Plan]) -> list[Plan]:
    """Fastest first, except that among plans within ``NEAR_TIE`` of the fastest the simplest leads."""
    by_speed = sorted(plans, key=lambda p: -p.tokens_per_s_per_device)
    best = by_speed[0].tokens_per_s_per_device
    chosen = min((p for p in by_speed if p.tokens_per_s_per_device >= best * (1 - NEAR_TIE)), key=simplicity_key)
    return [chosen] + [p for p in by_speed if p is not chosen]


# =============================================================================================================
# Entry point
# =============================================================================================================


def plan_parallelism(
    model: ModelSpec,
    cluster: ClusterSpec,
    train: TrainSpec,
    pins: PlanPins | None = None,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    coeffs: CostCoefficients = DEFAULT_COEFFICIENTS,
) -> PlanResult:
    """The fastest layout that fits (simplest among near-ties); ``PlanError`` when a pin or the cluster cannot work."""
    pins = pins or PlanPins()
    if not 0 < memory_fraction <= 1:
        raise PlanError(f"memory_fraction must be in (0, 1], got {memory_fraction}.")
    validate_pins(model, cluster, train, pins)
    usable = memory_fraction * cluster.device_memory_bytes
    plans, rejected = [], []
    if pins.cpu_offload is not True:
        plans, rejected = _evaluate(model, cluster, train, pins, usable, False, coeffs)
    if not plans and pins.cpu_offload is not False:  # offload is the last resort
        plans, offload_rejected = _evaluate(model, cluster, train, pins, usable, True, coeffs)
        rejected += offload_rejected
    if not plans:
        raise NothingFitsError(*_nothing_fits_message(model, cluster, train, pins, memory_fraction, rejected, coeffs))
    ranked = rank_plans(plans)
    return PlanResult(ranked[0], tuple(ranked), tuple(rejected), model, cluster, train, memory_fraction, pins)


def fits_somewhere(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, pins: PlanPins, usable: float,
    coeffs: CostCoefficients,
) -> float | None:
    """Cheap feasibility: does any allowed shape fit with its least-memory settings (full AC, smallest batch)?

    None when none does; else the host bytes per device it needs (0 without CPU offload, which is tried first).
    """
    modes = [pins.activation_checkpointing] if pins.activation_checkpointing else ["full"]
    offloads = [pins.cpu_offload] if pins.cpu_offload is not None else [False, True]
    for offload in offloads:  # every shape without offload before any with it
        for replicate, shard, tp in layout_shapes(model, cluster):
            sizes = micro_batch_sizes(train.global_batch_size, replicate * shard, pins.micro_batch_size)
            if not _shape_matches((replicate, shard, tp), pins) or lora_excludes(train, tp) or not sizes or (
                    offload and not can_offload(replicate, shard, coeffs)):
                continue
            memory = estimate_memory(model, train, Layout(replicate, shard, tp, modes[0], offload), sizes[0], coeffs)
            if memory.total <= usable and memory.host_bytes <= coeffs.host_memory_per_device_bytes:
                return memory.host_bytes
    return None


def smallest_fitting_cluster(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, pins: PlanPins | None = None,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION, coeffs: CostCoefficients = DEFAULT_COEFFICIENTS,
) -> ClusterSpec | None:
    """The fewest whole nodes of this device kind on which the recipe fits, searching upward; None if none can.

    Beyond ``global batch × largest tp`` devices no micro-batch divides the batch, which bounds the search.
    """
    found = smallest_fitting_cluster_and_host(model, cluster, train, pins, memory_fraction, coeffs)
    return found[0] if found else None


def smallest_fitting_cluster_and_host(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, pins: PlanPins | None = None,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION, coeffs: CostCoefficients = DEFAULT_COEFFICIENTS,
) -> tuple[ClusterSpec, float] | None:
    """``smallest_fitting_cluster`` and the host bytes per device its cheapest fit needs (0: no CPU offload).

    Answered at once when even a device of an endless cluster would not hold the step (``fits_on_some_cluster``);
    the upward search stops at ``MAX_SEARCH_NODES``."""
    pins = pins or PlanPins()
    usable = memory_fraction * cluster.device_memory_bytes
    if not fits_on_some_cluster(model, cluster, train, pins, usable, coeffs):
        return None
    max_nodes = min(MAX_SEARCH_NODES, train.global_batch_size * cluster.devices_per_node)
    for nodes in range(cluster.nodes + 1, max_nodes + 1):
        candidate = replace(cluster, nodes=nodes)
        host = fits_somewhere(model, candidate, train, pins, usable, coeffs)
        if host is not None:
            return candidate, host
    return None


def fits_on_some_cluster(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, pins: PlanPins, usable: float,
                         coeffs: CostCoefficients) -> bool:
    """Whether a device of this kind could hold the step on a cluster of any size: its states sharded over
    ``ENDLESS_SHARDS`` devices (or the pinned shard group), tensor parallel within a node, the least-memory
    settings. What is left (activations, working weights, buffers) no cluster size shrinks."""
    one_node = replace(cluster, nodes=1)
    tps = [pins.tp_size] if pins.tp_size else valid_tp_sizes(model, one_node)
    offloads = [pins.cpu_offload] if pins.cpu_offload is not None else [False, True]
    mode = pins.activation_checkpointing or "full"
    shard = pins.dp_shard_size or ENDLESS_SHARDS
    for tp in tps:
        if lora_excludes(train, tp):
            continue
        for offload in offloads:
            layout = Layout(pins.dp_replicate_size or 1, shard, tp, mode, offload)
            if estimate_memory(model, train, layout, pins.micro_batch_size or 1, coeffs).total <= usable:
                return True
    return False


def _nothing_fits_message(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, pins: PlanPins, memory_fraction: float,
    rejected: list[Rejection], coeffs: CostCoefficients,
) -> tuple[str, ClusterSpec | None]:
    """Say why nothing fits and what would: the plan without pins, and the smallest cluster that fits."""
    whole = [r for r in rejected if r.needed_bytes is not None and not r.partial]
    closest = min(whole, key=lambda r: r.needed_bytes or 0.0, default=rejected[0] if rejected else None)
    why = f" The closest: {closest.description} {closest.reason}." if closest else ""
    head = (f"no parallel layout of {model.name} ({readable_count(model.total_params)} parameters) fits on "
            f"{cluster.describe()} with {train.describe()}, pins: {pins.describe()}.{why}")
    advice = []
    if pins != PlanPins():
        try:
            free = plan_parallelism(model, cluster, train, None, memory_fraction, coeffs).chosen
            advice.append(f"Without the pins this cluster fits: {free.describe()}.")
        except PlanError:
            pass
    found = smallest_fitting_cluster_and_host(model, cluster, train, pins, memory_fraction, coeffs)
    bigger, host = found if found else (None, 0.0)
    with_pins = " with these pins" if pins != PlanPins() else ""
    if bigger is None:
        advice.append(f"No cluster of {cluster.accelerator} devices fits it{with_pins} at global batch "
                      f"{train.global_batch_size}: shorten the sequence, enlarge the global batch, or use larger "
                      "devices.")
    else:
        offload = (f", with CPU offload (host memory {host / GiB:.1f} GiB per device, "
                   f"{host * bigger.devices_per_node / GiB:.1f} GiB per node)" if host else "")
        advice.append(f"The smallest cluster of {cluster.accelerator} on which it fits{with_pins}: {bigger.nodes} "
                      f"nodes × {bigger.devices_per_node} = {bigger.world_size} devices{offload}.")
    return " ".join([head, *advice]), bigger
