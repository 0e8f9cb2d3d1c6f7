"""Predicted seconds per optimizer step of one layout, to rank the layouts that fit against each other.

Compute runs at the accelerator's calibrated matmul efficiency, lower for narrow layers and small micro-batches, on the
tokens rows really hold after batching; collectives follow ring all-gather / all-reduce costs over the link their
process group spans (a ring over whole nodes uses every NIC of each node) and hide behind compute except for a small
share; the optimizer step is memory-bound, and CPU offload adds PCIe traffic and host AdamW. Calibrated against
published GPU runs: benchmarks/results/planner_vs_published.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.coefficients import (
    DEFAULT_COEFFICIENTS,
    CostCoefficients,
    PrecisionProfile,
    layer_params_per_tp_rank,
    params_per_tp_rank,
    precision_profile,
    uses_fsdp,
)
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec


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


def flops_per_token(model: ModelSpec, seq_len: float) -> float:
    """PaLM's count: 6 FLOPs per matmul weight per token (2 forward, 4 backward) plus 12·L·h·s for attention."""
    return 6 * model.matmul_params + 12 * model.num_layers * model.q_dim * seq_len


def recompute_factor(layout: Layout, coeffs: CostCoefficients) -> float:
    """Full checkpointing re-runs the forward (6 → 8 FLOPs per weight, ×4/3); selective re-runs a small part."""
    if layout.activation_checkpointing == "full":
        return 4 / 3
    if layout.activation_checkpointing == "selective":
        return 1 + coeffs.selective_recompute_forward_fraction / 3
    return 1.0


def matmul_efficiency(model: ModelSpec, cluster: ClusterSpec, tp: int, tokens: float,
                      coeffs: CostCoefficients) -> float:
    """Achieved share of peak: the accelerator's large-model efficiency, lower for narrow layers and for micro-batches
    of few tokens (thin matmuls, launch-bound kernels). TP divides one of each weight's two dimensions, so the
    width a rank's matmuls behave like is the geometric mean: hidden / sqrt(tp)."""
    width = model.hidden_size / math.sqrt(tp)
    width_factor = width / (width + coeffs.half_efficiency_width)
    size_factor = tokens / (tokens + coeffs.half_efficiency_tokens)
    return cluster.matmul_efficiency * width_factor * size_factor


def group_link(cluster: ClusterSpec, size: int, stride: int, coeffs: CostCoefficients) -> tuple[float, float]:
    """(bandwidth, per-step latency) of a process group of ``size`` ranks ``stride`` apart.

    Inside a node it is NVLink. Across nodes a ring enters and leaves each node once per channel, and NCCL runs one
    channel per NIC, so a group with ``m`` members on each node uses ``m`` NICs of every node (a ring over all GPUs of
    each node: the whole node's bandwidth; an HSDP replica group, one member per node: one GPU's share) — capped by
    NVLink, which carries the in-node hops.
    """
    if size * stride <= cluster.devices_per_node:
        return cluster.intra_node_bandwidth, coeffs.intra_node_latency_s
    members_per_node = max(1, min(size, cluster.devices_per_node // stride))
    bandwidth = min(cluster.intra_node_bandwidth, cluster.inter_node_bandwidth * members_per_node)
    return bandwidth, coeffs.inter_node_latency_s


def ring_all_gather_s(nbytes: float, ranks: int, link: tuple[float, float], collectives: int = 1) -> float:
    """Ring all-gather/reduce-scatter moves (N-1)/N of the full buffer through each device's link, in N-1 steps
    that each pay the link's latency: on thousands of ranks the steps, not the bytes, bound small per-layer shards."""
    if ranks <= 1:
        return 0.0
    bandwidth, latency = link
    return (ranks - 1) / ranks * nbytes / bandwidth + collectives * latency * (ranks - 1)


def ring_all_reduce_s(nbytes: float, ranks: int, link: tuple[float, float], collectives: int = 1) -> float:
    """Ring all-reduce = reduce-scatter + all-gather: 2(N-1)/N of the buffer per device."""
    if ranks <= 1:
        return 0.0
    return 2 * ring_all_gather_s(nbytes, ranks, link, collectives)


def overlapped(comm_s: float, compute_s: float, coeffs: CostCoefficients) -> float:
    """Exposed seconds of collectives issued ahead of compute: what outlasts the compute, or, when they fit, the
    slowdown they cause to the compute they run beside (contention for SMs), whichever is longer."""
    return max(comm_s - compute_s, coeffs.overlap_compute_slowdown * min(comm_s, compute_s))


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


def tp_microbatch_comm_s(model: ModelSpec, cluster: ClusterSpec, layout: Layout, micro_batch: int, seq_len: float,
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
    if train.lora is not None:  # frozen base: its own model (lora_time.py)
        from llama_ft.parallel.planning.lora_time import estimate_lora_step_time

        return estimate_lora_step_time(model, cluster, train, layout, micro_batch, grad_accumulation, coeffs)
    prec = precision_profile(train.precision, coeffs)
    row = train.computed_tokens_per_row
    tokens = micro_batch * row
    factor = recompute_factor(layout, coeffs)
    flops = cluster.peak_flops * prec.flops_fraction * matmul_efficiency(model, cluster, layout.tp, tokens, coeffs)
    mb_compute = tokens * flops_per_token(model, row) * factor / layout.tp / flops
    forward = mb_compute / (3 * factor)  # the forward's 2 of 6 FLOPs per weight
    backward = mb_compute - forward

    mb_exposed = mb_comm = 0.0
    if uses_fsdp(layout, coeffs):
        fwd_comm, bwd_comm, first = fsdp_microbatch_comm_s(model, cluster, layout, prec, coeffs)
        mb_comm += fwd_comm + bwd_comm
        mb_exposed += overlapped(fwd_comm, forward, coeffs) + overlapped(bwd_comm, backward, coeffs) + first
    tp_comm = tp_microbatch_comm_s(model, cluster, layout, micro_batch, row, prec, coeffs)
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
    """Useful FLOPs of one optimizer step (real tokens, no recompute), the numerator of MFU."""
    if train.lora is not None:
        from llama_ft.parallel.planning.lora_time import lora_flops_per_token

        return train.tokens_per_step * lora_flops_per_token(model, train)
    return train.tokens_per_step * flops_per_token(model, train.real_tokens_per_row)

