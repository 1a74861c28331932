"""What every adapter of fastdal.integrations shares: the acquisition it runs and the options it passes on.

An adapter's only job is to turn its library's model, data and indices into a pool loader and a labeled
loader in a fixed order, call :meth:`Acquisition.pick` (or :meth:`Acquisition.pool_scores`), and map the
returned positions back to the library's indices. The picks are then those of fastdal's own API on the
same model and data (tests/test_integrations_*.py check it against the real packages).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from .. import api, features
from ..results import check_gamma

METHODS = ("dynamic", "badge", "greedy")


@dataclass
class Acquisition:
    """How to choose: ``method`` and the options of fastdal's calls.

    Attributes:
        method: "dynamic" (the paper's score ``||g||^2 + gamma <g, G>``, the ``b`` highest, ties to the lower
            index: :func:`fastdal.query`), "badge" (k-means++ over the exact last-layer gradient features,
            or ``layers``' projected ones: :func:`fastdal.select` with ``method="badge"``), or "greedy" (the
            paper's subset objective, maximized one sample at a time; needs the labeled set).
        layers: "last", "all" or module names (:func:`fastdal.labeled_grad`).
        gamma: weight of the inner-product term of "dynamic".
        rank: projection rank of the parameters other than the head ("badge" and "greedy" with layers
            other than "last").
        seed: random draws of "badge" and of the projections.
        backend, device: as in :func:`fastdal.score`.
        inputs, labels, outputs: batch mappings, as in :func:`fastdal.score` (an adapter may supply its
            library's defaults; the user's win).
    """

    method: str = "dynamic"
    layers: str | Sequence[str] = "last"
    gamma: float = 2.0
    rank: int | None = None
    seed: int = 0
    backend: str = "auto"
    device: torch.device | str | None = None
    inputs: Callable[[Any], Any] | None = None
    labels: Callable[[Any], Tensor] | None = None
    outputs: Callable[[Any], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        check_gamma(self.gamma)

    @property
    def needs_labeled(self) -> bool:
        """Whether the method reads the labeled set ("badge" does not)."""
        return self.method != "badge"

    def _common(self) -> dict[str, Any]:
        return dict(device=self.device, progress=False, inputs=self.inputs, outputs=self.outputs)

    def labeled_grad(self, model: nn.Module, labeled_loader: Iterable) -> Any:
        return api.labeled_grad(model, labeled_loader, layers=self.layers, labels=self.labels, **self._common())

    def pool_scores(self, model: nn.Module, pool_loader: Iterable, labeled_loader: Iterable) -> Tensor:
        """The dynamic-AL score of every pool sample, in loader order (method "dynamic" only)."""
        if self.method != "dynamic":
            raise ValueError(f"scores exist for method='dynamic' only, not {self.method!r}")
        grad = self.labeled_grad(model, labeled_loader)
        return api.score(model, pool_loader, grad, gamma=self.gamma, backend=self.backend, **self._common())

    def pick(self, model: nn.Module, pool_loader: Iterable, labeled_loader: Iterable | None, b: int) -> Tensor:
        """Positions (in ``pool_loader``'s order) of the ``b`` samples to label, in the order chosen."""
        if self.method == "dynamic":
            return api.select(self.pool_scores(model, pool_loader, labeled_loader), b)
        feats = features(
            model,
            pool_loader,
            layers=self.layers,
            rank=self.rank,
            seed=self.seed,
            backend=self.backend,
            **self._common(),
        )
        if self.method == "badge":
            return api.select(feats, b, method="badge", seed=self.seed, backend=self.backend)
        grad = self.labeled_grad(model, labeled_loader)
        return api.select(feats, b, method="greedy", labeled_grad=grad)


class OutputAt:
    """``outputs=`` for a module that may return several outputs: the one at ``index`` (the logits)."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, output: Any) -> Tensor:
        return output[self.index] if isinstance(output, (tuple, list)) else output

    def __repr__(self) -> str:
        return f"OutputAt({self.index})"


def tensor_loader(batch_size: int | None, *tensors: Tensor) -> DataLoader:
    """Batches of ``tensors`` in index order (adapters map fastdal's positions back to their indices);
    ``batch_size`` None: one batch."""
    size = batch_size or max(1, len(tensors[0]))
    return DataLoader(TensorDataset(*tensors), batch_size=size, shuffle=False)
