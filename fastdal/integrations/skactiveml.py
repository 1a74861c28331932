"""fastdal as a scikit-activeml pool query strategy for classifiers built on skorch (``SkorchClassifier``).

    from fastdal.integrations.skactiveml import DynamicAL

    clf = SkorchClassifier(Net, classes=classes, neural_net_param_dict={"max_epochs": 20, "train_split": None})
    strategy = DynamicAL(method="dynamic", random_state=0)          # or "badge", "greedy"
    for _ in range(rounds):
        clf.fit(X, y)                                                 # y holds MISSING_LABEL where unlabeled
        chosen = strategy.query(X, y, clf, fit_clf=False, batch_size=20)
        y[chosen] = y_true[chosen]

``query`` reads the classifier's torch module (``clf.neural_net_.module_``), scores the candidates with it
and picks them exactly as :func:`fastdal.query` / :func:`fastdal.select` would on the same module and data:
the candidates become the pool loader and the labeled samples of ``(X, y)`` the labeled loader, both in
index order, with raw class labels mapped to the module's outputs through ``clf.classes_``.
"""

from __future__ import annotations

import inspect
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import clone
from torch import Tensor

from .. import api
from ._common import Acquisition, OutputAt, tensor_loader

try:
    from skactiveml.base import SingleAnnotatorPoolQueryStrategy
    from skactiveml.classifier import SkorchClassifier
    from skactiveml.utils import MISSING_LABEL, check_equal_missing_label, check_scalar, is_labeled, is_unlabeled
except ImportError as error:  # SkorchClassifier is missing when skorch is
    raise ImportError(
        "fastdal.integrations.skactiveml needs scikit-activeml and skorch: pip install fastdal[skactiveml]"
    ) from error

__all__ = ["DynamicAL"]

# Criteria whose input is the module's logits, or log-probabilities (whose log-softmax is themselves, so
# the cross-entropy gradients fastdal takes are the same).
_LOGIT_CRITERIA = (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)


