"""Measure one layout's per-rank peak memory at full model size on the CPU, with no real memory and no GPU.

The real training step runs on fake tensors: a fake process group of ``layout.world_size`` ranks (this process is
rank 0; collectives return without communicating), the model built on the meta device and parallelized by the same
:func:`~llama_ft.parallel.applying.apply.apply_layout` that training uses, then materialized as fake tensors under
``FakeTensorMode``, and PyTorch's ``FSDPMemTracker`` counting every tensor FSDP, autograd and the optimizer allocate
over two iterations (forward and ``llama_ft.loss``'s loss → backward, once per micro-batch → AdamW step). This is
the ground truth the planner's memory model is calibrated against.

Every layout kind works: DDP, FSDP, HSDP, TP and TP × data parallel (``apply_layout`` always ends in ``fully_shard``,
which the tracker requires). CPU offload is refused: on a CPU-only simulation offloaded and device memory are the
same memory. Two fixes make the numbers right: the mesh and parallelization run outside ``FakeTensorMode`` (device
meshes compute real rank tensors), and DTensor's sharding-propagation scratch tensors are not counted (see
``_tracker_ignoring_sharding_propagation``; without it Llama-3-8B FSDP 8 reads 108 GiB instead of 22.5).

The fake process group is process-wide, so each simulation runs in a fresh spawned child process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import LlamaConfig

from llama_ft.errors import ConfigError, PlanError
from llama_ft.parallel.applying.apply import check_tensor_parallel_fits
from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.specs import LoraSpec
from llama_ft.parallel.planning.units import GiB
from llama_ft.presets import load_llama_config

if TYPE_CHECKING:
    from collections.abc import Iterator
    from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

# Lightning precision name → (dtype the parameters are built in, FSDP param_dtype, FSDP reduce_dtype).
PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None, torch.dtype | None]] = {
    "bf16-mixed": (torch.float32, torch.bfloat16, torch.float32),
    "bf16-true": (torch.bfloat16, None, None),
    "32-true": (torch.float32, None, None),
}

ITERATIONS = 2  # the second one runs with the optimizer state the first step created
# With gradient accumulation every micro-batch after the first runs backward with the previous ones' sharded
# gradients alive, and all of them alike: two micro-batches per step show the peak of any longer accumulation.
MAX_SIMULATED_MICRO_BATCHES = 2


@dataclass(frozen=True)
class SimulationResult:
    """Per-rank peak memory of one training step of ``layout``, as the tracker saw it at the moment of the peak.

    ``breakdown`` maps the tracker's categories (``Sharded Param``, ``Unsharded Param``, ``Buffer``,
    ``Sharded Grad``, ``Unsharded Grad``, ``Activation``, ``Temp``, ``All Gather``, ``Reduce Scatter``,
    ``OptState``, ``Inputs``) to bytes; they sum to ``peak_bytes``. ``wall_s`` is the simulation itself,
    ``total_s`` adds the child process start-up (imports). ``grad_accumulation`` is the accumulation simulated
    (micro-batches per optimizer step).
    """

    model: str
    layout: Layout
    micro_batch_size: int
    seq_len: int
    precision: str
    attn_implementation: str
    peak_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    total_s: float = 0.0
    grad_accumulation: int = 1
    optimizer: str = "fused"

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    def describe(self) -> str:
        parts = ", ".join(f"{name} {nbytes / GiB:.2f}" for name, nbytes in self.breakdown.items() if nbytes)
        return (
            f"{self.model} {self.layout.describe()} b={self.micro_batch_size} s={self.seq_len} {self.precision}: "
            f"peak {self.peak_gib:.2f} GiB/rank ({parts}) in {self.wall_s:.1f} s"
        )


@dataclass(frozen=True)
class _Request:
    """Everything the child needs, picklable."""

    config: LlamaConfig
    model: str
    layout: Layout
    micro_batch_size: int
    seq_len: int
    precision: str
    attn_implementation: str
    grad_accumulation: int = 1
    lora: LoraSpec | None = None
    optimizer: str = "fused"


OPTIMIZER_KINDS = ("fused", "foreach")


def simulate_peak_memory(
    config: LlamaConfig | str,
    layout: Layout,
    micro_batch_size: int,
    seq_len: int,
    *,
    precision: str = "bf16-mixed",
    attn_implementation: str = "sdpa",
    grad_accumulation: int = 1,
    lora: LoraSpec | None = None,
    optimizer: str = "fused",
    timeout_s: float = 600.0,
) -> SimulationResult:
    """Simulate two training iterations of ``layout`` on a fake ``layout.world_size``-rank world; return rank 0's peak.

    ``config`` is a ``LlamaConfig`` or a preset name / config path. ``precision`` is a Lightning precision name
    (``bf16-mixed``: fp32 parameters, bf16 compute, fp32 gradient reduction). ``attn_implementation`` is HF's
    (``sdpa``, what training uses, or ``eager``, which materializes the s×s scores). ``grad_accumulation`` > 1 runs
    two micro-batches per optimizer step (see ``MAX_SIMULATED_MICRO_BATCHES``). ``lora`` injects peft adapters as
    ``fit`` does (frozen base, only the adapters in the optimizer). ``optimizer`` is the AdamW implementation:
    ``fused`` (what the fine-tuner uses on CUDA) or ``foreach`` (on CPU). Runs in a spawned child process and raises
    ``TimeoutError`` after ``timeout_s`` and ``RuntimeError`` (with the child's traceback) if it fails.
    """
    request = _make_request(config, layout, micro_batch_size, seq_len, precision, attn_implementation,
                            grad_accumulation, lora, optimizer)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(request, sender), name="llama_ft-memory-simulation", daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise TimeoutError(
                f"memory simulation of {request.model} {layout.describe()} (b={micro_batch_size}, s={seq_len}) did "
                f"not finish within {timeout_s:.0f} s. Raise timeout_s; a simulation takes roughly a second per "
                "decoder layer plus start-up."
            )
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", f"the child process died with exit code {child.exitcode} before answering"
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()
    if status != "ok":
        raise RuntimeError(f"memory simulation of {request.model} {layout.describe()} failed:\n{payload}")
    result: SimulationResult = payload
    result = SimulationResult(**{**result.__dict__, "total_s": time.perf_counter() - start})
    log.info("%s", result.describe())
    return result


def _make_request(
    config: LlamaConfig | str,
    layout: Layout,
    micro_batch_size: int,
    seq_len: int,
    precision: str,
    attn_implementation: str,
    grad_accumulation: int = 1,
    lora: LoraSpec | None = None,
    optimizer: str = "fused",
) -> _Request:
    """Validate everything in the parent, so a bad argument fails fast with a clear message, not in the child."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} cannot be simulated; use one of {sorted(PRECISIONS)}.")
    if optimizer not in OPTIMIZER_KINDS:
        raise ConfigError(f"optimizer {optimizer!r} cannot be simulated; use one of {list(OPTIMIZER_KINDS)}.")
    if micro_batch_size < 1 or seq_len < 1 or grad_accumulation < 1:
        raise ConfigError(
            f"micro_batch_size, seq_len and grad_accumulation must be >= 1, got {micro_batch_size}, {seq_len} and "
            f"{grad_accumulation}. "
            "Pass the per-device micro-batch and the padded sequence length."
        )
    name = config if isinstance(config, str) else (config.name_or_path or "LlamaConfig")
    llama_config = load_llama_config(config) if isinstance(config, str) else config
    if layout.tp > 1:
        check_tensor_parallel_fits(llama_config, layout.tp)
    if layout.cpu_offload:
        raise PlanError(
            f"layout {layout.describe()} offloads to the CPU, which the memory tracker cannot attribute to a device "
            "(everything here is on the CPU). Simulate the same layout without cpu_offload and subtract the "
            "offloaded parameter, gradient and optimizer-state bytes."
        )
    micro_batches = min(grad_accumulation, MAX_SIMULATED_MICRO_BATCHES)
    return _Request(llama_config, name, layout, micro_batch_size, seq_len, precision, attn_implementation,
                    micro_batches, lora, optimizer)


