"""Shared test set-up: fixed seeds, Triton's CPU interpreter when there is no GPU, tolerance helpers."""

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the interpreter is the only way the Triton kernels run, so it is forced on (a stray
    # TRITON_INTERPRET=0 would silently drop them from the suite). Set before any kernel is decorated.
    os.environ["TRITON_INTERPRET"] = "1"

# Whether Triton runs under its interpreter in this session. Only then does the triton backend serve CPU
# tensors (fastdal/backends.py), so only then do tests run it on CPU; on a GPU machine it runs compiled,
# on CUDA tensors, in the tests marked ``gpu``.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def cpu_backends(names: tuple[str, ...] = ("torch", "cpp", "triton")) -> list[str]:
    """Those of ``names`` that run ops on CPU tensors here: the backend runs on this machine, and for
    triton, the interpreter is on (else forcing it on CPU tensors raises, e.g. on a GPU machine)."""
    import fastdal.backends as backends  # after TRITON_INTERPRET is settled

    report = backends.available()
    return [n for n in names if report[n] is None and (n != "triton" or TRITON_INTERPRETED)]


# DESIGN.md, chain of truth: error against the float64 reference, relative to the reference's scale.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (a scale-aware error that tolerates entries near zero)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item()
    assert scale > 0, "never compare against all zeros"
    return (actual - expected).abs().max().item() / scale


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on a small machine shared with other jobs, torch's
    thread pool spins far longer than the work takes. The previous setting comes back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


# Hypothesis profiles of the property-based suite (tests/test_fuzz.py). "default" (make test) replays
# the same 300 examples on every run, so a failure is never a matter of luck; "fuzz" (make fuzz, or
# HYPOTHESIS_PROFILE=fuzz) draws 5000 fresh ones. Examples run whole models, so there is no deadline;
# print_blob gives the @reproduce_failure line of a failure; no example database is written into the
# working tree.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default",
    derandomize=True,
    deadline=None,
    max_examples=300,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("fuzz", parent=settings.get_profile("default"), derandomize=False, max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
