"""``LabeledGrad``: the summed labeled-set gradient ``G``, and the checks that it fits a model."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from .batches import all_finite


class LabeledGrad(Mapping[str, Tensor]):
    """Sum over a labeled set of per-sample cross-entropy gradients at the true labels.

    A read-only mapping of parameter names (the model's, as ``named_parameters()`` gives them) to tensors:
    ``G["fc.weight"]``, ``G.keys()``, ``G.items()``, ``dict(G)``, ``len(G)``, ``"fc.weight" in G``.

    Attributes:
        grads: parameter name -> summed gradient, in the accumulation dtype (float64 for a float64
            model, float32 otherwise).
        layers: what was asked for: ``"last"``, ``"all"`` or a tuple of module names.
        num_samples: how many labeled samples were summed.

    Save it with ``torch.save`` and read it back with ``torch.load`` (it is allow-listed for
    ``weights_only`` loading). A plain ``dict`` of parameter name to tensor works wherever a
    ``LabeledGrad`` does.
    """

    def __init__(self, grads: dict[str, Tensor], layers: str | tuple[str, ...], num_samples: int):
        self.grads = dict(grads)
        self.layers = layers
        self.num_samples = num_samples

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {name: g.shape for name, g in self.grads.items()}

    @property
    def names(self) -> list[str]:
        return list(self.grads)

    def to(self, *args, **kwargs) -> LabeledGrad:
        """A copy with every tensor moved/cast like ``Tensor.to(*args, **kwargs)``."""
        return LabeledGrad({k: v.to(*args, **kwargs) for k, v in self.grads.items()}, self.layers, self.num_samples)

    def __getitem__(self, name: str) -> Tensor:
        return self.grads[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.grads)

    def __len__(self) -> int:
        return len(self.grads)

    # A mapping of tensors has no truth value for ``==`` (tensors compare elementwise); identity is kept.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        total = sum(g.numel() for g in self.grads.values())
        return (
            f"LabeledGrad(layers={self.layers!r}, tensors={len(self.grads)}, elements={total}, "
            f"num_samples={self.num_samples})"
        )


torch.serialization.add_safe_globals([LabeledGrad])


def as_grad_dict(labeled_grad: LabeledGrad | Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Check ``labeled_grad`` against ``model`` and return it as ``{name: tensor}``.

    Raises:
        TypeError: if it is neither a LabeledGrad nor a mapping of names to tensors.
        ValueError: if it names a parameter the model lacks, or a shape differs, or it is empty.
    """
    if isinstance(labeled_grad, LabeledGrad):
        grads = labeled_grad.grads
    elif isinstance(labeled_grad, Mapping):
        grads = dict(labeled_grad)
    else:
        raise TypeError(
            "labeled_grad must be a fastdal.LabeledGrad or a dict of parameter name to tensor, "
            f"got {type(labeled_grad).__name__}"
        )
    if not grads:
        raise ValueError("labeled_grad is empty: it must cover at least one parameter of the model")
    params = dict(model.named_parameters())
    grads = {_model_name(name, params): g for name, g in grads.items()}
    finite = _finite_tensors(grads)
    for name, g in grads.items():
        if not isinstance(g, Tensor):
            raise TypeError(f"labeled_grad[{name!r}] must be a tensor, got {type(g).__name__}")
        if name not in params:
            known = ", ".join(list(params)[:8])
            raise ValueError(
                f"labeled_grad has {name!r}, which is not a parameter of the model "
                f"(the model has: {known}{', ...' if len(params) > 8 else ''}); was it computed for another model?"
            )
        if g.shape != params[name].shape:
            raise ValueError(
                f"labeled_grad[{name!r}] has shape {tuple(g.shape)} but the model's parameter has shape "
                f"{tuple(params[name].shape)}; was it computed for another model?"
            )
        if not (g.is_floating_point() and finite[name]):
            raise ValueError(f"labeled_grad[{name!r}] must be a finite floating-point tensor")
    return grads


def _finite_tensors(grads: dict[str, Tensor]) -> dict[str, bool]:
    """Whether each floating-point tensor is finite, reading one value per device (on a GPU: one host wait for
    the whole gradient, not one per tensor): the sums, stacked; a non-finite sum is checked element by element."""
    found: dict[str, bool] = {}
    by_device: dict[torch.device, list[str]] = {}
    for name, g in grads.items():
        if isinstance(g, Tensor) and g.is_floating_point():
            by_device.setdefault(g.device, []).append(name)
    for names in by_device.values():
        with torch.no_grad():
            sums = torch.stack([grads[n].sum().to(torch.float64) for n in names]).cpu().tolist()
        for name, total in zip(names, sums):
            found[name] = math.isfinite(total) or all_finite(grads[name])
    return found


# The prefixes a wrapper adds to its module's parameter names: torch.compile's and DistributedDataParallel's.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _model_name(name: str, params: dict[str, Tensor]) -> str:
    """``name`` as the scored module knows it: a key taken from a wrapper's ``named_parameters()`` (a compiled
    or DDP model, which fastdal scores through the module inside) loses the wrapper's prefix."""
    while name not in params and name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name
