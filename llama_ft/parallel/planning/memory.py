"""Predicted peak memory of one device for one layout and micro-batch, to tell which layouts fit.

The peak is not the sum of everything that ever exists but the largest of a few moments of the step (the end of
forward, the loss's backward, the LM head's gradient reduce-scatter, a decoder layer's backward, the embedding's
backward, the optimizer step), each with what is alive then. FSDP2 mixed precision is modelled as
``applying/apply.py`` configures it for every layout (fp32 sharded master weights, bf16 all-gather, fp32
reduce-scatter; DDP is HSDP with one-rank shards). The phases were calibrated against the fake-tensor simulation
(``simulate.py``); ``benchmarks/results/planner_accuracy.md`` has the comparison.

The ``allowance`` for workspaces and fragmentation is a separate term on top: the simulation cannot see it, so
predictions are compared with the simulation without it (``MemoryBreakdown.tensors``), while fitting uses the total.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.activations import (
    logits_forward_bytes,
    logits_tokens,
    logits_vocab,
    loss_backward_bytes,
    recompute_activation_bytes,
    saved_activation_bytes,
)
from llama_ft.parallel.planning.coefficients import (
    DEFAULT_COEFFICIENTS,
    CostCoefficients,
    PrecisionProfile,
    layer_params_per_tp_rank,
    matmul_params_per_tp_rank,
    params_per_tp_rank,
    precision_profile,
    uses_fsdp,
)
from llama_ft.parallel.planning.specs import ModelSpec, TrainSpec
from llama_ft.parallel.planning.units import GiB


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted bytes on one device at the moment of its peak (``phase``), by what holds them.

    ``tensors`` is everything the fake-tensor simulation can see; ``allowance`` (workspaces and fragmentation) is
    added on top for fitting, and kept separate so the two can be compared with the simulation.
    """

    parameters: float
    gradients: float
    adam_moments: float  # AdamW's two moments (exp_avg, exp_avg_sq)
    optimizer_temporaries: float  # transient copies the optimizer step makes (foreach AdamW: one per parameter)
    working_weights: float  # gathered compute-dtype weights held across phases (root/LM-head group, autocast casts)
    activations: float
    logits: float
    communication_buffers: float  # per-layer all-gather and reduce-scatter buffers, DDP buckets, TP staging
    allowance: float = 0.0
    host_bytes: float = 0.0  # CPU offload: what moved to host memory (not part of total)
    phase: str = "backward"

    @property
    def tensors(self) -> float:
        """Everything but the allowance: what the memory simulation measures."""
        return (self.parameters + self.gradients + self.adam_moments + self.optimizer_temporaries
                + self.working_weights + self.activations + self.logits + self.communication_buffers)

    @property
    def total(self) -> float:
        return self.tensors + self.allowance

    def as_gib(self) -> dict[str, float]:
        """Every device-side term and the total in GiB (host bytes only when offloading)."""
        out = {f.name: getattr(self, f.name) / GiB for f in fields(self) if f.name not in ("host_bytes", "phase")}
        if self.host_bytes:
            out["host_offload"] = self.host_bytes / GiB
        out["total"] = self.total / GiB
        return out

    def largest_terms(self, count: int = 2) -> list[tuple[str, float]]:
        """The biggest device-side terms, to say why a layout does not fit."""
        terms = [(f.name, getattr(self, f.name)) for f in fields(self) if f.name not in ("host_bytes", "phase")]
        return sorted(terms, key=lambda t: -t[1])[:count]


