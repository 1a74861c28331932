"""Exact per-sample gradient terms for modules with no closed form, by vectorizing their VJP.

For one recorded call of module ``m`` with inputs ``x`` and output gradient ``delta``, the gradient of
sample ``i`` is ``d/dtheta <m(x_i; theta), delta_i>``: ``torch.func.grad`` of that scalar, mapped over
samples with ``torch.func.vmap``. Samples are processed in chunks so that a chunk's per-sample
gradients stay under :data:`fastdal.torch_ops.CHUNK_ELEMENTS`. If ``vmap`` cannot map the module (an
operator without a batching rule, data-dependent control flow), the module runs one sample at a time through
plain autograd instead, with a warning naming it (never the ``torch.func`` transform that just failed).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .capture import Call, Target
from .torch_ops import chunks, sq_and_dot


def readable(target: Target, call: Call, batch_size: int) -> bool:
    """Every output that carries a gradient holds the samples in one dimension, and no input mixes them."""
    outputs_ok = all(isinstance(d, int) for o, d in zip(call.outputs, call.out_dims) if o.requires_grad)
    return outputs_ok and all(d is None or isinstance(d, int) for d in call.in_dims)


def _per_sample_gradients(
    module: nn.Module, name: str, params: dict[str, Tensor], call: Call, samples: slice, batch_size: int
) -> dict[str, Tensor]:
    """Per-sample gradients ``{local name: (b, *shape)}`` of one call, for the samples in ``samples``."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    input_dims = iter(call.in_dims)  # one per tensor leaf, in leaf order
    batched = []  # (leaf index, sample dim, chunk of the tensor)
    for i, leaf in enumerate(leaves):
        dim = next(input_dims) if isinstance(leaf, Tensor) else None
        if dim is not None:
            batched.append((i, dim, leaf.detach().narrow(dim, samples.start, samples.stop - samples.start)))
    outs = []  # (output index, sample dim, chunk of its gradient)
    for j, (d, dim) in enumerate(zip(call.deltas or [], call.out_dims)):
        if d is not None:
            outs.append((j, dim, d.narrow(dim, samples.start, samples.stop - samples.start)))
    if not outs:
        return {k: v.new_zeros((samples.stop - samples.start, *v.shape)) for k, v in params.items()}

    def sample_loss(p: dict[str, Tensor], xs: list[Tensor], ds: list[Tensor]) -> Tensor:
        # One sample: put back a batch dimension of size 1 where each tensor had its sample dimension.
        args = list(leaves)
        for (i, dim, _), x in zip(batched, xs):
            args[i] = x.unsqueeze(dim)
        call_args, call_kwargs = tree_unflatten(args, spec)
        out = functional_call(module, p, call_args, call_kwargs)
        flat_out = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        return sum((flat_out[j] * d.unsqueeze(dim)).sum() for (j, dim, _), d in zip(outs, ds))

    xs = [x for _, _, x in batched]
    ds = [d for _, _, d in outs]
    in_dims = (None, [dim for _, dim, _ in batched], [dim for _, dim, _ in outs])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*There is a performance drop.*")
        try:
            return vmap(grad(sample_loss), in_dims=in_dims)(params, xs, ds)
        except (RuntimeError, NotImplementedError, ValueError) as err:
            warnings.warn(
                f"fastdal: torch.func.vmap could not map module {name or '<model>'!r} ({type(module).__name__}: "
                f"{str(err).splitlines()[0][:200]}); its per-sample gradients come from a per-sample loop of the "
                "module's own autograd (exact, slow)",
                stacklevel=4,
            )
    return _looped(module, params, leaves, spec, batched, outs, samples)


def _looped(module: nn.Module, params: dict[str, Tensor], leaves: list, spec, batched, outs, samples: slice):
    """Per-sample gradients by running the module on one sample at a time with plain autograd."""
    live = {local: module.get_parameter(local) for local in params}
    rows = []
    for k in range(samples.stop - samples.start):
        args = list(leaves)
        for i, dim, chunk in batched:
            args[i] = chunk.narrow(dim, k, 1)
        call_args, call_kwargs = tree_unflatten(args, spec)
        with torch.enable_grad():
            out = module(*call_args, **call_kwargs)
            flat_out = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
            loss = sum((flat_out[j] * d.narrow(dim, k, 1)).sum() for j, dim, d in outs)
            found = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
        rows.append({local: torch.zeros_like(live[local]) if g is None else g for local, g in zip(live, found)})
    return {local: torch.stack([r[local] for r in rows]) for local in params}


def per_sample_gradients(
    target: Target, calls: list[Call], samples: slice, batch_size: int
) -> dict[str, Tensor] | None:
    """Per-sample gradients ``{local name: (b, *shape)}`` of the samples in ``samples``, summed over
    calls; None when no call's output got a gradient."""
    module = target.module
    params = {local: module.get_parameter(local).detach() for local in target.params}
    total: dict[str, Tensor] | None = None
    with torch.no_grad():
        for call in calls:
            g = _per_sample_gradients(module, target.name, params, call, samples, batch_size)
            total = g if total is None else {k: total[k] + g[k] for k in total}
    return total


def generic_terms(
    target: Target,
    calls: list[Call],
    grads: dict[str, Tensor],
    batch_size: int,
    dtype: torch.dtype,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``||g||^2`` and ``<g, G>`` over ``target.params``, summing each sample's gradient over calls."""
    params = [target.module.get_parameter(local) for local in target.params]
    size = sum(p.numel() for p in params)
    sq = torch.zeros(batch_size, dtype=dtype, device=params[0].device)
    dot = torch.zeros_like(sq)
    for samples in chunks(batch_size, size):
        total = per_sample_gradients(target, calls, samples, batch_size)
        for local, g in (total or {}).items():
            s, d = sq_and_dot(g.to(dtype), grads[local])
            sq[samples] += s
            dot[samples] += d
    return sq, dot
