"""``llama_ft.loss`` gives Hugging Face's loss and gradients without full fp32 logits (chunked, checkpointed)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

import llama_ft.loss as loss_module
from llama_ft.loss import IGNORE_INDEX, ChunkedLossHead, causal_lm_loss, install_loss_head
from tests.helpers import tiny_llama_config


def _batch(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 4096, (3, 23), generator=generator)
    labels = ids.clone()
    labels[:, :9] = IGNORE_INDEX  # the prompt (loss_on=summary)
    batch = {"input_ids": ids, "labels": labels}
    if kind == "padded":
        mask = torch.ones_like(ids)
        mask[1, 17:] = 0
        labels[1, 17:] = IGNORE_INDEX
        batch["attention_mask"] = mask
    else:  # two examples packed per row: positions restart, the second example's prompt is masked too
        batch["position_ids"] = torch.cat([torch.arange(11), torch.arange(12)]).repeat(3, 1)
        labels[:, 11:15] = IGNORE_INDEX
    return batch


@pytest.mark.parametrize("kind", ["padded", "packed"])
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_and_gradients_equal_hugging_face(kind, tied, monkeypatch):
    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied))
    model = copy.deepcopy(reference)
    install_loss_head(model)
    assert isinstance(model.lm_head, ChunkedLossHead)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_TOKENS", 16)  # 69 tokens: five chunks, the last one short
    batch = _batch(kind)

    expected = reference(**batch, use_cache=False).loss
    got = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                         batch.get("position_ids"))
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    expected.backward()
    got.backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_chunked_head_saves_no_logits_for_backward(monkeypatch):
    """HF's loss keeps tokens × vocabulary logits for backward; the chunked head keeps none (each chunk's are
    recomputed inside its own backward)."""
    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_llama_config())
    model = copy.deepcopy(reference)
    install_loss_head(model)
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_TOKENS", 16)
    batch = _batch("padded")
    vocab = model.config.vocab_size

    def saved_logit_rows(run) -> int:
        rows = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.dim() and tensor.shape[-1] == vocab:
                rows.append(tensor.numel() // vocab)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run().backward()
        return max(rows)

    assert saved_logit_rows(lambda: reference(**batch, use_cache=False).loss) == batch["input_ids"].numel()
    assert saved_logit_rows(lambda: causal_lm_loss(model, batch["input_ids"], batch["labels"],
                                                   batch["attention_mask"])) == 0


def test_memory_model_knows_the_chunk_size():
    """The planner (no torch at import) mirrors the chunk size: a change to one must change the other."""
    from llama_ft.parallel.planning.coefficients import DEFAULT_COEFFICIENTS

    assert DEFAULT_COEFFICIENTS.loss_chunk_tokens == loss_module.LOSS_CHUNK_TOKENS
