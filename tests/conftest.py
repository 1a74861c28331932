"""Shared test set-up: fixed seeds, Triton's CPU interpreter when there is no GPU, tolerance helpers."""

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# DESIGN.md, chain of truth: error against the float64 reference, relative to the reference's scale.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (a scale-aware error that tolerates entries near zero)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item()
    assert scale > 0, "never compare against all zeros"
    return (actual - expected).abs().max().item() / scale


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
