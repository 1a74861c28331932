"""Collects every benchmark's timing and memory into bench/results/ops-<device>.json at the end, and on
CPU writes the README's table of them (between its bench_ops markers)."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import pytest
import torch
from machine import device_name

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
    report = {
        "device": device_name(device),
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
    if device == "cpu":
        _update_readme(by_case)
    print(f"\n{out}:")
    for row in rows:
        speed = row.get("speedup_over_torch")
        print(
            f"  {row['case']:55s} {row['backend']:7s} {row['seconds_median'] * 1e3:9.2f} ms"
            f"  {'' if speed is None else f'{speed:5.2f}x torch'}  {_mib(row['peak_extra_bytes'])}"
        )


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


def median_seconds(benchmark) -> float:
    return statistics.median(benchmark.stats.stats.data)


def _update_readme(by_case: dict) -> None:
    lines = [
        "| op | shapes | torch | cpp | cpp speed-up (paired) | extra peak memory, torch / cpp |",
        "|---|---|---|---|---|---|",
    ]
    for backends in by_case.values():
        if "torch" not in backends or "cpp" not in backends:
            continue
        t, c = backends["torch"], backends["cpp"]
        shapes = ", ".join(f"{k}={v}" for k, v in t["shapes"].items())
        lines.append(
            f"| `{t['case'].split(',')[0].removeprefix('op=')}` | {shapes} | {_ms(t['seconds_median'])} | "
            f"{_ms(c['seconds_median'])} | {c['speedup_over_torch_paired']:.2f}x | "
            f"{t['peak_extra_bytes'] / 2**20:.1f} / {c['peak_extra_bytes'] / 2**20:.1f} MiB |"
        )
    readme = Path(__file__).parent.parent / "README.md"
    start, end = "<!-- bench_ops:start -->", "<!-- bench_ops:end -->"
    content = readme.read_text()
    if start in content and end in content:
        head, rest = content.split(start, 1)
        _, tail = rest.split(end, 1)
        readme.write_text(f"{head}{start}\n" + "\n".join(lines) + f"\n{end}{tail}")


def _mib(extra: int | None) -> str:
    """Extra peak memory, or why there is none (not measured for calls of over a PFLOP: each is ~17 s)."""
    return "peak not measured" if extra is None else f"peak +{extra / 2**20:8.1f} MiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"
