"""What the memory and step-time models share: the chosen numbers, the precision's byte counts, parameters per device.

Every number that was chosen rather than derived lives in ``CostCoefficients``, so calibration (against the
fake-tensor memory simulation, or against measured runs) replaces one frozen instance instead of editing formulas.
The precision profile and the per-device parameter counts are here because ``memory.py`` and ``step_time.py`` both
size their terms with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.specs import ModelSpec
from llama_ft.parallel.planning.units import GiB


@dataclass(frozen=True)
class CostCoefficients:
    """Every chosen (not derived) number of the cost model, in one place, so calibration replaces only this."""

    # --- activations -------------------------------------------------------------------------------------
    # Padded batches pass an attention mask: HF then repeats K/V to all heads before SDPA (no enable_gqa), and
    # SDPA keeps its own additive compute-dtype copy of the (b, 1, s, s) mask in every layer. The simulation's CPU
    # SDPA keeps exactly this even unmasked (measured). False models unpadded/packed batches on GPU flash kernels
    # (is_causal, grouped K/V).
    padding_mask: bool = True
    # ``apply.py``'s TP plan is sequence parallel: norms and the residual stream are split along the sequence.
    sequence_parallel: bool = True
    # ``apply.py`` leaves the LM head's logits sharded by vocabulary and ``llama_ft/loss.py`` runs a loss-parallel
    # cross-entropy on them.
    logits_sharded_by_tp: bool = True
    # Without TP ``llama_ft/loss.py`` runs the LM head and the loss this many tokens at a time (LOSS_CHUNK_TOKENS).
    loss_chunk_tokens: int = 1024
    # fp32 copies of the b·s·V logits alive as backward starts: the log-probabilities log_softmax saved and the
    # gradients with respect to them and to the logits (simulated: 12 bytes per token per vocabulary entry).
    loss_backward_fp32_copies: int = 3
    # The loss-parallel cross-entropy (torch's ``loss_parallel``) keeps one more: its saved fp32 log-probabilities
    # beside three fp32 temporaries of the vocabulary shard (simulated, FSDP 4 × TP 2).
    loss_parallel_backward_fp32_copies: int = 4
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
    # foreach AdamW's temporaries (the fine-tuner's choice on CPU): one more fp32 copy of the local parameters on
    # top of the two moments (simulated). Fused AdamW (its choice on CUDA) updates in place and makes none.
    optimizer_step_copies: float = 1.0
    # ``apply.py`` reduce-scatters (and all-reduces) gradients in fp32. True models code that reduces them in bf16
    # (e.g. IBM's fms-fsdp ``bfSixteen`` policy, reduce_dtype bfloat16): half the bytes on the wire and in buffers.
    bf16_gradient_reduction: bool = False
    ddp_bucket_copy: bool = True  # DDP's default buckets duplicate the gradients (gradient_as_bucket_view=False)
    workspace_bytes: int = GiB // 2  # cuBLAS/NCCL workspaces and other allocations outside the model
    fragmentation: float = 0.05  # caching-allocator fragmentation, as a fraction of everything else
    host_memory_per_device_bytes: int = 200 * GiB  # host RAM one device may use for CPU offload
    # --- compute -----------------------------------------------------------------------------------------
    # The large-model efficiency is the accelerator's (``accelerators.MATMUL_EFFICIENCY``); it falls for narrow
    # layers: half of it at this width (hidden / tp), fitted on torchtitan's 64 × A100 runs, whose hardware FLOPs
    # utilization grows from ~60% at hidden 4096 (Llama 3 8B) to ~69% at 8192 (Llama 3 70B, full AC).
    half_efficiency_width: int = 1500
    half_efficiency_tokens: int = 128  # micro-batch tokens at which efficiency is half the large-batch value
    # Share of the forward re-run by selective checkpointing: an op-level policy saving about half the matmul
    # outputs (torchtitan's per-op SAC recomputes every other matmul) re-runs about half of the forward.
    selective_recompute_forward_fraction: float = 0.5
    fp32_matmul_fraction: float = 0.5  # 32-true matmuls (TF32, matmul precision "high") vs bf16 peak
    layer_overhead_s: float = 50e-6  # launch/Python overhead per layer per micro-batch, forward + backward
    # --- communication -----------------------------------------------------------------------------------
    # Compute that runs beside a collective is slowed: NCCL's kernels take SMs and memory bandwidth from the matmuls.
    # "Characterizing Compute-Communication Overlap in GPU-Accelerated Distributed Deep Learning" (arXiv 2507.03114,
    # 2025; GPT and Llama layers on A100, H100, MI250, MI210) measured an average slowdown of 18.9% (at most 40%).
    overlap_compute_slowdown: float = 0.189
    # Per ring step (a ring of N ranks takes N-1). NCCL's own latency model (src/graph/tuning.cc, ring with the Simple
    # protocol) charges ~5.7 µs per NVLink hop and 6.6-9.6 µs per network hop on top of an 8.4 µs base; it bounds
    # FSDP's per-layer collectives once thousands of ranks cut each shard small.
    intra_node_latency_s: float = 5e-6
    inter_node_latency_s: float = 15e-6
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
        return PrecisionProfile(4, 4, 8, 2, 2 if coeffs.bf16_gradient_reduction else 4, True, 1.0)
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

