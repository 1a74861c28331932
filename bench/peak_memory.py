"""Extra peak memory of one op call, measured in a fresh process.

CPU: the process's peak resident set (VmHWM) is reset through /proc/self/clear_refs just before
the call, and the extra is VmHWM after the call minus VmRSS before it. CUDA: the peak of
torch.cuda.max_memory_allocated over the call minus what was allocated before. A fresh process
keeps memory freed by earlier calls from hiding this one's allocations.

    python bench/peak_memory.py '{"op": "last_layer_score", "backend": "cpp", "n": 4096, "d": 512, "k": 32000}'
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def measure(spec: dict) -> int:
    """Extra peak bytes of the call described by ``spec`` (see :func:`_run`), in a subprocess."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def inputs(spec: dict, device: str):
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    if spec["op"] == "last_layer_score":
        n, d, k = spec["n"], spec["d"], spec["k"]
        h = torch.randn(n, d, device=device, generator=g)
        w = torch.randn(k, d, device=device, generator=g) / d**0.5
        return (
            h,
            w,
            torch.randn(k, device=device, generator=g),
            torch.randn(k, d, device=device, generator=g),
            torch.randn(k, device=device, generator=g),
        )
    if spec["op"] == "factored_min_distance":
        n, k, d = spec["n"], spec["k"], spec["d"]
        left, right = torch.randn(n, k, device=device, generator=g), torch.randn(n, d, device=device, generator=g)
        sq_norm = left.square().sum(1) * (right.square().sum(1) + 1)
        return left, right, 1.0, sq_norm, n // 2, torch.full((n,), float("inf"), device=device)
    n, t, d_in, d_out = spec["n"], spec["t"], spec["d_in"], spec["d_out"]
    a = torch.randn(n, d_in, t, device=device, generator=g).transpose(1, 2)  # unfold layout
    delta = torch.randn(n, d_out, t, device=device, generator=g).transpose(1, 2)
    if spec["op"] == "kron_project":
        r = spec["r"]
        return (
            a,
            delta,
            torch.randn(r, d_in, device=device, generator=g),
            torch.randn(1, r, d_out, device=device, generator=g),
        )
    return a, delta, torch.randn(1, d_out, d_in, device=device, generator=g)


def call(spec: dict, args):
    from fastdal import ops

    if spec["op"] == "last_layer_score":
        return ops.last_layer_score(*args, gamma=2.0, backend=spec["backend"])
    if spec["op"] == "kron_project":
        return ops.kron_project(*args, backend=spec["backend"])
    if spec["op"] == "factored_min_distance":
        return ops.factored_min_distance(*args, backend=spec["backend"])
    return ops.linear_sample_score(*args, ghost=spec.get("ghost", False), backend=spec["backend"])


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _run(spec: dict) -> int:
    import torch

    device = spec.get("device", "cpu")
    args = inputs(spec, device)
    call(spec, args)  # warm-up: first-call allocations (thread pools, kernels) are not the op's
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call(spec, args)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    call(spec, args)
    return _rss("VmHWM") - before


if __name__ == "__main__":
    print(_run(json.loads(sys.argv[1])))
