"""Loss parity of every parallel layout against one unparallelized process.

Each launch runs several layouts in one group of gloo processes (process start-up dominates on 2 cores). For each
layout the model is built on the meta device, parallelized by ``apply_layout``, materialized, loaded from rank 0's
full state dict, and trained for 3 AdamW steps; data-parallel ranks take different slices of the same global batch,
TP ranks the same slice. Rank 0 also trains the plain model on the whole batch and records both loss curves and the
largest difference between the final weights (read back with the full-state-dict API).

Run as a script, this file is one rank of such a launch (see ``_launch``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from llama_ft.errors import PlanError
from llama_ft.loss import causal_lm_loss, loss_backward_context
from llama_ft.parallel.applying.apply import (
    apply_layout,
    build_device_mesh,
    check_tensor_parallel_fits,
    materialize,
)
from llama_ft.parallel.layout import Layout

STEPS = 3
GLOBAL_BATCH = 4
SEQ_LEN = 15  # odd: sequence-parallel shards are uneven, as length-grouped batches make them
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-3
LAUNCH_TIMEOUT_S = 150

# name → (layout, tie_word_embeddings); grouped by world size so each group is one launch.
CASES: dict[int, dict[str, tuple[Layout, bool]]] = {
    1: {
        "single-selective": (Layout(activation_checkpointing="selective"), False),
    },
    2: {
        "ddp2": (Layout(dp_replicate=2), False),
        "ddp2-full": (Layout(dp_replicate=2, activation_checkpointing="full"), False),
        "fsdp2": (Layout(dp_shard=2), False),
        "fsdp2-full": (Layout(dp_shard=2, activation_checkpointing="full"), False),
        "fsdp2-selective-tied": (Layout(dp_shard=2, activation_checkpointing="selective"), True),
        "fsdp2-cpu-offload": (Layout(dp_shard=2, cpu_offload=True), False),
        "tp2": (Layout(tp=2), False),
        "tp2-full-tied": (Layout(tp=2, activation_checkpointing="full"), True),
    },
    4: {
        "fsdp2xtp2": (Layout(dp_shard=2, tp=2), False),
        "fsdp2xtp2-selective": (Layout(dp_shard=2, tp=2, activation_checkpointing="selective"), True),
        "fsdp2xtp2-full": (Layout(dp_shard=2, tp=2, activation_checkpointing="full"), False),
        "hsdp2x2": (Layout(dp_replicate=2, dp_shard=2), False),
        "ddp2xtp2": (Layout(dp_replicate=2, tp=2), False),
    },
}


def tiny_config(tied: bool) -> LlamaConfig:
    """4 heads / 2 KV heads so TP 2 splits both; vocab and widths divisible by 2."""
    return LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )


def reference_model(config: LlamaConfig) -> LlamaForCausalLM:
    torch.manual_seed(1234)
    return LlamaForCausalLM(config)


def global_batches(config: LlamaConfig) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    return [torch.randint(0, config.vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=generator) for _ in range(STEPS)]


def train(model: LlamaForCausalLM, batches: list[torch.Tensor], dp_group: dist.ProcessGroup | None,
          layout: Layout | None = None) -> list[float]:
    """3 AdamW steps; the reported loss is averaged over data-parallel ranks (equal token counts per slice).

    The reference (``layout`` None) uses HF's own loss; parallel layouts use ``llama_ft.loss`` (chunked, or loss
    parallel under TP), so parity also checks that loss against HF's."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for batch in batches:
        if layout is None:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
        else:
            loss = causal_lm_loss(model, batch, batch)
            with loss_backward_context(layout.tp > 1):
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reported = loss.detach().clone()
        if dp_group is not None:
            dist.all_reduce(reported, op=dist.ReduceOp.AVG, group=dp_group)
        losses.append(reported.item())
    return losses


def run_layout(layout: Layout, tied: bool, reference: dict) -> dict:
    """Train ``layout`` on this rank; rank 0 returns its losses and weight difference against ``reference``."""
    config = tiny_config(tied)
    rank = dist.get_rank()
    mesh = build_device_mesh(layout, "cpu")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    apply_layout(model, layout, mesh, param_dtype=None, reduce_dtype=None)
    materialize(model, "cpu")
    full_state = dict(reference["initial_state"]) if rank == 0 else {}  # set_model_state_dict mutates the dict
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if tied and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise AssertionError("lm_head.weight is no longer tied to embed_tokens.weight after apply_layout")

    dp_mesh = mesh["data_parallel"]
    dp_rank, dp_size = dp_mesh.get_local_rank(), dp_mesh.size()
    per_rank = GLOBAL_BATCH // dp_size
    batches = [b[dp_rank * per_rank : (dp_rank + 1) * per_rank] for b in global_batches(config)]
    losses = train(model, batches, dp_mesh.get_group(), layout)

    final = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return {}
    expected = reference["final_state"]
    if set(final) != set(expected):
        raise AssertionError(f"state dict keys differ: {sorted(set(final) ^ set(expected))}")
    weight_diff = max((final[k] - expected[k]).abs().max().item() for k in expected)
    return {"losses": losses, "reference": reference["losses"], "weight_diff": weight_diff}


