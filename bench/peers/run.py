"""fastdal beside the per-sample-gradient libraries: time, peak memory and agreement on six workloads.

For each workload (workloads.py) one process times every method (methods.py) in interleaved rounds and checks
its scores against fastdal's (worker.py); then each method's extra peak memory is measured in a fresh process
of its own (memory.py). With ``--background-load`` the worker also re-times the training step and fastdal
with a second CPU-bound process running (contention.py). The results go to bench/results/peers-cpu.json,
README.md (between the peers markers) and bench/results/peers-cpu.png (report.py).

torch runs with its default number of threads (all cores) unless ``--threads`` says otherwise.

    python bench/peers/run.py [--background-load] [--rounds 3] [--batches 1] [--workloads cnn mlp ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from contention import DESCRIPTION as LOAD_DESCRIPTION
from memory import MALLOC_ENV
from memory import measure as measure_memory
from report import add_ratios, chart, fastdal_is_wrong, print_summary, readme_table, targets, update_readme
from workloads import WORKLOADS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))  # bench/machine.py
from machine import cpu_name  # noqa: E402

PACKAGES = ["fastdal", "backpack-for-pytorch", "unfoldNd", "opacus", "einops", "opt-einsum"]


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def time_workload(name: str, args: argparse.Namespace) -> dict:
    """The worker's record for one workload (its own process, so that nothing carries over between them)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        command = [sys.executable, str(HERE / "worker.py"), name, str(out), "--rounds", str(args.rounds)]
        command += ["--load-rounds", str(args.load_rounds)]
        command += ["--background-load"] * args.background_load + ["--quick"] * args.quick
        command += ["--batches", str(args.batches)] if args.batches else []
        command += ["--threads", str(args.threads)] if args.threads else []
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds per workload (median reported)")
    parser.add_argument("--background-load", action="store_true", help="also time train step and fastdal under load")
    parser.add_argument("--load-rounds", type=int, default=5, help="quiet/loaded round pairs per workload")
    parser.add_argument("--batches", type=int, help="pool batches per workload (default 1; each adds a pool's time)")
    parser.add_argument("--threads", type=int, help="torch threads in every process (default: torch's, all cores)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak memory runs")
    parser.add_argument("--quick", action="store_true", help="a batch of 4 per workload; writes nothing")
    args = parser.parse_args()

    start = time.perf_counter()
    records = []
    for name in args.workloads:
        print(f"[{time.perf_counter() - start:6.0f} s] {name}: timing and agreement", flush=True)
        record = time_workload(name, args)
        if not args.no_memory:
            print(f"[{time.perf_counter() - start:6.0f} s] {name}: peak memory, one fresh process per method")
            for method, entry in record["methods"].items():
                if method == "no-grad forward" and record["layers"] == "all":
                    continue  # the baseline of the last-layer target only
                if entry.get("error") is None:
                    peak = measure_memory(name, method, args.quick, args.threads)
                    entry["peak_extra_bytes"], entry["memory_error"] = peak
        add_ratios(record)
        record["targets"] = targets(record)
        print_summary(record)
        records.append(record)

    wall = time.perf_counter() - start
    report = {
        "machine": cpu_name(),
        "platform": platform.platform(),
        "threads": args.threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "versions": {p: _version(p) for p in PACKAGES},
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "agreement": "max over the pool of |x - fastdal| / max |fastdal|, per component, float32",
        "memory": f"extra peak RSS in a fresh process after one warm-up call, glibc settings {MALLOC_ENV}",
        "background_load": LOAD_DESCRIPTION if args.background_load else None,
        "load_rounds": args.load_rounds if args.background_load else None,
        "wall_seconds": wall,
        "workloads": records,
    }
    print(f"\nwall time {wall:.0f} s")
    if args.quick:
        out = Path(tempfile.mkdtemp(prefix="peers-quick-"))
        (out / "peers-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
        chart(report, out / "peers-cpu.png")
        print(f"quick run: results in {out} (README and bench/results untouched)")
        print(readme_table(report))
        return
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "peers-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    chart(report, results / "peers-cpu.png")
    wrong = [r["label"] for r in records if fastdal_is_wrong(r)]
    if wrong:  # a speed table of wrong scores is worse than none: the README keeps its last good one
        sys.exit(f"fastdal's scores miss its float64 reference on {', '.join(wrong)}: README.md not updated")
    text = readme_table(report) + "\n\n" + _readme_footer(report)
    updated = update_readme(ROOT / "README.md", text)
    print(f"written: {results / 'peers-cpu.json'}, {results / 'peers-cpu.png'}{', README.md' if updated else ''}")


def _readme_footer(report: dict) -> str:
    load = f" Under load: {report['background_load']}." if report["background_load"] else ""
    return (
        f"({report['machine']}, {report['threads']} threads, torch {report['torch']}, "
        f"BackPACK {report['versions']['backpack-for-pytorch']}, Opacus {report['versions']['opacus']}; "
        f"median of {report['rounds']} interleaved rounds; a peer slower than 10 training steps is timed by its "
        "first call; "
        f"memory: extra peak RSS of one batch in a fresh process.{load} "
        f"The run took {report['wall_seconds'] / 60:.0f} min.)"
    )


if __name__ == "__main__":
    main()
