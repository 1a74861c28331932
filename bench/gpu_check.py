"""One device call's worth of GPU checks: build fastdal._C, run the gpu tests, time the ops at the roofline.

Why one script: a GPU lease here is 15 minutes of device time in all, machine start-up included, so a
session gets one full call. This script builds, tests and benchmarks in that call, enforces its own
time budget (the benchmark stops and results are still written once ``--budget-s`` has passed since
the start), and prints a short table last (the run tool's reply carries the end of the output).

Planned device time (H200; after the machine's start of ~1-2 min): build of the CUDA extension
~2-3 min, ``pytest -m gpu tests/`` ~2 min, benchmark ~3 min (cut at the budget, 450 s from the
start by default): under 8 minutes of command time. The one call a GPU session should make::

    run(command="set -o pipefail; PYTHONUNBUFFERED=1 make gpu-check 2>&1 | tee $OUT/gpu-check.log",
        timeout_s=540)

The GPU machine has no package registry: nothing is installed from one. The extension is built with
``pip install -e . --no-build-isolation --no-deps --no-index`` against the preinstalled torch (a CUDA
build, so the CUDA kernels are compiled). Results: JSON (device, torch/triton versions, every number
with its unit) written to ``$OUT/gpu-check-<device>.json`` and ``bench/results/gpu-check-<device>.json``;
the build and test logs go to ``$OUT`` too. Copy the JSON from the reply's files into bench/results.

Without CUDA (or with ``--dry-run``) the same code paths run on CPU: the C++ extension is built, the gpu
tests run (all skipped), and every benchmark runs at tiny shapes on the torch/cpp backends, one rep;
the JSON is marked ``"dry_run": true`` and goes to ``$OUT`` or a temporary folder, never bench/results.

Roofline of ``last_layer_score`` (N rows, D features, K classes): bytes = 4 N D (h read once) + 8 K D
(W and G_W) + 8 K (b, G_b) + 20 N (outputs); flops = 2 * 2 N K D (the products h W^T and h G_W^T). Below
the ridge (flops/bytes < peak flop rate / bandwidth) it is bandwidth-bound and the fraction of
bandwidth is reported; above it, the fraction of the tensor-core TF32 and FP32 peaks and of the
measured GEMM rate.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# Datasheet peaks (dense, no sparsity), by a substring of torch.cuda.get_device_name: leads, not
# measurements; the script measures copy bandwidth and GEMM rate itself.
PEAKS: dict[str, dict[str, float]] = {
    "H200": {"hbm_bytes_per_s": 4.8e12, "fp32_flops": 67e12, "tf32_tensor_flops": 494.7e12},
    "H100 PCIe": {"hbm_bytes_per_s": 2.0e12, "fp32_flops": 51e12, "tf32_tensor_flops": 378e12},
    "H100": {"hbm_bytes_per_s": 3.35e12, "fp32_flops": 67e12, "tf32_tensor_flops": 494.7e12},
    "A100": {"hbm_bytes_per_s": 2.0e12, "fp32_flops": 19.5e12, "tf32_tensor_flops": 156e12},
}


def peaks(device_name: str) -> dict[str, float] | None:
    """Datasheet peaks of the named GPU, or None for one not in :data:`PEAKS`."""
    for key, value in PEAKS.items():
        if key in device_name:
            return value
    return None


def last_layer_roofline(n: int, d: int, k: int) -> dict[str, float]:
    """Fewest bytes moved and flops of one ``last_layer_score`` call (module docstring)."""
    return {"bytes": 4 * n * d + 8 * k * d + 8 * k + 20 * n, "flops": 4 * n * k * d}


def roofline_fractions(
    n: int, d: int, k: int, seconds: float, peak: dict[str, float] | None, measured: dict[str, float]
) -> dict[str, Any]:
    """Which bound applies and the achieved fraction of it: bandwidth if below the ridge, else flop rate."""
    work = last_layer_roofline(n, d, k)
    bandwidth = measured.get("copy_bytes_per_s") or (peak or {}).get("hbm_bytes_per_s")
    flop_rate = (peak or {}).get("fp32_flops") or measured.get("gemm_fp32_flops_per_s")
    out: dict[str, Any] = {"roofline_bytes": work["bytes"], "roofline_flops": work["flops"]}
    if not bandwidth or not flop_rate:
        return out
    memory_bound = work["flops"] / work["bytes"] < flop_rate / bandwidth
    out["bound"] = "bandwidth" if memory_bound else "compute"
    if memory_bound:
        out["achieved_bytes_per_s"] = work["bytes"] / seconds
        if measured.get("copy_bytes_per_s"):
            out["fraction_of_measured_copy_bandwidth"] = work["bytes"] / seconds / measured["copy_bytes_per_s"]
        if peak:
            out["fraction_of_datasheet_bandwidth"] = work["bytes"] / seconds / peak["hbm_bytes_per_s"]
    else:
        rate = work["flops"] / seconds
        out["achieved_flops_per_s"] = rate
        if peak:
            out["fraction_of_tf32_tensor_peak"] = rate / peak["tf32_tensor_flops"]
            out["fraction_of_fp32_peak"] = rate / peak["fp32_flops"]
        for key in ("gemm_fp32_flops_per_s", "gemm_tf32_flops_per_s"):
            if measured.get(key):
                out[f"fraction_of_measured_{key.removesuffix('_flops_per_s')}"] = rate / measured[key]
    return out


class Budget:
    """Seconds left of ``total`` since the script started."""

    def __init__(self, total: float) -> None:
        self.start, self.total = time.monotonic(), total

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total - self.elapsed()


def _run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` with its output in ``log``; returns its exit status, seconds and last line."""
    start = time.monotonic()
    try:
        with log.open("w") as f:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=max(1, timeout), env=env)
        code: int | str = rc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    print(f"$ {' '.join(cmd)}  -> {code} in {time.monotonic() - start:.0f} s", flush=True)
    print("\n".join(lines[-15:]), flush=True)
    return {"cmd": " ".join(cmd), "returncode": code, "seconds": time.monotonic() - start, "tail": lines[-3:]}


