"""fastdal's Python paths on fake CUDA tensors: what a CUDA model does in fastdal, without a GPU.

After :func:`boot.boot` (fake_cuda.cpp loaded before torch), a ``FakeTensorMode`` makes tensors on ``cuda:0`` that
carry shapes, dtypes and devices only, and raises ``FakeTensorDeviceMismatchError`` when a CPU tensor meets one
in an operation. Above it, :class:`Watch` (a ``TorchDispatchMode``) sees every operation first and records:

* **host waits**: reading a value on the host (``.item()``, ``bool(t)``), a copy from the device to the host, and
  operations whose output size depends on values (``nonzero``, ``unique``, boolean-mask indexing), each with the
  fastdal frames that asked for it; ``torch.cuda.synchronize`` too. A wait gets a stand-in answer (0, False, a
  full-size output) so that the run goes on and every wait of a pass is seen;
* **launches**: every operation that writes a CUDA tensor (views and metadata excepted), a stand-in for the
  kernels a real GPU would run, counted per batch by :class:`CountedLoader`.

:func:`fake_cuda_model` puts a CPU-built model's parameters and buffers on fake ``cuda:0`` (``Module.to`` cannot
move them into fake tensors). :func:`gpu_backends` makes fastdal's cuda backend available (its ops run their
registered fakes) and Triton's launches go to :class:`LaunchCheck`, which checks grids against CUDA's limits and
integer arguments against 32 bits, since a fake tensor has no data to launch a kernel on.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
FASTDAL = str(Path(__import__("fastdal").__file__).resolve().parent)

# Operations whose output size depends on the values: on a GPU the host waits for them.
_VALUE_SHAPED = {
    aten.nonzero.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.masked_select.default,
}


@dataclass(frozen=True)
class Wait:
    """One host wait: what it was and the innermost fastdal frames that asked for it."""

    kind: str
    op: str
    frames: tuple[str, ...]  # "file.py:function", innermost last

    @property
    def where(self) -> str:
        return self.frames[-1] if self.frames else "<outside fastdal>"


@dataclass
class Watch(TorchDispatchMode):
    """Host waits and launches of everything run inside it (enter it after, i.e. above, the FakeTensorMode)."""

    waits: list[Wait] = field(default_factory=list)
    launches: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device = any(t.device.type == "cuda" for t in _tensors((args, kwargs)))
        if func is aten._local_scalar_dense.default:
            if on_device:
                self._wait("value read on the host", func)
            x = args[0]
            return False if x.dtype == torch.bool else (0.0 if x.is_floating_point() else 0)
        if on_device and (func in _VALUE_SHAPED or (func is aten.index.Tensor and _bool_index(args))):
            self._wait("output size from values", func)
            return _full_size(func, args, kwargs)
        out = func(*args, **kwargs)
        if _to_host(func, args, kwargs, out):
            # Into pinned memory a non-blocking copy returns before the data is there: the host may read garbage.
            self._wait("asynchronous copy to the host" if kwargs.get("non_blocking") else "copy to the host", func)
        elif not func.is_view and any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in _tensors(out)):
            self.launches += 1
        return out

    def _wait(self, kind: str, func: Any) -> None:
        frames = tuple(
            f"{Path(f.filename).name}:{f.name}" for f in traceback.extract_stack() if f.filename.startswith(FASTDAL)
        )
        self.waits.append(Wait(kind, str(func), frames))


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _to_host(func: Any, args: tuple, kwargs: dict, out: Any) -> bool:
    """A copy whose source is on the device and whose result is on the host."""
    if func not in (aten._to_copy.default, aten.copy_.default, aten.copy.default):
        return False
    sources = [a for a in args if isinstance(a, torch.Tensor)]
    if func is aten.copy_.default:
        return sources[0].device.type == "cpu" and sources[1].device.type == "cuda"
    return sources[0].device.type == "cuda" and isinstance(out, torch.Tensor) and out.device.type == "cpu"


def _full_size(func: Any, args: tuple, kwargs: dict) -> Any:
    """A stand-in for an operation whose size depends on values: the largest size it could have."""
    x = args[0]
    if func is aten.nonzero.default:
        return torch.zeros(x.numel(), x.dim(), dtype=torch.long, device=x.device)
    if func is aten.masked_select.default:
        return torch.zeros(x.numel(), dtype=x.dtype, device=x.device)
    if func is aten.index.Tensor:
        mask = next(i for i in args[1] if isinstance(i, torch.Tensor) and i.dtype == torch.bool)
        kept = x.reshape(-1, *x.shape[mask.dim() :]) if x.dim() >= mask.dim() else x
        return torch.zeros_like(kept)
    flat = x.reshape(-1)
    values = torch.zeros_like(flat)
    inverse = torch.zeros(x.shape, dtype=torch.long, device=x.device)
    counts = torch.ones(flat.shape, dtype=torch.long, device=x.device)
    return values, inverse, counts


# --------------------------------------------------------------------------------------------------
# Models and loaders
# --------------------------------------------------------------------------------------------------


def fake_cuda(mode: FakeTensorMode, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fake copy of ``t`` on ``cuda:0`` (in ``dtype`` for floating-point tensors, if given)."""
    fake = mode.from_tensor(t.detach())
    with mode:
        if dtype is not None and fake.is_floating_point():
            fake = fake.to(dtype)
        return fake.to("cuda")


