"""Query strategies of the active-learning loop: the contract every strategy keeps, and each rule on cases
whose answer is known by hand."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fastdal
import fastdal.torch_ops
from fastdal.al.strategies import (
    ALBL,
    STRATEGIES,
    Coreset,
    DynamicAL,
    Entropy,
    LeastConfidence,
    Margin,
    RandomStrategy,
    Strategy,
    draw_arm,
    exp3_probabilities,
    exp3_update,
    importance_weighted_accuracy,
    k_center_greedy,
    make_strategy,
)
from fastdal.al.strategy import RoundState

from helpers import assert_same_state, snapshot

CLASSES = 3


def mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, CLASSES)).to(dtype)


def round_state(model: nn.Module, x: torch.Tensor, y: torch.Tensor, labeled, seed: int = 0, round: int = 0):
    n = x.shape[0]
    labeled = torch.as_tensor(labeled, dtype=torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[labeled] = False
    pool = mask.nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    return RoundState(model, TensorDataset(x, y), labeled, pool, round, generator, 7, torch.device("cpu"))


def random_state(seed: int = 0, dtype=torch.float32) -> RoundState:
    data = torch.Generator().manual_seed(123)
    x = torch.randn(30, 4, generator=data, dtype=dtype)
    y = torch.randint(0, CLASSES, (30,), generator=data)
    labeled = [0, 3, 4, 11, 17, 18, 25, 29]
    return round_state(mlp(dtype), x, y, labeled, seed)


# --------------------------------------------------------------------------------------------------
# The contract of every registered strategy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_registered_strategy_keeps_the_contract(name):
    state = random_state(seed=5)
    before = snapshot(state.model)
    strategy = make_strategy(name)
    assert isinstance(strategy, Strategy) and strategy.name == name
    chosen = strategy.select(state, 6)
    assert chosen.dtype == torch.long and chosen.shape == (6,)
    assert chosen.unique().numel() == 6
    assert torch.isin(chosen, state.pool).all()
    assert not torch.isin(chosen, state.labeled).any()
    assert_same_state(before, snapshot(state.model))
    again = make_strategy(name).select(random_state(seed=5), 6)
    assert torch.equal(chosen, again)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_registered_strategy_edge_budgets(name):
    state = random_state()
    assert make_strategy(name).select(state, 0).shape == (0,)
    everything = make_strategy(name).select(random_state(), len(state.pool))
    assert torch.equal(everything.sort().values, state.pool)
    with pytest.raises(ValueError, match="b must be between 0 and the pool size"):
        make_strategy(name).select(random_state(), len(state.pool) + 1)


def test_make_strategy_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown strategy 'nope'.*random.*dynamic-greedy"):
        make_strategy("nope")
    assert make_strategy("dynamic-ginf").gamma == math.inf
    assert DynamicAL(0.5).name == "dynamic-g0.5"
    with pytest.raises(ValueError, match="gamma"):
        DynamicAL(float("nan"))


# --------------------------------------------------------------------------------------------------
# Uncertainty strategies on a model whose probabilities are set by hand
# --------------------------------------------------------------------------------------------------


def identity_state() -> RoundState:
    """Logits equal the inputs. Pool rows (dataset indices 0, 2, 3, 5, 6):

    idx  logits        max p   margin  entropy
    0    [4, 0, 0]     0.96    0.94    0.20
    2    [1, 1, 1]     1/3     0       ln 3 = 1.10
    3    [3, 3, -10]   0.5     0       0.69
    5    [2, 1, 0]     0.67    0.42    0.83
    6    [2.5, 2, -10] 0.62    0.24    0.66
    """
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    x = torch.tensor(
        [[4, 0, 0], [9, 0, 0], [1, 1, 1], [3, 3, -10], [0, 9, 0], [2, 1, 0], [2.5, 2, -10]], dtype=torch.float32
    )
    return round_state(model, x, x.argmax(1), labeled=[1, 4])


def test_least_confidence_takes_the_lowest_maximum_probability():
    assert LeastConfidence().select(identity_state(), 3).tolist() == [2, 3, 6]


def test_margin_takes_the_smallest_margin_ties_to_the_lower_position():
    assert Margin().select(identity_state(), 4).tolist() == [2, 3, 6, 5]


def test_entropy_takes_the_highest_entropy():
    assert Entropy().select(identity_state(), 5).tolist() == [2, 5, 3, 6, 0]


def test_random_is_a_seeded_permutation_of_the_pool():
    state = random_state(seed=9)
    expected = state.pool[torch.randperm(len(state.pool), generator=torch.Generator().manual_seed(9))[:4]]
    assert torch.equal(RandomStrategy().select(state, 4), expected)


# --------------------------------------------------------------------------------------------------
# k-center greedy and Coreset
# --------------------------------------------------------------------------------------------------


def line(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)[:, None]


def test_k_center_greedy_on_a_line():
    # From {0}: 10 (distance 10), 5 (5), then 2, 3, 7, 8 at distance 2 -> 2; then 7 (2); then 1 (1, the first of six).
    assert k_center_greedy(line(11), torch.zeros(1, 1), 5).tolist() == [10, 5, 2, 7, 1]


def test_k_center_greedy_ties_go_to_the_lower_position():
    assert k_center_greedy(torch.tensor([[-1.0], [1.0]]), torch.zeros(1, 1), 2).tolist() == [0, 1]
    # Points (0,0), (3,4), (6,0) from centre (0,0): 6,0 (36); then (3,4) at 25 from both; then the centre's twin.
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 0.0]])
    assert k_center_greedy(points, torch.zeros(1, 2), 3).tolist() == [2, 1, 0]


def test_k_center_greedy_without_centers_and_with_duplicates():
    assert k_center_greedy(line(11), torch.zeros(0, 1), 3).tolist() == [0, 10, 5]
    # Duplicates of a centre have distance 0, but a chosen point is never chosen again.
    assert k_center_greedy(torch.tensor([[0.0], [0.0], [1.0]]), torch.zeros(1, 1), 3).tolist() == [2, 0, 1]


def test_k_center_greedy_budget_and_inputs():
    assert k_center_greedy(line(4), torch.zeros(1, 1), 0).tolist() == []
    assert k_center_greedy(line(4), torch.zeros(1, 1), 0).dtype == torch.long
    with pytest.raises(ValueError, match="b must be between"):
        k_center_greedy(line(4), torch.zeros(1, 1), 5)
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        k_center_greedy(line(4), torch.zeros(1, 2), 1)
    with pytest.raises(ValueError, match="finite"):
        k_center_greedy(torch.tensor([[0.0], [math.nan]]), torch.zeros(1, 1), 1)


def brute_k_center(points: torch.Tensor, centers: torch.Tensor, b: int) -> list[int]:
    dist = torch.cdist(points.double(), centers.double()).min(1).values
    chosen = []
    for _ in range(b):
        i = int(torch.argmax(dist))
        chosen.append(i)
        dist = torch.minimum(dist, torch.cdist(points.double(), points[i : i + 1].double())[:, 0])
        dist[chosen] = -1
    return chosen


def test_k_center_greedy_in_small_chunks_matches_the_full_distance_matrix(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    points, centers = torch.randn(50, 3, generator=generator), torch.randn(9, 3, generator=generator)
    expected = brute_k_center(points, centers, 12)
    assert k_center_greedy(points, centers, 12).tolist() == expected
    monkeypatch.setattr(fastdal.torch_ops, "CHUNK_ELEMENTS", 8)  # a few rows and centres at a time
    assert k_center_greedy(points, centers, 12).tolist() == expected


def test_coreset_runs_k_center_greedy_on_penultimate_features():
    state = random_state(dtype=torch.float64)
    with torch.no_grad():
        body = state.model[:-1]
        expected = k_center_greedy(
            body(state.dataset.tensors[0][state.pool]), body(state.dataset.tensors[0][state.labeled]), 5
        )
    assert torch.equal(Coreset().select(state, 5), state.pool[expected])


# --------------------------------------------------------------------------------------------------
# BADGE and dynamic AL: the fastdal calls they stand for
# --------------------------------------------------------------------------------------------------


def test_badge_draws_its_seed_from_the_generator():
    state = random_state(seed=3, dtype=torch.float64)
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(3)))
    features = fastdal.features(state.model, state.loader(state.pool))
    expected = state.pool[fastdal.select(features, 5, method="badge", seed=seed)]
    assert torch.equal(make_strategy("badge").select(state, 5), expected)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, math.inf])
def test_dynamic_al_ranks_by_the_reference_score(gamma):
    state = random_state(dtype=torch.float64)
    for layers in ("all", "last"):  # every parameter by default, as the paper's code; the head alone by name
        grad = fastdal.reference.labeled_grad(state.model, state.loader(state.labeled, with_labels=True), layers=layers)
        result = fastdal.reference.score(state.model, state.loader(state.pool), grad, return_components=True)
        scores = result.dot if gamma == math.inf else result.sq_norm + gamma * result.dot
        expected = state.pool[torch.sort(scores, descending=True, stable=True).indices[:5]]
        strategy = DynamicAL(gamma) if layers == "all" else DynamicAL(gamma, "last")
        assert torch.equal(strategy.select(state, 5), expected), layers
    assert torch.equal(make_strategy("dynamic-last").select(state, 5), DynamicAL(2.0, "last").select(state, 5))


def _flat_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, P) cross-entropy gradients of every parameter, one sample at a time (plain autograd)."""
    params = list(model.parameters())
    rows = []
    for xi, yi in zip(x, y):
        loss = nn.functional.cross_entropy(model(xi[None]), yi[None])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def test_block_sizes_split_b_evenly():
    from fastdal.al.strategies import block_sizes

    assert block_sizes(10, 5) == [2, 2, 2, 2, 2]
    assert block_sizes(7, 3) == [3, 2, 2]
    assert block_sizes(2, 5) == [1, 1]
    with pytest.raises(ValueError, match="blocks must be a positive integer"):
        make_strategy("dynamic-deinf").__class__(blocks=0)