def build(out: Path, budget: Budget) -> dict[str, Any]:
    """Build fastdal._C in place of an editable install, fetching nothing (no registry on the GPU host)."""
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
    import torch

    if torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in env:
        # only this GPU's architecture: half the compile time of setup.py's default list
        env["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*torch.cuda.get_device_capability())
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-e", ".", "--no-build-isolation", "--no-deps", "--no-index"]
    # Capped so that tests and benchmark keep their share of the lease (a CUDA build of csrc/ is ~2 min).
    return _run_logged([*cmd, "--disable-pip-version-check"], out / "build.log", min(240, budget.left() - 150), env)


def gpu_tests(out: Path, budget: Budget) -> dict[str, Any]:
    """The gpu-marked tests (tests/test_gpu.py and the cuda cases of tests/test_ops.py), in a fresh process."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/", "-rfEs", "--tb=short"]
    return _run_logged(cmd, out / "gpu-tests.log", min(150, budget.left() - 100))


class Timer:
    """Median seconds of a call: CUDA events on a GPU (work is asynchronous), perf_counter on CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def once(self, fn: Callable[[], object]) -> float:
        import torch

        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3

    def median(self, fn: Callable[[], object], reps: int, target_s: float, budget: Budget) -> dict[str, Any]:
        """Warm-up call (compilation, handles), then up to ``reps`` timed calls within ``target_s``."""
        self.once(fn)
        times = [self.once(fn)]
        more = min(reps - 1, int(target_s / max(times[0], 1e-6)))
        for _ in range(max(0, more)):
            if budget.left() < 0:
                break
            times.append(self.once(fn))
        return {"seconds_median": statistics.median(times), "reps": len(times)}


@contextlib.contextmanager
def precision(mode: str | None) -> Iterator[str]:
    """fastdal.matmul_precision(mode) where fastdal has it; else the one path there is ("default")."""
    import fastdal

    if mode is None or not hasattr(fastdal, "matmul_precision"):
        yield "default"
        return
    with fastdal.matmul_precision(mode):
        yield mode


def ceilings(dry: bool, timer: Timer, budget: Budget) -> dict[str, float]:
    """Measured copy bandwidth (bytes read + written per second) and fp32 GEMM rate, TF32 off and on."""
    import torch

    device = "cpu" if dry else "cuda"
    n = (1 << 20) if dry else (1 << 29)  # 2 GiB of float32 on the GPU: far past the 60 MB L2
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy = timer.median(functools.partial(dst.copy_, src), 10, 1.0, budget)["seconds_median"]
    del src, dst
    size = 256 if dry else 8192
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    out = {"copy_bytes_per_s": 2 * n * 4 / copy}
    flags = torch.backends.cuda.matmul
    before = flags.allow_tf32
    try:
        for name, tf32 in (("gemm_fp32_flops_per_s", False), ("gemm_tf32_flops_per_s", True)):
            flags.allow_tf32 = tf32
            seconds = timer.median(functools.partial(torch.mm, a, b), 10, 1.0, budget)["seconds_median"]
            out[name] = 2 * size**3 / seconds
    finally:
        flags.allow_tf32 = before
    return out


def cases(dry: bool, full: bool) -> list[dict[str, Any]]:
    """Benchmark cases (bench/op_cases.py), most important first (the budget cuts the tail)."""
    import op_cases

    if dry:
        return [dict(c) for c in op_cases.DRY_RUN]
    big = [{**c, "full": True} for c in op_cases.FULL_SIZE] if full else []
    return [dict(c) for c in op_cases.GPU_ROOFLINE + op_cases.LAYERS] + big


def benchmark(dry: bool, full: bool, budget: Budget, measured: dict[str, float], device_name: str) -> list[dict]:
    """Each case on each backend at each precision, until the budget is spent."""
    import torch
    from peak_memory import call, inputs

    import fastdal.backends as backends

    device = "cpu" if dry else "cuda"
    timer = Timer(cuda=not dry)
    names = ("torch", "cpp") if dry else ("torch", "cuda", "triton")
    available = [b for b in names if backends.available()[b] is None]
    peak = None if dry else peaks(device_name)
    rows: list[dict] = []
    for spec in cases(dry, full):
        spec = dict(spec)
        is_full = spec.pop("full", False)
        args = inputs(spec, device)
        # Memory-bound last_layer at small K does not depend on the matmul mode: one precision suffices.
        modes = [None] if spec["op"] == "factored_min_distance" or spec.get("k") == 10 else ["tf32x3", "ieee"]
        for mode in modes:
            reference = None
            for backend in available:
                if is_full and backend == "torch":
                    continue  # ~25k row chunks at this size: minutes of Python loop, not a kernel measurement
                row: dict[str, Any] = {"case": spec, "backend": backend}
                if budget.left() < (90 if is_full else 5):
                    row["skipped"] = "time budget spent"
                    rows.append(row)
                    continue
                run_spec = {**spec, "backend": backend}
                try:
                    with precision(mode) as used:
                        row["precision"] = used
                        if is_full:  # kernels already compiled by the reduced-N case: one call
                            row.update(
                                {"seconds_median": timer.once(functools.partial(call, run_spec, args)), "reps": 1}
                            )
                        else:
                            reps, target = (1, 0.0) if dry else (5, 1.5)
                            row.update(timer.median(functools.partial(call, run_spec, args), reps, target, budget))
                        # A further call to compare outputs (not for the full size: another ~17 s call).
                        result = None if is_full else call(run_spec, args)
                    first = result[0] if isinstance(result, tuple) else result
                    if reference is None:
                        reference = first
                    elif first is not None:
                        scale = reference.double().abs().max().item() or 1.0
                        row["max_rel_diff_vs_first_backend"] = (
                            first.double() - reference.double()
                        ).abs().max().item() / scale
                except Exception as error:  # one broken backend must not cost the other numbers
                    row["error"] = f"{type(error).__name__}: {error}"[:500]
                if spec["op"] == "last_layer_score" and "seconds_median" in row:
                    row.update(
                        roofline_fractions(spec["n"], spec["d"], spec["k"], row["seconds_median"], peak, measured)
                    )
                rows.append(row)
                print(_line(row), flush=True)
        del args
        if not dry:
            torch.cuda.empty_cache()
    return rows


def _line(row: dict) -> str:
    case = ",".join(f"{k}={v}" for k, v in row["case"].items())
    if "seconds_median" not in row:
        return f"{case:70s} {row['backend']:7s} {row.get('error') or row.get('skipped')}"
    extra = ""
    for key in ("fraction_of_measured_copy_bandwidth", "fraction_of_tf32_tensor_peak", "fraction_of_fp32_peak"):
        if key in row:
            extra += f" {key.removeprefix('fraction_of_')}={row[key]:.2f}"
    return (
        f"{case:70s} {row['backend']:7s} {row.get('precision', ''):8s} {row['seconds_median'] * 1e3:10.3f} ms"
        f" x{row['reps']}{extra}"
    )


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    """Build, test, benchmark; write the JSON; exit non-zero if the build or the tests failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU shapes (automatic without CUDA)")
    parser.add_argument("--full", action="store_true", help="also last_layer_score at N=1M, K=131072 (last)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds from start after which to stop")
    parser.add_argument("--skip-build", action="store_true", help="use the fastdal._C already built")
    parser.add_argument("--skip-tests", action="store_true", help="benchmark only")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)

    import torch  # torch's import is slow; after argparse so --help is quick

    dry = args.dry_run or not torch.cuda.is_available()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"dry_run": dry, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    report["build"] = None if args.skip_build else build(out, budget)
    report["tests"] = None if args.skip_tests else gpu_tests(out, budget)

    sys.path.insert(0, str(ROOT / "bench"))  # peak_memory's input and call helpers
    import fastdal.backends as backends

    device_name = "cpu (dry run)" if dry else torch.cuda.get_device_name(0)
    report.update(
        {
            "device": device_name,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": _version("triton"),
            "backends": backends.available(),
            "datasheet_peaks": None if dry else peaks(device_name),
            "units": "seconds; bytes/s; flop/s; fractions are of the named ceiling",
        }
    )
    if not dry:
        props = torch.cuda.get_device_properties(0)
        report["multiprocessors"] = props.multi_processor_count
        report["nvidia_smi"] = _nvidia_smi()
    # The benchmark gets at least 100 s even after a slow build: worst case 240 + 150 + 100 s plus
    # start-up, inside the 540 s run limit.
    budget.total = max(budget.total, budget.elapsed() + 100)
    timer = Timer(cuda=not dry)
    measured = ceilings(dry, timer, budget)
    report["measured"] = measured
    print(
        f"copy {measured['copy_bytes_per_s'] / 1e9:.0f} GB/s; GEMM fp32 {measured['gemm_fp32_flops_per_s'] / 1e12:.1f}"
        f" TFLOP/s, tf32 {measured['gemm_tf32_flops_per_s'] / 1e12:.1f} TFLOP/s",
        flush=True,
    )
    report["results"] = benchmark(dry, args.full, budget, measured, device_name)
    report["seconds_total"] = budget.elapsed()

    text = json.dumps(report, indent=2, default=str) + "\n"
    name = f"gpu-check-{_slug(device_name)}.json"
    (out / name).write_text(text)
    written = [out / name]
    if not dry:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / name).write_text(text)
        written.append(RESULTS / name)
    print("\n".join(_line(r) for r in report["results"]))
    for step in ("build", "tests"):
        if report[step]:
            print(
                f"{step}: returncode {report[step]['returncode']} in {report[step]['seconds']:.0f} s; "
                f"{' | '.join(report[step]['tail'][-1:])}"
            )
    print(f"total {budget.elapsed():.0f} s; wrote {', '.join(map(str, written))}")
    failed = [s for s in ("build", "tests") if report[s] and report[s]["returncode"] != 0]
    return 1 if failed else 0


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


def _nvidia_smi() -> str | None:
    """Clocks and state as found (never changed: METHOD.md)."""
    query = "name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw"
    try:
        cmd = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
