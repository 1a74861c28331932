"""The shapes the op benchmarks run, in one place: bench/test_ops_bench.py times them, bench/gpu_check.py
runs them inside a device lease, and bench/sm90_compile.py compiles every kernel configuration they reach.

Within each list the most telling case comes first (bench/gpu_check.py stops when its budget is spent).
"""

from __future__ import annotations

# last_layer_score at sizes any machine runs: K in {10, 1000} at N=16384, D=512, and K=32000 at two N (no
# N x K buffer means the extra memory does not grow with N).
LAST_LAYER = [
    {"op": "last_layer_score", "n": 16384, "d": 512, "k": 10},
    {"op": "last_layer_score", "n": 16384, "d": 512, "k": 1000},
    {"op": "last_layer_score", "n": 2048, "d": 512, "k": 32000},
    {"op": "last_layer_score", "n": 8192, "d": 512, "k": 32000},
]

# The per-layer and feature ops: linear_sample_score on the vanilla CNN's conv layers (batch 128, 32x32
# maps, unfold layout, direct norm) and a K=1000 linear head (T=1, ghost norm); kron_project on conv2
# (r=16) and on a K=1000 head input (T=1, r=32); one factored_min_distance update of BADGE.
LAYERS = [
    {"op": "linear_sample_score", "n": 128, "t": 1024, "d_in": 288, "d_out": 64},
    {"op": "linear_sample_score", "n": 128, "t": 1024, "d_in": 576, "d_out": 128},
    {"op": "linear_sample_score", "n": 128, "t": 1, "d_in": 512, "d_out": 1000, "ghost": True},
    {"op": "linear_sample_score", "n": 128, "t": 1024, "d_in": 27, "d_out": 32},
    {"op": "kron_project", "n": 128, "t": 1024, "d_in": 288, "d_out": 64, "r": 16},
    {"op": "kron_project", "n": 4096, "t": 1, "d_in": 512, "d_out": 1000, "r": 32},
    {"op": "factored_min_distance", "n": 50000, "k": 1000, "d": 512},
]

# GPU only, the roofline shapes: N=1M, D=2048 at K=10 (bandwidth-bound) and K=1000 (compute-bound), and
# K=131072 at a reduced N.
GPU_ROOFLINE = [
    {"op": "last_layer_score", "n": 1 << 20, "d": 2048, "k": 10},
    {"op": "last_layer_score", "n": 1 << 20, "d": 2048, "k": 1000},
    {"op": "last_layer_score", "n": 8192, "d": 2048, "k": 131072},
]

# GPU only and on request: the full-size call, N=1M, D=2048, K=131072 (over a PFLOP: ~17 s at the FP32 peak).
FULL_SIZE = [{"op": "last_layer_score", "n": 1 << 20, "d": 2048, "k": 131072}]

# The small shapes of bench/gpu_check.py's dry run on the CPU: each op once, so that no code path is left
# untried before a GPU is seen.
DRY_RUN = [
    {"op": "last_layer_score", "n": 64, "d": 16, "k": 10},
    {"op": "last_layer_score", "n": 64, "d": 16, "k": 100},
    {"op": "linear_sample_score", "n": 4, "t": 16, "d_in": 9, "d_out": 4},
    {"op": "kron_project", "n": 4, "t": 16, "d_in": 9, "d_out": 4, "r": 4},
    {"op": "factored_min_distance", "n": 100, "k": 10, "d": 16},
]
