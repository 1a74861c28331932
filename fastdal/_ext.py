"""Lazy, never-raising loader of the compiled extension ``fastdal._C``.

Importing fastdal never compiles or loads anything; the first backend query calls :func:`load`, which
imports ``fastdal._C`` (registering its TORCH_LIBRARY ops) and the ops' fake implementations, and remembers
why it could not if it could not. ``fastdal._C`` is there when it was built ahead of time
(``pip install . --no-build-isolation``, or ``-e``). Otherwise (``pip install .``: pip's isolated build has no
torch to build it against, so the wheel carries the C++/CUDA sources instead) the first ``load`` compiles it
from those sources into a per-user cache (fastdal/_build.py: ``$FASTDAL_CACHE_DIR``, else
``~/.cache/fastdal``), once for a given torch and source tree; later processes load it from there.
``FASTDAL_BUILD_EXT=0`` turns that off. While there is no ``fastdal._C``, the reason says why, and fastdal
runs on its torch and triton backends.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from . import _build

_UNSET = object()
_status: object = _UNSET
_FALLBACK = "; the cpp and cuda backends are unavailable, fastdal runs on its torch and triton backends"


def load() -> str | None:
    """None once ``fastdal._C`` is loaded, else the reason it cannot be (never raises, except on Ctrl-C)."""
    global _status
    if _status is _UNSET:
        _status = _import_or_build()
        if _status is None:
            _register_fakes()
    return _status  # type: ignore[return-value]


def _import_or_build() -> str | None:
    try:
        _import_installed()
    except ModuleNotFoundError as err:
        if err.name != _build.EXTENSION:  # the library is there but needs something that is not
            return f"the compiled extension {_build.EXTENSION} failed to load: {err}"
        return _build_at_first_use()
    except Exception as err:  # a broken build must not break `import fastdal`
        return (
            f"the compiled extension {_build.EXTENSION} failed to load: {err}; rebuild it against this torch with "
            "`pip install . --no-build-isolation` (or remove it to have it built at first use)"
        )
    return None


def _import_installed() -> None:
    """Import the fastdal._C installed beside this package (built ahead of time)."""
    importlib.import_module(_build.EXTENSION)


def _build_at_first_use() -> str | None:
    """Build fastdal._C into the cache (or find it built there) and import it; the reason it cannot be, else None."""
    if _build.disabled():
        return (
            f"{_build.EXTENSION} is not built, and {_build.BUILD_EXT_ENV}=0 turns off building it at first use"
            + _FALLBACK
        )
    csrc = _build.installed_sources(Path(__file__).parent)
    if csrc is None:
        return f"{_build.EXTENSION} is not built, and its C++ sources (fastdal/csrc) are not installed" + _FALLBACK
    missing = _build.missing_tool()
    if missing is not None:
        return f"{_build.EXTENSION} is not built, and cannot be built at first use: {missing}" + _FALLBACK
    try:
        library = _build.build_at_first_use(csrc)
        _import_library(library)
    except Exception as err:  # the promise of load(): a failed build leaves fastdal on its torch backend
        return f"building {_build.EXTENSION} failed: {err}" + _FALLBACK
    return None


def _import_library(path: Path) -> None:
    """Import the library at ``path`` as fastdal._C, so that ``import fastdal._C`` finds it as after a build
    ahead of time (its PyInit__C matches the module's last name)."""
    spec = importlib.util.spec_from_file_location(_build.EXTENSION, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[_build.EXTENSION] = module


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the loaded extension registered ``fastdal::<op>`` for a dispatch key ("CPU", "CUDA")."""
    return load() is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdal::{op}", dispatch_key)


@functools.cache  # once a process: torch refuses a second fake implementation of an op
def _register_fakes() -> None:
    """Shapes and dtypes of the compiled ops' outputs, for tracing (torch.compile, opcheck)."""

    def accumulation(t: torch.Tensor) -> torch.dtype:
        # float32 for float16/bfloat16 too: the CUDA last_layer_score sums a half head in float32 (csrc/cuda).
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
