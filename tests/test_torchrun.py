"""Multi-node without SLURM: two ``torchrun`` "nodes" of one process each on localhost, as the README documents.

Each node is its own ``torchrun --nnodes 2 --node_rank R --master_addr 127.0.0.1 --master_port P --nproc_per_node 1
main.py fit ...`` (Lightning finds the world through its TorchElastic environment), under the ``advanced`` strategy
with the peer watchdog on, each rank loading its shards of the same checkpoint. The weights it exports at the end must
equal a one-process run's (fp32, ≤ 1e-4): the data module holds the global batch fixed, so both runs take the same
optimizer steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO_ROOT, free_port

RUN_TIMEOUT_S = 300


def _recipe(root: Path, checkpoint: Path) -> list[str]:
    """The embedded default, shortened, fine-tuning ``checkpoint`` (so both runs start from the same weights)."""
    return ["fit", f"--model.model_name_or_path={checkpoint}", "--model.model_config=null",
            f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
            "--trainer.logger.init_args.version=run", f"--data.cache_dir={root / 'cache'}",
            "--data.max_examples_per_split=16", "--data.max_length=128", "--data.global_batch_size=4",
            "--data.micro_batch_size=2", "--data.val_every_n_steps=2", "--trainer.max_steps=4",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--model.hf_export_dir={root / 'hf'}"]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for key in [k for k in env if k.startswith(("SLURM_", "MASTER_", "TORCHELASTIC_", "LOCAL_RANK", "RANK"))]:
        env.pop(key)
    return env


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "hf" / "model.safetensors")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 30)
def test_two_torchrun_nodes_match_one_process(tmp_path, tiny_checkpoint):
    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, "main.py", *_recipe(single, tiny_checkpoint)], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]

    nodes = tmp_path / "nodes"
    port = free_port()
    logs = [(nodes / f"node{rank}.log") for rank in range(2)]
    nodes.mkdir()
    procs = []
    for rank, log in enumerate(logs):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), "--nproc_per_node", "1", "main.py",
                   *_recipe(nodes, tiny_checkpoint), "--trainer.num_nodes=2", "--trainer.devices=1",
                   "--trainer.strategy=advanced"]
        with log.open("w") as out:
            procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=RUN_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    output = "\n".join(log.read_text()[-3000:] for log in logs)
    assert codes == [0, 0], output
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output, output
    chosen = json.loads((nodes / "tiny" / "run" / "plan.json").read_text())["chosen"]
    assert chosen["dp_replicate"] * chosen["dp_shard"] * chosen["tp"] == 2, chosen
    expected, got = _weights(single), _weights(nodes)
    assert expected.keys() == got.keys()
    difference = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    print(f"max |Δweight| 2 torchrun nodes vs 1 process: {difference:.3g}")
    assert difference <= 1e-4
