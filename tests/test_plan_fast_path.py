"""``llama-ft plan`` without a recipe skips LightningCLI: same output as the LightningCLI path, no torch imported.

The fast path (``llama_ft.cli.fast_plan``) is forced by calling it; the LightningCLI path by calling
``llama_ft.cli.lightning_cli.main``, which always parses with the fit classes.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import lightning as L
import pytest

from llama_ft import defaults
from llama_ft.cli import fast_plan, lightning_cli, plan
from tests.helpers import REPO_ROOT

HEAVY = ("torch", "lightning", "transformers", "matplotlib")
CLUSTER_8B = ["--model=llama-3-8b", "--nodes", "2", "--devices", "8", "--gpu", "h100-80gb"]


@pytest.mark.parametrize("argv", [
    ["--model", "llama-3.2-1b", "--nodes", "1", "--devices", "1", "--gpu", "h100-80gb", "--precision", "bf16-mixed"],
    [*CLUSTER_8B, "--inter_node_gbps", "800", "--tp_size", "2", "--seq_len", "2048", "--json", "--top", "3"],
    ["--model", "llama-3-8b", "--devices", "0", "--gpu", "h100-80gb"],  # refused by the parser: exit 2, one line
], ids=["text", "json-pinned", "refused"])
def test_fast_path_prints_what_the_lightning_cli_path_prints(argv, capsys):
    fast_status = fast_plan.main(["plan", *argv])
    fast = capsys.readouterr()
    slow_status = lightning_cli.main(["plan", *argv])
    slow = capsys.readouterr()
    assert fast_status is not None  # it did take the fast path
    assert (fast_status, fast.out, fast.err) == (slow_status, slow.out, slow.err)
    assert fast.out or fast.err.startswith("error: --devices=0")


def test_no_recipe_reads_the_defaults_lightning_cli_parses(monkeypatch):
    """Every recipe value the fast path supplies equals what LightningCLI parses from the classes' signatures."""
    parsed = []
    monkeypatch.setattr(plan, "run", lambda config, argv: parsed.append(config) or 0)
    argv = ["plan", "--model", "llama-tiny", "--devices", "2"]
    assert lightning_cli.main(argv) == 0
    fast = fast_plan.parse(argv, fast_plan.build_parser())
    assert {key: parsed[0][key] for key, _ in fast.items()} == dict(fast.items())
    assert fast.data.max_length == 1024 and fast.data.global_batch_size == 256


def test_trainer_defaults_mirrored_for_the_fast_path_are_lightnings():
    parameters = inspect.signature(L.Trainer.__init__).parameters
    assert {key: parameters[key].default for key in defaults.TRAINER_ARGUMENTS} == defaults.TRAINER_ARGUMENTS
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    assert trainer.precision == defaults.TRAINER_PRECISION  # what `fit` runs when the recipe names no precision


@pytest.mark.parametrize(("argv", "fast"), [
    (["plan", "--model", "llama-3-8b", "--devices", "8", "--json", "--plot=p.png", "--cpu_offload", "false"], True),
    (["plan", "--model", "llama-3-8b", "--config", "r.yaml"], False),  # a recipe: LightningCLI
    (["plan", "--model", "llama-3-8b", "--trainer.precision", "bf16-mixed"], False),  # a class key
    (["plan", "--model.model_config", "llama-3-8b"], False),
    (["plan", "--model", "section.yaml"], False),  # the model section's own recipe file
    (["plan", "--model", "llama-3-8b", "--verify"], False),  # simulates with torch anyway
    (["plan", "--help"], False),
    (["fit", "--model", "llama-3-8b"], False),
])
def test_only_plan_options_take_the_fast_path(argv, fast):
    assert fast_plan.handles(argv, fast_plan.build_parser()) is fast


@pytest.mark.timeout(120)
@pytest.mark.parametrize("entry", [
    ["main.py"],
    ["-m", "llama_ft"],
    ["-c", "import sys; from llama_ft.cli import main; sys.exit(main())"],  # what the llama-ft console script runs
], ids=["main.py", "python -m llama_ft", "console script"])
def test_every_entry_point_plans_without_importing_torch(entry):
    proc = subprocess.run([sys.executable, "-X", "importtime", *entry, "plan", *CLUSTER_8B, "--json"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["cluster"]["world_size"] == 16
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "llama_ft" in imported and not imported & set(HEAVY)


def test_a_model_config_that_leaves_out_a_size_is_refused_in_one_line(tmp_path, capsys):
    """Read as plain JSON, a missing size cannot silently become transformers' default (a 7B shape)."""
    config = json.loads((REPO_ROOT / "llama_ft" / "presets" / "models" / "llama-tiny.json").read_text())
    del config["vocab_size"]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(config))
    assert fast_plan.main(["plan", "--model", str(partial), "--devices", "2", "--gpu", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {partial}: vocab_size is missing")
