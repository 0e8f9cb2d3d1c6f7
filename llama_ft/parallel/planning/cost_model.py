"""Predicted per-device memory and step time of one parallel layout, for ranking layouts against each other.

Every term is one small function of the model's dimensions, the layout and the micro-batch; every number that
was chosen rather than derived lives in ``CostCoefficients`` so it can be calibrated (against the fake-tensor
memory simulation, or against measured runs) by passing a replaced instance.

Memory accounting follows what HF ``LlamaForCausalLM`` saves for backward in its SDPA forward (checked against
autograd's saved tensors in the tests), with FSDP2 mixed precision as ``apply.py`` configures it for every layout
(fp32 sharded master weights, bf16 all-gather, fp32 reduce-scatter; DDP is HSDP with one-rank shards).

Memory is not the sum of everything that ever exists: the peak is the largest of a few moments of the step (the
loss's backward, the LM head's gradient reduce-scatter, a decoder layer's backward, the embedding's backward and the
optimizer step), each with what is alive then. The phases and their coefficients were calibrated against the
fake-tensor simulation of the real step (``simulate.py``; ``benchmarks/planner_accuracy.py`` prints the comparison).
The ``allowance`` for workspaces and fragmentation is a separate term on top: the simulation cannot see it, so
predictions are compared with the simulation without it (``MemoryBreakdown.tensors``), while fitting uses the total.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec

GiB = 1024**3


@dataclass(frozen=True)
class CostCoefficients:
    """Every chosen (not derived) number of the cost model, in one place, so calibration replaces only this."""

    # --- activations -------------------------------------------------------------------------------------
    # Padded batches pass an attention mask: HF then repeats K/V to all heads before SDPA (no enable_gqa), and
    # SDPA keeps its own additive compute-dtype copy of the (b, 1, s, s) mask in every layer. The simulation's CPU
    # SDPA keeps exactly this even unmasked (measured). False models unpadded/packed batches on GPU flash kernels
    # (is_causal, grouped K/V).
    padding_mask: bool = True
    # Norms and residuals are replicated across TP ranks unless the TP plan uses sequence parallelism.
    sequence_parallel: bool = False
    # HF's TP plan gathers the logits (colwise_gather_output); loss-parallel would shard them by tp.
    logits_sharded_by_tp: bool = False
    # fp32 copies of the b·s·V logits alive as backward starts: the log-probabilities log_softmax saved and the
    # gradients with respect to them and to the logits (simulated: 12 bytes per token per vocabulary entry).
    loss_backward_fp32_copies: int = 3
    # Gradients of one layer's activations are alive while that layer runs backward: ~ one layer's saved set.
    backward_transient_layers: float = 1.0
    # --- model states and buffers ----------------------------------------------------------------------
    # ``apply.py`` wraps every layout in FSDP2 (DDP = HSDP with one-rank shards, gradients all-reduced every
    # micro-batch). False models torch DDP under autocast instead: full bf16 weight casts held from forward to
    # backward, bucket copies of the gradients, and one all-reduce per optimizer step (no_sync accumulation).
    fsdp_for_every_layout: bool = True
    fsdp_prefetch_layers: int = 2  # unsharded layers alive at once in backward under FSDP2 (current + prefetched)
    fsdp_lingering_gather_layers: int = 1  # tied embeddings: the last layer's all-gather buffer outlives forward
    fsdp_reduce_scatter_layers: int = 1  # layers whose gradients wait for their fp32 reduce-scatter
    # Compute-dtype V × h gradient copies at the end of backward: tied embeddings hold the LM head's gradient, the
    # lookup's and their sum; TP adds DTensor redistribution copies of them.
    tied_embedding_grad_copies: float = 3.0
    tp_embedding_grad_extra_copies: float = 2.0
    # foreach AdamW's temporaries: one more fp32 copy of the local parameters on top of the two moments.
    optimizer_step_copies: float = 1.0
    ddp_bucket_copy: bool = True  # DDP's default buckets duplicate the gradients (gradient_as_bucket_view=False)
    workspace_bytes: int = GiB // 2  # cuBLAS/NCCL workspaces and other allocations outside the model
    fragmentation: float = 0.05  # caching-allocator fragmentation, as a fraction of everything else
    host_memory_per_device_bytes: int = 200 * GiB  # host RAM one device may use for CPU offload
    # --- compute -----------------------------------------------------------------------------------------
    matmul_efficiency: float = 0.45  # achievable fraction of peak FLOP/s for large micro-batches
    half_efficiency_tokens: int = 128  # micro-batch tokens at which efficiency is half the large-batch value
    selective_recompute_forward_fraction: float = 0.1  # share of the forward re-run by selective checkpointing
    fp32_matmul_fraction: float = 0.5  # 32-true matmuls (TF32, matmul precision "high") vs bf16 peak
    layer_overhead_s: float = 50e-6  # launch/Python overhead per layer per micro-batch, forward + backward
    # --- communication -----------------------------------------------------------------------------------
    min_exposed_fraction: float = 0.05  # even fully overlapped collectives leave this share exposed
    intra_node_latency_s: float = 5e-6  # per collective step inside a node
    inter_node_latency_s: float = 15e-6  # per collective step across nodes
    # --- optimizer and offload ---------------------------------------------------------------------------
    optimizer_bytes_per_param: int = 32  # HBM traffic of a fused AdamW step (read p, g, m, v; write p, m, v)
    host_link_bandwidth: float = 25e9  # achievable PCIe bytes/s per device for CPU offload traffic
    cpu_adam_params_per_s: float = 0.25e9  # host AdamW throughput per device (cores shared by the node)


DEFAULT_COEFFICIENTS = CostCoefficients()


@dataclass(frozen=True)
class PrecisionProfile:
    """Bytes per element of each kind of tensor under one Lightning precision setting."""

    master_bytes: int  # stored parameters
    grad_bytes: int  # stored (sharded) gradients
    optimizer_bytes: int  # both AdamW moments together
    compute_bytes: int  # activations and gathered working weights
    reduce_bytes: int  # gradient reduction collectives
    autocast: bool  # mixed precision: weights cast to compute dtype on the fly
    flops_fraction: float  # matmul speed relative to the bf16 peak


def precision_profile(precision: str, coeffs: CostCoefficients = DEFAULT_COEFFICIENTS) -> PrecisionProfile:
    """Mixed precision keeps fp32 master weights, grads and Adam moments (16 B/param); "true" keeps all in one dtype."""
    if precision in ("bf16-mixed", "16-mixed"):
        return PrecisionProfile(4, 4, 8, 2, 4, True, 1.0)
    if precision in ("bf16-true", "16-true"):
        return PrecisionProfile(2, 2, 4, 2, 2, False, 1.0)
    return PrecisionProfile(4, 4, 8, 4, 4, False, coeffs.fp32_matmul_fraction)


# =============================================================================================================
# Parameters held per device
# =============================================================================================================


def uses_fsdp(layout: Layout, coeffs: CostCoefficients = DEFAULT_COEFFICIENTS) -> bool:
    """FSDP2 runs for every layout in this project; otherwise only when sharding or offloading."""
    return coeffs.fsdp_for_every_layout or layout.dp_shard > 1 or layout.cpu_offload


def params_per_tp_rank(model: ModelSpec, tp: int) -> float:
    """TP splits every projection and the embedding/output matrices; norm weights stay replicated."""
    sharded = model.num_layers * (model.attention_params_per_layer + model.mlp_params_per_layer)
    sharded += model.embedding_params + model.lm_head_params
    replicated = model.num_layers * model.norm_params_per_layer + model.final_norm_params
    return sharded / tp + replicated


def layer_params_per_tp_rank(model: ModelSpec, tp: int) -> float:
    """One decoder layer's parameters on one TP rank: the unit FSDP2 gathers and reduce-scatters."""
    return (model.attention_params_per_layer + model.mlp_params_per_layer) / tp + model.norm_params_per_layer


