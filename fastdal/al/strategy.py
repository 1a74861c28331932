"""What a query strategy sees and does: the interface every strategy of the loop implements.

A strategy gets a :class:`RoundState` after the model has been trained on the labeled set and returns
``b`` distinct dataset indices from the pool. Strategies that learn from what happened after their
query (ALBL) override :meth:`Strategy.update`, which the loop calls once the model has been retrained
with the queried labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset


@dataclass
class RoundState:
    """The state of one active-learning round, as a strategy sees it.

    Attributes:
        model: the current model, trained on ``labeled``.
        dataset: the training dataset; item ``i`` is ``(x, y)``. Labels of pool samples must not be
            read by a strategy (they are unknown in active learning).
        labeled: dataset indices labeled so far (int64, 1-D).
        pool: dataset indices still unlabeled (int64, 1-D, increasing).
        round: 0 for the first query.
        generator: seeded source of randomness for this run.
        batch_size: batch size for passes over the data.
        device: where the model runs.
    """

    model: nn.Module
    dataset: Dataset
    labeled: Tensor
    pool: Tensor
    round: int
    generator: torch.Generator
    batch_size: int
    device: torch.device

    def loader(self, indices: Tensor, with_labels: bool = False) -> DataLoader:
        """A sequential loader over ``dataset[indices]`` yielding inputs (and labels if asked)."""
        subset = Subset(self.dataset, indices.tolist())
        collate = _collate_xy if with_labels else _collate_x
        return DataLoader(subset, batch_size=self.batch_size, shuffle=False, collate_fn=collate)

    @torch.no_grad()
    def probabilities(self, indices: Tensor) -> Tensor:
        """Softmax outputs of the model on ``dataset[indices]``, (len(indices), K) on the CPU."""
        return torch.cat([torch.softmax(logits, 1) for logits in self._logits(indices)]).cpu()

    @torch.no_grad()
    def embeddings(self, indices: Tensor) -> Tensor:
        """Inputs of the model's final ``nn.Linear`` (penultimate features), (len(indices), D) on the CPU."""
        head = _final_linear(self.model)
        captured: list[Tensor] = []
        handle = head.register_forward_hook(lambda module, args, out: captured.append(args[0].detach().flatten(1)))
        try:
            for _ in self._logits(indices):
                pass
        finally:
            handle.remove()
        return torch.cat(captured).cpu()

    def _logits(self, indices: Tensor):
        was_training = self.model.training
        self.model.eval()
        try:
            for x in self.loader(indices):
                yield self.model(x.to(self.device)).float()
        finally:
            self.model.train(was_training)


class Strategy:
    """Base class of query strategies. Subclasses set ``name`` and implement :meth:`select`."""

    name = "strategy"

    def select(self, state: RoundState, b: int) -> Tensor:
        """``b`` distinct dataset indices taken from ``state.pool``."""
        raise NotImplementedError

    def update(self, state: RoundState, queried: Tensor) -> None:
        """Called after the model was retrained with the labels of ``queried``; the default does nothing."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _final_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("this strategy needs a model whose last layer is an nn.Linear")
    return linears[-1]


def _collate_x(items: list) -> Tensor:
    return torch.stack([torch.as_tensor(item[0]) for item in items])


def _collate_xy(items: list) -> tuple[Tensor, Tensor]:
    return _collate_x(items), torch.tensor([int(item[1]) for item in items])


StrategyFactory = Callable[[], Strategy]