@dataclass(frozen=True)
class StepShape:
    """What every phase needs: sizes per device, the precision's byte counts, and whether gradients persist."""

    model: ModelSpec
    layout: Layout
    micro_batch: int
    seq_len: int
    prec: PrecisionProfile
    coeffs: CostCoefficients
    accumulating: bool  # more than one micro-batch per step: sharded gradients live through every backward
    fused_optimizer: bool = True  # fused AdamW (CUDA) steps in place; foreach (CPU) makes a copy of the parameters

    @property
    def local_params(self) -> float:
        """Parameters this device stores: one TP shard, divided over the FSDP shard group."""
        return params_per_tp_rank(self.model, self.layout.tp) / self.layout.dp_shard

    @property
    def device_params(self) -> float:
        """Local parameters whose fp32 states (master, gradient, moments) stay on the device: none when offloaded."""
        return 0.0 if self.layout.cpu_offload else self.local_params

    @property
    def fsdp(self) -> bool:
        return uses_fsdp(self.layout, self.coeffs)

    @property
    def layer_params(self) -> float:
        return layer_params_per_tp_rank(self.model, self.layout.tp)

    @property
    def vocab_matrix_params(self) -> float:
        """One V × h matrix on one TP rank: the embedding, and the LM head when untied."""
        return self.model.embedding_params / self.layout.tp

    def grad_params(self, done: float) -> float:
        """Local parameters with a sharded gradient: all of them while accumulating (earlier micro-batches left
        theirs), else the share of the step's backward ``done`` so far (0 … 1), up to the embedding's."""
        if self.accumulating or not self.device_params:
            return self.device_params
        before_embedding = self.device_params - self.vocab_matrix_params / self.layout.dp_shard
        return done * before_embedding


def chunked_head_grad_bytes(shape: StepShape) -> float:
    """Without TP the loss runs chunk by chunk: from the second chunk's backward on, the LM head's compute-dtype
    gradient accumulated so far sits beside the chunk's logits (simulated)."""
    tokens = shape.micro_batch * shape.seq_len
    if shape.layout.tp > 1 or tokens <= shape.coeffs.loss_chunk_tokens:
        return 0.0
    return shape.vocab_matrix_params * shape.prec.compute_bytes


def held_weight_bytes(shape: StepShape, lm_head_done: bool = False) -> float:
    """Compute-dtype weights held gathered across phases: FSDP keeps the LM head gathered from forward until its
    own backward is done (``reshard_after_forward=False``), and with tied embeddings the root group holding the
    shared matrix throughout; torch DDP under autocast keeps a cast copy of every matmul weight."""
    if shape.fsdp:
        if lm_head_done and not shape.model.tied_embeddings:
            return 0.0
        return (shape.vocab_matrix_params + shape.model.final_norm_params) * shape.prec.compute_bytes
    if shape.prec.autocast:
        return matmul_params_per_tp_rank(shape.model, shape.layout.tp) * shape.prec.compute_bytes
    return 0.0


def ddp_bucket_bytes(shape: StepShape) -> float:
    """torch DDP's gradient buckets, a second copy of the gradients (``gradient_as_bucket_view=False``)."""
    if shape.fsdp or shape.layout.dp_replicate == 1 or not shape.coeffs.ddp_bucket_copy:
        return 0.0
    return params_per_tp_rank(shape.model, shape.layout.tp) * shape.prec.reduce_bytes


def tp_staging_bytes(shape: StepShape) -> float:
    """TP all-reduce staging for one b·s·h activation in and out."""
    if shape.layout.tp == 1:
        return 0.0
    return 2 * shape.micro_batch * shape.seq_len * shape.model.hidden_size * shape.prec.compute_bytes


def lingering_gather_bytes(shape: StepShape, backward_started: bool) -> float:
    """The newest all-gather's buffer, alive until the next one (simulated): an untied LM head's (gathered last in
    forward) until backward starts; from then on, and throughout with tied embeddings (the root group was gathered
    first), a decoder layer's: the last layer's, which FSDP2 prefetches as the LM head's backward begins."""
    if not shape.fsdp:
        return 0.0
    if shape.model.tied_embeddings or backward_started:
        return shape.coeffs.fsdp_lingering_gather_layers * shape.layer_params * shape.prec.compute_bytes
    return shape.vocab_matrix_params * shape.prec.compute_bytes


