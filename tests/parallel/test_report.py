"""The plan report an expert can trust: peak phases, readable layouts and counts, what is modelled, the picture."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from llama_ft.errors import ConfigError
from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning import report
from llama_ft.parallel.planning.planner import NothingFitsError, PlanPins, plan_parallelism
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec
from llama_ft.parallel.planning.units import readable_count

ROOT = Path(__file__).resolve().parents[2]
RECIPE = TrainSpec(1024, 256, "bf16-mixed")


def test_layouts_read_as_experts_name_them():
    assert Layout(1, 1, 1).describe() == "single device, AC none"
    assert Layout(8, 1, 1).describe() == "DDP 8, AC none"
    assert Layout(1, 1, 8).describe() == "TP 8, AC none"
    assert Layout(2, 4, 2, "full").describe() == "HSDP 2×4 × TP 2, AC full"


def test_small_parameter_counts_are_readable():
    assert readable_count(4_200_000) == "4.2 M" and readable_count(8.03e9) == "8.03 B"
    tiny = ModelSpec.from_preset("llama-tiny")
    assert " M parameters" in tiny.describe() or " K parameters" in tiny.describe()


def test_report_names_peak_phases_and_says_time_is_modelled():
    result = plan_parallelism(ModelSpec.from_preset("llama-3-8b"), ClusterSpec.from_accelerator("h100-80gb", 1, 8),
                              TrainSpec(1024, 256, "bf16-mixed", mean_tokens_per_row=838))
    text = report.format_plan_report(result, top=4)
    table = text.split("feasible plans")[1].split("Rejected")[0]
    assert " at " in table.splitlines()[1] and all(p.memory.phase in table for p in result.candidates[:4])
    assert "modelled, not measured" in text and f"median error {report.PUBLISHED_MEDIAN_ERROR:.1%}" in text
    assert "838 real tokens per row" in text
    assert report.plan_result_to_dict(result)["time_model"]["modelled"] is True


def test_offload_reports_host_memory_per_node_and_so_does_the_smallest_cluster():
    model, cluster = ModelSpec.from_preset("llama-3-70b"), ClusterSpec.from_accelerator("h100-80gb", 1, 8)
    result = plan_parallelism(model, cluster, RECIPE)
    assert result.chosen.layout.cpu_offload
    assert "GiB per node" in report.format_plan_report(result)
    with pytest.raises(NothingFitsError, match="GiB per node"):  # a cluster that fits only with offload says so
        plan_parallelism(ModelSpec.from_preset("llama-3.1-405b"), cluster, TrainSpec(1024, 64, "bf16-mixed"),
                         PlanPins(cpu_offload=True))


def test_an_offloaded_plan_names_the_memory_fraction_that_keeps_it_on_the_device():
    """1B on one 24 GiB device: offloaded at the default fraction; the fraction the report names does plan it on the
    device, and a plan that does not offload says nothing of it."""
    model, train = ModelSpec.from_preset("llama-3.2-1b"), TrainSpec(1024, 256, "bf16-mixed", fused_optimizer=True)
    cluster = ClusterSpec.describe_device(24.0, 165.0, name="rtx-4090")
    offloaded = plan_parallelism(model, cluster, train)
    rejection, fraction = report.offload_near_miss(offloaded)
    assert offloaded.chosen.layout.cpu_offload and not rejection.layout.cpu_offload
    assert f"memory_fraction {fraction} admits it" in report.format_plan_report(offloaded)
    assert report.plan_result_to_dict(offloaded)["on_device_at_memory_fraction"]["memory_fraction"] == fraction
    on_device = plan_parallelism(model, cluster, train, memory_fraction=fraction)
    assert not on_device.chosen.layout.cpu_offload and report.offload_near_miss(on_device) is None
    slightly_less = plan_parallelism(model, cluster, train, memory_fraction=fraction - 0.01)
    assert slightly_less.chosen.layout.cpu_offload  # the fraction named is the smallest (to hundredths) that does


def test_verification_heading_says_it_checks_memory_against_a_simulation_not_a_gpu():
    source = Path(report.__file__).read_text()
    assert "not a GPU" in source and "memory only" in source


def test_published_accuracy_in_the_report_matches_the_benchmark():
    spec = importlib.util.spec_from_file_location("planner_vs_published", ROOT / "benchmarks/planner_vs_published.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    _, stats = module.build_table()
    assert (stats["rows"], stats["within"]) == (report.PUBLISHED_ROWS, report.PUBLISHED_WITHIN_20)
    assert stats["median"] == pytest.approx(report.PUBLISHED_MEDIAN_ERROR, abs=0.0005)


def test_plot_draws_the_top_candidates_and_never_replaces_a_foreign_file(tmp_path):
    from llama_ft.parallel.planning.plot import plot_plan

    result = plan_parallelism(ModelSpec.from_preset("llama-3.2-1b"), ClusterSpec.from_accelerator("h100-80gb", 1, 2),
                              RECIPE)
    out = plot_plan(result, tmp_path / "plan.png", top=3)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    plot_plan(result, out, top=3)  # its own picture may be redrawn
    foreign = tmp_path / "photo.png"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\nsomeone else's")
    with pytest.raises(ConfigError, match="not written by"):
        plot_plan(result, foreign)
    assert foreign.read_bytes() == b"\x89PNG\r\n\x1a\nsomeone else's"


@pytest.mark.timeout(120)
def test_planning_modules_import_no_torch_transformers_or_lightning():
    """Import planning as a user would (through the ``llama_ft`` package ``__init__``s) and plan: nothing on that
    path may pull in torch, transformers, lightning or matplotlib."""
    code = (
        "import sys\n"
        "import llama_ft.parallel.planning.planner as planner, llama_ft.parallel.planning.report as report\n"
        "from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec\n"
        "cluster, train = ClusterSpec.from_accelerator('h100-80gb', 1, 8), TrainSpec(1024, 256, 'bf16-mixed')\n"
        "result = planner.plan_parallelism(ModelSpec.from_preset('llama-3-8b'), cluster, train)\n"
        "report.format_plan_report(result)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'lightning', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "[]"