def matmul_params_per_tp_rank(model: ModelSpec, tp: int) -> float:
    """Weights autocast copies to the compute dtype (every projection and the output matmul)."""
    return model.matmul_params / tp


# =============================================================================================================
# Activations (bytes per token; multiply by micro-batch tokens)
# =============================================================================================================


def _shard(replicated: float, sharded: float, tp: int, coeffs: CostCoefficients) -> float:
    """Head- and intermediate-sized tensors split by tp; hidden-sized ones only under sequence parallelism."""
    return (replicated / tp if coeffs.sequence_parallel else replicated) + sharded / tp


def rmsnorm_saved_bytes(hidden: int, compute_bytes: int) -> float:
    """HF RMSNorm computes in fp32: pow/mul save its fp32 input (an upcast copy, or under 32-true the residual
    stream itself, which would otherwise be freed), it keeps the fp32 rsqrt per token, and it saves the normalized
    input for its weight's gradient."""
    return 4 * hidden + 4 + compute_bytes * hidden


def attention_saved_bytes(model: ModelSpec, tp: int, e: int, seq_len: int, coeffs: CostCoefficients) -> float:
    """Per token: norm, q/k/v input, post-RoPE q and (repeated) k/v, SDPA output (which is also o_proj's
    input: SDPA returns it in (b, s, heads, d) layout, so HF's transpose + contiguous copies nothing), the
    logsumexp, and with padding SDPA's per-layer additive mask copy."""
    kv_width = model.q_dim if coeffs.padding_mask else model.kv_dim
    replicated = rmsnorm_saved_bytes(model.hidden_size, e) + e * model.hidden_size
    sharded = e * model.q_dim + 2 * e * kv_width + e * model.q_dim + 4 * model.num_heads
    mask = e * seq_len if coeffs.padding_mask else 0.0  # (b, 1, s, s): the same on every TP rank
    return _shard(replicated, sharded, tp, coeffs) + mask