def _states(
    shape: StepShape,
    grad_params: float,
    phase: str,
    *,
    gradients: float = 0.0,
    optimizer_temporaries: float = 0.0,
    working_weights: float = 0.0,
    activations: float = 0.0,
    logits: float = 0.0,
    communication_buffers: float = 0.0,
) -> MemoryBreakdown:
    """A phase's breakdown: the sharded parameters and Adam moments (from the second step on they always exist),
    the sharded gradients of ``grad_params`` local parameters, plus the phase's own terms."""
    p, prec = shape.device_params, shape.prec
    return MemoryBreakdown(
        parameters=p * prec.master_bytes,
        gradients=grad_params * prec.grad_bytes + gradients,
        adam_moments=p * prec.optimizer_bytes,
        optimizer_temporaries=optimizer_temporaries,
        working_weights=working_weights,
        activations=activations,
        logits=logits,
        communication_buffers=communication_buffers,
        phase=phase,
    )


def forward_end_memory(shape: StepShape) -> MemoryBreakdown:
    """The loss, at the end of forward: all saved activations, the logits with the loss's fp32 upcast and its fp32
    log-probabilities, and the LM head gathered (an untied one still beside its all-gather buffer)."""
    e, c, model = shape.prec.compute_bytes, shape.coeffs, shape.model
    comm = ddp_bucket_bytes(shape) + tp_staging_bytes(shape) + lingering_gather_bytes(shape, backward_started=False)
    return _states(
        shape, shape.grad_params(0.0), "end of forward",
        working_weights=held_weight_bytes(shape),
        activations=saved_activation_bytes(model, shape.layout, shape.micro_batch, shape.seq_len, e, c),
        logits=logits_forward_bytes(model, shape.layout, shape.micro_batch, shape.seq_len, e, c),
        communication_buffers=comm,
    )


def loss_backward_memory(shape: StepShape) -> MemoryBreakdown:
    """Backward's first moment: every layer's saved activations and the loss's fp32 gradients over the vocabulary
    (the peak without checkpointing, and with it whenever the logits outweigh the optimizer step)."""
    e, c = shape.prec.compute_bytes, shape.coeffs
    comm = lingering_gather_bytes(shape, backward_started=True) + ddp_bucket_bytes(shape) + tp_staging_bytes(shape)
    return _states(
        shape, shape.grad_params(0.0), "loss backward",
        gradients=chunked_head_grad_bytes(shape),
        working_weights=held_weight_bytes(shape),
        activations=saved_activation_bytes(shape.model, shape.layout, shape.micro_batch, shape.seq_len, e, c),
        logits=loss_backward_bytes(shape.model, shape.layout, shape.micro_batch, shape.seq_len, c),
        communication_buffers=comm,
    )


def layer_backward_memory(shape: StepShape) -> MemoryBreakdown:
    """The first decoder layer's backward: all saved activations, the layer recomputed (under checkpointing) with
    its activation gradients, gathered layers, and its unsharded gradient on its way to a reduce-scatter. With
    Llama's vocabulary the loss outweighs it; a small vocabulary or very long sequences make it the peak."""
    e, c, prec = shape.prec.compute_bytes, shape.coeffs, shape.prec
    comm = ddp_bucket_bytes(shape) + tp_staging_bytes(shape)
    if shape.fsdp:
        cast = prec.reduce_bytes if prec.reduce_bytes != e else 0  # the gradient's copy in the reduce dtype
        comm += c.fsdp_prefetch_layers * shape.layer_params * e
        comm += c.fsdp_reduce_scatter_layers * shape.layer_params * (e + cast)
    args = (shape.model, shape.layout, shape.micro_batch, shape.seq_len, e, c)
    return _states(
        shape, shape.grad_params(0.0), "layer backward",
        working_weights=held_weight_bytes(shape, lm_head_done=True),
        activations=saved_activation_bytes(*args) + recompute_activation_bytes(*args),
        communication_buffers=comm,
    )


