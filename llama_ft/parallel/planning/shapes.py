"""Which (replicate, shard, tensor-parallel) shapes a cluster allows for a model: the planner's search space."""

from __future__ import annotations

import math

from llama_ft.parallel.planning.specs import ClusterSpec, ModelSpec


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def tp_problems(model: ModelSpec, cluster: ClusterSpec, tp: int) -> list[str]:
    """Why tensor parallelism of size ``tp`` cannot split this model on this cluster (empty when it can)."""
    problems = [
        f"does not divide {name}={value}"
        for name, value in (("num_attention_heads", model.num_heads), ("num_key_value_heads", model.num_kv_heads),
                            ("intermediate_size", model.intermediate_size))
        if value % tp
    ]
    if tp > cluster.devices_per_node or cluster.devices_per_node % tp:
        problems.append(f"does not fit evenly in a node of {cluster.devices_per_node} devices (TP stays on NVLink)")
    if cluster.world_size % tp:
        problems.append(f"does not divide the world size {cluster.world_size}")
    return problems


def valid_tp_sizes(model: ModelSpec, cluster: ClusterSpec) -> list[int]:
    return [tp for tp in divisors(cluster.world_size) if not tp_problems(model, cluster, tp)]


def layout_shapes(model: ModelSpec, cluster: ClusterSpec) -> list[tuple[int, int, int]]:
    """Every (dp_replicate, dp_shard, tp) whose product is the world size, with a valid tp."""
    shapes = []
    for tp in valid_tp_sizes(model, cluster):
        dp = cluster.world_size // tp
        shapes.extend((dp // shard, shard, tp) for shard in divisors(dp))
    return shapes
