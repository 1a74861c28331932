"""Hypothesis strategies for tiny random float64 classifiers, with their pool and labeled loaders.

A drawn :class:`Spec` is plain data. The model's layers are Python expressions (``"nn.Conv2d(2, 4, 3)"``)
evaluated in this module's namespace, so the falsifying example Hypothesis prints is also its
reproduction: ``build(Spec(...))`` gives the same model, loaders and ``inputs=`` function on any machine.

Every model is ``FuzzNet``: ``logits = post(pool(head(trunk(x))))``, with an optional side branch
``side(h)`` called on the head's input *after* the head, whose output never reaches the logits. The
head is always the module named ``head``: that is the structural truth fastdal's ``layers="last"``
must find. The trunk starts from one of five input layouts and changes layout as it goes:

* ``vec``: (B, D) vectors; ``seq``: (B, T, D) sequences; ``c1``: (B, C, L); ``c2``: (B, C, H, W);
* ``tokens``: (B, T) integer ids, embedded into ``seq``;
* with ``seq_first``, the loader's batches still hold samples along dim 0, but the model is called
  through ``inputs=seq_first_inputs`` on ``x.transpose(0, 1)``, a (T, B, ...) tensor.

Sizes are chosen so that the cases fastdal must get right by structure, not by size, come up often:
a sequence length T equal to the pool's batch size (or to its last batch's size), last batches of a
single sample, and batches above fastdal's CPU micro-batch of 32 samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# --------------------------------------------------------------------------------------------------
# Building blocks the layer expressions refer to (parameter-free wrappers, so the parameters stay
# with the closed-form modules inside them, except Affine, which owns two scalars on purpose)
# --------------------------------------------------------------------------------------------------


class SeqFirst(nn.Module):
    """Runs ``inner`` on a batch-first (B, T, D) tensor as sequence-first (T, B, D), and back."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.transpose(0, 1)).transpose(0, 1)


class ChannelsFirst(nn.Module):
    """Runs ``inner`` (a BatchNorm1d or GroupNorm over D) on (B, T, D) as (B, D, T), and back."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.transpose(1, 2)).transpose(1, 2)


class Residual(nn.Module):
    """``inner(x) + x``; with ``inplace``, added into inner's output (as ResNet blocks do: ``out += x``)."""

    def __init__(self, inner: nn.Module, inplace: bool = False):
        super().__init__()
        self.inner, self.inplace = inner, inplace

    def forward(self, x):
        return self.inner(x).add_(x) if self.inplace else self.inner(x) + x


class AddPositions(nn.Module):
    """A position table looked up with ``arange(T)`` (no sample dimension) and broadcast over the batch."""

    def __init__(self, table: nn.Embedding, seq_dim: int = 1):
        super().__init__()
        self.table, self.seq_dim = table, seq_dim

    def forward(self, x):
        positions = self.table(torch.arange(x.shape[self.seq_dim], device=x.device))  # (T, D)
        return x + (positions if self.seq_dim == 1 else positions[:, None])


class Transpose(nn.Module):
    def __init__(self, a: int, b: int):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return x.transpose(self.a, self.b)


class MeanOver(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.mean(self.dims)


class MaxOver(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.amax(self.dim)


class First(nn.Module):
    """The first position of a (B, T, D) sequence (a CLS-token readout)."""

    def forward(self, x):
        return x[:, 0]


class Scale(nn.Module):
    """``z * factor + shift`` with constants: an elementwise op after the head."""

    def __init__(self, factor: float, shift: float = 0.0):
        super().__init__()
        self.factor, self.shift = factor, shift

    def forward(self, z):
        return z * self.factor + self.shift


class InplaceScale(nn.Module):
    """Scales the head's output in place, so it is no longer the value the head returned."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, z):
        return z.mul_(self.factor)


class Affine(nn.Module):
    """``z * t + c`` with a learned temperature ``t`` and shift ``c`` (scalars: no closed form)."""

    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.ones(()))
        self.c = nn.Parameter(torch.zeros(()))

    def forward(self, z):
        return z * self.t + self.c


class LayerScale(nn.Module):
    """``gamma * x`` with a bare parameter over a sample's channels (ConvNeXt's layer scale), broadcast over the
    rest; ``channel_dim`` is the channels' dimension within a sample; ``how`` picks the operation's form."""

    def __init__(self, channels: int, channel_dim: int = -1, how: str = "mul"):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.channel_dim, self.how = channel_dim, how

    def forward(self, x):
        shape = [1] * x.dim()
        shape[self.channel_dim if self.channel_dim < 0 else self.channel_dim + 1] = -1
        gamma = self.gamma.view(shape)
        if self.how == "inplace":
            return x.clone().mul_(gamma)
        if self.how == "div":
            return x / (gamma.abs() + 0.5)
        return gamma * x


class Shift(nn.Module):
    """``x + b`` (or ``x - b``) with a bare parameter of the shape of a sample's last dimensions: a bias, or a
    position table broadcast over the batch."""

    def __init__(self, shape: tuple[int, ...], subtract: bool = False):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(shape))
        self.subtract = subtract

    def forward(self, x):
        return x - self.b if self.subtract else x + self.b


class ClassToken(nn.Module):
    """ViT's class token: a bare (1, 1, D) parameter expanded along the batch and put before the positions."""

    def __init__(self, d: int):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, d))

    def forward(self, x):
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)


