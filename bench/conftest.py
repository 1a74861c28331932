"""Collects every benchmark's timing and memory into bench/results/ops-<device>.json at the end."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).parent / "results"


@pytest.fixture(scope="session")
def records():
    rows: list[dict] = []
    yield rows
    if not rows:
        return
    device = rows[0]["device"]
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["backend"]] = row
    for backends in by_case.values():
        if "torch" in backends:
            for row in backends.values():
                row["speedup_over_torch"] = backends["torch"]["seconds_median"] / row["seconds_median"]
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    report = {
        "device": name,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "date": time.strftime("%Y-%m-%d"),
        "results": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"ops-{device}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{out}:")
    for row in rows:
        speed = row.get("speedup_over_torch")
        print(
            f"  {row['case']:55s} {row['backend']:7s} {row['seconds_median'] * 1e3:9.2f} ms"
            f"  {'' if speed is None else f'{speed:5.2f}x torch'}  peak +{row['peak_extra_bytes'] / 2**20:8.1f} MiB"
        )


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


def median_seconds(benchmark) -> float:
    return statistics.median(benchmark.stats.stats.data)
