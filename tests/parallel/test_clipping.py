"""Mesh-aware gradient clipping agrees with torch's on plain tensors; the strategy clips through a plugin subclass."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision

from llama_ft.parallel import AdvancedParallelStrategy
from llama_ft.parallel.applying.clipping import MeshAwareNormClipping, clip_grad_norm_, with_mesh_aware_clipping


def _params(scale: float) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * scale
    return params


def test_matches_torch_when_clipping_and_when_not():
    for scale in (10.0, 0.01):
        ours, theirs = _params(scale), _params(scale)
        norm = clip_grad_norm_(ours, max_norm=1.0)
        expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0)
        torch.testing.assert_close(norm, expected)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a.grad, b.grad)
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in _params(10.0)])) > 1.0


def test_parameters_without_gradients_are_ignored():
    params = _params(10.0)
    params.append(torch.nn.Parameter(torch.ones(2)))
    norm = clip_grad_norm_(params, max_norm=1.0)
    assert norm > 1.0 and params[-1].grad is None


@pytest.mark.parametrize(("precision", "lightning_kind"), [("32-true", Precision), ("bf16-true", HalfPrecision),
                                                            ("bf16-mixed", MixedPrecision)])
def test_the_advanced_strategy_clips_through_a_subclass_of_lightnings_plugin(precision, lightning_kind):
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=AdvancedParallelStrategy(), precision=precision,
                        logger=False, enable_checkpointing=False)
    plugin = trainer.precision_plugin
    assert plugin is trainer.strategy.precision_plugin
    assert isinstance(plugin, lightning_kind) and isinstance(plugin, MeshAwareNormClipping)
    assert plugin.precision == precision
    assert "clip_grad_by_norm" not in vars(plugin)  # a method of the class, not patched onto the instance

    ours, theirs = _params(10.0), _params(10.0)
    plugin.clip_grad_by_norm(torch.optim.SGD(ours, lr=0.1), 1.0)
    torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_a_plugin_of_another_kind_keeps_its_own_clipping():
    class Custom(Precision):
        pass

    custom = Custom()
    assert with_mesh_aware_clipping(custom) is custom
    assert type(L.Trainer(accelerator="cpu", devices=1, logger=False).precision_plugin) is Precision  # built-ins: as is
