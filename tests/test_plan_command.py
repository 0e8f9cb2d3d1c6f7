"""``python main.py plan``: recipe in, plan report (text or one JSON object) out; bad input exits 2 with the reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llama_ft.cli import main as cli_main
from llama_ft.presets import PRESETS_DIR

REPO = Path(__file__).resolve().parent.parent
FULL_RECIPE = REPO / "configs" / "llama3_8b_cnn_dailymail.yaml"


def main(argv: list[str]) -> int:
    """``llama-ft plan ARGV``; an argument the parser refuses exits 2 as on the command line."""
    try:
        return cli_main(["plan", *argv])
    except SystemExit as exit_:
        return int(exit_.code or 0)


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def recipe_8b(tmp_path: Path) -> Path:
    """The shape of the full recipe: model config preset, sequence, global batch, precision, advanced strategy."""
    return write_recipe(tmp_path / "llama3_8b.yaml", {
        "model": {"model_config": "llama-3-8b", "model_name_or_path": "meta-llama/Meta-Llama-3-8B"},
        "data": {"max_length": 1024, "global_batch_size": 256, "micro_batch_size": 1},
        "trainer": {"precision": "bf16-mixed", "strategy": "advanced"},
    })


def run_json(argv: list[str], capsys) -> dict:
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # the whole of stdout is one JSON object


def test_8b_recipe_on_one_h100_node_plans_fsdp_as_json(recipe_8b, capsys):
    data = run_json(["--config", str(recipe_8b), "--nodes", "1", "--devices", "8", "--gpu", "h100-80gb"], capsys)
    chosen = data["chosen"]
    assert chosen["dp_shard"] > 1 and chosen["tp"] == 1
    assert chosen["dp_replicate"] * chosen["dp_shard"] * chosen["tp"] == 8
    assert chosen["peak_memory_gib"] < 0.9 * 80
    assert chosen["micro_batch_size"] * chosen["grad_accumulation"] * chosen["dp_shard"] * chosen["dp_replicate"] \
        == 256
    assert data["model"]["name"] == "llama-3-8b" and data["train"]["seq_len"] == 1024
    assert data["candidates"][0] == chosen
    assert data["rejected"] and all(set(r) == {"layout", "reason"} for r in data["rejected"])


def test_text_report_and_flags_override_the_recipe(recipe_8b, capsys):
    code = main(["--config", str(recipe_8b), "--nodes", "1", "--devices", "8", "--gpu", "h100-80gb",
                 "--seq_len", "2048", "--global_batch_size", "64", "--top", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "sequence 2048, 943 real tokens per row on average, global batch 64" in out  # CNN/DailyMail rows
    assert "Chosen: " in out and "Top 3 of" in out
    assert "tokens/s/device" in out and "MFU" in out


def test_network_option_batching_mode_and_plot(recipe_8b, tmp_path, capsys):
    base = ["--config", str(recipe_8b), "--nodes", "2", "--devices", "8", "--gpu", "h100-80gb"]
    slow_net = run_json([*base, "--inter_node_gbps", "200", "--data.batching", "packed"], capsys)
    assert slow_net["cluster"]["node_network_gb_per_s"] == pytest.approx(200 / 8 * 0.9)
    assert slow_net["train"]["mean_tokens_per_row"] is None  # packed rows are full
    padded = run_json([*base, "--data.batching", "pad_to_max"], capsys)
    assert padded["train"]["pads_to_max"] and 800 < padded["train"]["mean_tokens_per_row"] < 900
    picture = tmp_path / "plan.png"
    assert main([*base, "--plot", str(picture)]) == 0
    assert picture.read_bytes()[:4] == b"\x89PNG"
    assert main([*base, "--plot", str(recipe_8b)]) == 2  # not a PNG: refused before planning


def test_strategy_init_args_pins_apply(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "tiny.yaml", {
        "model": {"model_config": "llama-tiny"},
        "data": {"max_length": 256, "global_batch_size": 8},
        "trainer": {"precision": "32-true", "devices": 2,
                    "strategy": {"class_path": "llama_ft.parallel.AdvancedParallelStrategy",
                                 "init_args": {"tp_size": 2, "activation_checkpointing": "auto"}}},
    })
    data = run_json(["--config", str(recipe), "--gpu", "cpu"], capsys)
    assert data["chosen"]["tp"] == 2 and data["pins"] == {"tp_size": 2}
    assert data["train"]["precision"] == "32-true" and data["cluster"]["world_size"] == 2


def test_model_flag_without_recipe_and_unknown_device(capsys):
    data = run_json(["--model", "llama-tiny", "--seq_len", "128", "--global_batch_size", "4", "--nodes", "1",
                     "--devices", "2", "--gpu_memory_gib", "24", "--gpu_tflops", "100", "--gpu", "rtx-4090"], capsys)
    assert data["cluster"]["accelerator"] == "rtx-4090" and data["cluster"]["device_memory_gib"] == 24
    assert data["train"]["precision"] == "32-true"  # no recipe: the Trainer's default, as `fit` would run


def test_local_checkpoint_directory_gives_the_architecture(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    shutil.copy(PRESETS_DIR / "llama-tiny.json", checkpoint / "config.json")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": {"model_name_or_path": str(checkpoint)},
        "data": {"max_length": 64, "global_batch_size": 4},
        "trainer": {"precision": "bf16-mixed"},
    })
    data = run_json(["--config", str(recipe), "--devices", "2", "--gpu", "cpu"], capsys)
    assert data["model"]["hidden_size"] == 128 and data["model"]["num_layers"] == 2


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--tp_size", "3"], "tp_size=3 does not divide"),
        (["--micro_batch_size", "3"], "micro_batch_size=3"),
        (["--gpu", "v100"], "unknown accelerator"),
    ],
)
def test_errors_exit_2_with_the_reason_on_stderr(recipe_8b, capsys, extra, expected):
    argv = ["--config", str(recipe_8b), "--nodes", "1", "--devices", "8", "--gpu", "h100-80gb", *extra]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert expected in captured.err and captured.out == ""


def test_missing_inputs_are_config_errors(tmp_path, capsys):
    assert main(["--devices", "8", "--gpu", "h100-80gb"]) == 2
    assert "--model" in capsys.readouterr().err
    # A recipe (or none) that relies on the data module's defaults plans with them, as `fit` would run.
    assert main(["--model", "llama-3-8b", "--devices", "8", "--gpu", "h100-80gb", "--json"]) == 0
    train = json.loads(capsys.readouterr().out)["train"]
    assert train["seq_len"] == 1024 and train["global_batch_size"] == 256
    hub_only = write_recipe(tmp_path / "hub.yaml", {"model": {"model_name_or_path": "meta-llama/Meta-Llama-3-8B"},
                                                    "data": {"max_length": 1024, "global_batch_size": 256}})
    assert main(["--config", str(hub_only), "--devices", "8", "--gpu", "h100-80gb"]) == 2
    assert "set model.model_config to a preset" in capsys.readouterr().err


def test_70b_that_does_not_fit_names_a_cluster(recipe_8b, capsys):
    code = main(["--config", str(recipe_8b), "--model", "llama-3-70b", "--nodes", "1", "--devices", "8",
                 "--gpu", "h100-80gb", "--cpu_offload", "false"])
    err = capsys.readouterr().err
    assert code == 2 and "smallest cluster of h100-80gb" in err


def test_subprocess_main_py_plan_prints_one_json_object(recipe_8b):
    recipe = FULL_RECIPE if FULL_RECIPE.is_file() else recipe_8b  # the lead's recipe once it lands
    proc = subprocess.run(
        [sys.executable, "main.py", "plan", "--config", str(recipe), "--nodes", "1", "--devices", "8",
         "--gpu", "h100-80gb", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["cluster"]["world_size"] == 8
    assert data["chosen"]["dp_replicate"] * data["chosen"]["dp_shard"] * data["chosen"]["tp"] == 8


# =============================================================================================================
# --verify: simulate the chosen plan and replace it if it does not fit
# =============================================================================================================

TINY = ["--model", "llama-tiny", "--seq_len", "128", "--global_batch_size", "8", "--nodes", "1", "--devices", "2",
        "--gpu", "cpu"]


@pytest.mark.timeout(300)
def test_verify_prints_predicted_vs_simulated_and_json_has_verification(capsys):
    assert main([*TINY, "--verify"]) == 0
    text = capsys.readouterr().out
    line = next(line for line in text.splitlines() if line.strip().startswith("#1 "))
    assert "predicted" in line and "simulated" in line and "<- chosen" in line
    assert "Verified: the chosen plan fits when simulated." in text
    data = run_json([*TINY, "--verify_top", "2"], capsys)
    verification = data["verification"]
    assert verification["replaced"] is False and verification["chosen_verified"] is True
    assert [check["rank"] for check in verification["simulated"]] == [1, 2]
    for check in verification["simulated"]:
        assert check["simulated_gib"] > 0 and abs(check["error_pct"]) <= 10  # the tiny model is modelled too
        assert check["fits"] is True and check["simulated_breakdown_gib"]["Sharded Param"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_verify_llama32_1b_on_eight_devices_agrees_within_ten_percent(capsys):
    data = run_json(["--model", "llama-3.2-1b", "--seq_len", "1024", "--global_batch_size", "64", "--nodes", "1",
                     "--devices", "8", "--gpu", "h100-80gb", "--verify"], capsys)
    check = data["verification"]["simulated"][0]
    assert check["layout"] == data["chosen"]["layout"]
    assert abs(check["error_pct"]) <= 10 and check["fits"] is True


def test_verify_replaces_a_plan_the_simulation_refutes(monkeypatch, capsys):
    """The simulator is replaced by one that says the planner's first choice needs 1 TiB: the next one is chosen."""
    from llama_ft.parallel.planning import verify
    from llama_ft.parallel.planning.simulate import SimulationResult

    refuted = []  # the first layout ever simulated: the planner's choice

    def fake_simulation(config, layout, micro_batch, seq_len, **kwargs):
        refuted.append(refuted[0] if refuted else (layout, micro_batch))
        peak = 2**40 if (layout, micro_batch) == refuted[0] else 2**20
        return SimulationResult("llama-tiny", layout, micro_batch, seq_len, kwargs["precision"], "sdpa", peak,
                                {"Sharded Param": peak})

    monkeypatch.setattr(verify, "simulate_peak_memory", fake_simulation)
    planned = run_json(TINY, capsys)["chosen"]["layout"]
    data = run_json([*TINY, "--verify"], capsys)
    verification = data["verification"]
    assert verification["replaced"] is True and verification["original_choice"] == planned
    assert data["chosen"]["layout"] == verification["chosen"] != planned
    assert [c["fits"] for c in verification["simulated"]] == [False, True]
    assert main([*TINY, "--verify"]) == 0
    text = capsys.readouterr().out
    assert f"Replaced: the planner's choice ({planned}) needs 1075.7 GiB > 14.4 GiB usable" in text  # + allowance
    assert "DOES NOT FIT" in text
    assert f"Chosen: {verification['chosen']}" in text


