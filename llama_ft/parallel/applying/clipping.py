"""Gradient-norm clipping when parameters live on different device meshes, and the Precision plugins that use it.

Under TP + FSDP the decoder projections are DTensors on the (dp_shard, tp) mesh while norms and other replicated
weights sit on the dp mesh only. ``torch.nn.utils.clip_grad_norm_`` stacks all per-parameter norms into one tensor
and refuses DTensors of different meshes; so norms are reduced per mesh to plain tensors first, then combined.

Lightning clips through ``trainer.precision_plugin.clip_grad_by_norm``. The ``advanced`` strategy installs the
``MeshAware*`` subclass of the plugin Lightning chose (see ``with_mesh_aware_clipping``), so clipping by norm uses
``clip_grad_norm_`` below and everything else stays Lightning's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scale gradients in place so their global ``norm_type`` norm is at most ``max_norm``; return that norm."""
    by_mesh: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            by_mesh[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p)
    group_norms = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type)
        group_norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not group_norms:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(group_norms, norm_type)
    with implicit_replication():
        for group in by_mesh.values():  # foreach kernels also need one mesh per call
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


class MeshAwareNormClipping(Precision):
    """Lightning's clipping by norm, with the norm taken across device meshes (``clip_grad_norm_``)."""

    def clip_grad_by_norm(self, optimizer: torch.optim.Optimizer, clip_val: int | float) -> None:
        clip_grad_norm_(self.main_params(optimizer), clip_val)


class MeshAwarePrecision(MeshAwareNormClipping):
    """``precision="32-true"``."""


class MeshAwareHalfPrecision(MeshAwareNormClipping, HalfPrecision):
    """``precision="bf16-true"`` / ``"16-true"``."""


class MeshAwareMixedPrecision(MeshAwareNormClipping, MixedPrecision):
    """``precision="bf16-mixed"`` / ``"16-mixed"``."""


def with_mesh_aware_clipping(plugin: Precision) -> Precision:
    """The same precision settings with mesh-aware norm clipping.

    A plugin of a kind not listed here (a user's own, passed in ``Trainer(plugins=...)``) is returned as given: it
    keeps the clipping it defines.
    """
    if isinstance(plugin, MeshAwareNormClipping):
        return plugin
    if type(plugin) is MixedPrecision:
        return MeshAwareMixedPrecision(plugin.precision, plugin.device, plugin.scaler)
    if type(plugin) is HalfPrecision:
        return MeshAwareHalfPrecision(plugin.precision)
    if type(plugin) is Precision:
        return MeshAwarePrecision()
    return plugin
