"""The one switch through Lightning's Trainer: every pinned layout trains exactly like one process.

DDP, FSDP and TP on 2 processes and FSDP × TP on 4 (gloo, CPU), activation checkpointing off, full and selective
(op by op), against a single-process run with Lightning's default strategy: per-step losses within 1e-5 over 3
optimizer steps and final weights within 1e-4. TP runs with sequence and loss parallelism; the other layouts run the
chunked loss (16-token chunks here, several per row). LoRA: DDP, FSDP (2 processes) and HSDP (4) against LoRA on one
process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.helpers import REPO_ROOT, free_port, news_rows

SCRIPT = Path(__file__).parent.parent / "scripts" / "parity_fit.py"
LAUNCH_TIMEOUT_S = 400


def _launch(tmp_path: Path, data: Path, checkpoint: Path, devices: int, runs: list[str], tag: str,
            *extra: str) -> dict:
    out = tmp_path / f"{tag}.json"
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, str(SCRIPT), "--checkpoint", str(checkpoint), "--data", str(data), "--cache",
           str(tmp_path / "cache"), "--out", str(out), "--root", str(tmp_path / tag), "--devices", str(devices),
           "--runs", ",".join(runs), *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture
def parity_inputs(tmp_path, tiny_checkpoint, make_hub_dir):
    data = make_hub_dir({"train": news_rows(40, article_words=30), "validation": news_rows(4, prefix="v"),
                         "test": news_rows(2, prefix="t")})
    reference = _launch(tmp_path, data, tiny_checkpoint, 1, ["single:none"], "reference")["single:none"]
    assert len(reference["losses"]) == 3
    assert reference["losses"][0] != reference["losses"][-1]  # it trains: parity is not trivially true
    return tmp_path, data, tiny_checkpoint, reference


def _assert_parity(tmp_path: Path, results: dict, reference: dict, ref_tag: str = "reference") -> None:
    ref_weights = torch.load(tmp_path / f"{ref_tag}.single.none.pt", weights_only=True)
    for spec, result in results.items():
        name, ac = spec.split(":")
        assert result["losses"] == pytest.approx(reference["losses"], abs=1e-5), spec
        weights = torch.load(next(p for p in tmp_path.glob(f"*.{name}.{ac}.pt") if not p.name.startswith(ref_tag)),
                             weights_only=True)
        assert weights.keys() == ref_weights.keys()
        for key, value in ref_weights.items():
            torch.testing.assert_close(weights[key], value, atol=1e-4, rtol=0, msg=f"{spec}: {key}")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S)
def test_ddp_fsdp_tp_on_two_processes_match_one_process(parity_inputs):
    tmp_path, data, checkpoint, reference = parity_inputs
    runs = [f"{layout}:{ac}" for layout in ("ddp", "fsdp", "tp") for ac in ("none", "full")] + ["fsdp:selective"]
    results = _launch(tmp_path, data, checkpoint, 2, runs, "two")
    assert set(results) == set(runs)
    assert all(r["world"] == 2 for r in results.values())
    _assert_parity(tmp_path, results, reference)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S)
def test_fsdp_times_tp_on_four_processes_matches_one_process(parity_inputs):
    tmp_path, data, checkpoint, reference = parity_inputs
    runs = ["fsdp_tp:none", "fsdp_tp:full", "fsdp_tp:selective"]
    results = _launch(tmp_path, data, checkpoint, 4, runs, "four")
    assert set(results) == set(runs)
    _assert_parity(tmp_path, results, reference)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(3 * LAUNCH_TIMEOUT_S)
def test_lora_under_ddp_fsdp_and_hsdp_matches_one_process(tmp_path, tiny_checkpoint, make_hub_dir):
    """LoRA (r 4 on q_proj, v_proj): the adapters train, the base stays put, and every data-parallel layout agrees."""
    data = make_hub_dir({"train": news_rows(40, article_words=30), "validation": news_rows(4, prefix="v"),
                         "test": news_rows(2, prefix="t")})
    lora = ("--lora_r", "4")
    reference = _launch(tmp_path, data, tiny_checkpoint, 1, ["single:none"], "lora_ref", *lora)["single:none"]
    assert reference["losses"][0] != reference["losses"][-1]
    ref_weights = torch.load(tmp_path / "lora_ref.single.none.pt", weights_only=True)
    adapters = [k for k in ref_weights if ".lora_B." in k]
    assert adapters and all(ref_weights[k].abs().max() > 0 for k in adapters)  # B starts at zero: it trained
    base = LlamaForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    for key, value in base.items():  # the frozen base is unchanged
        torch.testing.assert_close(ref_weights[key.replace("q_proj.", "q_proj.base_layer.").replace(
            "v_proj.", "v_proj.base_layer.")], value, atol=0, rtol=0)
    two = _launch(tmp_path, data, tiny_checkpoint, 2, ["ddp:none", "fsdp:full"], "lora_two", *lora)
    four = _launch(tmp_path, data, tiny_checkpoint, 4, ["hsdp:none"], "lora_four", *lora)
    _assert_parity(tmp_path, {**two, **four}, reference, ref_tag="lora_ref")