def test_de_influence_by_hand():
    """Block j+1 is the top of ||g_u||^2 + 2<g_u, G> - <g_u, sum of the chosen blocks' mean gradients>,
    from per-sample gradients computed one at a time; it differs from plain top-b and from exact greedy here."""
    from fastdal.al.strategies import DeInfluence

    state = random_state(dtype=torch.float64)
    x, y = state.dataset.tensors
    with torch.no_grad():
        pseudo = state.model(x).argmax(1)
    g_pool = _flat_grads(state.model, x[state.pool], pseudo[state.pool])
    G = _flat_grads(state.model, x[state.labeled], y[state.labeled]).sum(0)
    base = (g_pool * g_pool).sum(1) + 2 * g_pool @ G
    b, blocks = 8, 4
    chosen: list[int] = []
    queried = torch.zeros_like(G)
    for _ in range(blocks):
        scores = base - g_pool @ queried
        scores[chosen] = -math.inf
        block = torch.sort(scores, descending=True, stable=True).indices[: b // blocks].tolist()
        chosen += block
        queried = queried + g_pool[block].mean(0)
    expected = state.pool[torch.tensor(chosen)]
    got = DeInfluence(blocks=blocks).select(state, b)
    assert torch.equal(got, expected)
    assert not torch.equal(got.sort().values, DynamicAL(2.0).select(state, b).sort().values)
    assert torch.equal(DeInfluence(blocks=1).select(state, b), DynamicAL(2.0).select(state, b))


def test_dynamic_greedy_is_the_greedy_subset_objective():
    state = random_state(dtype=torch.float64)
    grad = fastdal.labeled_grad(state.model, state.loader(state.labeled, with_labels=True))
    features = fastdal.features(state.model, state.loader(state.pool))
    expected = state.pool[fastdal.select(features, 5, method="greedy", labeled_grad=grad)]
    assert torch.equal(make_strategy("dynamic-greedy").select(state, 5), expected)


# --------------------------------------------------------------------------------------------------
# ALBL
# --------------------------------------------------------------------------------------------------


def test_exp3_probabilities_by_hand():
    # (1 - 3/6) * [1/4, 1/4, 1/2] + 1/6 = [7/24, 7/24, 10/24]
    p = exp3_probabilities(torch.tensor([1.0, 1.0, 2.0]), 1 / 6)
    assert torch.allclose(p, torch.tensor([7 / 24, 7 / 24, 10 / 24], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(exp3_probabilities(torch.tensor([5.0, 0.0]), 0.5), torch.full((2,), 0.5, dtype=torch.float64))


def test_exp3_update_by_hand():
    w = exp3_update(torch.tensor([1.0, 2.0, 3.0]), arm=1, reward=0.6, probability=0.25, eta=0.1)
    assert w.tolist() == pytest.approx([1.0, 2.0 * math.exp(0.1 * 0.6 / 0.25), 3.0], rel=1e-15)


def test_importance_weighted_accuracy_by_hand():
    # weights 1/p = [2, 2, 4, 4]; correct [1, 0, 1, 1]: (2 + 4 + 4) / 12
    correct = torch.tensor([True, False, True, True])
    assert importance_weighted_accuracy(correct, torch.tensor([0.5, 0.5, 0.25, 0.25])) == pytest.approx(5 / 6)
    assert importance_weighted_accuracy(torch.zeros(0, dtype=torch.bool), torch.zeros(0)) == 0.0


def test_draw_arm_inverts_the_cumulative_probabilities():
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert [draw_arm(p, u) for u in (0.0, 0.19, 0.2, 0.49, 0.5, 0.999)] == [0, 0, 1, 1, 2, 2]
    assert draw_arm(torch.tensor([0.0, 1.0]), 0.0) == 1  # an arm of probability 0 is never drawn


def test_albl_defaults_and_checks():
    albl = ALBL()
    assert [a.name for a in albl.arms] == ["random", "conf", "margin", "entropy", "coreset"]
    assert albl.pmin == pytest.approx(0.1) and albl.eta == pytest.approx(0.1)
    assert torch.allclose(albl.probabilities, torch.full((5,), 0.2, dtype=torch.float64))
    with pytest.raises(ValueError, match="pmin"):
        ALBL(pmin=0.3)
    with pytest.raises(ValueError, match="at least one arm"):
        ALBL(arms=[])
    with pytest.raises(RuntimeError, match="without a select"):
        albl.update(random_state(), torch.zeros(0, dtype=torch.long))


class Lowest(Strategy):
    name = "lowest"

    def select(self, state, b):
        return state.pool[:b]


class Highest(Strategy):
    name = "highest"

    def select(self, state, b):
        return state.pool[len(state.pool) - b :].flip(0)


def test_albl_rounds_with_stub_arms_by_hand():
    """Logits equal the inputs, every input predicts class 0, so a queried sample is correct iff its label is 0."""
    n = 16
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0]]).repeat(n, 1)
    y = torch.tensor([0, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0])
    albl = ALBL(arms=[Lowest(), Highest()], pmin=0.2, eta=0.3)
    labeled = [0, 1]
    twin = torch.Generator().manual_seed(4)
    weights = [0.5, 0.5]
    queried_all, inverse_p = [], []
    for r in range(3):
        state = round_state(model, x, y, labeled, round=r)
        state.generator.set_state(twin.get_state())  # the twin replays ALBL's draw
        # By hand: p = (1 - 2 * 0.2) * w / sum(w) + 0.2, one uniform draw, the arm whose slot holds it.
        p = [0.6 * w / sum(weights) + 0.2 for w in weights]
        u = torch.rand((), generator=twin, dtype=torch.float64).item()
        arm = 0 if u < p[0] else 1
        queried = albl.select(state, 3)
        pool = state.pool.tolist()
        assert queried.tolist() == (pool[:3] if arm == 0 else pool[-3:][::-1])
        assert albl.history[-1].arm == arm and albl.history[-1].round == r
        assert albl.history[-1].probabilities.tolist() == pytest.approx(p, rel=1e-12)
        labeled = labeled + queried.tolist()
        queried_all += queried.tolist()
        inverse_p += [1 / p[arm]] * 3
        albl.update(round_state(model, x, y, labeled, round=r), queried)
        reward = sum(w for i, w in zip(queried_all, inverse_p) if y[i] == 0) / sum(inverse_p)
        assert albl.history[-1].reward == pytest.approx(reward, rel=1e-12)
        weights[arm] *= math.exp(0.3 * reward / p[arm])
        assert albl.weights.tolist() == pytest.approx([w / sum(weights) for w in weights], rel=1e-12)
    assert [h.arm for h in albl.history] == [0, 1, 0]  # seed 4 draws u = 0.48, 0.73, 0.06: both arms are tried
    with pytest.raises(RuntimeError, match="without a select"):
        albl.update(state, queried)
    albl.select(round_state(model, x, y, labeled), 1)
    with pytest.raises(RuntimeError, match="must be called after each select"):
        albl.select(round_state(model, x, y, labeled), 1)