def _child_main(request: _Request, sender: Connection) -> None:
    """Child process entry: run the simulation, send back ``("ok", result)`` or ``("error", traceback)``."""
    try:
        sender.send(("ok", _simulate(request)))
    except BaseException:
        sender.send(("error", traceback.format_exc()))
    finally:
        sender.close()


def _tracker_ignoring_sharding_propagation(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> contextlib.AbstractContextManager[Any]:
    """An ``FSDPMemTracker`` that does not count DTensor's sharding-propagation scratch tensors.

    To learn an op's output shape, DTensor runs it once on global-shape fake tensors, under the active fake mode.
    The tracker skips those only when that fake mode differs from the one it was entered under (torch 2.13); here
    the whole run is under one ``FakeTensorMode``, so they would be counted as real memory: every optimizer step
    would "allocate" unsharded copies of the parameters and optimizer state, and every TP boundary unsharded
    activations. Propagation has one entry point, so it is wrapped (in this child process only) to pause tracking.
    """
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    class Tracker(FSDPMemTracker):
        propagating = 0

        def __torch_dispatch__(
            self,
            func: torch._ops.OpOverload,
            types: tuple[type, ...],
            args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            if self.propagating:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    tracker = Tracker(model, optimizer)
    propagate = ShardingPropagator._propagate_tensor_meta_non_cached

    @functools.wraps(propagate)
    def untracked_propagate(self: ShardingPropagator, op_schema: Any) -> Any:
        tracker.propagating += 1
        try:
            return propagate(self, op_schema)
        finally:
            tracker.propagating -= 1

    ShardingPropagator._propagate_tensor_meta_non_cached = untracked_propagate
    return tracker


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters in ``dtype`` from the start (``to_empty`` keeps it); never ``.to(dtype)`` inside fake mode."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _simulate(request: _Request) -> SimulationResult:
    """Fake world, fake model, real parallelization and training step, tracked; runs in the child process."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import LlamaForCausalLM

    from llama_ft.loss import causal_lm_loss, loss_backward_context
    from llama_ft.parallel.applying.apply import apply_layout, build_device_mesh, materialize

    torch.set_num_threads(1)  # fake tensors do no arithmetic; more threads only contend with the caller
    # FSDP2 warns that HF's output is a view (about in-place ops on it, which this step never does): noise here.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    start = time.perf_counter()
    layout = request.layout
    build_dtype, param_dtype, reduce_dtype = PRECISIONS[request.precision]
    config = LlamaConfig.from_dict(request.config.to_dict())
    config._attn_implementation = request.attn_implementation
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=layout.world_size)
    try:
        # Mesh, model and parallelization stay outside fake mode, on the meta device (no memory either): device
        # meshes compute rank tensors, which FakeTensorMode refuses (FSDP builds a dp×tp mesh for TP parameters).
        mesh = build_device_mesh(layout, "cpu")
        with torch.device("meta"), _default_dtype(build_dtype):
            model = LlamaForCausalLM(config)
            if request.lora is not None:
                from llama_ft.lora import LoraSettings, inject_lora

                spec = request.lora
                inject_lora(model, LoraSettings(r=spec.rank, dropout=spec.dropout,
                                                target_modules=list(spec.target_modules)))
        apply_layout(model, layout, mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        with FakeTensorMode(allow_non_fake_inputs=True):  # to_empty reads the meta tensors' shapes
            materialize(model, "cpu")
            model.train()
            # as the fine-tuner configures it: fused on CUDA (no temporaries), foreach on CPU (one fp32 copy)
            fused = request.optimizer == "fused"
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=fused or None, foreach=not fused or None)
            input_ids = torch.randint(0, config.vocab_size, (request.micro_batch_size, request.seq_len))
            tracker = _tracker_ignoring_sharding_propagation(model, optimizer)
            tracker.track_inputs((input_ids,))
            with tracker:
                for _ in range(ITERATIONS):
                    for _ in range(request.grad_accumulation):
                        loss = causal_lm_loss(model, input_ids, input_ids)
                        with loss_backward_context(layout.tp > 1):
                            loss.backward()
                        tracker.reset_mod_stats()  # per-module stats only; the global peak keeps every pass
                    optimizer.step()
                    optimizer.zero_grad()
            peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    finally:
        dist.destroy_process_group()
    breakdown = {str(getattr(kind, "value", kind)): int(nbytes) for kind, nbytes in peak.items()}
    total = breakdown.pop("Total")
    return SimulationResult(
        model=request.model,
        layout=layout,
        micro_batch_size=request.micro_batch_size,
        seq_len=request.seq_len,
        precision=request.precision,
        attn_implementation=request.attn_implementation,
        peak_bytes=total,
        breakdown=breakdown,
        wall_s=time.perf_counter() - start,
        grad_accumulation=request.grad_accumulation,
        optimizer=request.optimizer,
    )
