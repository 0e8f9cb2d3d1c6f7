"""Sharded load and streamed export of Hugging Face checkpoints: logits equal single-process ``from_pretrained``.

One launch of 4 gloo ranks runs every layout (DDP, FSDP, HSDP, FSDP × TP, DDP × TP): each rank builds the model on
the meta device, applies the layout, materializes its shards, reads only its slices with ``load_sharded_weights``,
computes logits and writes the model back with ``save_hf_directory``: every rank writes its own slices into the
files rank 0 laid out (small shard files, so an index is written), and the gather fallback is never taken. The
exported tensors equal, bit for bit, what ``save_pretrained`` of the one-process model writes. Checkpoints: untied
fp32 in one file; tied bf16 split over several files with an index (loaded into fp32 parameters). The vocabulary (250)
does not divide by 4 ranks: FSDP splits the embedding and LM head unevenly (63, 63, 63, 61 rows; 63, 62 under TP).

Run as a script, this file is one rank of such a launch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from llama_ft.checkpoint import huggingface
from llama_ft.checkpoint.huggingface import load_sharded_weights, read_safetensors, save_hf_directory
from llama_ft.checkpoint.safetensors_stream import INDEX_FILE, SINGLE_FILE
from llama_ft.errors import ConfigError
from llama_ft.parallel.applying.apply import apply_layout, build_device_mesh, materialize
from llama_ft.parallel.layout import Layout

LAUNCH_TIMEOUT_S = 240
SMALL_SHARDS = "60KB"  # the tiny model is ~0.4 MB: several files
VOCAB = 250  # not a multiple of the 4 ranks: uneven FSDP shards

# name → (layout, checkpoint kind); every case runs in one 4-rank launch.
CASES: dict[str, tuple[Layout, str]] = {
    "ddp4": (Layout(dp_replicate=4), "single"),
    "fsdp4-tied-index": (Layout(dp_shard=4), "tied_index"),
    "hsdp2x2": (Layout(dp_replicate=2, dp_shard=2, activation_checkpointing="full"), "single"),
    "fsdp2xtp2-tied-index": (Layout(dp_shard=2, tp=2), "tied_index"),
    "ddp2xtp2": (Layout(dp_replicate=2, tp=2), "single"),
}


def config(tied: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tied)


def write_checkpoints(root: Path) -> dict[str, Path]:
    """``single``: untied fp32, one file. ``tied_index``: tied bf16, several files + index."""
    torch.manual_seed(7)
    single = root / "single"
    LlamaForCausalLM(config(tied=False)).save_pretrained(single)
    tied = root / "tied_index"
    LlamaForCausalLM(config(tied=True)).to(torch.bfloat16).save_pretrained(tied, max_shard_size="100KB")
    assert (single / SINGLE_FILE).is_file() and (tied / INDEX_FILE).is_file()
    return {"single": single, "tied_index": tied}


def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model: LlamaForCausalLM) -> torch.Tensor:
    """Full logits (tensor parallel keeps them vocabulary-sharded: loss parallelism)."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        out = model.eval()(input_ids=input_ids()).logits
    return out.full_tensor() if isinstance(out, DTensor) else out


def reference_logits(directory: Path) -> torch.Tensor:
    return logits(LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32))


def saved_by_save_pretrained(root: Path, kind: str) -> dict[str, torch.Tensor]:
    """The tensors one process's ``save_pretrained`` writes for the fp32 model loaded from checkpoint ``kind``."""
    out = root / f"save_pretrained-{kind}"
    if not out.is_dir():
        LlamaForCausalLM.from_pretrained(root / kind, dtype=torch.float32).save_pretrained(out)
    return read_safetensors(out)


def run_case(name: str, checkpoints: dict[str, Path], out: Path) -> None:
    layout, kind = CASES[name]
    mesh = build_device_mesh(layout, "cpu")
    with torch.device("meta"):
        model = LlamaForCausalLM(config(tied=kind == "tied_index"))
    apply_layout(model, layout, mesh, param_dtype=None, reduce_dtype=None)
    materialize(model, "cpu")
    load_sharded_weights(model, checkpoints[kind])
    result = logits(model)
    save_hf_directory(model, None, out / name, max_shard_size=SMALL_SHARDS)
    if dist.get_rank() == 0:
        torch.save(result, out / f"{name}.logits.pt")