class RowsLinear(nn.Module):
    """Hugging Face's ``Conv1D``: ``addmm`` on the samples and positions flattened into rows, weight (in, out)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class RecurrentOut(nn.Module):
    """A recurrent layer's output sequence (its final states dropped): (B, T, D * H) batch-first, or (T, B, ...)
    inside SeqFirst."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


class FuzzNet(nn.Module):
    def __init__(self, trunk: nn.Module, head: nn.Linear, pool: nn.Module, post: nn.Module, side: nn.Module | None):
        super().__init__()
        self.trunk, self.head, self.pool, self.post, self.side = trunk, head, pool, post, side

    def forward(self, x):
        h = self.trunk(x)
        logits = self.post(self.pool(self.head(h)))
        if self.side is not None:
            self.side(h)  # called after the head; its output is dropped, its gradient is zero
        return logits


def seq_first_inputs(batch):
    """``inputs=`` of the sequence-first examples: the model gets (T, B, ...), the loader holds (B, T, ...)."""
    return batch[0].transpose(0, 1)


# --------------------------------------------------------------------------------------------------
# Specs and building them
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One drawn example: everything ``build`` needs, as plain data (its repr reproduces it)."""

    layout: str  # of the input: "vec", "seq", "c1", "c2" or "tokens"
    input_shape: tuple[int, ...]  # one sample, as the dataset stores it (batch-first)
    vocab: int | None  # integer ids in [0, vocab) instead of float inputs
    seq_first: bool  # the model is called on x.transpose(0, 1) through inputs=seq_first_inputs
    trunk: tuple[str, ...]  # layer expressions, applied in order
    head: str
    pool: str  # after the head: "nn.Identity()", or "MeanOver(1)" for a head run over positions
    post: str  # elementwise op on the logits
    side: str | None
    classes: int
    pool_size: int
    pool_batch: int
    labeled_size: int
    labeled_batch: int
    int32_labels: bool
    seed: int

    def tags(self) -> list[str]:
        """Coarse features of the example, counted in the fuzz summary to show what was covered."""
        text = " ".join((*self.trunk, self.head, self.pool, self.post, self.side or ""))
        seq_len = self.input_shape[0] if self.layout in ("seq", "tokens") else None
        found = [f"input {self.layout}"]
        found += [name for name in _TAGGED if name in text]
        found += ["inputs=seq_first"] * self.seq_first + ["int32 labels"] * self.int32_labels
        found += ["side branch"] * (self.side is not None) + ["head over positions"] * (self.pool != "nn.Identity()")
        found += ["T == pool batch"] * (seq_len == self.pool_batch)
        found += ["last batch of 1"] * (self.pool_size % self.pool_batch == 1 or self.pool_batch == 1)
        found += ["batch > 32"] * (self.pool_batch > 32)
        found += ["T > 32"] * (seq_len is not None and seq_len > 32)
        return found


_TAGGED = (
    "nn.Linear",
    "nn.Conv1d",
    "nn.Conv2d",
    "nn.BatchNorm1d",
    "nn.BatchNorm2d",
    "nn.LayerNorm",
    "nn.RMSNorm",
    "nn.GroupNorm",
    "nn.Embedding",
    "padding_idx",
    "TransformerEncoderLayer",
    "SeqFirst",
    "AddPositions",
    "Residual",
    "Pool",
    "Affine",
    "InplaceScale",
    "Scale(",
    "LogSoftmax",
    "LayerScale",
    "Shift",
    "ClassToken",
    "RowsLinear",
    "EmbeddingBag",
    "nn.LSTM",
    "nn.GRU",
    "nn.RNN",
)


@dataclass
class Example:
    spec: Spec
    model: nn.Module
    pool: DataLoader
    labeled: DataLoader
    inputs: object  # the inputs= function, or None


def build(spec: Spec) -> Example:
    """The model (float64, eval mode, parameters drawn from ``spec.seed``) and its loaders."""
    namespace = {"nn": nn, "torch": torch, **{k: v for k, v in globals().items() if isinstance(v, type)}}
    make = lambda expr: eval(expr, namespace)  # noqa: E731
    model = FuzzNet(
        nn.Sequential(*(make(e) for e in spec.trunk)),
        make(spec.head),
        make(spec.pool),
        make(spec.post),
        None if spec.side is None else make(spec.side),
    )
    generator = torch.Generator().manual_seed(spec.seed)
    model = _randomize(model.double(), generator).eval()

    def draw_inputs(n: int) -> torch.Tensor:
        if spec.vocab is not None:
            return torch.randint(0, spec.vocab, (n, *spec.input_shape), generator=generator)
        return torch.randn(n, *spec.input_shape, generator=generator, dtype=torch.float64)

    x_pool, x_labeled = draw_inputs(spec.pool_size), draw_inputs(spec.labeled_size)
    y = torch.randint(0, spec.classes, (spec.labeled_size,), generator=generator)
    y = y.to(torch.int32) if spec.int32_labels else y
    return Example(
        spec,
        model,
        DataLoader(TensorDataset(x_pool), batch_size=spec.pool_batch, shuffle=False),
        DataLoader(TensorDataset(x_labeled, y), batch_size=spec.labeled_batch, shuffle=False),
        seq_first_inputs if spec.seq_first else None,
    )


_AFFINE_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


@torch.no_grad()
def _randomize(model: nn.Module, g: torch.Generator) -> nn.Module:
    """Seeded parameters: unit-scale weights, norm scales in [0.5, 1.5], and BatchNorm running
    statistics far from (0, 1), so that eval-mode BatchNorm is not close to the identity."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, _AFFINE_NORMS) and name == "weight":
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
            elif isinstance(module, Affine) and name == "t":
                p.copy_(0.5 + torch.rand((), generator=g, dtype=p.dtype))
            elif p.dim() >= 2 and not isinstance(module, nn.Embedding):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(p[0].numel()))
            else:
                p.copy_((0.5 if p.dim() < 2 else 1.0) * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=g, dtype=torch.float64) - 0.5)
            module.running_var.copy_(0.5 + 1.5 * torch.rand(module.running_var.shape, generator=g, dtype=torch.float64))
    return model


