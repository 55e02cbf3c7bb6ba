"""Tiny model sizes shared by the tests (the same code paths as the paper sizes, at 32 x 32),
and a few optimiser steps on a model's own training loss."""

from __future__ import annotations

from typing import Any

TINY_PEER_BACKBONE = {
    "stem_channels": 8,
    "widths": [8, 8, 8, 8],
    "patch_size": 4,
    "embed_dim": 16,
    "num_heads": 2,
    "head_channels": 4,
}


def train_steps(model: Any, a: Any, b: Any, optimiser: Any, steps: int) -> list[tuple[float, dict]]:
    """`steps` optimiser steps on ``model.training_loss(a, b)``; (loss, terms) of each step."""
    history = []
    for _ in range(steps):
        loss, terms = model.training_loss(a, b)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append((loss.item(), terms))
    return history
