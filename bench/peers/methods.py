"""Every way of computing the pool's scores that the benchmark compares, plus the two baselines.

A method is prepared once per workload (``prepare(setup) -> run``), outside the timing: wrapping a model
with BackPACK or Opacus, or building a ``torch.func`` transform, is a one-off cost of its users too. ``run()``
reads ``setup.pool`` when called (memory.py warms up on a smaller pool than it measures), and computes
the whole pool's components, ``||g_u||^2`` and ``<g_u, G>``, the way that library's users would
write it, and returns them as float32 ``(N,)`` tensors (``dot`` is None for a norm-only method, ``None``
altogether for a baseline). A method that cannot run a workload raises; the runner records the reason.

Every method sees the same model (eval mode), the same pool batches and the same ``G`` (fastdal's
``labeled_grad``), and computes ``g_u`` at its own argmax label over the parameters ``G`` covers.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from workloads import WORKLOADS, Workload

import fastdal

# Bound on a torch.func chunk's per-sample gradients (chunk x parameters x 4 bytes): torch.func materializes
# them, so the pool goes through in chunks of this many bytes at most.
FUNC_CHUNK_BYTES = 256 * 2**20


@dataclass
class Setup:
    """What every method of one workload shares."""

    model: nn.Module  # eval mode
    pool: list[Tensor]  # the pool's input batches
    pool_labels: list[Tensor]  # random labels for the training step only
    G: dict[str, Tensor]  # parameter name -> summed labeled gradient (fastdal.labeled_grad)
    labeled_grad: fastdal.LabeledGrad

    @property
    def names(self) -> list[str]:
        return list(self.G)


def workload(name: str, quick: bool = False, batches: int | None = None) -> Workload:
    """The named workload; ``quick`` shrinks its pool to one batch of at most 4 (a smoke run), ``batches``
    sets the number of pool batches."""
    w = WORKLOADS[name]
    if quick:
        w = dataclasses.replace(w, batch=min(w.batch, 4), batches=1)
    return w if batches is None else dataclasses.replace(w, batches=batches)


def build_setup(name: str, quick: bool = False, batches: int | None = None) -> Setup:
    """The workload's model, pool and G (``fastdal.labeled_grad`` over what the workload scores)."""
    w = workload(name, quick, batches)
    model, pool, labeled = w.make()
    labeled_grad = fastdal.labeled_grad(model, labeled, layers=w.layers)
    g = torch.Generator().manual_seed(3)
    labels = [torch.randint(0, w.num_classes, (x.shape[0],), generator=g) for x in pool]
    return Setup(model, pool, labels, dict(labeled_grad.grads), labeled_grad)


@dataclass
class Scores:
    sq_norm: Tensor | None
    dot: Tensor | None


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "baseline", "fastdal", "score" (full score: sq_norm and dot) or "norm" (sq_norm only)
    prepare: Callable[[Setup], Callable[[], Scores]]


