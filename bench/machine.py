"""What a benchmark ran on, for its results file: the CPU's model name and vector width, or the GPU's name.

Timings of the cpp kernels depend on the CPU more than on anything else recorded (its vector width
decides, for instance, whether ``linear_sample_score`` forms conv gradients in AVX2 registers or through
BLAS), so the CPU is named by its model and SIMD flags rather than by ``platform.processor()``, which is
empty or just "x86_64" on Linux.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def device_name(device: str | torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's (see :func:`cpu_name`)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name() -> str:
    """E.g. "AMD EPYC (family 23, model 1; AVX2, no AVX-512)", from /proc/cpuinfo where there is one."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in info.read_text().splitlines():
        if not line.strip():
            break  # the first processor's block describes them all
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    name = fields.get("model name", platform.machine())
    flags = set(fields.get("flags", "").split())
    simd = ", ".join(["AVX2" if "avx2" in flags else "no AVX2", "AVX-512" if "avx512f" in flags else "no AVX-512"])
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']}; {simd})"
    return f"{name} ({simd})"
