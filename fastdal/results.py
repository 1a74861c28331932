"""Result types and argument checks shared by the user-facing functions (the bottom of the import order)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor


class ScoreResult(NamedTuple):
    """Per-sample results of :func:`fastdal.score`, in pool order (CPU tensors).

    ``score = sq_norm + gamma * dot``; :meth:`with_gamma` gives any other variant without a new pass
    (``gamma=0`` is expected gradient length).
    """

    score: Tensor
    sq_norm: Tensor
    dot: Tensor
    pseudo_label: Tensor

    def with_gamma(self, gamma: float) -> Tensor:
        return self.sq_norm + check_gamma(gamma) * self.dot


def as_real_number(value: Any) -> Any:
    """``value`` as a Python number when it is a 0-d real tensor (or a numpy scalar), else unchanged.

    Wherever fastdal takes a Python number it takes a 0-d tensor holding one too.
    """
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        return value.item()
    return value


def check_gamma(gamma: Any) -> float:
    gamma = as_real_number(gamma)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(float(gamma)):
        raise ValueError(f"gamma must be a finite real number, got {gamma!r}")
    return float(gamma)


def accumulation_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    """float64 when every tensor is float64, float32 otherwise (bf16/fp16 models accumulate in float32)."""
    dtypes = {t.dtype for t in tensors}
    return torch.float64 if dtypes == {torch.float64} else torch.float32


def results_on_host(tensors: Iterable[Tensor]) -> list[Tensor]:
    """A pass's results copied to the host, once at its end: fastdal returns its results on the CPU, and on a
    GPU this is the one copy that waits for the pass's work."""
    return list(map(Tensor.cpu, tensors))