def test_verify_exits_1_when_no_simulated_candidate_fits(monkeypatch, capsys):
    from llama_ft.parallel.planning import verify
    from llama_ft.parallel.planning.simulate import SimulationResult

    def too_big(config, layout, micro_batch, seq_len, **kwargs):
        return SimulationResult("llama-tiny", layout, micro_batch, seq_len, kwargs["precision"], "sdpa", 2**40, {})

    monkeypatch.setattr(verify, "simulate_peak_memory", too_big)
    assert main([*TINY, "--verify"]) == 1
    text = capsys.readouterr().out
    assert "Not verified: no candidate simulated fits" in text
    assert text.count("DOES NOT FIT") == 1 + verify.MAX_EXTRA_SIMULATIONS


def test_the_recipe_strategy_describes_the_cluster_unless_flags_do(tmp_path, capsys):
    """A recipe's advanced strategy that names its device and network plans as ``fit`` would; flags win."""
    recipe = write_recipe(tmp_path / "described.yaml", {
        "model": {"model_config": "llama-3-8b"},
        "trainer": {"num_nodes": 2, "devices": 8, "strategy": {
            "class_path": "llama_ft.AdvancedParallelStrategy",
            "init_args": {"accelerator_name": "a100-80gb", "inter_node_gbps": 1600}}},
    })
    described = run_json(["--config", str(recipe)], capsys)["cluster"]
    assert described["accelerator"] == "a100-80gb" and described["world_size"] == 16
    assert described["node_network_gb_per_s"] == pytest.approx(1600 / 8 * 0.9)
    flags = run_json(["--config", str(recipe), "--gpu", "h100-80gb", "--inter_node_gbps", "800"], capsys)["cluster"]
    assert flags["accelerator"] == "h100-80gb" and flags["node_network_gb_per_s"] == pytest.approx(800 / 8 * 0.9)
    custom = write_recipe(tmp_path / "custom.yaml", {"model": {"model_config": "llama-3-8b"}, "trainer": {
        "devices": 2, "strategy": {"class_path": "llama_ft.AdvancedParallelStrategy",
                                   "init_args": {"device_memory_gib": 24.0}}}})
    assert main(["--config", str(custom)]) == 2
    assert "peak_tflops" in capsys.readouterr().err
