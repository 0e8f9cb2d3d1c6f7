"""Predicted per-device memory and step time of one parallel layout, for ranking layouts against each other.

Every term is one small function of the model's dimensions, the layout and the micro-batch; every number that
was chosen rather than derived lives in ``CostCoefficients`` so it can be calibrated (against the fake-tensor
memory simulation, or against measured runs) by passing a replaced instance.

Memory accounting follows what HF ``LlamaForCausalLM`` saves for backward in its SDPA forward (checked against
autograd's saved tensors in the tests), with FSDP2 mixed precision as ``apply.py`` configures it for every layout
(fp32 sharded master weights, bf16 all-gather, fp32 reduce-scatter; DDP is HSDP with one-rank shards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from llama_ft.parallel.layout import Layout
from llama_ft.parallel.specs import ClusterSpec, ModelSpec, TrainSpec

GiB = 1024**3


@dataclass(frozen=True)
class CostCoefficients:
    """Every chosen (not derived) number of the cost model, in one place, so calibration replaces only this."""

    # --- activations -------------------------------------------------------------------------------------
    # Padded batches pass an attention mask: HF then repeats K/V to all heads before SDPA (no enable_gqa), and
    # SDPA keeps its own additive compute-dtype copy of the (b, 1, s, s) mask in every layer. False models
    # unpadded/packed batches (is_causal, grouped K/V).
    padding_mask: bool = True
    # Norms and residuals are replicated across TP ranks unless the TP plan uses sequence parallelism.
    sequence_parallel: bool = False
    # HF's TP plan gathers the logits (colwise_gather_output); loss-parallel would shard them by tp.
    logits_sharded_by_tp: bool = False
    # Bytes per token per vocabulary entry kept by the loss besides the compute-dtype logits (fp32 upcast).
    loss_fp32_bytes: int = 4
    # Gradients of one layer's activations are alive while that layer runs backward: ~ one layer's saved set.
    backward_transient_layers: float = 1.0
    # --- model states and buffers ----------------------------------------------------------------------
    # ``apply.py`` wraps every layout in FSDP2 (DDP = HSDP with one-rank shards, gradients all-reduced every
    # micro-batch). False models torch DDP under autocast instead: full bf16 weight casts held from forward to
    # backward, bucket copies of the gradients, and one all-reduce per optimizer step (no_sync accumulation).
    fsdp_for_every_layout: bool = True
    fsdp_prefetch_layers: int = 2  # unsharded layers alive at once under FSDP2 (current + prefetched)
    fsdp_reduce_scatter_layers: int = 1  # layers whose unsharded grads wait for their reduce-scatter
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


def root_params_per_tp_rank(model: ModelSpec, tp: int) -> float:
    """Embedding, final norm and lm_head: the root FSDP group, gathered for the whole forward and backward."""
    return (model.embedding_params + model.lm_head_params) / tp + model.final_norm_params


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
    """HF RMSNorm upcasts its input to fp32 (saved by pow/mul), keeps the fp32 rsqrt per token, and saves the
    normalized input for its weight's gradient."""
    fp32_copy = 4 * hidden if compute_bytes < 4 else 0
    return fp32_copy + 4 + compute_bytes * hidden


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


def activation_bytes(
    model: ModelSpec, layout: Layout, micro_batch: int, seq_len: int, e: int, coeffs: CostCoefficients
) -> float:
    """Peak activation memory: all layers' saved tensors, plus one layer recomputed and its gradients in flight."""
    tp = layout.tp
    full_layer = layer_saved_bytes_no_checkpointing(model, tp, e, seq_len, coeffs)
    mode = layout.activation_checkpointing
    if mode == "none":
        kept, recomputed = full_layer, 0.0
    elif mode == "selective":
        kept = layer_saved_bytes_selective(model, tp, e, coeffs)
        recomputed = full_layer - kept
    else:
        kept, recomputed = layer_saved_bytes_full(model, tp, e, coeffs), full_layer
    per_token = model.num_layers * kept + recomputed + coeffs.backward_transient_layers * full_layer
    per_token += head_saved_bytes(model, tp, e, coeffs)
    tokens = micro_batch * seq_len
    mask = micro_batch * seq_len * seq_len  # boolean 4-D padding/causal mask, shared by all layers
    return tokens * per_token + mask


def logits_bytes(model: ModelSpec, layout: Layout, micro_batch: int, seq_len: int, e: int,
                 coeffs: CostCoefficients) -> float:
    """s·b·V·(e + 4): compute-dtype logits held by the model output, plus the fp32 upcast the loss keeps."""
    vocab = model.vocab_size / layout.tp if coeffs.logits_sharded_by_tp else model.vocab_size
    return micro_batch * seq_len * vocab * (e + coeffs.loss_fp32_bytes)


