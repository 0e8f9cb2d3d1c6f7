"""Check the planner's choice against the fake-tensor simulation of the real training step, and replace it if it
does not fit.

The cost model ranks hundreds of layouts in milliseconds; the simulation (``simulate.py``) measures one in tens of
seconds. So the planner chooses, and this module simulates the chosen plan (and optionally the next few): a plan
whose simulated peak, plus the same allowance the planner adds for workspace and fragmentation, exceeds the usable
memory is replaced by the next-ranked candidate that does fit. The simulation cannot see allocator fragmentation or
cuBLAS/NCCL workspaces, which is why the allowance is added to it rather than compared against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from transformers import LlamaConfig

from llama_ft.parallel.planning.coefficients import DEFAULT_COEFFICIENTS, CostCoefficients
from llama_ft.parallel.planning.memory import allowance_bytes
from llama_ft.parallel.planning.planner import Plan, PlanResult
from llama_ft.parallel.planning.simulate import PRECISIONS, SimulationResult, simulate_peak_memory
from llama_ft.parallel.planning.units import GiB

Simulator = Callable[..., SimulationResult]

# Candidates simulated beyond the requested top k while looking for a replacement, before giving up: each one costs
# tens of seconds for an 8B model, and a cost model this far off should be fixed rather than searched around.
MAX_EXTRA_SIMULATIONS = 5


@dataclass(frozen=True)
class Verification:
    """One candidate's predicted peak next to its simulated one; ``failure`` says why it was not simulated."""

    rank: int  # 1-based position in the planner's ranking
    plan: Plan
    usable_bytes: float
    allowance_bytes: float
    simulated: SimulationResult | None = None
    failure: str | None = None

    @property
    def predicted_bytes(self) -> float:
        """The cost model's peak without its allowance: the same quantity the simulation measures."""
        return self.plan.memory.tensors

    @property
    def error(self) -> float | None:
        """predicted / simulated − 1 (positive: the cost model over-estimates)."""
        return None if self.simulated is None else self.predicted_bytes / self.simulated.peak_bytes - 1

    @property
    def needed_bytes(self) -> float | None:
        """Simulated peak plus the allowance: what the device must really hold."""
        return None if self.simulated is None else self.simulated.peak_bytes + self.allowance_bytes

    @property
    def fits(self) -> bool | None:
        """None when the plan could not be simulated (then it is neither confirmed nor refuted)."""
        needed = self.needed_bytes
        return None if needed is None else needed <= self.usable_bytes


@dataclass(frozen=True)
class VerifiedPlanResult:
    """The planner's result with ``chosen`` replaced when the simulation refuted it, and every simulation run."""

    result: PlanResult
    original: Plan
    verifications: tuple[Verification, ...]

    @property
    def replaced(self) -> bool:
        return self.result.chosen is not self.original

    @property
    def chosen_verification(self) -> Verification | None:
        return next((v for v in self.verifications if v.plan is self.result.chosen), None)

    @property
    def verified(self) -> bool:
        """True when the plan now chosen was simulated and fits."""
        check = self.chosen_verification
        return check is not None and check.fits is True


def simulation_blocker(plan: Plan, precision: str) -> str | None:
    """Why a plan cannot be simulated (the tracker has no host memory, and only some precisions are built)."""
    if plan.layout.cpu_offload:
        return "CPU offload cannot be simulated: on a CPU-only simulation host and device memory are one"
    if precision not in PRECISIONS:
        return f"precision {precision} cannot be simulated (simulated: {', '.join(sorted(PRECISIONS))})"
    return None


