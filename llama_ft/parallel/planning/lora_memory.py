"""Predicted peak memory of one device for LoRA: a frozen base and small trainable adapters.

What changes against full fine-tuning (``memory.py``), as ``fit`` runs it (peft adapters, FSDP2 for every layout):
- the base is stored as the strategy stores parameters (fp32 under bf16-mixed, sharded over ``dp_shard``) and
  gathered in the compute dtype a layer at a time, exactly like full fine-tuning's weights, but it has no gradients,
  no optimizer states and no gradient reduce-scatter;
- the adapters (r · (in + out) per adapted projection) have all of full fine-tuning's states;
- activations: backward still runs through every layer (each layer's adapters need its input gradient), but a frozen
  weight keeps no input for its own gradient, so part of what full fine-tuning saves is not saved
  (``LORA_FROZEN_SAVED_FRACTION``), and each adapter saves its input's low-rank projection (and, with dropout, the
  dropped input and its mask);
- the LM head and embedding compute no weight gradient: no V × h gradient, no fp32 reduce-scatter copy.
The phases are the moments of ``memory.py`` that can peak here (end of forward, the loss's backward, a layer's
backward, the optimizer step); calibrated against the fake-tensor simulation with peft's adapters injected
(``simulate.py``, ``benchmarks/results/planner_accuracy.md``).
"""

from __future__ import annotations

from dataclasses import replace

from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.activations import (
    logits_forward_bytes,
    loss_backward_bytes,
    recompute_activation_bytes,
    saved_activation_bytes,
)
from llama_ft.parallel.planning.coefficients import (
    DEFAULT_COEFFICIENTS,
    CostCoefficients,
    layer_params_per_tp_rank,
    params_per_tp_rank,
    precision_profile,
    uses_fsdp,
)
from llama_ft.parallel.planning.memory import MemoryBreakdown, allowance_bytes
from llama_ft.parallel.planning.specs import LoraSpec, ModelSpec, TrainSpec


def frozen_unsaved_bytes(model: ModelSpec, lora: LoraSpec, layout: Layout, e: int) -> tuple[float, float]:
    """Per token, what full fine-tuning saves only for a weight's gradient and a frozen base does not: (per layer,
    outside the layers). The RMSNorms' normalized inputs (their weights' gradients), the attention and MLP inputs
    unless an adapter reads them, and ``down_proj``'s input unless it is adapted; outside the layers the final
    norm's normalized input and the LM head's input. Only without checkpointing: selective and full checkpointing
    keep what they keep either way."""
    h, targets = model.hidden_size, set(lora.target_modules)
    head = 2.0 * e * h
    if layout.activation_checkpointing != "none":
        return 0.0, head
    layer = 2.0 * e * h
    if not targets & {"q_proj", "k_proj", "v_proj"}:
        layer += e * h
    if not targets & {"gate_proj", "up_proj"}:
        layer += e * h
    if "down_proj" not in targets:
        layer += e * model.intermediate_size / layout.tp
    return layer, head


def adapter_activation_bytes(model: ModelSpec, lora: LoraSpec, layout: Layout, e: int) -> float:
    """Per token per layer, what the adapters keep for backward: without checkpointing each one's r-wide projection
    ``A x`` (for ``B``'s gradient) and with dropout the dropped input and its mask (for ``A``'s); selective
    checkpointing keeps the matmul outputs ``A x`` and ``B A x``; full checkpointing keeps nothing extra."""
    mode = layout.activation_checkpointing
    if mode == "full":
        return 0.0
    per_token = 0.0
    for fan_in, fan_out in lora.shapes(model):
        per_token += e * lora.rank
        if mode == "selective":
            per_token += e * fan_out / layout.tp
        elif lora.dropout > 0:
            per_token += (e + 1) * fan_in
    return per_token


def _layer_activations(model: ModelSpec, lora: LoraSpec, layout: Layout, b: int, s: int, e: int,
                       coeffs: CostCoefficients) -> float:
    saved = saved_activation_bytes(model, layout, b, s, e, coeffs)
    layer_unsaved, head_unsaved = frozen_unsaved_bytes(model, lora, layout, e)
    per_layer = adapter_activation_bytes(model, lora, layout, e) - layer_unsaved
    return saved + b * s * (model.num_layers * per_layer - head_unsaved)


def estimate_lora_memory(model: ModelSpec, train: TrainSpec, layout: Layout, micro_batch: int,
                         coeffs: CostCoefficients = DEFAULT_COEFFICIENTS) -> MemoryBreakdown:
    """The LoRA counterpart of ``memory.estimate_memory`` (which calls it when ``train.lora`` is set)."""
    lora = train.lora
    assert lora is not None
    prec = precision_profile(train.precision, coeffs)
    b, s, e, tp = micro_batch, train.seq_len, prec.compute_bytes, layout.tp
    adapters = lora.trainable_params(model) / layout.dp_shard
    base = params_per_tp_rank(model, tp) / layout.dp_shard
    on_device = not layout.cpu_offload
    parameters = (base + adapters) * prec.master_bytes if on_device else 0.0
    adapter_grads = adapters * prec.grad_bytes if on_device else 0.0
    moments = adapters * prec.optimizer_bytes if on_device else 0.0
    # zero_grad frees the adapters' gradients: before backward they exist only while accumulating micro-batches
    accumulating = train.global_batch_size // max(1, micro_batch * layout.dp_size) > 1
    early_grads = adapter_grads if accumulating else 0.0
    fsdp = uses_fsdp(layout, coeffs)
    vocab_matrix = model.embedding_params / tp
    # FSDP keeps the LM head gathered from forward to its backward; otherwise autocast casts every matmul weight.
    held = (vocab_matrix + model.final_norm_params) * e if fsdp else (
        model.matmul_params / tp * e if prec.autocast else 0.0)
    lingering = vocab_matrix * e if fsdp and not model.tied_embeddings else 0.0
    layer = layer_params_per_tp_rank(model, tp) * e
    activations = _layer_activations(model, lora, layout, b, s, e, coeffs)

    def states(phase: str, grads: float, **terms: float) -> MemoryBreakdown:
        values = dict(adam_moments=moments, optimizer_temporaries=0.0, working_weights=0.0, activations=0.0,
                      logits=0.0, communication_buffers=0.0) | terms
        return MemoryBreakdown(parameters=parameters, gradients=grads, phase=phase, **values)

    phases = [
        states("end of forward", early_grads, working_weights=held, activations=activations,
               logits=logits_forward_bytes(model, layout, b, s, e, coeffs), communication_buffers=lingering),
        states("loss backward", early_grads, working_weights=held, activations=activations,
               logits=loss_backward_bytes(model, layout, b, s, coeffs)),
        states("layer backward", early_grads, working_weights=held if not fsdp else 0.0,
               activations=activations + recompute_activation_bytes(model, layout, b, s, e, coeffs),
               communication_buffers=coeffs.fsdp_prefetch_layers * layer if fsdp else 0.0),
        states("optimizer step", adapter_grads, optimizer_temporaries=0.0 if train.fused_optimizer
               else coeffs.optimizer_step_copies * adapters * prec.master_bytes),
    ]
    peak = max(phases, key=lambda memory: memory.tensors)
    host = 0.0 if on_device else base * prec.master_bytes + adapters * (
        prec.master_bytes + prec.grad_bytes + prec.optimizer_bytes)
    return replace(peak, allowance=allowance_bytes(peak.tensors, coeffs), host_bytes=host)
