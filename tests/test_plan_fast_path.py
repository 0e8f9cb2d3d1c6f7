"""``llama-ft plan`` skips LightningCLI: same output as the LightningCLI path, no torch imported, with or without a
recipe; what it cannot be sure of goes to the LightningCLI path.

The fast path (``llama_ft.cli.fast_plan``) is forced by calling it; the LightningCLI path by calling
``llama_ft.cli.lightning_cli.main``, which always parses with the fit classes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import pytest

from llama_ft.cli import fast_plan, lightning_cli, plan, recipe_schema
from llama_ft.parallel.planning.accelerators import no_cuda_driver
from llama_ft.parallel.planning.specs import TRAINER_PRECISION
from llama_ft.presets import DEFAULT_RECIPE
from tests.helpers import REPO_ROOT

HEAVY = ("torch", "lightning", "transformers", "matplotlib")
CLUSTER_8B = ["--model=llama-3-8b", "--nodes", "2", "--devices", "8", "--gpu", "h100-80gb"]
RECIPE_8B = str(REPO_ROOT / "configs" / "llama3_8b_cnn_dailymail.yaml")
RECIPE_LORA = str(REPO_ROOT / "configs" / "llama3_8b_cnn_dailymail_lora.yaml")
# A recipe that pins the layout through the strategy's arguments (the bare class name, as jsonargparse allows).
PINNED = """trainer:
  devices: 4
  num_nodes: 2
  precision: bf16
  strategy:
    class_path: AdvancedParallelStrategy
    init_args: {tp_size: 2, memory_fraction: 0.8, activation_checkpointing: full}
model: {model_config: llama-3-8b}
data: {max_length: 2048, global_batch_size: 64, batching: packed}
"""
# Values jsonargparse converts: ints where floats are due, a list where a tuple is, LoRA fields left out.
CONVERTED = """trainer:
  gradient_clip_val: 1
  strategy:
    class_path: llama_ft.parallel.AdvancedParallelStrategy
    init_args: {memory_fraction: 1, peak_tflops: 100}
