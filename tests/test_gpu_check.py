"""bench/gpu_check.py cannot come back empty: its dry run on CPU, with the build made to fail, hang or be cut.

Each test runs the script as the GPU machine would (a child process, tiny CPU shapes) and reads the JSON it
leaves: the failed build is recorded and the tests and benchmark of the torch and Triton paths still ran from
the source tree with the extension absent; a hung build's whole process group is killed at its bound and when
the script is cut; a benchmark worker that dies (as on a CUDA fault) loses no earlier number and a fresh one
goes on after it. The forced failures keep the C++ build out (it would take minutes here).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
QUICK = ["--dry-run", "--tests", "tests/test_gpu.py"]  # the one file of gpu tests that collects fast


def run_check(out: Path, *options: str, env: dict[str, str] | None = None) -> tuple[int, str, dict]:
    """The script's exit status, its output and its JSON."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *QUICK, *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    return proc.returncode, proc.stdout + proc.stderr, read_report(out)


def read_report(out: Path) -> dict:
    (path,) = out.glob("gpu-check-*.json")
    return json.loads(path.read_text())


def process_gone(pid: int) -> bool:
    """No such process, or a zombie waiting for a reaper (it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def hung_build_child(out: Path, timeout: float = 60.0) -> int:
    """The pid of the child the forced hang starts (from the build log), once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = out / "build.log"
        if log.exists() and (m := re.search(r"child pid (\d+)", log.read_text())):
            return int(m[1])
        time.sleep(0.2)
    raise AssertionError("the forced hang never started")


def test_failed_build_still_tests_and_times_the_torch_and_triton_paths(tmp_path: Path) -> None:
    code, output, report = run_check(tmp_path, "--force-build-failure")
    sections = report["sections"]
    assert sections["build"]["status"] == "failed" and sections["build"]["forced"] == "exit"
    assert sections["tests"]["status"] == "ok" and sections["tests"]["outcomes"].get("skipped", 0) > 0
    benchmark = sections["benchmark"]
    assert benchmark["status"] == "ok", benchmark
    assert benchmark["backends"]["cpp"] is not None  # the extension is absent, whatever lies in the tree
    measured = {row["backend"] for row in benchmark["rows"] if "seconds_median" in row}
    assert measured == {"torch", "triton"}
    assert len(benchmark["rows"]) == benchmark["plan_size"]
    assert report["failures"] and report["failures"][0].startswith("build: failed (forced")
    assert code == 0, output  # a forced build failure is not the run's failure
    assert any(line.startswith("1 problem(s)") for line in output.splitlines()[-4:]), output[-2000:]


def test_build_timeout_kills_the_group_and_a_dead_benchmark_worker_is_replaced(tmp_path: Path) -> None:
    crash_at = 1
    code, output, report = run_check(
        tmp_path,
        "--force-build-failure",
        "hang",
        "--build-timeout-s",
        "2",
        "--skip-tests",
        env={"GPU_CHECK_CRASH_AT_INDEX": str(crash_at)},
    )
    sections = report["sections"]
    assert sections["build"]["status"] == "timeout"
    assert process_gone(hung_build_child(tmp_path, timeout=1))
    benchmark = sections["benchmark"]
    rows = benchmark["rows"]
    assert "seconds_median" in rows[0]  # measured before the crash, kept
    assert "worker died" in rows[crash_at]["error"]
    assert benchmark["restarts"] == [{"after_index": crash_at, "returncode": -signal.SIGABRT}]
    assert len(rows) == benchmark["plan_size"] and all("seconds_median" in r for r in rows[crash_at + 1 :])
    assert benchmark["status"] == "failed" and code == 1
    assert any("worker died" in line for line in output.splitlines()[-6:]), output[-2000:]


def test_cut_during_the_build_kills_its_group_and_still_writes_the_report(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), *QUICK, "--force-build-failure", "hang"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        child = hung_build_child(tmp_path)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    report = read_report(tmp_path)
    assert report["cut"] == "SIGTERM" and report["sections"]["build"]["status"] == "cut"
    assert "tests" not in report["sections"]
    assert process_gone(child)
    assert proc.returncode == 1
    assert "CUT by SIGTERM" in output and output.rstrip().splitlines()[-1].startswith("total "), output[-2000:]