class DynamicAL(SingleAnnotatorPoolQueryStrategy):
    """Dynamic AL (Wang et al., NeurIPS 2022), BADGE or the paper's greedy subset, for ``SkorchClassifier``.

    Parameters
    ----------
    method : "dynamic", "badge" or "greedy", default="dynamic"
        "dynamic": the ``batch_size`` candidates with the highest score ``||g||^2 + gamma <g, G>`` (ties to
        the lower candidate). "badge": k-means++ seeding over the gradient features. "greedy": the
        paper's subset objective, one sample at a time. "dynamic" and "greedy" need labeled samples in ``y``.
    layers : "last", "all" or list of module names, default="last"
        The parameters whose gradients count (module names as in ``clf.neural_net_.module_``).
    gamma : float, default=2.0
        Weight of the inner-product term of "dynamic".
    rank : int or None, default=None
        Projection rank of the parameters other than the head ("badge"/"greedy" with other ``layers``).
    backend : str, default="auto"
        fastdal's op backend (:func:`fastdal.backends.available`).
    device : torch.device or str or None, default=None
        Where to compute; default: where skorch put the module.
    batch_size_loader : int or None, default=None
        Samples per torch batch while scoring; default: the skorch net's ``batch_size``.
    inputs, labels, outputs : callable or None, default=None
        fastdal's batch mappings. Candidate batches are ``(x,)``, labeled batches ``(x, class_index)``.
        ``outputs`` maps the module's output to logits; by default the output the classifier's criterion
        reads (``criterion_output_keys``, else the first ``forward_outputs`` entry), which needs a
        ``CrossEntropyLoss`` or ``NLLLoss`` criterion.
    missing_label : scalar or str or np.nan or None, default=np.nan
        Value marking unlabeled samples in ``y``; must equal ``clf.missing_label``.
    random_state : None or int or np.random.RandomState, default=None
        BADGE's draws and the projections use a seed drawn from the query's random state, which
        scikit-activeml derives from ``random_state`` and the number of unlabeled samples: an int gives
        reproducible queries whose draws differ between rounds, as with the library's ``Badge``.

    Notes
    -----
    Candidate indices that point at labeled samples are skipped, as the library's ``Badge`` does.
    ``return_utilities=True`` gives ``(batch_size, n_samples)`` (or ``n_candidates`` when candidates are
    samples), NaN for non-candidates and for the samples chosen before row ``i``. For "dynamic" every row
    holds the scores; for "badge" and "greedy", whose choices are not the maximum of one fixed utility,
    row ``i`` holds 1.0 at the ``i``-th pick and 0.0 at the other remaining candidates.
    """

    def __init__(
        self,
        method: str = "dynamic",
        layers: str | Sequence[str] = "last",
        gamma: float = 2.0,
        rank: int | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        batch_size_loader: int | None = None,
        inputs: Callable[[Any], Any] | None = None,
        labels: Callable[[Any], Tensor] | None = None,
        outputs: Callable[[Any], Tensor] | None = None,
        missing_label: Any = MISSING_LABEL,
        random_state: int | np.random.RandomState | None = None,
    ):
        # scikit-learn estimators store their parameters untouched (get_params/clone); query validates them.
        super().__init__(missing_label=missing_label, random_state=random_state)
        self.method = method
        self.layers = layers
        self.gamma = gamma
        self.rank = rank
        self.backend = backend
        self.device = device
        self.batch_size_loader = batch_size_loader
        self.inputs = inputs
        self.labels = labels
        self.outputs = outputs

    def query(
        self,
        X,
        y,
        clf,
        fit_clf: bool = True,
        sample_weight=None,
        candidates=None,
        batch_size: int = 1,
        return_utilities: bool = False,
    ):
        """Determines for which candidate samples labels are to be queried.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Training data set, including the labeled and unlabeled samples.
        y : array-like of shape (n_samples,)
            Labels of the training data set, ``self.missing_label`` where unlabeled.
        clf : skactiveml.classifier.SkorchClassifier
            The classifier whose torch module scores the candidates.
        fit_clf : bool, default=True
            Fit a clone of ``clf`` on ``(X, y)`` first (``clf`` itself is left as it is); with False,
            ``clf`` must be fitted already.
        sample_weight : None, default=None
            ``SkorchClassifier.fit`` takes no sample weights, so only None is accepted when fitting.
        candidates : None or array-like of shape (n_candidates,) of int or (n_candidates, ...), default=None
            None: the unlabeled samples of ``X``; indices into ``X``; or samples, to which the returned
            indices then refer.
        batch_size : int, default=1
            The number of samples to be selected.
        return_utilities : bool, default=False
            Also return the utilities (see the class notes).

        Returns
        -------
        query_indices : numpy.ndarray of shape (batch_size,)
            The chosen samples, in the order chosen: indices into ``X``, or into ``candidates`` when those
            are samples.
        utilities : numpy.ndarray of shape (batch_size, n_samples) or (batch_size, n_candidates)
            Only with ``return_utilities=True``.
        """
        X, y, candidates, batch_size, return_utilities = self._validate_data(
            X, y, candidates, batch_size, return_utilities, reset=True
        )
        X_cand, mapping = self._transform_candidates(candidates, X, y)
        if not isinstance(clf, SkorchClassifier):
            raise TypeError(f"clf must be a skactiveml.classifier.SkorchClassifier, got {type(clf).__name__}")
        check_equal_missing_label(clf.missing_label, self.missing_label_)
        check_scalar(fit_clf, "fit_clf", bool)
        acquisition = self._acquisition(clf)
        loader_batch = self._loader_batch_size()
        if fit_clf:
            clf = _fitted_clone(clf, X, y, sample_weight)
        elif not hasattr(clf, "neural_net_") or not hasattr(clf, "classes_"):
            raise ValueError("clf is not fitted: call clf.fit(X, y) first, or pass fit_clf=True")

        # The pool: the candidates that are still unlabeled, with the column of each in the utilities.
        if mapping is None:
            pool_X, pool_columns, n_columns = X_cand, np.arange(len(X_cand)), len(X_cand)
        else:
            unlabeled = is_unlabeled(y[mapping], missing_label=self.missing_label_)
            pool_X, pool_columns, n_columns = X_cand[unlabeled], mapping[unlabeled], len(X)
        if len(pool_X) < batch_size:
            warnings.warn(
                f"'batch_size={batch_size}' is larger than the number of unlabeled candidates. "
                f"Instead, 'batch_size={len(pool_X)}' was set.",
                stacklevel=2,
            )
            batch_size = len(pool_X)
        if batch_size == 0:
            empty = np.zeros(0, dtype=int)
            return (empty, np.full((0, n_columns), np.nan)) if return_utilities else empty

        module = clf.neural_net_.module_
        net_batch = clf.neural_net_.batch_size
        size = loader_batch or (net_batch if isinstance(net_batch, int) and net_batch > 0 else None)
        pool_loader = tensor_loader(size, _as_input(clf, pool_X))
        labeled_loader = None
        if acquisition.needs_labeled:
            labeled = is_labeled(y, missing_label=self.missing_label_)
            if not labeled.any():
                raise ValueError(
                    f"y has no labeled sample: method={self.method!r} needs the labeled set's gradient; "
                    "label some samples first, or use method='badge'"
                )
            labeled_loader = tensor_loader(size, _as_input(clf, X[labeled]), _class_indices(clf, y[labeled]))

        if self.method == "dynamic":
            scores = acquisition.pool_scores(module, pool_loader, labeled_loader)
            positions = api.select(scores, batch_size).cpu().numpy()
            base = np.full(n_columns, np.nan)
            base[pool_columns] = scores.cpu().double().numpy()
        else:
            positions = acquisition.pick(module, pool_loader, labeled_loader, batch_size).cpu().numpy()
            base = np.full(n_columns, np.nan)
            base[pool_columns] = 0.0
        query_indices = pool_columns[positions].astype(int)
        if not return_utilities:
            return query_indices
        utilities = np.repeat(base[None], batch_size, axis=0)
        for i, chosen in enumerate(query_indices):
            utilities[i, query_indices[:i]] = np.nan
            if self.method != "dynamic":
                utilities[i, chosen] = 1.0
        return query_indices, utilities

    def _acquisition(self, clf: SkorchClassifier) -> Acquisition:
        """The fastdal options, checked, with a seed drawn from this query's random state."""
        for name in ("inputs", "labels", "outputs"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"{name} must be a callable or None, got {type(getattr(self, name)).__name__}")
        seed = int(self.random_state_.randint(0, 2**31 - 1))
        return Acquisition(
            method=self.method,
            layers=self.layers,
            gamma=self.gamma,
            rank=self.rank,
            seed=seed,
            backend=self.backend,
            device=self.device,
            inputs=self.inputs,
            labels=self.labels,
            outputs=self.outputs if self.outputs is not None else _criterion_output(clf),
        )

    def _loader_batch_size(self) -> int | None:
        size = self.batch_size_loader
        if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1):
            raise ValueError(f"batch_size_loader must be a positive integer or None, got {size!r}")
        return None if size is None else int(size)


