"""fastdal in baal: :class:`DynamicALLoop`, an ``ActiveLearningLoop`` whose ``step()`` picks with fastdal.

    from fastdal.integrations.baal import DynamicALLoop

    loop = DynamicALLoop(al_dataset, wrapper, query_size=20, max_sample=500, method="dynamic", layers="all")
    for _ in range(rounds):
        wrapper.train_on_dataset(al_dataset)
        wrapper.test_on_dataset(test_set)
        if not loop.step():  # labels ``query_size`` pool samples; False once the pool is empty
            break

Why a loop and not a heuristic: baal's ``ActiveLearningLoop.step`` hands a heuristic the *predictions*
of ``get_probabilities(pool)`` and ranks by them, so neither side ever sees the model (the dynamic score
and the gradient features need its gradients), the labeled set (``G`` of "dynamic" and "greedy"), or the
whole pick at once ("badge" and "greedy" choose a set, not a ranking). Smuggling the model into a
``get_probabilities`` closure and scores through a ``Precomputed`` heuristic would work for "dynamic"
only, and would let baal's heuristic re-rank with its own tie rules. A subclass keeps everything baal's
loop is (``dataset``, ``query_size``, ``max_sample``, ``step(pool=None) -> bool``, ``isinstance`` checks)
and swaps only the choice, from the wrapper the user already has.

What ``step()`` does, as baal's own loop does it:

* the pool is ``dataset.pool`` (its ``pool_specifics`` and ``make_unlabelled`` applied); with
  ``max_sample`` smaller than the pool, ``max_sample`` pool positions drawn without replacement, from a
  numpy ``Generator`` seeded with ``seed`` (one ``choice(len(pool), max_sample, replace=False)`` per such
  step, sorted, so ties go to the lower pool index) instead of baal's global ``np.random``, so a run is
  reproducible from ``seed`` alone;
* the labeled set is ``dataset`` itself (what ``wrapper.train_on_dataset(dataset)`` trains on, so with
  ``last_active_steps`` only the recent steps), read with its true labels; the pool's targets are never
  read (fastdal scores a pool sample at its predicted label);
* both loaders use the wrapper's ``batch_size``, ``workers`` and ``collate_fn``, with ``shuffle=False``;
* the chosen positions in the (sub-sampled) pool go through the sub-sample's indices to pool indices,
  which ``dataset.label`` takes; a ``pool`` passed to ``step`` is used as it is, and positions in it go
  to ``dataset.label`` unchanged, as in baal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

try:
    from baal.active import ActiveLearningLoop
    from baal.active.dataset import ActiveLearningDataset
except ImportError as error:  # pragma: no cover - exercised only where baal is missing
    raise ImportError(
        f"fastdal.integrations.baal needs baal ({error}); install it with: pip install fastdal[baal]"
    ) from error

from ._common import Acquisition

__all__ = ["DynamicALLoop"]


class DynamicALLoop(ActiveLearningLoop):
    """baal's ``ActiveLearningLoop`` with fastdal's choice of what to label.

    Args:
        dataset: the ``ActiveLearningDataset``; at least one sample must be labeled for "dynamic" and
            "greedy" (``dataset.label_randomly(n)``).
        wrapper: the baal ``ModelWrapper`` (or anything with a ``model`` and baal's ``args``); its model,
            ``batch_size``, ``workers``, ``collate_fn`` and ``use_cuda`` are read at every step, so a
            model replaced or moved between rounds is the one used.
        query_size: samples to label per step (all that is left when the pool is smaller).
        max_sample: pool samples considered per step (-1: the whole pool), as in baal.
        method, layers, gamma, rank, seed, backend, inputs, labels, outputs: as in
            :class:`fastdal.integrations.Acquisition`; ``seed`` also draws the ``max_sample`` sub-sample.
        device: where to compute; default: on the GPU when the wrapper's ``use_cuda`` is set, else where
            the model is.
    """

    def __init__(
        self,
        dataset: ActiveLearningDataset,
        wrapper: Any,
        query_size: int = 1,
        max_sample: int = -1,
        *,
        method: str = "dynamic",
        layers: str | Sequence[str] = "last",
        gamma: float = 2.0,
        rank: int | None = None,
        seed: int = 0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        inputs: Callable[[Any], Any] | None = None,
        labels: Callable[[Any], Tensor] | None = None,
        outputs: Callable[[Any], Tensor] | None = None,
    ) -> None:
        if not isinstance(dataset, ActiveLearningDataset):
            raise TypeError(f"dataset must be a baal ActiveLearningDataset, got {type(dataset).__name__}")
        if not isinstance(getattr(wrapper, "model", None), nn.Module) or not hasattr(wrapper, "args"):
            raise TypeError(
                f"wrapper must be a baal ModelWrapper (a torch model as .model, TrainingArgs as .args), "
                f"got {type(wrapper).__name__}"
            )
        if isinstance(query_size, bool) or not isinstance(query_size, int) or query_size <= 0:
            raise ValueError(f"query_size must be a positive integer, got {query_size!r}")
        if isinstance(max_sample, bool) or not isinstance(max_sample, int) or not (max_sample == -1 or max_sample > 0):
            raise ValueError(f"max_sample must be -1 (the whole pool) or a positive integer, got {max_sample!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.acquisition = Acquisition(
            method=method,
            layers=layers,
            gamma=gamma,
            rank=rank,
            seed=seed,
            backend=backend,
            device=device,
            inputs=inputs,
            labels=labels,
            outputs=outputs,
        )
        # baal's constructor wants a get_probabilities; step() below never calls it, but code that reads
        # loop.get_probabilities gets the wrapper's predictions, as with baal's own loop.
        super().__init__(
            dataset,
            getattr(wrapper, "predict_on_dataset", None),
            heuristic=None,
            query_size=query_size,
            max_sample=max_sample,
        )
        self.wrapper = wrapper
        self._subsample_rng = np.random.default_rng(seed)

    def step(self, pool: Dataset | None = None) -> bool:
        """Label up to ``query_size`` samples of the pool; False when there was nothing to label.

        Args:
            pool: a dataset of pool samples to choose from instead of ``dataset.pool``; the positions
                chosen in it are passed to ``dataset.label`` as pool indices, as baal's loop does.
        """
        indices = None
        if pool is None:
            pool = self.dataset.pool
            indices = self._subsample(len(pool))
            if indices is not None:
                pool = Subset(pool, indices.tolist())
        if len(pool) == 0:
            return False  # also keeps label([]) away: baal 2.1 would then label the whole pool
        positions = self.pick(pool)
        to_label = positions if indices is None else indices[positions]
        self.dataset.label(to_label.tolist())
        return True

    def pick(self, pool: Dataset) -> np.ndarray:
        """Positions in ``pool`` of the ``min(query_size, len(pool))`` samples to label, in the order chosen."""
        model = self.wrapper.model
        labeled_loader = None
        if self.acquisition.needs_labeled:
            if len(self.dataset) == 0:
                raise ValueError(
                    f"dataset has no labeled sample, and method={self.acquisition.method!r} needs the labeled "
                    "set: label some first (dataset.label_randomly(n)) or use method='badge'"
                )
            labeled_loader = self._loader(self.dataset)
        acquisition = replace(self.acquisition, device=self._device(model))
        b = min(self.query_size, len(pool))
        return acquisition.pick(model, self._loader(pool), labeled_loader, b).cpu().numpy()

    def _subsample(self, pool_size: int) -> np.ndarray | None:
        """Sorted pool indices of this step's candidates, or None for the whole pool (baal's rule)."""
        if self.max_sample == -1 or self.max_sample >= pool_size:
            return None
        return np.sort(self._subsample_rng.choice(pool_size, self.max_sample, replace=False))

    def _loader(self, data: Dataset) -> DataLoader:
        """A loader in dataset order with the wrapper's batching, as its ``predict_on_dataset`` builds."""
        args = self.wrapper.args
        return DataLoader(
            data, batch_size=args.batch_size, shuffle=False, num_workers=args.workers, collate_fn=args.collate_fn
        )

    def _device(self, model: nn.Module) -> torch.device | str | None:
        """The user's device; else the GPU when baal moves the data there (``use_cuda``) and the model is
        not on one yet; else None, where the model is."""
        if self.acquisition.device is not None:
            return self.acquisition.device
        if getattr(self.wrapper.args, "use_cuda", False):
            first = next(model.parameters(), None)
            if first is not None and first.device.type != "cuda":
                return "cuda"
        return None
