"""BADGE selection without embeddings: 1000 of N=50000 pool samples, K=1000 classes, D=512.

A materialized BADGE embedding of this pool would hold N x K x D = 2.56e10 floats (102 GB in
float32); the factored features hold N x (K + D) (0.3 GB). The features are synthetic (a softmax
residual of random logits and random head inputs): the selection's cost does not depend on where
they came from. Each backend runs in a fresh process, which reports the selection's wall time, the
process's peak resident memory over the whole run (features included) and the extra peak during
the selection alone. Results go to ``bench/results/badge-<device>.json``.

    python bench/bench_badge.py [--n 50000 --k 1000 --d 512 --b 1000]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(n: int, k: int, d: int, b: int, backend: str) -> dict:
    """Build factored features and select; runs inside the fresh process."""
    import torch

    import fastdal
    from fastdal.features import FactoredBlock, GradFeatures

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, k, device=device, generator=g) * 3
    labels = logits.argmax(1)
    e = torch.softmax(logits, 1)
    del logits
    e[torch.arange(n, device=device), labels] -= 1
    h = torch.relu(torch.randn(n, d, device=device, generator=g))
    features = GradFeatures([FactoredBlock("fc.weight", "fc.bias", e, h)], labels, ["fc.weight", "fc.bias"], None, 0)
    fastdal.select(features[:2000], 5, method="badge", backend=backend)  # warm-up: thread pools, kernels
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    chosen = fastdal.select(features, b, method="badge", backend=backend)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "backend": backend,
        "seconds": round(seconds, 2),
        "selection_extra_peak_mib": round((_rss("VmHWM") - before) / 2**20, 1),
        "features_mib": round((e.numel() + h.numel()) * e.element_size() / 2**20, 1),
        "distinct": len(set(chosen.tolist())),
    }
    # Process peak over the whole run: VmHWM was reset above, so take the larger of before and after.
    result["process_peak_mib"] = round(max(before, _rss("VmHWM")) / 2**20, 1)
    if device == "cuda":
        result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--b", type=int, default=1000)
    parser.add_argument("--backends", default="auto,torch")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one backend in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.n, args.k, args.d, args.b, args.one)))
        return
    import torch
    from machine import device_name

    import fastdal

    results = []
    for backend in args.backends.split(","):
        command = [sys.executable, __file__, "--one", backend, *(f"--{x}={getattr(args, x)}" for x in "nkdb")]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(results[-1])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {
        "device": device_name(device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "fastdal": fastdal.__version__,
        "auto_backend_here": next(n for n in ("cpp", "torch") if fastdal.backends.available()[n] is None),
        "date": time.strftime("%Y-%m-%d"),
        "shape": {"n": args.n, "k": args.k, "d": args.d, "b": args.b},
        "materialized_embedding_gb": round(args.n * args.k * args.d * 4 / 1e9, 1),
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"badge-{device}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")
    if device == "cpu":
        write_table(report)


def write_table(report: dict) -> None:
    """Put this run's numbers between the bench_badge markers of docs/features.md."""
    shape = report["shape"]
    lines = [
        f"N={shape['n']}, K={shape['k']}, D={shape['d']}, b={shape['b']}, float32; {report['machine']}, "
        f"torch {report['torch']} (auto = {report['auto_backend_here']} here), {report['date']}",
        "",
        "| backend | selection time | process peak memory | extra peak during selection | features |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['backend']} | {r['seconds']:.1f} s | {r['process_peak_mib']:.0f} MiB | "
            f"{r['selection_extra_peak_mib']:.0f} MiB | {r['features_mib']:.0f} MiB |"
        )
    docs = Path(__file__).parent.parent / "docs" / "features.md"
    start, end = "<!-- bench_badge:start -->", "<!-- bench_badge:end -->"
    head, rest = docs.read_text().split(start, 1)
    _, tail = rest.split(end, 1)
    docs.write_text(f"{head}{start}\n" + "\n".join(lines) + f"\n{end}{tail}")


if __name__ == "__main__":
    main()