model: {learning_rate: 1, betas: [0, 0.5], lora: {alpha: 16, dropout: 0}}
"""


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


@pytest.fixture
def pinned_recipe(tmp_path):
    path = tmp_path / "pinned.yaml"
    path.write_text(PINNED)
    return str(path)


@pytest.fixture
def converted_recipe(tmp_path):
    path = tmp_path / "converted.yaml"
    path.write_text(CONVERTED)
    return str(path)


RECIPE_CASES = {
    "embedded default": ["--config", str(DEFAULT_RECIPE), "--devices", "2", "--gpu", "cpu"],
    "8B recipe": ["--config", RECIPE_8B, "--nodes", "4", "--gpu", "h100-80gb", "--top", "3"],
    "LoRA recipe, json": ["-c", RECIPE_LORA, "--gpu", "a100-80gb", "--json", "--top", "2"],
    "--model after the recipe wins": [f"--config={RECIPE_8B}", "--model", "llama-3.2-1b", "--gpu", "h100-80gb"],
    "the recipe's model wins over an earlier --model": ["--model", "llama-3.2-1b", "--config", RECIPE_8B,
                                                        "--gpu", "h100-80gb", "--top", "2"],
    "strategy arguments pin the plan": ["--config", "PINNED", "--gpu", "h100-80gb"],
    "a pin the recipe cannot run": ["--config", RECIPE_LORA, "--gpu", "h100-80gb", "--tp_size", "2"],
    "class keys after the recipe win": ["--config", RECIPE_8B, "--data.max_length", "4096", "--trainer.num_nodes=2",
                                        "--data.batching=packed", "--gpu", "h100-80gb", "--top", "2"],
    "the recipe wins over earlier class keys": ["--data.max_length", "4096", "--config", RECIPE_8B,
                                                "--gpu", "h100-80gb", "--top", "2"],
    "class keys alone": ["--model.model_config", "llama-3.2-3b", "--trainer.precision", "bf16-true",
                         "--model.learning_rate=2e-5", "--data.num_proc", "null", "--gpu", "a100-80gb",
                         "--devices", "4"],
}


@pytest.mark.parametrize("argv", RECIPE_CASES.values(), ids=RECIPE_CASES.keys())
def test_a_recipe_plans_as_on_the_lightning_cli_path(argv, pinned_recipe, capsys):
    argv = ["plan", *(pinned_recipe if arg == "PINNED" else arg for arg in argv)]
    fast_status = fast_plan.main(argv)
    fast = capsys.readouterr()
    slow_status = lightning_cli.main(argv)
    slow = capsys.readouterr()
    assert fast_status is not None  # it did take the fast path
    assert (fast_status, fast.out, fast.err) == (slow_status, slow.out, slow.err)
    assert fast.out or fast.err.startswith("error: tp_size=2 with model.lora")


CLASS_KEYS = ["--data.max_length", "4096", "--model.learning_rate=2e-5", "--data.num_proc", "null",
              "--trainer.precision", "bf16-true", "--trainer.max_epochs=1"]


@pytest.mark.parametrize(("recipe", "extra"), [(None, []), (RECIPE_LORA, []), ("PINNED", []), ("CONVERTED", []),
                                               (RECIPE_8B, CLASS_KEYS)],
                         ids=["no recipe", "LoRA recipe", "pinned", "converted", "class keys"])
def test_the_recipe_values_are_those_lightning_cli_parses(recipe, extra, pinned_recipe, converted_recipe,
                                                          monkeypatch):
    """Every value the fast path supplies equals LightningCLI's (classes' defaults, the recipe's values, the
    strategy's arguments, the LoRA fields with their defaults); only the classes plan does not read (callbacks,
    logger) stay as the recipe wrote them."""
    parsed = []
    monkeypatch.setattr(plan, "run", lambda config, argv: parsed.append(config) or 0)
    argv = ["plan", "--model", "llama-tiny", "--devices", "2"]
    if recipe:
        argv += ["--config", {"PINNED": pinned_recipe, "CONVERTED": converted_recipe}.get(recipe, recipe)]
    argv += extra
    assert lightning_cli.main(argv) == 0
    fast = fast_plan.parse(argv, fast_plan.build_parser(), recipe_schema.load_schema())
    slow = parsed[0]
    keys = recipe_schema.load_schema()["keys"]
    values = {key: value for key, value in fast.items() if key not in keys or not _class_valued(keys[key]["type"])}
    assert {key: slow[key] for key in values} == values
    read_by_plan = ("trainer.precision", "trainer.num_nodes", "trainer.devices", "trainer.strategy",
                    "model.model_config", "model.model_name_or_path", "model.lora", "data.dataset",
                    "data.max_length", "data.global_batch_size", "data.micro_batch_size", "data.batching")
    assert all(key in fast for key in read_by_plan)  # their values (nested ones flattened) are compared above
    if recipe == "PINNED":
        assert fast.trainer.strategy.init_args.tp_size == 2 and fast.data.batching == "packed"
    if recipe == "CONVERTED":
        assert fast.model.betas == (0.0, 0.5) and fast.model.lora.r == 8 and fast.model.lora.alpha == 16.0
    if extra:
        assert fast.data.max_length == 4096 and fast.data.num_proc is None and fast.trainer.precision == "bf16-true"


def _class_valued(form) -> bool:
    """Keys that take classes (callbacks, logger, plugins) the fast path leaves as written: plan does not read them."""
    return "opaque" in json.dumps(form)


def test_the_trainer_runs_32_true_when_no_precision_is_given():
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    assert trainer.precision == TRAINER_PRECISION  # what the planner plans when the recipe names no precision


def test_the_recipe_schema_is_what_the_installed_classes_give():
    """The shipped schema is derived from the parser; a changed signature without a regenerated file fails here."""
    shipped = recipe_schema.SCHEMA_PATH.read_text()
    assert shipped == recipe_schema.schema_text(recipe_schema.build_schema()), (
        f"{recipe_schema.SCHEMA_PATH.name} is out of date: run {recipe_schema.WRITE_COMMAND}")
    assert recipe_schema.load_schema() is not None  # derived under the installed versions, so it is used


@pytest.mark.parametrize("package", recipe_schema.DERIVED_FROM)
def test_a_schema_derived_under_other_versions_is_not_used(package, tmp_path):
    schema = json.loads(recipe_schema.SCHEMA_PATH.read_text())
    schema["versions"][package] = "1.0.0"
    other = tmp_path / "schema.json"
    other.write_text(json.dumps(schema))
    assert recipe_schema.load_schema(other) is None


UNSURE = {  # recipes the fast path leaves to LightningCLI, and what LightningCLI then says (None: it plans)
    "unknown key": ("data:\n  max_lenght: 2048\n", "error: "),
    "value of the wrong type": ("data:\n  max_length: -1\n", "error: "),
    "a bool where an int is due": ("trainer:\n  num_nodes: true\n", "error: "),
    "unknown section": ("dataa:\n  max_length: 2048\n", "error: "),
    "unknown strategy argument": ("trainer:\n  strategy:\n    class_path: llama_ft.AdvancedParallelStrategy\n"
                                  "    init_args: {tp: 2}\n", "error: "),
    "a strategy class it does not know": ("trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies."
                                          "DDPStrategy\n", None),
    "not a mapping": ("- trainer\n", "error: "),
    "a LoRA field it does not have": ("model:\n  lora: {rank: 8}\n", "error: "),
}


COMMAND_LINE_UNSURE = {  # class keys the fast path leaves to LightningCLI, and what it then says (None: it plans)
    "YAML turns it into a number where text is allowed": (["--trainer.precision", "16"], None),
    "a class-valued key": (["--trainer.strategy", "ddp"], None),
    "a dataclass field": (["--model.lora.r", "4"], None),
    "an unknown key": (["--data.max_lenght", "4"], "error: "),
    "a value out of range": (["--data.max_length", "0"], "error: "),
}


@pytest.mark.parametrize(("args", "outcome"), COMMAND_LINE_UNSURE.values(), ids=COMMAND_LINE_UNSURE.keys())
def test_command_line_keys_the_fast_path_is_unsure_of_go_to_lightning_cli(args, outcome, capsys):
    argv = ["plan", "--model", "llama-3-8b", "--devices", "8", "--gpu", "h100-80gb", *args]
    assert fast_plan.main(argv) is None
    status = lightning_cli.main(argv)
    err = capsys.readouterr().err
    assert (status == 0) if outcome is None else (status == 2 and err.startswith(outcome))


@pytest.mark.parametrize(("text", "outcome"), UNSURE.values(), ids=UNSURE.keys())
def test_what_the_fast_path_is_unsure_of_goes_to_lightning_cli(text, outcome, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    argv = ["plan", "--model", "llama-3-8b", "--devices", "8", "--gpu", "h100-80gb", "--config", str(recipe)]
    assert fast_plan.main(argv) is None
    status = lightning_cli.main(argv)
    err = capsys.readouterr().err
    if outcome is None:
        assert status == 0
    else:
        assert status == 2 and err.startswith(outcome) and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("argv", "fast"), [
    (["plan", "--model", "llama-3-8b", "--devices", "8", "--json", "--plot=p.png", "--cpu_offload", "false"], True),
    (["plan", "--model", "llama-3-8b", "--config", "r.yaml"], True),  # one recipe
    (["plan", "--model", "llama-3-8b", "--trainer.precision", "bf16-mixed"], True),  # a class key (checked later)
    (["plan", "--model.model_config=llama-3-8b"], True),
    (["plan", "--config", "r.yaml", "--config", "s.yaml"], False),  # recipes merged: LightningCLI
    (["plan", "--model", "section.yaml"], False),  # the model section's own recipe file
    (["plan", "--model=section.yml"], False),
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
    proc = subprocess.run([sys.executable, "-X", "importtime", *entry, "plan", *CLUSTER_8B, "--json",
                           "--config", RECIPE_8B],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["cluster"]["world_size"] == 16
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "llama_ft" in imported and not imported & set(HEAVY)


@pytest.mark.timeout(120)
def test_planning_for_this_machine_imports_torch_only_where_a_cuda_driver_may_be():
    """No ``--gpu``: the device is detected. Without a CUDA driver that needs no torch (it is a CPU); with one,
    torch says which GPU it is."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "main.py", "plan", "--config", RECIPE_8B, "--json"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert ("torch" in imported) is not no_cuda_driver()
    if no_cuda_driver():
        assert json.loads(proc.stdout)["cluster"]["accelerator"] == "cpu"


def test_a_model_config_that_leaves_out_a_size_is_refused_in_one_line(tmp_path, capsys):
    """Read as plain JSON, a missing size cannot silently become transformers' default (a 7B shape)."""
    config = json.loads((REPO_ROOT / "llama_ft" / "presets" / "models" / "llama-tiny.json").read_text())
    del config["vocab_size"]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(config))
    assert fast_plan.main(["plan", "--model", str(partial), "--devices", "2", "--gpu", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {partial}: vocab_size is missing")