def last_layer_reduce_memory(shape: StepShape) -> MemoryBreakdown:
    """The last decoder layer's gradient reduce-scatter, with nearly all gradients sharded: the layer still gathered,
    its compute-dtype gradient, the reduce-dtype copy and sharded output, and the next all-gather's buffer (untied:
    the embedding's, prefetched for its backward). Measured as the peak of Llama-3-70B under FSDP 64."""
    prec, model = shape.prec, shape.model
    if not shape.fsdp:
        return last_layer_backward_memory(shape)
    e, r = prec.compute_bytes, prec.reduce_bytes
    layer = shape.layer_params
    cast = r if r != e else 0
    comm = layer * (2 * e + cast + r / shape.layout.dp_shard)
    if not model.tied_embeddings:
        comm += shape.vocab_matrix_params * e
    this_layer = 0.0 if shape.accumulating else layer / shape.layout.dp_shard
    return _states(shape, shape.grad_params(1.0) - this_layer, "last layer reduce-scatter",
                   working_weights=held_weight_bytes(shape, lm_head_done=True), communication_buffers=comm)


def last_layer_backward_memory(shape: StepShape) -> MemoryBreakdown:
    """Right after it: every layer's gradient is sharded, the last reduce-scatter's buffer not yet released, and the
    embedding is gathered for its own backward (untied: measured as its all-gather buffer plus
    its unsharded weight; tied: the root group, gathered all along)."""
    prec, c, model = shape.prec, shape.coeffs, shape.model
    comm = ddp_bucket_bytes(shape)
    working = held_weight_bytes(shape, lm_head_done=True)
    if shape.fsdp:
        comm += c.fsdp_reduce_scatter_layers * shape.layer_params * prec.reduce_bytes
        if not model.tied_embeddings:
            working = shape.vocab_matrix_params * prec.compute_bytes
            comm += working
    return _states(shape, shape.grad_params(1.0), "last layer backward", working_weights=working,
                   communication_buffers=comm)


def vocab_grad_reduce_bytes(shape: StepShape) -> float:
    """FSDP2 reduce-scattering a V × h gradient: its copy in the reduce dtype (fp32 under bf16-mixed; none when the
    gradient already is in it) and the sharded output."""
    if not shape.fsdp:
        return 0.0
    prec = shape.prec
    cast = prec.reduce_bytes if prec.reduce_bytes != prec.compute_bytes else 0
    return shape.vocab_matrix_params * (cast + prec.reduce_bytes / shape.layout.dp_shard)


def lm_head_backward_memory(shape: StepShape) -> MemoryBreakdown:
    """Right after the loss, while all layers' activations are still saved: the LM head computes its weight gradient
    beside its gathered weight and the logits' gradient, with the first layer gathered for backward. With tied
    embeddings the gradient then accumulates in the gathered root group."""
    e, c, model = shape.prec.compute_bytes, shape.coeffs, shape.model
    gathered = shape.layer_params * e if shape.fsdp else 0.0
    return _states(
        shape, shape.grad_params(0.0), "LM head backward",
        gradients=shape.vocab_matrix_params * e,
        working_weights=held_weight_bytes(shape),
        activations=saved_activation_bytes(model, shape.layout, shape.micro_batch, shape.seq_len, e, c),
        logits=logits_tokens(shape.layout, shape.micro_batch, shape.seq_len, c) * logits_vocab(model, shape.layout, c)
        * e,
        communication_buffers=gathered + ddp_bucket_bytes(shape) + tp_staging_bytes(shape),
    )


def lm_head_reduce_memory(shape: StepShape) -> MemoryBreakdown:
    """An untied LM head's gradient reduce-scatter (its own FSDP group), activations still saved: the fp32 copy and
    the sharded output beside one compute-dtype V × h tensor (the gradient, or the weight not yet resharded); the
    logits' gradient is freed by then. The peak of untied models under bf16-mixed when the logits are small."""
    e, c, model = shape.prec.compute_bytes, shape.coeffs, shape.model
    if model.tied_embeddings or not shape.fsdp:
        return lm_head_backward_memory(shape)
    return _states(
        shape, shape.grad_params(0.0), "LM head reduce-scatter",
        gradients=shape.vocab_matrix_params * e,
        activations=saved_activation_bytes(model, shape.layout, shape.micro_batch, shape.seq_len, e, c),
        communication_buffers=shape.layer_params * e + vocab_grad_reduce_bytes(shape) + tp_staging_bytes(shape),
    )


