"""One rank of a TP 2 generation check (launched by tests/parallel/test_tp_generation.py through torchrun).

A sequence- and loss-parallel model must decode exactly like the plain one: odd prompt lengths, left padding, the KV
cache's one-token steps (uneven sequence shards) and ``gathered_logits`` handing HF whole logits.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from llama_ft.loss import gathered_logits
from llama_ft.parallel.applying.apply import apply_layout, build_device_mesh
from llama_ft.parallel.layout import Layout


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    reference = LlamaForCausalLM(config).eval()
    model = copy.deepcopy(reference)
    layout = Layout(tp=2)
    apply_layout(model, layout, build_device_mesh(layout, "cpu"), param_dtype=None, reduce_dtype=None)
    model.eval()
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    with torch.no_grad(), gathered_logits(model):
        got = model.generate(input_ids=ids, synced_gpus=True, **kwargs)
    expected = reference.generate(input_ids=ids, **kwargs)
    same = torch.equal(got, expected)
    dist.destroy_process_group()
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