def mlp_saved_bytes(model: ModelSpec, tp: int, e: int, coeffs: CostCoefficients) -> float:
    """Per token: norm, gate/up input, then SwiGLU's gate out, silu(gate), up out and their product (4 × f)."""
    replicated = rmsnorm_saved_bytes(model.hidden_size, e) + e * model.hidden_size
    sharded = 4 * e * model.intermediate_size
    return _shard(replicated, sharded, tp, coeffs)


def layer_saved_bytes_no_checkpointing(
    model: ModelSpec, tp: int, e: int, seq_len: int, coeffs: CostCoefficients
) -> float:
    """Everything one decoder layer keeps for backward per token when nothing is recomputed."""
    return attention_saved_bytes(model, tp, e, seq_len, coeffs) + mlp_saved_bytes(model, tp, e, coeffs)


def layer_saved_bytes_selective(model: ModelSpec, tp: int, e: int, coeffs: CostCoefficients) -> float:
    """Op-level selective checkpointing: keep the layer input and matmul/SDPA outputs, recompute norms,
    RoPE, K/V repetition and SwiGLU's element-wise ops."""
    kv_width = model.kv_dim  # k/v projections are saved before repetition; repetition is recomputed
    replicated = 3 * e * model.hidden_size  # layer input, o_proj output, down_proj output
    sharded = e * (model.q_dim + 2 * kv_width) + e * model.q_dim + 4 * model.num_heads
    sharded += 2 * e * model.intermediate_size  # gate and up outputs
    return _shard(replicated, sharded, tp, coeffs)


def layer_saved_bytes_full(model: ModelSpec, tp: int, e: int, coeffs: CostCoefficients) -> float:
    """Full checkpointing keeps only each layer's input."""
    return _shard(e * model.hidden_size, 0.0, tp, coeffs)