def verify_one(
    result: PlanResult,
    index: int,
    config: LlamaConfig | str,
    simulator: Simulator,
    coeffs: CostCoefficients,
    timeout_s: float,
) -> Verification:
    """Simulate candidate ``index`` of ``result``; a failed simulation is reported, not raised."""
    plan = result.candidates[index]
    usable = result.memory_fraction * result.cluster.device_memory_bytes
    blocker = simulation_blocker(plan, result.train.precision)
    if blocker is not None:
        return Verification(index + 1, plan, usable, plan.memory.allowance, failure=blocker)
    try:
        simulated = simulator(config, plan.layout, plan.micro_batch_size, result.train.seq_len,
                              precision=result.train.precision, grad_accumulation=plan.grad_accumulation,
                              optimizer="fused" if result.train.fused_optimizer else "foreach", timeout_s=timeout_s,
                              **({"lora": result.train.lora} if result.train.lora else {}))
    except (RuntimeError, TimeoutError) as err:
        return Verification(index + 1, plan, usable, plan.memory.allowance, failure=str(err).splitlines()[0])
    allowance = allowance_bytes(simulated.peak_bytes, coeffs)
    return Verification(index + 1, plan, usable, allowance, simulated=simulated)


def verify_plan(
    result: PlanResult,
    config: LlamaConfig | str,
    top_k: int = 1,
    *,
    simulator: Simulator | None = None,
    coeffs: CostCoefficients = DEFAULT_COEFFICIENTS,
    timeout_s: float = 900.0,
) -> VerifiedPlanResult:
    """Simulate the ``top_k`` best candidates; if the chosen one does not fit, choose the next one that does.

    Candidates are tried in the planner's order and the first that fits becomes the choice; a chosen plan that cannot
    be simulated (CPU offload) is kept, unverified, and a replacement must have been simulated. At most
    ``MAX_EXTRA_SIMULATIONS`` candidates beyond ``top_k`` are simulated while looking. When none fits, ``chosen``
    stays the planner's and ``verified`` is False, so the caller can refuse the plan. ``config`` is the model's
    ``LlamaConfig`` or a preset name; ``simulator`` defaults to :func:`simulate_peak_memory` (looked up at call
    time, so tests can replace it).
    """
    simulator = simulator or simulate_peak_memory
    limit = min(len(result.candidates), max(1, top_k) + MAX_EXTRA_SIMULATIONS)
    verifications: list[Verification] = []
    chosen: Plan | None = None
    for index in range(limit):
        if index >= top_k and chosen is not None:
            break
        check = verify_one(result, index, config, simulator, coeffs, timeout_s)
        verifications.append(check)
        if chosen is None and (check.fits or (index == 0 and check.fits is None)):
            chosen = check.plan
    if chosen is None or chosen is result.chosen:
        return VerifiedPlanResult(result, result.chosen, tuple(verifications))
    ranked = (chosen, *(p for p in result.candidates if p is not chosen))
    return VerifiedPlanResult(replace(result, chosen=chosen, candidates=ranked), result.chosen, tuple(verifications))


def verification_to_dict(verified: VerifiedPlanResult) -> dict[str, Any]:
    """The ``verification`` key of ``plan --json``: every simulation, and whether the choice was replaced."""
    return {
        "method": "fake-tensor simulation of the training step (FSDPMemTracker, rank 0); predicted excludes the "
                  "allowance, fits compares simulated + allowance with usable memory",
        "replaced": verified.replaced,
        "original_choice": verified.original.describe(),
        "chosen": verified.result.chosen.describe(),
        "chosen_verified": verified.verified,
        "simulated": [_check_to_dict(v) for v in verified.verifications],
    }


def _gib(nbytes: float | None) -> float | None:
    return None if nbytes is None else round(nbytes / GiB, 3)


def _check_to_dict(check: Verification) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rank": check.rank,
        "layout": check.plan.describe(),
        "predicted_gib": _gib(check.predicted_bytes),
        "predicted_phase": check.plan.memory.phase,
        "simulated_gib": _gib(check.simulated.peak_bytes) if check.simulated else None,
        "error_pct": None if check.error is None else round(100 * check.error, 1),
        "allowance_gib": _gib(check.allowance_bytes),
        "usable_gib": _gib(check.usable_bytes),
        "fits": check.fits,
    }
    if check.simulated is not None:
        out["simulated_breakdown_gib"] = {k: _gib(v) for k, v in check.simulated.breakdown.items() if v}
        out["simulation_s"] = round(check.simulated.total_s, 1)
    if check.failure is not None:
        out["not_simulated"] = check.failure
    return out
