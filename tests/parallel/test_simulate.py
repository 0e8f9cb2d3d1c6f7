"""The fake-tensor memory simulation: it runs for every kind of layout and its peaks move the way memory must.

Each simulation is a spawned child process (~5 s, mostly imports), so the small-model results are computed once per
module and shared by the assertions.
"""

from __future__ import annotations

import pytest

from llama_ft.errors import ConfigError, PlanError
from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.simulate import SimulationResult, simulate_peak_memory
from llama_ft.presets import load_llama_config

SMALL_MODEL = "llama-tiny"
SEQ_LEN = 256
BASE = Layout(dp_shard=2)

# name → (layout, micro-batch)
SMALL_RUNS: dict[str, tuple[Layout, int]] = {
    "base": (BASE, 2),
    "double-batch": (BASE, 4),
    "full-ac": (Layout(dp_shard=2, activation_checkpointing="full"), 2),
    "selective-ac": (Layout(dp_shard=2, activation_checkpointing="selective"), 2),
    "more-shards": (Layout(dp_shard=4), 2),
    "hsdp-2d": (Layout(dp_replicate=2, dp_shard=2, tp=2), 2),
}


@pytest.fixture(scope="module")
def small() -> dict[str, SimulationResult]:
    return {
        name: simulate_peak_memory(SMALL_MODEL, layout, micro_batch, SEQ_LEN, timeout_s=120)
        for name, (layout, micro_batch) in SMALL_RUNS.items()
    }


@pytest.mark.timeout(240)
def test_every_layout_kind_has_a_positive_peak(small: dict[str, SimulationResult]) -> None:
    for name, result in small.items():
        assert result.peak_bytes > 0, name
        assert sum(result.breakdown.values()) == result.peak_bytes, name
        assert result.breakdown["Sharded Param"] > 0, name


@pytest.mark.timeout(240)
def test_peak_grows_with_micro_batch(small: dict[str, SimulationResult]) -> None:
    assert small["double-batch"].peak_bytes > small["base"].peak_bytes


@pytest.mark.timeout(240)
def test_checkpointing_shrinks_the_peak(small: dict[str, SimulationResult]) -> None:
    assert small["full-ac"].peak_bytes < small["selective-ac"].peak_bytes < small["base"].peak_bytes


@pytest.mark.timeout(240)
def test_more_shards_shrink_the_peak(small: dict[str, SimulationResult]) -> None:
    assert small["more-shards"].peak_bytes < small["base"].peak_bytes
    assert small["more-shards"].breakdown["Sharded Param"] * 2 == pytest.approx(
        small["base"].breakdown["Sharded Param"], rel=0.01
    )


@pytest.mark.timeout(240)
def test_optimizer_state_is_two_fp32_moments_per_sharded_parameter(small: dict[str, SimulationResult]) -> None:
    """Guards the sharding-propagation fix: without it each step "allocates" unsharded copies as optimizer state."""
    result = small["base"]
    assert result.breakdown["OptState"] <= 3 * result.breakdown["Sharded Param"]


def test_bad_precision_is_refused_before_spawning() -> None:
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        simulate_peak_memory(SMALL_MODEL, BASE, 1, 16, precision="fp8")


def test_unknown_optimizer_is_refused_before_spawning() -> None:
    with pytest.raises(ConfigError, match="optimizer 'sgd' cannot be simulated"):
        simulate_peak_memory(SMALL_MODEL, BASE, 1, 16, optimizer="sgd")


def test_tensor_parallel_that_splits_heads_is_refused() -> None:
    with pytest.raises(PlanError, match="tensor parallel degree 8"):
        simulate_peak_memory(SMALL_MODEL, Layout(tp=8), 1, 16)


def test_cpu_offload_is_refused() -> None:
    with pytest.raises(PlanError, match="offloads to the CPU"):
        simulate_peak_memory(SMALL_MODEL, Layout(dp_shard=2, cpu_offload=True), 1, 16)


@pytest.mark.timeout(60)
def test_timeout_kills_the_child() -> None:
    with pytest.raises(TimeoutError, match="did not finish within"):
        simulate_peak_memory(SMALL_MODEL, BASE, 1, 16, timeout_s=0.5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_llama_3_2_1b_on_8_shards() -> None:
    """Full size: parameters and Adam moments are exactly 1/8 of the model's, and the whole peak fits one GPU."""
    config = load_llama_config("llama-3.2-1b")
    result = simulate_peak_memory(config, Layout(dp_shard=8), 1, 1024, timeout_s=240)
    parameters = 1_235_814_400  # Llama-3.2-1B, embeddings tied
    assert result.peak_bytes > 12 * parameters / 8  # fp32 params + moments; sharded grads may be freed at the peak
    assert result.peak_gib < 20
    assert result.wall_s < 120
    assert result.breakdown["OptState"] == pytest.approx(2 * 4 * parameters / 8, rel=0.02)  # two fp32 moments
    assert result.breakdown["Sharded Param"] == pytest.approx(4 * parameters / 8, rel=0.02)  # fp32 shards
