"""Property-based exactness: fastdal against the float64 per-sample reference on random tiny models.

Every example (tests/fuzz_models.py) is a float64 classifier with a pool loader and a labeled loader.
Three computations of the same per-sample gradients must agree to a relative error below 1e-8:

* fastdal's ``labeled_grad``, ``score`` and ``features``: the code under test;
* ``fastdal.reference``: the naive loop the rest of the test suite trusts;
* a plain loop written here, which splits each collated batch along dim 0 *before* applying the
  example's ``inputs=`` and takes ``torch.autograd.grad`` one sample at a time. It shares no code with
  fastdal, so a reference that misreads a layout is caught instead of agreeing with fastdal's mistake.

``layers="last"`` must find the module named ``head``: every fuzz model is built around it.

Run with ``HYPOTHESIS_PROFILE=fuzz`` (``make fuzz``) for 5000 fresh examples instead of the fixed 300 of
``make test`` (profiles: tests/conftest.py). A summary (examples, failures, worst relative error per
check, what was covered) is printed at the end and written to ``$FASTDAL_FUZZ_SUMMARY``
(default /tmp/fastdal-fuzz-summary.json).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis.errors import UnsatisfiedAssumption

import fastdal

from fuzz_models import Spec, build, specs

TOLERANCE = 1e-8
# Scale floor of the relative error. The models' weights, inputs and activations are of order one, so
# a quantity that is zero (the gradient of a side branch) or analytically zero yet computed as rounding
# noise of about 1e-16 (a head input that is the mean of normalized values) is held to an absolute
# error of TOLERANCE * FLOOR = 1e-14 instead.
FLOOR = 1e-6
# Smallest gap between a pool sample's two largest logits for its pseudo label to count as defined.
GAP = 1e-9
# Largest factor by which a layer may magnify rounding noise (PerSample._rms_amplification).
MAX_AMPLIFICATION = 1e4
# Smallest 1 - p_y of a sample's gradient label (float64 rounding then costs at most 1e-10 relative).
MARGIN = 1e-6


# --------------------------------------------------------------------------------------------------
# The plain per-sample loop
# --------------------------------------------------------------------------------------------------


class PerSample:
    """Per-sample gradients of every trainable parameter, materialized: ``rows`` is (N, P)."""

    def __init__(self, model: torch.nn.Module, loader, inputs, labeled: bool):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.amplification = 0.0
        rms_norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
        hooks = [m.register_forward_hook(self._rms_amplification) for m in rms_norms]
        self.names = list(params)
        self.columns, start = {}, 0
        for n, p in params.items():
            self.columns[n] = slice(start, start + p.numel())
            start += p.numel()
        rows, labels, gaps, margins = [], [], [], []
        for batch in loader:
            for i in range(batch[0].shape[0]):
                sample = [t[i : i + 1] for t in batch]  # one sample of the collated batch, then inputs=
                logits = model(inputs(sample) if inputs is not None else sample[0])
                y = sample[1].long() if labeled else logits.argmax(1)
                loss = F.cross_entropy(logits, y, reduction="sum")
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
                rows.append(torch.cat([g.reshape(-1) for g in grads]))
                labels.append(y)
                top = logits.detach().topk(2, dim=1).values
                gaps.append(top[:, 0] - top[:, 1])
                margins.append(-torch.expm1(F.log_softmax(logits.detach(), 1).gather(1, y[:, None])))
        for hook in hooks:
            hook.remove()
        self.rows = torch.stack(rows).detach()
        self.labels = torch.cat(labels)
        self.smallest_gap = float(torch.cat(gaps).min())  # between the two largest logits of a sample
        self.smallest_margin = float(torch.cat(margins).min())  # 1 - p_y, y the label the gradient is taken at

    def _rms_amplification(self, m: torch.nn.RMSNorm, args: tuple, output: torch.Tensor) -> None:
        """How much an RMSNorm magnifies rounding noise in its input: 1 / sqrt(mean(x^2) + eps).

        LayerNorm and GroupNorm are bounded by their eps (1e-5: at most 316x), but RMSNorm's default
        eps is float64's machine epsilon, so on an input that is zero up to rounding it turns that
        noise into order-one values, which no two exact implementations reproduce alike.
        """
        x = args[0].detach()
        dims = tuple(range(x.dim() - len(m.normalized_shape), x.dim()))
        eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
        factor = float((x.square().mean(dims) + eps).rsqrt().max())
        self.amplification = max(self.amplification, factor)

    def take(self, names: list[str]) -> torch.Tensor:
        """(N, P') gradients of ``names``, in that order."""
        return torch.cat([self.rows[:, self.columns[n]] for n in names], 1)


def flat(grad: fastdal.LabeledGrad) -> torch.Tensor:
    return torch.cat([grad.grads[n].reshape(-1).double() for n in grad.names])


def exact_rank(model: torch.nn.Module) -> int:
    """A projection rank at which features() projects nothing: every Linear/Conv/Embedding dimension
    and, for parameters flattened whole, ``rank**2`` must be at least the size; the largest parameter
    size bounds both."""
    return max(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Errors and the run's summary
# --------------------------------------------------------------------------------------------------


class Summary:
    def __init__(self):
        self.calls = 0
        self.passed = 0
        self.rejected = 0  # ill-conditioned examples (assume)
        self.failures: collections.Counter[str] = collections.Counter()
        self.worst: dict[str, tuple[float, str]] = {}
        self.covered: collections.Counter[str] = collections.Counter()

    def record(self, check: str, err: float, spec: Spec) -> None:
        if err < TOLERANCE and err >= self.worst.get(check, (-1.0, ""))[0]:
            self.worst[check] = (err, repr(spec))

    def as_dict(self) -> dict:
        worst = max(self.worst.values(), default=(0.0, ""))
        return {
            "calls (examples incl. shrinking)": self.calls,
            "passed": self.passed,
            "rejected as ill-conditioned": self.rejected,
            "failures": dict(self.failures),
            "worst relative error of a passing check": worst[0],
            "worst check's example": worst[1],
            "worst relative error per check": {k: v[0] for k, v in sorted(self.worst.items())},
            "covered (passing examples)": dict(sorted(self.covered.items())),
        }


SUMMARY = Summary()
CURRENT: list[Spec] = []  # [the example being checked], for the summary


def relative_error(check: str, actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, FLOOR); inf for a shape mismatch."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        return math.inf
    if expected.numel() == 0:
        return 0.0
    err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), FLOOR)
    err = math.inf if math.isnan(err) else err
    SUMMARY.record(check, err, CURRENT[-1])
    return err