# --------------------------------------------------------------------------------------------------
# Strategies. Earlier choices are simpler: Hypothesis shrinks towards them.
# --------------------------------------------------------------------------------------------------

WIDTH = st.integers(1, 8)
ACTIVATIONS = ("nn.ReLU()", "nn.Tanh()", "nn.GELU()", "nn.Dropout(0.25)")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _after_linear(draw, expr: str) -> list[str]:
    """A Linear/Conv, sometimes followed by an activation (an in-place ReLU is safe only here: nothing
    saved for backward is overwritten)."""
    act = draw(st.sampled_from(("", *ACTIVATIONS, "nn.ReLU(inplace=True)")))
    return [expr] + ([act] if act else [])


def _inplace(draw) -> str:
    """Residual's in-place flag, for a bare Linear/Conv only (whose backward does not need its output)."""
    return ", inplace=True" if draw(st.booleans()) else ""


def _linear(draw, d_in: int) -> tuple[str, int]:
    d_out = draw(WIDTH)
    bias = draw(st.booleans())
    return f"nn.Linear({d_in}, {d_out}{'' if bias else ', bias=False'})", d_out


def _trailing_norm(draw, shape: tuple[int, ...]) -> str:
    """LayerNorm or RMSNorm over the last one or more dimensions of a sample."""
    n = draw(st.integers(1, len(shape)))
    normalized = shape[-n:]
    arg = str(normalized[0]) if n == 1 and draw(st.booleans()) else str(tuple(normalized))
    if draw(st.booleans()):
        extra = draw(st.sampled_from(("", ", elementwise_affine=False", ", bias=False")))
        return f"nn.LayerNorm({arg}{extra})"
    extra = draw(st.sampled_from(("", ", elementwise_affine=False")))
    return f"nn.RMSNorm({arg}{extra})"


