"""Checks of a pass's logits and labels that never make a GPU's host wait per batch.

A finite check or a label-range check reads a value on the host; on a GPU that means waiting, every batch, for
everything queued before it (the backward could not be queued while the forward runs). :class:`PassChecks`
checks tensors on the CPU at once, as before, and accumulates those on a device: per batch the first offending
sample's index (and, for labels, its label) stays on the device, and :meth:`PassChecks.finish` reads them all in
one wait at the end of the pass, raising the same error, naming the same sample, as an immediate check would.

Out-of-range labels on a device are clamped into range for the batch's computation (an out-of-range target
would stop the GPU with a device-side assert); the pass's results are never returned when one was found.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .batches import check_finite, check_label_layout, check_labels, label_error, not_finite_error

_NONE = torch.iinfo(torch.int64).max  # the index of "no offending sample", above every real one


class PassChecks:
    """The checks of one pass over a loader (see the module docstring)."""

    def __init__(self) -> None:
        # Per batch on a device: [how many bad, the first bad one's index, (for labels) its label]. A count of zero
        # means nothing was found, whatever the other entries hold.
        self._logits: list[tuple[str, Tensor]] = []
        self._labels: list[tuple[int, Tensor]] = []

    def logits(self, logits: Tensor, first_index: int, what: str) -> None:
        """Every logits row finite (``what``: "pool" or "labeled", for the message)."""
        if logits.device.type == "cpu":
            check_finite(logits, first_index, what)
            return
        with torch.no_grad():
            bad = ~torch.isfinite(logits).all(dim=1)
            index = torch.arange(first_index, first_index + logits.shape[0], device=logits.device)
            first = torch.where(bad, index, _NONE).min()
            self._logits.append((what, torch.stack([bad.sum(), first])))

    def labels(self, y: Tensor, batch_size: int, num_classes: int, first_index: int) -> Tensor:
        """The labels as int64 class indices; on a device, out-of-range ones clamped and reported at the end."""
        if y.device.type == "cpu":
            return check_labels(y, batch_size, num_classes, first_index)
        check_label_layout(y, batch_size, first_index)  # dtype and shape: no value is read
        with torch.no_grad():
            bad = (y < 0) | (y >= num_classes)
            index = torch.arange(first_index, first_index + batch_size, device=y.device)
            first = torch.where(bad, index, _NONE).min()
            at = (first - first_index).clamp(0, max(batch_size - 1, 0)).reshape(1)
            label = y.long().index_select(0, at)[0] if batch_size else first
            self._labels.append((num_classes, torch.stack([bad.sum(), first, label])))
        return y.long().clamp(0, num_classes - 1)

    def finish(self) -> None:
        """Read everything accumulated on a device (one host wait) and raise the first problem found."""
        labels, logits = self._labels, self._logits
        self._labels, self._logits = [], []
        if not (labels or logits):
            return
        flat = torch.cat([t for _, t in labels] + [t for _, t in logits]).cpu().tolist()  # the one wait
        label_values = [flat[3 * i : 3 * i + 3] for i in range(len(labels))]
        logit_values = [flat[3 * len(labels) + 2 * i : 3 * len(labels) + 2 * i + 2] for i in range(len(logits))]
        bad = [(first, label, classes) for (classes, _), (n, first, label) in zip(labels, label_values) if n]
        if bad:
            first, label, classes = min(bad)
            raise label_error(label, first, classes)
        rows = [(first, n, what) for (what, _), (n, first) in zip(logits, logit_values) if n]
        if rows:
            first, _, what = min(rows)
            raise not_finite_error(first, what, sum(n for _, n, _ in rows))
