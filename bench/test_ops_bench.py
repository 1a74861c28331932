"""Each op on each backend against the ``torch`` backend, in one run: time (pytest-benchmark), the
speed-up over ``torch`` as the median of interleaved pairs of calls (so that drift of the machine's
speed between tests does not enter the ratio), and extra peak memory (bench/peak_memory.py, a fresh
process per measurement).

    python -m pytest bench/test_ops_bench.py            # writes bench/results/ops-<cpu|cuda>.json

Shapes: ``last_layer_score`` at N=16384, D=512 for K in {10, 1000}, and its memory at K=32000 for two
values of N (no N x K buffer means the extra memory does not grow with N); ``linear_sample_score``
on the vanilla CNN's conv layers (batch 128, 32x32 maps, unfold layout, direct norm) and a
K=1000 linear head (T=1, ghost norm). On a GPU: ``last_layer_score`` at N=1M, D=2048 for K in
{10, 1000, 131072}, with the achieved fraction of memory bandwidth of reading h once. The feature
ops: ``kron_project`` on the CNN's conv2 (r=16) and on a K=1000 head input (T=1, r=32), and one
``factored_min_distance`` update of BADGE at N=50000, K=1000, D=512.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from peak_memory import call, inputs, measure

import fastdal.backends as backends

from conftest import median_seconds

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter (what runs without a GPU) is for tests, not timings.
BACKENDS = [
    b
    for b in (("torch", "cuda", "triton") if DEVICE == "cuda" else ("torch", "cpp"))
    if backends.available()[b] is None
]

CASES = [
    {"op": "last_layer_score", "n": 16384, "d": 512, "k": 10},
    {"op": "last_layer_score", "n": 16384, "d": 512, "k": 1000},
    {"op": "last_layer_score", "n": 2048, "d": 512, "k": 32000},
    {"op": "last_layer_score", "n": 8192, "d": 512, "k": 32000},
    {"op": "linear_sample_score", "n": 128, "t": 1024, "d_in": 27, "d_out": 32},
    {"op": "linear_sample_score", "n": 128, "t": 1024, "d_in": 288, "d_out": 64},
    {"op": "linear_sample_score", "n": 128, "t": 1024, "d_in": 576, "d_out": 128},
    {"op": "linear_sample_score", "n": 128, "t": 1, "d_in": 512, "d_out": 1000, "ghost": True},
    {"op": "kron_project", "n": 128, "t": 1024, "d_in": 288, "d_out": 64, "r": 16},
    {"op": "kron_project", "n": 4096, "t": 1, "d_in": 512, "d_out": 1000, "r": 32},
    {"op": "factored_min_distance", "n": 50000, "k": 1000, "d": 512},
]
if DEVICE == "cuda":
    CASES += [{"op": "last_layer_score", "n": 1 << 20, "d": 2048, "k": k} for k in (10, 1000, 131072)]


def _name(spec: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", CASES, ids=_name)
def test_op(benchmark, records, spec, backend):
    spec = {**spec, "backend": backend, "device": DEVICE}
    args = inputs(spec, DEVICE)

    def run():
        call(spec, args)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    seconds = median_seconds(benchmark)
    row = {
        "case": _name({k: v for k, v in spec.items() if k not in ("backend", "device")}),
        "backend": backend,
        "device": DEVICE,
        "shapes": {k: v for k, v in spec.items() if k not in ("op", "backend", "device")},
        "seconds_median": seconds,
        "peak_extra_bytes": measure(spec),
    }
    if backend != "torch":
        row["speedup_over_torch_paired"] = _paired_speedup(spec, args, backend)
    if spec["op"] == "last_layer_score" and DEVICE == "cuda":
        bytes_read = spec["n"] * spec["d"] * 4  # h read once; W and G_W are small next to it
        row["bandwidth_fraction"] = bytes_read / seconds / _peak_bandwidth()
    benchmark.extra_info.update(row)
    records.append(row)


PAIRED_ROUNDS = 15


def _paired_speedup(spec: dict, args, backend: str) -> float:
    """Median over interleaved (torch, backend) pairs of torch's time over the backend's."""
    torch_spec = {**spec, "backend": "torch"}

    def timed(s: dict) -> float:
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call(s, args)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    ratios = [timed(torch_spec) / timed(spec) for _ in range(PAIRED_ROUNDS)]
    return statistics.median(ratios)


def _peak_bandwidth() -> float:
    """Theoretical DRAM bandwidth of the GPU in bytes/s, from its memory clock and bus width."""
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        pytest.skip("the device does not report its memory clock and bus width")
    return 2 * clock_khz * 1e3 * bus_bits / 8
