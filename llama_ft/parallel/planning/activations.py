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


def _shard(replicated: float, sharded: float, tp: int, coeffs: CostCoefficients, gathered: float = 0.0) -> float:
    """Head- and intermediate-sized tensors split by tp; hidden-sized ones between TP regions (norms, residual) only
    under sequence parallelism; ``gathered`` ones (a TP region's all-gathered input) whole on every rank."""
    return (replicated / tp if coeffs.sequence_parallel else replicated) + sharded / tp + gathered


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
    sharded = e * model.q_dim + 2 * e * kv_width + e * model.q_dim + 4 * model.num_heads
    mask = e * seq_len if coeffs.padding_mask else 0.0  # (b, 1, s, s): the same on every TP rank
    return _shard(rmsnorm_saved_bytes(model.hidden_size, e), sharded, tp, coeffs, e * model.hidden_size) + mask


def mlp_saved_bytes(model: ModelSpec, tp: int, e: int, coeffs: CostCoefficients) -> float:
    """Per token: norm, gate/up input, then SwiGLU's gate out, silu(gate), up out and their product (4 × f)."""
    sharded = 4 * e * model.intermediate_size
    return _shard(rmsnorm_saved_bytes(model.hidden_size, e), sharded, tp, coeffs, e * model.hidden_size)


def layer_saved_bytes_no_checkpointing(
    model: ModelSpec, tp: int, e: int, seq_len: int, coeffs: CostCoefficients
) -> float:
    """Everything one decoder layer keeps for backward per token when nothing is recomputed."""
    return attention_saved_bytes(model, tp, e, seq_len, coeffs) + mlp_saved_bytes(model, tp, e, coeffs)


def layer_saved_bytes_selective(model: ModelSpec, tp: int, e: int, coeffs: CostCoefficients) -> float:
    """Op-level selective checkpointing (``apply.py``): the layer input, every other matmul output (q, v, gate,
    down), attention's output and logsumexp, and under TP the two reduce-scatter outputs; the rest is recomputed.
    Under TP down's matmul output is the whole sequence's partial sum, saved before its reduce-scatter."""
    h = model.hidden_size
    sharded = e * (model.q_dim + model.kv_dim + model.intermediate_size) + e * model.q_dim + 4 * model.num_heads
    if tp == 1:
        return e * h + sharded + e * h
    return _shard(3 * e * h, sharded, tp, coeffs, e * h)


def layer_saved_bytes_full(model: ModelSpec, tp: int, e: int, coeffs: CostCoefficients) -> float:
    """Full checkpointing keeps only each layer's input."""
    return _shard(e * model.hidden_size, 0.0, tp, coeffs)


def head_saved_bytes(model: ModelSpec, tp: int, e: int, coeffs: CostCoefficients) -> float:
    """Per token outside the layers: the final norm and the lm_head input (under TP its all-gathered input)."""
    return _shard(rmsnorm_saved_bytes(model.hidden_size, e), 0.0, tp, coeffs, e * model.hidden_size)


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
    """Vocabulary entries per token on one rank: loss parallelism keeps TP's logits sharded by vocabulary."""
    return model.vocab_size / layout.tp if coeffs.logits_sharded_by_tp else model.vocab_size


def logits_tokens(layout: Layout, micro_batch: int, seq_len: int, coeffs: CostCoefficients) -> float:
    """Tokens whose logits exist at once: one loss chunk without TP (``llama_ft/loss.py``), all of them under TP."""
    tokens = micro_batch * seq_len
    return tokens if layout.tp > 1 else min(tokens, coeffs.loss_chunk_tokens)


def logits_forward_bytes(model: ModelSpec, layout: Layout, micro_batch: int, seq_len: int, e: int,
                         coeffs: CostCoefficients) -> float:
    """At the loss in forward: the compute-dtype logits, their fp32 upcast and the fp32 log-probabilities the
    cross-entropy saves (for the last chunk only, freed right after, without TP)."""
    upcast = 4 if e < 4 else 0
    return logits_tokens(layout, micro_batch, seq_len, coeffs) * logits_vocab(model, layout, coeffs) * (e + 4 + upcast)


def loss_backward_bytes(model: ModelSpec, layout: Layout, micro_batch: int, seq_len: int,
                        coeffs: CostCoefficients) -> float:
    """As the loss's backward runs (chunk by chunk without TP, recomputed): fp32 log-probabilities and the fp32
    gradients with respect to them and to the logits, alive together (loss parallel: one copy more)."""
    tokens = logits_tokens(layout, micro_batch, seq_len, coeffs)
    copies = coeffs.loss_parallel_backward_fp32_copies if layout.tp > 1 else coeffs.loss_backward_fp32_copies
    return tokens * logits_vocab(model, layout, coeffs) * 4 * copies
