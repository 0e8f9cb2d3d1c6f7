"""The time model: calibrated matmul efficiency, node-shared network bandwidth, real token counts."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from llama_ft.errors import ConfigError
from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.coefficients import DEFAULT_COEFFICIENTS
from llama_ft.parallel.planning.planner import PlanPins, plan_parallelism
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec
from llama_ft.parallel.planning.step_time import estimate_step_time, group_link, matmul_efficiency, overlapped

ROOT = Path(__file__).resolve().parents[2]


def test_a_ring_over_whole_nodes_uses_every_nic_and_a_replica_group_one():
    cluster = ClusterSpec.from_accelerator("a100-80gb", nodes=8, devices_per_node=8)
    nic = cluster.inter_node_bandwidth
    assert group_link(cluster, 8, 1, DEFAULT_COEFFICIENTS)[0] == cluster.intra_node_bandwidth  # inside a node
    assert group_link(cluster, 64, 1, DEFAULT_COEFFICIENTS)[0] == pytest.approx(8 * nic)  # FSDP 64: 8 NICs/node
    assert group_link(cluster, 8, 8, DEFAULT_COEFFICIENTS)[0] == pytest.approx(nic)  # HSDP replicas: one NIC
    assert group_link(cluster, 16, 4, DEFAULT_COEFFICIENTS)[0] == pytest.approx(2 * nic)  # shard 4: two per node


def test_node_network_option_sets_the_per_device_share():
    cluster = ClusterSpec.from_accelerator("h100-80gb", 2, 8).with_node_network(8 * 100)
    assert cluster.inter_node_bandwidth == pytest.approx(100 / 8 * 1e9 * 0.9)
    assert "90 GB/s per node" in cluster.describe()
    with pytest.raises(ConfigError):
        cluster.with_node_network(0)


def test_efficiency_depends_on_the_accelerator_and_the_width():
    wide, narrow = ModelSpec.from_preset("llama-3-70b"), ModelSpec.from_preset("llama-3.2-1b")
    a100 = ClusterSpec.from_accelerator("a100-80gb", 1, 8)
    h100 = ClusterSpec.from_accelerator("h100-80gb", 1, 8)
    eff = {(m.name, c.accelerator): matmul_efficiency(m, c, 1, 8192, DEFAULT_COEFFICIENTS)
           for m in (wide, narrow) for c in (a100, h100)}
    assert eff[("llama-3-70b", "a100-80gb")] > eff[("llama-3-70b", "h100-80gb")]  # A100 runs reach higher MFU
    assert eff[("llama-3-70b", "a100-80gb")] > eff[("llama-3.2-1b", "a100-80gb")]  # wider layers run faster
    assert matmul_efficiency(wide, a100, 8, 8192, DEFAULT_COEFFICIENTS) < eff[("llama-3-70b", "a100-80gb")]


def test_shorter_rows_take_less_time_and_padding_counts_as_no_tokens():
    model, cluster = ModelSpec.from_preset("llama-3-8b"), ClusterSpec.from_accelerator("h100-80gb", 1, 8)
    layout = Layout(1, 8, 1, "none")
    full = TrainSpec(1024, 256, "bf16-mixed")
    grouped = replace(full, mean_tokens_per_row=838)
    padded = replace(grouped, pads_to_max=True)
    times = {name: estimate_step_time(model, cluster, t, layout, 4, 8).compute_s
             for name, t in (("full", full), ("grouped", grouped), ("padded", padded))}
    assert times["grouped"] < 0.85 * times["full"] and times["padded"] == pytest.approx(times["full"])
    assert grouped.tokens_per_step == padded.tokens_per_step == 838 * 256
    result = plan_parallelism(model, cluster, padded, PlanPins(1, 8, 1, "none", 4))
    assert "838 real tokens per row" in full.describe() + padded.describe()
    assert result.chosen.tokens_per_s_per_device < plan_parallelism(
        model, cluster, full, PlanPins(1, 8, 1, "none", 4)).chosen.tokens_per_s_per_device
    with pytest.raises(ConfigError):
        TrainSpec(1024, 8, mean_tokens_per_row=2000)


def test_published_runs_are_predicted_within_the_targets():
    spec = importlib.util.spec_from_file_location("planner_vs_published", ROOT / "benchmarks/planner_vs_published.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    _, stats = module.build_table()
    assert stats["median"] <= 0.10
    assert stats["worst"] <= 0.20 and stats["within"] == stats["rows"]


def test_bf16_gradient_reduction_halves_the_hsdp_replica_traffic():
    """Code that reduces gradients in bf16 (IBM's fms-fsdp) moves half the bytes across nodes of what apply.py's fp32
    reduction moves; compute is unchanged."""
    model = ModelSpec.from_preset("llama-3-8b")
    cluster = ClusterSpec.from_accelerator("a100-80gb", 4, 8).with_node_network(100)
    train = TrainSpec(4096, 64, "bf16-mixed")
    layout = Layout(dp_replicate=4, dp_shard=8, activation_checkpointing="none")
    fp32 = estimate_step_time(model, cluster, train, layout, 2, 1)
    bf16 = estimate_step_time(model, cluster, train, layout, 2, 1,
                              replace(DEFAULT_COEFFICIENTS, bf16_gradient_reduction=True))
    assert bf16.compute_s == pytest.approx(fp32.compute_s)
    assert bf16.exposed_communication_s < fp32.exposed_communication_s


def test_overlapped_collectives_cost_the_slowdown_they_cause_or_what_outlasts_the_compute():
    slowdown = DEFAULT_COEFFICIENTS.overlap_compute_slowdown
    assert overlapped(1.0, 4.0, DEFAULT_COEFFICIENTS) == pytest.approx(slowdown * 1.0)  # hidden, slows the compute
    assert overlapped(4.2, 4.0, DEFAULT_COEFFICIENTS) == pytest.approx(slowdown * 4.0)  # barely fits: contention wins
    assert overlapped(6.0, 4.0, DEFAULT_COEFFICIENTS) == pytest.approx(2.0)  # outlasts the compute
    assert overlapped(1.0, 4.0, replace(DEFAULT_COEFFICIENTS, overlap_compute_slowdown=0.0)) == 0.0
