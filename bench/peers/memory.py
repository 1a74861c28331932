"""Extra peak memory of one method on one workload, in a fresh process (as bench/peak_memory.py measures it).

The process builds the workload, prepares the method and runs it once on a pool of 4 samples (first-call
allocations such as thread pools and kernel caches are not the method's, and a small warm-up keeps the slow
peers' cost down), then resets its peak resident set (VmHWM) through /proc/self/clear_refs, runs the method
on one full batch and reports VmHWM minus the VmRSS before that run. One batch is enough: every method, the
training step included, lets go of a batch's memory before the next one, so one batch's peak is the pool's
(only the (N,) result columns grow with the pool).

glibc keeps freed blocks below its mmap threshold for reuse, and raises that threshold (up to 32 MiB) each
time a large block is freed; the warm-up run would then leave tens of MiB of freed heap behind that the
measured run reuses without growing the resident set, hiding part of its peak. The parent therefore fixes
the threshold at 64 KiB (``MALLOC_MMAP_THRESHOLD_``, which also turns the adjustment off), so that every
large block is mapped on allocation and returned on free, for every method alike.

    python bench/peers/memory.py WORKLOAD METHOD [--quick] [--threads N]     # prints the extra bytes
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def measure(workload: str, method: str, quick: bool, threads: int | None = None) -> tuple[int | None, str | None]:
    """(extra peak bytes, None), or (None, why not) when the method fails in the fresh process."""
    command = [sys.executable, str(Path(__file__).resolve()), workload, method] + (["--quick"] if quick else [])
    command += ["--threads", str(threads)] if threads else []
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return None, lines[-1] if lines else f"exit status {out.returncode}"
    return int(out.stdout.strip().splitlines()[-1]), None


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _main() -> None:
    import warnings

    import torch
    from methods import METHODS, build_setup

    parser = argparse.ArgumentParser()
    parser.add_argument("workload")
    parser.add_argument("method")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = build_setup(args.workload, quick=args.quick, batches=1)
    run = METHODS[args.method].prepare(setup)
    pool, labels = setup.pool, setup.pool_labels
    setup.pool, setup.pool_labels = [pool[0][:4]], [labels[0][:4]]
    run()  # warm-up
    setup.pool, setup.pool_labels = pool, labels
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    result = run()
    peak = _status("VmHWM")
    del result
    print(peak - before)


if __name__ == "__main__":
    _main()
