"""One device call's worth of GPU checks: build fastdal._C, run the gpu tests, time the ops at the roofline.

Why one script: a GPU lease here is 15 minutes of device time in all, machine start-up included, so a
session gets one full call. This script builds, tests and benchmarks in that call, bounds every step in time,
and leaves a JSON report that a failure, a CUDA fault or a cut cannot empty. The one call a GPU session makes::

    run(command="set -o pipefail; PYTHONUNBUFFERED=1 make gpu-check 2>&1 | tee $OUT/gpu-check.log",
        timeout_s=540)

Planned time (defaults; H100/H200, after the machine's start of ~1-2 min), under 8 minutes of command time:

=============  ======================================================  ==========================
section        what                                                    bound (from the start)
=============  ======================================================  ==========================
environment    device, versions, nvidia-smi (a fresh process)          30 s (takes ~5 s)
build          ``pip install -e .`` of fastdal._C for this GPU's arch  ``--build-timeout-s`` 240 s
tests          ``pytest -m gpu`` on the files that hold gpu tests      ``--tests-timeout-s`` 150 s,
                                                                       less if the benchmark would
                                                                       keep under 90 s
ceilings       measured copy bandwidth and GEMM rates                  30 s (takes ~5 s)
benchmark      every op case on each backend, most telling first       until ``--budget-s`` 450 s;
                                                                       killed at 460 s
=============  ======================================================  ==========================

Worst case ~475 s (460 s, a stuck child's SIGKILL grace and the final write), inside the 540 s run limit and
the 8 minutes; a failed build leaves more time to the rest, a slow one less to the tests (never to the benchmark).

What cannot come back empty:

* **The JSON is rewritten after every step** (atomically: a temporary file, then ``os.replace``), to
  ``$OUT/gpu-check-<device>.json`` (``--out DIR`` elsewhere, a temporary folder without either) and, on a GPU,
  ``bench/results/gpu-check-<device>.json``: each section as it starts (``"status": "running"``) and ends, and
  each benchmark measurement as it finishes. Copy the JSON from the reply's files into bench/results.
* **Each section in its own try**: an exception is that section's ``"status": "error"`` with the traceback's
  tail; the sections after it still run.
* **The risky sections run in child processes** (environment, tests, ceilings, benchmark: ``--worker``), so a
  CUDA fault, whose sticky error leaves that process's CUDA context unusable, costs one process: the tests'
  fault leaves the benchmark its own context, and a benchmark worker that dies is restarted after the
  measurement it died in (recorded as that row's error, with the log's tail).
* **The build is bounded**: it runs in its own session (process group) and, past ``--build-timeout-s``, the
  whole group is killed (SIGTERM, then SIGKILL), so no nvcc keeps running. If it fails or times out, the tests
  and the benchmark still run, from the source tree with the extension absent: ``fastdal._C`` is blocked in
  the children (a stale or partial build is never loaded), ``fastdal.kernels`` is found in ``kernels/``, and the
  backends report the extension missing, so the Triton and torch paths are tested and timed.
  ``FASTDAL_BUILD_EXT=0`` in every child: fastdal never starts a build of its own at first use here.
* **A cut still reports**: SIGTERM or SIGINT (the run tool's timeout) stops the running child's process group
  (pytest gets SIGINT first, so it prints its summary), marks that section ``"cut"``, writes the JSON and prints
  the summary. The summary (last lines of the output, and ``"failures"`` in the JSON) names every failed
  section, the failing tests (from ``pytest -v -rfE``) and, if cut, the test that was running.

The GPU machine has no package registry: nothing is installed from one (``pip install ... --no-index``
against the preinstalled torch, a CUDA build, so the CUDA kernels are compiled). Logs of each step go to the
output folder beside the JSON.

Without CUDA (or with ``--dry-run``) the same code paths run on CPU: the C++ extension is built, the gpu
tests run (all skipped), and every benchmark case runs at tiny shapes on the torch, cpp and triton backends
(Triton under its interpreter), one rep; the JSON is marked ``"dry_run": true`` and never goes to
bench/results. ``--force-build-failure`` replaces the build by a command that fails (``exit``) or hangs with a
child process until ``--build-timeout-s`` (``hang``): the dry run then proves, in CI and without a compiler,
that the report holds the failed build and the tests and benchmark of the torch and Triton paths
(``make gpu-check-dry``; tests/test_gpu_check.py). A forced failure does not count in the exit status.

Roofline of ``last_layer_score`` (N rows, D features, K classes): bytes = 4 N D (h read once) + 8 K D
(W and G_W) + 8 K (b, G_b) + 20 N (outputs); flops = 2 * 2 N K D (the products h W^T and h G_W^T). Below
the ridge (flops/bytes < peak flop rate / bandwidth) it is bandwidth-bound and the fraction of
bandwidth is reported; above it, the fraction of the tensor-core TF32 and FP32 peaks and of the
measured GEMM rate.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import importlib.abc
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
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

# Time bounds of the quick sections (module docstring); the others are options.
ENVIRONMENT_TIMEOUT_S = 30.0
CEILINGS_TIMEOUT_S = 30.0
BENCHMARK_KEEPS_S = 90.0  # the tests' bound shrinks so that ceilings and benchmark keep this much
BENCHMARK_GRACE_S = 10.0  # past the budget, a benchmark worker stuck in one call is killed
STOP_GRACE_S = 8.0  # between the polite signal to a child's group and SIGKILL
POLL_S = 2.0  # how often a running child's section file is merged into the report
# For tests/test_gpu_check.py only: the benchmark worker aborts at this index of its plan, as a process does on a
# CUDA fault, so that the restart after it is tested without a GPU.
CRASH_AT_ENV = "GPU_CHECK_CRASH_AT_INDEX"


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
    """Seconds left of ``total`` since the script (or a worker) started."""

    def __init__(self, total: float) -> None:
        self.start, self.total = time.monotonic(), total

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total - self.elapsed()


# ----------------------------------------------------------------------------------------------------------
# The report on disk
# ----------------------------------------------------------------------------------------------------------
def write_json_atomically(path: Path, data: Any) -> None:
    """A reader (or a kill) never sees half a file: write beside it, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Report:
    """The run's JSON, written to every path in :attr:`paths` at each :meth:`write`."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.paths: list[Path] = []

    def section(self, name: str) -> dict[str, Any]:
        return self.data["sections"].setdefault(name, {})

    def write(self) -> None:
        for path in self.paths:
            write_json_atomically(path, self.data)


# ----------------------------------------------------------------------------------------------------------
# Child processes: bounded in time, killed by process group
# ----------------------------------------------------------------------------------------------------------
class Cut(BaseException):
    """SIGTERM or SIGINT reached the script (a BaseException, so that no section's ``except Exception`` takes it)."""


def _raise_cut(signum: int, frame: object) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not interrupt the final write
        signal.signal(sig, signal.SIG_IGN)
    raise Cut(signal.Signals(signum).name)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if this script dies without stopping it (Linux prctl
    PR_SET_PDEATHSIG), the one case the signal handlers cannot cover."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def stop_group(proc: subprocess.Popen, first: signal.Signals) -> None:
    """Stop the child's whole process group (its own session): ``first``, then SIGKILL after a grace period."""
    for sig, grace in ((first, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; what it started may not be: SIGKILL whatever is left of the group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


def _tail(log: Path, lines: int) -> list[str]:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def run_bounded(
    cmd: list[str],
    log: Path,
    timeout: float,
    env: dict[str, str] | None = None,
    stop_signal: signal.Signals = signal.SIGTERM,
    on_poll: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run ``cmd`` in a session of its own with its output in ``log``, calling ``on_poll`` every few seconds;
    past ``timeout`` seconds, or when the script is cut, its whole process group is stopped.

    Returns the command, its returncode (``"timeout"`` when stopped at the bound), seconds and the log's tail."""
    start = time.monotonic()
    timeout = max(1.0, timeout)
    with log.open("w") as output:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        returncode: int | str | None = None
        try:
            while returncode is None:
                try:
                    returncode = proc.wait(timeout=min(POLL_S, max(0.01, timeout - (time.monotonic() - start))))
                except subprocess.TimeoutExpired:
                    if time.monotonic() - start >= timeout:
                        stop_group(proc, stop_signal)
                        returncode = "timeout"
                if on_poll is not None:
                    on_poll()
        finally:
            if proc.poll() is None:  # cut (or an error of on_poll): the child must not outlive this call
                stop_group(proc, stop_signal)
    seconds = time.monotonic() - start
    tail = _tail(log, 15)
    print(f"$ {' '.join(cmd)}\n  -> {returncode} in {seconds:.0f} s (log {log})", flush=True)
    if returncode != 0:
        print("\n".join("  | " + line for line in tail), flush=True)
    return {"cmd": " ".join(cmd), "returncode": returncode, "seconds": round(seconds, 1), "tail": tail}


# ----------------------------------------------------------------------------------------------------------
# Sections (this process: the orchestrator, which never touches CUDA)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    """What the sections share."""

    args: argparse.Namespace
    budget: Budget
    out: Path
    report: Report
    dry: bool = True
    device: dict[str, Any] = dataclasses.field(default_factory=dict)
    block_extension: bool = False  # the build failed: children must not load a stale fastdal._C
    measured: dict[str, float] = dataclasses.field(default_factory=dict)


def run_section(ctx: Context, name: str, body: Callable[[Context], dict[str, Any]]) -> dict[str, Any]:
    """``body``'s result as section ``name`` of the report, written as it starts and as it ends; an exception
    becomes the section's error (the next sections run all the same), a cut marks it and goes on up."""
    section = ctx.report.section(name)
    section.clear()
    section["status"] = "running"
    ctx.report.write()
    start = time.monotonic()
    try:
        section.update(body(ctx))
    except Cut:
        section["status"] = "cut"
        raise
    except Exception as error:
        section["status"] = "error"
        section["error"] = f"{type(error).__name__}: {error}"[:2000]
        section["traceback_tail"] = traceback.format_exc().splitlines()[-12:]
        print(f"{name}: {section['error']}", flush=True)
    finally:
        section["seconds"] = round(time.monotonic() - start, 1)
        ctx.report.write()
    return section


def worker_env(ctx: Context) -> dict[str, str]:
    """The children's environment: no build of fastdal._C at first use (it would eat the budget; the build
    section is the one build), and Triton's interpreter exactly in a dry run."""
    env = {**os.environ, "FASTDAL_BUILD_EXT": "0", "PYTHONUNBUFFERED": "1"}
    if ctx.dry:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_worker(
    ctx: Context,
    name: str,
    options: list[str],
    timeout: float,
    on_data: Callable[[dict[str, Any]], None] | None = None,
    stop_signal: signal.Signals = signal.SIGTERM,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """This script as ``--worker name`` in a child; its run (run_bounded) and the last data it saved. While it
    runs, each new save of its section file is handed to ``on_data`` and the report rewritten."""
    file = ctx.out / "sections" / f"{name}.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--section-file", str(file)]
    cmd += ["--dry-run"] * ctx.dry + ["--no-extension"] * ctx.block_extension + options
    seen = {"mtime": None}

    def merge() -> None:
        with contextlib.suppress(OSError):
            mtime = file.stat().st_mtime_ns
            if mtime != seen["mtime"] and on_data is not None and (data := read_json(file)) is not None:
                seen["mtime"] = mtime
                on_data(data)
                ctx.report.write()

    run = run_bounded(cmd, ctx.out / f"{name}.log", timeout, worker_env(ctx), stop_signal, merge)
    return run, read_json(file) or {}


def _worker_failure(run: dict[str, Any]) -> dict[str, Any]:
    """A worker that did not exit 0: its status and the log's tail (a Python traceback or a crash)."""
    status = "timeout" if run["returncode"] == "timeout" else "error"
    return {"status": status, "returncode": run["returncode"], "error": " | ".join(run["tail"][-1:]), "log": run}


def environment_section(ctx: Context) -> dict[str, Any]:
    """Device, versions and clocks, from a child (this process stays free of CUDA)."""
    run, data = run_worker(ctx, "environment", [], ENVIRONMENT_TIMEOUT_S)
    ctx.device = data
    ctx.dry = ctx.args.dry_run or not data.get("cuda_available")  # unknown is treated as no GPU
    if run["returncode"] != 0:
        return {**_worker_failure(run), **data}
    return {"status": "ok", **data}


def build_command(ctx: Context) -> list[str]:
    """The build: pip's editable install, fetching nothing (no registry on the GPU host); or the forced failure."""
    if ctx.args.force_build_failure == "exit":
        return [sys.executable, "-c", "import sys; sys.exit('build failure forced by --force-build-failure')"]
    if ctx.args.force_build_failure == "hang":  # a child that outlives its parent's kill unless the group dies
        return ["sh", "-c", 'sleep 600 & echo "forced hang: child pid $!"; wait']
    pip = [sys.executable, "-m", "pip", "install", "-q", "-e", ".", "--no-build-isolation", "--no-deps", "--no-index"]
    return [*pip, "--disable-pip-version-check"]


def build_section(ctx: Context) -> dict[str, Any]:
    """Build fastdal._C in place (an editable install), bounded by --build-timeout-s."""
    if ctx.args.skip_build:
        return {"status": "skipped", "why": "--skip-build: the fastdal._C already built is used"}
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
    env.pop("FASTDAL_BUILD_EXT", None)  # a 0 there would make this an install without the extension
    capability = ctx.device.get("capability")
    if not ctx.dry and capability and "TORCH_CUDA_ARCH_LIST" not in env:
        # only this GPU's architecture: a fraction of the compile time of setup.py's default list
        env["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*capability)
    run = run_bounded(build_command(ctx), ctx.out / "build.log", ctx.args.build_timeout_s, env)
    status = "ok" if run["returncode"] == 0 else "timeout" if run["returncode"] == "timeout" else "failed"
    return {
        "status": status,
        "forced": ctx.args.force_build_failure,
        "arch_list": env.get("TORCH_CUDA_ARCH_LIST"),
        **run,
    }


def gpu_test_files() -> list[str]:
    """The test files that hold gpu-marked tests: collecting only them keeps other files' imports (and their
    packages, which the GPU machine may lack) out of the run."""
    files = sorted(ROOT.glob("tests/test_*.py"))
    return [str(p.relative_to(ROOT)) for p in files if "pytest.mark.gpu" in p.read_text(errors="replace")]


def parse_pytest_log(text: str) -> dict[str, Any]:
    """Outcomes of a ``pytest -v -rfE`` run from its output, also when it was cut: counts per outcome, the
    failed and errored tests with pytest's one-line reason, and the test still running at a cut."""
    outcomes: dict[str, int] = {}
    last_started = None
    for line in text.splitlines():
        if m := re.match(r"(\S+::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", line):
            outcomes[m[2].lower()] = outcomes.get(m[2].lower(), 0) + 1
            last_started = None
        elif m := re.fullmatch(r"(\S+::\S+) *", line):
            last_started = m[1]
    failures = [
        {"outcome": m[1], "test": m[2], "reason": (m[3] or "")[:300]}
        for m in re.finditer(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$", text, re.MULTILINE)
    ]
    totals = re.findall(r"^=+ (.+ in [\d.]+s.*?) =+$", text, re.MULTILINE)
    return {
        "outcomes": outcomes,
        "totals": totals[-1] if totals else None,
        "failures": failures,
        "running_when_cut": last_started,
    }


def tests_section(ctx: Context) -> dict[str, Any]:
    """The gpu-marked tests in a child, bounded so that the benchmark keeps its share of the budget."""
    if ctx.args.skip_tests:
        return {"status": "skipped", "why": "--skip-tests"}
    files = ctx.args.tests or gpu_test_files()
    pytest_args = ["-v", "-rfE", "--tb=short", "-m", "gpu", *files]
    timeout = min(ctx.args.tests_timeout_s, ctx.budget.left() - BENCHMARK_KEEPS_S)
    # SIGINT first: pytest then stops as on Ctrl-C and still prints its short summary of failures
    run, _ = run_worker(ctx, "tests", ["--pytest-args", json.dumps(pytest_args)], timeout, stop_signal=signal.SIGINT)
    parsed = parse_pytest_log((ctx.out / "tests.log").read_text(errors="replace"))
    if run["returncode"] == 0:
        status = "ok"
    elif run["returncode"] == "timeout":
        status = "timeout"
    else:
        status = "failed"
    return {"status": status, "files": files, "extension_blocked": ctx.block_extension, **parsed, "log": run}


def ceilings_section(ctx: Context) -> dict[str, Any]:
    """Measured copy bandwidth and GEMM rates, in a child; the benchmark's roofline fractions use them."""
    run, data = run_worker(ctx, "ceilings", [], CEILINGS_TIMEOUT_S)
    ctx.measured = {k: v for k, v in data.items() if isinstance(v, float)}
    if run["returncode"] != 0:
        return {**_worker_failure(run), **data}
    return {"status": "ok", **data}


def benchmark_section(ctx: Context) -> dict[str, Any]:
    """Every benchmark measurement, in children: a worker that dies (a CUDA fault) is recorded in the row it was
    measuring, and a fresh one goes on after that row while the budget lasts."""
    if ctx.budget.left() < 10:
        return {"status": "skipped", "why": "the time budget was spent before the benchmark (--budget-s)"}
    section = ctx.report.section("benchmark")
    rows: list[dict[str, Any]] = []
    restarts: list[dict[str, Any]] = []
    start_index = 0

    def show(data: dict[str, Any]) -> None:  # the rows so far, live in the report
        section.update(backends=data.get("backends"), plan_size=data.get("plan_size"))
        section["rows"] = rows + data.get("rows", [])

    while True:
        # the budget's end as a wall-clock time: the worker's own start-up must not extend it
        options = ["--start-index", str(start_index), "--deadline", f"{time.time() + ctx.budget.left():.1f}"]
        options += ["--measured", json.dumps(ctx.measured), "--device-name", ctx.device.get("device", "")]
        options += ["--full"] * ctx.args.full
        run, data = run_worker(ctx, "benchmark", options, ctx.budget.left() + BENCHMARK_GRACE_S, show)
        show(data)
        rows = section["rows"]
        current = data.get("current")
        if run["returncode"] == 0 or current is None:
            break
        rows.append({**current["item"], "error": f"the worker died here (returncode {run['returncode']})", "log": run})
        restarts.append({"after_index": current["index"], "returncode": run["returncode"]})
        start_index = current["index"] + 1
        if run["returncode"] == "timeout" or ctx.budget.left() < 30 or start_index >= data.get("plan_size", 0):
            break
    errors = [r for r in rows if r.get("error")]
    result = {"status": "failed" if errors else "ok", "rows": rows, "restarts": restarts}
    if run["returncode"] not in (0, None) and current is None:  # died before its first measurement
        result.update(_worker_failure(run))
    return result


# ----------------------------------------------------------------------------------------------------------
# Workers (children): the source tree's fastdal, with or without its extension
# ----------------------------------------------------------------------------------------------------------
class _SourceTreeKernels(importlib.abc.MetaPathFinder):
    """``fastdal.kernels`` from the source tree's kernels/: an install maps it there, and this run may have none
    (a failed build installs nothing)."""

    def find_spec(self, name: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != "fastdal.kernels":
            return None
        init = ROOT / "kernels" / "__init__.py"
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


def use_source_tree(block_extension: bool) -> None:
    """Import fastdal from this tree (in place of bench/ at the head of sys.path); with ``block_extension``, make
    ``import fastdal._C`` fail as if it were not built, so that no stale or partial build is loaded and the
    backends report it missing."""
    sys.path[0] = str(ROOT)
    sys.meta_path.insert(0, _SourceTreeKernels())
    if block_extension:
        sys.modules["fastdal._C"] = None  # type: ignore[assignment]  # import raises ModuleNotFoundError


class Checkpoint:
    """A worker's section file, saved atomically after each step; the worker ends itself once the script that
    started it is gone (so an orphan never keeps a GPU busy)."""

    def __init__(self, path: Path) -> None:
        self.path, self.data, self.parent = path, {}, os.getppid()

    def save(self) -> None:
        if os.getppid() != self.parent:
            raise SystemExit("gpu_check.py is gone; stopping")
        write_json_atomically(self.path, self.data)


def worker_environment(args: argparse.Namespace, checkpoint: Checkpoint) -> None:
    import torch

    cuda = torch.cuda.is_available()
    data = {
        "cuda_available": cuda,
        "device": "cpu (dry run)" if args.dry_run or not cuda else torch.cuda.get_device_name(0),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        data.update(
            gpu=torch.cuda.get_device_name(0),
            capability=list(torch.cuda.get_device_capability(0)),
            multiprocessors=props.multi_processor_count,
            memory_bytes=props.total_memory,
            nvidia_smi=_nvidia_smi(),
        )
    checkpoint.data = data
    checkpoint.save()


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


def worker_ceilings(args: argparse.Namespace, checkpoint: Checkpoint) -> None:
    """Measured copy bandwidth (bytes read + written per second) and fp32 GEMM rate, TF32 off and on; each
    saved as it is measured."""
    import torch

    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    timer, budget = Timer(cuda=not dry), Budget(CEILINGS_TIMEOUT_S)
    n = (1 << 20) if dry else (1 << 29)  # 2 GiB of float32 on the GPU: far past the 60 MB L2
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy = timer.median(functools.partial(dst.copy_, src), 10, 1.0, budget)["seconds_median"]
    checkpoint.data["copy_bytes_per_s"] = 2 * n * 4 / copy
    checkpoint.save()
    del src, dst
    size = 256 if dry else 8192
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    flags = torch.backends.cuda.matmul
    for name, tf32 in (("gemm_fp32_flops_per_s", False), ("gemm_tf32_flops_per_s", True)):
        flags.allow_tf32 = tf32
        seconds = timer.median(functools.partial(torch.mm, a, b), 10, 1.0, budget)["seconds_median"]
        checkpoint.data[name] = 2 * size**3 / seconds
        checkpoint.save()
    measured = checkpoint.data
    print(
        f"copy {measured['copy_bytes_per_s'] / 1e9:.0f} GB/s; GEMM fp32 {measured['gemm_fp32_flops_per_s'] / 1e12:.1f}"
        f" TFLOP/s, tf32 {measured['gemm_tf32_flops_per_s'] / 1e12:.1f} TFLOP/s",
        flush=True,
    )


def cases(dry: bool, full: bool) -> list[dict[str, Any]]:
    """Benchmark cases (bench/op_cases.py), most important first (the budget cuts the tail)."""
    import op_cases

    if dry:
        return [dict(c) for c in op_cases.DRY_RUN]
    big = [{**c, "full": True} for c in op_cases.FULL_SIZE] if full else []
    return [dict(c) for c in op_cases.GPU_ROOFLINE + op_cases.LAYERS] + big


def benchmark_plan(dry: bool, full: bool, backends: list[str]) -> list[dict[str, Any]]:
    """Every measurement in order: each case, at each precision, on each backend. The same plan in every worker,
    so that one started after a crash can go on at an index."""
    plan = []
    for case_index, spec in enumerate(cases(dry, full)):
        is_full = spec.pop("full", False)
        # Memory-bound last_layer at small K does not depend on the matmul mode: one precision suffices.
        modes = [None] if spec["op"] == "factored_min_distance" or spec.get("k") == 10 else ["tf32x3", "ieee"]
        for mode in modes:
            for backend in backends:
                if is_full and backend == "torch":
                    continue  # ~25k row chunks at this size: minutes of Python loop, not a kernel measurement
                plan.append({"case_index": case_index, "case": spec, "full": is_full, "mode": mode, "backend": backend})
    return plan


def measure(item: dict[str, Any], args: tuple, timer: Timer, budget: Budget) -> tuple[dict[str, Any], Any]:
    """One row: the median time of the item's call, and its first output (for the comparison of backends)."""
    from peak_memory import call

    spec, backend = item["case"], item["backend"]
    row: dict[str, Any] = {"case": spec, "backend": backend}
    if budget.left() < (90 if item["full"] else 5):
        row["skipped"] = "time budget spent"
        return row, None
    run_spec = {**spec, "backend": backend}
    first = None
    try:
        with precision(item["mode"]) as used:
            row["precision"] = used
            if item["full"]:  # kernels already compiled by the reduced-N case: one call
                row.update({"seconds_median": timer.once(functools.partial(call, run_spec, args)), "reps": 1})
            else:
                reps, target = (1, 0.0) if not timer.cuda else (5, 1.5)
                row.update(timer.median(functools.partial(call, run_spec, args), reps, target, budget))
                # A further call to compare outputs (not for the full size: another ~17 s call).
                result = call(run_spec, args)
                first = result[0] if isinstance(result, tuple) else result
    except Exception as error:  # one broken backend must not cost the other numbers
        row["error"] = f"{type(error).__name__}: {error}"[:500]
    return row, first


def worker_benchmark(args: argparse.Namespace, checkpoint: Checkpoint) -> None:
    """The plan from ``--start-index`` on, each row saved as it is measured, with the item in progress named
    first (a crash leaves it on disk)."""
    import torch

    sys.path.append(str(ROOT / "bench"))  # op_cases, peak_memory
    from peak_memory import inputs

    import fastdal.backends as backends

    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    timer, budget = Timer(cuda=not dry), Budget(args.deadline - time.time())
    available = backends.available()
    names = ("torch", "cpp", "triton") if dry else ("torch", "cuda", "triton")
    plan = benchmark_plan(dry, args.full, [b for b in names if available[b] is None])
    measured = json.loads(args.measured)
    peak = None if dry else peaks(args.device_name)
    checkpoint.data = {"backends": available, "plan_size": len(plan), "rows": [], "current": None}
    checkpoint.save()
    tensors, references = None, {}
    for index in range(args.start_index, len(plan)):
        item = plan[index]
        if tensors is None or tensors[0] != item["case_index"]:
            tensors = None
            if not dry:
                torch.cuda.empty_cache()
            tensors = (item["case_index"], inputs(item["case"], device))
        named = {"case": item["case"], "backend": item["backend"], "precision": item["mode"] or "default"}
        checkpoint.data["current"] = {"index": index, "item": named}
        checkpoint.save()
        if os.environ.get(CRASH_AT_ENV) == str(index):
            os.abort()
        row, first = measure(item, tensors[1], timer, budget)
        group = (item["case_index"], item["mode"])  # the first backend's output is the others' reference
        if first is not None and group not in references:
            references[group] = first
        elif first is not None:
            reference = references[group].double()
            scale = reference.abs().max().item() or 1.0
            row["max_rel_diff_vs_first_backend"] = (first.double() - reference).abs().max().item() / scale
        if item["case"]["op"] == "last_layer_score" and "seconds_median" in row:
            case = item["case"]
            row.update(roofline_fractions(case["n"], case["d"], case["k"], row["seconds_median"], peak, measured))
        checkpoint.data["rows"].append(row)
        checkpoint.data["current"] = None
        checkpoint.save()
        print(_line(row), flush=True)


def worker_tests(args: argparse.Namespace, checkpoint: Checkpoint) -> None:
    import pytest

    checkpoint.data = {"pytest_args": json.loads(args.pytest_args)}
    checkpoint.save()
    raise SystemExit(pytest.main(checkpoint.data["pytest_args"]))


WORKERS = {
    "environment": worker_environment,
    "ceilings": worker_ceilings,
    "benchmark": worker_benchmark,
    "tests": worker_tests,
}


# ----------------------------------------------------------------------------------------------------------
# Summary and main
# ----------------------------------------------------------------------------------------------------------
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


def failures(report: dict[str, Any]) -> list[str]:
    """One line per problem: every section not ok or skipped (a forced build failure marked so), every failed
    test and benchmark error."""
    lines = []
    for name, section in report["sections"].items():
        status = section.get("status")
        if status in ("ok", "skipped"):
            continue
        forced = " (forced by --force-build-failure)" if name == "build" and section.get("forced") else ""
        detail = section.get("error") or " | ".join(section.get("tail", [])[-1:]) or section.get("totals") or ""
        lines.append(f"{name}: {status}{forced}{': ' + detail if detail else ''}"[:400])
        for test in section.get("failures", []):
            lines.append(f"  {test['outcome']} {test['test']} - {test['reason']}"[:400])
        if section.get("running_when_cut"):
            lines.append(f"  running when cut: {section['running_when_cut']}")
        for row in section.get("rows", []):
            if row.get("error"):
                case = ",".join(f"{k}={v}" for k, v in row["case"].items())
                lines.append(f"  {case} {row['backend']} {row.get('precision', '')}: {row['error']}"[:400])
    return lines


def print_summary(report: dict[str, Any], paths: list[Path]) -> None:
    """The run's last lines (what the run tool's reply shows): each section's status and the failures."""
    dry = " (dry run)" if report["dry_run"] and "dry run" not in str(report.get("device")) else ""
    print(f"\n== gpu-check summary: {report.get('device')}{dry} ==")
    for name, section in report["sections"].items():
        note = section.get("totals") or section.get("why") or ""
        if name == "benchmark":
            rows = section.get("rows", [])
            done = sum("seconds_median" in r for r in rows)
            note = f"{done} measured, {sum('skipped' in r for r in rows)} skipped of {section.get('plan_size')}"
        print(f"{name:12s} {section.get('status', '?'):8s} {section.get('seconds', 0):6.0f} s  {note}")
    print(f"extension: {report.get('extension')}")
    backends = report["sections"].get("benchmark", {}).get("backends") or {}
    if backends:
        usable = [name for name, reason in backends.items() if reason is None]
        print(f"backends: {', '.join(usable)} (not here: {', '.join(sorted(set(backends) - set(usable))) or '-'})")
    if report.get("cut"):
        print(f"CUT by {report['cut']} after {report['seconds_total']:.0f} s")
    problems = report["failures"]
    print(f"{len(problems)} problem(s)" + (":" if problems else ""))
    shown = 40  # the JSON has them all; the reply's tail must still reach the total line
    for line in problems[:shown] + [f"... {len(problems) - shown} more in the JSON"] * (len(problems) > shown):
        print(line)
    print(f"total {report['seconds_total']:.0f} s; JSON: {', '.join(map(str, paths)) or 'not written'}", flush=True)


def exit_status(report: dict[str, Any]) -> int:
    """0 when every section is ok or skipped, a forced build failure aside."""
    for name, section in report["sections"].items():
        if section.get("status") not in ("ok", "skipped") and not (name == "build" and section.get("forced")):
            return 1
    return 0


def output_folder(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return Path(tempfile.mkdtemp(prefix="gpu-check-"))


def run_sections(ctx: Context) -> None:
    """The sections in order; the report's paths are known once the device is."""
    report = ctx.report
    run_section(ctx, "environment", environment_section)
    report.data.update(dry_run=ctx.dry, device=ctx.device.get("device", "unknown device"))
    report.data["datasheet_peaks"] = None if ctx.dry else peaks(report.data["device"])
    name = f"gpu-check-{_slug(report.data['device'])}.json"
    report.paths = [ctx.out / name] + ([] if ctx.dry else [RESULTS / name])
    report.write()
    build = run_section(ctx, "build", build_section)
    ctx.block_extension = build["status"] not in ("ok", "skipped")
    report.data["extension"] = (
        f"blocked: the build {build['status']}, so the tests and benchmark ran on the torch and triton paths"
        if ctx.block_extension
        else "as built (see each section's backends)"
    )
    report.write()
    run_section(ctx, "tests", tests_section)
    run_section(ctx, "ceilings", ceilings_section)
    run_section(ctx, "benchmark", benchmark_section)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU shapes (automatic without CUDA)")
    parser.add_argument("--full", action="store_true", help="also last_layer_score at N=1M, K=131072 (last)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds from start after which to stop")
    # last_layer_score.cu alone is ~210-240 CPU-seconds of nvcc for sm_90 (make gpu-compile's cpu_seconds on a
    # 2-core CPU machine), and one file is one process: the build cannot go much below it, whatever MAX_JOBS
    parser.add_argument("--build-timeout-s", type=float, default=240.0, help="bound of the build (group killed)")
    parser.add_argument("--tests-timeout-s", type=float, default=150.0, help="bound of the gpu tests")
    parser.add_argument("--skip-build", action="store_true", help="use the fastdal._C already built")
    parser.add_argument("--skip-tests", action="store_true", help="benchmark only")
    parser.add_argument("--tests", nargs="+", help="test files to run (default: those with gpu-marked tests)")
    parser.add_argument("--out", type=Path, help="folder of the JSON and logs (default $OUT, else a temporary one)")
    parser.add_argument(
        "--force-build-failure",
        nargs="?",
        const="exit",
        choices=["exit", "hang"],
        help="replace the build by one that fails (exit) or hangs until --build-timeout-s (hang)",
    )
    # the children's options (--worker NAME: run one section's work in this process)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--section-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-extension", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)  # time.time() to stop at
    parser.add_argument("--measured", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--device-name", default="", help=argparse.SUPPRESS)
    parser.add_argument("--pytest-args", default="[]", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Environment, build, tests, ceilings, benchmark; the JSON after each; the summary last, also when cut."""
    args = parse_args(argv)
    if args.worker:
        use_source_tree(args.no_extension)
        WORKERS[args.worker](args, Checkpoint(args.section_file))
        return 0
    budget = Budget(args.budget_s)
    out = output_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(
        {
            "dry_run": args.dry_run,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "plan_s": {"budget": args.budget_s, "build": args.build_timeout_s, "tests": args.tests_timeout_s},
            "units": "seconds; bytes/s; flop/s; fractions are of the named ceiling",
            "sections": {},
        }
    )
    ctx = Context(args, budget, out, report, dry=args.dry_run)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_cut)
    try:
        run_sections(ctx)
    except Cut as cut:
        report.data["cut"] = str(cut)
    except Exception:  # a bug of this script: still a report, with the traceback
        report.data["error"] = traceback.format_exc().splitlines()[-12:]
        print(traceback.format_exc(), flush=True)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        for section in report.data["sections"].values():
            if section.get("status") == "running":
                section["status"] = "cut"
        report.data["seconds_total"] = round(budget.elapsed(), 1)
        report.data["failures"] = failures(report.data)
        if not report.paths:  # cut before the device was known
            report.paths = [out / "gpu-check-unknown-device.json"]
        report.write()
        print("\n".join(_line(r) for r in report.data["sections"].get("benchmark", {}).get("rows", [])))
        print_summary(report.data, report.paths)
    if report.data.get("cut") or report.data.get("error"):
        return 1
    return exit_status(report.data)


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