def head_saved_bytes(model: ModelSpec, tp: int, e: int, coeffs: CostCoefficients) -> float:
    """Per token outside the layers: the final norm and the lm_head input."""
    return _shard(rmsnorm_saved_bytes(model.hidden_size, e) + e * model.hidden_size, 0.0, tp, coeffs)


def saved_activation_bytes(
    model: ModelSpec, layout: Layout, micro_batch: int, seq_len: int, e: int, coeffs: CostCoefficients
) -> float:
    """What the forward leaves for backward outside the logits: every layer's kept tensors, the final norm's and
    lm_head's inputs, and (with padding) HF's boolean 4-D mask, built once and shared by all layers."""
    per_token = model.num_layers * kept_layer_bytes(model, layout, e, seq_len, coeffs)
    per_token += head_saved_bytes(model, layout.tp, e, coeffs)
    mask = micro_batch * seq_len * seq_len if coeffs.padding_mask else 0.0
    return micro_batch * seq_len * per_token + mask


def kept_layer_bytes(model: ModelSpec, layout: Layout, e: int, seq_len: int, coeffs: CostCoefficients) -> float:
    """Per token, what one layer keeps from forward to backward under the layout's checkpointing mode."""
    mode, tp = layout.activation_checkpointing, layout.tp
    if mode == "none":
        return layer_saved_bytes_no_checkpointing(model, tp, e, seq_len, coeffs)
    if mode == "selective":
        return layer_saved_bytes_selective(model, tp, e, coeffs)
    return layer_saved_bytes_full(model, tp, e, coeffs)


def recompute_activation_bytes(
    model: ModelSpec, layout: Layout, micro_batch: int, seq_len: int, e: int, coeffs: CostCoefficients
) -> float:
    """While one layer runs backward: what checkpointing recomputes for it, plus its activation gradients."""
    full_layer = layer_saved_bytes_no_checkpointing(model, layout.tp, e, seq_len, coeffs)
    recomputed = full_layer - kept_layer_bytes(model, layout, e, seq_len, coeffs)
    return micro_batch * seq_len * (recomputed + coeffs.backward_transient_layers * full_layer)


def logits_vocab(model: ModelSpec, layout: Layout, coeffs: CostCoefficients) -> float:
    """Vocabulary entries per token on one rank: HF's TP plan gathers the logits, loss-parallel would not."""
    return model.vocab_size / layout.tp if coeffs.logits_sharded_by_tp else model.vocab_size


def logits_forward_bytes(model: ModelSpec, layout: Layout, micro_batch: int, seq_len: int, e: int,
                         coeffs: CostCoefficients) -> float:
    """s·b·V·(e + 4) at the end of forward: the compute-dtype logits the model returns and the fp32
    log-probabilities HF's loss (fp32 upcast → log_softmax → nll) saves for backward."""
    return micro_batch * seq_len * logits_vocab(model, layout, coeffs) * (e + 4)


def loss_backward_bytes(model: ModelSpec, layout: Layout, micro_batch: int, seq_len: int,
                        coeffs: CostCoefficients) -> float:
    """s·b·V·4·3 as backward starts: the saved fp32 log-probabilities and, alive together with them, the fp32
    gradients of the loss with respect to them and to the logits (the bf16 logits are already freed)."""
    return micro_batch * seq_len * logits_vocab(model, layout, coeffs) * 4 * coeffs.loss_backward_fp32_copies


