"""A pass over a large pool keeps its results and nothing else (bench/bench_pool_memory.py measures 1e5-1e6).

Each case runs in a fresh process: 300000 lazily generated samples scored with a layers="last" gradient. Keeping
every batch's small result tensors until the end held 150-330 MiB here (0.5-1 KB a sample, allocator
fragmentation); with the results written into preallocated columns the resident set after the call stays
within a small constant of the results' 5.7 MiB.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_pool_memory.py"
SAMPLES = 300_000
SLACK = 48 * 2**20  # the allocator's arenas and the last batch's buffers: a constant, whatever the pool size


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read the resident set")
@pytest.mark.parametrize("layout", ["tensor", "tuple", "dict"])
def test_memory_kept_after_a_large_pool_is_the_results(layout):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--one", json.dumps([SAMPLES, layout, "score"])],
        capture_output=True,
        text=True,
        check=True,
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["result_bytes"] == SAMPLES * 20
    assert row["retained"] <= row["result_bytes"] + SLACK, row