def _no_gather(state):
    raise AssertionError("the export gathered tensors: the ranks were expected to write their slices in place")


def worker_main(rank: int, world_size: int, port: int, root: Path) -> None:
    torch.set_num_threads(1)
    huggingface.gathered_tensors = _no_gather  # every layout writes in place (the ranks share the output directory)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    checkpoints = {kind: root / kind for kind in ("single", "tied_index")}
    try:
        for name in CASES:
            run_case(name, checkpoints, root / "out")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(world_size: int, root: Path) -> str:
    """``world_size`` ranks of this file; all killed after ``LAUNCH_TIMEOUT_S``. Returns their output."""
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log_path = root / "launch.log"
    with log_path.open("w") as log_file:
        procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(world_size), str(store.port), str(root)],
                                  env=env, stdout=log_file, stderr=subprocess.STDOUT) for rank in range(world_size)]
        from tests.helpers import wait_or_kill  # parent only: the ranks run this file as a script

        wait_or_kill(procs, LAUNCH_TIMEOUT_S, log_file)
    del store
    return log_path.read_text()


@pytest.fixture(scope="module")
def four_rank_launch(tmp_path_factory) -> tuple[Path, dict[str, Path], str]:
    root = tmp_path_factory.mktemp("sharded_io")
    checkpoints = write_checkpoints(root)
    return root, checkpoints, _launch(4, root)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
@pytest.mark.parametrize("name", list(CASES))
def test_every_layout_loads_its_shards_and_exports_what_from_pretrained_reads(four_rank_launch, name):
    root, checkpoints, output = four_rank_launch
    produced = root / "out" / f"{name}.logits.pt"
    assert produced.is_file(), f"case {name} produced nothing; launch output tail:\n{output[-4000:]}"
    expected = reference_logits(checkpoints[CASES[name][1]])
    torch.testing.assert_close(torch.load(produced), expected, atol=1e-5, rtol=1e-5)
    exported = root / "out" / name
    assert (exported / INDEX_FILE).is_file() and len(list(exported.glob("model-*.safetensors"))) > 2
    assert torch.equal(reference_logits(exported), expected)
    written, reference = read_safetensors(exported), saved_by_save_pretrained(root, CASES[name][1])
    assert written.keys() == reference.keys()
    assert all(torch.equal(written[k], reference[k]) and written[k].dtype == reference[k].dtype for k in reference)


def test_single_process_load_and_streamed_export_round_trip(tmp_path):
    """No process group: plain tensors, a bf16 index-sharded checkpoint into fp32 parameters, one-file export."""
    checkpoints = write_checkpoints(tmp_path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config(tied=True))
    materialize(model, "cpu")
    load_sharded_weights(model, checkpoints["tied_index"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32
    expected = reference_logits(checkpoints["tied_index"])
    assert torch.equal(logits(model), expected)
    out = save_hf_directory(model, None, tmp_path / "exported")
    assert (out / SINGLE_FILE).is_file() and not (out / INDEX_FILE).exists()
    assert torch.equal(reference_logits(out), expected)


def test_a_checkpoint_of_another_architecture_is_refused_before_reading(tmp_path):
    checkpoints = write_checkpoints(tmp_path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config(tied=False))
    materialize(model, "cpu")
    with pytest.raises(ConfigError, match=r"lacks weights for \['lm_head.weight'\]"):
        load_sharded_weights(model, checkpoints["tied_index"])
    with pytest.raises(ConfigError, match=r"holds no model\.safetensors"):
        load_sharded_weights(model, tmp_path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for arg, kind in (("rank", int), ("world_size", int), ("port", int), ("root", Path)):
        parser.add_argument(arg, type=kind)
    args = parser.parse_args()
    worker_main(args.rank, args.world_size, args.port, args.root)