# =============================================================================================================
# Memory breakdown: the peak is the largest of a few moments of the step
# =============================================================================================================


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted bytes on one device at the moment of its peak (``phase``), by what holds them.

    ``tensors`` is everything the fake-tensor simulation can see; ``allowance`` (workspaces and fragmentation) is
    added on top for fitting, and kept separate so the two can be compared with the simulation.
    """

    parameters: float
    gradients: float
    optimizer_state: float
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
        return (self.parameters + self.gradients + self.optimizer_state + self.working_weights + self.activations
                + self.logits + self.communication_buffers)

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
    """The last all-gather's buffer, alive until the next one (measured): an untied LM head's (gathered last in
    forward) until backward starts, or with tied embeddings the last decoder layer's (the root group was gathered
    first)."""
    if not shape.fsdp:
        return 0.0
    if shape.model.tied_embeddings:
        return shape.coeffs.fsdp_lingering_gather_layers * shape.layer_params * shape.prec.compute_bytes
    return 0.0 if backward_started else shape.vocab_matrix_params * shape.prec.compute_bytes


def _states(
    shape: StepShape,
    grad_params: float,
    phase: str,
    *,
    gradients: float = 0.0,
    optimizer_state: float = 0.0,
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
        optimizer_state=p * prec.optimizer_bytes + optimizer_state,
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
    upcast = 4 if e < 4 else 0
    tokens_vocab = shape.micro_batch * shape.seq_len * logits_vocab(model, shape.layout, c)
    return _states(
        shape, shape.grad_params(0.0), "end of forward",
        working_weights=held_weight_bytes(shape),
        activations=saved_activation_bytes(model, shape.layout, shape.micro_batch, shape.seq_len, e, c),
        logits=logits_forward_bytes(model, shape.layout, shape.micro_batch, shape.seq_len, e, c)
        + tokens_vocab * upcast,
        communication_buffers=comm,
    )


def loss_backward_memory(shape: StepShape) -> MemoryBreakdown:
    """Backward's first moment: every layer's saved activations and the loss's fp32 gradients over the vocabulary
    (the peak without checkpointing, and with it whenever the logits outweigh the optimizer step)."""
    e, c = shape.prec.compute_bytes, shape.coeffs
    comm = lingering_gather_bytes(shape, backward_started=True) + ddp_bucket_bytes(shape) + tp_staging_bytes(shape)
    return _states(
        shape, shape.grad_params(0.0), "loss backward",
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
        logits=shape.micro_batch * shape.seq_len * logits_vocab(model, shape.layout, c) * e,
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
    (one more fp32 copy of the local parameters), and nothing gathered."""
    copy = shape.coeffs.optimizer_step_copies * shape.device_params * shape.prec.master_bytes
    return _states(shape, shape.device_params, "optimizer step", optimizer_state=copy,
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
    accumulation = train.global_batch_size // max(1, micro_batch * layout.dp_size)
    shape = StepShape(model, layout, micro_batch, train.seq_len, precision_profile(train.precision, coeffs), coeffs,
                      accumulation > 1)
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


# =============================================================================================================
# Step time
# =============================================================================================================


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one optimizer step on one device, by where the time goes."""

    compute_s: float
    exposed_communication_s: float
    communication_s: float  # all collective time before overlap, for reference
    optimizer_s: float
    offload_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.exposed_communication_s + self.optimizer_s + self.offload_s + self.overhead_s


def flops_per_token(model: ModelSpec, seq_len: int) -> float:
    """PaLM's count: 6 FLOPs per matmul weight per token (2 forward, 4 backward) plus 12·L·h·s for attention."""
    return 6 * model.matmul_params + 12 * model.num_layers * model.q_dim * seq_len


def recompute_factor(layout: Layout, coeffs: CostCoefficients) -> float:
    """Full checkpointing re-runs the forward (6 → 8 FLOPs per weight, ×4/3); selective re-runs a small part."""
    if layout.activation_checkpointing == "full":
        return 4 / 3
    if layout.activation_checkpointing == "selective":
        return 1 + coeffs.selective_recompute_forward_fraction / 3
    return 1.0


def achieved_flops(cluster: ClusterSpec, prec: PrecisionProfile, tokens: int, coeffs: CostCoefficients) -> float:
    """Small micro-batches make thin matmuls; efficiency saturates as tokens per micro-batch grow."""
    size_factor = tokens / (tokens + coeffs.half_efficiency_tokens)
    return cluster.peak_flops * prec.flops_fraction * coeffs.matmul_efficiency * size_factor


def group_link(cluster: ClusterSpec, size: int, stride: int, coeffs: CostCoefficients) -> tuple[float, float]:
    """(bandwidth, per-step latency) of a process group of ``size`` ranks ``stride`` apart: in-node or not."""
    if size * stride <= cluster.devices_per_node:
        return cluster.intra_node_bandwidth, coeffs.intra_node_latency_s
    return cluster.inter_node_bandwidth, coeffs.inter_node_latency_s


def ring_all_gather_s(nbytes: float, ranks: int, link: tuple[float, float], collectives: int = 1) -> float:
    """Ring all-gather/reduce-scatter moves (N-1)/N of the full buffer through each device's link."""
    if ranks <= 1:
        return 0.0
    bandwidth, latency = link
    return (ranks - 1) / ranks * nbytes / bandwidth + collectives * latency * (1 + math.log2(ranks))


def ring_all_reduce_s(nbytes: float, ranks: int, link: tuple[float, float], collectives: int = 1) -> float:
    """Ring all-reduce = reduce-scatter + all-gather: 2(N-1)/N of the buffer per device."""
    if ranks <= 1:
        return 0.0
    return 2 * ring_all_gather_s(nbytes, ranks, link, collectives)


def overlapped(comm_s: float, compute_s: float, coeffs: CostCoefficients) -> float:
    """Collectives issued ahead of compute hide behind it; what does not fit, and a small share, is exposed."""
    return max(comm_s - compute_s, coeffs.min_exposed_fraction * comm_s)


def fsdp_microbatch_comm_s(
    model: ModelSpec, cluster: ClusterSpec, layout: Layout, prec: PrecisionProfile, coeffs: CostCoefficients
) -> tuple[float, float, float]:
    """(forward, backward, first-layer) seconds: all-gather in forward, all-gather + reduce-scatter in backward
    within the shard group (tp ranks apart), and HSDP's all-reduce of the shards across replicas."""
    local = params_per_tp_rank(model, layout.tp)
    layer = layer_params_per_tp_rank(model, layout.tp)
    groups = model.num_layers + 1
    shard_link = group_link(cluster, layout.dp_shard, layout.tp, coeffs)
    gather = ring_all_gather_s(local * prec.compute_bytes, layout.dp_shard, shard_link, groups)
    scatter = ring_all_gather_s(local * prec.reduce_bytes, layout.dp_shard, shard_link, groups)
    replicas = 0.0
    if layout.dp_replicate > 1:
        replica_link = group_link(cluster, layout.dp_replicate, layout.dp_shard * layout.tp, coeffs)
        replicas = ring_all_reduce_s(local / layout.dp_shard * prec.reduce_bytes, layout.dp_replicate,
                                     replica_link, groups)
    first_layer = ring_all_gather_s(layer * prec.compute_bytes, layout.dp_shard, shard_link)
    return gather, gather + scatter + replicas, first_layer


def ddp_step_comm_s(model: ModelSpec, cluster: ClusterSpec, layout: Layout, prec: PrecisionProfile,
                    coeffs: CostCoefficients) -> float:
    """DDP all-reduces every gradient once per optimizer step (no_sync during accumulation), in buckets."""
    link = group_link(cluster, layout.dp_replicate, layout.tp, coeffs)
    nbytes = params_per_tp_rank(model, layout.tp) * prec.reduce_bytes
    buckets = max(1, math.ceil(nbytes / 25e6))
    return ring_all_reduce_s(nbytes, layout.dp_replicate, link, buckets)


def tp_microbatch_comm_s(model: ModelSpec, cluster: ClusterSpec, layout: Layout, micro_batch: int, seq_len: int,
                         prec: PrecisionProfile, coeffs: CostCoefficients) -> float:
    """TP all-reduces b·s·h activations 4× per layer per micro-batch (2 forward, 2 backward; +2 when full
    recompute re-runs the forward), plus the embedding's and lm_head's; on the critical path, so exposed."""
    if layout.tp <= 1:
        return 0.0
    link = group_link(cluster, layout.tp, 1, coeffs)
    per_layer = 4 + (2 if layout.activation_checkpointing == "full" else 0)
    count = model.num_layers * per_layer + 2
    activation = micro_batch * seq_len * model.hidden_size * prec.compute_bytes
    logits = 0.0 if coeffs.logits_sharded_by_tp else micro_batch * seq_len * model.vocab_size * prec.compute_bytes
    return ring_all_reduce_s(count * activation, layout.tp, link, count) + ring_all_gather_s(logits, layout.tp, link)


def offload_microbatch_s(model: ModelSpec, layout: Layout, prec: PrecisionProfile, coeffs: CostCoefficients) -> float:
    """CPU offload copies the parameter shard to the device twice (forward, backward) and the gradients back."""
    if not layout.cpu_offload:
        return 0.0
    shard = params_per_tp_rank(model, layout.tp) / layout.dp_shard
    return shard * (2 * prec.master_bytes + prec.grad_bytes) / coeffs.host_link_bandwidth


def optimizer_step_s(model: ModelSpec, cluster: ClusterSpec, layout: Layout, coeffs: CostCoefficients) -> float:
    """AdamW is memory-bound: its shard's bytes over HBM bandwidth, or host AdamW speed when offloaded."""
    shard = params_per_tp_rank(model, layout.tp) / layout.dp_shard
    if layout.cpu_offload:
        return shard / coeffs.cpu_adam_params_per_s
    return shard * coeffs.optimizer_bytes_per_param / cluster.hbm_bandwidth


def estimate_step_time(
    model: ModelSpec,
    cluster: ClusterSpec,
    train: TrainSpec,
    layout: Layout,
    micro_batch: int,
    grad_accumulation: int,
    coeffs: CostCoefficients = DEFAULT_COEFFICIENTS,
) -> StepTime:
    """Predicted seconds per optimizer step: compute + communication not hidden + optimizer + offload + overhead."""
    prec = precision_profile(train.precision, coeffs)
    tokens = micro_batch * train.seq_len
    factor = recompute_factor(layout, coeffs)
    mb_compute = tokens * flops_per_token(model, train.seq_len) * factor / layout.tp / achieved_flops(
        cluster, prec, tokens, coeffs)
    forward = mb_compute / (3 * factor)  # the forward's 2 of 6 FLOPs per weight
    backward = mb_compute - forward

    mb_exposed = mb_comm = 0.0
    if uses_fsdp(layout, coeffs):
        fwd_comm, bwd_comm, first = fsdp_microbatch_comm_s(model, cluster, layout, prec, coeffs)
        mb_comm += fwd_comm + bwd_comm
        mb_exposed += overlapped(fwd_comm, forward, coeffs) + overlapped(bwd_comm, backward, coeffs) + first
    tp_comm = tp_microbatch_comm_s(model, cluster, layout, micro_batch, train.seq_len, prec, coeffs)
    mb_comm += tp_comm
    mb_exposed += tp_comm

    step_comm = step_exposed = 0.0
    if not uses_fsdp(layout, coeffs) and layout.dp_replicate > 1:
        step_comm = ddp_step_comm_s(model, cluster, layout, prec, coeffs)
        step_exposed = overlapped(step_comm, backward, coeffs)

    offload = offload_microbatch_s(model, layout, prec, coeffs) * grad_accumulation
    return StepTime(
        compute_s=mb_compute * grad_accumulation,
        exposed_communication_s=mb_exposed * grad_accumulation + step_exposed,
        communication_s=mb_comm * grad_accumulation + step_comm,
        optimizer_s=optimizer_step_s(model, cluster, layout, coeffs),
        offload_s=offload,
        overhead_s=coeffs.layer_overhead_s * model.num_layers * grad_accumulation,
    )


def model_flops_per_step(model: ModelSpec, train: TrainSpec) -> float:
    """Useful FLOPs of one optimizer step (no recompute), the numerator of MFU."""
    return train.tokens_per_step * flops_per_token(model, train.seq_len)

