"""Lazy, never-raising loader of the compiled extension ``fastdal._C``.

Importing fastdal never compiles or loads anything; the first backend query calls :func:`load`,
which imports ``fastdal._C`` (registering its TORCH_LIBRARY ops) and the ops' fake implementations,
and remembers why it could not if it could not.
"""

from __future__ import annotations

import importlib

import torch

_UNSET = object()
_status: object = _UNSET


def load() -> str | None:
    """None once ``fastdal._C`` is loaded, else the reason it cannot be."""
    global _status
    if _status is _UNSET:
        try:
            importlib.import_module("fastdal._C")
        except ImportError as err:
            _status = (
                f"the compiled extension fastdal._C is not built ({err}); build it with "
                "`pip install -e . --no-build-isolation` (FASTDAL_BUILD_EXT=0 skips it)"
            )
        except Exception as err:  # a broken build must not break `import fastdal`
            _status = f"the compiled extension fastdal._C failed to load: {err}"
        else:
            _register_fakes()
            _status = None
    return _status  # type: ignore[return-value]


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the loaded extension registered ``fastdal::<op>`` for a dispatch key ("CPU", "CUDA")."""
    return load() is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdal::{op}", dispatch_key)


def _register_fakes() -> None:
    """Shapes and dtypes of the compiled ops' outputs, for tracing (torch.compile, opcheck)."""

    def accumulation(t: torch.Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("fastdal::last_layer_score")
    def _(h, weight, bias, weight_grad, bias_grad, gamma, precision="tf32x3"):
        n = h.shape[0]
        out = h.new_empty(n, dtype=accumulation(h))
        return out, h.new_empty(n, dtype=out.dtype), h.new_empty(n, dtype=out.dtype), h.new_empty(n, dtype=torch.long)

    @torch.library.register_fake("fastdal::linear_sample_score")
    def _(a, delta, weight_grad, groups, ghost, precision="tf32x3"):
        n = a.shape[0]
        return a.new_empty(n, dtype=accumulation(a)), a.new_empty(n, dtype=accumulation(a))

    @torch.library.register_fake("fastdal::conv_sample_score")
    def _(inputs, deltas, weight, stride, dilation, groups, weight_grad):
        n = inputs[0].shape[0]
        return weight.new_empty(n), weight.new_empty(n)

    @torch.library.register_fake("fastdal::unfold")
    def _(x, kernel_size, stride, dilation):
        rows = x.shape[1] * kernel_size[0] * kernel_size[1]
        out_h, out_w = ((x.shape[d + 2] - dilation[d] * (kernel_size[d] - 1) - 1) // stride[d] + 1 for d in (0, 1))
        return x.new_empty(x.shape[0], rows, out_h * out_w)

    @torch.library.register_fake("fastdal::kron_project")
    def _(a, delta, p_in, p_out, precision="tf32x3"):
        return a.new_empty(a.shape[0], p_out.shape[1], p_in.shape[0], dtype=accumulation(a))

    @torch.library.register_fake("fastdal::factored_min_distance")
    def _(left, right, offset, sq_norm, center, min_dist):
        return min_dist.new_empty(min_dist.shape)