def _criterion_output(clf: SkorchClassifier) -> OutputAt | None:
    """The default ``outputs``: the raw module output the classifier trains its criterion on (logits)."""
    criterion = clf.criterion if isinstance(clf.criterion, type) else type(clf.criterion)
    if not (isinstance(criterion, type) and issubclass(criterion, _LOGIT_CRITERIA)):
        raise ValueError(
            f"clf.criterion is {getattr(criterion, '__name__', criterion)!r}, not CrossEntropyLoss or NLLLoss, so "
            "its input need not be logits; pass outputs= mapping the module's output to its logits"
        )
    forward_outputs = clf.forward_outputs
    if forward_outputs is None:
        return None  # a single output: the logits (or log-probabilities) themselves
    keys = clf.criterion_output_keys
    if keys is None:
        keys = [next(iter(forward_outputs))]
    elif isinstance(keys, str):
        keys = [keys]
    if len(keys) != 1 or keys[0] not in forward_outputs:
        raise ValueError(
            f"clf.criterion_output_keys={clf.criterion_output_keys!r} does not name one forward output; "
            "pass outputs= mapping the module's output to its logits"
        )
    return OutputAt(forward_outputs[keys[0]][0])


def _fitted_clone(clf: SkorchClassifier, X: np.ndarray, y: np.ndarray, sample_weight: Any) -> SkorchClassifier:
    """``clone(clf).fit(X, y)``, as the library's strategies fit, so that the user's ``clf`` is untouched."""
    if sample_weight is None:
        return clone(clf).fit(X, y)
    if "sample_weight" not in inspect.signature(clf.fit).parameters:
        raise ValueError(f"sample_weight must be None: {type(clf).__name__}.fit takes no sample weights")
    return clone(clf).fit(X, y, sample_weight=sample_weight)


def _as_input(clf: SkorchClassifier, X: np.ndarray) -> Tensor:
    """The samples as the classifier's ``predict_proba`` feeds them to the module (``sample_dtype``)."""
    array = np.asarray(X) if clf.sample_dtype is None else np.asarray(X, dtype=clf.sample_dtype)
    return torch.tensor(array)  # a copy: the user's array is never shared with torch


def _class_indices(clf: SkorchClassifier, labels: np.ndarray) -> Tensor:
    """Raw class labels as the module's output indices: position in ``clf.classes_``."""
    index = {c: i for i, c in enumerate(clf.classes_.tolist())}
    unknown = sorted({str(v) for v in labels.tolist() if v not in index})
    if unknown:
        raise ValueError(f"y holds labels {unknown} that are not in clf.classes_ {clf.classes_.tolist()}")
    return torch.tensor([index[v] for v in labels.tolist()], dtype=torch.long)
