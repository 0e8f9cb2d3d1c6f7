"""Mesh-aware gradient clipping agrees with torch's on plain tensors."""

from __future__ import annotations

import torch

from llama_ft.parallel.applying.clipping import clip_grad_norm_


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
