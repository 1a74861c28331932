"""fastdal as a modAL query strategy, for learners whose estimator is a skorch ``NeuralNetClassifier``.

    from modAL.models import ActiveLearner
    from fastdal.integrations.modal import DynamicAL

    learner = ActiveLearner(estimator=net, query_strategy=DynamicAL(method="dynamic"),  # or "badge", "greedy"
                            X_training=X_initial, y_training=y_initial)
    for _ in range(rounds):
        chosen, _ = learner.query(X_pool, n_instances=20)
        learner.teach(X_pool[chosen], y_pool[chosen])
        X_pool, y_pool = np.delete(X_pool, chosen, axis=0), np.delete(y_pool, chosen)

``dynamic_al`` is the same strategy as a plain function: ``query_strategy=dynamic_al``, with the options as
keyword arguments of ``learner.query(X_pool, n_instances=20, method="badge")``.

The strategy reads the learner's skorch classifier (``learner.estimator.module_``), takes G from the learner's
labeled set (``learner.X_training``, ``learner.y_training``), scores ``X_pool`` with it and picks exactly as
:func:`fastdal.query` / :func:`fastdal.select` would on the same module and data: both sets become loaders in
index order. It always returns ``(indices, metrics)``: modAL first tries to unpack a strategy's result as that
pair, so a bare array of two indices would be misread.

Labels: skorch's ``NeuralNetClassifier`` trains its criterion on ``y`` itself, so the values of ``y`` are the
module's output indices (``predict`` returns those indices; ``classes_`` only lists the values seen). The
strategy reads ``y_training`` the same way and refuses labels that are not whole numbers.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import api
from ._common import Acquisition, OutputAt, tensor_loader

try:
    import modAL  # noqa: F401  (the library this adapter serves: said up front when it is missing)
    from skorch import NeuralNetClassifier
except ImportError as error:
    raise ImportError(
        "fastdal.integrations.modal needs modAL and skorch: pip install --no-deps modAL-python==0.4.2.1 "
        "skorch==1.4.0, then pip install pandas scipy scikit-learn (modAL 0.4.2.1 declares skorch==0.9.0, "
        "which pip's resolver would otherwise insist on)"
    ) from error

__all__ = ["DynamicAL", "dynamic_al"]


class LogOfProbabilities:
    """``outputs=`` for a classifier trained with ``NLLLoss``: skorch's ``NeuralNetClassifier`` then expects
    the module to return probabilities and trains on ``log(p + eps)`` (its ``get_loss``), the log-softmax
    of the module's own logits up to ``eps``; the cross-entropy gradients of those log-probabilities are the
    gradients of the loss the classifier trains."""

    def __call__(self, output: Any) -> Tensor:
        probabilities = OutputAt(0)(output)
        return torch.log(probabilities + torch.finfo(probabilities.dtype).eps)

    def __repr__(self) -> str:
        return "LogOfProbabilities()"


class DynamicAL:
    """Dynamic AL (Wang et al., NeurIPS 2022), BADGE or the paper's greedy subset, as a modAL query strategy.

    Args:
        method: "dynamic" (the ``n_instances`` pool samples with the highest score ``||g||^2 + gamma <g, G>``,
            ties to the lower index), "badge" (k-means++ seeding over the gradient features) or "greedy"
            (the paper's subset objective, one sample at a time). "dynamic" and "greedy" need the learner's
            labeled set.
        layers: "last", "all" or module names of ``learner.estimator.module_``.
        gamma: weight of the inner-product term of "dynamic".
        rank: projection rank of the parameters other than the head ("badge"/"greedy" with other ``layers``).
        seed: BADGE's draws and the projections.
        backend: fastdal's op backend (:func:`fastdal.backends.available`).
        device: where to compute; default: where skorch put the module.
        batch_size: samples per torch batch while scoring; default: the classifier's ``batch_size``.
        inputs, labels, outputs: fastdal's batch mappings. Pool batches are ``(x,)``, labeled batches
            ``(x, class_index)``. ``outputs`` maps the module's output to logits; by default the first output
            as is under ``CrossEntropyLoss``, its ``log(p + eps)`` under ``NLLLoss`` (as skorch's
            ``get_loss``); other criteria need ``outputs``. Under ``NLLLoss`` the head's output is not the
            logits, so "badge" and "greedy" need ``rank`` for the head's features as for any other layer.

    Calling it as ``strategy(learner, X_pool, n_instances=1)`` returns ``(indices, metrics)``: positions in
    ``X_pool`` in the order chosen (int64), and for "dynamic" the chosen samples' scores (float64), as modAL's
    own strategies return the chosen samples' utilities. BADGE's and greedy's picks are not the largest values
    of one fixed score, so their metrics are NaN.
    """

    def __init__(
        self,
        method: str = "dynamic",
        layers: str | Sequence[str] = "last",
        gamma: float = 2.0,
        rank: int | None = None,
        seed: int = 0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        inputs: Callable[[Any], Any] | None = None,
        labels: Callable[[Any], Tensor] | None = None,
        outputs: Callable[[Any], Tensor] | None = None,
    ):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        for name, mapping in (("inputs", inputs), ("labels", labels), ("outputs", outputs)):
            if mapping is not None and not callable(mapping):
                raise TypeError(f"{name} must be a callable or None, got {type(mapping).__name__}")
        # Acquisition checks method and gamma now, not at the first query.
        self.acquisition = Acquisition(
            method=method,
            layers=layers,
            gamma=gamma,
            rank=rank,
            seed=int(seed),
            backend=backend,
            device=device,
            inputs=inputs,
            labels=labels,
            outputs=outputs,
        )
        self.batch_size = None if batch_size is None else int(batch_size)

    def __call__(self, learner: Any, X_pool: Any, n_instances: int = 1) -> tuple[np.ndarray, np.ndarray]:
        net = _classifier(learner)
        module = net.module_
        pool = _as_tensor(X_pool, "X_pool", module)
        b = _count(n_instances, len(pool))
        if b == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        acquisition = self.acquisition
        if acquisition.outputs is None:
            acquisition = replace(acquisition, outputs=_criterion_outputs(net))
        size = self.batch_size or (net.batch_size if isinstance(net.batch_size, int) and net.batch_size > 0 else None)
        pool_loader = tensor_loader(size, pool)
        labeled_loader = None
        if acquisition.needs_labeled:
            labeled_loader = tensor_loader(size, *_labeled_set(learner, module, acquisition.method))
        if acquisition.method == "dynamic":
            scores = acquisition.pool_scores(module, pool_loader, labeled_loader)
            chosen = api.select(scores, b)
            return chosen.cpu().numpy().astype(np.int64), scores[chosen].cpu().double().numpy()
        chosen = acquisition.pick(module, pool_loader, labeled_loader, b)
        return chosen.cpu().numpy().astype(np.int64), np.full(b, np.nan)

    def __repr__(self) -> str:
        a = self.acquisition
        return f"DynamicAL(method={a.method!r}, layers={a.layers!r}, gamma={a.gamma!r}, backend={a.backend!r})"


def dynamic_al(learner: Any, X_pool: Any, n_instances: int = 1, **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """:class:`DynamicAL` as a plain modAL query strategy function; ``options`` are its arguments."""
    return DynamicAL(**options)(learner, X_pool, n_instances)


def _classifier(learner: Any) -> NeuralNetClassifier:
    """The learner's fitted skorch classifier, or an error that says what the strategy needs."""
    if not hasattr(learner, "estimator"):
        raise TypeError(
            f"the query strategy's first argument must be a modAL learner with one estimator (ActiveLearner), "
            f"got {type(learner).__name__}: fastdal scores the per-sample gradients of that estimator's module"
        )
    net = learner.estimator
    if not isinstance(net, NeuralNetClassifier):
        raise TypeError(
            f"learner.estimator must be a skorch.NeuralNetClassifier over a torch nn.Module, got "
            f"{type(net).__name__}: fastdal scores the per-sample gradients of the module's parameters"
        )
    if not getattr(net, "initialized_", False) or not isinstance(getattr(net, "module_", None), nn.Module):
        raise ValueError(
            "learner.estimator is not initialized: give the ActiveLearner X_training and y_training, or teach "
            "it some labels, before querying"
        )
    return net


def _criterion_outputs(net: NeuralNetClassifier) -> Callable[[Any], Tensor]:
    """The default ``outputs``: the logits the classifier's criterion is trained on, as skorch computes them."""
    criterion = getattr(net, "criterion_", None) or net.criterion
    kind = criterion if isinstance(criterion, type) else type(criterion)
    if issubclass(kind, nn.CrossEntropyLoss):
        return OutputAt(0)
    if issubclass(kind, nn.NLLLoss):
        return LogOfProbabilities()
    raise ValueError(
        f"learner.estimator's criterion is {kind.__name__}, not CrossEntropyLoss or NLLLoss, so its module "
        "need not return logits or probabilities; pass outputs= mapping the module's output to its logits"
    )


def _count(n_instances: Any, pool_size: int) -> int:
    if isinstance(n_instances, bool) or not isinstance(n_instances, numbers.Integral) or n_instances < 0:
        raise ValueError(f"n_instances must be a non-negative integer, got {n_instances!r}")
    if n_instances > pool_size:
        raise ValueError(f"n_instances={n_instances} is larger than X_pool ({pool_size} samples)")
    return int(n_instances)


def _as_tensor(X: Any, name: str, module: nn.Module) -> Tensor:
    """Samples as the module reads them: a tensor as is; an array's own dtype (as skorch keeps it); a list of
    Python numbers, which has no dtype of its own, in the module's floating dtype when it holds floats."""
    if isinstance(X, Tensor):
        return X.detach()
    if isinstance(X, dict) or hasattr(X, "tocsr"):
        raise TypeError(f"{name} must be an array, a list of samples or a tensor, got {type(X).__name__}")
    array = np.asarray(X)
    if array.dtype == object or array.dtype.kind in "USV":
        raise TypeError(f"{name} must hold numbers of one shape, got an array of dtype {array.dtype}")
    if array.ndim == 0:
        raise ValueError(f"{name} must hold samples along its first axis, got a scalar")
    tensor = torch.tensor(array)  # a copy: the user's array is never shared with torch
    if not isinstance(X, np.ndarray) and tensor.is_floating_point():
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())
        tensor = tensor.to(dtype)
    return tensor


def _labeled_set(learner: Any, module: nn.Module, method: str) -> tuple[Tensor, Tensor]:
    """The learner's labeled samples and their class indices."""
    X, y = getattr(learner, "X_training", None), getattr(learner, "y_training", None)
    if X is None or y is None:
        raise ValueError(
            f"the learner holds no labeled set (learner.X_training is None): method={method!r} needs the labeled "
            "set's gradient G; teach it some labels first, or use method='badge'"
        )
    samples = _as_tensor(X, "learner.X_training", module)
    labels = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y)
    if labels.ndim != 1 or len(labels) != len(samples):
        raise ValueError(
            f"learner.y_training must hold one class index per sample of X_training ({len(samples)}), "
            f"got shape {labels.shape}"
        )
    whole = labels.dtype.kind in "iu" or (
        labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels == np.round(labels)).all()
    )
    if not whole:
        raise ValueError(
            "learner.y_training must hold class indices (whole numbers): skorch's NeuralNetClassifier trains "
            f"on y as the module's output indices; got values of dtype {labels.dtype} such as {labels[:3].tolist()}"
        )
    return samples, torch.tensor(labels.astype(np.int64))
