"""Bytes per token that one forward leaves for backward, term by term, under each checkpointing mode.

The terms follow what HF ``LlamaForCausalLM`` saves in its SDPA forward, and ``tests/parallel/test_memory.py``
counts autograd's saved tensors against them, so a change in HF's forward fails a test instead of silently skewing
plans. They depend only on the model, TP and the checkpointing mode; which of them are alive at the same moment is
``memory.py``'s business.
"""

from __future__ import annotations

from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.coefficients import CostCoefficients
from llama_ft.parallel.planning.specs import ModelSpec


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
