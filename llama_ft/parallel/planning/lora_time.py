"""Predicted seconds per optimizer step for LoRA: a frozen base does a third less matmul work and sends no gradients.

Against full fine-tuning (``step_time.py``): backward computes input gradients only for frozen weights (2 of the 6
FLOPs per weight and token are saved; the adapters' own ~6·r·(in + out) are added), FSDP still all-gathers every
layer in forward and again in backward, but reduce-scatters (and HSDP all-reduces) only the adapters' gradients, and
AdamW updates only the adapters. The collective and efficiency helpers are ``step_time.py``'s, so calibration there
applies here too.
"""

from __future__ import annotations

from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.coefficients import (
    DEFAULT_COEFFICIENTS,
    CostCoefficients,
    layer_params_per_tp_rank,
    params_per_tp_rank,
    precision_profile,
    uses_fsdp,
)
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec
from llama_ft.parallel.planning.step_time import (
    StepTime,
    group_link,
    matmul_efficiency,
    overlapped,
    recompute_factor,
    ring_all_gather_s,
    ring_all_reduce_s,
)


def lora_flops_per_token(model: ModelSpec, train: TrainSpec) -> float:
    """Forward (2 per weight) + input-gradient backward (2 per weight) of the base, 6 per adapter weight, plus the
    attention's 12·L·h·s (PaLM's count, as ``step_time.flops_per_token``)."""
    assert train.lora is not None
    adapters = train.lora.trainable_params(model)
    return 4 * model.matmul_params + 6 * adapters + 12 * model.num_layers * model.q_dim * train.computed_tokens_per_row


def estimate_lora_step_time(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, layout: Layout,
                            micro_batch: int, grad_accumulation: int,
                            coeffs: CostCoefficients = DEFAULT_COEFFICIENTS) -> StepTime:
    """The LoRA counterpart of ``step_time.estimate_step_time`` (which calls it when ``train.lora`` is set)."""
    assert train.lora is not None
    prec = precision_profile(train.precision, coeffs)
    row = train.computed_tokens_per_row
    tokens = micro_batch * row
    factor = recompute_factor(layout, coeffs)
    flops = lora_flops_per_token(model, train)
    achieved = cluster.peak_flops * prec.flops_fraction * matmul_efficiency(model, cluster, layout.tp, tokens, coeffs)
    mb_compute = tokens * flops * factor / layout.tp / achieved
    adapters = train.lora.trainable_params(model)
    forward_flops = 2 * model.matmul_params + 2 * adapters + 4 * model.num_layers * model.q_dim * row
    forward = mb_compute / factor * forward_flops / flops
    backward = mb_compute - forward
    groups = model.num_layers + 1
    mb_comm = mb_exposed = 0.0
    if uses_fsdp(layout, coeffs):
        link = group_link(cluster, layout.dp_shard, layout.tp, coeffs)
        gather = ring_all_gather_s(params_per_tp_rank(model, layout.tp) * prec.compute_bytes, layout.dp_shard,
                                   link, groups)
        scatter = ring_all_gather_s(adapters * prec.reduce_bytes, layout.dp_shard, link, groups)
        replicas = 0.0
        if layout.dp_replicate > 1:
            replica_link = group_link(cluster, layout.dp_replicate, layout.dp_shard * layout.tp, coeffs)
            replicas = ring_all_reduce_s(adapters / layout.dp_shard * prec.reduce_bytes, layout.dp_replicate,
                                         replica_link, groups)
        first = ring_all_gather_s(layer_params_per_tp_rank(model, layout.tp) * prec.compute_bytes, layout.dp_shard,
                                  link)
        mb_comm = 2 * gather + scatter + replicas
        mb_exposed = overlapped(gather, forward, coeffs) + overlapped(gather + scatter + replicas, backward,
                                                                      coeffs) + first
    offload = 0.0
    if layout.cpu_offload:  # the base shard comes over twice (forward, backward); adapter gradients go back
        shard = params_per_tp_rank(model, layout.tp) / layout.dp_shard
        offload = grad_accumulation * (2 * shard * prec.master_bytes + adapters / layout.dp_shard * prec.grad_bytes
                                       ) / coeffs.host_link_bandwidth
    local_adapters = adapters / layout.dp_shard
    optimizer = (local_adapters / coeffs.cpu_adam_params_per_s if layout.cpu_offload
                 else local_adapters * coeffs.optimizer_bytes_per_param / cluster.hbm_bandwidth)
    return StepTime(
        compute_s=mb_compute * grad_accumulation,
        exposed_communication_s=mb_exposed * grad_accumulation,
        communication_s=mb_comm * grad_accumulation,
        optimizer_s=optimizer,
        offload_s=offload,
        overhead_s=coeffs.layer_overhead_s * model.num_layers * grad_accumulation,
    )
