"""The plan report: a text table for people (rank-0 log, ``plan`` command) and a dict for JSON."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_ft.parallel.layout import Layout
from llama_ft.parallel.planning.planner import NEAR_TIE, Plan, PlanResult, Rejection
from llama_ft.parallel.planning.units import GiB

if TYPE_CHECKING:
    from llama_ft.parallel.planning.verify import Verification, VerifiedPlanResult

# Breakdown terms and the short column titles the table gives them.
_MEMORY_COLUMNS = (
    ("parameters", "param"),
    ("gradients", "grad"),
    ("optimizer_state", "optim"),
    ("working_weights", "work"),
    ("activations", "acts"),
    ("logits", "logit"),
    ("communication_buffers", "comm"),
    ("allowance", "other"),
)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """One plan as plain JSON-able values (GiB for memory, seconds for time)."""
    layout = plan.layout
    time = plan.time
    return {
        "layout": plan.describe(),
        "kind": layout.kind,
        "dp_replicate": layout.dp_replicate,
        "dp_shard": layout.dp_shard,
        "tp": layout.tp,
        "activation_checkpointing": layout.activation_checkpointing,
        "micro_batch_size": plan.micro_batch_size,
        "grad_accumulation": plan.grad_accumulation,
        "cpu_offload": layout.cpu_offload,
        "peak_memory_gib": round(plan.peak_bytes / GiB, 3),
        "memory_breakdown_gib": {k: round(v, 3) for k, v in plan.memory.as_gib().items()},
        "peak_phase": plan.memory.phase,
        "step_time_s": round(plan.step_time_s, 4),
        "step_time_breakdown_s": {
            "compute": round(time.compute_s, 4),
            "exposed_communication": round(time.exposed_communication_s, 4),
            "communication_before_overlap": round(time.communication_s, 4),
            "optimizer": round(time.optimizer_s, 4),
            "offload": round(time.offload_s, 4),
            "overhead": round(time.overhead_s, 4),
        },
        "tokens_per_s_per_device": round(plan.tokens_per_s_per_device, 1),
        "mfu": round(plan.mfu, 4),
    }


def plan_result_to_dict(result: PlanResult, max_candidates: int | None = None) -> dict[str, Any]:
    """``{"chosen", "candidates", "rejected"}`` plus what was planned for (model, cluster, train, pins)."""
    candidates = result.candidates if max_candidates is None else result.candidates[:max_candidates]
    model, cluster, train = result.model, result.cluster, result.train
    return {
        "chosen": plan_to_dict(result.chosen),
        "candidates": [plan_to_dict(p) for p in candidates],
        "rejected": [{"layout": r.description, "reason": r.reason} for r in result.rejected],
        "model": {
            "name": model.name,
            "total_params": model.total_params,
            "non_embedding_params": model.non_embedding_params,
            "num_layers": model.num_layers,
            "hidden_size": model.hidden_size,
            "num_heads": model.num_heads,
            "num_kv_heads": model.num_kv_heads,
            "intermediate_size": model.intermediate_size,
            "vocab_size": model.vocab_size,
            "tied_embeddings": model.tied_embeddings,
        },
        "cluster": {
            "accelerator": cluster.accelerator,
            "nodes": cluster.nodes,
            "devices_per_node": cluster.devices_per_node,
            "world_size": cluster.world_size,
            "device_memory_gib": round(cluster.device_memory_bytes / GiB, 3),
            "usable_memory_gib": round(result.memory_fraction * cluster.device_memory_bytes / GiB, 3),
            "memory_fraction": result.memory_fraction,
            "peak_tflops": cluster.peak_flops / 1e12,
            "intra_node_gb_per_s": cluster.intra_node_bandwidth / 1e9,
            "inter_node_gb_per_s": cluster.inter_node_bandwidth / 1e9,
        },
        "train": {
            "seq_len": train.seq_len,
            "global_batch_size": train.global_batch_size,
            "precision": train.precision,
            "optimizer": train.optimizer,
        },
        "pins": {k: v for k, v in result.pins.__dict__.items() if v is not None},
        "num_candidates": len(result.candidates),
    }


# =============================================================================================================
# Text
# =============================================================================================================


def _gib(nbytes: float, digits: int = 1) -> str:
    return f"{nbytes / GiB:.{digits}f}"


def _chosen_lines(plan: Plan) -> list[str]:
    """The chosen plan spelled out: where memory and time go."""
    memory = ", ".join(f"{title} {_gib(getattr(plan.memory, name))}" for name, title in _MEMORY_COLUMNS)
    host = f" (host: {_gib(plan.memory.host_bytes)} GiB per device offloaded)" if plan.memory.host_bytes else ""
    t = plan.time
    return [
        f"Chosen: {plan.describe()}",
        f"  memory  {_gib(plan.peak_bytes)} GiB/device, peak at the {plan.memory.phase} = {memory}{host}",
        f"  time    {plan.step_time_s:.2f} s/step = compute {t.compute_s:.2f} + exposed communication "
        f"{t.exposed_communication_s:.2f} (of {t.communication_s:.2f}) + optimizer {t.optimizer_s:.2f} + offload "
        f"{t.offload_s:.2f} + overhead {t.overhead_s:.2f}",
        f"  speed   {plan.tokens_per_s_per_device:,.0f} tokens/s/device, MFU {plan.mfu:.1%}",
    ]


def _candidate_table(plans: tuple[Plan, ...], top: int) -> list[str]:
    """Ranked table: layout, micro-batch × accumulation, peak and its terms (GiB), step time, speed, MFU."""
    rows = [["#", "layout", "mb×acc", "peak", *(t for _, t in _MEMORY_COLUMNS), "step s", "tok/s/dev", "MFU"]]
    for i, plan in enumerate(plans[:top], 1):
        rows.append([
            str(i),
            plan.layout.describe(),
            f"{plan.micro_batch_size}×{plan.grad_accumulation}",
            _gib(plan.peak_bytes),
            *(_gib(getattr(plan.memory, name)) for name, _ in _MEMORY_COLUMNS),
            f"{plan.step_time_s:.2f}",
            f"{plan.tokens_per_s_per_device:,.0f}",
            f"{plan.mfu:.1%}",
        ])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[c].ljust(widths[c]) if c == 1 else row[c].rjust(widths[c]) for c in range(len(row))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def _shape(layout: Layout | None) -> str:
    """A layout without its checkpointing mode (offload kept), to merge lines that differ only in AC."""
    if layout is None:
        return "any layout"
    return layout.describe().split(", AC")[0] + (", CPU offload" if layout.cpu_offload else "")


def summarize_rejections(rejected: tuple[Rejection, ...]) -> list[str]:
    """Layouts that fit at no micro-batch: one line per layout and reason, closest to fitting first."""
    modes: dict[tuple[str, str], list[str]] = defaultdict(list)
    needed: dict[tuple[str, str], float] = {}
    for r in rejected:
        if r.partial:
            continue
        key = (_shape(r.layout), r.reason)
        if r.layout:
            modes[key].append(r.layout.activation_checkpointing)
        needed[key] = r.needed_bytes if r.needed_bytes is not None else float("inf")
    lines = []
    for shape, reason in sorted(needed, key=lambda k: needed[k]):
        ac = "/".join(modes[(shape, reason)])
        lines.append(f"{shape}, AC {ac}: {reason}" if ac else f"{shape}: {reason}")
    return lines


def summarize_micro_batch_limits(rejected: tuple[Rejection, ...]) -> list[str]:
    """For layouts that fit only up to some micro-batch: the first size that does not fit, per AC mode."""
    limits: dict[str, list[str]] = defaultdict(list)
    for r in rejected:
        if r.partial and r.layout is not None:
            limits[_shape(r.layout)].append(
                f"AC {r.layout.activation_checkpointing} < {r.micro_batch_size} "
                f"({r.micro_batch_size} needs {_gib(r.needed_bytes or 0)} GiB)"
            )
    return [f"{shape}: " + "; ".join(items) for shape, items in limits.items()]


def format_plan_summary(result: PlanResult, report_path: Path, json_path: Path) -> str:
    """What a fit log shows: the chosen layout with its memory and speed, and where the whole report went."""
    rejected = len(summarize_rejections(result.rejected))
    return "\n".join([
        f"Plan for {result.cluster.describe()}:",
        *_chosen_lines(result.chosen),
        f"  report  {report_path} ({len(result.candidates)} feasible plans ranked, {rejected} layouts rejected); "
        f"JSON {json_path}",
    ])


def format_plan_report(result: PlanResult, top: int = 10, max_rejected: int = 20) -> str:
    """The whole report as text: what was planned for, the chosen plan, the ranked table, the rejections."""
    usable = result.memory_fraction * result.cluster.device_memory_bytes
    lines = [
        f"Model:    {result.model.describe()}",
        f"Cluster:  {result.cluster.describe()}",
        f"          usable memory {_gib(usable)} GiB per device (memory_fraction {result.memory_fraction})",
        f"Training: {result.train.describe()}",
        f"Pins:     {result.pins.describe()}",
        "",
        *_chosen_lines(result.chosen),
        "",
        f"Top {min(top, len(result.candidates))} of {len(result.candidates)} feasible plans (GiB per device; ranked "
        f"by predicted tokens/s, the simplest layout first among those within {NEAR_TIE:.0%} of the fastest):",
        *_candidate_table(result.candidates, top),
    ]
    rejections = summarize_rejections(result.rejected)
    if rejections:
        lines += ["", f"Rejected layouts ({len(rejections)}; closest to fitting first):"]
        lines += [f"  {line}" for line in rejections[:max_rejected]]
        if len(rejections) > max_rejected:
            lines.append(f"  ... and {len(rejections) - max_rejected} more (the JSON output lists all)")
    limits = summarize_micro_batch_limits(result.rejected)
    if limits:
        lines += ["", "Micro-batch limits (larger micro-batches of these layouts do not fit):"]
        lines += [f"  {line}" for line in limits[:max_rejected]]
        if len(limits) > max_rejected:
            lines.append(f"  ... and {len(limits) - max_rejected} more (the JSON output lists all)")
    return "\n".join(lines)


# =============================================================================================================
# Verification against the simulation
# =============================================================================================================


def _verification_line(check: Verification, chosen: Plan) -> str:
    """One simulated candidate: predicted vs simulated peak, the error, and whether it fits with the allowance."""
    head = f"#{check.rank} {check.plan.describe()}: predicted {_gib(check.predicted_bytes, 2)} GiB"
    if check.simulated is None:
        return f"{head}, not simulated ({check.failure})"
    needed, usable = check.needed_bytes or 0.0, check.usable_bytes
    verdict = "fits" if check.fits else "DOES NOT FIT"
    mark = "  <- chosen" if check.plan is chosen else ""
    return (f"{head}, simulated {_gib(check.simulated.peak_bytes, 2)} GiB (error {check.error:+.1%}); with the "
            f"{_gib(check.allowance_bytes, 2)} GiB allowance {_gib(needed)} {'<=' if check.fits else '>'} "
            f"{_gib(usable)} GiB usable: {verdict}{mark}")


def format_verification(verified: VerifiedPlanResult) -> str:
    """Predicted vs simulated peak per simulated candidate, and whether (and why) the choice was replaced."""
    chosen = verified.result.chosen
    lines = [
        "Verification (fake-tensor simulation of the training step at full size, rank 0; # is the planner's rank; "
        "predicted and simulated exclude the allowance for workspace and fragmentation, which the fit check adds "
        "back):",
        *(f"  {_verification_line(check, chosen)}" for check in verified.verifications),
    ]
    original = next(v for v in verified.verifications if v.plan is verified.original)
    if verified.replaced:
        lines.append(
            f"Replaced: the planner's choice ({verified.original.describe()}) needs {_gib(original.needed_bytes)} GiB "
            f"> {_gib(original.usable_bytes)} GiB usable when simulated; chose #{verified.chosen_verification.rank} "
            f"({chosen.describe()}), the next candidate that verifies."
        )
    elif not verified.verified:
        reason = original.failure or "no candidate simulated fits"
        lines.append(f"Not verified: {reason}; the planner's choice stands unconfirmed.")
    else:
        lines.append("Verified: the chosen plan fits when simulated.")
    return "\n".join(lines)