def _group_norm(draw, channels: int, shape: tuple[int, ...]) -> str:
    """GroupNorm over ``channels``; F.group_norm refuses (even in eval mode) a group of a single value
    per sample, so each group must hold at least two of the sample's values."""
    allowed = [g for g in _divisors(channels) if math.prod(shape) // g >= 2]
    if not allowed:
        return "nn.Tanh()"
    groups = draw(st.sampled_from(allowed))
    affine = draw(st.booleans()) or draw(st.booleans())
    return f"nn.GroupNorm({groups}, {channels}{'' if affine else ', affine=False'})"


def _transformer(draw, d: int, batch_first: bool) -> str:
    heads = draw(st.sampled_from(_divisors(d)))
    ff = draw(WIDTH)
    options = f"dim_feedforward={ff}"
    if draw(st.booleans()):
        options += ", activation='gelu'"
    if draw(st.booleans()):
        options += ", norm_first=True"
    if batch_first:
        options += ", batch_first=True"
    return f"nn.TransformerEncoderLayer({d}, {heads}, {options})"


def _conv(draw, dims: int, channels: int, spatial: tuple[int, ...], same_shape: bool = False) -> tuple[str, int, tuple]:
    """A legal Conv1d/Conv2d on (channels, *spatial): stride, padding (int or 'same'), padding mode,
    dilation, groups. Returns (expression, out channels, out spatial shape)."""
    out = channels if same_shape else draw(st.integers(1, 6))
    groups = draw(st.sampled_from(_divisors(math.gcd(channels, out))))
    kernel, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    stride = 1 if same_shape else draw(st.integers(1, 2))
    smallest = min(spatial)
    if same_shape or (stride == 1 and draw(st.booleans())):
        padding = "'same'"
        total = dilation * (kernel - 1)
        per_side = total - total // 2  # PyTorch pads the extra element on the right
    else:
        per_side = draw(st.integers(0, 2))
        padding = str(per_side)
        if dilation * (kernel - 1) + 1 > smallest + 2 * per_side:  # the kernel must fit the padded input
            dilation, kernel = 1, min(kernel, smallest + 2 * per_side)
    mode = draw(st.sampled_from(("zeros", "reflect", "replicate", "circular")))
    if (mode == "reflect" and per_side >= smallest) or (mode == "circular" and per_side > smallest):
        mode = "zeros"  # reflect needs padding < size, circular padding <= size
    bias = draw(st.booleans())
    cls = "nn.Conv1d" if dims == 1 else "nn.Conv2d"
    expr = (
        f"{cls}({channels}, {out}, {kernel}, stride={stride}, padding={padding}, dilation={dilation}, "
        f"groups={groups}, padding_mode='{mode}'{'' if bias else ', bias=False'})"
    )
    if padding == "'same'":
        new_spatial = spatial
    else:
        new_spatial = tuple((s + 2 * per_side - dilation * (kernel - 1) - 1) // stride + 1 for s in spatial)
    return expr, out, new_spatial


def _step(draw, layout: str, shape: tuple[int, ...], kind: str | None = None) -> tuple[list[str], str, tuple[int, ...]]:
    """One trunk block on a batch-first layout: (expressions, new layout, new per-sample shape); ``kind``
    forces the block's kind (the convolution that opens every c1/c2 trunk)."""
    if layout == "vec":
        (d,) = shape
        kind = draw(
            st.sampled_from(("linear", "act", "residual", "batchnorm", "trailing_norm", "groupnorm", "scale", "shift"))
        )
        if kind == "linear":
            expr, d_out = _linear(draw, d)
            return _after_linear(draw, expr), "vec", (d_out,)
        if kind == "residual":
            return [f"Residual(nn.Sequential(nn.Linear({d}, {d}), nn.Tanh()))"], "vec", shape
        if kind == "batchnorm":
            return [f"nn.BatchNorm1d({d})"], "vec", shape
        if kind == "trailing_norm":
            return [_trailing_norm(draw, shape)], "vec", shape
        if kind == "groupnorm":
            return [_group_norm(draw, d, shape)], "vec", shape
        if kind == "scale":
            return [_layer_scale(draw, d, -1)], "vec", shape
        if kind == "shift":
            return [f"Shift(({d},), subtract={draw(st.booleans())})"], "vec", shape
        return [draw(st.sampled_from(ACTIVATIONS))], "vec", shape

    if layout == "seq":
        t, d = shape
        kind = draw(
            st.sampled_from(
                (
                    "linear",
                    "trailing_norm",
                    "seq_first_linear",
                    "seq_first_transformer",
                    "positions",
                    "transformer",
                    "residual",
                    "channel_norm",
                    "act",
                    "to_c1",
                    "scale",
                    "table",
                    "class_token",
                    "rows_linear",
                    "recurrent",
                )
            )
        )
        if kind == "recurrent":
            expr, width = _recurrent(draw, d)
            return [expr], "seq", (t, width)
        if kind == "scale":
            return [_layer_scale(draw, d, -1)], "seq", shape
        if kind == "table":
            return [f"Shift(({t}, {d}), subtract={draw(st.booleans())})"], "seq", shape
        if kind == "class_token":
            return [f"ClassToken({d})"], "seq", (t + 1, d)
        if kind == "rows_linear":
            d_out = draw(WIDTH)
            return [f"RowsLinear({d}, {d_out})"], "seq", (t, d_out)
        if kind == "linear":
            expr, d_out = _linear(draw, d)
            return _after_linear(draw, expr), "seq", (t, d_out)
        if kind == "trailing_norm":
            return [_trailing_norm(draw, shape)], "seq", shape
        if kind == "seq_first_linear":
            expr, d_out = _linear(draw, d)
            return [f"SeqFirst({expr})"], "seq", (t, d_out)
        if kind == "seq_first_transformer":
            return [f"SeqFirst({_transformer(draw, d, batch_first=False)})"], "seq", shape
        if kind == "transformer":
            return [_transformer(draw, d, batch_first=True)], "seq", shape
        if kind == "positions":
            return [f"AddPositions(nn.Embedding({t}, {d}))"], "seq", shape
        if kind == "residual":
            return [f"Residual(nn.Linear({d}, {d}){_inplace(draw)})"], "seq", shape
        if kind == "channel_norm":
            # Over D (as channels of (B, D, T)) or over T (which (B, T, D) has in the channel place).
            over_d = draw(st.booleans())
            channels = d if over_d else t
            norm = f"nn.BatchNorm1d({channels})" if draw(st.booleans()) else _group_norm(draw, channels, shape)
            return [f"ChannelsFirst({norm})" if over_d else norm], "seq", shape
        if kind == "to_c1":
            return ["Transpose(1, 2)"], "c1", (d, t)
        return [draw(st.sampled_from(ACTIVATIONS))], "seq", shape

    # c1: (C, L) and c2: (C, H, W)
    dims = 1 if layout == "c1" else 2
    c, *spatial = shape
    spatial = tuple(spatial)
    kind = kind or draw(
        st.sampled_from(("conv", "batchnorm", "groupnorm", "trailing_norm", "pool", "residual", "act", "scale"))
    )
    if kind == "scale":
        return [_layer_scale(draw, c, 0)], layout, shape
    if kind == "conv":
        expr, out, new_spatial = _conv(draw, dims, c, spatial)
        return _after_linear(draw, expr), layout, (out, *new_spatial)
    if kind == "residual":
        expr, _, _ = _conv(draw, dims, c, spatial, same_shape=True)
        return [f"Residual({expr}{_inplace(draw)})"], layout, shape
    if kind == "batchnorm":
        return [f"nn.BatchNorm{dims}d({c})"], layout, shape
    if kind == "groupnorm":
        return [_group_norm(draw, c, shape)], layout, shape
    if kind == "trailing_norm":
        return [_trailing_norm(draw, shape)], layout, shape
    if kind == "pool":
        which = draw(st.sampled_from(("AdaptiveAvgPool", "AdaptiveMaxPool", "AvgPool", "MaxPool")))
        size = draw(st.integers(1, min(spatial)))
        if which.startswith("Adaptive"):
            return [f"nn.{which}{dims}d({size})"], layout, (c, *(size,) * dims)
        stride = draw(st.integers(1, 2))
        new_spatial = tuple((s - size) // stride + 1 for s in spatial)
        return [f"nn.{which}{dims}d({size}, stride={stride})"], layout, (c, *new_spatial)
    return [draw(st.sampled_from(ACTIVATIONS))], layout, shape


def _to_vector(draw, layout: str, shape: tuple[int, ...]) -> tuple[list[str], tuple[int]]:
    """A readout from any layout to (B, D)."""
    if layout == "vec":
        return [], shape
    how = draw(st.sampled_from(("flatten", "mean", "max", "first" if layout == "seq" else "mean")))
    if how == "flatten":
        return ["nn.Flatten()"], (math.prod(shape),)
    if layout == "seq":
        return [{"mean": "MeanOver(1)", "max": "MaxOver(1)", "first": "First()"}[how]], (shape[1],)
    if how == "max":
        return [f"nn.AdaptiveMaxPool{len(shape) - 1}d(1)", "nn.Flatten()"], (shape[0],)
    return [f"MeanOver({tuple(range(2, len(shape) + 1))})"], (shape[0],)


def _seq_first_entry(draw, shape: tuple[int, ...], vocab: int | None) -> tuple[list[str], str, tuple[int, ...]]:
    """Layers on the sequence-first (T, B, ...) input handed in by inputs=, then back to batch-first."""
    layers: list[str] = []
    if vocab is not None:
        (t,) = shape
        d = draw(WIDTH)
        layers.append(_embedding(draw, vocab, d))
        shape = (t, d)
    t, d = shape
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(("linear", "transformer", "positions", "layernorm")))
        if kind == "linear":
            expr, d = _linear(draw, d)
            layers.append(expr)
        elif kind == "transformer":
            layers.append(_transformer(draw, d, batch_first=False))
        elif kind == "positions":
            layers.append(f"AddPositions(nn.Embedding({t}, {d}), seq_dim=0)")
        else:
            layers.append(f"nn.LayerNorm({d})")
    if draw(st.booleans()):
        return [*layers, "MeanOver(0)"], "vec", (d,)
    return [*layers, "Transpose(0, 1)"], "seq", (t, d)


def _recurrent(draw, d: int) -> tuple[str, int]:
    """An LSTM, GRU or RNN over a (B, T, D) sequence, batch-first or run sequence-first, 1-2 layers, one or two
    directions; returns (expression, output width)."""
    cell = draw(st.sampled_from(("nn.LSTM", "nn.GRU", "nn.RNN")))
    hidden, layers, both = draw(WIDTH), draw(st.integers(1, 2)), draw(st.booleans())
    options = f"num_layers={layers}, bidirectional={both}"
    if cell == "nn.RNN" and draw(st.booleans()):
        options += ", nonlinearity='relu'"
    if cell == "nn.LSTM" and draw(st.integers(0, 3)) == 3 and hidden > 1:
        projected = draw(st.integers(1, hidden - 1))
        options += f", proj_size={projected}"
        width = projected
    else:
        width = hidden
    width *= 2 if both else 1
    if draw(st.booleans()):
        return f"SeqFirst(RecurrentOut({cell}({d}, {hidden}, {options})))", width
    return f"RecurrentOut({cell}({d}, {hidden}, {options}, batch_first=True))", width


def _layer_scale(draw, channels: int, channel_dim: int) -> str:
    how = draw(st.sampled_from(("mul", "inplace", "div")))
    return f"LayerScale({channels}, {channel_dim}, '{how}')"


def _bag(draw, vocab: int, d: int) -> str:
    """An EmbeddingBag over a sample's ids (each row of the (B, T) batch one bag)."""
    mode = draw(st.sampled_from(("mean", "sum", "max")))
    padding = draw(st.one_of(st.none(), st.integers(0, vocab - 1)))
    return f"nn.EmbeddingBag({vocab}, {d}, mode='{mode}'{'' if padding is None else f', padding_idx={padding}'})"


def _embedding(draw, vocab: int, d: int) -> str:
    padding = draw(st.one_of(st.none(), st.integers(0, vocab - 1)))
    return f"nn.Embedding({vocab}, {d}{'' if padding is None else f', padding_idx={padding}'})"


@st.composite
def _sizes(draw) -> dict:
    """Pool and labeled set sizes: last batches of exactly one sample, and batches above 32 samples."""
    big = draw(st.integers(0, 9)) == 9  # about one example in ten
    batch = draw(st.integers(33, 40)) if big else draw(st.integers(1, 8))
    batches = draw(st.integers(1, 2 if big else 3))
    last = draw(st.sampled_from(("one", "full", "any")))
    last_size = 1 if last == "one" else batch if last == "full" else draw(st.integers(1, batch))
    labeled_size = draw(st.integers(33, 40)) if big and draw(st.booleans()) else draw(st.integers(1, 8))
    return {
        "pool_size": (batches - 1) * batch + last_size,
        "pool_batch": batch,
        "labeled_size": labeled_size,
        "labeled_batch": draw(st.integers(1, labeled_size)),
        "int32_labels": draw(st.integers(0, 4)) == 4,
    }


@st.composite
def specs(draw) -> Spec:
    """A whole example: input layout, trunk, head, what follows the head, loaders and seed."""
    sizes = draw(_sizes())
    layout = draw(st.sampled_from(("vec", "seq", "c1", "c2", "tokens")))
    seq_first = layout in ("seq", "tokens") and draw(st.booleans())
    vocab = None
    if layout in ("seq", "tokens"):
        # T equal to the batch size (or the last batch's) is the ambiguous case fastdal must read by structure.
        last = sizes["pool_size"] - (sizes["pool_size"] - 1) // sizes["pool_batch"] * sizes["pool_batch"]
        choices = [draw(st.integers(1, 6)), sizes["pool_batch"], last, sizes["labeled_batch"]]
        if seq_first:
            choices.append(draw(st.integers(33, 36)))  # above the CPU micro-batch along dim 0 of (T, B, D)
        t = draw(st.sampled_from(choices))
    if layout == "vec":
        shape = (draw(WIDTH),)
    elif layout == "seq":
        shape = (t, draw(st.integers(1, 6)))
    elif layout == "c1":
        shape = (draw(st.integers(1, 4)), draw(st.integers(1, 8)))
    elif layout == "c2":
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    else:
        vocab, shape = draw(st.integers(2, 8)), (t,)
    input_layout, input_shape = layout, shape

    trunk: list[str] = []
    if seq_first:
        trunk, layout, shape = _seq_first_entry(draw, shape, vocab)
    elif layout == "tokens" and draw(st.integers(0, 3)) == 3:
        d = draw(WIDTH)
        trunk, layout, shape = [_bag(draw, vocab, d)], "vec", (d,)
    elif layout == "tokens":
        d = draw(WIDTH)
        trunk, layout, shape = [_embedding(draw, vocab, d)], "seq", (shape[0], d)
    if layout in ("c1", "c2"):
        # Hypothesis favours short trunks; a conv net without a convolution would test little.
        trunk, layout, shape = _step(draw, layout, shape, kind="conv")
    for _ in range(draw(st.integers(0, 3))):
        layers, layout, shape = _step(draw, layout, shape)
        trunk += layers

    classes = draw(st.integers(2, 6))
    head_bias = draw(st.booleans()) or draw(st.booleans())
    pool = "nn.Identity()"
    if layout == "seq" and draw(st.booleans()):
        pool = "MeanOver(1)"  # the head runs on every position; the logits are its mean
    else:
        readout, shape = _to_vector(draw, layout, shape)
        trunk += readout
    d = shape[-1]
    head = f"nn.Linear({d}, {classes}{'' if head_bias else ', bias=False'})"
    post = draw(
        st.sampled_from(
            ("nn.Identity()", "Scale(0.5)", "Scale(1.5, -0.25)", "Affine()", "nn.LogSoftmax(1)", "InplaceScale(0.5)")
        )
    )
    side = f"nn.Linear({d}, {draw(WIDTH)})" if draw(st.booleans()) else None
    return Spec(
        layout=input_layout,
        input_shape=input_shape,
        vocab=vocab,
        seq_first=seq_first,
        trunk=tuple(trunk),
        head=head,
        pool=pool,
        post=post,
        side=side,
        classes=classes,
        seed=draw(st.integers(0, 2**31 - 1)),
        **sizes,
    )