def _covered_only(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of the model whose only trainable parameters are the ones the score covers."""
    work = copy.deepcopy(model)
    for name, p in work.named_parameters():
        p.requires_grad_(name in names)
    return work


def _dot_with_g(per_sample: Tensor, g: Tensor) -> Tensor:
    """per_sample: (B, *shape), g: shape -> (B,) inner products."""
    return per_sample.reshape(per_sample.shape[0], -1) @ g.reshape(-1)


def _sq(per_sample: Tensor) -> Tensor:
    return per_sample.reshape(per_sample.shape[0], -1).square().sum(1)


# ---- baselines ------------------------------------------------------------------------------------------


def train_step(s: Setup) -> Callable[[], Scores]:
    """One SGD training step over the pool (forward, cross-entropy, backward, step), on a train-mode copy."""
    work = copy.deepcopy(s.model).train()
    optimizer = torch.optim.SGD(work.parameters(), lr=1e-4)

    def run() -> Scores:
        for x, y in zip(s.pool, s.pool_labels):
            optimizer.zero_grad()
            F.cross_entropy(work(x), y).backward()
            optimizer.step()
        optimizer.zero_grad()  # frees .grad, so that every call (and its memory) starts from the same state
        return Scores(None, None)

    return run


def forward(s: Setup) -> Callable[[], Scores]:
    """A plain no-grad forward over the pool: the floor of any score that needs the logits."""

    def run() -> Scores:
        with torch.no_grad():
            for x in s.pool:
                s.model(x)
        return Scores(None, None)

    return run


# ---- fastdal --------------------------------------------------------------------------------------------


def fastdal_score(s: Setup) -> Callable[[], Scores]:
    def run() -> Scores:
        loader = [(x,) for x in s.pool]  # a list of batches is a loader that visits the pool in order
        result = fastdal.score(s.model, loader, s.labeled_grad, return_components=True)
        return Scores(result.sq_norm, result.dot)

    return run


# ---- peers ----------------------------------------------------------------------------------------------


def naive_loop(s: Setup) -> Callable[[], Scores]:
    """One forward and one backward per sample (a batch of one), gradient flattened, norm and dot from it."""
    params = dict(s.model.named_parameters())
    covered = [params[n] for n in s.names]
    flat_g = torch.cat([s.G[n].reshape(-1) for n in s.names])

    def run() -> Scores:
        sq, dot = [], []
        for x in s.pool:
            for i in range(x.shape[0]):
                logits = s.model(x[i : i + 1])
                loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")
                g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, covered)])
                sq.append(g @ g)
                dot.append(g @ flat_g)
        return Scores(torch.stack(sq), torch.stack(dot))

    return run


def torch_func(s: Setup) -> Callable[[], Scores]:
    """``vmap(grad(loss))`` over ``functional_call``: per-sample gradients of a chunk of samples at once."""
    from torch.func import functional_call, grad, vmap

    trainable = {n: p.detach() for n, p in s.model.named_parameters() if n in s.G}
    fixed = {n: p.detach() for n, p in s.model.named_parameters() if n not in s.G}
    buffers = dict(s.model.named_buffers())

    def sample_loss(params: dict[str, Tensor], x: Tensor) -> Tensor:
        logits = functional_call(s.model, (params, fixed, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits, logits.argmax(1), reduction="sum")

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0))
    n_params = sum(p.numel() for p in trainable.values())
    chunk = max(1, FUNC_CHUNK_BYTES // (4 * n_params))

    def run() -> Scores:
        sq, dot = [], []
        for x in s.pool:
            for part in x.split(chunk):
                grads = per_sample(trainable, part)
                sq.append(sum(_sq(g) for g in grads.values()))
                dot.append(sum(_dot_with_g(grads[n], s.G[n]) for n in grads))
                del grads
        return Scores(torch.cat(sq), torch.cat(dot))

    return run


def backpack_batch_grad(s: Setup) -> Callable[[], Scores]:
    """BackPACK ``BatchGrad`` + ``BatchL2Grad`` on a mean-reduced loss, as the paper's code uses them.

    With the mean over the B samples of a batch, ``grad_batch * B`` is the per-sample gradient and
    ``batch_l2 * B**2`` its squared norm; the dot is the flattened per-sample gradient times G.
    """
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, BatchL2Grad

    work = extend(_covered_only(s.model, s.names).eval())
    loss_fn = extend(nn.CrossEntropyLoss())  # reduction="mean"
    params = dict(work.named_parameters())
    covered = [(params[n], s.G[n]) for n in s.names]
    owner = {id(p): type(m).__name__ for m in work.modules() for p in m.parameters(recurse=False)}

    def run() -> Scores:
        sq, dot = [], []
        for x in s.pool:
            logits = work(x)
            b = x.shape[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no extension for <container module>": containers have none
                with backpack(BatchGrad(), BatchL2Grad()):
                    loss_fn(logits, logits.argmax(1)).backward()
            missing = sorted({owner[id(p)] for p, _ in covered if not hasattr(p, "grad_batch")})
            if missing:
                raise NotImplementedError(f"BackPACK has no BatchGrad/BatchL2Grad extension for {', '.join(missing)}")
            sq.append(sum(p.batch_l2 for p, _ in covered) * b**2)
            dot.append(sum(_dot_with_g(p.grad_batch * b, g) for p, g in covered))
            for p, _ in covered:  # what BackPACK leaves on the parameters would otherwise outlive the call
                del p.grad_batch, p.batch_l2
                p.grad = None
        return Scores(torch.cat(sq), torch.cat(dot))

    return run


def _opacus_ready(
    model: nn.Module, names: list[str], probe: Tensor
) -> tuple[nn.Module, dict[str, str | tuple[str, int]]]:
    """A train-mode copy for Opacus, with nn.MultiheadAttention swapped for Opacus's DPMultiheadAttention.

    Opacus's hooks record activations only in train mode; the workloads Opacus can run have no BatchNorm and
    no dropout, so train mode computes the same function. ``nn.MultiheadAttention`` is replaced by Opacus's
    own fixer (``ModuleValidator.fix`` does the same), which keeps the weights but splits ``in_proj`` into
    q/k/v Linears; G is split the same way. BatchNorm is left in place (Opacus's fixer would replace it with
    GroupNorm, another model), so Opacus refuses it. A copy whose logits on ``probe`` differ from the
    model's gets a warning (the runner records it): its per-sample gradients are those of another model.
    """
    from opacus.validators.multihead_attention import fix

    work = _covered_only(model, names)
    # name in the copy -> name in G, or (name in G, which third of it) for the q/k/v pieces of in_proj
    name_map: dict[str, str | tuple[str, int]] = {n: n for n in names}
    for prefix, module in list(work.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            parent_name, _, child = prefix.rpartition(".")
            setattr(work.get_submodule(parent_name), child, fix(module))
            for kind in ("weight", "bias"):
                original = f"{prefix}.in_proj_{kind}"
                if name_map.pop(original, None) is not None:
                    for i, part in enumerate("qkv"):
                        name_map[f"{prefix}.{part}linear.{kind}"] = (original, i)
    work.train()
    with torch.no_grad():
        expected = model(probe)
        difference = (work(probe) - expected).abs().max().item() / expected.abs().max().item()
    if difference > 1e-4:
        warnings.warn(
            f"the Opacus-ready copy computes another function than the model: max |logit difference| / "
            f"max |logit| = {difference:.2g}",
            stacklevel=2,
        )
    return work, name_map


def _g_for(G: dict[str, Tensor], name_map: dict[str, str | tuple[str, int]], names: list[str]) -> dict[str, Tensor]:
    """G under the names of the Opacus-ready copy's parameters."""
    out = {}
    for n in names:
        target = name_map[n]
        out[n] = G[target[0]].chunk(3, dim=0)[target[1]] if isinstance(target, tuple) else G[target]
    return out


def _opacus_wrap(cls: type, work: nn.Module, **kwargs: object) -> nn.Module:
    """``cls(work, loss_reduction="sum")``, with Opacus's list of refused layers summed up in one line."""
    try:
        return cls(work, loss_reduction="sum", **kwargs)
    except NotImplementedError as err:
        errors = err.args[0] if err.args and isinstance(err.args[0], list) else [err]
        more = f" (and {len(errors) - 1} more layers)" if len(errors) > 1 else ""
        raise NotImplementedError(f"Opacus refuses {str(errors[0]).strip()}{more}") from err


def opacus_grad_sample(s: Setup) -> Callable[[], Scores]:
    """Opacus ``GradSampleModule``: per-sample gradients in ``p.grad_sample`` after one backward (sum loss)."""
    from opacus import GradSampleModule

    work, name_map = _opacus_ready(s.model, s.names, s.pool[0][:8])
    gsm = _opacus_wrap(GradSampleModule, work)
    params = [(n, p) for n, p in work.named_parameters() if p.requires_grad]
    G = _g_for(s.G, name_map, [n for n, _ in params])

    def run() -> Scores:
        sq, dot = [], []
        for x in s.pool:
            logits = gsm(x)
            F.cross_entropy(logits, logits.argmax(1), reduction="sum").backward()
            sq.append(sum(_sq(p.grad_sample) for _, p in params))
            dot.append(sum(_dot_with_g(p.grad_sample, G[n]) for n, p in params))
            gsm.zero_grad(set_to_none=True)  # drops grad_sample and .grad
        return Scores(torch.cat(sq), torch.cat(dot))

    return run


def opacus_ghost_norms(s: Setup) -> Callable[[], Scores]:
    """Opacus ghost clipping's first pass: per-sample gradient norms only (no dot, so not the score).

    ``GradSampleModuleFastGradientClipping`` computes Linear and Embedding norms without per-sample gradients
    (ghost norm); other layers (Conv, LayerNorm, attention's pieces) get per-sample gradients one layer at a
    time, reduced to norms at once. The second, clipped backward of DP training is not part of it.
    """
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    work, _ = _opacus_ready(s.model, s.names, s.pool[0][:8])
    gsm = _opacus_wrap(GradSampleModuleFastGradientClipping, work, use_ghost_clipping=True)

    def run() -> Scores:
        sq = []
        for x in s.pool:
            logits = gsm(x)
            F.cross_entropy(logits, logits.argmax(1), reduction="sum").backward()
            sq.append(gsm.get_norm_sample().square())
            gsm.zero_grad(set_to_none=True)
        return Scores(torch.cat(sq), None)

    return run


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("train step", "baseline", train_step),
        Method("no-grad forward", "baseline", forward),
        Method("fastdal", "fastdal", fastdal_score),
        Method("naive loop", "score", naive_loop),
        Method("torch.func", "score", torch_func),
        Method("BackPACK", "score", backpack_batch_grad),
        Method("Opacus", "score", opacus_grad_sample),
        Method("Opacus ghost (norm only)", "norm", opacus_ghost_norms),
    ]
}
