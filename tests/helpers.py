"""Loaders and model-state snapshots used across the tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def loaders(make_inputs, classes, dtype, n_labeled=9, n_pool=13, batch_size=5):
    x = make_inputs(n_labeled + n_pool, dtype)
    y = torch.randint(0, classes, (n_labeled + n_pool,))
    labeled = DataLoader(TensorDataset(x[:n_labeled], y[:n_labeled]), batch_size=batch_size, shuffle=True)
    pool = DataLoader(TensorDataset(x[n_labeled:]), batch_size=batch_size)
    return labeled, pool


def snapshot(model: nn.Module) -> dict:
    """Everything of a model that fastdal promises to leave as it found it."""
    hook_dicts = (
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
    )
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: (None if p.grad is None else (id(p.grad), p.grad.clone())) for n, p in model.named_parameters()},
        "hooks": {n: {h: dict(getattr(m, h)) for h in hook_dicts} for n, m in model.named_modules()},
        "values": {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()},
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"].keys() == before["hooks"].keys()
    for name in before["hooks"]:
        for kind, hooks in before["hooks"][name].items():
            assert after["hooks"][name][kind].keys() == hooks.keys(), (name, kind)
    for name, grad in before["grad"].items():
        now = after["grad"][name]
        if grad is None:
            assert now is None, name
        else:
            assert now[0] == grad[0] and torch.equal(now[1], grad[1]), name
    for name, value in before["values"].items():
        assert torch.equal(after["values"][name], value), name


def materialized_gradients(model: nn.Module, x: torch.Tensor, names: list[str], labels=None) -> torch.Tensor:
    """(N, P) per-sample cross-entropy gradients over ``names``, one autograd call per sample (at the
    pseudo label unless ``labels`` are given): the plain construction that features are checked against."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        logits = model(x[i : i + 1])
        y = logits.argmax(1) if labels is None else labels[i : i + 1]
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).detach()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (no ties expected among continuous scores)."""
    ranks = [torch.argsort(torch.argsort(t.double())).double() for t in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def fashion_mnist_or_skip():
    """The complete Fashion-MNIST (official splits). Missing, it skips the test, except in CI
    (``FASTDAL_REQUIRE_DATA`` or ``CI`` set), where the set-up installs it and its absence is a failure."""
    import os

    import pytest

    from fastdal.al import data

    try:
        return data.load("fashion-mnist")
    except FileNotFoundError as error:
        if os.environ.get("FASTDAL_REQUIRE_DATA") or os.environ.get("CI"):
            pytest.fail(str(error))
        pytest.skip(str(error))