def embedding_backward_memory(shape: StepShape) -> MemoryBreakdown:
    """Backward's last moment. Tied embeddings: the root group stays gathered while the LM head's gradient, the
    lookup's and their sum coexist, the last layer's reduce-scatter still in flight. Untied: the embedding's own
    gradient is reduce-scattered like the LM head's was (the layer's reduce-scatter buffers are released by then)."""
    prec, c = shape.prec, shape.coeffs
    tied = shape.model.tied_embeddings
    copies = c.tied_embedding_grad_copies if tied else 1.0
    if shape.layout.tp > 1:
        copies += c.tp_embedding_grad_extra_copies
    comm = ddp_bucket_bytes(shape)
    if shape.fsdp:
        comm += c.fsdp_reduce_scatter_layers * shape.layer_params * prec.reduce_bytes if tied else (
            vocab_grad_reduce_bytes(shape))
    return _states(
        shape, shape.grad_params(1.0), "embedding backward",
        gradients=copies * shape.vocab_matrix_params * prec.compute_bytes,
        working_weights=held_weight_bytes(shape, lm_head_done=True),
        communication_buffers=comm,
    )


def optimizer_step_memory(shape: StepShape) -> MemoryBreakdown:
    """The optimizer step: sharded parameters, gradients and moments, plus the temporaries ``foreach`` AdamW makes
    (one more fp32 copy of the local parameters; fused AdamW makes none), and nothing gathered."""
    copies = 0.0 if shape.fused_optimizer else shape.coeffs.optimizer_step_copies
    copy = copies * shape.device_params * shape.prec.master_bytes
    return _states(shape, shape.device_params, "optimizer step", optimizer_temporaries=copy,
                   communication_buffers=ddp_bucket_bytes(shape))


PHASES: tuple[Callable[[StepShape], MemoryBreakdown], ...] = (
    forward_end_memory,
    loss_backward_memory,
    lm_head_backward_memory,
    lm_head_reduce_memory,
    layer_backward_memory,
    last_layer_reduce_memory,
    last_layer_backward_memory,
    embedding_backward_memory,
    optimizer_step_memory,
)


def allowance_bytes(tensors: float, coeffs: CostCoefficients = DEFAULT_COEFFICIENTS) -> float:
    """Workspaces plus fragmentation on top of ``tensors``: memory a device loses that no tensor accounts for."""
    return coeffs.workspace_bytes + coeffs.fragmentation * tensors


def estimate_memory(
    model: ModelSpec,
    train: TrainSpec,
    layout: Layout,
    micro_batch: int,
    coeffs: CostCoefficients = DEFAULT_COEFFICIENTS,
) -> MemoryBreakdown:
    """Predicted peak memory of one device for ``layout`` at micro-batch ``micro_batch``: the largest phase of the
    step, plus the allowance. Gradient accumulation (``train``'s global batch over micro-batch × data-parallel
    size > 1) keeps the sharded gradients alive through every backward. With CPU offload the sharded states (and
    the optimizer step) live on the host (``host_bytes``)."""
    if train.lora is not None:  # frozen base, trainable adapters: its own model (lora_memory.py)
        from llama_ft.parallel.planning.lora_memory import estimate_lora_memory

        return estimate_lora_memory(model, train, layout, micro_batch, coeffs)
    accumulation = train.global_batch_size // max(1, micro_batch * layout.dp_size)
    shape = StepShape(model, layout, micro_batch, train.seq_len, precision_profile(train.precision, coeffs), coeffs,
                      accumulation > 1, train.fused_optimizer)
    peak = max((phase(shape) for phase in PHASES), key=lambda memory: memory.tensors)
    prec = shape.prec
    host = 0.0
    if layout.cpu_offload:
        host = shape.local_params * (prec.master_bytes + prec.grad_bytes + prec.optimizer_bytes)
    return replace(peak, allowance=allowance_bytes(peak.tensors, coeffs), host_bytes=host)


def tracked_peak_bytes(model: ModelSpec, train: TrainSpec, layout: Layout, micro_batch: int,
                       coeffs: CostCoefficients = DEFAULT_COEFFICIENTS) -> float:
    """The predicted peak without the allowance: the number to compare with the memory simulation."""
    return estimate_memory(model, train, layout, micro_batch, coeffs).tensors