def fake_cuda_model(model: nn.Module, mode: FakeTensorMode, dtype: torch.dtype | None = None) -> nn.Module:
    """``model`` (built on the CPU) with every parameter and buffer a fake tensor on ``cuda:0``, in place."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(fake_cuda(mode, p, dtype), requires_grad=p.requires_grad))
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None:
                module._buffers[name] = fake_cuda(mode, b, dtype)
    for module in model.modules():
        if isinstance(module, nn.RNNBase):  # it keeps its own list of the weight tensors
            module._flat_weights = [getattr(module, n) for n in module._flat_weights_names]
    return model


class CountedLoader:
    """A loader's batches, noting the launches counted so far as each batch is taken (per-batch launch counts)."""

    def __init__(self, batches: list, watch: Watch):
        self.batches, self.watch = batches, watch
        self.marks: list[int] = []

    def __iter__(self) -> Iterator:
        for batch in self.batches:
            self.marks.append(self.watch.launches)
            yield batch
        self.marks.append(self.watch.launches)

    def __len__(self) -> int:
        return len(self.batches)

    def per_batch(self) -> list[int]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


# --------------------------------------------------------------------------------------------------
# The GPU backends on fake tensors
# --------------------------------------------------------------------------------------------------


@dataclass
class LaunchCheck:
    """Triton launches, checked instead of run: the grid within CUDA's limits, integer arguments within 32 bits."""

    launches: list[tuple[str, tuple]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def launch(self, kernel: Any, grid: Any, args: tuple, kwargs: dict) -> None:
        name = getattr(kernel, "__name__", getattr(getattr(kernel, "fn", None), "__name__", str(kernel)))
        names = getattr(kernel, "arg_names", None) or getattr(getattr(kernel, "fn", None), "arg_names", [])
        bound = dict(zip(names, args))
        bound.update(kwargs)
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        self.launches.append((name, grid))
        limits = (2**31 - 1, 65535, 65535)
        if any(g < 1 or g > limit for g, limit in zip(grid, limits)):
            self.problems.append(f"{name}: grid {grid} outside CUDA's limits {limits}")
        for key, value in bound.items():
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**31:
                self.problems.append(f"{name}: integer argument {key}={value} does not fit 32 bits")


@contextlib.contextmanager
def gpu_backends(check: LaunchCheck) -> Iterator[None]:
    """fastdal's cuda and triton backends available on fake CUDA tensors: the cuda backend's ops run their
    registered fakes, and Triton's launches are checked instead of run. (Only fastdal's own view of the machine
    changes: torch.cuda.is_available() stays false, which torch's copies to the device rely on here.)"""
    import triton.runtime.autotuner as autotuner
    import triton.runtime.jit as jit

    import fastdal._ext as ext
    import fastdal.backends as backends

    if ext.load() is not None:  # the extension's ops and their fakes (built for the CPU) must be registered
        raise RuntimeError(f"fake CUDA runs need fastdal._C: {ext.load()}")
    saved = (backends._machine_reason, torch.cuda.synchronize, ext.has_kernel, jit.JITFunction.run)
    saved_autotune = autotuner.Autotuner.run
    saved_exchange = (torch.cuda._exchange_device, torch.cuda._maybe_exchange_device)
    saved_properties = torch.cuda.get_device_properties

    def machine_reason(name: str, device: torch.device | None = None) -> str | None:
        return None if name in (backends.CUDA, backends.TRITON) else saved[0](name, device)

    def jit_run(self, *args, grid, warmup=False, **kwargs):
        check.launch(self, grid, args, kwargs)

    def autotune_run(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        config = self.configs[0]
        check.launch(self.fn, grid, args, {**config.all_kwargs(), **kwargs})

    backends._machine_reason = machine_reason
    torch.cuda.synchronize = _synchronize
    ext.has_kernel = lambda op, key: True if key == "CUDA" else saved[2](op, key)
    jit.JITFunction.run = jit_run
    autotuner.Autotuner.run = autotune_run
    # torch.cuda.device(...), around every Triton launch, swaps the current device: one fake device, index 0.
    torch.cuda._exchange_device = torch.cuda._maybe_exchange_device = lambda device: 0
    # Launch schedules that size themselves to the GPU ask for its properties: an H100's.
    torch.cuda.get_device_properties = lambda device=None: _H100
    try:
        yield
    finally:
        backends._machine_reason, torch.cuda.synchronize, ext.has_kernel, jit.JITFunction.run = saved
        autotuner.Autotuner.run = saved_autotune
        torch.cuda._exchange_device, torch.cuda._maybe_exchange_device = saved_exchange
        torch.cuda.get_device_properties = saved_properties


@dataclass(frozen=True)
class _DeviceProperties:
    name: str
    major: int
    minor: int
    multi_processor_count: int
    total_memory: int


_H100 = _DeviceProperties("NVIDIA H100 80GB HBM3 (fake)", 9, 0, 132, 80 * 2**30)


_WATCHES: list[Watch] = []


def _synchronize(device: Any = None) -> None:
    for watch in _WATCHES:
        watch._wait("torch.cuda.synchronize", "torch.cuda.synchronize")


@contextlib.contextmanager
def fake_cuda_run(mode: FakeTensorMode) -> Iterator[Watch]:
    """``mode`` (the one the model was put on fake CUDA with) active, with a Watch above it."""
    watch = Watch()
    _WATCHES.append(watch)
    try:
        with mode, watch:
            yield watch
    finally:
        _WATCHES.remove(watch)


def new_mode() -> FakeTensorMode:
    """A FakeTensorMode that takes the real CPU tensors of the loaders as they are (as inputs of fake operations)."""
    return FakeTensorMode(allow_non_fake_inputs=True)
