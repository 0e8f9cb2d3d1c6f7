"""Put a :class:`Layout` into effect on a Hugging Face ``LlamaForCausalLM``.

This is the only place that parallelizes the model: the Lightning strategy and the memory simulator both call
:func:`build_device_mesh` and :func:`apply_layout`, so what the simulator measures is what training runs.

The order is fixed, one function per parallelism: tensor parallel (DTensor) → activation checkpointing →
FSDP2 ``fully_shard`` (embedding, LM head, each decoder layer, root). Each step wraps what the one before produced;
the reverse order would shard parameters that TP still has to split, or checkpoint modules whose FSDP hooks would
then rerun inside the recomputation.

Recommended use: build on the meta device, parallelize, allocate only this rank's shards, then load (each rank reads
only its own slices of the safetensors files), so weights never exist unsharded on any rank::

    mesh = build_device_mesh(layout, "cuda")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    apply_layout(model, layout, mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    materialize(model, device)
    load_sharded_weights(model, checkpoint_dir)  # llama_ft.checkpoint.huggingface
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers import LlamaConfig, LlamaForCausalLM

from llama_ft.errors import PlanError
from llama_ft.loss import install_loss_head
from llama_ft.parallel.layout import ActivationCheckpointing, Layout

log = logging.getLogger(__name__)

MESH_DIM_NAMES: tuple[str, str, str] = ("dp_replicate", "dp_shard", "tp")
DATA_PARALLEL_DIM = "data_parallel"

# Selective activation checkpointing, op by op (the policy torchtitan applies to Llama): within each checkpointed
# layer keep every other matmul output (q, v, gate and down of the seven), attention's output and the TP
# reduce-scatters (recomputing them would repeat the communication); recompute everything else in backward — the
# other matmuls, norms, RoPE, SiLU and the SwiGLU product. About half the matmul recomputation of full checkpointing
# for a fraction of its memory saving lost.
_SAC_ATTENTION_OPS: frozenset[torch._ops.OpOverload] = frozenset({
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
})


def _selective_contexts() -> tuple[Any, Any]:
    """Fresh contexts per layer call: the matmul count belongs to one layer's forward and its recomputation, and
    restarts for the recomputation so that both pick the same matmuls."""
    counts = {False: 0, True: 0}

    def save_every_other_matmul(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op == torch.ops.aten.mm.default:
            counts[ctx.is_recompute] += 1
            return CheckpointPolicy.MUST_SAVE if counts[ctx.is_recompute] % 2 else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in _SAC_ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(save_every_other_matmul)


def build_device_mesh(layout: Layout, device_type: str) -> DeviceMesh:
    """Build the ``dp_replicate × dp_shard × tp`` mesh ``layout`` needs, plus a flattened ``data_parallel`` dim.

    ``tp`` is the innermost (fastest-varying) dim so that TP groups are consecutive ranks, i.e. on one node.
    ``mesh["data_parallel"]`` (dp_replicate·dp_shard ranks) is what Lightning's ``ModelParallelStrategy`` reads for
    the distributed sampler. Sizes of 1 are kept as dims so every layout has the same dim names.
    The default process group must already be initialized with ``layout.world_size`` ranks.
    """
    if not dist.is_initialized():
        raise PlanError(
            f"build_device_mesh({layout.describe()}) needs an initialized default process group. "
            "Call torch.distributed.init_process_group first (the Lightning strategy does this in setup_environment)."
        )
    world_size = dist.get_world_size()
    if world_size != layout.world_size:
        raise PlanError(
            f"layout {layout.describe()} needs {layout.world_size} processes "
            f"(dp_replicate {layout.dp_replicate} × dp_shard {layout.dp_shard} × tp {layout.tp}), "
            f"but the process group has {world_size}. Plan for the actual world size or launch "
            f"{layout.world_size} processes."
        )
    mesh = init_device_mesh(
        device_type, (layout.dp_replicate, layout.dp_shard, layout.tp), mesh_dim_names=MESH_DIM_NAMES
    )
    mesh["dp_replicate", "dp_shard"]._flatten(DATA_PARALLEL_DIM)
    return mesh


def apply_layout(
    model: LlamaForCausalLM,
    layout: Layout,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
) -> None:
    """Parallelize ``model`` in place: TP → activation checkpointing → FSDP2 (always, see ``apply_data_parallel``).

    ``model`` is built on the meta device; afterwards call :func:`materialize` and load weights (module docstring).
    ``mesh`` comes from :func:`build_device_mesh` for the same layout. ``param_dtype``/``reduce_dtype`` form FSDP2's
    mixed-precision policy (``None`` keeps the parameters' own dtype). With activation checkpointing the config's
    ``use_cache`` is switched off. State-dict keys stay those of the plain HF model (``state_dict()`` and the
    ``torch.distributed.checkpoint.state_dict`` APIs); ``named_parameters()`` of a checkpointed layer contain
    ``_checkpoint_wrapped_module.``. The LM head becomes ``llama_ft.loss.ChunkedLossHead``: compute the loss with
    ``llama_ft.loss.causal_lm_loss`` (HF's own loss cannot take TP's vocabulary-sharded logits). Call it once per
    model.
    """
    _check_mesh(layout, mesh)
    install_loss_head(model)  # before TP and FSDP wrap it: its loss runs inside the head's own (hooked) forward
    if layout.tp > 1:
        if any(".lora_A." in name for name, _ in model.named_parameters()):
            raise PlanError(f"layout {layout.describe()} uses tensor parallelism, which LoRA adapters do not support "
                            "here; with model.lora use DDP, FSDP or HSDP (tp 1).")
        apply_tensor_parallel(model, mesh["tp"])
    apply_activation_checkpointing(model, layout.activation_checkpointing)
    apply_data_parallel(model, layout, mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    log.info("applied layout %s", layout.describe())


def _check_mesh(layout: Layout, mesh: DeviceMesh) -> None:
    """Refuse a mesh built for another layout: the per-dim sizes decide every collective below."""
    given = dict(zip(mesh.mesh_dim_names or (), mesh.shape, strict=True))
    needed = dict(zip(MESH_DIM_NAMES, (layout.dp_replicate, layout.dp_shard, layout.tp), strict=True))
    if given != needed:
        raise PlanError(
            f"device mesh {given} does not match layout {layout.describe()}, which needs {needed}. "
            "Build the mesh with build_device_mesh(layout, device_type)."
        )


def check_tensor_parallel_fits(config: LlamaConfig, tp: int) -> None:
    """Refuse a TP degree that does not split heads, KV heads and the MLP width evenly.

    HF Llama reshapes q/k/v with ``-1`` heads, so each rank silently runs ``heads / tp`` local heads: an uneven split
    would cut a head in half and compute wrong attention without any error. An uneven MLP split would run, but
    unbalanced, and the cost model assumes equal shards.
    """
    sizes = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
    }
    bad = {name: size for name, size in sizes.items() if size % tp}
    if bad:
        fits = [d for d in range(1, config.num_key_value_heads + 1) if all(size % d == 0 for size in sizes.values())]
        raise PlanError(
            f"tensor parallel degree {tp} does not divide {bad} of this model ({sizes}). "
            f"Pick tp from {fits}, or let the planner choose."
        )


def apply_tensor_parallel(model: LlamaForCausalLM, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP with sequence parallelism on every decoder layer, and loss parallelism at the LM head.

    Between TP regions the residual stream, the RMSNorms and their saved activations are split along the sequence
    (``Shard(1)``): the embedding's partial sums are reduce-scattered over the sequence, each norm runs on its rank's
    tokens (``SequenceParallel``), attention and the MLP all-gather their input (``PrepareModuleInput``), q/k/v and
    gate/up are column-wise (whole heads / a slice of the MLP width per rank), and o and down are row-wise with
    their outputs reduce-scattered back over the sequence. Same traffic as all-reduces, ``1/tp`` of the norm and
    residual memory. The residual stream stays a DTensor with the global shape, so HF's model-level code (positions,
    rotary tables, the causal mask) sees the whole sequence and any length works, odd ones and generation included.

    Embedding: row-wise (vocabulary rows sharded; exactly one rank contributes a non-zero row per token, so the
    reduce-scatter's sum is exact). LM head: column-wise with vocabulary-sharded DTensor logits that are never
    gathered: ``llama_ft.loss`` runs the cross-entropy on the shards under ``loss_parallel``. Both weights end
    ``Shard(0)`` on the vocab dim, which keeps tied embeddings (Llama 3.2) tied: the LM head is re-pointed at the
    embedding's DTensor parameter.
    """
    check_tensor_parallel_fits(model.config, tp_mesh.size())
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    gather_sequence = {"input_layouts": (Shard(1),), "desired_input_layouts": (Replicate(),)}
    for layer in model.model.layers:
        parallelize_module(
            layer,
            tp_mesh,
            {
                "input_layernorm": SequenceParallel(),
                "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                                desired_input_kwarg_layouts={"hidden_states": Replicate()}),
                "self_attn.q_proj": ColwiseParallel(),
                "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(),
                "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
                "post_attention_layernorm": SequenceParallel(),
                "mlp": PrepareModuleInput(**gather_sequence),
                "mlp.gate_proj": ColwiseParallel(),
                "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            },
        )
    parallelize_module(
        model,
        tp_mesh,
        {
            "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                                  use_local_output=False),
            "model.norm": SequenceParallel(),
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
        },
    )
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def apply_activation_checkpointing(model: LlamaForCausalLM, mode: ActivationCheckpointing) -> None:
    """Wrap each decoder layer for activation checkpointing (non-reentrant ``torch.utils.checkpoint``).

    ``full`` keeps only each layer's inputs and recomputes the whole layer in backward. ``selective`` keeps every other
    matmul output and attention's (see ``_selective_contexts``) and recomputes the rest.
    The wrapper forwards ``*args, **kwargs`` unchanged, so HF's
    keyword call (``position_embeddings``, ``attention_mask``, ``position_ids``, ``cache``) works as before, and
    it strips its ``_checkpoint_wrapped_module`` prefix from state-dict keys (not from ``model.named_parameters()``).

    The KV cache is switched off in the config (as HF does for its own checkpointing): a recomputed layer would
    append its keys/values to the cache a second time, which breaks selective recomputation outright and, under full
    recomputation, keeps every layer's K/V alive that checkpointing meant to free.
    """
    if mode == "none":
        return
    model.config.use_cache = False
    checkpoint_kwargs = {}
    if mode == "selective":
        checkpoint_kwargs["context_fn"] = _selective_contexts
    layers = model.model.layers
    for index, layer in enumerate(layers):
        wrapped = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **checkpoint_kwargs)
        layers.register_module(str(index), wrapped)


def data_parallel_mesh(layout: Layout, mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards over: 1-D ``dp_shard`` (FSDP), or 2-D ``dp_replicate × dp_shard`` (HSDP).

    With ``dp_shard == 1`` the 2-D form is HSDP with shards of one rank, i.e. DDP: every rank keeps the full
    parameters and gradients are all-reduced over ``dp_replicate``, under the same mixed-precision policy and
    DTensor handling (so it composes with TP) as the sharded layouts.
    """
    if layout.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def apply_data_parallel(
    model: LlamaForCausalLM,
    layout: Layout,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
) -> None:
    """``fully_shard`` the embedding and LM head, each decoder layer, then the root (final norm).

    Applied for every layout, a data-parallel size of 1 included, so that mixed precision, gradient handling,
    state-dict APIs and the memory tracker behave the same whatever the planner picks. Per-layer groups let FSDP
    gather one layer at a time and reshard it after its forward. The embedding and LM head (V×h each, the largest
    matrices) get groups of their own so that their unsharded gradients and fp32 reduce-scatter buffers are never
    alive together at the end of backward (Llama-3-8B, FSDP 8, s=1024, full AC: 20.3 → 18.7 GiB/rank); the LM head
    stays gathered after forward because backward starts with it. Tied embeddings are one parameter, which can
    belong to one group only, so they stay in the root group.
    """
    dp_mesh = data_parallel_mesh(layout, mesh)
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    offload_policy: OffloadPolicy = OffloadPolicy()
    if layout.cpu_offload:
        offload_policy = CPUOffloadPolicy(pin_memory=dp_mesh.device_type != "cpu")
    shard = partial(fully_shard, mesh=dp_mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        shard(model.model.embed_tokens)
        shard(model.lm_head, reshard_after_forward=False)
    for layer in model.model.layers:
        shard(layer)
    shard(model)


def materialize(model: LlamaForCausalLM, device: torch.device | str) -> None:
    """Allocate a meta-device (or FakeTensor) model's storage on ``device`` and recompute its RoPE buffers.

    ``to_empty`` leaves every tensor uninitialized. Parameters and persistent buffers are then loaded from a state
    dict, but the rotary ``inv_freq`` buffers are non-persistent (in no checkpoint), so they are recomputed here with
    HF's own initializer for rotary modules, which handles every ``rope_type`` (Llama 3.1's scaled RoPE included).
    """
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "original_inv_freq"):
                model._init_weights(module)
