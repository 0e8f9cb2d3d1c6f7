"""The causal-LM loss of the fine-tuner: Hugging Face's value, without Hugging Face's full fp32 logits.

``LlamaForCausalLM(labels=...)`` upcasts all batch × sequence × vocabulary logits to fp32 and keeps them for
backward (Llama 3's 128k vocabulary: 12 bytes per token per entry, more than all decoder activations together at
short sequences). Here the decoder runs alone (``model.model``), then the LM head and the cross-entropy run either

- chunk by chunk (``LOSS_CHUNK_TOKENS`` tokens at a time, each chunk checkpointed so backward recomputes its
  logits): only one chunk's logits ever exist; or
- under tensor parallelism, on the vocabulary-sharded logits the TP plan leaves (loss parallelism: each rank holds
  ``1/tp`` of the vocabulary and ``loss_parallel`` reduces the softmax statistics across ranks, never gathering).

Both give HF's value: the mean cross-entropy of every position's logits against the next label, ignoring -100.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils.checkpoint import checkpoint
from transformers import LlamaForCausalLM

IGNORE_INDEX = -100
# Tokens per loss chunk: 1,024 × 128,256 entries keep the chunk's logits and their gradient in about 2 GiB while the
# LM-head matmul of a chunk stays large enough to run at full speed.
LOSS_CHUNK_TOKENS = 1024


class ChunkedLossHead(nn.Linear):
    """Llama's LM head that, given ``targets``, returns the summed cross-entropy instead of the logits.

    The loss runs inside the head's own forward so that FSDP2's hooks hold its gathered weight for every chunk.
    A tensor-parallel head (its weight is a DTensor while it runs) returns its vocabulary-sharded logits instead:
    :func:`causal_lm_loss` takes the loss-parallel route for those. Without ``targets`` it is a plain linear layer
    (generation), and its state-dict key stays ``lm_head.weight``.
    """

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None or isinstance(self.weight, DTensor):
            return super().forward(hidden)
        return chunked_cross_entropy_sum(hidden, self.weight, targets, LOSS_CHUNK_TOKENS)


def install_loss_head(model: LlamaForCausalLM) -> None:
    """Swap ``model.lm_head`` for a :class:`ChunkedLossHead` sharing its weight (tied embeddings stay tied)."""
    old = model.lm_head
    if isinstance(old, ChunkedLossHead):
        return
    head = ChunkedLossHead(old.in_features, old.out_features, bias=False, device="meta")
    head.weight = old.weight
    model.lm_head = head


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Sum of the cross-entropy of ``hidden @ weight.T`` against ``targets``, ``chunk_tokens`` rows at a time."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for rows, labels in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens), strict=True):
        total = total + checkpoint(_chunk_loss, rows, weight, labels, use_reentrant=False)
    return total


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Each position's target is the next label; the last position has none (HF's shift, kept at full length)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """HF's causal-LM loss of ``model`` (mean over targets that are not -100) without full fp32 logits.

    ``model`` needs :func:`install_loss_head`. Under tensor parallelism call ``backward`` inside
    :func:`loss_backward_context` too.
    """
    targets = next_token_targets(labels)
    # The model itself is called (not ``model.model``), so that FSDP2's root hooks run as in any forward: the loss
    # forward stands in for HF's for this one call.
    model.forward = partial(_loss_forward, model)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, targets=targets)
    finally:
        del model.forward
    if isinstance(out, DTensor):  # vocabulary-sharded logits (loss parallelism)
        with loss_parallel():
            loss = F.cross_entropy(out.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return loss.full_tensor() if isinstance(loss, DTensor) else loss
    return out / (targets != IGNORE_INDEX).sum()


def _loss_forward(model: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    """HF's forward up to the final norm, then the LM head with the targets: the loss sum, or sharded logits."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
    return model.lm_head(hidden, targets=targets)


@contextmanager
def gathered_logits(model: LlamaForCausalLM) -> Iterator[None]:
    """Hand generation whole logits: a TP model's LM head returns them vocabulary-sharded (a few rows per step)."""

    def gather(module: nn.Module, args: Any, output: Any) -> Any:
        return output.full_tensor() if isinstance(output, DTensor) else output

    handle = model.lm_head.register_forward_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def loss_backward_context(tensor_parallel: bool) -> AbstractContextManager[None]:
    """Backward of the loss-parallel cross-entropy must run under ``loss_parallel`` too; nothing else needs it."""
    return loss_parallel() if tensor_parallel else nullcontext()
