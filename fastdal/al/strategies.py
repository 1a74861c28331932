"""Query strategies of the active-learning loop: the baselines Wang et al. (NeurIPS 2022) compare dynamic AL
against, and dynamic AL itself.

Every strategy returns ``b`` distinct dataset indices from ``state.pool`` (int64, CPU), in the order it
ranks them, is deterministic given ``state.generator``, and breaks ties in favour of the lower pool
position. Labels are read only for labeled samples (ALBL's reward reads those it queried itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

import fastdal

from .. import precision
from ..batches import all_finite
from ..selection import check_budget
from ..torch_ops import chunks
from .strategy import RoundState, Strategy, StrategyFactory


class PoolStrategy(Strategy):
    """A strategy that picks pool positions: subclasses implement :meth:`positions`; :meth:`select` checks
    ``b``, answers ``b = 0`` without a pass over the data, and maps positions to dataset indices."""

    def select(self, state: RoundState, b: int) -> Tensor:
        if check_budget(b, len(state.pool)) == 0:
            return torch.zeros(0, dtype=torch.long)
        return state.pool[self.positions(state, int(b)).cpu()]

    def positions(self, state: RoundState, b: int) -> Tensor:
        """``b`` distinct positions into ``state.pool`` (``1 <= b <= len(state.pool)``)."""
        raise NotImplementedError


def _ranked(values: Tensor, b: int, *, descending: bool) -> Tensor:
    """Positions of the ``b`` highest (or lowest) values; ties go to the lower position."""
    if values.is_floating_point() and torch.isnan(values).any():
        raise ValueError(f"the model's outputs give NaN at pool position {int(torch.isnan(values).nonzero()[0, 0])}")
    return torch.sort(values, descending=descending, stable=True).indices[:b]


class RandomStrategy(PoolStrategy):
    """Uniform sampling without replacement: the first ``b`` of a ``torch.randperm`` of the pool."""

    name = "random"

    def positions(self, state: RoundState, b: int) -> Tensor:
        return torch.randperm(len(state.pool), generator=state.generator)[:b]


class LeastConfidence(PoolStrategy):
    """Lowest maximum softmax probability ``max_k p_k(x)`` (Wang & Shang, IJCNN 2014)."""

    name = "conf"

    def positions(self, state: RoundState, b: int) -> Tensor:
        return _ranked(state.probabilities(state.pool).max(1).values, b, descending=False)


class Margin(PoolStrategy):
    """Smallest margin ``p_(1)(x) - p_(2)(x)`` between the two largest probabilities (Scheffer et al., 2001)."""

    name = "margin"

    def positions(self, state: RoundState, b: int) -> Tensor:
        top = state.probabilities(state.pool).topk(2, dim=1).values
        return _ranked(top[:, 0] - top[:, 1], b, descending=False)


class Entropy(PoolStrategy):
    """Highest predictive entropy ``-sum_k p_k log p_k`` (Wang & Shang, IJCNN 2014), ``0 log 0 = 0``."""

    name = "entropy"

    def positions(self, state: RoundState, b: int) -> Tensor:
        p = state.probabilities(state.pool).double()
        return _ranked(torch.special.entr(p).sum(1), b, descending=True)


class Coreset(PoolStrategy):
    """k-center greedy (Sener & Savarese, ICLR 2018) on penultimate features, the labeled set as the
    initial centers (see :func:`k_center_greedy`)."""

    name = "coreset"

    def positions(self, state: RoundState, b: int) -> Tensor:
        points = state.embeddings(state.pool)
        centers = state.embeddings(state.labeled) if len(state.labeled) else points.new_zeros(0, points.shape[1])
        return k_center_greedy(points, centers, b)


@precision.follows_mode
def k_center_greedy(points: Tensor, centers: Tensor, b: int) -> Tensor:
    """Positions into ``points`` of ``b`` new centers, chosen greedily (the 2-approximation of k-center).

    Each step takes the point farthest (Euclidean) from its nearest center, the existing ``centers`` and
    those chosen so far; ties go to the lower position. With no centers, the first choice is position 0.
    Distances are computed in float64 as ``||x||^2 - 2 x.c + ||c||^2``, in chunks: memory beyond the
    inputs is O(N) plus a bounded temporary (``fastdal.torch_ops.CHUNK_ELEMENTS``).

    Args:
        points: (N, D) candidates.
        centers: (M, D) existing centers; M may be 0.
        b: how many to choose, ``0 <= b <= N``.
    """
    if points.dim() != 2 or centers.dim() != 2 or points.shape[1] != centers.shape[1]:
        raise ValueError(
            f"points and centers must be (N, D) and (M, D), got {tuple(points.shape)} and {tuple(centers.shape)}"
        )
    b = check_budget(b, points.shape[0])
    for what, t in (("points", points), ("centers", centers)):
        if not all_finite(t):
            raise ValueError(f"{what} must be finite")
    chosen = torch.zeros(b, dtype=torch.long)
    if b == 0:
        return chosen
    d = points.shape[1]
    sq = torch.cat([_sq_rows(points[rows]) for rows in chunks(points.shape[0], d)])
    nearest = torch.full_like(sq, math.inf)
    for cols in chunks(centers.shape[0], d + 1):
        c = centers[cols].to(sq)
        c_sq = _sq_rows(c)
        for rows in chunks(points.shape[0], d + c.shape[0]):
            dist = sq[rows, None] - 2 * points[rows].to(sq) @ c.T + c_sq
            nearest[rows] = torch.minimum(nearest[rows], dist.min(1).values)
    for step in range(b):
        i = int(torch.argmax(nearest))  # the first maximum: the lower position
        chosen[step] = i
        x = points[i].to(sq)
        for rows in chunks(points.shape[0], d):
            nearest[rows] = torch.minimum(nearest[rows], sq[rows] - 2 * (points[rows].to(sq) @ x) + sq[i])
        nearest[i] = -math.inf  # never again, even if rounding leaves it a tiny distance from itself
    return chosen


def _sq_rows(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x.double(), dim=1).square()


def _labeled_grad(state: RoundState, layers):
    return fastdal.labeled_grad(state.model, state.loader(state.labeled, with_labels=True), layers=layers)


class Badge(PoolStrategy):
    """BADGE (Ash et al., ICLR 2020): k-means++ seeding over the last-layer gradient embeddings at the
    pseudo labels (``fastdal.select(..., method="badge")``), seeded by an int drawn from ``state.generator``."""

    name = "badge"

    def positions(self, state: RoundState, b: int) -> Tensor:
        seed = int(torch.randint(0, 2**62, (), generator=state.generator))
        features = fastdal.features(state.model, state.loader(state.pool))
        return fastdal.select(features, b, method="badge", seed=seed)


class DynamicAL(PoolStrategy):
    """Dynamic AL (Wang et al., NeurIPS 2022): the top ``b`` of ``||g_u||^2 + gamma <g_u, G>``, with ``g_u``
    the gradient at the pseudo label and ``G`` the summed labeled gradient, over ``layers`` (default: every
    parameter, as the paper's code scores them).

    ``gamma = inf`` ranks by ``<g_u, G>`` alone (the paper's "inf" variant); ``gamma = 2`` is the paper's
    choice and ``gamma = 0`` is expected gradient length at the pseudo label.
    """

    def __init__(self, gamma: float = 2.0, layers: str | Sequence[str] = "all", name: str | None = None):
        gamma = float(gamma)
        if math.isnan(gamma) or gamma == -math.inf:
            raise ValueError(f"gamma must be a real number or inf, got {gamma!r}")
        self.gamma, self.layers = gamma, layers
        self.name = name or f"dynamic-g{gamma:g}"

    def positions(self, state: RoundState, b: int) -> Tensor:
        grad = _labeled_grad(state, self.layers)
        result = fastdal.score(state.model, state.loader(state.pool), grad, return_components=True)
        scores = result.dot if self.gamma == math.inf else result.with_gamma(self.gamma)
        return fastdal.select(scores, b)


class DynamicGreedy(PoolStrategy):
    """The paper's subset objective ``||G + sum_{u in Q} g_u||^2 - ||G||^2`` maximized greedily, one sample
    at a time, on exact last-layer gradient features (``fastdal.select(..., method="greedy")``): each step
    adds the ``u`` maximizing ``||g_u||^2 + 2 <g_u, G + sum_{v chosen} g_v>``."""

    name = "dynamic-greedy"

    def positions(self, state: RoundState, b: int) -> Tensor:
        grad = _labeled_grad(state, "last")
        features = fastdal.features(state.model, state.loader(state.pool), layers="last")
        return fastdal.select(features, b, method="greedy", labeled_grad=grad)


class DeInfluence(PoolStrategy):
    """The block "de-influence" query of the paper's official code (``ntk_active_memo_efficient.py`` with
    its defaults ``--inf_type full --norm_inf 0``), over every parameter.

    The query is taken in ``blocks`` blocks of near-equal size; block ``j + 1`` is the top of
    ``||g_u||^2 + 2 <g_u, G> - <g_u, sum_{i <= j} mean_{v in Q_i} g_v>`` over the samples not yet chosen:
    each chosen block's mean gradient (at the pseudo labels) is subtracted, which pushes later blocks away
    from the directions already queried, where the exact subset objective (:class:`DynamicGreedy`) adds the
    cross terms instead. One block is plain dynamic AL (gamma = 2). Costs one scoring pass per block.
    """

    def __init__(self, blocks: int = 5, layers: str | Sequence[str] = "all"):
        if int(blocks) != blocks or blocks < 1:
            raise ValueError(f"blocks must be a positive integer, got {blocks!r}")
        self.blocks, self.layers = int(blocks), layers
        self.name = "dynamic-deinf"

    def positions(self, state: RoundState, b: int) -> Tensor:
        grad = _labeled_grad(state, self.layers)
        pool = state.loader(state.pool)
        base = fastdal.score(state.model, pool, grad, return_components=True).with_gamma(2.0).double()
        chosen = torch.zeros(len(state.pool), dtype=torch.bool)
        order: list[Tensor] = []
        queried = None  # sum over chosen blocks of each block's mean gradient
        for size in block_sizes(b, self.blocks):
            scores = base.clone()
            if queried is not None:
                scores -= fastdal.score(state.model, pool, queried, return_components=True).dot.double()
            scores[chosen] = -math.inf
            block = fastdal.select(scores, size)
            chosen[block] = True
            order.append(block)
            if len(order) < self.blocks:  # the last block's gradient is never used
                mean = _mean_pseudo_label_grad(state, state.pool[block], self.layers)
                queried = mean if queried is None else {k: queried[k] + mean[k] for k in mean}
        return torch.cat(order)


def block_sizes(b: int, blocks: int) -> list[int]:
    """``b`` split into ``min(blocks, b)`` sizes that differ by at most one, the larger ones first."""
    blocks = min(blocks, b)
    return [b // blocks + (i < b % blocks) for i in range(blocks)]


def _mean_pseudo_label_grad(state: RoundState, indices: Tensor, layers) -> dict[str, Tensor]:
    """The mean cross-entropy gradient of ``dataset[indices]`` at the model's own predictions, by parameter."""
    pseudo = state.probabilities(indices).argmax(1)
    batches = zip(state.loader(indices), pseudo.split(state.batch_size))
    grad = fastdal.labeled_grad(state.model, batches, layers=layers)
    return {name: g / len(indices) for name, g in grad.grads.items()}


# --------------------------------------------------------------------------------------------------
# ALBL: a bandit over strategies
# --------------------------------------------------------------------------------------------------


def exp3_probabilities(weights: Tensor, pmin: float) -> Tensor:
    """EXP3's arm probabilities ``(1 - K pmin) w / sum(w) + pmin``: every arm keeps at least ``pmin``."""
    weights = weights.double()
    return (1 - weights.numel() * pmin) * weights / weights.sum() + pmin


def exp3_update(weights: Tensor, arm: int, reward: float, probability: float, eta: float) -> Tensor:
    """New weights: ``w[arm] *= exp(eta * reward / probability)`` (the reward's importance-weighted
    estimate); the other arms are unchanged."""
    weights = weights.double().clone()
    weights[arm] *= math.exp(eta * reward / probability)
    return weights


def importance_weighted_accuracy(correct: Tensor, probabilities: Tensor) -> float:
    """``sum_i correct_i / p_i / sum_i 1 / p_i``: accuracy with each sample weighted by the inverse
    probability of the draw that queried it (Hsu & Lin's IW-ACC, normalized); 0 for no samples."""
    if correct.numel() == 0:
        return 0.0
    weights = 1 / probabilities.double()
    return float((weights * correct.double()).sum() / weights.sum())


def draw_arm(probabilities: Tensor, u: float) -> int:
    """The arm whose slot of the cumulative probabilities holds ``u * total`` (``u`` uniform in [0, 1))."""
    cumulative = torch.cumsum(probabilities.double(), 0)
    target = torch.tensor([u * cumulative[-1].item()], dtype=torch.float64)
    return min(int(torch.searchsorted(cumulative, target, right=True)[0]), probabilities.numel() - 1)


@dataclass
class BanditRound:
    """One query of :class:`ALBL`: the arm drawn, every arm's probability then, what the arm queried,
    and the reward (None until :meth:`ALBL.update`)."""

    round: int
    arm: int
    probabilities: Tensor
    queried: Tensor
    reward: float | None = None

    @property
    def probability(self) -> float:
        return float(self.probabilities[self.arm])


class ALBL(Strategy):
    """Active Learning By Learning (Hsu & Lin, AAAI 2015): an EXP3 bandit (Auer et al., 2002) over strategies.

    Each round an arm is drawn from :func:`exp3_probabilities` with one uniform number from
    ``state.generator`` and queries; after retraining, the reward is the importance-weighted accuracy of
    the model on every sample ALBL has queried so far, each weighted by one over the probability of the
    arm drawn in its round, and the drawn arm's weight grows by ``exp(eta * reward / p[arm])``.

    Choices: ``pmin = 1 / (2 K)`` (EXP3's exploration rate ``gamma = K pmin = 1/2``: half the mass spread
    evenly, Auer et al.'s tuning for runs of about ten rounds over five arms) and ``eta = pmin``
    (EXP3's ``gamma / K``), so that ``eta * reward / p <= 1`` each round. Weights are kept divided by their
    sum, which leaves the probabilities unchanged and keeps them from overflowing.

    Attributes:
        arms: the strategies drawn from.
        weights: (K,) float64 EXP3 weights, summing to 1.
        history: one :class:`BanditRound` per query.
    """

    name = "albl"

    def __init__(self, arms: Sequence[Strategy] | None = None, pmin: float | None = None, eta: float | None = None):
        self.arms = (
            list(arms) if arms is not None else [RandomStrategy(), LeastConfidence(), Margin(), Entropy(), Coreset()]
        )
        k = len(self.arms)
        if k == 0:
            raise ValueError("ALBL needs at least one arm")
        self.pmin = 1 / (2 * k) if pmin is None else float(pmin)
        if not 0 <= self.pmin <= 1 / k:
            raise ValueError(f"pmin must be in [0, 1/K] = [0, {1 / k:g}], got {pmin!r}")
        self.eta = self.pmin if eta is None else float(eta)
        if not self.eta > 0:
            raise ValueError(f"eta must be positive, got {eta!r}")
        self.weights = torch.full((k,), 1 / k, dtype=torch.float64)
        self.history: list[BanditRound] = []

    @property
    def probabilities(self) -> Tensor:
        """The probabilities of the arms for the next draw."""
        return exp3_probabilities(self.weights, self.pmin)

    def select(self, state: RoundState, b: int) -> Tensor:
        if self.history and self.history[-1].reward is None:
            raise RuntimeError("ALBL.update must be called after each select (the bandit needs the reward)")
        probabilities = self.probabilities
        u = torch.rand((), generator=state.generator, dtype=torch.float64).item()
        arm = draw_arm(probabilities, u)
        queried = torch.as_tensor(self.arms[arm].select(state, b), dtype=torch.long).cpu()
        self.history.append(BanditRound(state.round, arm, probabilities, queried))
        return queried

    def update(self, state: RoundState, queried: Tensor) -> None:
        if not self.history or self.history[-1].reward is not None:
            raise RuntimeError("ALBL.update was called without a select before it")
        last = self.history[-1]
        last.reward = self.reward(state)
        weights = exp3_update(self.weights, last.arm, last.reward, last.probability, self.eta)
        self.weights = weights / weights.sum()
        self.arms[last.arm].update(state, queried)

    def reward(self, state: RoundState) -> float:
        """IW-ACC of ``state.model`` on every sample queried so far (their labels are known)."""
        indices = torch.cat([r.queried for r in self.history])
        if indices.numel() == 0:
            return 0.0
        weights = torch.cat([torch.full((len(r.queried),), r.probability, dtype=torch.float64) for r in self.history])
        predicted = state.probabilities(indices).argmax(1)
        labels = torch.tensor([int(state.dataset[i][1]) for i in indices.tolist()])
        return importance_weighted_accuracy(predicted == labels, weights)


STRATEGIES: dict[str, StrategyFactory] = {
    "random": RandomStrategy,
    "conf": LeastConfidence,
    "margin": Margin,
    "entropy": Entropy,
    "coreset": Coreset,
    "badge": Badge,
    "albl": ALBL,
    "dynamic-g0": partial(DynamicAL, 0.0),
    "dynamic-g1": partial(DynamicAL, 1.0),
    "dynamic-g2": partial(DynamicAL, 2.0),
    "dynamic-ginf": partial(DynamicAL, math.inf),
    "dynamic-last": partial(DynamicAL, 2.0, "last", "dynamic-last"),
    "dynamic-greedy": DynamicGreedy,
    "dynamic-deinf": DeInfluence,
}


def make_strategy(name: str) -> Strategy:
    """A new strategy of the registered ``name``."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]()