def reference_run(tied: bool) -> dict:
    """The plain single-process run every layout must reproduce."""
    config = tiny_config(tied)
    model = reference_model(config)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train(model, global_batches(config), None)
    return {"initial_state": initial, "final_state": model.state_dict(), "losses": losses}


def worker_main(rank: int, world_size: int, port: int, out: Path) -> None:
    """One rank: join the launch's store, run every case of this world size, rank 0 writes results as it goes."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    references: dict[bool, dict] = {}
    results: dict[str, dict] = {}
    try:
        for name, (layout, tied) in CASES[world_size].items():
            if tied not in references:
                references[tied] = reference_run(tied) if rank == 0 else {}
            start = time.perf_counter()
            result = run_layout(layout, tied, references[tied])
            if rank == 0:
                results[name] = {**result, "layout": asdict(layout), "wall_s": time.perf_counter() - start}
                out.write_text(json.dumps(results, indent=1))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(world_size: int, out: Path) -> str:
    """Start ``world_size`` ranks of this file as a script; kill them all after ``LAUNCH_TIMEOUT_S``.

    The parent owns the rendezvous store on an OS-chosen port, so no two tests can collide on a port.
    Returns the ranks' combined output, for failure messages.
    """
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log_path = out.with_suffix(".log")
    with log_path.open("w") as log_file:
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, str(rank), str(world_size), str(store.port), str(out)],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            for rank in range(world_size)
        ]
        from tests.helpers import wait_or_kill  # parent only: the ranks run this file as a script

        wait_or_kill(procs, LAUNCH_TIMEOUT_S, log_file)
    del store
    return log_path.read_text()


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], tuple[dict, str]]:
    """Lazily launch each world-size group once; maps world size → (results by case name, launch output)."""
    cache: dict[int, tuple[dict, str]] = {}

    def get(world_size: int) -> tuple[dict, str]:
        if world_size not in cache:
            out = tmp_path_factory.mktemp(f"world{world_size}") / "results.json"
            output = _launch(world_size, out)
            cache[world_size] = (json.loads(out.read_text()) if out.exists() else {}, output)
        return cache[world_size]

    return get


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("world_size", "name"), [(world, name) for world, cases in CASES.items() for name in cases])
def test_layout_matches_single_process(launches: Callable[[int], tuple[dict, str]], world_size: int, name: str) -> None:
    results, output = launches(world_size)
    assert name in results, f"case {name} produced no result; launch output tail:\n{output[-4000:]}"
    result = results[name]
    assert result["losses"] == pytest.approx(result["reference"], abs=LOSS_TOLERANCE), result
    assert result["weight_diff"] < WEIGHT_TOLERANCE, result


def test_tensor_parallel_must_divide_heads() -> None:
    config = tiny_config(tied=False)
    check_tensor_parallel_fits(config, 2)
    with pytest.raises(
        PlanError, match=r"tensor parallel degree 4 does not divide .*num_key_value_heads.*tp from \[1, 2\]"
    ):
        check_tensor_parallel_fits(config, 4)


def test_materialize_recomputes_scaled_rope_buffers() -> None:
    """inv_freq is in no checkpoint: after to_empty it must be recomputed, Llama 3.1 scaling included."""
    config = tiny_config(tied=False)
    config.rope_parameters = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    expected = LlamaForCausalLM(config).model.rotary_emb.inv_freq
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    materialize(model, "cpu")
    assert torch.equal(model.model.rotary_emb.inv_freq, expected)
    assert torch.equal(model.model.rotary_emb.original_inv_freq, expected)


def test_mesh_needs_a_process_group() -> None:
    assert not dist.is_initialized()  # the pytest process never joins a process group; launches run in children
    with pytest.raises(PlanError, match="initialized default process group"):
        build_device_mesh(Layout(dp_shard=2), "cpu")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of a test_apply launch")
    parser.add_argument("rank", type=int)
    parser.add_argument("world_size", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    worker_main(args.rank, args.world_size, args.port, args.out)
