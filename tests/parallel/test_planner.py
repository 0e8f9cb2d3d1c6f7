"""The planner picks layouts that make sense, refuses what cannot work, and explains both."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from llama_ft.errors import ConfigError, PlanError
from llama_ft.global_batch import grad_accumulation
from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.coefficients import DEFAULT_COEFFICIENTS
from llama_ft.parallel.planning.planner import (
    NothingFitsError,
    PlanPins,
    fits_on_some_cluster,
    plan_parallelism,
    rank_plans,
    smallest_fitting_cluster,
)
from llama_ft.parallel.planning.report import format_plan_report, format_verification, plan_result_to_dict
from llama_ft.parallel.planning.shapes import valid_tp_sizes
from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec, TrainSpec
from llama_ft.parallel.planning.units import GiB
from llama_ft.parallel.planning.verify import MAX_EXTRA_SIMULATIONS, verify_plan
from llama_ft.presets import load_llama_config


def model(preset: str) -> ModelSpec:
    return ModelSpec.from_llama_config(load_llama_config(preset), name=preset)


def h100(nodes: int, devices: int = 8) -> ClusterSpec:
    return ClusterSpec.from_accelerator("h100-80gb", nodes, devices)


RECIPE = TrainSpec(seq_len=1024, global_batch_size=256, precision="bf16-mixed")


def test_tiny_model_on_two_cpu_devices_plans_ddp():
    result = plan_parallelism(model("llama-tiny"), ClusterSpec.from_accelerator("cpu", 1, 2), TrainSpec(256, 8))
    layout = result.chosen.layout
    assert (layout.dp_replicate, layout.dp_shard, layout.tp) == (2, 1, 1)
    assert layout.activation_checkpointing == "none" and not layout.cpu_offload
    assert result.chosen.micro_batch_size * result.chosen.grad_accumulation * 2 == 8


def test_llama3_8b_on_one_h100_node_shards_data_parallel_without_tp():
    result = plan_parallelism(model("llama-3-8b"), h100(1), RECIPE)
    chosen = result.chosen
    assert chosen.layout.dp_shard > 1 and chosen.layout.tp == 1
    assert not chosen.layout.cpu_offload
    assert chosen.peak_bytes < 0.9 * 80 * GiB
    assert chosen.micro_batch_size * chosen.grad_accumulation * chosen.layout.dp_size == 256
    assert 0.2 < chosen.mfu < 0.6  # plausible for an 8B model on H100 with FSDP
    # plain DDP cannot hold 16 bytes/parameter of an 8B model on 80 GB, and says so
    ddp = [r for r in result.rejected if r.layout and r.layout.kind == "DDP" and r.layout.tp == 1]
    assert ddp and all(re.search(r"needs [\d.]+ GiB > 71\.7 GiB usable", r.reason) for r in ddp)


def test_llama3_70b_on_one_node_offloads_or_names_a_cluster_that_fits():
    try:
        result = plan_parallelism(model("llama-3-70b"), h100(1), RECIPE)
    except NothingFitsError as err:
        assert err.smallest_cluster is not None
        assert f"{err.smallest_cluster.nodes} nodes × 8" in str(err)
        plan_parallelism(model("llama-3-70b"), err.smallest_cluster, RECIPE)
    else:
        assert result.chosen.layout.cpu_offload
        assert result.chosen.memory.host_bytes > 100 * GiB  # the 16 B/param states now live on the host
        assert all(p.layout.cpu_offload for p in result.candidates)  # offload only because nothing else fits


def test_llama3_70b_without_offload_names_the_smallest_cluster_and_it_plans():
    pins = PlanPins(cpu_offload=False)
    with pytest.raises(NothingFitsError) as err:
        plan_parallelism(model("llama-3-70b"), h100(1), RECIPE, pins)
    bigger = err.value.smallest_cluster
    assert bigger is not None and bigger.nodes > 1
    message = str(err.value)
    assert f"{bigger.nodes} nodes × 8 = {bigger.world_size} devices" in message
    assert "Without the pins this cluster fits" in message and "CPU offload" in message
    fits = plan_parallelism(model("llama-3-70b"), bigger, RECIPE, pins)
    assert not fits.chosen.layout.cpu_offload
    with pytest.raises(PlanError):  # and one node fewer really does not fit
        plan_parallelism(model("llama-3-70b"), h100(bigger.nodes - 1), RECIPE, pins)


def test_llama31_405b_on_64_nodes_weighs_tensor_parallel_and_pure_fsdp_layouts():
    train = TrainSpec(1024, 1024, "bf16-mixed")  # 512 devices: tp=1 and tp>1 layouts both exist at this batch
    result = plan_parallelism(model("llama-3.1-405b"), h100(64), train)
    assert not result.chosen.layout.cpu_offload
    tps = {p.layout.tp for p in result.candidates}
    assert 1 in tps and 8 in tps
    # FSDP over all 512 GPUs rings through every NIC of every node, so its gathers hide behind compute: what is
    # exposed is the slowdown they cause to the compute beside them, not the collectives' own time.
    best = result.chosen
    assert best.time.communication_s < best.time.compute_s
    assert best.time.exposed_communication_s < 0.2 * best.time.communication_s


def test_planning_512_devices_returns_ranked_plans():
    result = plan_parallelism(model("llama-3-70b"), h100(64), TrainSpec(1024, 1024))
    assert result.chosen is result.candidates[0]
    assert all(p.layout.world_size == 512 for p in result.candidates)
    speeds = [p.tokens_per_s_per_device for p in result.candidates[1:]]
    assert speeds == sorted(speeds, reverse=True)


def test_pinned_tp_that_does_not_divide_kv_heads_is_refused_with_valid_sizes():
    with pytest.raises(PlanError) as err:
        plan_parallelism(model("llama-tiny"), ClusterSpec.from_accelerator("cpu", 1, 4), TrainSpec(256, 8),
                         PlanPins(tp_size=4))
    message = str(err.value)
    assert "tp_size=4 does not divide num_key_value_heads=2" in message
    assert "valid tp sizes on this cluster" in message and "[1, 2]" in message
    with pytest.raises(PlanError, match=r"tp_size=3 .*num_key_value_heads=8.*\[1, 2, 4, 8\]"):
        plan_parallelism(model("llama-3-8b"), h100(1), RECIPE, PlanPins(tp_size=3))


def test_pinned_micro_batch_that_does_not_divide_the_global_batch_is_refused():
    with pytest.raises(PlanError) as err:
        plan_parallelism(model("llama-3-8b"), h100(1), RECIPE, PlanPins(micro_batch_size=3))
    message = str(err.value)
    assert "micro_batch_size=3" in message and "256" in message
    assert "[1, 2, 4, 8, 16, 32" in message


@pytest.mark.timeout(60)  # the enumeration was linear in the global batch: a typo of extra zeros hung for minutes
def test_a_huge_global_batch_plans_at_once_and_a_bad_micro_batch_lists_a_bounded_choice():
    huge = 10**21
    result = plan_parallelism(model("llama-3-8b"), h100(1), replace(RECIPE, global_batch_size=huge))
    chosen = result.chosen
    assert chosen.micro_batch_size * chosen.grad_accumulation * chosen.layout.dp_size == huge
    with pytest.raises(ConfigError, match=r"micro-batch sizes up to 64 that divide it: \[1, 2, 4, 5, 8, 10,"):
        grad_accumulation(huge, 3, 8)


@pytest.mark.timeout(60)  # the search walked every node count up to the global batch: a minute at 100,000
def test_a_step_no_cluster_can_hold_is_answered_at_once():
    """The unshardable part (activations of one micro-batch under full checkpointing) exceeds the device."""
    impossible = TrainSpec(seq_len=1_000_000, global_batch_size=100_000, precision="bf16-mixed")
    assert smallest_fitting_cluster(model("llama-3-8b"), h100(1), impossible) is None
    assert not fits_on_some_cluster(model("llama-3-8b"), h100(1), impossible, PlanPins(), 72 * GiB,
                                    DEFAULT_COEFFICIENTS)
    assert fits_on_some_cluster(model("llama-3.1-405b"), h100(1), RECIPE, PlanPins(), 72 * GiB, DEFAULT_COEFFICIENTS)


def test_pinned_dp_shard_that_cannot_split_the_world_is_refused():
    with pytest.raises(PlanError, match=r"dp_shard_size=3 .*valid dp_shard_size values: \[1, 2, 4, 8\]"):
        plan_parallelism(model("llama-3-8b"), h100(1), RECIPE, PlanPins(dp_shard_size=3))


def test_pins_are_honoured():
    result = plan_parallelism(model("llama-3-8b"), h100(1), RECIPE,
                              PlanPins(tp_size=2, activation_checkpointing="full", micro_batch_size=2))
    assert all(p.layout.tp == 2 and p.layout.activation_checkpointing == "full" and p.micro_batch_size == 2
               for p in result.candidates)


def test_pins_that_fit_nowhere_on_this_cluster_say_what_would():
    with pytest.raises(NothingFitsError, match="Without the pins this cluster fits: FSDP"):
        plan_parallelism(model("llama-3-8b"), h100(1), RECIPE,
                         PlanPins(dp_shard_size=1, tp_size=1, activation_checkpointing="none", cpu_offload=False))


def test_valid_tp_sizes_follow_heads_and_node_size():
    assert valid_tp_sizes(model("llama-3-8b"), h100(1)) == [1, 2, 4, 8]
    assert valid_tp_sizes(model("llama-3-8b"), h100(2, devices=4)) == [1, 2, 4]
    assert valid_tp_sizes(model("llama-tiny"), ClusterSpec.from_accelerator("cpu", 1, 8)) == [1, 2]


def test_smallest_fitting_cluster_is_none_when_the_batch_cannot_spread_enough():
    # 405B with one sequence per step cannot be spread over more than one TP group of 8
    train = TrainSpec(1024, 1, "bf16-mixed")
    assert smallest_fitting_cluster(model("llama-3.1-405b"), h100(1), train, PlanPins(cpu_offload=False)) is None


def test_near_ties_go_to_the_simpler_layout():
    result = plan_parallelism(model("llama-3-8b"), h100(1), RECIPE)
    fsdp = result.candidates[0]
    ddp_like = replace(fsdp, layout=replace(fsdp.layout, dp_replicate=8, dp_shard=1))
    slower = fsdp.tokens_per_s_per_device
    assert rank_plans([fsdp, replace(ddp_like, tokens_per_s_per_device=slower * 0.98)])[0].layout.kind == "DDP"
    assert rank_plans([fsdp, replace(ddp_like, tokens_per_s_per_device=slower * 0.90)])[0] is fsdp
    selective = replace(fsdp, layout=replace(fsdp.layout, activation_checkpointing="selective"),
                        tokens_per_s_per_device=slower * 1.01)
    assert rank_plans([selective, fsdp])[0] is fsdp  # less checkpointing wins a near-tie


def test_report_and_dict_describe_the_result():
    result = plan_parallelism(model("llama-3-8b"), h100(1), RECIPE)
    data = plan_result_to_dict(result)
    assert {"chosen", "candidates", "rejected"} <= set(data)
    chosen = data["chosen"]
    for key in ("dp_replicate", "dp_shard", "tp", "activation_checkpointing", "micro_batch_size",
                "grad_accumulation", "cpu_offload", "peak_memory_gib", "memory_breakdown_gib", "step_time_s",
                "tokens_per_s_per_device", "mfu", "layout"):
        assert key in chosen
    assert chosen["memory_breakdown_gib"]["total"] == pytest.approx(chosen["peak_memory_gib"], abs=0.01)
    assert len(data["candidates"]) == len(result.candidates)
    assert all(set(r) == {"layout", "reason"} for r in data["rejected"])
    json.dumps(data)  # plain values only
    text = format_plan_report(result, top=5)
    assert f"Chosen: {result.chosen.describe()}" in text
    assert "Rejected layouts" in text and "DDP 8, AC" in text
    assert text.count("FSDP") >= 5



# =============================================================================================================
# Verification: the simulation confirms the choice or replaces it
# =============================================================================================================


def fake_simulator(peaks: dict[int, float]):
    """A simulator that answers ``peaks[call number]`` bytes (default 1 GiB) and records what it was asked."""
    from llama_ft.parallel.planning.simulate import SimulationResult

    asked: list[tuple[Layout, int]] = []

    def simulate(config, layout, micro_batch, seq_len, **kwargs):
        asked.append((layout, micro_batch))
        peak = int(peaks.get(len(asked), GiB))
        return SimulationResult("fake", layout, micro_batch, seq_len, kwargs["precision"], "sdpa", peak, {})

    return simulate, asked


def test_verification_keeps_a_choice_that_fits_and_simulates_the_top_k():
    result = plan_parallelism(model("llama-3-8b"), h100(1), RECIPE)
    simulate, asked = fake_simulator({})
    verified = verify_plan(result, "llama-3-8b", top_k=3, simulator=simulate)
    assert not verified.replaced and verified.verified and verified.result is result
    assert [(p.layout, p.micro_batch_size) for p in result.candidates[:3]] == asked
    assert [v.rank for v in verified.verifications] == [1, 2, 3]


def test_verification_replaces_a_refuted_choice_with_the_next_that_fits():
    result = plan_parallelism(model("llama-3-8b"), h100(1), RECIPE)
    simulate, _ = fake_simulator({1: 80 * GiB, 2: 75 * GiB})  # the first two do not fit 71.7 GiB usable
    verified = verify_plan(result, "llama-3-8b", simulator=simulate)
    assert verified.replaced and verified.verified
    assert verified.original is result.chosen and verified.result.chosen is result.candidates[2]
    assert verified.result.candidates[0] is result.candidates[2] and len(verified.result.candidates) == len(
        result.candidates)
    assert [v.fits for v in verified.verifications] == [False, False, True]
    text = format_verification(verified)
    assert "Replaced: the planner's choice" in text and "#3 " in text and text.count("DOES NOT FIT") == 2


def test_verification_gives_up_after_a_bounded_search_and_says_so():
    result = plan_parallelism(model("llama-3-8b"), h100(1), RECIPE)
    simulate, asked = fake_simulator({n: 100 * GiB for n in range(1, 100)})
    verified = verify_plan(result, "llama-3-8b", simulator=simulate)
    assert len(asked) == 1 + MAX_EXTRA_SIMULATIONS
    assert not verified.replaced and not verified.verified
    assert "Not verified: no candidate simulated fits" in format_verification(verified)


def test_verification_cannot_simulate_cpu_offload_and_keeps_the_choice_unverified():
    train = TrainSpec(1024, 256, "bf16-mixed")
    result = plan_parallelism(model("llama-3-70b"), h100(1), train)
    assert result.chosen.layout.cpu_offload
    simulate, asked = fake_simulator({})
    verified = verify_plan(result, "llama-3-70b", simulator=simulate)
    assert asked == []  # nothing was simulated
    assert verified.result.chosen is result.chosen and not verified.verified
    assert "CPU offload cannot be simulated" in format_verification(verified)
