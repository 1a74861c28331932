"""fastdal's GPU code paths on fake CUDA tensors (tests/fake_cuda/): run in CI, where there is no GPU.

tests/fake_cuda/scenarios.py runs the public functions on CUDA-resident models of every module family, every
backend, ``layers`` request and dtype, in a process of its own (fake CUDA is loaded before torch), and writes what
it saw. These tests read that report and fail on:

* an error, a device mismatch among them (a CPU tensor meeting a CUDA one);
* a host wait (the host reading a value from the device, or a copy to the host) not named in :data:`ALLOWED_WAITS`,
  or one whose count grows with the number of batches (every allowed one happens once per call);
* a number of launches per batch that grows with the batch size;
* a Triton launch whose grid or integer arguments CUDA would refuse.

The same checks must fail on runs with a fault planted on purpose (``--plant``): a CPU tensor in a per-layer term,
and an ``.item()`` in the per-batch path.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIOS = Path(__file__).resolve().parent / "fake_cuda" / "scenarios.py"

# The host waits left, by the innermost fastdal frame asking for it and its kind, each with why it stays. Each
# happens a fixed number of times per call, never per batch or per pick (checked below).
ALLOWED_WAITS = {
    ("results.py:results_on_host", "copy to the host"): "score returns its results on the CPU: one copy per pass",
    ("checks.py:finish", "copy to the host"): (
        "the finite and label checks keep the first offending sample on the device and read it once per pass, "
        "so that the error still names the sample"
    ),
    ("grads.py:_finite_tensors", "copy to the host"): "G's finite check: one read per call, before the pass",
    ("selection.py:badge", "copy to the host"): "BADGE's chosen indices, returned on the CPU once at the end",
    ("selection.py:greedy", "copy to the host"): "greedy's indices and gains, returned on the CPU once at the end",
    ("api.py:select", "copy to the host"): "top-b over the features' scores on the CPU, once per call",
    ("selection.py:_min_distance", "value read on the host"): (
        "BADGE over the exact last layer: the fused distance kernels take the centre as an integer argument, one "
        "index read per pick (the distances stay on the device; passing the centre by pointer would remove it)"
    ),
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    return _run(tmp_path_factory.mktemp("fake_cuda") / "reports.json")


def _run(out: Path, *args: str) -> list[dict]:
    # Triton's launches go to the harness's check, not to its interpreter (which the test session turns on).
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDAL_BACKEND")}
    done = subprocess.run(
        [sys.executable, str(SCENARIOS), str(out), *args], capture_output=True, text=True, timeout=1800, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def problems(reports: list[dict]) -> list[str]:
    """Everything the fake-CUDA run saw that a GPU user would hit; empty when all is well."""
    found = []
    for report in reports:
        name = f"{report['model']} {report['dtype']} backend={report['backend']} layers={report['layers']}"
        if report["model"] == "split":
            if "spread over" not in (report["error"] or ""):
                found.append(f"{name}: a model split over two GPUs is not refused up front: {report['error']}")
            continue
        if report["error"]:
            found.append(f"{name}: {report['error']}")
        if report["model"] == "copies":  # copies to the host on purpose: test_copies_to_the_host_block
            continue
        for key, waits in report.items():
            if key.startswith("waits_"):
                found += [f"{name} {key}: {wait['kind']} at {' < '.join(reversed(wait['frames']))}"
                          for wait in waits if (_where(wait), wait["kind"]) not in ALLOWED_WAITS]
        if "waits_score_3" in report:
            few, many = (collections.Counter(_key(w) for w in report[f"waits_score_{size}"]) for size in (6, 3))
            if few != many:
                found.append(f"{name}: host waits grow with the number of batches: {dict(few)} -> {dict(many)}")
        per_batch = report.get("launches_per_batch")
        if per_batch and per_batch["3"][1] != per_batch["6"][1]:
            found.append(f"{name}: launches per batch grow with the batch size: {per_batch}")
        found += [f"{name}: {problem}" for problem in report.get("launch_problems", [])]
    return found


def _where(wait: dict) -> str:
    return wait["frames"][-1] if wait["frames"] else "<outside fastdal>"


def _key(wait: dict) -> tuple[str, str]:
    return (_where(wait), wait["kind"])


def test_gpu_paths_have_no_device_mismatch_per_batch_wait_or_growing_launches(reports):
    found = problems(reports)
    assert not found, f"{len(found)} problems:\n" + "\n".join(found[:40])


def test_every_model_family_backend_and_layers_request_ran(reports):
    ran = {(r["model"], r["backend"], r["dtype"], str(r["layers"])) for r in reports}
    for model in ("mlp", "cnn", "transformer", "recurrent", "bags"):
        for backend in ("auto", "torch", "cuda", "triton", "env:cuda", "env:triton"):
            assert {(model, backend, "float32", layers) for layers in ("last", "all", "modules")} <= ran
        assert {(model, "auto", dtype, "all") for dtype in ("bfloat16", "float64")} <= ran
    # The fused GPU kernels were reached (their launches were checked), not only the torch backend.
    assert any(r["launches_per_batch"] for r in reports if r["backend"] == "cuda")


def test_copies_to_the_host_block(reports):
    (copies,) = [r for r in reports if r["model"] == "copies"]
    kinds = [w["kind"] for w in copies["waits_copies"]]
    assert kinds == ["copy to the host"] * 2  # a blocking copy of each of the two tensors, never asynchronous


@pytest.mark.parametrize("plant", ["cpu-term", "host-wait"])
def test_a_planted_fault_fails_the_checks(plant, tmp_path):
    planted = _run(tmp_path / "planted.json", "--plant", plant, "--only", "mlp")
    found = problems(planted)
    if plant == "cpu-term":
        assert any("DeviceMismatchError" in p for p in found), found[:5]
    else:
        assert any("host waits grow with the number of batches" in p for p in found), found[:5]