# =============================================================================================================
# Memory breakdown
# =============================================================================================================


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted peak bytes on one device, by what holds them."""

    parameters: float
    gradients: float
    optimizer_state: float
    working_weights: float  # compute-dtype copies: FSDP's gathered root group, or autocast's weight casts
    activations: float
    logits: float
    communication_buffers: float
    allowance: float
    host_bytes: float = 0.0  # CPU offload: what moved to host memory (not part of total)

    @property
    def total(self) -> float:
        return (self.parameters + self.gradients + self.optimizer_state + self.working_weights + self.activations
                + self.logits + self.communication_buffers + self.allowance)

    def as_gib(self) -> dict[str, float]:
        """Every device-side term and the total in GiB (host bytes only when offloading)."""
        out = {f.name: getattr(self, f.name) / GiB for f in fields(self) if f.name != "host_bytes"}
        if self.host_bytes:
            out["host_offload"] = self.host_bytes / GiB
        out["total"] = self.total / GiB
        return out

    def largest_terms(self, count: int = 2) -> list[tuple[str, float]]:
        """The biggest device-side terms, to say why a layout does not fit."""
        terms = [(f.name, getattr(self, f.name)) for f in fields(self) if f.name != "host_bytes"]
        return sorted(terms, key=lambda t: -t[1])[:count]


def model_state_bytes(model: ModelSpec, layout: Layout, prec: PrecisionProfile) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer state) on one device: full per TP rank, divided by dp_shard."""
    local = params_per_tp_rank(model, layout.tp) / layout.dp_shard
    return local * prec.master_bytes, local * prec.grad_bytes, local * prec.optimizer_bytes


def working_weight_bytes(model: ModelSpec, layout: Layout, prec: PrecisionProfile,
                         coeffs: CostCoefficients) -> float:
    """FSDP keeps the root group gathered from forward to backward; DDP+autocast keeps cast copies of all weights."""
    if uses_fsdp(layout, coeffs):
        return root_params_per_tp_rank(model, layout.tp) * prec.compute_bytes
    if prec.autocast:
        return matmul_params_per_tp_rank(model, layout.tp) * prec.compute_bytes
    return 0.0


def communication_buffer_bytes(
    model: ModelSpec, layout: Layout, micro_batch: int, seq_len: int, prec: PrecisionProfile,
    coeffs: CostCoefficients,
) -> float:
    """FSDP: gathered layers + unsharded grads awaiting reduce-scatter; DDP: gradient buckets; TP: staging."""
    total = 0.0
    layer = layer_params_per_tp_rank(model, layout.tp)
    if uses_fsdp(layout, coeffs):
        total += coeffs.fsdp_prefetch_layers * layer * prec.compute_bytes
        total += coeffs.fsdp_reduce_scatter_layers * layer * (prec.compute_bytes + prec.reduce_bytes)
    elif layout.dp_replicate > 1 and coeffs.ddp_bucket_copy:
        total += params_per_tp_rank(model, layout.tp) * prec.reduce_bytes
    if layout.tp > 1:
        total += 2 * micro_batch * seq_len * model.hidden_size * prec.compute_bytes
    return total


def estimate_memory(
    model: ModelSpec,
    train: TrainSpec,
    layout: Layout,
    micro_batch: int,
    coeffs: CostCoefficients = DEFAULT_COEFFICIENTS,
) -> MemoryBreakdown:
    """Predicted peak memory of one device for ``layout`` at micro-batch ``micro_batch``."""
    prec = precision_profile(train.precision, coeffs)
    e, s = prec.compute_bytes, train.seq_len
    params, grads, optim = model_state_bytes(model, layout, prec)
    host = 0.0
    if layout.cpu_offload:
        host, params, grads, optim = params + grads + optim, 0.0, 0.0, 0.0
    working = working_weight_bytes(model, layout, prec, coeffs)
    acts = activation_bytes(model, layout, micro_batch, s, e, coeffs)
    logits = logits_bytes(model, layout, micro_batch, s, e, coeffs)
    comm = communication_buffer_bytes(model, layout, micro_batch, s, prec, coeffs)
    subtotal = params + grads + optim + working + acts + logits + comm
    allowance = coeffs.workspace_bytes + coeffs.fragmentation * subtotal
    return MemoryBreakdown(params, grads, optim, working, acts, logits, comm, allowance, host)


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
