"""Each op on each backend against the ``torch`` backend, in one run: time (pytest-benchmark), the
speed-up over ``torch`` as the median of interleaved pairs of calls (so that drift of the machine's
speed between tests does not enter the ratio), and extra peak memory (bench/peak_memory.py, a fresh
process per measurement).

    python -m pytest bench/test_ops_bench.py            # writes bench/results/ops-<cpu|cuda>.json

Shapes (bench/op_cases.py): ``last_layer_score`` at N=16384, D=512 for K in {10, 1000}, and its memory at K=32000 for
two values of N (no N x K buffer means the extra memory does not grow with N); ``linear_sample_score``
on the vanilla CNN's conv layers (batch 128, 32x32 maps, unfold layout, direct norm) and a
K=1000 linear head (T=1, ghost norm). On a GPU: ``last_layer_score`` at N=1M, D=2048 for K in
{10, 1000}, and K=131072 at N=8192 (at N=1M one call is ~17 s at the FP32 peak; set
FASTDAL_BENCH_FULL=1 for it, on the cuda and triton backends only, one round), each with its roofline
(bench/gpu_check.py: bytes = 4 N D + 8 K D + ..., flops = 2 * 2 N K D): the fraction of the datasheet
HBM bandwidth where it is bandwidth-bound (K small), of the TF32 tensor-core and FP32 peaks where it
is compute-bound. Cases of over a TFLOP run fewer rounds, so that the CUDA run takes minutes. The feature
ops: ``kron_project`` on the CNN's conv2 (r=16) and on a K=1000 head input (T=1, r=32), and one
``factored_min_distance`` update of BADGE at N=50000, K=1000, D=512.
"""

from __future__ import annotations

import os
import statistics
import time

import op_cases
import pytest
import torch
from gpu_check import peaks, roofline_fractions
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

CASES = op_cases.LAST_LAYER + op_cases.LAYERS
if DEVICE == "cuda":
    CASES += op_cases.GPU_ROOFLINE
    if os.environ.get("FASTDAL_BENCH_FULL") == "1":
        CASES += op_cases.FULL_SIZE

# A call of over a TFLOP (~20 ms and up on an H100/H200) gets few rounds; at N=1M, K=131072 (over a
# PFLOP) one round, no paired speed-up and no memory subprocess (each would repeat a ~17 s call).
BIG_FLOPS, HUGE_FLOPS = 1e12, 1e15


def _flops(spec: dict) -> float:
    if spec["op"] == "last_layer_score":
        return 4.0 * spec["n"] * spec["k"] * spec["d"]
    return 0.0


def _name(spec: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", CASES, ids=_name)
def test_op(benchmark, records, spec, backend):
    flops = _flops(spec)
    if flops > HUGE_FLOPS and backend == "torch":
        pytest.skip("the torch backend loops over ~25k row chunks at this size: minutes, not a kernel timing")
    spec = {**spec, "backend": backend, "device": DEVICE}
    args = inputs(spec, DEVICE)

    def run():
        call(spec, args)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    rounds = 1 if flops > HUGE_FLOPS else 2 if flops > BIG_FLOPS else 5
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0 if flops > HUGE_FLOPS else 1, iterations=1)
    seconds = median_seconds(benchmark)
    row = {
        "case": _name({k: v for k, v in spec.items() if k not in ("backend", "device")}),
        "backend": backend,
        "device": DEVICE,
        "shapes": {k: v for k, v in spec.items() if k not in ("op", "backend", "device")},
        "seconds_median": seconds,
        "peak_extra_bytes": None if flops > HUGE_FLOPS else measure(spec),
    }
    if backend != "torch" and flops <= HUGE_FLOPS:
        row["speedup_over_torch_paired"] = _paired_speedup(spec, args, backend, 3 if flops > BIG_FLOPS else 15)
    if spec["op"] == "last_layer_score" and DEVICE == "cuda":
        peak = peaks(torch.cuda.get_device_name(0)) or {"hbm_bytes_per_s": _peak_bandwidth()}
        row.update(roofline_fractions(spec["n"], spec["d"], spec["k"], seconds, peak, {}))
    benchmark.extra_info.update(row)
    records.append(row)


def _paired_speedup(spec: dict, args, backend: str, rounds: int) -> float:
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

    ratios = [timed(torch_spec) / timed(spec) for _ in range(rounds)]
    return statistics.median(ratios)


def _peak_bandwidth() -> float:
    """Theoretical DRAM bandwidth of the GPU in bytes/s, from its memory clock and bus width."""
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        pytest.skip("the device does not report its memory clock and bus width")
    return 2 * clock_khz * 1e3 * bus_bits / 8