def failure_kind(exc: BaseException) -> str:
    """The exception's type and first line with numbers blanked, so that failures of one kind count together."""
    first = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"{type(exc).__name__}: {re.sub(r'[0-9][0-9.e+-]*', '#', first)}"


@pytest.fixture(scope="module", autouse=True)
def _fuzz_summary(pytestconfig):
    yield
    summary = SUMMARY.as_dict()
    path = os.environ.get("FASTDAL_FUZZ_SUMMARY", "/tmp/fastdal-fuzz-summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():  # shown even when the test passes
        reporter.write_sep("-", f"fastdal fuzz summary (also in {path})")
        for key, value in list(summary.items())[:6]:  # the counts and the worst error
            reporter.write_line(f"{key}: {value}")


# --------------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------------


# Every operation kind, whatever the draws: parameters read at the operations that use them (a class token, a
# position table, layer scales, HF's Conv1D rows), bags, recurrent layers (tests/fuzz_models.py).
_EVERY_KIND = (
    Spec(
        layout="seq",
        input_shape=(4, 3),
        vocab=None,
        seq_first=False,
        trunk=(
            "ClassToken(3)",
            "Shift((5, 3), subtract=False)",
            "RowsLinear(3, 4)",
            "LayerScale(4, -1, 'mul')",
            "nn.Tanh()",
            "LayerScale(4, -1, 'inplace')",
            "MeanOver(1)",
        ),
        head="nn.Linear(4, 3)",
        pool="nn.Identity()",
        post="nn.Identity()",
        side=None,
        classes=3,
        pool_size=7,
        pool_batch=4,
        labeled_size=5,
        labeled_batch=3,
        int32_labels=False,
        seed=11,
    ),
    Spec(
        layout="tokens",
        input_shape=(5,),
        vocab=6,
        seq_first=False,
        trunk=(
            "nn.EmbeddingBag(6, 4, mode='mean', padding_idx=0)",
            "LayerScale(4, -1, 'div')",
            "Shift((4,), subtract=True)",
        ),
        head="nn.Linear(4, 3)",
        pool="nn.Identity()",
        post="Scale(0.5)",
        side=None,
        classes=3,
        pool_size=6,
        pool_batch=5,
        labeled_size=4,
        labeled_batch=4,
        int32_labels=False,
        seed=12,
    ),
    Spec(
        layout="seq",
        input_shape=(5, 3),
        vocab=None,
        seq_first=False,
        trunk=(
            "RecurrentOut(nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, batch_first=True))",
            "SeqFirst(RecurrentOut(nn.GRU(4, 3, num_layers=1, bidirectional=False)))",
            "MaxOver(1)",
        ),
        head="nn.Linear(3, 4)",
        pool="nn.Identity()",
        post="nn.Identity()",
        side=None,
        classes=4,
        pool_size=6,
        pool_batch=5,
        labeled_size=4,
        labeled_batch=3,
        int32_labels=False,
        seed=14,
    ),
    Spec(
        layout="c2",
        input_shape=(2, 4, 4),
        vocab=None,
        seq_first=False,
        trunk=(
            "nn.Conv2d(2, 3, 3, stride=1, padding=1, dilation=1, groups=1, padding_mode='zeros')",
            "LayerScale(3, 0, 'mul')",
            "MeanOver((2, 3))",
        ),
        head="nn.Linear(3, 4)",
        pool="nn.Identity()",
        post="nn.Identity()",
        side=None,
        classes=4,
        pool_size=5,
        pool_batch=2,
        labeled_size=3,
        labeled_batch=2,
        int32_labels=False,
        seed=13,
    ),
)


@pytest.mark.filterwarnings("ignore:fastdal.*no closed form:UserWarning")  # generic modules: exact, just slower
@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")  # PyTorch's note on even kernels
@given(spec=specs())
@example(spec=_EVERY_KIND[0])
@example(spec=_EVERY_KIND[1])
@example(spec=_EVERY_KIND[2])
@example(spec=_EVERY_KIND[3])
def test_fastdal_matches_reference(spec: Spec):
    SUMMARY.calls += 1
    CURRENT[:] = [spec]
    try:
        _check_example(spec)
    except UnsatisfiedAssumption:
        SUMMARY.rejected += 1
        raise
    except BaseException as exc:
        SUMMARY.failures[failure_kind(exc)] += 1
        raise
    SUMMARY.passed += 1
    SUMMARY.covered.update(spec.tags())


def _check_example(spec: Spec) -> None:
    ex = build(spec)
    model, kw = ex.model, ({} if ex.inputs is None else {"inputs": ex.inputs})
    pool_truth = PerSample(model, ex.pool, ex.inputs, labeled=False)
    labeled_truth = PerSample(model, ex.labeled, ex.inputs, labeled=True)
    head = [n for n, _ in model.head.named_parameters(prefix="head")]
    # Examples whose exact answer is rounding noise test nothing: a pseudo label is defined only where the
    # largest logit is clear of rounding; an RMSNorm must not blow rounding noise up to order one; and a
    # gradient at a label of probability p_y is e = softmax - onehot, whose e_y = p_y - 1 carries a
    # relative rounding error of 1e-16 / (1 - p_y) in any float64 computation, the reference's included.
    assume(pool_truth.smallest_gap > GAP)
    assume(max(pool_truth.amplification, labeled_truth.amplification) < MAX_AMPLIFICATION)
    assume(min(pool_truth.smallest_margin, labeled_truth.smallest_margin) > MARGIN)

    for layers in ("last", "all"):
        g = fastdal.labeled_grad(model, ex.labeled, layers=layers, **kw)
        assert g.names == (head if layers == "last" else labeled_truth.names), f"layers={layers!r} covers {g.names}"
        expected_g = fastdal.reference.labeled_grad(model, ex.labeled, layers=layers, dtype=torch.float64, **kw)
        loop_g = labeled_truth.take(expected_g.names).sum(0)
        err = relative_error(f"reference.labeled_grad[{layers}] vs loop", flat(expected_g), loop_g)
        assert err < TOLERANCE, f"the reference's labeled_grad(layers={layers!r}) disagrees with the loop: {err:.3g}"
        assert g.names == expected_g.names
        err = relative_error(f"labeled_grad[{layers}]", flat(g), flat(expected_g))
        assert err < TOLERANCE, f"labeled_grad(layers={layers!r}): relative error {err:.3g}"

        result = fastdal.score(model, ex.pool, g, return_components=True, **kw)
        expected = fastdal.reference.score(model, ex.pool, g, dtype=torch.float64, return_components=True, **kw)
        rows = pool_truth.take(g.names)
        assert torch.equal(expected.pseudo_label, pool_truth.labels), "the reference's pseudo labels"
        err = relative_error(f"reference.score.sq_norm[{layers}] vs loop", expected.sq_norm, rows.square().sum(1))
        assert err < TOLERANCE, f"the reference's sq_norm (layers={layers!r}) disagrees with the plain loop: {err:.3g}"
        err = relative_error(f"reference.score.dot[{layers}] vs loop", expected.dot, rows @ flat(g))
        assert err < TOLERANCE, f"the reference's dot (layers={layers!r}) disagrees with the plain loop: {err:.3g}"
        assert torch.equal(result.pseudo_label, expected.pseudo_label), f"score(layers={layers!r}): pseudo labels"
        err = relative_error(f"score.score[{layers}]", result.score, expected.score)
        assert err < TOLERANCE, f"score(layers={layers!r}).score: relative error {err:.3g}"
        err = relative_error(f"score.sq_norm[{layers}]", result.sq_norm, expected.sq_norm)
        assert err < TOLERANCE, f"score(layers={layers!r}).sq_norm: relative error {err:.3g}"
        err = relative_error(f"score.dot[{layers}]", result.dot, expected.dot)
        assert err < TOLERANCE, f"score(layers={layers!r}).dot: relative error {err:.3g}"

    # At a rank no smaller than any dimension every projection is the identity: the Gram matrix is exact
    # (the head is exact in factored form at any rank).
    rank = exact_rank(model)
    for layers, names in (("all", pool_truth.names), ("last", head)):
        features = fastdal.features(model, ex.pool, layers=layers, rank=rank, **kw)
        assert torch.equal(features.labels.cpu(), pool_truth.labels), f"features(layers={layers!r}): pseudo labels"
        assert sorted(features.names) == sorted(names), f"features(layers={layers!r}) covers {features.names}"
        rows = pool_truth.take(names)
        err = relative_error(f"features[{layers}].gram", features.gram(), rows @ rows.T)
        assert err < TOLERANCE, f"features(layers={layers!r}, rank={rank}).gram(): relative error {err:.3g}"
